//! `cargo xtask bench python`, heap part: the slowdown of a Python loop
//! that only makes small objects (`tests/workloads/python_small_objects.py`,
//! 200000 tuples and their ints) under `prof-bpf heap` with the malloc
//! probes only, with `--mmap`, and with `--pymalloc`, next to the loop
//! unprofiled, in the same run (median of a few runs each).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

const TUPLES: &str = "200000";
const RUNS: usize = 3;
/// The modes measured: (label, prof-bpf heap arguments; None: unprofiled).
const MODES: [(&str, Option<&[&str]>); 4] = [
    ("none", None),
    ("malloc", Some(&[])),
    ("--mmap", Some(&["--mmap"])),
    ("--pymalloc", Some(&["--pymalloc"])),
];

pub fn run(prof_bpf: &Path) -> anyhow::Result<()> {
    let pythons = [
        ("Debian 3.11", Path::new("/usr/bin/python3.11")),
        (
            "pyenv 3.12.1",
            Path::new("/root/.pyenv/versions/3.12.1/bin/python3.12"),
        ),
        (
            "pyenv 3.13.0",
            Path::new("/root/.pyenv/versions/3.13.0/bin/python3.13"),
        ),
    ];
    let script = util::root().join("tests/workloads/python_small_objects.py");
    println!(
        "\nheap profiling a loop that makes {TUPLES} small tuples (seconds, median of {RUNS}; \
         ratio to unprofiled)"
    );
    print!("{:<13}", "interpreter");
    for (mode, _) in MODES {
        print!(" {mode:>18}");
    }
    println!();
    for (label, python) in pythons {
        print!("{label:<13}");
        let mut base = 0.0;
        for (_, args) in MODES {
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                match grow_time(prof_bpf, python, &script, args) {
                    Ok(t) => times.push(t),
                    Err(err) => {
                        times.clear();
                        log_refusal(label, &err);
                        break;
                    }
                }
            }
            if times.is_empty() {
                print!(" {:>18}", "refused");
                continue;
            }
            let t = measure::median(&mut times);
            if args.is_none() {
                base = t;
                print!(" {t:>18.3}");
            } else {
                print!(" {:>18}", format!("{t:.3} ({:.1}x)", t / base));
            }
        }
        println!();
    }
    Ok(())
}

fn log_refusal(label: &str, err: &anyhow::Error) {
    eprintln!("{label}: {err:#}");
}

/// Seconds the workload takes to grow its list, profiled with `args`.
fn grow_time(
    prof_bpf: &Path,
    python: &Path,
    script: &Path,
    args: Option<&[&str]>,
) -> anyhow::Result<f64> {
    let mut workload = Command::new(python)
        .arg(script)
        .arg(TUPLES)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut out = BufReader::new(workload.stdout.take().context("stdout")?);
    expect(&mut out, "ready")?;
    let profiler = match args.map(|args| start_heap(prof_bpf, workload.id(), args)) {
        Some(Ok(profiler)) => Some(profiler),
        Some(Err(err)) => {
            let _ = workload.kill();
            let _ = workload.wait();
            return Err(err);
        }
        None => None,
    };
    let mut stdin = workload.stdin.take().context("stdin")?;
    let started = Instant::now();
    writeln!(stdin, "go")?;
    expect(&mut out, "grown")?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(mut profiler) = profiler {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(profiler.id() as i32, libc::SIGINT) };
        let _ = profiler.wait();
    }
    let _ = workload.kill();
    let _ = workload.wait();
    Ok(seconds)
}

/// `prof-bpf heap --pid PID ARGS`, once attached; its one-line error if it
/// refuses.
fn start_heap(prof_bpf: &Path, pid: u32, args: &[&str]) -> anyhow::Result<Child> {
    let pid = pid.to_string();
    let mut profiler = Command::new(prof_bpf)
        .args([
            "heap",
            "--pid",
            &pid,
            "--format",
            "folded",
            "-o",
            "/dev/null",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting prof-bpf")?;
    let mut lines = BufReader::new(profiler.stderr.take().context("stderr")?).lines();
    let mut last = String::from("prof-bpf heap exited before attaching");
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("prof-bpf: heap: attached") => break,
            Some(Ok(line)) => last = line,
            _ => {
                let _ = profiler.wait();
                bail!("{last}");
            }
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(profiler)
}

fn expect(out: &mut BufReader<ChildStdout>, want: &str) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("the workload exited before printing `{want}`");
        }
        if line.trim_end() == want {
            return Ok(());
        }
    }
}
