//! Python frames in the agent's profiles: CPython 3.11 (Debian's), 3.12
//! and 3.13 (pyenv's, libpython shared) get their Python functions in
//! both CPU and heap profiles, against a CPU split by construction and
//! the bytes tracemalloc counted in the same process; and the heap a
//! process under libprofalloc.so holds from before the agent started is
//! named with the Python frames the allocator recorded.
#[path = "sinks/check.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod check;
#[path = "agent_support/run.rs"]
#[allow(dead_code, reason = "shared by the agent tests")]
mod run;
#[path = "sinks/wire.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod wire;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use check::Pprof;
use prof_bpf_tests::{Proc, profalloc_lib, require_bpf, workspace_root};
use run::{profiles, scratch, start_agent, stop_agent, wait_profile};

/// The interpreters: Debian's and pyenv's (installed by `cargo xtask setup`).
const PYTHONS: [(&str, &str); 3] = [
    ("3.11", "/usr/bin/python3.11"),
    ("3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12"),
    ("3.13", "/root/.pyenv/versions/3.13.0/bin/python3.13"),
];
/// Samples of heavy() and light() together before the split is judged.
const MIN_SAMPLES: i64 = 300;

fn workload(script: &str) -> PathBuf {
    workspace_root().join("tests/workloads").join(script)
}

/// Whether frame name `frame` is Python function `function`: pprof keeps
/// the qualified name apart from the file and line, text writes
/// `function (file.py:LINE)`.
fn is_function(frame: &str, function: &str) -> bool {
    frame == function || frame.starts_with(&format!("{function} ("))
}

/// Sum of sample type `ty` over the samples with a frame of `function`.
fn python_value(p: &Pprof, ty: &str, function: &str) -> i64 {
    let i = p.sample_types.iter().position(|t| t == ty).unwrap();
    p.samples
        .iter()
        .filter(|s| s.stack.split(';').any(|f| is_function(f, function)))
        .map(|s| s.values[i])
        .sum()
}

fn total(all: &[Pprof], ty: &str, function: &str) -> i64 {
    all.iter().map(|p| python_value(p, ty, function)).sum()
}

/// Within 3% of tracemalloc's bytes (the profile's are estimates).
fn assert_close(got: i64, want: i64, what: &str) {
    let slack = want as f64 * 0.03;
    assert!(
        (got - want).abs() as f64 <= slack,
        "{what}: got {got}, want {want} (tracemalloc)"
    );
}

#[test]
fn python_functions_in_cpu_and_heap_profiles_of_cpython_311_to_313() {
    require_bpf!();
    for (_, python) in PYTHONS {
        assert!(
            Path::new(python).exists(),
            "{python} is missing: run `cargo xtask setup`"
        );
    }
    // heavy() does 3 units of work for each 1 of light().
    let mut cpu: Vec<Proc> = PYTHONS
        .iter()
        .map(|(_, python)| {
            let mut w = Proc::spawn(
                Command::new(python)
                    .arg(workload("python_cpu_split.py"))
                    .arg("120"),
            );
            w.expect_line("ready");
            w
        })
        .collect();
    // Under libprofalloc.so: heap sampled in-process, by default.
    let mut heap: Vec<Proc> = PYTHONS
        .iter()
        .map(|(_, python)| {
            let mut w = Proc::spawn(
                Command::new(python)
                    .arg(workload("python_heap_split.py"))
                    .env("LD_PRELOAD", profalloc_lib())
                    .env("PROFALLOC_SAMPLE_BYTES", "4096"),
            );
            w.expect_line("ready");
            w
        })
        .collect();
    let dir = scratch("python");
    let pids: Vec<String> = cpu
        .iter()
        .chain(&heap)
        .map(|w| w.pid().to_string())
        .collect();
    let mut args = vec![
        "-F",
        "499",
        "--interval",
        "2",
        "--dir",
        dir.to_str().unwrap(),
    ];
    for pid in &pids {
        args.extend(["--pid", pid]);
    }
    let (agent, _) = start_agent(&args);
    let mut traced = Vec::new();
    for w in &mut heap {
        w.send_line("go");
        let done = w.read_line();
        let bytes: Vec<i64> = done
            .strip_prefix("done ")
            .unwrap_or_else(|| panic!("python_heap_split.py said {done}"))
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        traced.push(bytes);
    }
    for ((version, _), w) in PYTHONS.iter().zip(&cpu) {
        let all = wait_profile(&dir, w.pid(), "cpu", 0, |_| {
            total(&profiles(&dir, w.pid(), "cpu"), "samples", "heavy")
                + total(&profiles(&dir, w.pid(), "cpu"), "samples", "light")
                >= MIN_SAMPLES
        });
        let heavy = total(&all, "samples", "heavy") as f64;
        let light = total(&all, "samples", "light") as f64;
        let share = heavy / (heavy + light);
        assert!(
            (share - 0.75).abs() < 0.07,
            "Python {version}: heavy() has {share:.3} of heavy() and light(), want 0.75 \
             ({heavy} and {light} samples)"
        );
    }
    for (((version, _), w), bytes) in PYTHONS.iter().zip(&heap).zip(&traced) {
        let all = wait_profile(&dir, w.pid(), "heap", 0, |_| {
            total(
                &profiles(&dir, w.pid(), "heap"),
                "alloc_space",
                "keep_small",
            ) > 0
        });
        for (function, want) in [("keep_big", bytes[0]), ("keep_small", bytes[1])] {
            assert_close(
                total(&all, "alloc_space", function),
                want,
                &format!("Python {version}: {function} alloc_space"),
            );
            // Called by level4(), as Python ran it (stacks leaf first).
            let chained = all.iter().flat_map(|p| &p.samples).any(|s| {
                let frames: Vec<&str> = s.stack.split(';').collect();
                let at = |f: &str| frames.iter().position(|x| is_function(x, f));
                matches!((at(function), at("level4")), (Some(f), Some(l)) if f + 1 == l)
            });
            assert!(chained, "Python {version}: {function} not under level4");
        }
    }
    stop_agent(agent);
    for w in &mut cpu {
        w.signal(libc::SIGKILL);
    }
}

/// Whether `stack` (frame names, leaf first) holds the Python functions of
/// `chain` (leaf first) as consecutive frames.
fn has_chain(stack: &str, chain: &[&str]) -> bool {
    let frames: Vec<&str> = stack.split(';').collect();
    frames
        .windows(chain.len())
        .any(|w| w.iter().zip(chain).all(|(f, c)| is_function(f, c)))
}

/// preload_python_live.py keeps 500 bytearrays of 128 KiB from
/// remember <- handle <- serve <- <module> and frees as many from churn(),
/// under libprofalloc.so (sampled at a 64 KiB mean: about 6 in 7 kept
/// ones sampled, the estimate's standard error under 2%), before the agent
/// starts; then it allocates nothing. The agent's first heap profile of
/// each interpreter reads the allocator's live heap: the kept bytes under
/// that chain within 10% (as `heap --pid` in heap_live.rs), nothing of the
/// freed ones.
#[test]
fn the_heap_before_the_agent_started_has_its_python_frames() {
    require_bpf!();
    let keep = ["remember", "handle", "serve", "<module>"];
    let want: i64 = 500 * (128 * 1024 + 1);
    let live: Vec<Proc> = PYTHONS
        .iter()
        .map(|(_, python)| {
            let mut w = Proc::spawn(
                Command::new(python)
                    .arg(workload("preload_python_live.py"))
                    .env("LD_PRELOAD", profalloc_lib())
                    .env("PROFALLOC_SAMPLE_BYTES", "65536"),
            );
            w.expect_line("ready");
            w
        })
        .collect();
    let dir = scratch("python-live");
    let pids: Vec<String> = live.iter().map(|w| w.pid().to_string()).collect();
    let mut args = vec![
        "--no-cpu",
        "--interval",
        "1",
        "--dir",
        dir.to_str().unwrap(),
    ];
    for pid in &pids {
        args.extend(["--pid", pid]);
    }
    let (agent, _) = start_agent(&args);
    for ((version, _), w) in PYTHONS.iter().zip(&live) {
        let all = wait_profile(&dir, w.pid(), "heap", 0, |_| true);
        let first = &all[0];
        let i = first
            .sample_types
            .iter()
            .position(|t| t == "inuse_space")
            .unwrap();
        let held = |chain: &[&str]| -> i64 {
            first
                .samples
                .iter()
                .filter(|s| has_chain(&s.stack, chain))
                .map(|s| s.values[i])
                .sum()
        };
        let got = held(&keep);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(
            error < 0.10,
            "Python {version}: {keep:?} holds {got} bytes in the first heap profile, \
             true {want}: {first:#?}"
        );
        assert_eq!(
            held(&["churn", "handle"]),
            0,
            "Python {version}: freed bytes reported: {first:#?}"
        );
    }
    stop_agent(agent);
    // The agent's reads left the processes unharmed.
    for ((version, _), mut w) in PYTHONS.iter().zip(live) {
        w.send_line("quit");
        let (_, code) = w.wait_output(Duration::from_secs(30));
        assert_eq!(code, 0, "Python {version}: exit status");
    }
}
