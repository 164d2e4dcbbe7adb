//! `cargo xtask bench heap`: the cost of heap profiling a malloc-heavy
//! workload (tests/workloads/heap_bench.c: several threads, mixed sizes),
//! all in one run: plain; `prof-bpf heap` tracking every allocation and
//! sampling (--sample-bytes 524288); bcc's memleak-bpfcc; and the floor, a
//! bpftrace probe set that only counts (malloc and free entry uprobes and a
//! malloc uretprobe). Prints slowdowns as ratios to the plain run and the
//! cost per traced call, then the agent's CPU and RSS (and its BPF maps'
//! kernel memory) while tracking 1 million live allocations.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use prof_bpf_tests::{Proc, build_workload, start_until};

use crate::{bench::measure, util};

const THREADS: &str = "4";
const ITERATIONS: &str = "200000";
const HOLD: u64 = 1_000_000;

pub fn run() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!(
            "the heap benchmark attaches uprobes: run it as root (sudo -E cargo xtask bench heap)"
        );
    }
    util::build_release()?;
    let prof = util::release_artifact("prof-bpf");
    let workload = build_workload(
        "heap_bench",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-fno-builtin"],
    );
    let libc = own_libc()?;
    let kernel_headers = measure::bcc_kernel_headers()?;
    // SAFETY: set before this process starts any thread; every tool inherits
    // them. memleak is Python: unbuffered, its "Attaching" line shows at once.
    unsafe {
        std::env::set_var("BCC_KERNEL_SOURCE", &kernel_headers);
        std::env::set_var("PYTHONUNBUFFERED", "1");
    }

    println!(
        "heap bench: {} threads x {} malloc/free steps, mixed sizes 16 B - 32 KiB",
        THREADS, ITERATIONS
    );
    let prof_s = prof.to_string_lossy().into_owned();
    let bpftrace_script = format!(
        "uprobe:{libc}:malloc {{ @m = count(); }} uprobe:{libc}:free {{ @f = count(); }} uretprobe:{libc}:malloc {{ @r = count(); }}"
    );
    type Tool<'a> = (&'a str, Option<(PathBuf, Vec<String>, &'a str)>);
    let tools: Vec<Tool> = vec![
        ("plain", None),
        (
            "bpftrace count (floor)",
            Some((
                PathBuf::from("bpftrace"),
                vec!["-p".into(), "{pid}".into(), "-e".into(), bpftrace_script],
                "Attaching",
            )),
        ),
        (
            "prof-bpf heap --sample-bytes 524288",
            Some((
                PathBuf::from(&prof_s),
                args(&[
                    "heap",
                    "--pid",
                    "{pid}",
                    "--sample-bytes",
                    "524288",
                    "--format",
                    "folded",
                    "-o",
                    "/dev/null",
                ]),
                "attached",
            )),
        ),
        (
            "prof-bpf heap (every allocation)",
            Some((
                PathBuf::from(&prof_s),
                args(&[
                    "heap",
                    "--pid",
                    "{pid}",
                    "--sample-bytes",
                    "0",
                    "--format",
                    "folded",
                    "-o",
                    "/dev/null",
                ]),
                "attached",
            )),
        ),
        (
            "memleak-bpfcc",
            Some((
                PathBuf::from("memleak-bpfcc"),
                args(&["-p", "{pid}", "60"]),
                "Attaching to pid",
            )),
        ),
    ];
    let mut plain_ns = 0f64;
    let mut floor = None;
    println!(
        "{:<38} {:>10} {:>10} {:>10} {:>14}",
        "run", "time (s)", "vs plain", "vs floor", "ns/traced call"
    );
    for (name, tool) in &tools {
        let result = run_once(&workload, tool.as_ref());
        let (ns, calls) = match result {
            Ok(r) => r,
            Err(err) => {
                println!("{name:<38} failed: {err:#}");
                continue;
            }
        };
        if tool.is_none() {
            plain_ns = ns;
        }
        if name.starts_with("bpftrace") {
            floor = Some(ns);
        }
        let per_call = if tool.is_some() && calls > 0.0 {
            format!("{:.0}", (ns - plain_ns) / calls)
        } else {
            "-".into()
        };
        println!(
            "{name:<38} {:>10.3} {:>9.1}x {:>10} {:>14}",
            ns / 1e9,
            ns / plain_ns,
            floor.map_or("-".to_owned(), |f| format!("{:.2}x", ns / f)),
            per_call
        );
    }
    println!(
        "note: prof-bpf places each uprobe on an instruction the kernel emulates (glibc's free: \
         on the `je` after its `test rdi, rdi`), where bpftrace and memleak probe the first \
         instruction, which the kernel single-steps out of line on every call"
    );
    hold_million(&prof, &workload)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// One run of the churn workload, optionally under a tool attached by pid.
/// Returns (elapsed ns of the workload's own loop, malloc+free calls).
fn run_once(
    workload: &Path,
    tool: Option<&(PathBuf, Vec<String>, &str)>,
) -> anyhow::Result<(f64, f64)> {
    let mut w = Proc::spawn(Command::new(workload).args(["churn", THREADS, ITERATIONS]));
    w.expect_line("ready");
    let mut attached: Option<Child> = None;
    if let Some((program, args, marker)) = tool {
        let pid = w.pid().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{pid}", &pid)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // bpftrace and memleak report on stdout: run them with stdout on
        // stderr, where start_until looks for the marker.
        let mut wrapped = vec![
            "-c",
            "exec \"$@\" 1>&2",
            "sh",
            program.to_str().context("tool path")?,
        ];
        wrapped.extend(args);
        let (child, _) = start_until(Path::new("/bin/sh"), &wrapped, marker);
        // bpftrace and memleak print their marker just before the probes are live.
        std::thread::sleep(Duration::from_secs(2));
        attached = Some(child);
    }
    w.send_line("go");
    let line = w.read_line();
    if let Some(mut child) = attached {
        interrupt(child.id());
        let _ = wait_timeout(&mut child, Duration::from_secs(60));
    }
    w.send_line("exit");
    let mut it = line.split_whitespace();
    let (Some("elapsed_ns"), Some(ns), Some("calls"), Some(calls)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        bail!("unexpected workload output `{line}`");
    };
    Ok((ns.parse()?, calls.parse()?))
}

/// prof-bpf tracking 1 million live allocations: its CPU time and RSS, and
/// the kernel memory of its BPF maps.
fn hold_million(prof: &Path, workload: &Path) -> anyhow::Result<()> {
    let mut w = Proc::spawn(Command::new(workload).args(["hold", &HOLD.to_string()]));
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let prof_s = prof.to_string_lossy().into_owned();
    let (mut agent, _) = start_until(
        Path::new(&prof_s),
        &[
            "heap",
            "--pid",
            &pid,
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "-o",
            "/dev/null",
        ],
        "attached",
    );
    w.send_line("go");
    w.expect_line("held");
    let cpu_before = measure::process_cpu_seconds(agent.id())?;
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let cpu = measure::process_cpu_seconds(agent.id())? - cpu_before;
    let rss = status_kib(agent.id(), "VmRSS:")?;
    let maps = bpf_map_kib(agent.id());
    println!(
        "agent tracking {HOLD} live allocations: CPU {:.1}% over {} s, RSS {:.1} MiB, BPF maps {:.1} MiB (kernel memlock)",
        cpu / window.as_secs_f64() * 100.0,
        window.as_secs(),
        rss as f64 / 1024.0,
        maps as f64 / 1024.0
    );
    interrupt(agent.id());
    let _ = wait_timeout(&mut agent, Duration::from_secs(120));
    w.send_line("exit");
    Ok(())
}

fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

/// Sum of the `memlock` of the BPF maps the process holds (fdinfo), in KiB.
fn bpf_map_kib(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut bytes = 0;
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        if let Some(v) = info.lines().find_map(|l| l.strip_prefix("memlock:")) {
            bytes += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    bytes / 1024
}

/// The C library this process maps (the workloads map the same one).
fn own_libc() -> anyhow::Result<String> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .map(str::to_owned)
        .context("no libc.so.6 in /proc/self/maps")
}

/// SIGINT, as Ctrl-C would send.
fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
