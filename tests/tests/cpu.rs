//! `prof-bpf cpu`: CPU splits known by construction, names, kernel frames,
//! short-lived processes, pprof output, and the options' effects.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, parse_folded, require_bpf, run_prof_bpf,
    start_prof_bpf,
};

/// Frame pointers for the frame-pointer walk; -O2 as a real build.
const FLAGS: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer"];
/// Tolerance of a share, in percentage points.
const TOLERANCE: f64 = 3.0;

fn out_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("prof-bpf-cpu-tests");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// The function of `func_a`, `func_b`, `func_c` nearest the leaf, if any.
fn split_function(frames: &[String]) -> Option<usize> {
    frames.iter().rev().find_map(|f| match f.as_str() {
        "func_a" => Some(0),
        "func_b" => Some(1),
        "func_c" => Some(2),
        _ => None,
    })
}

/// Percentages of func_a/b/c among the stacks that contain one of them.
fn split_of<'a>(stacks: impl Iterator<Item = &'a (Vec<String>, u64)>) -> ([f64; 3], u64) {
    let mut sums = [0u64; 3];
    for (frames, value) in stacks {
        if let Some(i) = split_function(frames) {
            sums[i] += value;
        }
    }
    let total: u64 = sums.iter().sum();
    let pct = sums.map(|s| 100.0 * s as f64 / total.max(1) as f64);
    (pct, total)
}

fn assert_split(what: &str, got: [f64; 3], want: [f64; 3]) {
    eprintln!("{what}: split {got:.2?}, expected {want:?}");
    for i in 0..3 {
        assert!(
            (got[i] - want[i]).abs() <= TOLERANCE,
            "{what}: split {got:.1?} differs from {want:?} by more than {TOLERANCE} points"
        );
    }
}

/// Wall seconds of the split runs (sampling lasts at least this long).
const SPLIT_SECONDS: &str = "10";
/// CPU seconds each worker gets at least, however busy the machine: 5000
/// samples at 999 Hz put one standard deviation of a share under 0.7 points.
const SPLIT_CPU_SECONDS: &str = "5";
/// Nanoseconds of CPU sampled per worker at least (a margin under 5 s).
const SPLIT_MIN_NS: u64 = 4_500_000_000;

/// Runs the split workload under `prof-bpf cpu --pid` at 999 Hz until it
/// exits, and returns the folded stacks (values in nanoseconds).
fn profile_split(mode: &[&str], group_by: &str) -> (Vec<(Vec<String>, u64)>, u32) {
    let mut workload = Proc::spawn(
        Command::new(build_workload("cpu_split", FLAGS))
            .args([SPLIT_SECONDS, SPLIT_CPU_SECONDS])
            .args(mode),
    );
    workload.expect_line("ready");
    let pid = workload.pid();
    let out = out_file(&format!("split-{pid}.folded"));
    let pid_arg = pid.to_string();
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid_arg,
            "-F",
            "999",
            "--group-by",
            group_by,
            "-o",
            out.to_str().unwrap(),
        ],
        "sampling",
    );
    workload.send_line("go");
    workload.expect_line("done");
    let status = prof.wait_with_output().expect("wait for prof-bpf").status;
    assert!(status.success(), "prof-bpf cpu failed: {status:?}");
    let text = std::fs::read_to_string(&out).expect("read folded output");
    drop(workload.wait_output(Duration::from_secs(10)));
    (parse_folded(&text), pid)
}

#[test]
fn single_thread_split_is_50_30_20() {
    require_bpf!();
    let (stacks, pid) = profile_split(&[], "process");
    // The process is named by its comm, set by the workload.
    let root = format!("splitmain-{pid}");
    assert!(
        stacks.iter().all(|(f, _)| f[0] == root),
        "every stack should start at {root}: {:?}",
        stacks.iter().map(|(f, _)| &f[0]).collect::<Vec<_>>()
    );
    let (split, total_ns) = split_of(stacks.iter());
    assert!(total_ns >= SPLIT_MIN_NS, "only {total_ns} ns sampled");
    assert_split("single thread", split, [50.0, 30.0, 20.0]);
    // The stacks are complete down to main.
    let with_main: u64 = stacks
        .iter()
        .filter(|(f, _)| split_function(f).is_some() && f.iter().any(|x| x == "main"))
        .map(|(_, v)| v)
        .sum();
    assert!(with_main * 100 >= total_ns * 95, "main missing from stacks");
}

#[test]
fn per_thread_splits_are_exact() {
    require_bpf!();
    let (stacks, pid) = profile_split(&["threads"], "thread");
    let mut by_root: HashMap<&str, Vec<&(Vec<String>, u64)>> = HashMap::new();
    for s in &stacks {
        by_root.entry(s.0[0].as_str()).or_default().push(s);
    }
    let mut splits = Vec::new();
    for (root, stacks) in &by_root {
        let (split, total) = split_of(stacks.iter().copied());
        if total > 0 {
            assert!(
                root.starts_with(&format!("splitmain-{pid}/")),
                "root {root}"
            );
            splits.push((split, total));
        }
    }
    assert_eq!(splits.len(), 2, "two worker threads expected: {by_root:?}");
    for (split, total) in &splits {
        assert!(
            *total >= SPLIT_MIN_NS,
            "only {total} ns sampled for a thread"
        );
        // Worker 1 runs a/b/c at 50/30/20, worker 2 at 20/30/50.
        let want = if split[0] > split[2] {
            [50.0, 30.0, 20.0]
        } else {
            [20.0, 30.0, 50.0]
        };
        assert_split("per thread", *split, want);
    }
}

#[test]
fn thread_names_are_labels_in_pprof() {
    require_bpf!();
    let mut workload =
        Proc::spawn(Command::new(build_workload("cpu_split", FLAGS)).args(["2", "0", "threads"]));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = out_file(&format!("names-{pid}.pb.gz"));
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid,
            "-F",
            "999",
            "-o",
            out.to_str().unwrap(),
        ],
        "sampling",
    );
    workload.send_line("go");
    workload.expect_line("done");
    assert!(prof.wait_with_output().expect("wait").status.success());
    let tags = go_pprof(&["-tags"], &out);
    for name in ["splitmain", "split-w1", "split-w2"] {
        assert!(tags.contains(name), "{name} missing from labels:\n{tags}");
    }
    drop(workload.wait_output(Duration::from_secs(10)));
}

#[test]
fn syscall_heavy_workload_has_kernel_frames() {
    require_bpf!();
    let mut workload = Proc::spawn(Command::new(build_workload("cpu_syscalls", FLAGS)).arg("3"));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = out_file(&format!("syscalls-{pid}.folded"));
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid,
            "-F",
            "999",
            "-o",
            out.to_str().unwrap(),
        ],
        "sampling",
    );
    workload.send_line("go");
    workload.expect_line("done");
    assert!(prof.wait_with_output().expect("wait").status.success());
    let stacks = parse_folded(&std::fs::read_to_string(&out).expect("read output"));
    let total: u64 = stacks.iter().map(|(_, v)| v).sum();
    let kernel: u64 = stacks
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x.ends_with("_[k]")))
        .map(|(_, v)| v)
        .sum();
    let read_path: u64 = stacks
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x.ends_with("_[k]") && x.contains("read")))
        .map(|(_, v)| v)
        .sum();
    assert!(total > 0, "no samples");
    // Reading /dev/zero spends most of its time clearing user memory.
    assert!(
        kernel * 2 >= total,
        "kernel frames in {kernel} of {total} ns"
    );
    assert!(
        read_path * 2 >= total,
        "read syscall frames in {read_path} of {total} ns"
    );
    // The user side of kernel samples is there too: the kernel frames sit
    // on top of the user stack.
    let with_user: u64 = stacks
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x.ends_with("_[k]")) && f.iter().any(|x| x == "main"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        with_user * 2 >= kernel,
        "user frames under kernel frames in {with_user} of {kernel} ns"
    );
    drop(workload.wait_output(Duration::from_secs(10)));
}

#[test]
fn short_lived_process_is_named_and_symbolized() {
    require_bpf!();
    let program = build_workload("cpu_short", FLAGS);
    let out = out_file("short.folded");
    let (prof, _) = start_prof_bpf(
        &["cpu", "--all", "-F", "999", "-o", out.to_str().unwrap()],
        "sampling",
    );
    let child = Command::new(&program).status().expect("run cpu_short");
    assert!(child.success());
    // The next drain happens within a second; Ctrl-C must still write it all.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let status = prof.wait_with_output().expect("wait").status;
    assert!(
        status.success(),
        "prof-bpf cpu failed on Ctrl-C: {status:?}"
    );
    let stacks = parse_folded(&std::fs::read_to_string(&out).expect("read output"));
    // comm is the executable's name, cut at 15 bytes.
    let name = program.file_name().unwrap().to_str().unwrap();
    let comm = &name[..name.len().min(15)];
    let ours: Vec<_> = stacks
        .iter()
        .filter(|(f, _)| f[0].starts_with(&format!("{comm}-")))
        .collect();
    assert!(!ours.is_empty(), "no samples of {comm}");
    let total: u64 = ours.iter().map(|(_, v)| v).sum();
    let symbolized: u64 = ours
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x == "short_lived_work") && f.iter().any(|x| x == "main"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        symbolized * 10 >= total * 8,
        "short_lived_work/main in {symbolized} of {total} ns"
    );
}

fn go_pprof(args: &[&str], file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .output()
        .expect("run go tool pprof");
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pprof_file_is_read_by_go_pprof() {
    require_bpf!();
    let mut workload =
        Proc::spawn(Command::new(build_workload("cpu_split", FLAGS)).args(["3", "0"]));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = out_file(&format!("split-{pid}.pb.gz"));
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid,
            "-F",
            "999",
            "-o",
            out.to_str().unwrap(),
        ],
        "sampling",
    );
    workload.send_line("go");
    workload.expect_line("done");
    assert!(prof.wait_with_output().expect("wait").status.success());
    let top = go_pprof(&["-top", "-sample_index=cpu"], &out);
    for f in ["burn", "func_a", "func_b", "func_c", "main"] {
        assert!(
            top.contains(f),
            "{f} missing from go tool pprof -top:\n{top}"
        );
    }
    // burn is the leaf of nearly everything: its flat share dominates.
    let burn = top
        .lines()
        .find(|l| l.trim_end().ends_with(" burn"))
        .expect("burn line");
    let flat_pct: f64 = burn
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .expect("flat% of burn");
    assert!(flat_pct > 90.0, "burn flat {flat_pct}%:\n{top}");
    drop(workload.wait_output(Duration::from_secs(10)));
}

#[test]
fn interval_prints_top_tables() {
    require_bpf!();
    let mut workload =
        // Runs past the session whatever prof-bpf's start takes (loading
        // the walker's programs takes seconds on a busy machine).
        Proc::spawn(Command::new(build_workload("cpu_split", FLAGS)).args(["60", "0"]));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = out_file(&format!("interval-{pid}.folded"));
    workload.send_line("go");
    let (stdout, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--pid",
        &pid,
        "-F",
        "999",
        "--duration",
        "4.5",
        "--interval",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "prof-bpf cpu failed: {stderr}");
    // A table per interval (a busy machine may delay some: four are due,
    // two are asked for), each led by its time and headed like pprof -top.
    let tables = stdout.lines().filter(|l| l.starts_with("--- ")).count();
    assert!(tables >= 2, "expected 2 interval tables:\n{stdout}");
    let headers = stdout
        .lines()
        .filter(|l| l.contains("flat%") && l.contains("cum%"))
        .count();
    assert_eq!(headers, tables, "a header per table:\n{stdout}");
    assert!(
        stdout.contains(" burn"),
        "burn missing from the tables:\n{stdout}"
    );
    // The final report still goes to the file.
    let stacks = parse_folded(&std::fs::read_to_string(&out).expect("read output"));
    assert!(stacks.iter().any(|(f, _)| f.iter().any(|x| x == "burn")));
    drop(workload);
}

/// Starts `cpu ARGS` on the whole host, sends `signal` once it samples, and
/// returns (stdout, exit code).
fn cpu_until_signal(args: &[&str], signal: i32) -> (String, Option<i32>) {
    let mut all = vec!["cpu", "-F", "199"];
    all.extend_from_slice(args);
    let (prof, _) = start_prof_bpf(&all, "sampling");
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, signal) };
    let output = prof.wait_with_output().expect("wait for prof-bpf");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        output.status.code(),
    )
}

#[test]
fn sigterm_and_sighup_write_the_report() {
    require_bpf!();
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        // To stdout: the text table.
        let (stdout, code) = cpu_until_signal(&[], signal);
        assert_eq!(code, Some(0), "{name}: exit status");
        assert!(
            stdout.contains("flat%") && stdout.contains("prof-bpf cpu: cpu-clock"),
            "{name}: no report on stdout:\n{stdout}"
        );
        // To a file.
        let out = out_file(&format!("signal-{name}.pb.gz"));
        let (stdout, code) = cpu_until_signal(&["-o", out.to_str().unwrap()], signal);
        assert_eq!(code, Some(0), "{name}: exit status");
        assert!(stdout.is_empty(), "{name}: {stdout}");
        let bytes = std::fs::read(&out).expect("read the report file");
        // gzip magic: a whole pprof file, not an empty one.
        assert!(
            bytes.len() > 100 && bytes.starts_with(&[0x1f, 0x8b]),
            "{name}: report file of {} bytes",
            bytes.len()
        );
    }
}

#[test]
fn bad_output_extension_is_rejected_before_attaching() {
    require_bpf!();
    let out = out_file("report.unknown-extension");
    let started = std::time::Instant::now();
    let (_, stderr, code) = run_prof_bpf(&["cpu", "--duration", "5", "-o", out.to_str().unwrap()]);
    assert_one_line_error(&stderr, code, "unknown extension .unknown-extension");
    assert!(!out.exists(), "a file was left at {}", out.display());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "rejected only after sampling"
    );
}

/// Runs `prof-bpf ARGS` to its end; returns its exit code and its stderr
/// lines with the time each was read.
fn run_with_line_times(args: &[&str]) -> (i32, Vec<(std::time::Instant, String)>) {
    use std::io::BufRead as _;
    let mut child = Command::new(prof_bpf_tests::prof_bpf())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start prof-bpf");
    let stderr = child.stderr.take().expect("stderr is piped");
    let lines = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .map(|line| (std::time::Instant::now(), line))
        .collect();
    let status = child.wait().expect("wait for prof-bpf");
    (status.code().unwrap_or(-1), lines)
}

#[test]
fn interval_with_duration_ends_on_time() {
    require_bpf!();
    for (interval, duration) in [("0.1", 1.0), ("0.7", 2.0)] {
        let mut workload =
            Proc::spawn(Command::new(build_workload("cpu_split", FLAGS)).args(["60", "0"]));
        workload.expect_line("ready");
        let pid = workload.pid().to_string();
        workload.send_line("go");
        let out = out_file(&format!("interval-duration-{pid}.folded"));
        let duration_arg = duration.to_string();
        let args = [
            "cpu",
            "--pid",
            &pid,
            "-F",
            "999",
            "--interval",
            interval,
            "--duration",
            &duration_arg,
            "--sample-type",
            "samples",
            "-o",
            out.to_str().unwrap(),
        ];
        // From the start of sampling to the stop (loading, attaching and
        // writing the report take their own time on a busy machine).
        let (code, lines) = run_with_line_times(&args);
        assert_eq!(code, 0, "prof-bpf cpu failed: {lines:?}");
        let at = |needle: &str| {
            lines
                .iter()
                .find(|(_, l)| l.contains(needle))
                .map(|(t, _)| *t)
                .unwrap_or_else(|| panic!("no `{needle}` in {lines:?}"))
        };
        let took = (at("stopping: --duration reached") - at("sampling")).as_secs_f64();
        assert!(
            took < duration + 1.0,
            "--interval {interval} --duration {duration} stopped after {took:.1} s"
        );
        // One busy thread at 999 Hz: at most `duration` s of samples (the
        // kernel stops counting at the end, whenever user space stops), and
        // some of them even on an overloaded machine.
        let samples: u64 = parse_folded(&std::fs::read_to_string(&out).expect("read output"))
            .iter()
            .map(|(_, v)| v)
            .sum();
        let most = (duration * 999.0 * 1.02) as u64;
        assert!(
            samples <= most && samples * 20 >= most,
            "--interval {interval} --duration {duration}: {samples} samples"
        );
        drop(workload);
    }
    // An interval longer than the whole run is a mistake.
    let (_, stderr, code) = run_prof_bpf(&["cpu", "--interval", "5", "--duration", "1"]);
    assert_one_line_error(
        &stderr,
        code,
        "--interval (5 s) is longer than --duration (1 s)",
    );
}
