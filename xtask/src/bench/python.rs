//! `cargo xtask bench python`: the cost of CPU profiling a Python process,
//! prof-bpf next to py-spy at the same rate (99 Hz), on Debian's python3.11
//! and pyenv's 3.12.1 and 3.13.0; first, the cost of Python frames in
//! preload mode ([`super::python_preload`]).
//!
//! Each profiler samples the same kind of process
//! (`tests/workloads/python_cpu_split.py`, one busy thread) for a measured
//! window after a warm-up. Reported per interpreter:
//! - agent CPU: user + system CPU of the profiler process per wall second
//!   (py-spy does all its work there: it reads the target's memory with
//!   process_vm_readv at each sample);
//! - BPF: prof-bpf's perf-event program run time per wall second, and per
//!   run (native CFI walk plus Python frame walk, from the kernel's BPF
//!   statistics; runs of other processes' samples, filtered out early, are
//!   included);
//! - total: the two together, the CPU prof-bpf costs the host.
//!
//! Then the heap side: see [`super::python_pymalloc`].
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

const RATE: &str = "99";
const WARM_UP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(10);
/// py-spy as `cargo xtask setup` installs it.
const PY_SPY: &str = "/var/cache/prof-bpf-tools/venv/bin/py-spy";

struct Cost {
    agent: f64,
    /// (BPF seconds per wall second, ns per program run).
    bpf: Option<(f64, f64)>,
}

pub fn run() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("the python benchmark loads BPF programs: run it as root");
    }
    util::build_release()?;
    let prof_bpf = util::root().join("target/release/prof-bpf");
    let script = util::root().join("tests/workloads/python_cpu_split.py");
    let _stats = super::cpu::BpfStats::enable();
    let pythons = [
        ("Debian 3.11", PathBuf::from("/usr/bin/python3.11")),
        ("pyenv 3.12.1", pyenv("3.12.1", "3.12")),
        ("pyenv 3.13.0", pyenv("3.13.0", "3.13")),
    ];
    super::python_preload::run(&prof_bpf, &pythons)?;
    println!("\n== CPU sampling at {RATE} Hz, prof-bpf next to py-spy");
    println!(
        "{:<13} {:>16} {:>12} {:>12} {:>16} {:>14} {:>8}",
        "interpreter",
        "prof-bpf agent%",
        "BPF%",
        "BPF ns/run",
        "prof-bpf total%",
        "py-spy CPU%",
        "ratio"
    );
    for (label, python) in pythons {
        let ours = measure_prof_bpf(&prof_bpf, &python, &script)?;
        let theirs = measure_py_spy(&python, &script)?;
        let (bpf, per_run) = ours.bpf.unwrap_or((0.0, 0.0));
        let total = ours.agent + bpf;
        println!(
            "{label:<13} {:>16.3} {:>12.3} {:>12.0} {:>16.3} {:>14.3} {:>7.2}x",
            ours.agent * 100.0,
            bpf * 100.0,
            per_run,
            total * 100.0,
            theirs.agent * 100.0,
            if theirs.agent > 0.0 {
                total / theirs.agent
            } else {
                0.0
            },
        );
    }
    println!(
        "\n%: percent of one core over the measured window; ratio: prof-bpf total over py-spy \
         (both at {RATE} Hz, py-spy --nonblocking)"
    );
    super::python_pymalloc::run(&prof_bpf)?;
    Ok(())
}

fn pyenv(version: &str, minor: &str) -> PathBuf {
    PathBuf::from(format!("/root/.pyenv/versions/{version}/bin/python{minor}"))
}

/// A busy Python process, once it runs.
fn start_workload(python: &Path, script: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(python)
        .arg(script)
        .arg("120")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the workload printed `{}`", line.trim());
    }
    Ok(child)
}

fn measure_prof_bpf(prof_bpf: &Path, python: &Path, script: &Path) -> anyhow::Result<Cost> {
    let mut workload = start_workload(python, script)?;
    let pid = workload.id().to_string();
    let mut profiler = Command::new(prof_bpf)
        .args([
            "cpu",
            "--pid",
            &pid,
            "-F",
            RATE,
            "--format",
            "folded",
            "-o",
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting prof-bpf")?;
    let stderr = BufReader::new(profiler.stderr.take().context("stderr")?);
    let mut lines = stderr.lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("prof-bpf: sampling") => break,
            Some(_) => {}
            None => bail!("prof-bpf exited before sampling"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let cost = window(profiler.id(), true);
    stop(&mut profiler)?;
    let _ = workload.kill();
    let _ = workload.wait();
    cost
}

fn measure_py_spy(python: &Path, script: &Path) -> anyhow::Result<Cost> {
    let mut workload = start_workload(python, script)?;
    let pid = workload.id().to_string();
    let seconds = (WARM_UP + WINDOW + Duration::from_secs(2))
        .as_secs()
        .to_string();
    let mut spy = Command::new(PY_SPY)
        .args(["record", "--pid", &pid, "--rate", RATE, "--nonblocking"])
        .args(["--duration", &seconds, "--format", "raw", "-o", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting py-spy (cargo xtask setup installs it)")?;
    let cost = window(spy.id(), false);
    let _ = spy.wait();
    let _ = workload.kill();
    let _ = workload.wait();
    cost
}

/// The profiler's cost over the measured window, after the warm-up.
fn window(pid: u32, bpf: bool) -> anyhow::Result<Cost> {
    std::thread::sleep(WARM_UP);
    let cpu_before = measure::process_cpu_seconds(pid)?;
    let bpf_before = perf_program_stats(pid);
    let started = Instant::now();
    std::thread::sleep(WINDOW);
    let wall = started.elapsed().as_secs_f64();
    let agent = (measure::process_cpu_seconds(pid)? - cpu_before) / wall;
    let bpf = match (bpf, bpf_before, perf_program_stats(pid)) {
        (true, Some((ns0, runs0)), Some((ns1, runs1))) if runs1 > runs0 => Some((
            (ns1 - ns0) as f64 / 1e9 / wall,
            (ns1 - ns0) as f64 / (runs1 - runs0) as f64,
        )),
        _ => None,
    };
    Ok(Cost { agent, bpf })
}

fn stop(profiler: &mut Child) -> anyhow::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(profiler.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while profiler.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = profiler.kill();
            bail!("prof-bpf did not stop after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Run time (ns) and run count of the perf-event programs `pid` holds.
fn perf_program_stats(pid: u32) -> Option<(u64, u64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let (mut ns, mut runs, mut found) = (0, 0, false);
    for entry in dir.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        // BPF_PROG_TYPE_PERF_EVENT is 7.
        if !info
            .lines()
            .any(|l| l.split_whitespace().eq(["prog_type:", "7"]))
        {
            continue;
        }
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(t), Some(c)) = (field("run_time_ns:"), field("run_cnt:")) {
            ns += t;
            runs += c;
            found = true;
        }
    }
    found.then_some((ns, runs))
}
