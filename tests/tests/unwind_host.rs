//! Whole-host `cpu` sessions on real programs whose code lives in the
//! biggest shared objects (issue 13): a `cargo build` of a small crate
//! (rustc: `librustc_driver`, the toolchain's `libLLVM`) and bpftrace's
//! start-up (Debian's `libLLVM-14`). Every process starts during the
//! session, after it loaded the cached tables (`--unwind-preload`): its
//! pcs find the rows by file from its first sample; code not in the cache
//! is copied and unwound once the builder thread has its tables, and the
//! session's drains never wait for a build.
//!
//! Each test gets an empty unwind cache of its own and fills it first with
//! `cpu -p` on a stopped instance of the program (which builds its tables
//! from cold, unbudgeted, before sampling): the whole-host session then
//! finds them in the cache, as every session after the first does, whatever
//! the machine's own cache holds.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prof_bpf_tests::{Proc, big_rust_source, parse_folded, require_bpf, start_following};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("prof-bpf-unwind-host").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Functions where a process's or a thread's stack starts.
const THREAD_STARTS: &[&str] = &[
    "_start",
    "_dl_start_user",
    "clone3",
    "clone",
    "start_thread",
];

/// Waits until process `pid` maps code of an object whose path contains
/// `lib` (the loader maps an object's first, read-only part first).
fn wait_code_mapped(pid: u32, lib: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps
            .lines()
            .any(|l| l.contains(lib) && l.contains(" r-xp "))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} did not map the code of {lib}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether the ELF file at `path` has an executable segment (a data-only
/// library such as ICU's `libicudata` maps no code).
fn has_code(path: &str) -> bool {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    let Ok(elf) = std::fs::read(path) else {
        return true;
    };
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let ph = phoff + i * phentsize;
        u32_at(ph) == PT_LOAD && u32_at(ph + 4) & PF_X != 0
    })
}

/// The file names of the shared objects with code that `program` (found
/// in PATH) loads at its start, as `ldd` lists them (links resolved).
fn needed_code(program: &str) -> Vec<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("ldd \"$(command -v {program})\"")])
        .output()
        .expect("run ldd");
    assert!(out.status.success(), "ldd {program} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .filter(|path| has_code(path))
        // The mappings name the file the links lead to.
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .map(|path| format!("/{}", path.file_name().unwrap().to_string_lossy()))
        .collect()
}

/// Fills `cache` with the tables of `cmd`'s objects: `cmd` is stopped once
/// it maps the code of `libs`, and `cpu -p` builds its tables before it
/// samples.
fn fill_cache(cache: &Path, cmd: &mut Command, libs: &[&str]) {
    let program = Proc::spawn(cmd);
    for lib in libs {
        wait_code_mapped(program.pid(), lib);
    }
    program.signal(libc::SIGSTOP);
    let out = cache.with_extension("fill.folded");
    let pid = program.pid().to_string();
    // A short session may end before the table builder (under its budget,
    // on a busy machine) got to every object: sessions are repeated until
    // two in a row build nothing (every table of the program they got to
    // was in the cache).
    let mut idle = 0;
    for _ in 0..10 {
        let (_, stderr, code) = prof_bpf_tests::run_prof_bpf(&[
            "cpu",
            "-p",
            &pid,
            "-d",
            "2",
            "--unwind-cache-dir",
            cache.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "filling the cache failed: {stderr}");
        idle = if stderr.contains("built 0 objects") {
            idle + 1
        } else {
            0
        };
        if idle == 2 {
            return;
        }
    }
    panic!("the cache still lacks tables of the program after 10 sessions");
}

/// A whole-host `cpu` session at 999 Hz with `cache`, around `during`,
/// which starts once the session has loaded the cached tables (a session
/// loads them at its start: the programs' objects are found by file from
/// their first samples); returns the folded stacks.
fn whole_host(cache: &Path, out: &Path, during: impl FnOnce()) -> Vec<(Vec<String>, u64)> {
    let (prof, mut seen, later) = start_following(
        &prof_bpf_tests::prof_bpf(),
        &[
            "cpu",
            "-F",
            "999",
            "--format",
            "folded",
            "-o",
            out.to_str().unwrap(),
            "--unwind-cache-dir",
            cache.to_str().unwrap(),
        ],
        "prof-bpf: sampling",
    );
    while !seen.iter().any(|l| l.contains("unwind tables: preloaded")) {
        seen.push(
            later
                .recv_timeout(Duration::from_secs(120))
                .expect("prof-bpf says what it preloaded"),
        );
    }
    let preloaded = seen.iter().find(|l| l.contains("unwind tables: preloaded"));
    assert!(
        !preloaded.is_some_and(|l| l.contains("preloaded 0 objects")),
        "the cache's tables were not preloaded: {preloaded:?}"
    );
    during();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let status = prof.wait_with_output().expect("wait for prof-bpf").status;
    assert!(status.success(), "prof-bpf cpu failed: {status:?}");
    parse_folded(&std::fs::read_to_string(out).expect("read folded output"))
}

/// Share (percent) of the samples of the processes `pids` of `comm` that
/// are complete down to a thread's start; asserts that complete stacks
/// reach functions named like each of `needles`, and prints the figures.
fn complete_share(
    stacks: &[(Vec<String>, u64)],
    comm: &str,
    pids: &HashSet<u32>,
    needles: &[&str],
) -> f64 {
    let of_pids: Vec<&(Vec<String>, u64)> = stacks
        .iter()
        .filter(|(f, _)| {
            f[0].strip_prefix(&format!("{comm}-"))
                .and_then(|p| p.parse().ok())
                .is_some_and(|p| pids.contains(&p))
        })
        .collect();
    // Samples taken while an exiting process releases its address space
    // (do_exit -> mmput): the task has no memory left, and their user stack
    // is the one walked when the thread began to exit. Counted as any.
    let released = |f: &[String]| {
        f.iter().any(|x| x == "do_exit_[k]")
            && f.iter()
                .any(|x| x.starts_with("__mmput") || x.starts_with("mmput"))
    };
    // Samples inside execve after the switch to the new program's memory:
    // the caller's stack is gone and shown missing. Counted as cut.
    let in_exec = |f: &[String]| {
        f.iter().any(|x| x == "[missing user stack]") && f.iter().any(|x| x.contains("sys_execve"))
    };
    // The entry point of a stripped program (bpftrace) has no name: it is
    // the frame that calls libc's start.
    let cut = |f: &[String]| {
        f.iter().any(|x| x.starts_with('['))
            || !(f
                .get(1)
                .is_some_and(|root| THREAD_STARTS.contains(&root.as_str()))
                || f.get(2).is_some_and(|f| f.starts_with("__libc_start_main")))
    };
    let mine = of_pids;
    let sum = |keep: &dyn Fn(&[String]) -> bool| -> u64 {
        mine.iter().filter(|s| keep(&s.0)).map(|s| s.1).sum()
    };
    let total = sum(&|_| true);
    let complete = sum(&|f| !cut(f));
    let gone = sum(&|f| released(f));
    let gone_cut = sum(&|f| released(f) && cut(f));
    let exec = sum(&|f| in_exec(f));
    // The heaviest cut stacks, root side, to see where the walks stop.
    let mut cut_stacks: Vec<_> = mine.iter().filter(|s| cut(&s.0)).collect();
    cut_stacks.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (frames, value) in cut_stacks.iter().take(5).map(|s| (&s.0, s.1)) {
        let shown: Vec<&str> = frames.iter().take(6).map(String::as_str).collect();
        eprintln!("  cut ({value} ns): {}", shown.join(";"));
    }
    assert!(total > 0, "no samples of {comm} {pids:?}");
    let pct = 100.0 * complete as f64 / total as f64;
    let n = |ns: u64| ns / (1_000_000_000 / 999);
    eprintln!(
        "{comm} ({} processes): {} of {} samples complete ({pct:.2}%); {} taken after exit \
         released the memory ({} of them cut); {} inside execve after the switch (cut)",
        pids.len(),
        n(complete),
        n(total),
        n(gone),
        n(gone_cut),
        n(exec),
    );
    for needle in needles {
        assert!(
            mine.iter()
                .any(|s| !cut(&s.0) && s.0.iter().any(|f| f.contains(needle))),
            "no complete {comm} stack reaches a function named like `{needle}`"
        );
    }
    pct
}

/// Share of rustc's samples that must be complete, in percent: the goal.
/// Measured on a 2-core machine shared by parallel builds: 63-93% while
/// every new rustc waited for its own tables; 91.8-98.0% once a new rustc
/// found the rows loaded for earlier ones by file; 98.3-99.0% since the
/// session loads the cached tables at its start; 99.3-99.6% (seven runs)
/// since LLVM's inlined stack probes, LLD's `.plt`, glibc's clone return
/// paths and the first instruction of functions after a BOLT FDE have
/// rows, and a young process's copies see the libraries mapped after its
/// first one. What is still cut is mostly samples inside execve (the old
/// program's registers, the new program's memory: shown without user
/// stack) and in the wrapper shell before its exec (its copies are read
/// once the pid runs rustc). Samples taken after an exiting process
/// released its memory carry the stack walked at its exit tracepoint and
/// count as any (before, they were counted apart).
const MIN_COMPLETE_RUSTC: f64 = 99.0;

/// `cargo build` (offline, from crates in the registry cache) of a crate
/// with three dependencies and a main file that keeps rustc and LLVM busy
/// for a few seconds.
#[test]
fn whole_host_during_a_cargo_build() {
    require_bpf!();
    let dir = scratch("cargo");
    let cache = dir.join("cache");
    let krate = dir.join("crate");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"hostbuild\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [dependencies]\nitoa = \"1\"\nmemchr = \"2\"\nlog = \"0.4\"\n",
    )
    .unwrap();
    let main = big_rust_source().replace(
        "fn main() {",
        "fn main() { log::info!(\"{}\", itoa::Buffer::new().format(1)); \
         let _ = memchr::memchr(b'a', b\"a\");",
    );
    std::fs::write(krate.join("src/main.rs"), main).unwrap();
    // The pids of cargo's rustc processes (the wrapper execs rustc).
    let pids_file = dir.join("rustc.pids");
    let wrapper = dir.join("wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ >> {}\nexec \"$@\"\n",
            pids_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // The lock file first, so that the build itself only compiles.
    let status = Command::new("cargo")
        .args(["generate-lockfile", "--offline"])
        .current_dir(&krate)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo generate-lockfile --offline failed");

    std::fs::write(dir.join("big.rs"), big_rust_source()).unwrap();
    fill_cache(
        &cache,
        Command::new("rustc")
            .args(["-O", "big.rs", "-o", "big"])
            .current_dir(&dir),
        &["librustc_driver", "libLLVM", "libz.so", "libgcc_s"],
    );

    let stacks = whole_host(&cache, &dir.join("cpu.folded"), || {
        let status = Command::new("cargo")
            .args(["build", "--offline", "--release", "-q"])
            .env("RUSTC_WRAPPER", &wrapper)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .current_dir(&krate)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build failed");
    });
    let pids: HashSet<u32> = std::fs::read_to_string(&pids_file)
        .expect("rustc pids")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let pct = complete_share(&stacks, "rustc", &pids, &["rustc_", "llvm::"]);
    assert!(
        pct >= MIN_COMPLETE_RUSTC,
        "only {pct:.2}% of rustc's samples are complete (want {MIN_COMPLETE_RUSTC}%)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Share of bpftrace's samples that must be complete, in percent: the goal.
/// Measured 40-92% while bpftrace, the first process of `libLLVM-14` in a
/// session, waited for its tables; 98.2-100% (twelve runs, 121-348 samples
/// each, median 99.1%) once the session loaded the cached tables at its
/// start and the cache fill waited for every library `ldd` lists. Of the
/// cut samples of fifteen such runs, 10 were in execve, 7 in exit_group
/// after exit_mm, 6 at a library's `_init` (since unwound), 2 at
/// bpftrace's own entry point, 4 others. Since the stack walked at the exit
/// tracepoint serves the samples after exit_mm (17-24 per run, none cut),
/// and the samples taken before an exec are named after the program that
/// called it (the spawning child's, in and before execve, were counted as
/// bpftrace's and cut): 100, 100, 100, 100 and 99.61% (one cut of 257) on
/// a quiet 2-core machine. Other sessions' uprobes on libc's malloc
/// (`[uprobes]` frames) bring it down to 90-94%.
const MIN_COMPLETE_BPFTRACE: f64 = 99.0;

/// bpftrace's start-up compiles its program with Debian's `libLLVM-14`.
#[test]
fn whole_host_during_bpftrace_start_up() {
    require_bpf!();
    let dir = scratch("bpftrace");
    let cache = dir.join("cache");
    // Stopped once the loader mapped the code of every library it needs
    // (in its own order: stopped at LLVM's, it had not mapped those after
    // it, and the session built them while bpftrace ran).
    let libs = needed_code("bpftrace");
    let libs: Vec<&str> = libs.iter().map(String::as_str).collect();
    fill_cache(
        &cache,
        Command::new("bpftrace").args(["-e", "BEGIN { exit(); }"]),
        &libs,
    );
    let mut pids = HashSet::new();
    let stacks = whole_host(&cache, &dir.join("cpu.folded"), || {
        for _ in 0..3 {
            let p = Proc::spawn(Command::new("bpftrace").args(["-e", "BEGIN { exit(); }"]));
            pids.insert(p.pid());
            let (_, code) = p.wait_output(Duration::from_secs(120));
            assert_eq!(code, 0, "bpftrace failed");
        }
    });
    let pct = complete_share(&stacks, "bpftrace", &pids, &["llvm::"]);
    assert!(
        pct >= MIN_COMPLETE_BPFTRACE,
        "only {pct:.2}% of bpftrace's samples are complete (want {MIN_COMPLETE_BPFTRACE}%)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
