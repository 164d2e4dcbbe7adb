//! Launch mode (`prof-bpf heap|cpu -- CMD`): the program is never harmed.
//! Whatever happens to prof-bpf (a bad option found after the fork, a
//! SIGKILL at any step of the launch), no process is left behind, none is
//! left stopped, and a program that started runs to its end. The program's
//! exit status is prof-bpf's, its stdout is its own, and the descendants of
//! a launched command are sampled.
//!
//! Each test tags its processes with a unique word in their command line
//! (an argument of the command, which the child before exec and the guard
//! share through prof-bpf's own command line), and scans /proc for it.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use prof_bpf_tests::{parse_folded, prof_bpf, require_bpf, start_prof_bpf};

/// How long processes may take to go after prof-bpf is gone.
const SETTLE: Duration = Duration::from_secs(5);
/// A program stopped this long after prof-bpf died is stopped for good.
const STOPPED_TOO_LONG: Duration = Duration::from_secs(2);

/// A word no other process has in its command line.
fn unique_tag(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "launchtest-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("prof-bpf-launch-tests");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Processes whose command line holds `tag`: (pid, comm, state).
fn tagged(tag: &str) -> Vec<(u32, String, char)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(tag) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .unwrap_or('?');
        // Zombies are gone already, waiting for their parent to notice.
        if state == 'Z' || state == 'X' {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        found.push((pid, comm.trim_end().to_owned(), state));
    }
    found
}

/// Asserts that no process tagged `tag` is left after [`SETTLE`]; cleans up
/// the ones found before failing.
fn assert_nothing_left(tag: &str, what: &str) {
    let deadline = Instant::now() + SETTLE;
    let mut left = tagged(tag);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = tagged(tag);
    }
    for (pid, _, _) in &left {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(*pid as i32, libc::SIGCONT);
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    assert!(left.is_empty(), "{what}: processes left behind: {left:?}");
}

/// Asserts that no process tagged `tag` stays stopped for [`STOPPED_TOO_LONG`],
/// watching them until they are all gone (at most [`SETTLE`]).
fn assert_never_stopped(tag: &str, what: &str) {
    let deadline = Instant::now() + SETTLE;
    let mut stopped_since: HashMap<u32, Instant> = HashMap::new();
    while Instant::now() < deadline {
        let left = tagged(tag);
        if left.is_empty() {
            return;
        }
        stopped_since.retain(|pid, _| left.iter().any(|(p, _, s)| p == pid && *s == 'T'));
        for (pid, comm, state) in &left {
            if *state != 'T' {
                continue;
            }
            let since = *stopped_since.entry(*pid).or_insert_with(Instant::now);
            if since.elapsed() >= STOPPED_TOO_LONG {
                assert_nothing_left(tag, what);
                panic!("{what}: pid {pid} ({comm}) left stopped");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs prof-bpf to its end: (stdout, stderr, exit code). Its output goes
/// to files, not pipes: a process it leaves behind would keep a pipe open
/// and hang the test instead of failing it.
fn run(args: &[&str]) -> (String, String, i32) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let out = temp_path(&format!("run-{}-{n}.out", std::process::id()));
    let err = temp_path(&format!("run-{}-{n}.err", std::process::id()));
    let file = |p: &PathBuf| std::fs::File::create(p).expect("create an output file");
    let mut child = Command::new(prof_bpf())
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .expect("run prof-bpf");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for prof-bpf") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("prof-bpf {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &PathBuf| {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let _ = std::fs::remove_file(p);
        text
    };
    (read(&out), read(&err), status.code().unwrap_or(-1))
}

/// A launch that fails after the fork: an error, and nothing left.
fn assert_failure_leaves_nothing(args: &[&str], tag: &str, needle: &str) {
    let (stdout, stderr, code) = run(args);
    assert_ne!(code, 0, "{args:?} should fail; stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: `{needle}` not in {stderr}"
    );
    assert!(stdout.is_empty(), "{args:?} wrote to stdout: {stdout}");
    assert_nothing_left(tag, &format!("{args:?}"));
}

#[test]
fn failures_after_the_fork_leave_nothing_behind() {
    require_bpf!();
    let tag = unique_tag("passwd");
    assert_failure_leaves_nothing(&["heap", "--", "/etc/passwd", &tag], &tag, "malloc");
    let tag = unique_tag("lib");
    assert_failure_leaves_nothing(
        &["heap", "--lib", "/nonexistent.so", "--", "/bin/true", &tag],
        &tag,
        "/nonexistent.so",
    );
    let tag = unique_tag("maxlive");
    let (_, stderr, code) = run(&["heap", "--max-live", "4000000000", "--", "/bin/true", &tag]);
    assert_ne!(code, 0, "a live table of 4e9 entries: {stderr}");
    assert_nothing_left(&tag, "--max-live 4000000000");
    // Not executable: the exec itself fails, after the probes are attached.
    let script = temp_path("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("write script");
    let tag = unique_tag("noexec");
    let (_, stderr, code) = run(&["cpu", "--", script.to_str().unwrap(), &tag]);
    assert_ne!(code, 0, "a file without x permission: {stderr}");
    assert_nothing_left(&tag, "cpu -- non-executable file");
}

/// Starts prof-bpf paused at `point` of the launch of a command that
/// creates `done` after a moment, kills it there, and returns whether the
/// program ran.
fn kill_at(subcommand: &str, point: &str) -> bool {
    let tag = unique_tag(point);
    let done = temp_path(&format!("{tag}.done"));
    let script = format!("sleep 0.3; touch {}", done.display());
    let mut prof = Command::new(prof_bpf())
        .args([subcommand, "--", "sh", "-c", &script, &tag])
        .env("PROF_BPF_TEST_PAUSE", point)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start prof-bpf");
    wait_for_line(&mut prof, &format!("test pause at {point}"));
    prof.kill().expect("SIGKILL prof-bpf");
    prof.wait().expect("reap prof-bpf");
    let what = format!("{subcommand}: SIGKILL at {point}");
    assert_never_stopped(&tag, &what);
    assert_nothing_left(&tag, &what);
    done.exists()
}

/// Reads `child`'s stderr until a line contains `want` (at most a minute);
/// the rest is drained in the background.
fn wait_for_line(child: &mut Child, want: &str) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(want) => return,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("prof-bpf did not print `{want}`");
            }
        }
    }
}

#[test]
fn sigkill_before_the_exec_never_runs_the_program() {
    require_bpf!();
    for subcommand in ["heap", "cpu"] {
        for point in ["before-fork", "before-exec"] {
            assert!(
                !kill_at(subcommand, point),
                "{subcommand}: the program ran after prof-bpf died at {point}"
            );
        }
    }
}

#[test]
fn sigkill_after_the_exec_lets_the_program_finish() {
    require_bpf!();
    // heap holds the program in its loader; cpu never stops it.
    for (subcommand, point) in [
        ("heap", "loader-stop"),
        ("heap", "after-attach"),
        ("cpu", "after-attach"),
    ] {
        assert!(
            kill_at(subcommand, point),
            "{subcommand}: the program did not finish after prof-bpf died at {point}"
        );
    }
}

#[test]
fn exit_status_and_stdout_are_the_programs() {
    require_bpf!();
    for subcommand in ["heap", "cpu"] {
        let (stdout, stderr, code) =
            run(&[subcommand, "--", "sh", "-c", "echo program-output; exit 3"]);
        assert_eq!(code, 3, "{subcommand}: {stderr}");
        assert_eq!(
            stdout, "program-output\n",
            "{subcommand}: the report went to stdout"
        );
        assert!(
            stderr.contains("flat%"),
            "{subcommand}: no report on stderr: {stderr}"
        );
        let (stdout, stderr, code) = run(&[subcommand, "--", "sh", "-c", "kill -SEGV $$"]);
        assert_eq!(code, 139, "{subcommand}: killed by SIGSEGV: {stderr}");
        assert!(stdout.is_empty(), "{subcommand}: {stdout}");
    }
}

#[test]
fn report_file_in_launch_mode() {
    require_bpf!();
    let out = temp_path("launch-report.folded");
    let (stdout, stderr, code) = run(&[
        "cpu",
        "-o",
        out.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo hi; exit 0",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "hi\n");
    assert!(out.exists(), "no report file; stderr: {stderr}");
}

/// Samples per root frame (`comm-PID`).
fn per_process(text: &str) -> HashMap<String, u64> {
    let mut roots = HashMap::new();
    for (frames, value) in parse_folded(text) {
        *roots.entry(frames[0].clone()).or_default() += value;
    }
    roots
}

#[test]
fn forked_workers_of_the_command_are_sampled() {
    require_bpf!();
    // A busy process that is not the command's: never sampled.
    let mut outsider = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("start the outsider");
    let out = temp_path("workers.folded");
    let (_, stderr, code) = run(&[
        "cpu",
        "-F",
        "499",
        "--sample-type",
        "samples",
        "-o",
        out.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "yes >/dev/null & a=$!; yes >/dev/null & b=$!; sleep 1.5; kill $a $b",
    ]);
    let _ = outsider.kill();
    let _ = outsider.wait();
    assert_eq!(code, 0, "{stderr}");
    let roots = per_process(&std::fs::read_to_string(&out).expect("read the report"));
    // Two workers of up to 1.5 s of CPU each (750 samples at 499 Hz); a
    // shared machine may give them much less, but not under 0.1 s each.
    let workers: Vec<_> = roots
        .iter()
        .filter(|(root, samples)| root.starts_with("yes-") && **samples >= 50)
        .collect();
    assert_eq!(workers.len(), 2, "two busy workers expected: {roots:?}");
    let outsider_root = format!("sh-{}", outsider.id());
    assert!(
        !roots.contains_key(&outsider_root),
        "a process outside the command was sampled: {roots:?}"
    );
}

/// Runs a busy python3 under `SUBCOMMAND -o FILE -- python3`, sends
/// `signal` to prof-bpf, and checks the report and the status.
fn signal_in_launch_mode(subcommand: &str, signal: i32, name: &str) {
    let out = temp_path(&format!("launch-{subcommand}-{name}.pb.gz"));
    let (prof, _) = start_prof_bpf(
        &[
            subcommand,
            "-o",
            out.to_str().unwrap(),
            "--",
            // Not through PATH: a version manager's shim (pyenv's is a
            // shell script) can take longer than the test waits.
            "/usr/bin/python3",
            "-c",
            "def spin():\n    while True: pass\nspin()",
        ],
        if subcommand == "cpu" {
            "sampling"
        } else {
            "attached"
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, signal) };
    let output = prof.wait_with_output().expect("wait for prof-bpf");
    let what = format!("{subcommand}, {name}");
    // The signal is passed on: python3 dies of it, and so reports prof-bpf.
    assert_eq!(
        output.status.code(),
        Some(128 + signal),
        "{what}: exit status"
    );
    assert!(output.stdout.is_empty(), "{what}: stdout is the program's");
    let report = std::fs::read(&out).expect("read the report");
    assert!(
        report.starts_with(&[0x1f, 0x8b]),
        "{what}: not a gzip'd pprof file"
    );
    if subcommand == "cpu" {
        // The profile names python3: decoded by prof-bpf's own reader.
        let folded = Command::new(prof_bpf())
            .args(["report", out.to_str().unwrap(), "--format", "folded"])
            .output()
            .expect("run prof-bpf report");
        let roots = per_process(&String::from_utf8_lossy(&folded.stdout));
        assert!(
            roots.keys().any(|root| root.starts_with("python3-")),
            "{what}: python3 missing from {roots:?}"
        );
    }
}

#[test]
fn sigterm_and_sighup_keep_the_report_of_a_launched_program() {
    require_bpf!();
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("skipping: no python3");
        return;
    }
    for subcommand in ["cpu", "heap"] {
        signal_in_launch_mode(subcommand, libc::SIGTERM, "SIGTERM");
        signal_in_launch_mode(subcommand, libc::SIGHUP, "SIGHUP");
    }
}

#[test]
fn sigkill_at_any_time_of_the_launch_is_harmless() {
    require_bpf!();
    // Kill times spread over the launch (load, fork, attach, loader stops,
    // recording): whatever the moment, a program that started finishes, and
    // nothing is left behind or stopped.
    for subcommand in ["heap", "cpu"] {
        for delay_ms in (0..=600).step_by(40) {
            let tag = unique_tag(&format!("{subcommand}-{delay_ms}ms"));
            let started = temp_path(&format!("{tag}.started"));
            let done = temp_path(&format!("{tag}.done"));
            let script = format!(
                "touch {}; sleep 0.2; touch {}",
                started.display(),
                done.display()
            );
            let mut prof = Command::new(prof_bpf())
                .args([subcommand, "--", "sh", "-c", &script, &tag])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prof-bpf");
            std::thread::sleep(Duration::from_millis(delay_ms));
            let _ = prof.kill();
            prof.wait().expect("reap prof-bpf");
            let what = format!("{subcommand}: SIGKILL after {delay_ms} ms");
            assert_never_stopped(&tag, &what);
            assert_nothing_left(&tag, &what);
            assert!(
                !started.exists() || done.exists(),
                "{what}: the program started but did not finish"
            );
        }
    }
}
