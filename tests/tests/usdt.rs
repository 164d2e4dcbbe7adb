//! libprofalloc.so's `otel_memory` USDT probes and its sampled live heap,
//! and `prof-bpf`'s readers of both (`profiler::usdt`,
//! `profiler::live_heap`), checked against independent oracles: binutils
//! (`readelf -n`, `nm`, the file's bytes), bpftrace, and the HEAPPROFILE
//! dump of the same process. Workloads: `usdt_live.c` (known live sets at
//! known sites, nothing allocated before "go") and `usdt_alloc.c` (a C
//! allocator with its own sampler and `<sys/sdt.h>` probes).
use std::{
    collections::BTreeMap,
    io::BufReader,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prof_bpf_tests::{Proc, bpf_available, build_workload, profalloc_lib, start_bpftrace};
use profiler::usdt::{self, Location, Reg};
use profiler_common::hooks::{USDT_ALLOC, USDT_FREE, USDT_PROVIDER};

const FLAGS: &[&str] = &["-O2", "-g"];

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `readelf -n`'s SDT notes: (provider, name, location, arguments).
fn readelf_notes(file: &Path) -> Vec<(String, String, u64, String)> {
    let text = run("readelf", &["-n", &file.to_string_lossy()]);
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(l) = lines.next() {
        let Some(provider) = l.strip_prefix("Provider: ") else {
            continue;
        };
        let name = lines.next().unwrap().strip_prefix("Name: ").unwrap();
        let loc = lines.next().unwrap().strip_prefix("Location: ").unwrap();
        let loc = u64::from_str_radix(loc.split(',').next().unwrap().trim_start_matches("0x"), 16)
            .unwrap();
        let args = lines
            .next()
            .unwrap()
            .strip_prefix("Arguments:")
            .unwrap()
            .trim();
        out.push((provider.to_owned(), name.to_owned(), loc, args.to_owned()));
    }
    out
}

/// Our reader's probes, checked against readelf; returns them.
fn probes_agreeing_with_readelf(file: &Path) -> Vec<usdt::Probe> {
    let probes = usdt::probes_in_file(file).unwrap();
    let ours: Vec<_> = probes
        .iter()
        .map(|p| {
            (
                p.provider.clone(),
                p.name.clone(),
                p.pc,
                p.args_text.clone(),
            )
        })
        .collect();
    assert_eq!(ours, readelf_notes(file), "{}", file.display());
    probes
}

fn probe<'a>(probes: &'a [usdt::Probe], name: &str) -> &'a usdt::Probe {
    probes
        .iter()
        .find(|p| p.provider == USDT_PROVIDER && p.name == name)
        .unwrap_or_else(|| panic!("no {USDT_PROVIDER}:{name} in {probes:?}"))
}

fn bytes_at(file: &Path, offset: u64, n: usize) -> Vec<u8> {
    let data = std::fs::read(file).unwrap();
    data[offset as usize..offset as usize + n].to_vec()
}

#[test]
fn libprofalloc_notes_are_read_and_each_site_starts_its_function() {
    let lib = profalloc_lib();
    let probes = probes_agreeing_with_readelf(&lib);
    assert_eq!(probes.len(), 2, "{probes:?}");
    // Function symbols (nm) by address: each site is one's first byte.
    let nm = run("nm", &["--defined-only", &lib.to_string_lossy()]);
    let functions: Vec<u64> = nm
        .lines()
        .filter(|l| l.contains(" t ") || l.contains(" T "))
        .filter_map(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
        .collect();
    let rdi = Location::Register(Reg::Rdi);
    for (name, regs) in [
        (USDT_ALLOC, &[Reg::Rdi, Reg::Rsi, Reg::Rdx][..]),
        (USDT_FREE, &[Reg::Rdi][..]),
    ] {
        let p = probe(&probes, name);
        assert_eq!(p.semaphore, 0, "{name}: no semaphore");
        assert!(
            functions.contains(&p.pc),
            "{name}: site {:#x} is not a function's start",
            p.pc
        );
        assert_eq!(
            bytes_at(&lib, p.file_offset, 5),
            [0x0f, 0x1f, 0x44, 0x00, 0x00],
            "{name}: a 5-byte nop"
        );
        let locations: Vec<_> = p
            .args
            .iter()
            .map(|a| (a.size, a.signed, a.location.clone()))
            .collect();
        let want: Vec<_> = regs
            .iter()
            .map(|&r| (8, false, Location::Register(r)))
            .collect();
        assert_eq!(locations, want, "{name}");
        assert_eq!(p.args[0].location, rdi);
        // Its stack starts at the caller: [rsp] is the return address.
        assert!(p.return_address_at_sp, "{name}");
    }
}

#[test]
fn bpftrace_lists_libprofallocs_probes() {
    if !bpf_available("bpftrace_lists_libprofallocs_probes") {
        return;
    }
    let lib = profalloc_lib();
    let lib = lib.to_string_lossy();
    let listed = run("bpftrace", &["-l", &format!("usdt:{lib}:*")]);
    let mut probes: Vec<&str> = listed.lines().map(str::trim).collect();
    probes.sort_unstable();
    assert_eq!(
        probes,
        [
            format!("usdt:{lib}:{USDT_PROVIDER}:{USDT_ALLOC}"),
            format!("usdt:{lib}:{USDT_PROVIDER}:{USDT_FREE}"),
        ]
    );
}

#[test]
fn the_c_allocators_notes_are_read_and_decoded() {
    let program = build_workload("usdt_alloc", FLAGS);
    let probes = probes_agreeing_with_readelf(&program);
    let alloc = probe(&probes, USDT_ALLOC);
    let free = probe(&probes, USDT_FREE);
    assert_eq!((alloc.args.len(), free.args.len()), (3, 1));
    for p in [alloc, free] {
        // <sys/sdt.h> sites are a 1-byte nop, inside the function: the
        // stack starts at the site.
        assert_eq!(bytes_at(&program, p.file_offset, 1), [0x90], "{}", p.name);
        assert!(!p.return_address_at_sp, "{}", p.name);
        assert_eq!(p.args_error, None, "{}", p.name);
        for a in &p.args {
            assert_eq!(a.size, 8, "{}: {}", p.name, p.args_text);
            assert!(
                matches!(a.location, Location::Register(_) | Location::Memory { .. }),
                "{}: {}",
                p.name,
                p.args_text
            );
        }
    }
}

/// `@name: value` lines of bpftrace's final map dump.
fn bpftrace_value(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("@{name}: ")))
        .unwrap_or_else(|| panic!("no @{name} in bpftrace output:\n{out}"))
        .trim()
        .parse()
        .unwrap()
}

fn wait_bpftrace(
    mut child: std::process::Child,
    mut out: BufReader<std::process::ChildStdout>,
) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    assert!(child.wait().unwrap().success(), "bpftrace failed:\n{text}");
    text
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("usdt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `usdt_live` under libprofalloc.so with HEAPPROFILE, waiting at "ready".
fn start_live(dir: &Path) -> Proc {
    let program = build_workload("usdt_live", FLAGS);
    let mut p = Proc::spawn(
        Command::new(program)
            .env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", "65536")
            .env("HEAPPROFILE", dir.join("live"))
            .env("HEAP_PROFILE_INUSE_INTERVAL", "0")
            .env("HEAP_PROFILE_ALLOCATION_INTERVAL", "0"),
    );
    p.expect_line("ready");
    p
}

/// The exit dump of HEAPPROFILE in `dir`.
fn exit_dump(dir: &Path) -> profiler::profile::Profile {
    let mut dumps: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "heap"))
        .collect();
    dumps.sort();
    let last = dumps.last().expect("no HEAPPROFILE dump");
    // As `prof-bpf report` shows it: read, then symbolized.
    profiler::report::open(last, 1 << 30).unwrap()
}

#[test]
fn bpftrace_sums_the_same_weight_as_heapprofile() {
    if !bpf_available("bpftrace_sums_the_same_weight_as_heapprofile") {
        return;
    }
    let dir = scratch("bpftrace");
    let mut p = start_live(&dir);
    let lib = profalloc_lib();
    let lib = lib.to_string_lossy();
    let (bt, out) = start_bpftrace(
        &format!(
            "usdt:{lib}:{USDT_PROVIDER}:{USDT_ALLOC} {{ @weight = sum(arg2); @allocs = count(); }} \
             usdt:{lib}:{USDT_PROVIDER}:{USDT_FREE} {{ @frees = count(); }}"
        ),
        p.pid(),
    );
    p.send_line("go");
    p.expect_line("allocated");
    p.send_line("exit");
    let (_, code) = p.wait_output(Duration::from_secs(60));
    assert_eq!(code, 0);
    let text = wait_bpftrace(bt, out);
    let profile = exit_dump(&dir);
    let alloc_space = profile.sample_type_index("alloc_space").unwrap();
    let total = |i: usize| profile.samples.iter().map(|s| s.values[i]).sum::<i64>() as u64;
    assert_eq!(
        bpftrace_value(&text, "weight"),
        total(alloc_space),
        "{text}"
    );
    // About 60 MB + 19 MB + 400 MB allocated at a 64 KiB mean: thousands
    // of samples, each freed churn sample seen by the free probe.
    let allocs = bpftrace_value(&text, "allocs");
    let frees = bpftrace_value(&text, "frees");
    assert!(allocs > 5000, "{text}");
    assert!(frees > 4000 && frees < allocs, "{text}");
}

#[test]
fn bpftrace_sees_the_c_allocators_trap_sites() {
    if !bpf_available("bpftrace_sees_the_c_allocators_trap_sites") {
        return;
    }
    let program = build_workload("usdt_alloc", FLAGS);
    let mut p = Proc::spawn(Command::new(&program).args(["20000", "1000", "65536"]));
    p.expect_line("ready");
    let path = program.to_string_lossy();
    let (bt, out) = start_bpftrace(
        &format!(
            "usdt:{path}:{USDT_PROVIDER}:{USDT_ALLOC} {{ @weight = sum(arg2); @allocs = count(); }} \
             usdt:{path}:{USDT_PROVIDER}:{USDT_FREE} {{ @frees = count(); }}"
        ),
        p.pid(),
    );
    p.send_line("go");
    let (rest, code) = p.wait_output(Duration::from_secs(60));
    assert_eq!(code, 0);
    let text = wait_bpftrace(bt, out);
    // The program's own count of the probes it fired.
    let words: Vec<&str> = rest.split_whitespace().collect();
    let field = |k: &str| -> u64 {
        let i = words.iter().position(|w| *w == k).unwrap();
        words[i + 1].parse().unwrap()
    };
    assert_eq!(
        bpftrace_value(&text, "allocs"),
        field("sampled"),
        "{text}\n{rest}"
    );
    assert_eq!(
        bpftrace_value(&text, "frees"),
        field("freed"),
        "{text}\n{rest}"
    );
    assert_eq!(
        bpftrace_value(&text, "weight"),
        field("weight"),
        "{text}\n{rest}"
    );
}

#[test]
fn the_live_heap_read_from_outside_matches_heapprofile() {
    let dir = scratch("live");
    let mut p = start_live(&dir);
    p.send_line("go");
    p.expect_line("allocated");
    let heap = profiler::live_heap::read(p.pid()).unwrap();
    p.send_line("exit");
    let (_, code) = p.wait_output(Duration::from_secs(60));
    assert_eq!(code, 0);
    assert_eq!((heap.sample_bytes, heap.dropped, heap.torn), (65536, 0, 0));

    // Known by construction (usdt_live.c): 60000 x 1000 B and 64 x 300000 B.
    let by_size = |size: u64| -> u64 {
        heap.samples
            .iter()
            .filter(|s| s.size == size)
            .map(|s| s.weight)
            .sum()
    };
    for (size, live) in [(1000u64, 60_000_000f64), (300_000, 19_200_000.0)] {
        let got = by_size(size) as f64;
        assert!(
            (got / live - 1.0).abs() < 0.10,
            "{size} B objects: {got} estimated, {live} live"
        );
    }
    // The churn (2000 B, all freed) left nothing behind.
    assert_eq!(by_size(2000), 0);
    assert!(
        heap.samples
            .iter()
            .all(|s| s.age < Duration::from_secs(300))
    );

    // The same samples, with the same stacks, as the HEAPPROFILE exit dump
    // (its locations are return addresses minus one).
    let mut ours: BTreeMap<Vec<u64>, u64> = BTreeMap::new();
    for s in &heap.samples {
        let stack: Vec<u64> = s.stack.iter().map(|a| a - 1).collect();
        *ours.entry(stack).or_default() += s.weight;
    }
    let profile = exit_dump(&dir);
    let inuse = profile.sample_type_index("inuse_space").unwrap();
    let mut theirs: BTreeMap<Vec<u64>, u64> = BTreeMap::new();
    for s in profile.samples.iter().filter(|s| s.values[inuse] > 0) {
        let stack = s
            .locations
            .iter()
            .map(|&l| profile.locations[l].address)
            .collect();
        *theirs.entry(stack).or_default() += s.values[inuse] as u64;
    }
    assert_eq!(ours, theirs);
    // And those stacks name the sites.
    let names = |stack: &Vec<u64>| -> Vec<String> {
        profile
            .samples
            .iter()
            .find(|s| {
                s.locations
                    .iter()
                    .map(|&l| profile.locations[l].address)
                    .eq(stack.iter().copied())
            })
            .map(|s| {
                s.locations
                    .iter()
                    .flat_map(|&l| {
                        profile.locations[l]
                            .frames
                            .iter()
                            .map(|f| f.function.clone())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for stack in ours.keys() {
        let n = names(stack);
        assert!(
            n.iter().any(|f| f == "small_site" || f == "large_site"),
            "a live stack outside the sites: {n:?}"
        );
    }
}
