//! `prof-bpf heap`: launch mode's report of what was never freed, and the
//! one-line errors for bad input.
use std::process::Command;

use heap_support::*;
use prof_bpf_tests::{assert_one_line_error, build_workload, prof_bpf, require_bpf, run_prof_bpf};

mod heap_support;

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
