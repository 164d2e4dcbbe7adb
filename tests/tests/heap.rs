//! `prof-bpf heap`: profiles and leak reports of a running workload whose
//! allocations, call chains and leaks are known by construction
//! (tests/workloads/heap_leaks.c), the allocator corner cases, launch mode,
//! and the errors for bad input.
use std::{process::Command, time::Duration};

use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, prof_bpf, require_bpf, run_prof_bpf,
    start_prof_bpf,
};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-builtin"];
const ATTACHED: &str = "prof-bpf: heap: attached";

// Per round of heap_leaks.c.
const SMALL: i64 = 20 * 1000;
const CALLOC: i64 = 3000;
const BIG_CALLOC: i64 = 200_000;
const REALLOC_NULL: i64 = 500;
const CACHE_BLOCK: i64 = 2048;
const CACHE_ROUNDS: i64 = 3;
/// Functions whose memory is always freed.
const FREED: &[&str] = &[
    "churn",
    "handoff",
    "realloc_zero",
    "churn_background",
    "free_prealloc",
];

/// One folded line: frames outermost first, and the value.
struct Stack {
    frames: Vec<String>,
    value: i64,
}

fn parse_folded(text: &str) -> Vec<Stack> {
    text.lines()
        .filter_map(|line| {
            let (frames, value) = line.rsplit_once(' ')?;
            Some(Stack {
                frames: frames.split(';').map(str::to_owned).collect(),
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// Sum of the values of stacks whose leaf (innermost) frame is `func`.
fn leaf_total(stacks: &[Stack], func: &str) -> i64 {
    stacks
        .iter()
        .filter(|s| s.frames.last().is_some_and(|f| f == func))
        .map(|s| s.value)
        .sum()
}

/// The workload's four leak sites hold exactly what `rounds` rounds leaked.
fn assert_leak_sites(stacks: &[Stack], rounds: u32, out: &str) {
    let r = i64::from(rounds);
    assert_eq!(leaf_total(stacks, "leak_small"), r * SMALL, "{out}");
    // calloc from its real caller with its real size (glibc serves the big one by mmap).
    assert_eq!(leaf_total(stacks, "leak_calloc"), r * CALLOC, "{out}");
    assert_eq!(
        leaf_total(stacks, "leak_big_calloc"),
        r * BIG_CALLOC,
        "{out}"
    );
    // realloc(NULL, n) is one allocation of n from its caller, not a nested malloc.
    assert_eq!(
        leaf_total(stacks, "realloc_null"),
        r * REALLOC_NULL,
        "{out}"
    );
}

fn has_chain(stacks: &[Stack], chain: &str) -> bool {
    stacks.iter().any(|s| s.frames.join(";").contains(chain))
}

fn start_workload() -> Proc {
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_leaks", FLAGS)));
    w.expect_line("ready");
    w
}

/// Runs `prof-bpf heap --pid W ARGS` while the workload does `rounds`
/// rounds, stops it with SIGINT, and returns its stdout.
fn profile_rounds(w: &mut Proc, args: &[&str], rounds: u32) -> String {
    let pid = w.pid().to_string();
    let mut all = vec!["heap", "--pid", &pid];
    all.extend_from_slice(args);
    let (prof, _) = start_prof_bpf(&all, ATTACHED);
    w.send_line(&format!("go {rounds}"));
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "prof-bpf heap failed ({}); stdout: {stdout}",
        out.status
    );
    stdout
}

/// The workload's checksum after `rounds` rounds of `go` from a fresh start.
fn expected_sum(go_commands: &[i64]) -> i64 {
    go_commands
        .iter()
        .map(|&rounds| {
            let per_round = SMALL + CALLOC + BIG_CALLOC + REALLOC_NULL + 700 + 1000 * 64 + 333;
            rounds * per_round + rounds.min(CACHE_ROUNDS) * CACHE_BLOCK
        })
        .sum()
}

#[test]
fn exact_inuse_bytes_and_call_chains_when_tracking_everything() {
    require_bpf!();
    let mut w = start_workload();
    let rounds = 10;
    let out = profile_rounds(
        &mut w,
        &[
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        rounds,
    );
    let stacks = parse_folded(&out);
    assert_leak_sites(&stacks, rounds, &out);
    assert_eq!(
        leaf_total(&stacks, "cache_fill"),
        CACHE_ROUNDS * CACHE_BLOCK,
        "{out}"
    );
    for f in FREED {
        // The background thread may be between its malloc and free at the end.
        let limit = if *f == "churn_background" { 48 } else { 0 };
        assert!(leaf_total(&stacks, f) <= limit, "{f} holds memory: {out}");
    }
    // Frees of blocks allocated before the attach are ignored: nothing negative.
    assert!(stacks.iter().all(|s| s.value >= 0), "{out}");
    // Every stack starts at a workload function: no allocator-internal leaf
    // (a nested malloc inside realloc would show up as one).
    for s in stacks.iter().filter(|s| s.value > 0) {
        let leaf = s.frames.last().unwrap();
        assert!(
            [
                "leak_small",
                "leak_calloc",
                "leak_big_calloc",
                "realloc_null",
                "cache_fill",
                "churn_background"
            ]
            .contains(&leaf.as_str()),
            "unexpected leaf {leaf}: {out}"
        );
    }
    assert!(
        has_chain(&stacks, "main;run_rounds;run_round;leak_path;leak_small"),
        "{out}"
    );
    assert!(
        has_chain(&stacks, "main;run_rounds;run_round;leak_big_calloc"),
        "{out}"
    );

    // The target runs on unchanged after detach.
    w.send_line("go 2");
    w.expect_line("done");
    w.send_line("sum");
    w.expect_line(&format!("sum {}", expected_sum(&[i64::from(rounds), 2])));
}

#[test]
fn sampled_profile_is_within_ten_percent() {
    require_bpf!();
    let mut w = start_workload();
    let rounds = 20;
    let out = profile_rounds(
        &mut w,
        &[
            "--sample-bytes",
            "1024",
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        rounds,
    );
    let stacks = parse_folded(&out);
    let r = i64::from(rounds);
    // 400 blocks of 1000 bytes, each sampled with probability 0.62: the
    // estimate's relative deviation is about 3%. Blocks of 200000 bytes are
    // always sampled.
    for (func, want) in [
        ("leak_small", r * SMALL),
        ("leak_big_calloc", r * BIG_CALLOC),
    ] {
        let got = leaf_total(&stacks, func);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(error < 0.10, "{func}: estimated {got}, true {want}: {out}");
    }
}

#[test]
fn leak_mode_reports_exactly_the_leaks() {
    require_bpf!();
    let mut w = start_workload();
    let rounds = 40;
    let out = profile_rounds(
        &mut w,
        &[
            "--leaks",
            "--interval",
            "0.4",
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        rounds,
    );
    let stacks = parse_folded(&out);
    assert_leak_sites(&stacks, rounds, &out);
    // Churn, cross-thread frees, realloc(p, 0) and a cache that stopped growing are not leaks.
    for f in FREED.iter().chain(&["cache_fill"]) {
        assert_eq!(leaf_total(&stacks, f), 0, "{f} reported as a leak: {out}");
    }
    assert!(
        has_chain(&stacks, "run_round;leak_path;leak_small"),
        "{out}"
    );
}

#[test]
fn min_age_lists_a_cache_that_stopped_growing() {
    require_bpf!();
    let mut w = start_workload();
    // ~3 s of rounds: the cache (rounds 0-2) is then over 2 s old.
    let out = profile_rounds(
        &mut w,
        &[
            "--leaks",
            "--min-age",
            "2",
            "--interval",
            "0.5",
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        55,
    );
    let stacks = parse_folded(&out);
    assert_eq!(
        leaf_total(&stacks, "cache_fill"),
        CACHE_ROUNDS * CACHE_BLOCK,
        "{out}"
    );
    assert!(leaf_total(&stacks, "leak_small") > 0, "{out}");
    assert_eq!(leaf_total(&stacks, "churn"), 0, "{out}");
}

#[test]
fn pprof_file_is_read_by_go_pprof_with_the_same_top_functions() {
    require_bpf!();
    let mut w = start_workload();
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_string_lossy().into_owned();
    profile_rounds(&mut w, &["--sample-bytes", "0", "-o", &file_arg], 10);
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-nodefraction=0",
            "-sample_index=inuse_space",
        ])
        .arg(&file)
        .env("HOME", &dir)
        .output()
        .expect("run go tool pprof");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flat order by construction: big calloc, small leaks, calloc, cache, realloc(NULL).
    let names: Vec<&str> = top
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| {
            [
                "leak_big_calloc",
                "leak_small",
                "leak_calloc",
                "cache_fill",
                "realloc_null",
            ]
            .contains(n)
        })
        .collect();
    assert_eq!(
        names,
        [
            "leak_big_calloc",
            "leak_small",
            "leak_calloc",
            "cache_fill",
            "realloc_null"
        ],
        "{top}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn launch_mode_reports_what_was_never_freed() {
    require_bpf!();
    let program = build_workload("heap_leaks", FLAGS);
    let program = program.to_string_lossy().into_owned();
    // In launch mode the report never goes to the program's stdout: -o.
    let out = launch_report_path("never_freed");
    let (_, stderr, code) = run_prof_bpf(&[
        "heap",
        "--leaks",
        "-o",
        &out,
        "--group-by",
        "none",
        "--sample-type",
        "inuse_space",
        "--",
        &program,
        "8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let stdout = std::fs::read_to_string(&out).expect("the report file");
    let stacks = parse_folded(&stdout);
    // Allocated before main's rounds, so tracked from the first instruction:
    // 1000 blocks of 4000 bytes, 8 of them freed.
    assert_eq!(leaf_total(&stacks, "main"), (1000 - 8) * 4000, "{stdout}");
    assert_eq!(leaf_total(&stacks, "leak_small"), 8 * SMALL, "{stdout}");
    assert_eq!(
        leaf_total(&stacks, "leak_big_calloc"),
        8 * BIG_CALLOC,
        "{stdout}"
    );
    assert_eq!(
        leaf_total(&stacks, "cache_fill"),
        CACHE_ROUNDS * CACHE_BLOCK,
        "{stdout}"
    );
    assert_eq!(leaf_total(&stacks, "churn"), 0, "{stdout}");
    // The program is held in its loader until the unwind tables of its
    // libraries are in: even its first allocations have complete stacks.
    for s in &stacks {
        assert!(
            ["_start", "clone3"].contains(&s.frames[0].as_str()),
            "{stdout}"
        );
    }
}

#[test]
fn launch_of_a_missing_program_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--", "/nonexistent/program"]);
    assert_one_line_error(&stderr, code, "cannot run /nonexistent/program");
}

#[test]
fn nonexistent_pid_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", "4999999"]);
    assert_one_line_error(&stderr, code, "no process with pid 4999999");
}

#[test]
fn pid_that_exits_at_once_is_one_line_error() {
    require_bpf!();
    let mut child = Command::new("true").spawn().expect("run true");
    let pid = child.id().to_string();
    child.wait().expect("wait for true");
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid]);
    assert_one_line_error(&stderr, code, &pid);
}

#[test]
fn library_without_malloc_is_one_line_error() {
    require_bpf!();
    let w = start_workload();
    let pid = w.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--lib", "/bin/true"]);
    assert_one_line_error(&stderr, code, "defines no `malloc`");
}

#[test]
fn unwritable_output_is_one_line_error() {
    require_bpf!();
    let w = start_workload();
    let pid = w.pid().to_string();
    let (_, stderr, code) =
        run_prof_bpf(&["heap", "--pid", &pid, "-o", "/nonexistent-dir/heap.pb.gz"]);
    assert_one_line_error(&stderr, code, "/nonexistent-dir/heap.pb.gz");
}

#[test]
fn non_root_is_one_line_error() {
    require_bpf!();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(prof_bpf())
        .args(["heap", "--pid", "1"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(&stderr, out.status.code().unwrap_or(-1), "must run as root");
}

#[test]
fn workload_checksum_is_known_without_profiler() {
    // Guards the by-construction numbers the other tests rely on.
    let mut w = start_workload();
    w.send_line("go 3");
    w.expect_line("done");
    w.send_line("sum");
    w.expect_line(&format!("sum {}", expected_sum(&[3])));
    let (_, code) = w.wait_output(Duration::from_secs(5));
    assert_eq!(code, 0);
}

#[test]
fn frame_pointer_walk_through_glibc_shows_no_garbage_frames() {
    require_bpf!();
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_qsort", FLAGS)));
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--pid",
            &pid,
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "--group-by",
            "none",
        ],
        ATTACHED,
    );
    w.send_line("go");
    let line = w.read_line();
    let calls: i64 = line
        .strip_prefix("done calls ")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("unexpected workload output {line}"));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stacks = parse_folded(&stdout);
    assert_eq!(leaf_total(&stacks, "cmp_leak"), calls * 24, "{stdout}");
    for s in stacks
        .iter()
        .filter(|s| s.frames.last().is_some_and(|f| f == "cmp_leak"))
    {
        // The caller of the comparison function is glibc's merge sort.
        let caller = &s.frames[s.frames.len() - 2];
        assert!(
            caller.contains("msort") || caller.contains("qsort"),
            "caller {caller}: {stdout}"
        );
        // Beyond it, rbp is not a frame pointer: the walk must stop (visibly)
        // or find real code, never show an address outside the process's code.
        for f in &s.frames {
            assert!(
                !f.starts_with("0x") && !f.contains("[uprobes]"),
                "garbage frame {f}: {stdout}"
            );
        }
    }
}

#[test]
fn preloaded_jemalloc_and_tcmalloc_are_probed() {
    require_bpf!();
    for lib in [
        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    ] {
        let mut w =
            Proc::spawn(Command::new(build_workload("heap_leaks", FLAGS)).env("LD_PRELOAD", lib));
        w.expect_line("ready");
        let out = profile_rounds(
            &mut w,
            &[
                "--sample-bytes",
                "0",
                "--format",
                "folded",
                "--group-by",
                "none",
                "--sample-type",
                "inuse_space",
            ],
            5,
        );
        let stacks = parse_folded(&out);
        assert_eq!(leaf_total(&stacks, "leak_small"), 5 * SMALL, "{lib}: {out}");
        assert_eq!(
            leaf_total(&stacks, "leak_big_calloc"),
            5 * BIG_CALLOC,
            "{lib}: {out}"
        );
        assert_eq!(
            leaf_total(&stacks, "realloc_null"),
            5 * REALLOC_NULL,
            "{lib}: {out}"
        );
        assert_eq!(leaf_total(&stacks, "churn"), 0, "{lib}: {out}");
    }
}

/// `prof-bpf heap --pid` on a process running libprofalloc.so with
/// HEAPPROFILE on: the agent attaches to the sampling hooks, so it sees the
/// very samples the preload profile records, with the same weights. For
/// everything allocated while attached (the rounds), both profiles must
/// hold the same stacks with the same bytes, and both estimate the truth.
#[test]
fn libprofalloc_processes_are_profiled_through_the_sampling_hooks() {
    require_bpf!();
    let dir = std::env::temp_dir().join(format!("prof-bpf-hooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lib = prof_bpf_tests::profalloc_lib();
    let mut w = Proc::spawn(
        Command::new(build_workload("heap_leaks", FLAGS))
            .env("LD_PRELOAD", &lib)
            .env("PROFALLOC_SAMPLE_BYTES", "1024")
            .env("HEAPPROFILE", dir.join("w")),
    );
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let (prof, stderr) = start_prof_bpf(
        &[
            "heap",
            "--pid",
            &pid,
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        ATTACHED,
    );
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("sampling hooks (one sample per 1024 bytes)")),
        "{stderr:?}"
    );
    let rounds = 20;
    w.send_line(&format!("go {rounds}"));
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    let live = String::from_utf8_lossy(&out.stdout).into_owned();
    // `quit` exits through exit(), which writes the final preload profile.
    w.send_line("quit");
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0);
    let dumps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dumps.len(), 1, "one profile, at exit: {dumps:?}");
    let dump = dumps[0].to_str().unwrap();
    let (preload, err, code) =
        run_prof_bpf(&["report", "--format", "folded", "--group-by", "none", dump]);
    assert_eq!(code, 0, "{err}");

    // The rounds' leaks, identical in both, with identical bytes (what is
    // freed, by another thread too, may be caught in flight by one of them).
    let rounds_only = |text: &str| {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| {
                l.contains(";run_round;")
                    && [
                        "leak_small ",
                        "leak_calloc ",
                        "leak_big_calloc ",
                        "realloc_null ",
                        "cache_fill ",
                    ]
                    .iter()
                    .any(|leaf| l.contains(leaf))
            })
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    let (from_hooks, from_preload) = (rounds_only(&live), rounds_only(&preload));
    assert!(!from_hooks.is_empty(), "{live}");
    assert_eq!(
        from_hooks, from_preload,
        "agent:\n{live}\npreload:\n{preload}"
    );
    for leak in [
        "leak_small",
        "leak_calloc",
        "leak_big_calloc",
        "realloc_null",
    ] {
        let chain = if leak == "leak_small" {
            "main;run_rounds;run_round;leak_path;leak_small"
        } else {
            &format!("main;run_rounds;run_round;{leak}")
        };
        assert!(
            from_hooks.iter().any(|l| l.contains(chain)),
            "{chain}: {live}"
        );
    }

    // And the estimate is within sampling error of the truth (the
    // background churn holds at most 48 bytes).
    let stacks = parse_folded(&live);
    let total: i64 = stacks.iter().map(|s| s.value).sum();
    let r = i64::from(rounds);
    let want = r * (SMALL + CALLOC + BIG_CALLOC + REALLOC_NULL) + CACHE_ROUNDS * CACHE_BLOCK;
    let error = (total - want).abs() as f64 / want as f64;
    assert!(error < 0.10, "estimated {total}, true {want}: {live}");
    // Sampled objects of 200 KB or more always stand for themselves.
    assert_eq!(
        leaf_total(&stacks, "leak_big_calloc"),
        r * BIG_CALLOC,
        "{live}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--all` follows every process that maps the library, including ones
/// started after attaching, and forgets what exited processes held.
#[test]
fn all_follows_new_processes_and_releases_exited_ones() {
    require_bpf!();
    let lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    let program = build_workload("heap_leaks", FLAGS);
    let spawn = || {
        let mut w = Proc::spawn(Command::new(&program).env("LD_PRELOAD", lib));
        w.expect_line("ready");
        w
    };
    let dir = std::env::temp_dir().join(format!("prof-bpf-all-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let mut before = spawn();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--all",
            "--lib",
            lib,
            "--sample-bytes",
            "0",
            "-o",
            file.to_str().unwrap(),
        ],
        ATTACHED,
    );
    let mut after = spawn();
    // A new process's first allocation asks for its unwind tables; until
    // they are in (a fraction of a second) its stacks follow frame pointers.
    std::thread::sleep(Duration::from_secs(1));
    for w in [&mut before, &mut after] {
        w.send_line("go 3");
        w.expect_line("done");
    }
    // The first exits: its memory goes back to the system.
    let gone = before.pid();
    before.send_line("exit");
    let _ = before.wait_output(Duration::from_secs(10));
    // Exited processes are looked for every 2 s.
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    after.send_line("exit");

    let report = |sample_type: &str| {
        let (text, err, code) = run_prof_bpf(&[
            "report",
            "--format",
            "folded",
            "--group-by",
            "process",
            "--sample-type",
            sample_type,
            file.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        text
    };
    let of = |text: &str, pid: u32| -> Vec<Stack> {
        parse_folded(text)
            .into_iter()
            .filter(|s| s.frames[0].ends_with(&format!("-{pid}")))
            .collect()
    };
    let inuse = report("inuse_space");
    // The process started after attaching: its leaks exactly, full stacks.
    let later = of(&inuse, after.pid());
    assert_leak_sites(&later, 3, &inuse);
    assert!(
        has_chain(
            &later,
            "_start;__libc_start_main_impl;__libc_start_call_main;main;run_rounds;run_round;leak_path;leak_small"
        ),
        "{inuse}"
    );
    // The one that exited allocated the same, and holds nothing.
    let allocated = report("alloc_space");
    assert_leak_sites(&of(&allocated, gone), 3, &allocated);
    let held: i64 = of(&inuse, gone).iter().map(|s| s.value).sum();
    assert_eq!(held, 0, "{inuse}");
    let _ = std::fs::remove_dir_all(&dir);
}

// --mmap: per round of heap_mmap.c (sizes are whole pages, as mapped).
const MIB: i64 = 1 << 20;
const KIB: i64 = 1 << 10;
/// The workload's functions that call mmap, and what one round keeps mapped.
const MAPPED: &[(&str, i64)] = &[
    ("map_leak", 3 * MIB),
    ("map_grow", 3 * MIB),
    ("map_trim", 768 * KIB),
    // The 64 KiB hole in its middle is found in the process's maps.
    ("map_hole", 960 * KIB),
    ("map_churn", 0),
];
/// What one round writes to the workload's checksum.
const MMAP_ROUND_SUM: i64 = 3 * MIB + 100 * 64 * KIB + 3 * MIB + 768 * KIB + 512 * KIB + MIB
    // The second byte of the workload's own ELF header ('E').
    + 0x45;

/// Sum of the values of mapping stacks made by `func` (`...;func;[mmap]`).
fn mmap_total(stacks: &[Stack], func: &str) -> i64 {
    stacks
        .iter()
        .filter(|s| s.frames.ends_with(&[func.to_owned(), "[mmap]".to_owned()]))
        .map(|s| s.value)
        .sum()
}

fn start_mmap_workload() -> Proc {
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_mmap", FLAGS)));
    w.expect_line("ready");
    w
}

/// `prof-bpf report FILE --format folded --group-by none --sample-type TYPE`.
fn report_folded(file: &str, sample_type: &str) -> String {
    let (stdout, stderr, code) = run_prof_bpf(&[
        "report",
        "--format",
        "folded",
        "--group-by",
        "none",
        "--sample-type",
        sample_type,
        file,
    ]);
    assert_eq!(code, 0, "{stderr}");
    stdout
}

#[test]
fn mmap_counts_each_anonymous_mapping_once_from_its_caller() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-mmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_string_lossy().into_owned();
    let rounds = 2;
    profile_rounds(
        &mut w,
        &["--mmap", "--sample-bytes", "0", "-o", &file_arg],
        rounds,
    );
    let r = i64::from(rounds);

    let inuse = report_folded(&file_arg, "inuse_space");
    let stacks = parse_folded(&inuse);
    for &(func, bytes) in MAPPED {
        assert_eq!(mmap_total(&stacks, func), r * bytes, "{func}: {inuse}");
    }
    // A file mapping is not heap.
    assert!(!has_chain(&stacks, "map_file"), "{inuse}");
    // glibc's mmap for malloc(1 MiB) is the allocator's: counted once, as
    // the malloc, with the requested size.
    assert_eq!(leaf_total(&stacks, "big_malloc"), r * MIB, "{inuse}");
    assert_eq!(mmap_total(&stacks, "big_malloc"), 0, "{inuse}");
    // Mapping stacks start at mmap's caller (libc's wrapper is not shown),
    // with the known call chain.
    for s in stacks
        .iter()
        .filter(|s| s.frames.last().unwrap() == "[mmap]")
    {
        let caller = &s.frames[s.frames.len() - 2];
        assert!(
            MAPPED.iter().any(|(f, _)| f == caller),
            "unexpected caller of mmap {caller}: {inuse}"
        );
    }
    assert!(
        has_chain(&stacks, "main;run_round;map_leak;[mmap]"),
        "{inuse}"
    );

    // Allocated bytes: mremap retires 1 MiB and maps 3 MiB, the churn maps
    // 100 x 64 KiB, the trimmed mapping was 1 MiB.
    let alloc = report_folded(&file_arg, "alloc_space");
    let stacks = parse_folded(&alloc);
    for (func, bytes) in [
        ("map_leak", 3 * MIB),
        ("map_grow", 4 * MIB),
        ("map_churn", 100 * 64 * KIB),
        ("map_trim", MIB),
        ("map_hole", MIB),
    ] {
        assert_eq!(mmap_total(&stacks, func), r * bytes, "{func}: {alloc}");
    }

    // The report states what it could not follow.
    let (text, stderr, code) = run_prof_bpf(&["report", "--format", "text", &file_arg]);
    assert_eq!(code, 0, "{stderr}");
    let counters = text
        .lines()
        .find(|l| l.contains("heap counters: "))
        .unwrap_or_else(|| panic!("no counters: {text}"));
    assert!(
        counters.contains(&format!("unmaps_partial {rounds}")),
        "{counters}"
    );
    assert!(
        text.contains(&format!(
            "unmapped by calls that did not start at them: {rounds} ({}.0 KiB",
            r * 64
        )),
        "{text}"
    );

    // The target runs on unchanged after detach.
    w.send_line("go 1");
    w.expect_line("done");
    w.send_line("sum");
    w.expect_line(&format!("sum {}", (r + 1) * MMAP_ROUND_SUM));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_mmap_no_mapping_is_reported() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let out = profile_rounds(
        &mut w,
        &[
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
        ],
        1,
    );
    let stacks = parse_folded(&out);
    assert!(!out.contains("[mmap]"), "{out}");
    assert!(!has_chain(&stacks, "map_"), "{out}");
    assert_eq!(leaf_total(&stacks, "big_malloc"), MIB, "{out}");
}

#[test]
fn launch_mode_tracks_the_mappings_of_the_program() {
    require_bpf!();
    let program = build_workload("heap_mmap", FLAGS);
    let program = program.to_string_lossy().into_owned();
    let out = launch_report_path("mmap");
    let (_, stderr, code) = run_prof_bpf(&[
        "heap",
        "--mmap",
        "--sample-bytes",
        "0",
        "-o",
        &out,
        "--group-by",
        "none",
        "--sample-type",
        "inuse_space",
        "--",
        &program,
        "once",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let stdout = std::fs::read_to_string(&out).expect("the report file");
    let stacks = parse_folded(&stdout);
    for &(func, bytes) in MAPPED {
        let got = mmap_total(&stacks, func);
        // The hole is found in a running process's maps; the program
        // exited, so its mapping counts as it was mapped.
        let want = if func == "map_hole" { MIB } else { bytes };
        assert_eq!(got, want, "{func}: {stdout}");
    }
    assert!(
        has_chain(&stacks, "main;run_round;map_grow;[mmap]"),
        "{stdout}"
    );
    assert_eq!(leaf_total(&stacks, "big_malloc"), MIB, "{stdout}");
}

#[test]
fn mmap_with_hooks_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", "1", "--probe", "hooks", "--mmap"]);
    assert_one_line_error(&stderr, code, "--mmap needs --probe malloc");
}

#[test]
fn all_tracks_the_mappings_of_processes_running_at_attach() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let pid = w.pid();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--all",
            "--mmap",
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "--group-by",
            "process",
            "--sample-type",
            "inuse_space",
        ],
        ATTACHED,
    );
    // With --all a process's unwind tables are read when its first walk
    // asks for them; mapping stacks made before are reported missing, not
    // guessed. The second round has its tables.
    w.send_line("go 1");
    w.expect_line("done");
    std::thread::sleep(Duration::from_secs(1));
    w.send_line("go 1");
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let stacks: Vec<Stack> = parse_folded(&stdout)
        .into_iter()
        .filter(|s| s.frames[0].ends_with(&format!("-{pid}")))
        .collect();
    let mapped: i64 = stacks
        .iter()
        .filter(|s| s.frames.last().unwrap() == "[mmap]")
        .map(|s| s.value)
        .sum();
    let per_round: i64 = MAPPED.iter().map(|(_, b)| b).sum();
    assert_eq!(mapped, 2 * per_round, "{stdout}");
    for &(func, bytes) in MAPPED {
        let got = mmap_total(&stacks, func);
        assert!(got == bytes || got == 2 * bytes, "{func}: {stdout}");
    }
    assert_eq!(leaf_total(&stacks, "big_malloc"), 2 * MIB, "{stdout}");
}

/// A fresh `.folded` path for a launch-mode report (launch mode never writes
/// the report into the program's stdout).
fn launch_report_path(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.folded"));
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}
