//! Another tracer holding a uprobe with a reference counter at the same
//! place: the kernel refuses ours with a bare EINVAL, and prof-bpf must say
//! what is happening and who holds the probe.
use std::time::Duration;

use prof_bpf_tests::{Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf};

#[test]
fn a_probe_held_with_a_reference_counter_is_named() {
    require_bpf!();
    let mut target = Proc::spawn(
        std::process::Command::new(build_workload(
            "malloc_count",
            &["-O1", "-g", "-fno-builtin"],
        ))
        .arg("1000"),
    );
    target.expect_line("ready");
    let pid = target.pid().to_string();
    let mut holder =
        Proc::spawn(std::process::Command::new(build_workload("uprobe_holder", &[])).arg(&pid));
    let ready = holder.read_line();
    let offset = ready
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("holder said `{ready}`"));
    // heap probes malloc's return at its entry: the place the holder holds.
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--duration", "1"]);
    assert_one_line_error(&stderr, code, "the kernel refused a uprobe at");
    assert!(
        stderr.contains(&format!("libc.so.6+{offset}")),
        "the place is not named: {stderr}"
    );
    assert!(
        stderr.contains(&format!("held by pid {} (uprobe_holder)", holder.pid())),
        "the holder is not named: {stderr}"
    );
    drop(holder.wait_output(Duration::from_secs(5)));
    // Once the holder is gone the same attach works.
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--duration", "0.5"]);
    assert_eq!(code, 0, "{stderr}");
}
