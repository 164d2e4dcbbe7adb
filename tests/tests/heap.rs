//! `prof-bpf heap`: profiles and leak reports of a running workload whose
//! allocations, call chains and leaks are known by construction
//! (tests/workloads/heap_leaks.c), the walk through glibc, and `--all`.
use std::{process::Command, time::Duration};

use heap_support::*;
use prof_bpf_tests::{Proc, build_workload, require_bpf, run_prof_bpf, start_prof_bpf};

mod heap_support;

#[test]
fn exact_inuse_bytes_and_call_chains_when_tracking_everything() {
    require_bpf!();
    let mut w = start_workload();
    let rounds = 10;
    let out = profile_rounds(&mut w, EVERY_ALLOCATION_INUSE, rounds);
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
