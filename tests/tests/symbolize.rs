//! Symbolization from raw addresses: real programs with known functions
//! (C, C++, an inlined function) symbolized after they exited, and a
//! stripped binary whose gaps between exported symbols must stay unnamed.
use std::{process::Command, time::Duration};

use prof_bpf_tests::build_workload;
use profiler::{
    output::OutputArgs,
    profile::{Collector, Mapping, Profile, RawSample, SampleType, StackStatus},
};
use symbolize_support::*;

mod symbolize_support;

#[test]
fn c_functions_and_inlined_frames_after_exit() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    let order = ["site_outer", "site_middle", "site_leaf", "site_inlined"];
    for (i, site) in order.iter().enumerate() {
        collector.add(sample(pid, vec![sites[*site]], false, i as i64 + 1));
    }
    // A sampled pc is looked up as is (not minus one).
    collector.add(sample(pid, vec![sites["site_pc"]], true, 10));
    // A whole stack: leaf pc, then return addresses into its callers.
    collector.add(sample(
        pid,
        vec![sites["site_pc"], sites["site_middle"], sites["site_outer"]],
        true,
        7,
    ));
    // Symbolize only after the process is gone.
    proc.send_line("exit");
    let (_, code) = proc.wait_output(Duration::from_secs(10));
    assert_eq!(code, 0);
    let profile = collector.finish().expect("finish");

    assert_eq!(names(frames(&profile, 0)), [("outer_function", false)]);
    assert_eq!(names(frames(&profile, 1)), [("middle_function", false)]);
    assert_eq!(names(frames(&profile, 2)), [("leaf_function", false)]);
    assert_eq!(
        names(frames(&profile, 3)),
        [("inlined_helper", true), ("with_inlined_caller", false)]
    );
    assert_eq!(names(frames(&profile, 4)), [("leaf_function", false)]);
    for f in frames(&profile, 0).iter().chain(frames(&profile, 3)) {
        assert!(f.file.ends_with("sym_known.c"), "file of {f:?}");
        assert!(f.line > 0, "line of {f:?}");
    }
    let m = &profile.mappings[profile.locations[profile.samples[0].locations[0]]
        .mapping
        .unwrap()];
    assert_eq!(m.file, program.to_str().unwrap());
    assert_eq!(m.build_id.len(), 40, "gcc's default sha1 build-id: {m:?}");

    // The same names through the writers (folded: outermost first, with the
    // process root frame).
    let dir = std::env::temp_dir().join(format!("prof-bpf-sym-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("p.folded");
    let args = OutputArgs {
        output: Some(out.clone()),
        ..OutputArgs::default()
    };
    args.check(&[])
        .and_then(|plan| plan.write(&profile))
        .expect("write folded");
    let folded = std::fs::read_to_string(&out).unwrap();
    let root = format!("sym_known-{pid}");
    assert!(
        folded.contains(&format!(
            "{root};with_inlined_caller;inlined_helper_[i] 4\n"
        )),
        "{folded}"
    );
    assert!(
        folded.contains(&format!(
            "{root};outer_function;middle_function;leaf_function 7\n"
        )),
        "{folded}"
    );
    assert!(
        folded.contains(&format!("{root};leaf_function 13\n")),
        "{folded}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cpp_names_are_demangled() {
    let program = build_workload("sym_known_cc", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    collector.add(sample(pid, vec![sites["site_method"]], false, 1));
    collector.add(sample(pid, vec![sites["site_template"]], false, 1));
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().expect("finish");
    let method = &frames(&profile, 0)[0].function;
    let template = &frames(&profile, 1)[0].function;
    assert!(method.starts_with("shapes::Widget::compute"), "{method}");
    assert!(
        template.starts_with("int shapes::scaled<int>")
            || template.starts_with("shapes::scaled<int>"),
        "{template}"
    );
}

#[test]
fn garbage_frames_end_the_stack_as_truncated() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.note_process(pid);
    // 0x10 is in no mapping: the walk went astray after middle_function.
    collector.add(sample(
        pid,
        vec![sites["site_middle"], 0x10, sites["site_outer"]],
        false,
        1,
    ));
    collector.add(RawSample {
        user_status: StackStatus::Missing,
        kernel: Vec::new(),
        ..sample(pid, Vec::new(), false, 1)
    });
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().expect("finish");
    let folded = |args: OutputArgs| {
        let out =
            std::env::temp_dir().join(format!("prof-bpf-trunc-{}.folded", std::process::id()));
        OutputArgs {
            output: Some(out.clone()),
            ..args
        }
        .check(&[])
        .and_then(|plan| plan.write(&profile))
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).ok();
        text
    };
    let text = folded(OutputArgs::default());
    assert!(
        text.contains(&format!("sym_known-{pid};[truncated];middle_function 1\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("sym_known-{pid};[missing user stack] 1\n")),
        "{text}"
    );
    assert!(!text.contains("outer_function"), "{text}");
}

/// Debian's python3.11 has only .dynsym: its static functions lie in gaps
/// between exported symbols. An address in such a gap must stay
/// `python3.11+0xOFFSET`, not take the preceding exported symbol's name.
#[test]
fn stripped_binary_gap_is_not_given_a_wrong_name() {
    let python = "/usr/bin/python3.11";
    let nm = Command::new("nm")
        .args(["-D", "--defined-only", "-S", python])
        .output()
        .expect("run nm");
    let mut syms: Vec<(u64, u64, String)> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || !f[2].eq_ignore_ascii_case("t") {
                return None;
            }
            Some((
                u64::from_str_radix(f[0], 16).ok()?,
                u64::from_str_radix(f[1], 16).ok()?,
                f[3].to_owned(),
            ))
        })
        .collect();
    syms.sort();
    // A gap of at least 256 bytes after a sized symbol.
    let (before, gap_addr) = syms
        .windows(2)
        .find_map(|w| {
            let end = w[0].0 + w[0].1;
            (w[0].1 > 0 && w[1].0 > end + 256).then(|| (w[0].clone(), end + 128))
        })
        .expect("python3.11 has gaps between its exported functions");
    // Text segment: file offset = vaddr - 0x400000 for this non-PIE binary
    // (checked below through readelf).
    let readelf = Command::new("readelf")
        .args(["-lW", python])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&readelf.stdout);
    let load = text
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD") && l.contains(" R E "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(2)
                .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap())
                .collect();
            (f[0], f[1])
        })
        .next()
        .expect("an executable LOAD segment");
    let to_offset = |vaddr: u64| vaddr - load.1 + load.0;
    let mut profile = Profile {
        sample_types: vec![SampleType::samples()],
        mappings: vec![Mapping {
            start: 0,
            limit: 1 << 40,
            offset: 0,
            file: python.to_owned(),
            local_path: Some(python.into()),
            ..Mapping::default()
        }],
        ..Profile::default()
    };
    for addr in [gap_addr, before.0 + before.1 / 2] {
        profile.locations.push(profiler::profile::Location {
            mapping: Some(0),
            address: to_offset(addr),
            ..Default::default()
        });
    }
    profile.symbolize();
    assert!(
        profile.locations[0].frames.is_empty(),
        "address {gap_addr:#x} after {} was named {:?}",
        before.2,
        profile.locations[0].frames
    );
    assert_eq!(
        profile.frame_names(&profile.locations[0]),
        [format!("python3.11+{:#x}", to_offset(gap_addr))]
    );
    assert_eq!(
        names(&profile.locations[1].frames),
        [(before.2.as_str(), false)]
    );
}

/// Kernel addresses are named from /proc/kallsyms and suffixed `_[k]`.
#[test]
fn kernel_addresses_from_kallsyms() {
    if !prof_bpf_tests::is_root() {
        // kallsyms shows zero addresses to other users.
        assert!(
            std::env::var_os("PROF_BPF_TESTS_REQUIRE_BPF").is_none(),
            "kernel symbolization needs root"
        );
        eprintln!("SKIPPED kernel_addresses_from_kallsyms: not root");
        return;
    }
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let mut text: Vec<(u64, &str)> = kallsyms
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && (f[1] == "T" || f[1] == "t"))
                .then(|| Some((u64::from_str_radix(f[0], 16).ok()?, f[2])))?
        })
        .collect();
    text.sort();
    let i = text
        .iter()
        .position(|(_, n)| *n == "do_sys_openat2")
        .expect("do_sys_openat2 in kallsyms");
    let (start, next) = (text[i].0, text[i + 1].0);
    assert!(next > start + 2);
    let mut collector = Collector::new(vec![SampleType::samples()], "samples");
    collector.add(RawSample {
        pid: 1,
        comm: "init".to_owned(),
        // kernel[0] is a pc; kernel[1] a return address (looked up minus 1).
        kernel: vec![start + 1, next],
        user_status: StackStatus::Missing,
        values: vec![3],
        ..RawSample::default()
    });
    let profile = collector.finish().unwrap();
    let s = &profile.samples[0];
    let names: Vec<String> = s
        .locations
        .iter()
        .flat_map(|&l| profile.frame_names(&profile.locations[l]))
        .collect();
    assert_eq!(
        names,
        [
            "do_sys_openat2_[k]",
            "do_sys_openat2_[k]",
            "[missing user stack]"
        ]
    );
}

/// `go tool pprof` reads the collector's pprof output (its synthetic
/// per-object mappings included) and agrees with our text output.
#[test]
fn go_pprof_reads_collector_profiles() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    let mut collector = Collector::new(vec![SampleType::samples(), SampleType::cpu()], "cpu");
    collector.set_period(SampleType::cpu(), 10_000_000);
    collector.add_comment("test profile");
    collector.note_process(pid);
    let stack = vec![sites["site_pc"], sites["site_middle"], sites["site_outer"]];
    collector.add(RawSample {
        values: vec![3, 30_000_000],
        ..sample(pid, stack, true, 0)
    });
    collector.add(RawSample {
        values: vec![2, 20_000_000],
        ..sample(pid, vec![sites["site_inlined"]], false, 0)
    });
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let profile = collector.finish().unwrap();
    let dir = std::env::temp_dir().join(format!("prof-bpf-sym-go-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pb = dir.join("p.pb.gz");
    OutputArgs {
        output: Some(pb.clone()),
        ..OutputArgs::default()
    }
    .check(&[])
    .and_then(|plan| plan.write(&profile))
    .unwrap();
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-symbolize=none",
            "-top",
            "-sample_index=samples",
        ])
        .arg(&pb)
        .env("HOME", &dir)
        .env("GOCACHE", dir.join("gocache"))
        .env("PPROF_BINARY_PATH", dir.join("nothing"))
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |name: &str| {
        top.lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("{name} not in go's top:\n{top}"))
    };
    assert_eq!(row("leaf_function")[0], "3");
    assert_eq!(row("outer_function")[3], "3");
    // go marks inlined frames its own way.
    assert_eq!(row("inlined_helper (inline)")[0], "2");
    assert_eq!(row("with_inlined_caller")[3], "2");
    std::fs::remove_dir_all(&dir).ok();
}

/// An unsymbolized pprof file (raw addresses, mappings with build-ids, as
/// libprofalloc.so writes them) is symbolized by `prof-bpf report` against
/// the binaries on this machine, only where the build-id matches.
#[test]
fn report_symbolizes_raw_pprof_by_build_id() {
    let program = build_workload("sym_known", FLAGS);
    let (mut proc, sites) = sites(&program);
    let pid = proc.pid();
    // Where the program is mapped, as /proc/PID/maps says.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    proc.send_line("exit");
    proc.wait_output(Duration::from_secs(10));
    let path = program.to_str().unwrap();
    let build_id = profiler::symbolize::hex(
        &blazesym::helper::read_elf_build_id(&program)
            .unwrap()
            .expect("a build-id"),
    );
    let mappings: Vec<Mapping> = profiler::process::parse_maps(&maps)
        .into_iter()
        .filter(|m| m.path == path)
        .map(|m| Mapping {
            start: m.start,
            limit: m.end,
            offset: m.offset,
            file: m.path.clone(),
            build_id: build_id.clone(),
            local_path: None,
        })
        .collect();
    let mapping_of = |addr: u64| {
        mappings
            .iter()
            .position(|m| m.start <= addr && addr < m.limit)
            .unwrap()
    };
    let mut profile = Profile {
        sample_types: vec![SampleType::inuse_space()],
        default_sample_type: "inuse_space".to_owned(),
        mappings: mappings.clone(),
        ..Profile::default()
    };
    // Return addresses minus one, as the format's addresses are.
    let stack = [sites["site_middle"] - 1, sites["site_outer"] - 1];
    for &a in &stack {
        profile.locations.push(profiler::profile::Location {
            mapping: Some(mapping_of(a)),
            address: a,
            ..Default::default()
        });
    }
    profile.samples.push(profiler::profile::Sample {
        locations: vec![0, 1],
        values: vec![4096],
        labels: vec![],
    });
    let dir = std::env::temp_dir().join(format!("prof-bpf-rawpprof-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |profile: &Profile, name: &str| {
        let file = dir.join(name);
        std::fs::write(&file, profiler::output::pprof::encode(profile).unwrap()).unwrap();
        file
    };
    let good = write(&profile, "raw.pb.gz");
    let (stdout, stderr, code) =
        prof_bpf_tests::run_prof_bpf(&["report", good.to_str().unwrap(), "--format", "folded"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "outer_function;middle_function 4096\n");
    // Another build of the program: not symbolized, and the text says why.
    for m in &mut profile.mappings {
        m.build_id = "0123456789abcdef".to_owned();
    }
    let other = write(&profile, "other.pb.gz");
    let (stdout, _, code) =
        prof_bpf_tests::run_prof_bpf(&["report", other.to_str().unwrap(), "--format", "folded"]);
    assert_eq!(code, 0);
    let name = program.file_name().unwrap().to_str().unwrap();
    assert!(stdout.starts_with(&format!("{name}+0x")), "{stdout}");
    let (text, _, _) = prof_bpf_tests::run_prof_bpf(&["report", other.to_str().unwrap()]);
    assert!(
        text.contains("but the profile's has 0123456789abcdef: not symbolized"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
