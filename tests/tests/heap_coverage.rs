//! What a heap report covers: probes see only what is allocated after the
//! attach, and the report says so beside the process's memory, so that a
//! process holding far more than the profile shows is not a surprise.
use std::process::Command;

use prof_bpf_tests::{Proc, build_workload, require_bpf, run_prof_bpf, start_prof_bpf};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-builtin"];
/// What tests/workloads/heap_before_attach.c allocates before "ready" and
/// leaks after "go".
const BEFORE: f64 = 64.0 * 1024.0 * 1024.0;
const AFTER: i64 = 10 * 1000;

/// The value in MiB after `label` in `line` (`... Anonymous 64.3 MiB, ...`).
fn mib_after(line: &str, label: &str) -> f64 {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("no {label}: {line}"))
        + label.len()..];
    let mut words = rest.split_whitespace();
    let value: f64 = words.next().and_then(|v| v.parse().ok()).unwrap();
    match words.next().map(|u| u.trim_end_matches(',')) {
        Some("MiB") => value,
        Some("KiB") => value / 1024.0,
        unit => panic!("unit {unit:?} in {line}"),
    }
}

#[test]
fn report_states_the_coverage_beside_the_process_memory() {
    require_bpf!();
    let mut w = Proc::spawn(&mut Command::new(build_workload(
        "heap_before_attach",
        FLAGS,
    )));
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let dir = std::env::temp_dir().join(format!("prof-bpf-coverage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_string_lossy().into_owned();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--pid",
            &pid,
            "--sample-bytes",
            "0",
            "-o",
            &file_arg,
        ],
        "prof-bpf: heap: attached",
    );
    w.send_line("go");
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success(), "prof-bpf heap: {}", out.status);

    let (folded, stderr, code) = run_prof_bpf(&[
        "report",
        "--format",
        "folded",
        "--group-by",
        "none",
        "--sample-type",
        "inuse_space",
        &file_arg,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let total: i64 = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<i64>().ok())
        .sum();
    assert_eq!(total, AFTER, "{folded}");

    let (text, stderr, code) = run_prof_bpf(&["report", "--format", "text", &file_arg]);
    assert_eq!(code, 0, "{stderr}");
    let coverage = text
        .lines()
        .find(|l| l.contains("coverage: allocations made since the attach at "))
        .unwrap_or_else(|| panic!("no coverage note: {text}"));
    let clock = coverage
        .split("attach at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    assert!(
        clock.len() == 8
            && clock
                .split(':')
                .all(|f| f.len() == 2 && f.parse::<u32>().is_ok()),
        "{coverage}"
    );
    let memory = text
        .lines()
        .find(|l| l.contains(&format!("({pid}) now: Anonymous ")))
        .unwrap_or_else(|| panic!("no memory note: {text}"));
    let anonymous = mib_after(memory, "Anonymous ");
    assert!(anonymous * 1024.0 * 1024.0 >= BEFORE, "{memory}");
    assert!(memory.contains("[heap] Rss "), "{memory}");
    std::fs::remove_dir_all(&dir).unwrap();
}
