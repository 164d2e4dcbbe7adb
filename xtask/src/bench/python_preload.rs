//! `cargo xtask bench python`'s preload cell: what Python frames cost
//! HEAPPROFILE under `LD_PRELOAD=libprofalloc.so` (release build), on an
//! allocation-heavy workload (`tests/workloads/python_alloc_heavy.py`:
//! 2,000,000 bytearrays of 2 KiB through malloc, three Python frames deep).
//!
//! Per interpreter and sampling rate, the median CPU time (user and
//! system, the configurations taking turns) of
//! - glibc's malloc, no profiling;
//! - libprofalloc.so with HEAPPROFILE and `PROFALLOC_PYTHON=0` (native
//!   stacks only);
//! - the same with Python frames (the default);
//!
//! then the ratio of the last two, the walks the final dump counts (its
//! `python stack walks` comment, as `prof-bpf report` shows it), those that
//! read through the kernel, and the cost per walk: the time difference
//! over the walks.
//!
//! Then the always-on case, no HEAPPROFILE: the sampled live heap keeps
//! each sample's Python stack (code addresses, nothing named), against
//! `PROFALLOC_PYTHON=0` and against the live heap off.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

const RUNS: usize = 5;
/// The workload's bytearrays: 2,000,000 of 2 KiB, about 4 GB (runs of
/// about a second: long enough to stand out of a shared machine's noise).
const ITERATIONS: &str = "2000000";
/// The default sampling (512 KiB, about 8,000 stacks a run) and a denser
/// one (64 KiB, about 62,000) that makes the cost per walk measurable.
const RATES: [(&str, &str); 2] = [("512 KiB", "524288"), ("64 KiB", "65536")];

pub fn run(prof_bpf: &Path, pythons: &[(&str, PathBuf)]) -> anyhow::Result<()> {
    let lib = util::target_dir().join("release/libprofalloc.so");
    let script = util::root().join("tests/workloads/python_alloc_heavy.py");
    let dir = std::env::temp_dir().join(format!("bench-python-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "== preload: HEAPPROFILE on {} ({RUNS} runs, medians)",
        script.file_name().unwrap_or_default().to_string_lossy()
    );
    println!(
        "{:<13} {:>9} {:>10} {:>17} {:>16} {:>7} {:>8} {:>8} {:>10}",
        "interpreter",
        "sampling",
        "glibc ms",
        "native-only ms",
        "with python ms",
        "ratio",
        "walks",
        "kernel",
        "ns/walk"
    );
    let (off_dir, on_dir) = (dir.join("off"), dir.join("on"));
    for (label, python) in pythons {
        for (rate_label, rate) in RATES {
            std::fs::create_dir_all(&off_dir)?;
            std::fs::create_dir_all(&on_dir)?;
            let env = |dir: &Path, python_frames: &'static str| {
                vec![
                    ("LD_PRELOAD", lib.to_string_lossy().into_owned()),
                    ("HEAPPROFILE", dir.join("p").to_string_lossy().into_owned()),
                    ("PROFALLOC_SAMPLE_BYTES", rate.to_owned()),
                    ("PROFALLOC_PYTHON", python_frames.to_owned()),
                ]
            };
            let ms = median_cpu_ms(
                python,
                &script,
                &[vec![], env(&off_dir, "0"), env(&on_dir, "1")],
            )?;
            let (glibc, off, on) = (ms[0], ms[1], ms[2]);
            let (walks, kernel) = walks_in(prof_bpf, &last_dump(&on_dir)?)?;
            std::fs::remove_dir_all(&off_dir)?;
            std::fs::remove_dir_all(&on_dir)?;
            println!(
                "{label:<13} {rate_label:>9} {glibc:>10.0} {off:>17.0} {on:>16.0} {:>6.2}x {walks:>8} {kernel:>8} {:>10.0}",
                on / off,
                if walks > 0 {
                    (on - off) * 1e6 / walks as f64
                } else {
                    0.0
                },
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nratio: with Python frames over native stacks only; kernel: walks that read through \
         the kernel (the others read only pages kept from the thread's earlier walks); ns/walk: \
         the difference over the walks of one run (Python stack walk, naming, splice)"
    );
    live_heap(pythons, &lib, &script)
}

/// The always-on sampler's live heap with and without Python stacks.
fn live_heap(pythons: &[(&str, PathBuf)], lib: &Path, script: &Path) -> anyhow::Result<()> {
    println!(
        "\n== preload, nothing else set: the live heap's Python stacks at the default 512 KiB ({RUNS} runs, medians)"
    );
    println!(
        "{:<13} {:>14} {:>17} {:>16} {:>12} {:>12}",
        "interpreter", "live off ms", "native-only ms", "with python ms", "vs native", "vs off"
    );
    for (label, python) in pythons {
        let env = |vars: &[(&'static str, &str)]| {
            let mut env = vec![("LD_PRELOAD", lib.to_string_lossy().into_owned())];
            env.extend(vars.iter().map(|&(k, v)| (k, v.to_owned())));
            env
        };
        let ms = median_cpu_ms(
            python,
            script,
            &[
                env(&[("PROFALLOC_LIVE_HEAP_BYTES", "0")]),
                env(&[("PROFALLOC_PYTHON", "0")]),
                env(&[]),
            ],
        )?;
        let (off, native, with) = (ms[0], ms[1], ms[2]);
        println!(
            "{label:<13} {off:>14.0} {native:>17.0} {with:>16.0} {:>+11.2}% {:>+11.2}%",
            100.0 * (with - native) / native,
            100.0 * (with - off) / off
        );
    }
    Ok(())
}

/// The median CPU time (user and system) of the workload under each of
/// `envs`, in ms: the configurations take turns, run after run, so that
/// the load of a shared machine weighs on all of them alike.
fn median_cpu_ms(
    python: &Path,
    script: &Path,
    envs: &[Vec<(&str, String)>],
) -> anyhow::Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(RUNS); envs.len()];
    for _ in 0..RUNS {
        for (env, times) in envs.iter().zip(&mut times) {
            let child = Command::new(python)
                .arg(script)
                .arg(ITERATIONS)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", python.display()))?;
            let usage = measure::wait_usage(child.id())
                .with_context(|| format!("{} {}", python.display(), script.display()))?;
            times.push(usage.cpu_seconds * 1e3);
        }
    }
    Ok(times.iter_mut().map(|t| measure::median(t)).collect())
}

/// The last run's exit dump: the highest-numbered one.
fn last_dump(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "heap"))
        .collect();
    dumps.sort();
    dumps
        .pop()
        .with_context(|| format!("no heap dump in {}", dir.display()))
}

/// The walks counted in a dump's `python stack walks` comment, and those
/// of them that read through the kernel (the others read only pages kept
/// from earlier walks).
fn walks_in(prof_bpf: &Path, dump: &Path) -> anyhow::Result<(u64, u64)> {
    let text = util::output(
        Command::new(prof_bpf).arg("report").arg(dump),
        "prof-bpf report",
    )?;
    let Some(counters) = text
        .lines()
        .find_map(|l| l.strip_prefix("Note: python stack walks (in-process): "))
    else {
        bail!("{}: no Python walk counters", dump.display());
    };
    let number_before = |what: &str| -> Option<u64> {
        let head = &counters[..counters.find(what)?];
        head.rsplit([' ', ','])
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    let walks = counters.split(' ').next().and_then(|n| n.parse().ok());
    let kernel = number_before(" read through the kernel");
    walks
        .zip(kernel)
        .with_context(|| format!("{}: `{counters}`", dump.display()))
}
