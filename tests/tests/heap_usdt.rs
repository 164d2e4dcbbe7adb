//! `prof-bpf heap` on the `otel_memory:alloc/free` USDT probes: chosen by
//! `--probe auto` for libprofalloc.so targets, forced by `--probe usdt`,
//! and the malloc uprobes for targets without probes (the C stand-in
//! allocator's probes: `heap_usdt_standin.rs`).
use std::{process::Command, time::Duration};

use heap_support::*;
use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf, start_prof_bpf,
};

mod heap_support;

/// usdt_live.c's live sets: (site, objects, bytes each).
const LIVE_SETS: [(&str, i64, i64); 2] =
    [("small_site", 60_000, 1000), ("large_site", 64, 300_000)];
const RATE: &str = "65536";

/// A profile file's in-use bytes as folded stacks.
fn folded_inuse(file: &str) -> String {
    folded(file, "inuse_space")
}

/// A profile file's `sample_type` values as folded stacks.
fn folded(file: &str, sample_type: &str) -> String {
    let (folded, err, code) = run_prof_bpf(&[
        "report",
        "--format",
        "folded",
        "--group-by",
        "none",
        "--sample-type",
        sample_type,
        file,
    ]);
    assert_eq!(code, 0, "{err}");
    folded
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The lines of a folded profile whose leaf is one of the live-set sites.
fn live_set_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| {
            LIVE_SETS
                .iter()
                .any(|(site, ..)| l.contains(&format!(";{site} ")))
        })
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// Attached at "ready" by `--probe auto`, the agent takes libprofalloc.so's
/// USDT probes: its in-use profile of the live sets holds the very samples
/// and weights of the preload's own profile (HEAPPROFILE, written at exit),
/// stack for stack, and estimates each set within 10%.
#[test]
fn libprofalloc_targets_are_profiled_through_the_usdt_probes() {
    require_bpf!();
    let dir = scratch("heap-usdt");
    let mut w = Proc::spawn(
        Command::new(build_workload("usdt_live", FLAGS))
            .env("LD_PRELOAD", prof_bpf_tests::profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", RATE)
            .env("HEAPPROFILE", dir.join("w")),
    );
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let file = dir.join("agent.pb.gz").to_string_lossy().into_owned();
    let (prof, stderr) = start_prof_bpf(&["heap", "--pid", &pid, "-o", &file], ATTACHED);
    assert!(
        stderr.iter().any(|l| l.contains("otel_memory USDT probes")),
        "{stderr:?}"
    );
    w.send_line("go");
    w.expect_line("allocated");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    let live = folded_inuse(&file);
    let allocated = folded(&file, "alloc_space");
    let (text, err, code) = run_prof_bpf(&["report", "--format", "text", &file]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("mode: otel_memory USDT probes"), "{text}");
    w.send_line("quit");
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0);
    let dumps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy() != file)
        .collect();
    assert_eq!(dumps.len(), 1, "one preload profile, at exit: {dumps:?}");
    let preload = folded_inuse(dumps[0].to_str().unwrap());
    // Everything was allocated after the attach: the probes' alloc values
    // are the allocator's too.
    assert_eq!(
        live_set_lines(&allocated),
        live_set_lines(&folded(dumps[0].to_str().unwrap(), "alloc_space")),
        "agent:\n{allocated}"
    );

    let from_usdt = live_set_lines(&live);
    assert_eq!(
        from_usdt,
        live_set_lines(&preload),
        "agent:\n{live}\npreload:\n{preload}"
    );
    let stacks = parse_folded(&live);
    for (site, n, size) in LIVE_SETS {
        assert!(
            has_chain(&stacks, &format!("main;{site}")),
            "{site}: {live}"
        );
        let (got, want) = (leaf_total(&stacks, site), n * size);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(error < 0.10, "{site}: estimated {got}, true {want}: {live}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Attached after the live sets were allocated, and only for a moment, the
/// agent reports them from libprofalloc.so's own live heap, under their
/// sites, within 10% of their true sizes; the churn freed before is gone.
#[test]
fn the_heap_allocated_before_the_attach_is_reported_from_the_allocator() {
    require_bpf!();
    let dir = scratch("heap-live");
    let mut w = Proc::spawn(
        Command::new(build_workload("usdt_live", FLAGS))
            .env("LD_PRELOAD", prof_bpf_tests::profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", RATE),
    );
    w.expect_line("ready");
    w.send_line("go");
    w.expect_line("allocated");
    let pid = w.pid().to_string();
    let file = dir.join("agent.pb.gz").to_string_lossy().into_owned();
    let (prof, _) = start_prof_bpf(&["heap", "--pid", &pid, "-o", &file], ATTACHED);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    let live = folded_inuse(&file);
    let stacks = parse_folded(&live);
    for (site, n, size) in LIVE_SETS {
        assert!(
            has_chain(&stacks, &format!("main;{site}")),
            "{site}: {live}"
        );
        let (got, want) = (leaf_total(&stacks, site), n * size);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(error < 0.10, "{site}: estimated {got}, true {want}: {live}");
    }
    assert_eq!(leaf_total(&stacks, "churn_site"), 0, "{live}");
    let (text, err, code) = run_prof_bpf(&["report", "--format", "text", &file]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("sampled heap since process start (from the allocator)"),
        "{text}"
    );
    w.send_line("quit");
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process with neither probes nor libprofalloc.so: `--probe usdt`
/// fails in one line, `auto` takes the malloc uprobes, and the report's
/// mode comment names them.
#[test]
fn targets_without_probes_take_the_malloc_uprobes() {
    require_bpf!();
    let mut w = start_workload();
    let pid = w.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--probe", "usdt"]);
    assert_one_line_error(&stderr, code, "no object with otel_memory:alloc");

    let dir = scratch("heap-uprobes");
    let report = dir.join("r.pb.gz").to_string_lossy().into_owned();
    profile_rounds(&mut w, &["-o", &report], 1);
    let (text, err, code) = run_prof_bpf(&["report", "--format", "text", &report]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("mode: malloc uprobes, sampled"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
