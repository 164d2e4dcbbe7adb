//! Another tracer holding a uprobe with a reference counter at the same
//! place: the kernel refuses ours with a bare EINVAL, and prof-bpf must say
//! what is happening and who holds the probe.
use std::time::Duration;

use prof_bpf_tests::{Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf};

#[test]
fn a_probe_held_with_a_reference_counter_is_named() {
    require_bpf!();
    // The target runs on a private copy of the C library: a file no other
    // tracer on this machine has ever probed (the kernel keeps one uprobe
    // per file and offset, and other sessions' probes on the system libc
    // would decide the outcome).
    let dir = std::env::temp_dir().join(format!("prof-bpf-conflict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let libc = dir.join("libc.so.6");
    std::fs::copy(SYSTEM_LIBC, &libc).expect("copy libc");
    let mut target = Proc::spawn(
        std::process::Command::new(build_workload(
            "malloc_count",
            &["-O1", "-g", "-fno-builtin"],
        ))
        .arg("1000")
        .env("LD_PRELOAD", &libc),
    );
    target.expect_line("ready");
    let pid = target.pid().to_string();
    // The place heap probes first: free, at the instruction its probe
    // placement picks.
    let offset = format!("{:#x}", free_probe_offset());
    let mut holder = Proc::spawn(
        std::process::Command::new(build_workload("uprobe_holder", &[]))
            .args([pid.as_str(), offset.as_str()])
            .arg(&libc),
    );
    let ready = holder.read_line();
    assert_eq!(ready, format!("ready {offset}"), "holder said `{ready}`");
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
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

const SYSTEM_LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

/// The file offset heap probes glibc's `free` at (libc's executable segment
/// has file offsets equal to its addresses).
fn free_probe_offset() -> u64 {
    let libc = std::fs::canonicalize(SYSTEM_LIBC).expect("libc");
    let out = std::process::Command::new("nm")
        .args(["-D", "-S", "--defined-only"])
        .arg(&libc)
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let (addr, size) = text
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(3)?.split('@').next()?;
            (name == "free").then(|| {
                let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex");
                (hex(f[0]), hex(f[1]))
            })
        })
        .expect("libc defines free");
    let bytes = std::fs::read(&libc).expect("read libc");
    let code = &bytes[addr as usize..(addr + size) as usize];
    addr + profiler::probe_point::cheap_offset(code, addr)
}
