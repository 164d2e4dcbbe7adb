//! `prof-bpf count`: exact malloc/free counts of a running process, and the
//! errors for bad input.
use std::time::Duration;

use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf, start_prof_bpf,
};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-builtin"];
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// Runs malloc_count (N malloc and free calls, sizes known) with `preload`
/// as LD_PRELOAD, counts it, and checks the exact totals and that the
/// allocator probed is the one whose file name starts with `allocator`.
fn counts_exactly(preload: Option<&str>, allocator: &str) {
    let n: u64 = 100_000;
    let mut command = std::process::Command::new(build_workload("malloc_count", FLAGS));
    command.arg(n.to_string());
    if let Some(lib) = preload {
        command.env("LD_PRELOAD", lib);
    }
    let mut workload = Proc::spawn(&mut command);
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let (prof, seen) = start_prof_bpf(&["count", "--pid", &pid], "counting malloc/free");
    let banner = seen.last().unwrap();
    assert!(banner.contains(&format!("/{allocator}")), "{banner}");
    workload.send_line("go");
    workload.expect_line("done");
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(
        out.status.success(),
        "prof-bpf count failed: {:?}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total = stdout
        .lines()
        .find_map(|l| l.strip_prefix("total: "))
        .unwrap_or_else(|| panic!("no total line in: {stdout}"));
    let field = |name: &str| -> u64 {
        total
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in `{total}`"))
    };
    let bytes: u64 = (0..n).map(|i| 100 + i % 7).sum();
    assert_eq!(field("malloc_calls"), n, "{allocator}");
    assert_eq!(field("malloc_bytes"), bytes, "{allocator}");
    assert_eq!(field("free_calls"), n, "{allocator}");
    drop(workload.wait_output(Duration::from_secs(10)));
}

#[test]
fn counts_exact_malloc_and_free_calls() {
    require_bpf!();
    counts_exactly(None, "libc.so.6");
}

#[test]
fn counts_the_calls_of_a_preloaded_jemalloc() {
    require_bpf!();
    counts_exactly(Some(JEMALLOC), "libjemalloc.so.2");
}

#[test]
fn counts_the_calls_of_a_preloaded_libprofalloc() {
    require_bpf!();
    let lib = prof_bpf_tests::profalloc_lib();
    counts_exactly(Some(&lib.to_string_lossy()), "libprofalloc.so");
}

#[test]
fn lib_names_the_allocator_to_probe() {
    require_bpf!();
    let w = Proc::spawn(std::process::Command::new("sleep").arg("1000"));
    w.wait_mapped("libc.so");
    let pid = w.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["count", "--pid", &pid, "--lib", "/bin/true"]);
    assert_one_line_error(&stderr, code, "defines no `malloc`");
}

#[test]
fn nonexistent_pid_is_one_line_error() {
    require_bpf!();
    // pid_max is at most 2^22, so this pid cannot exist.
    let (_, stderr, code) = run_prof_bpf(&["count", "--pid", "4999999"]);
    assert_one_line_error(&stderr, code, "no process with pid 4999999");
}

#[test]
fn non_root_is_one_line_error() {
    require_bpf!();
    // Drop to the `nobody` user for this one command.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(prof_bpf_tests::prof_bpf())
        .args(["count", "--pid", "1"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(&stderr, out.status.code().unwrap_or(-1), "must run as root");
}

/// SIGTERM and SIGHUP end `count` like Ctrl-C: the totals are printed and
/// the exit status is 0. The target is idle, so it made no call.
#[test]
fn sigterm_and_sighup_print_the_totals() {
    require_bpf!();
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let idle = Proc::spawn(std::process::Command::new("sleep").arg("1000"));
        idle.wait_mapped("libc.so");
        let pid = idle.pid().to_string();
        let (prof, _) = start_prof_bpf(&["count", "--pid", &pid], "counting malloc/free");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(prof.id() as i32, signal) };
        let out = prof.wait_with_output().expect("wait for prof-bpf");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "signal {signal}: {}; stdout: {stdout}",
            out.status
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("total: malloc_calls=0 malloc_bytes=0 free_calls=0")),
            "signal {signal}: {stdout}"
        );
        idle.signal(libc::SIGKILL);
    }
}
