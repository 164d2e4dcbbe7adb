//! Helpers for the integration tests (and `cargo xtask demo`/`bench`): find the
//! binaries under test, build the workload programs, run processes that are
//! killed when dropped, and guard tests that need root and BPF.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

/// A Rust program with enough generic code for a few seconds of rustc and
/// LLVM work (`rustc -O`): deep, frame-pointer-less stacks in the biggest
/// binaries there are.
pub fn big_rust_source() -> String {
    let mut source = String::from("use std::collections::HashMap;\n");
    for i in 0..400 {
        source.push_str(&format!(
            "pub fn f{i}(x: u64) -> HashMap<u64, String> {{ (0..x).map(|j| (j * {i}, \
             format!(\"{{j}}-{i}\"))).collect() }}\n"
        ));
    }
    source.push_str("fn main() { println!(\"{}\", f1(3).len()); }\n");
    source
}

/// Folded stacks (`a;b;c N`, as `--format folded` writes them): frames
/// root first, and the value, per line.
pub fn parse_folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .filter_map(|line| {
            let (stack, value) = line.rsplit_once(' ')?;
            Some((
                stack.split(';').map(str::to_owned).collect(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The `prof-bpf` binary under test: `$PROF_BPF_BIN` (set by `cargo xtask
/// test`), else the debug build in the target directory.
pub fn prof_bpf() -> PathBuf {
    let path = std::env::var_os("PROF_BPF_BIN")
        .map_or_else(|| target_dir().join("debug/prof-bpf"), PathBuf::from);
    assert!(
        path.exists(),
        "{} does not exist: run `cargo build -p profiler` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// The `libprofalloc.so` under test: `$PROFALLOC_LIB` (set by `cargo xtask
/// test`), else the debug build in the target directory.
pub fn profalloc_lib() -> PathBuf {
    let path = std::env::var_os("PROFALLOC_LIB")
        .map_or_else(|| target_dir().join("debug/libprofalloc.so"), PathBuf::from);
    assert!(
        path.exists(),
        "{} does not exist: run `cargo build -p profalloc-preload` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// Returns `true` when root-and-BPF tests can run. Otherwise prints why the
/// test is skipped and returns `false`, or panics when the environment says
/// BPF is required (`cargo xtask test` as root on a BPF kernel).
pub fn bpf_available(test: &str) -> bool {
    let reason = if !is_root() {
        Some("not root")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("no BTF at /sys/kernel/btf/vmlinux")
    } else if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        Some("no uprobe PMU")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) => {
            assert!(
                std::env::var_os("PROF_BPF_TESTS_REQUIRE_BPF").is_none(),
                "{test}: BPF tests are required here but cannot run: {reason}"
            );
            eprintln!("SKIPPED {test}: {reason}");
            false
        }
    }
}

/// Returns early from a test that needs root and BPF (see [`bpf_available`]).
#[macro_export]
macro_rules! require_bpf {
    () => {
        if !$crate::bpf_available(module_path!()) {
            return;
        }
    };
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Compiles `tests/workloads/<name>.c` (or `.cc`) with the given flags into
/// the target directory and returns the program's path. Rebuilds only when the
/// source or flags change.
pub fn build_workload(name: &str, flags: &[&str]) -> PathBuf {
    let dir = workspace_root().join("tests/workloads");
    let (source, compiler) = if dir.join(format!("{name}.c")).exists() {
        (dir.join(format!("{name}.c")), "gcc")
    } else {
        (dir.join(format!("{name}.cc")), "g++")
    };
    assert!(source.exists(), "no workload source {}", source.display());
    let out_dir = target_dir().join("workloads");
    std::fs::create_dir_all(&out_dir).expect("create target/workloads");
    let tag: String = flags
        .iter()
        .flat_map(|f| f.chars())
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let out = out_dir.join(if tag.is_empty() {
        name.to_owned()
    } else {
        format!("{name}-{tag}")
    });
    let stamp = out.with_extension("flags");
    let wanted = flags.join(" ");
    // Newer than its source and the headers it may include.
    let inputs = std::fs::read_dir(&dir)
        .expect("list tests/workloads")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p == &source || p.extension().is_some_and(|e| e == "h"))
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok())
        .max();
    let fresh = out
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .zip(inputs)
        .is_some_and(|(built, newest)| built >= newest)
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    if !fresh {
        let status = Command::new(compiler)
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .args(["-lpthread", "-ldl"])
            .status()
            .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
        assert!(status.success(), "compiling {} failed", source.display());
        std::fs::write(&stamp, wanted).expect("write workload stamp");
    }
    out
}

/// A child process that is killed and reaped when dropped, with line-based
/// access to its stdin and stdout.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    /// Starts `cmd` with piped stdin and stdout (stderr is inherited).
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout lines until one equals `want` (panics at end of output).
    pub fn expect_line(&mut self, want: &str) {
        let stdout = self.stdout.as_mut().expect("stdout is piped");
        let mut line = String::new();
        loop {
            line.clear();
            let n = stdout.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "child exited before printing `{want}`");
            if line.trim_end() == want {
                return;
            }
        }
    }

    /// Reads one stdout line, without its newline (panics at end of output).
    pub fn read_line(&mut self) -> String {
        let stdout = self.stdout.as_mut().expect("stdout is piped");
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read child stdout");
        assert!(n > 0, "child exited before printing a line");
        line.trim_end().to_owned()
    }

    /// Writes one line to the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").expect("write child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Waits for the child to exit (at most `timeout`) and returns its
    /// remaining stdout and exit code.
    pub fn wait_output(mut self, timeout: Duration) -> (String, i32) {
        self.stdin.take();
        let mut rest = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            use std::io::Read as _;
            stdout.read_to_string(&mut rest).expect("read child stdout");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for child") {
                return (rest, status.code().unwrap_or(-1));
            }
            assert!(
                Instant::now() < deadline,
                "child did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the child maps a file whose path contains `needle`:
    /// right after exec only the loader and the executable are mapped, and
    /// a tool that reads the maps then finds no libc (panics after 10 s).
    pub fn wait_mapped(&self, needle: &str) {
        let maps = format!("/proc/{}/maps", self.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "pid {} did not map {needle} within 10 s",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `prof-bpf ARGS` with stdout piped and waits until its stderr says
/// it is attached (a line containing `marker`); returns the process and the
/// stderr lines seen so far. Later stderr is forwarded to this process's.
pub fn start_prof_bpf(args: &[&str], marker: &str) -> (Child, Vec<String>) {
    start_until(&prof_bpf(), args, marker)
}

/// [`start_prof_bpf`] for any program: starts `program ARGS` and waits for a
/// stderr line containing `marker`.
pub fn start_until(program: &Path, args: &[&str], marker: &str) -> (Child, Vec<String>) {
    let (child, seen, _) = start_following(program, args, marker);
    (child, seen)
}

/// [`start_until`], also returning the stderr lines that come later.
pub fn start_following(
    program: &Path,
    args: &[&str],
    marker: &str,
) -> (Child, Vec<String>, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start prof-bpf");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                // Keep draining so prof-bpf never blocks on a full pipe.
                continue;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(marker);
                seen.push(line);
                if done {
                    return (child, seen, rx);
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not print `{marker}` in time; stderr: {seen:#?}",
                    program.display()
                );
            }
        }
    }
}

/// Runs `prof-bpf ARGS` to completion and returns (stdout, stderr, exit code).
pub fn run_prof_bpf(args: &[&str]) -> (String, String, i32) {
    let out = Command::new(prof_bpf())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run prof-bpf");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Asserts the shape of a failed command: non-zero exit, exactly one line on
/// stderr that contains `needle`, and no panic or backtrace.
pub fn assert_one_line_error(stderr: &str, code: i32, needle: &str) {
    assert_ne!(code, 0, "expected a non-zero exit; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "stderr `{}` does not mention `{needle}`",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint: {stderr}"
    );
}

/// Starts bpftrace with `script` on `pid`; returns it once its probes are
/// attached (its BEGIN runs after every probe is attached).
pub fn start_bpftrace(script: &str, pid: u32) -> (Child, BufReader<ChildStdout>) {
    let script = format!("BEGIN {{ printf(\"attached\\n\"); }} {script}");
    let mut child = Command::new("bpftrace")
        .args(["-e", &script, "-p", &pid.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("running bpftrace");
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let status = child.wait();
        panic!("bpftrace has no stdout: {status:?}");
    };
    let mut out = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            let status = child.wait();
            panic!("bpftrace exited before attaching: {status:?}");
        }
        if line.trim() == "attached" {
            return (child, out);
        }
    }
}
