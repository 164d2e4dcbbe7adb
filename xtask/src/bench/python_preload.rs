//! `cargo xtask bench python`'s preload cell: what Python frames cost
//! HEAPPROFILE under `LD_PRELOAD=libprofalloc.so` (release build), on an
//! allocation-heavy workload (`tests/workloads/python_alloc_heavy.py`:
//! 300,000 bytearrays of 2 KiB through malloc, three Python frames deep).
//!
//! Per interpreter and sampling rate, the median wall time of
//! - glibc's malloc, no profiling;
//! - libprofalloc.so with HEAPPROFILE and `PROFALLOC_PYTHON=0` (native
//!   stacks only);
//! - the same with Python frames (the default);
//!
//! then the ratio of the last two, the walks the final dump counts (its
//! `python stack walks` comment, as `prof-bpf report` shows it) and the
//! cost per walk: the time difference over the walks.
//!
//! Then the always-on case, no HEAPPROFILE: the sampled live heap keeps
//! each sample's Python stack (code addresses, nothing named), against
//! `PROFALLOC_PYTHON=0` and against the live heap off.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

const RUNS: usize = 5;
/// The default sampling (512 KiB, about 1,200 stacks a run) and a denser
/// one (64 KiB, about 9,400) that makes the cost per walk measurable.
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
        "{:<13} {:>9} {:>10} {:>17} {:>16} {:>7} {:>8} {:>10}",
        "interpreter",
        "sampling",
        "glibc ms",
        "native-only ms",
        "with python ms",
        "ratio",
        "walks",
        "ns/walk"
    );
    for (label, python) in pythons {
        let glibc = median_ms(python, &script, &[])?;
        for (rate_label, rate) in RATES {
            let prefix = dir.join("p");
            let prefix = prefix.to_string_lossy();
            let env = |python_frames: &'static str| {
                vec![
                    ("LD_PRELOAD", lib.to_string_lossy().into_owned()),
                    ("HEAPPROFILE", prefix.to_string()),
                    ("PROFALLOC_SAMPLE_BYTES", rate.to_owned()),
                    ("PROFALLOC_PYTHON", python_frames.to_owned()),
                ]
            };
            let off = median_ms(python, &script, &env("0"))?;
            clear(&dir)?;
            let on = median_ms(python, &script, &env("1"))?;
            let walks = walks_in(prof_bpf, &last_dump(&dir)?)?;
            clear(&dir)?;
            println!(
                "{label:<13} {rate_label:>9} {glibc:>10.0} {off:>17.0} {on:>16.0} {:>6.2}x {walks:>8} {:>10.0}",
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
        "\nratio: with Python frames over native stacks only; ns/walk: the difference over \
         the walks of one run (Python stack walk, naming, splice)"
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
        let off = median_ms(python, script, &env(&[("PROFALLOC_LIVE_HEAP_BYTES", "0")]))?;
        let native = median_ms(python, script, &env(&[("PROFALLOC_PYTHON", "0")]))?;
        let with = median_ms(python, script, &env(&[]))?;
        println!(
            "{label:<13} {off:>14.0} {native:>17.0} {with:>16.0} {:>+11.2}% {:>+11.2}%",
            100.0 * (with - native) / native,
            100.0 * (with - off) / off
        );
    }
    Ok(())
}

/// The median wall time of the workload, in ms.
fn median_ms(python: &Path, script: &Path, env: &[(&str, String)]) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let child = Command::new(python)
            .arg(script)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        measure::wait_usage(child.id())
            .with_context(|| format!("{} {}", python.display(), script.display()))?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(measure::median(&mut times))
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

fn clear(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        std::fs::remove_file(e?.path())?;
    }
    Ok(())
}

/// The walks counted in a dump's `python stack walks` comment.
fn walks_in(prof_bpf: &Path, dump: &Path) -> anyhow::Result<u64> {
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
    counters
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{}: `{counters}`", dump.display()))
}
