//! `prof-bpf heap --leaks` and `heap --all` on processes running
//! libprofalloc.so: both read the allocator's sampled live heap, so what
//! was allocated before the attach counts, with the stacks and ages the
//! allocator recorded. Known by construction: heap_leaks.c's leak sites
//! (every allocation sampled: PROFALLOC_SAMPLE_BYTES=1 weighs each at its
//! size) and usdt_live.c's live sets. The Python frames of the live heap:
//! `heap_live_python.rs`.
use std::{process::Command, time::Duration};

use heap_support::*;
use prof_bpf_tests::{
    Proc, build_workload, profalloc_lib, require_bpf, run_prof_bpf, start_prof_bpf,
};

mod heap_support;

/// Rounds of heap_leaks.c before and after the attach.
const BEFORE: u32 = 5;
const AFTER: u32 = 20;

#[test]
fn leak_mode_counts_the_leaks_made_before_the_attach() {
    require_bpf!();
    let mut w = Proc::spawn(
        Command::new(build_workload("heap_leaks", FLAGS))
            .env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", "1"),
    );
    w.expect_line("ready");
    w.send_line(&format!("go {BEFORE}"));
    w.expect_line("done");
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
        AFTER,
    );
    let stacks = parse_folded(&out);
    // Every round's leaks, those before the attach too.
    assert_leak_sites(&stacks, BEFORE + AFTER, &out);
    assert!(
        has_chain(&stacks, "run_round;leak_path;leak_small"),
        "{out}"
    );
    // Churn, cross-thread frees, realloc(p, 0) and a cache that stopped
    // growing are not leaks.
    for f in FREED.iter().chain(&["cache_fill"]) {
        assert_eq!(leaf_total(&stacks, f), 0, "{f} reported as a leak: {out}");
    }
    w.send_line("exit");
}

#[test]
fn all_reads_the_whole_heap_of_libprofalloc_processes() {
    require_bpf!();
    let mut w = Proc::spawn(
        Command::new(build_workload("usdt_live", FLAGS))
            .env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", "65536"),
    );
    w.expect_line("ready");
    w.send_line("go");
    w.expect_line("allocated");
    let dir = std::env::temp_dir().join(format!("heap-live-all-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("all.pb.gz").to_string_lossy().into_owned();
    let (prof, _) = start_prof_bpf(&["heap", "--all", "-o", &file], ATTACHED);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    // Other processes may run on libprofalloc.so too: this one's stacks
    // are those under its `comm-PID` root.
    let (folded, err, code) = run_prof_bpf(&[
        "report",
        "--format",
        "folded",
        "--sample-type",
        "inuse_space",
        &file,
    ]);
    assert_eq!(code, 0, "{err}");
    let root = format!("-{};", w.pid());
    let mine: String = folded
        .lines()
        .filter(|l| {
            l.split(';')
                .next()
                .is_some_and(|r| format!("{r};").ends_with(&root))
        })
        .map(|l| format!("{}\n", l.split_once(';').map_or(l, |(_, rest)| rest)))
        .collect();
    let stacks = parse_folded(&mine);
    for (site, want) in [("small_site", 60_000 * 1000), ("large_site", 64 * 300_000)] {
        assert!(
            has_chain(&stacks, &format!("main;{site}")),
            "{site}: {folded}"
        );
        let got = leaf_total(&stacks, site);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(
            error < 0.10,
            "{site}: estimated {got}, true {want}: {folded}"
        );
    }
    let (text, err, code) = run_prof_bpf(&["report", "--format", "text", &file]);
    assert_eq!(code, 0, "{err}");
    let coverage = text
        .lines()
        .find(|l| l.contains("sampled heap since process start (from the allocator)"))
        .unwrap_or_else(|| panic!("no coverage of the allocator's heap: {text}"));
    let pids = coverage
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_default();
    assert!(
        pids.split(", ").any(|p| p == w.pid().to_string()),
        "{coverage}"
    );
    w.send_line("quit");
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
