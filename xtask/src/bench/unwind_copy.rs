//! Part of `cargo xtask bench unwind`: stacks copied where no tables exist
//! yet, against `perf record --call-graph dwarf`, which copies every
//! sample's stack.
//!
//! Each run samples the whole host at 999 Hz with `prof-bpf cpu --all` and
//! one `perf record -a --call-graph dwarf,SIZE` at the same time, while a
//! cold `rustc -O` (no frame pointers, deep stacks, its 153 MB
//! `librustc_driver` without tables at first) compiles a crate. Reported per
//! tool: bytes of stack copied per second, and the share of rustc's samples
//! that are complete (nothing cut, the outermost frame starts the process or
//! a thread). perf's bytes are its data file's growth per second: the stack
//! dumps make most of it.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prof_bpf_tests::{big_rust_source, start_following};

/// Frames that start a process or a thread.
const THREAD_STARTS: &[&str] = &[
    "_start",
    "_dl_start_user",
    "clone3",
    "clone",
    "start_thread",
];
/// perf's default dump size and its largest.
const PERF_SIZES: [u32; 2] = [8192, 65528];

/// One tool's figures for one run.
struct Figures {
    bytes_per_s: f64,
    complete: u64,
    samples: u64,
}

impl Figures {
    fn share(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            100.0 * self.complete as f64 / self.samples as f64
        }
    }
}

/// `cargo xtask bench unwind copies`: this part alone.
pub fn run_alone() -> anyhow::Result<()> {
    if !crate::util::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    crate::util::build_release()?;
    run(&crate::util::release_artifact("prof-bpf"))
}

pub fn run(prof: &Path) -> anyhow::Result<()> {
    if Command::new("perf").arg("version").output().is_err() {
        println!("stack copies vs perf: perf not found, skipped");
        return Ok(());
    }
    let dir = scratch()?;
    println!(
        "stack copies vs perf --call-graph dwarf: whole host at 999 Hz while a cold `rustc -O` \
         compiles; complete = rustc samples reaching a thread start"
    );
    println!(
        "{:<26} {:>12} {:>10} {:>10}",
        "tool", "copied/s", "rustc", "complete"
    );
    for size in PERF_SIZES {
        let (ours, perf) = one_run(prof, &dir, size)?;
        for (name, f) in [
            ("prof-bpf cpu --all".to_owned(), ours),
            (format!("perf dwarf,{size}"), perf),
        ] {
            println!(
                "{name:<26} {:>10.1}MB {:>10} {:>9.2}%",
                f.bytes_per_s / 1e6,
                f.samples,
                f.share()
            );
        }
    }
    Ok(())
}

/// A scratch crate big enough for a few seconds of rustc and LLVM.
fn scratch() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("prof-bpf-bench-unwind-copy");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("big.rs"), big_rust_source())?;
    Ok(dir)
}

/// Both tools over one compile; perf with `size`-byte dumps.
fn one_run(prof: &Path, dir: &Path, size: u32) -> anyhow::Result<(Figures, Figures)> {
    let folded = dir.join("cpu.folded");
    let data = dir.join(format!("perf-{size}.data"));
    let (ours, _, later) = start_following(
        prof,
        &["cpu", "--all", "-F", "999", "-o", folded.to_str().unwrap()],
        "sampling",
    );
    let perf = Command::new("perf")
        .args(["record", "-a", "-F", "999", "-e", "cpu-clock", "-q"])
        .arg(format!("--call-graph=dwarf,{size}"))
        .arg("-o")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    // perf needs a moment to open its events on every CPU.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let status = Command::new("rustc")
        .args(["-O", "-C", "codegen-units=2", "big.rs", "-o", "big"])
        .current_dir(dir)
        .status()
        .context("running rustc")?;
    if !status.success() {
        bail!("rustc failed on the scratch crate");
    }
    let seconds = started.elapsed().as_secs_f64() + 1.0;
    let perf_bytes = stop(perf)?.then(|| std::fs::metadata(&data).map(|m| m.len()));
    let stderr = stop_output(ours, later)?;
    let copied = stderr
        .lines()
        .find_map(|l| l.split("bytes_copied ").nth(1))
        .and_then(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
        .context("prof-bpf printed no stack copy line")?;
    let (samples, complete) = folded_shares(&std::fs::read_to_string(&folded)?);
    let ours = Figures {
        bytes_per_s: copied as f64 / seconds,
        samples,
        complete,
    };
    let perf_bytes = perf_bytes.context("perf record failed")??;
    let (samples, complete) = perf_shares(&data)?;
    let _ = std::fs::remove_file(&data);
    let perf = Figures {
        bytes_per_s: perf_bytes as f64 / seconds,
        samples,
        complete,
    };
    Ok((ours, perf))
}

/// SIGINT, then waits: whether it exited cleanly (perf 6.1 exits with
/// 128 + SIGINT after writing its data file).
fn stop(mut child: Child) -> anyhow::Result<bool> {
    use std::os::unix::process::ExitStatusExt as _;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    Ok(status.success()
        || status.code() == Some(128 + libc::SIGINT)
        || status.signal() == Some(libc::SIGINT))
}

/// SIGINT, then prof-bpf's stderr lines after its start (`later`: the
/// reader thread's, which ends when prof-bpf closes its stderr).
fn stop_output(mut child: Child, later: Receiver<String>) -> anyhow::Result<String> {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    Ok(later.iter().collect::<Vec<_>>().join("\n"))
}

/// rustc's samples and the complete ones in folded stacks (root
/// `rustc-PID`, then the outermost frame).
fn folded_shares(text: &str) -> (u64, u64) {
    let (mut samples, mut complete) = (0, 0);
    for line in text.lines() {
        let Some((stack, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        if !frames[0].starts_with("rustc-") {
            continue;
        }
        // Folded values are nanoseconds; one sample is about 1 ms at 999 Hz.
        let n = value.parse::<u64>().unwrap_or(0) / 1_001_001;
        samples += n;
        let cut = frames.iter().any(|f| f.starts_with('['));
        if !cut && frames.get(1).is_some_and(|f| THREAD_STARTS.contains(f)) {
            complete += n;
        }
    }
    (samples, complete)
}

/// rustc's samples and the complete ones in a perf data file, as `perf
/// script` unwinds them (its last frame is the outermost).
fn perf_shares(data: &Path) -> anyhow::Result<(u64, u64)> {
    let out = Command::new("perf")
        .args(["script", "-F", "pid,comm,ip,sym", "--no-inline", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    Ok(script_shares(&String::from_utf8_lossy(&out.stdout)))
}

/// [`perf_shares`] on `perf script -F comm,pid,ip,sym` text: blocks of a
/// `comm pid` line and one `ip sym` line per frame. rustc names its threads
/// (`opt cgu.00`), so its processes are the pids seen with comm `rustc`.
fn script_shares(text: &str) -> (u64, u64) {
    let blocks: Vec<(Option<&str>, Option<&str>, Option<&str>)> = text
        .split("\n\n")
        .map(|block| {
            let mut lines = block.lines().filter(|l| !l.trim().is_empty());
            // The comm may hold spaces; the pid is the last word.
            let head = lines.next().unwrap_or("").trim();
            let (comm, pid) = match head.rsplit_once(char::is_whitespace) {
                Some((comm, pid)) => (Some(comm.trim()), Some(pid)),
                None => (None, None),
            };
            let outermost = lines.next_back().and_then(|l| l.split_whitespace().nth(1));
            (comm, pid, outermost)
        })
        .collect();
    let rustc: std::collections::HashSet<&str> = blocks
        .iter()
        .filter(|(comm, _, _)| *comm == Some("rustc"))
        .filter_map(|(_, pid, _)| *pid)
        .collect();
    let (mut samples, mut complete) = (0, 0);
    for (_, pid, outermost) in &blocks {
        if !pid.is_some_and(|p| rustc.contains(p)) {
            continue;
        }
        samples += 1;
        if outermost.is_some_and(|f| THREAD_STARTS.contains(&f)) {
            complete += 1;
        }
    }
    (samples, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_counts_rustc_samples_that_reach_a_thread_start() {
        let text = "rustc-1;_start;main;f 2002002\n\
                    rustc-1;[truncated];f 1001001\n\
                    rustc-1;g;f 1001001\n\
                    cc1-2;_start;main 5005005\n";
        assert_eq!(folded_shares(text), (4, 2));
    }

    #[test]
    fn perf_script_counts_every_thread_of_rustc() {
        let text = "rustc 7 \n\t 5631f42 f\n\t 1 _start\n\n\
                    opt cgu.00 7 \n\t 5631f42 f\n\t 2 clone3\n\n\
                    opt cgu.01 7 \n\t 5631f42 f\n\tffffffffffffffff [unknown]\n\n\
                    cc1 9 \n\t 1 _start\n";
        assert_eq!(script_shares(text), (3, 2));
    }
}
