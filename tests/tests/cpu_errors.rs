//! `prof-bpf cpu`: the one-line errors for bad input.
use std::{path::Path, process::Command};

use prof_bpf_tests::{assert_one_line_error, require_bpf, run_prof_bpf};

#[test]
fn unknown_pid_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["cpu", "--pid", "4999999"]);
    assert_one_line_error(&stderr, code, "no process with pid 4999999");
}

#[test]
fn bad_frequency_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["cpu", "-F", "0"]);
    assert_one_line_error(&stderr, code, "from 1 to 100000, got 0");
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .expect("read max sample rate")
        .trim()
        .parse()
        .expect("parse max sample rate");
    let above = (max + 1).to_string();
    let (_, stderr, code) = run_prof_bpf(&["cpu", "-F", &above]);
    // Above the kernel's limit, or above what the option accepts at all.
    let needle = if max < 100_000 {
        format!("-F {above} is above the kernel's limit of {max}")
    } else {
        format!("got {above}")
    };
    assert_one_line_error(&stderr, code, &needle);
}

#[test]
fn unwritable_output_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) =
        run_prof_bpf(&["cpu", "--duration", "1", "-o", "/nonexistent-dir/cpu.pb.gz"]);
    assert_one_line_error(&stderr, code, "cannot write /nonexistent-dir/cpu.pb.gz");
}

#[test]
fn cycles_without_hardware_counters_is_one_line_error() {
    require_bpf!();
    let has_pmu = Path::new("/sys/bus/event_source/devices/cpu").exists()
        || Path::new("/sys/bus/event_source/devices/cpu_core").exists();
    let (_, stderr, code) = run_prof_bpf(&["cpu", "--event", "cycles", "--duration", "0.5"]);
    if has_pmu {
        assert_eq!(code, 0, "cycles with a PMU: {stderr}");
    } else {
        assert_one_line_error(&stderr, code, "--event cycles is not available");
    }
}

#[test]
fn non_root_is_one_line_error() {
    require_bpf!();
    // With either event: the root check comes before the cycle counter's.
    for event in ["cpu-clock", "cycles"] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(prof_bpf_tests::prof_bpf())
            .args(["cpu", "--event", event, "--duration", "1"])
            .output()
            .expect("run setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_one_line_error(&stderr, out.status.code().unwrap_or(-1), "must run as root");
    }
}
