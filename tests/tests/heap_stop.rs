//! How `prof-bpf heap` ends: SIGTERM and SIGHUP end it like Ctrl-C, with
//! the report written (stdout or `-o`) and exit status 0; an output it
//! cannot write is refused before anything is attached.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf, start_prof_bpf,
};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-builtin"];
const ATTACHED: &str = "prof-bpf: heap: attached";
/// What one round of heap_leaks.c leaks from `leak_small`.
const SMALL: i64 = 20 * 1000;

fn start_workload() -> Proc {
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_leaks", FLAGS)));
    w.expect_line("ready");
    w
}

/// Bytes held by stacks whose leaf is `leak_small`, from folded text.
fn leak_small(folded: &str) -> i64 {
    folded
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(frames, _)| frames.ends_with(";leak_small") || *frames == "leak_small")
        .filter_map(|(_, v)| v.parse::<i64>().ok())
        .sum()
}

/// Profiles one round of the workload, ends prof-bpf with `signal`, and
/// returns its stdout after checking it exited 0.
fn profile_until(signal: i32, extra: &[&str]) -> String {
    let mut w = start_workload();
    let pid = w.pid().to_string();
    let mut args = vec![
        "heap",
        "--pid",
        &pid,
        "--sample-bytes",
        "0",
        "--format",
        "folded",
        "--group-by",
        "none",
    ];
    args.extend_from_slice(extra);
    let (prof, _) = start_prof_bpf(&args, ATTACHED);
    w.send_line("go 1");
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, signal) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "prof-bpf heap after signal {signal}: {}; stdout: {stdout}",
        out.status
    );
    stdout
}

#[test]
fn sigterm_and_sighup_write_the_report_to_stdout() {
    require_bpf!();
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let out = profile_until(signal, &[]);
        assert_eq!(leak_small(&out), SMALL, "signal {signal}: {out}");
    }
}

#[test]
fn sigterm_and_sighup_write_the_report_to_the_output_file() {
    require_bpf!();
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the output directory");
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let file = dir.join(format!("heap-{signal}.folded"));
        let path = file.to_string_lossy().into_owned();
        let stdout = profile_until(signal, &["-o", &path]);
        assert!(stdout.is_empty(), "report on stdout with -o: {stdout}");
        let text = std::fs::read_to_string(&file).expect("read the report file");
        assert_eq!(leak_small(&text), SMALL, "signal {signal}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A refused output stops everything before the targets are touched: in
/// launch mode the program is never started (it would leave a marker file),
/// with --pid nothing is attached (no banner) and the error is immediate.
#[test]
fn unknown_output_extension_is_refused_before_attaching() {
    require_bpf!();
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let output = dir.join("x.unknownext");
    let output_arg = output.to_string_lossy().into_owned();
    let marker = dir.join("ran");
    let script = format!("touch {}", marker.display());

    let started = Instant::now();
    let (_, stderr, code) =
        run_prof_bpf(&["heap", "-o", &output_arg, "--", "/bin/sh", "-c", &script]);
    assert_one_line_error(&stderr, code, "x.unknownext");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!marker.exists(), "the program ran: {stderr}");
    assert!(!output.exists(), "{} was created", output.display());

    let w = start_workload();
    let pid = w.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "-o", &output_arg]);
    assert_one_line_error(&stderr, code, "x.unknownext");
    assert!(!stderr.contains("attached"), "{stderr}");
    assert!(!output.exists(), "{} was created", output.display());
    let _ = std::fs::remove_dir_all(&dir);
}
