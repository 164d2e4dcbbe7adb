//! `cargo xtask bench cpu`: the cost of whole-host CPU profiling.
//!
//! While two threads keep both CPUs busy with a fixed amount of work
//! (`tests/workloads/cpu_spin.c`), each profiler samples the whole host:
//! prof-bpf, `perf record -a -g -e cpu-clock`, and bcc's `profile-bpfcc`,
//! at 99 Hz and 999 Hz. Reported per run:
//! - agent CPU: user + system CPU seconds of the profiler process per wall
//!   second while the workload runs (its own work: reading, aggregating,
//!   writing; not the sampling interrupt, which the sampled task pays);
//! - BPF time: run time of the profiler's perf-event programs per wall
//!   second (from the kernel's BPF statistics; perf has no BPF program);
//! - slowdown: the workload's wall time over its time without a profiler,
//!   which includes everything sampling costs on the busy CPUs.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

/// Work per thread, in millions of iterations (about ten seconds per thread).
const WORK: &str = "4000";
/// Time from the start of sampling to the start of the measured window:
/// start-up work (attaching, the first unwind tables) is a one-off cost,
/// not the steady cost this benchmark reports.
const WARM_UP: Duration = Duration::from_secs(3);
const THREADS: &str = "2";
const FREQUENCIES: [u32; 2] = [99, 999];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    ProfBpf,
    Perf,
    Bcc,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::ProfBpf => "prof-bpf cpu",
            Tool::Perf => "perf record",
            Tool::Bcc => "profile-bpfcc",
        }
    }
}

struct Measured {
    tool: Tool,
    hz: u32,
    agent_cpu: f64,
    bpf_cpu: Option<f64>,
    slowdown: f64,
}

pub fn run() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("the cpu benchmark profiles the whole host: run it as root");
    }
    util::build_release()?;
    let prof_bpf = util::root().join("target/release/prof-bpf");
    let spin =
        prof_bpf_tests::build_workload("cpu_spin", &["-O2", "-g", "-fno-omit-frame-pointer"]);
    let headers = measure::bcc_kernel_headers()?;
    let scratch = util::root().join("target/bench-cpu");
    std::fs::create_dir_all(&scratch)?;
    let _stats = BpfStats::enable();

    let mut baselines = vec![run_workload(&spin)?];
    println!("baseline: workload {:.2} s", baselines[0]);
    let mut results = Vec::new();
    for hz in FREQUENCIES {
        for tool in [Tool::ProfBpf, Tool::Perf, Tool::Bcc] {
            let m = measure(tool, hz, &prof_bpf, &spin, &headers, &scratch, baselines[0])?;
            println!(
                "{:<14} {:>4} Hz: agent {:.4} CPU s/s, BPF {}, workload slowdown {:.3}x",
                tool.name(),
                hz,
                m.agent_cpu,
                m.bpf_cpu
                    .map_or("-".to_owned(), |b| format!("{b:.4} CPU s/s")),
                m.slowdown
            );
            results.push(m);
        }
    }
    baselines.push(run_workload(&spin)?);
    let baseline = baselines.iter().sum::<f64>() / baselines.len() as f64;
    println!(
        "\nbaselines {:.2?} s (mean {baseline:.2} s); slowdowns below use the mean\n",
        baselines
    );
    println!(
        "{:<14} {:>6} {:>14} {:>14} {:>10} {:>16}",
        "tool", "Hz", "agent CPU %", "BPF CPU %", "slowdown", "agent vs perf"
    );
    for m in &results {
        let perf = results
            .iter()
            .find(|p| p.tool == Tool::Perf && p.hz == m.hz)
            .map(|p| p.agent_cpu);
        let slowdown = m.slowdown * baselines[0] / baseline;
        println!(
            "{:<14} {:>6} {:>14.3} {:>14} {:>9.3}x {:>16}",
            m.tool.name(),
            m.hz,
            m.agent_cpu * 100.0,
            m.bpf_cpu
                .map_or("-".to_owned(), |b| format!("{:.3}", b * 100.0)),
            slowdown,
            match perf {
                Some(p) if p > 0.0 => format!("{:.2}x", m.agent_cpu / p),
                _ => "-".to_owned(),
            }
        );
    }
    println!(
        "\nagent CPU %: percent of one core used by the profiler process while 2 threads are busy"
    );
    println!("goal: prof-bpf under 1% at 99 Hz, and below perf at equal frequency");
    Ok(())
}

/// Runs the workload once and returns its wall time in seconds.
fn run_workload(spin: &Path) -> anyhow::Result<f64> {
    let mut child = Command::new(spin)
        .args([THREADS, WORK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cpu_spin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("cpu_spin printed `{}`", line.trim());
    }
    writeln!(child.stdin.take().context("stdin")?, "go")?;
    line.clear();
    stdout.read_line(&mut line)?;
    child.wait()?;
    line.trim()
        .strip_prefix("elapsed ")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("cpu_spin printed `{}`", line.trim()))
}

fn measure(
    tool: Tool,
    hz: u32,
    prof_bpf: &Path,
    spin: &Path,
    headers: &Path,
    scratch: &Path,
    baseline: f64,
) -> anyhow::Result<Measured> {
    let hz_arg = hz.to_string();
    let mut cmd = match tool {
        Tool::ProfBpf => {
            let mut c = Command::new(prof_bpf);
            c.args(["cpu", "--all", "-F", &hz_arg, "-o"])
                .arg(scratch.join(format!("prof-bpf-{hz}.pb.gz")));
            c
        }
        Tool::Perf => {
            let mut c = Command::new("perf");
            c.args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                &hz_arg,
                "-a",
                "-g",
                "-q",
                "-o",
            ])
            .arg(scratch.join(format!("perf-{hz}.data")));
            c
        }
        Tool::Bcc => {
            let mut c = Command::new("profile-bpfcc");
            c.args(["-F", &hz_arg, "-f"])
                .env("BCC_KERNEL_SOURCE", headers);
            c
        }
    };
    let mut profiler = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if tool == Tool::ProfBpf {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .with_context(|| format!("starting {}", tool.name()))?;
    wait_until_sampling(tool, &mut profiler)?;
    let pid = profiler.id();
    let cpu_before = measure::process_cpu_seconds(pid)?;
    let bpf_before = bpf_run_time(pid);
    let started = Instant::now();
    let elapsed = run_workload(spin)?;
    let wall = started.elapsed().as_secs_f64();
    let agent_cpu = (measure::process_cpu_seconds(pid)? - cpu_before) / wall;
    let bpf_cpu = match (bpf_before, bpf_run_time(pid)) {
        (Some(a), Some(b)) if tool != Tool::Perf => Some((b - a) / wall),
        _ => None,
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(120);
    while profiler.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = profiler.kill();
            bail!("{} did not stop after Ctrl-C", tool.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Measured {
        tool,
        hz,
        agent_cpu,
        bpf_cpu,
        slowdown: elapsed / baseline,
    })
}

/// Waits until the profiler is sampling: its perf events are open.
fn wait_until_sampling(tool: Tool, child: &mut Child) -> anyhow::Result<()> {
    let said_sampling = child.stderr.take().map(|stderr| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited before sampling ({status})", tool.name());
        }
        let ready = match &said_sampling {
            // prof-bpf's links hold its perf events without descriptors;
            // it says when it samples.
            Some(lines) => lines.try_iter().any(|l| l.contains("prof-bpf: sampling")),
            None => perf_event_fds(child.id()) >= cpus,
        };
        if ready {
            std::thread::sleep(WARM_UP);
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not start sampling in time", tool.name());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Number of perf-event descriptors the process holds (perf and bcc keep
/// one per CPU).
fn perf_event_fds(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("perf_event"))
        })
        .count()
}

/// Total run time in seconds of the perf-event BPF programs the process
/// holds (needs kernel.bpf_stats_enabled).
fn bpf_run_time(pid: u32) -> Option<f64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut total_ns = 0u64;
    let mut found = false;
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
        if let Some(ns) = info
            .lines()
            .find_map(|l| l.strip_prefix("run_time_ns:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            total_ns += ns;
            found = true;
        }
    }
    found.then_some(total_ns as f64 / 1e9)
}

/// Turns on the kernel's BPF run-time statistics for the benchmark and
/// restores the previous setting afterwards.
pub(super) struct BpfStats {
    previous: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> Self {
        let previous = std::fs::read_to_string(BPF_STATS).ok();
        if std::fs::write(BPF_STATS, "1").is_err() {
            eprintln!("note: could not enable {BPF_STATS}; BPF times will be missing");
        }
        Self { previous }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = &self.previous {
            let _ = std::fs::write(BPF_STATS, p.trim());
        }
    }
}
