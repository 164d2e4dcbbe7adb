//! The Python frames of libprofalloc.so's live heap, named by
//! `heap --pid` from the process's memory when it attaches: the allocator
//! recorded each sample's Python stack (code objects and offsets, with a
//! check of each code object) long before. Known by construction:
//! preload_python_live.py's bytearrays under their Python chain, and
//! python_code_freed.py's, whose code objects were freed before the attach.
use std::{collections::HashMap, process::Command, time::Duration};

use heap_support::*;
use prof_bpf_tests::{Proc, profalloc_lib, require_bpf, start_prof_bpf, workspace_root};

mod heap_support;

const PYTHONS: [&str; 3] = [
    "/usr/bin/python3.11",
    "/root/.pyenv/versions/3.12.1/bin/python3.12",
    "/root/.pyenv/versions/3.13.0/bin/python3.13",
];

/// `function (script:LINE)` of the line of `script` holding `marker`.
fn python_frame(function: &str, script: &str, marker: &str) -> String {
    let path = workspace_root().join("tests/workloads").join(script);
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().position(|l| l.contains(marker)).unwrap() + 1;
    format!("{function} ({script}:{line})")
}

/// Sum of the stacks that hold `chain` (outermost first) consecutively.
fn chain_total(stacks: &[Stack], chain: &[String]) -> i64 {
    stacks
        .iter()
        .filter(|s| s.frames.windows(chain.len()).any(|w| w == chain))
        .map(|s| s.value)
        .sum()
}

/// A Python program under libprofalloc.so keeps 500 bytearrays of 128 KiB
/// (sampled at a 64 KiB mean, so about 6 in 7 are sampled: the estimate's
/// standard error is under 2%) and frees as many, before anything
/// attaches. `heap --pid` attached for a moment reports the kept ones
/// under their Python chain, named from the allocator's live heap, within
/// 10% of their size, and nothing of the freed ones.
#[test]
fn python_frames_of_the_heap_before_the_attach_are_named() {
    require_bpf!();
    let script = "preload_python_live.py";
    let keep = [
        python_frame("<module>", script, "MODULE-CALL"),
        python_frame("serve", script, "SERVE-CALL"),
        python_frame("handle", script, "HANDLE-CALL"),
        python_frame("remember", script, "KEEP-SITE"),
    ];
    let churn = python_frame("churn", script, "CHURN-SITE");
    let want = 500 * (128 * 1024 + 1);
    let dir = std::env::temp_dir().join(format!("heap-live-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for python in PYTHONS {
        let (stacks, folded, mut w) = attach_once(python, script, &dir);
        let got = chain_total(&stacks, &keep);
        let error = (got - want).abs() as f64 / want as f64;
        assert!(
            error < 0.10,
            "{python}: {keep:?} estimated {got}, true {want}: {folded}"
        );
        let freed: i64 = stacks
            .iter()
            .filter(|s| s.frames.contains(&churn))
            .map(|s| s.value)
            .sum();
        assert_eq!(freed, 0, "{python}: freed bytes reported: {folded}");
        w.send_line("quit");
        let (_, code) = w.wait_output(Duration::from_secs(30));
        assert_eq!(code, 0, "{python}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mean sampling distance the Python workloads run with.
const SAMPLE_BYTES: i64 = 65536;

/// Spawns `script` under `python` with libprofalloc.so, waits for its
/// "ready", attaches `heap --pid` for a moment and returns the in-use
/// stacks and the workload (waiting for a line).
fn attach_once(python: &str, script: &str, dir: &std::path::Path) -> (Vec<Stack>, String, Proc) {
    let mut w = Proc::spawn(
        Command::new(python)
            .arg(workspace_root().join("tests/workloads").join(script))
            .env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", SAMPLE_BYTES.to_string()),
    );
    w.expect_line("ready");
    let name = python.rsplit('/').next().unwrap();
    let file = dir.join(format!("{name}.pb.gz"));
    let file = file.to_string_lossy().into_owned();
    let pid = w.pid().to_string();
    let (prof, _) = start_prof_bpf(&["heap", "--pid", &pid, "-o", &file], ATTACHED);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success(), "{python}");
    let folded = report_folded(&file, "inuse_space");
    (parse_folded(&folded), folded, w)
}

/// python_code_freed.py keeps 40 bytearrays of 128 KiB, each from its own
/// function `make_i`, compiled by `exec` and freed (with its code object
/// and its names) before the next one is compiled, so the next code
/// objects are most likely at the same addresses. By the attach no code
/// object of those frames lives: each frame must show as freed (or
/// unreadable), never under another code's name. Named after the code at
/// its address now, every sample would be `make_39`'s (or garbage).
/// Each sampled object weighs about `size / (1 - exp(-size / mean))`; a
/// name that carries more than 1.5 of those names objects that were not
/// its own. The 40 together are within 20% of their size (about 6 in 7
/// are sampled: a standard error near 6%).
#[test]
fn frames_of_freed_code_objects_are_not_named_after_their_successors() {
    require_bpf!();
    let script = "python_code_freed.py";
    let site = python_frame("<module>", script, "EXEC-SITE");
    let size = 128 * 1024 + 1;
    let one = size as f64 / (1.0 - (-(size as f64) / SAMPLE_BYTES as f64).exp());
    let dir = std::env::temp_dir().join(format!("heap-live-freed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for python in PYTHONS {
        let (stacks, folded, mut w) = attach_once(python, script, &dir);
        let through_site: Vec<&Stack> =
            stacks.iter().filter(|s| s.frames.contains(&site)).collect();
        let total: i64 = through_site.iter().map(|s| s.value).sum();
        let want = 40 * size;
        let error = (total - want).abs() as f64 / want as f64;
        assert!(
            error < 0.20,
            "{python}: {total} under {site}, true {want}: {folded}"
        );
        let mut by_name: HashMap<&str, i64> = HashMap::new();
        for s in &through_site {
            for f in s.frames.iter().filter(|f| is_make_frame(f)) {
                *by_name.entry(f.as_str()).or_default() += s.value;
            }
        }
        for (name, bytes) in &by_name {
            assert!(
                (*bytes as f64) < 1.5 * one,
                "{python}: {name} carries {bytes} bytes, one sampled object weighs {one:.0}: \
                 frames named after another code object: {folded}"
            );
        }
        let freed = through_site
            .iter()
            .filter(|s| s.frames.iter().any(|f| f == "[python code freed]"))
            .count();
        eprintln!(
            "{python}: {} stacks under the exec site, {freed} with freed code, {} named make_<i>",
            through_site.len(),
            by_name.len()
        );
        w.send_line("quit");
        let (_, code) = w.wait_output(Duration::from_secs(30));
        assert_eq!(code, 0, "{python}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `frame` is a Python frame of one of python_code_freed.py's
/// functions, `make_<i> (<make_<i>>:LINE)` (not a native `make_type`).
fn is_make_frame(frame: &str) -> bool {
    let Some((name, _)) = frame.split_once(" (") else {
        return false;
    };
    name.strip_prefix("make_")
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}
