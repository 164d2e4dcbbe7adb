//! `prof-bpf heap` on other allocators: preloaded jemalloc and tcmalloc,
//! and libprofalloc.so through its sampling hooks.
use std::{process::Command, time::Duration};

use heap_support::*;
use prof_bpf_tests::{Proc, build_workload, require_bpf, run_prof_bpf, start_prof_bpf};

mod heap_support;

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
        let out = profile_rounds(&mut w, EVERY_ALLOCATION_INUSE, 5);
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
            "--probe",
            "hooks",
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

    // And the estimate is within sampling error of the truth. In-use
    // values come from the allocator's live heap, which also holds what
    // was allocated before "ready": only the rounds' stacks are summed.
    let stacks = parse_folded(&live);
    let total: i64 = stacks
        .iter()
        .filter(|s| s.frames.iter().any(|f| f == "run_round"))
        .map(|s| s.value)
        .sum();
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
