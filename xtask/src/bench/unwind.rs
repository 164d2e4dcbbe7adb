//! `cargo xtask bench unwind`: the kernel-side user stack walker on
//! workloads built without frame pointers (C and C++ with `-O2
//! -fomit-frame-pointer`, a Rust release build).
//!
//! For each workload, from a uprobe at malloc's entry and from 999 Hz
//! CPU-clock samples, with CFI tables and with frame pointers only (the
//! peer: what bcc and bpftrace do): the share of samples whose stack is
//! complete and reaches `main`; the in-kernel cost per event (kernel BPF
//! run-time statistics) and the workload's slowdown; the size of the tables
//! (the workload, libc, libstdc++ ...) and the time to build them on attach.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use prof_bpf_tests::{Proc, build_workload, start_until, workspace_root};

use crate::util;

/// Seconds each workload runs its chain per measurement.
const RUN_SECONDS: &str = "3";

struct Workload {
    name: &'static str,
    path: PathBuf,
}

/// One measurement: a workload, an event source, a walker.
#[derive(Default)]
struct Run {
    samples: u64,
    reaching_main: u64,
    calls: u64,
    prog_runs: u64,
    prog_ns: u64,
    table_bytes: u64,
    table_rows: u64,
    table_objects: u64,
    build_ms: f64,
}

pub fn run() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("the unwind benchmark loads BPF programs: run it as root");
    }
    util::build_release()?;
    let prof = util::release_artifact("prof-bpf");
    let workloads = build_workloads()?;
    let _stats = BpfStats::enable()?;

    println!("unwind benchmark: {RUN_SECONDS} s per run; stacks must be complete and contain main");
    println!(
        "ns/event: the BPF program's own run time (kernel.bpf_stats_enabled), without the \
         uprobe trap or perf interrupt around it; fp = frame pointers only, as bcc/bpftrace"
    );
    println!(
        "{:<6} {:<6} {:<5} {:>9} {:>9} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "lang",
        "event",
        "walk",
        "samples",
        "to main",
        "share",
        "ns/event",
        "calls/s",
        "objects",
        "tables",
        "build"
    );
    for w in &workloads {
        let plain = measure_plain(w)?;
        for (event, mode) in [("malloc", "alloc"), ("cpu", "spin")] {
            for walk in ["cfi", "fp"] {
                let r = measure(&prof, w, mode, event == "cpu", walk == "fp")?;
                let share = if r.samples == 0 {
                    0.0
                } else {
                    100.0 * r.reaching_main as f64 / r.samples as f64
                };
                let ns = if r.prog_runs == 0 {
                    0.0
                } else {
                    r.prog_ns as f64 / r.prog_runs as f64
                };
                let calls = r.calls as f64 / RUN_SECONDS.parse::<f64>()?;
                println!(
                    "{:<6} {:<6} {:<5} {:>9} {:>9} {:>7.2}% {:>10.0} {:>10.0} {:>9} {:>8.0}K {:>6.1}ms",
                    w.name,
                    event,
                    walk,
                    r.samples,
                    r.reaching_main,
                    share,
                    ns,
                    calls,
                    r.table_objects,
                    r.table_bytes as f64 / 1024.0,
                    r.build_ms
                );
                if event == "malloc" {
                    let slowdown = plain as f64 / r.calls.max(1) as f64;
                    println!(
                        "{:<19} malloc-loop slowdown vs plain run: {slowdown:.1}x ({} rows)",
                        "", r.table_rows
                    );
                }
            }
        }
    }
    python()?;
    big_objects(&prof)?;
    super::unwind_copy::run(&prof)?;
    Ok(())
}

/// Cold build of the rows of the biggest objects on this machine (rustc's
/// `librustc_driver` and `libLLVM`, Debian's `libLLVM-14`): time, rows per
/// second, kernel memory (8-byte rows in 8 MiB shards) and the rules the
/// walker cannot evaluate; the same report for the C library, the loader,
/// libstdc++ and libpython.
fn big_objects(prof: &Path) -> anyhow::Result<()> {
    let mut objects: Vec<PathBuf> = Vec::new();
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()?;
    let lib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    if let Ok(dir) = std::fs::read_dir(&lib) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("librustc_driver-") || name.starts_with("libLLVM.so") {
                objects.push(entry.path());
            }
        }
    }
    // With the libraries every program maps, whose rows must all be
    // supported.
    for lib in [
        "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    ] {
        if Path::new(lib).exists() {
            objects.push(lib.into());
        }
    }
    if objects.is_empty() {
        println!("big objects: none found");
        return Ok(());
    }
    // Cold: built, and stored in a fresh cache; warm: loaded from it.
    let cache = util::target_dir().join("bench-unwind-cache");
    let _ = std::fs::remove_dir_all(&cache);
    for (what, pass) in [
        (
            "cold build of the rows (one thread), stored in the cache",
            "cold",
        ),
        ("warm: the same rows loaded from the on-disk cache", "warm"),
    ] {
        let out = Command::new(prof)
            .arg("debug-unwind")
            .arg("--unwind-cache-dir")
            .arg(&cache)
            .arg("--cfi")
            .args(&objects)
            .output()
            .context("running debug-unwind --cfi")?;
        if !out.status.success() {
            bail!(
                "debug-unwind --cfi failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!("big objects, {what}; kernel memory of the rows");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rows) = field(line, "rows") else {
                if pass == "cold" {
                    println!("{line}");
                }
                continue;
            };
            let shards = rows.div_ceil(1 << 20);
            println!(
                "{pass} {line} row_bytes={:.1}MiB (in {shards} shards of 8 MiB)",
                rows as f64 * 8.0 / (1 << 20) as f64
            );
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

fn build_workloads() -> anyhow::Result<Vec<Workload>> {
    let flags = ["-O2", "-fomit-frame-pointer"];
    let dir = util::target_dir().join("workloads");
    std::fs::create_dir_all(&dir)?;
    let c = build_workload("unwind_chain", &flags);
    let cc = dir.join("unwind_chain_cc_bench");
    util::run(
        Command::new("g++")
            .args(flags)
            .arg("-o")
            .arg(&cc)
            .arg(workspace_root().join("tests/workloads/unwind_chain.cc")),
        "compiling unwind_chain.cc",
    )?;
    let rs = dir.join("unwind_chain_rs");
    util::run(
        Command::new("rustc")
            .args([
                "--edition",
                "2024",
                "-C",
                "opt-level=3",
                "-C",
                "debuginfo=1",
                "-o",
            ])
            .arg(&rs)
            .arg(workspace_root().join("tests/workloads/unwind_chain.rs")),
        "compiling unwind_chain.rs",
    )?;
    Ok(vec![
        Workload { name: "c", path: c },
        Workload {
            name: "c++",
            path: cc,
        },
        Workload {
            name: "rust",
            path: rs,
        },
    ])
}

/// Chain calls per run without any probe.
fn measure_plain(w: &Workload) -> anyhow::Result<u64> {
    let mut p = Proc::spawn(Command::new(&w.path).args(["alloc", RUN_SECONDS]));
    p.expect_line("ready");
    p.send_line("go");
    p.expect_line("done");
    let (rest, _) = p.wait_output(std::time::Duration::from_secs(10));
    calls(&rest)
}

fn calls(out: &str) -> anyhow::Result<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix("calls "))
        .and_then(|n| n.trim().parse().ok())
        .context("workload printed no `calls N` line")
}

fn measure(
    prof: &Path,
    w: &Workload,
    mode: &str,
    perf: bool,
    fp_only: bool,
) -> anyhow::Result<Run> {
    let mut p = Proc::spawn(Command::new(&w.path).args([mode, RUN_SECONDS]));
    p.expect_line("ready");
    let pid = p.pid().to_string();
    let mut args = vec!["debug-unwind", "--pid", &pid, "--duration", "6"];
    if perf {
        args.push("--perf");
    }
    if fp_only {
        args.push("--fp-only");
    }
    let (child, seen) = start_until(prof, &args, "debug-unwind: attached");
    p.send_line("go");
    p.expect_line("done");
    let out = child.wait_with_output().context("waiting for prof-bpf")?;
    if !out.status.success() {
        bail!("prof-bpf debug-unwind failed on {}", w.name);
    }
    let (rest, _) = p.wait_output(std::time::Duration::from_secs(10));
    let mut r = Run {
        calls: calls(&rest)?,
        ..Run::default()
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(comment) = line.strip_prefix("# program ") {
            r.prog_runs = field(comment, "run_count").unwrap_or(0);
            r.prog_ns = field(comment, "run_time_ns").unwrap_or(0);
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let n: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let status = parts.next().unwrap_or("");
        let frames = parts.next().unwrap_or("");
        r.samples += n;
        let has_main = frames
            .split(';')
            .any(|f| f == "main" || f.ends_with("::main"));
        if status == "complete" && has_main {
            r.reaching_main += n;
        }
    }
    // The table sizes are printed on stderr before the attach marker.
    for line in &seen {
        r.table_objects = field(line, "objects").unwrap_or(r.table_objects);
        r.table_rows = field(line, "rows").unwrap_or(r.table_rows);
        r.table_bytes = field(line, "bytes").unwrap_or(r.table_bytes);
        if let Some(ms) = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("build_ms="))
        {
            r.build_ms = ms.parse().unwrap_or(0.0);
        }
    }
    Ok(r)
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The stripped python3.11: malloc samples of a script allocating 1 MiB
/// buffers, complete from the allocator up to Py_BytesMain.
fn python() -> anyhow::Result<()> {
    let python = Path::new("/usr/bin/python3.11");
    if !python.exists() {
        println!("python3.11 not installed: skipped");
        return Ok(());
    }
    let prof = util::release_artifact("prof-bpf");
    let script = workspace_root().join("tests/workloads/unwind_python.py");
    let mut p = Proc::spawn(Command::new(python).arg(&script).arg(RUN_SECONDS));
    p.expect_line("ready");
    let pid = p.pid().to_string();
    let (child, seen) = start_until(
        &prof,
        &["debug-unwind", "--pid", &pid, "--duration", "6"],
        "debug-unwind: attached",
    );
    p.send_line("go");
    p.expect_line("done");
    let out = child.wait_with_output()?;
    let (mut samples, mut good) = (0u64, 0u64);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.splitn(3, ' ');
        let n: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let status = parts.next().unwrap_or("");
        let frames = parts.next().unwrap_or("");
        samples += n;
        if status == "complete"
            && frames.contains("Py_BytesMain")
            && frames.contains("_PyEval_EvalFrameDefault")
        {
            good += n;
        }
    }
    let tables = seen
        .iter()
        .find(|l| l.contains("tables"))
        .cloned()
        .unwrap_or_default();
    println!(
        "python3.11 malloc: {good} of {samples} samples complete up to Py_BytesMain ({:.2}%); {}",
        100.0 * good as f64 / samples.max(1) as f64,
        tables.trim_start_matches("debug-unwind: ")
    );
    drop(p);
    Ok(())
}

/// Turns on the kernel's BPF run-time statistics for the benchmark and
/// restores the previous setting afterwards.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS).context("reading bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("enabling BPF run-time statistics")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.previous.trim());
    }
}
