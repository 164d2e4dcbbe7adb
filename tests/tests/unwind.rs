//! The kernel-side user stack walker (issue 6): complete stacks of code
//! built without frame pointers, from a uprobe at malloc's entry (heap
//! profiles) and from CPU-clock samples (CPU profiles), through
//! `prof-bpf debug-unwind`, which runs the real walker with the real tables.
//!
//! Every workload has a call chain known by construction; a sample whose
//! first frame (which needs no unwinding) is the chain's leaf must show the
//! whole chain from `main`, and reach the outermost frame.
use std::{path::Path, process::Command};

use prof_bpf_tests::{Proc, build_workload, require_bpf, start_prof_bpf, workspace_root};

const NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];
/// Seconds the workloads run their chain.
const RUN_SECONDS: &str = "3";

/// One distinct stack printed by `debug-unwind`.
#[derive(Debug)]
struct Sample {
    count: u64,
    status: String,
    /// Symbol names, root first.
    frames: Vec<String>,
}

impl Sample {
    fn leaf(&self) -> &str {
        self.frames.last().map_or("", String::as_str)
    }
}

/// Runs `debug-unwind` on the workload while it runs its chain: attach,
/// send "go", wait for "done", and let debug-unwind symbolize while the
/// workload still lives.
fn profile(workload: &mut Proc, args: &[&str]) -> Vec<Sample> {
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let mut all = vec!["debug-unwind", "--pid", &pid, "--duration", "6"];
    all.extend_from_slice(args);
    let (prof, _) = start_prof_bpf(&all, "debug-unwind: attached");
    workload.send_line("go");
    workload.expect_line("done");
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "debug-unwind failed: {:?}\n{stdout}",
        out.status
    );
    stdout
        .lines()
        .filter(|line| {
            // Counters and program statistics.
            if line.starts_with("# ") {
                eprintln!("{line}");
            }
            !line.starts_with("# ")
        })
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let count = parts
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("bad line {line}"));
            let status = parts.next().unwrap_or_default().to_owned();
            let frames = parts
                .next()
                .unwrap_or_default()
                .split(';')
                .map(str::to_owned)
                .collect();
            Sample {
                count,
                status,
                frames,
            }
        })
        .collect()
}

/// `name` is the function `want` (C name, or C++ name with its signature).
fn is(name: &str, want: &str) -> bool {
    name == want
        || name
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('('))
}

/// Whether `frames` holds `chain` in order, each next function directly
/// called by the previous one when `contiguous`, otherwise possibly through
/// helpers in between (std::function, inlined templates).
fn has_chain(frames: &[String], chain: &[&str], contiguous: bool) -> bool {
    let Some(start) = frames.iter().position(|f| is(f, chain[0])) else {
        return false;
    };
    let mut at = start;
    for want in &chain[1..] {
        let next = frames[at + 1..].iter().position(|f| is(f, want));
        match next {
            Some(0) => at += 1,
            Some(skip) if !contiguous => at += 1 + skip,
            _ => return false,
        }
    }
    true
}

/// Asserts that at least 99% of the samples selected by `selected` are
/// complete, start at `root` (when given) and contain `chain`; a sample
/// whose first frame is itself a function of the chain (a CPU sample in a
/// caller's prologue or epilogue, say) must contain the chain down to it.
fn assert_chain(
    samples: &[Sample],
    selected: impl Fn(&Sample) -> bool,
    root: Option<&str>,
    chain: &[&str],
    contiguous: bool,
    min_samples: u64,
) {
    let total: u64 = samples
        .iter()
        .filter(|s| selected(s))
        .map(|s| s.count)
        .sum();
    let good = |s: &Sample| {
        let want = match chain.iter().position(|c| is(s.leaf(), c)) {
            Some(k) => &chain[..=k],
            None => chain,
        };
        s.status == "complete"
            && root.is_none_or(|r| s.frames.first().is_some_and(|f| is(f, r)))
            && has_chain(&s.frames, want, contiguous)
    };
    let ok: u64 = samples
        .iter()
        .filter(|s| selected(s) && good(s))
        .map(|s| s.count)
        .sum();
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| selected(s) && !good(s))
        .take(5)
        .collect();
    let callers: u64 = samples
        .iter()
        .filter(|s| selected(s) && !is(s.leaf(), chain[chain.len() - 1]))
        .map(|s| s.count)
        .sum();
    eprintln!("{ok} of {total} samples show the full chain ({callers} in callers of the leaf)");
    assert!(
        total >= min_samples,
        "only {total} samples (want >= {min_samples}): {samples:#?}"
    );
    assert!(
        ok as f64 >= 0.99 * total as f64,
        "only {ok} of {total} samples show the full chain {chain:?}; e.g. {bad:#?}"
    );
}

/// Whether the sample's first frame is one of the chain's functions.
fn in_chain(chain: &'static [&'static str]) -> impl Fn(&Sample) -> bool {
    move |s| chain.iter().any(|c| is(s.leaf(), c))
}

const C_CHAIN: &[&str] = &[
    "main", "level1", "level2", "level3", "level4", "level5", "leaf",
];
const CC_CHAIN: &[&str] = &[
    "main",
    "chain::level1",
    "chain::level2",
    "chain::level3",
    "chain::Level<4>::level",
    "chain::level5",
    "chain::leaf",
];

fn chain_workload(name: &str, mode: &str) -> Proc {
    Proc::spawn(Command::new(build_workload(name, NO_FP)).args([mode, RUN_SECONDS]))
}

#[test]
fn heap_stacks_of_c_without_frame_pointers() {
    require_bpf!();
    let mut w = chain_workload("unwind_chain", "alloc");
    let samples = profile(&mut w, &[]);
    assert_chain(
        &samples,
        |s| s.leaf() == "leaf",
        Some("_start"),
        C_CHAIN,
        true,
        10_000,
    );
}

#[test]
fn cpu_stacks_of_c_without_frame_pointers() {
    require_bpf!();
    let mut w = chain_workload("unwind_chain", "spin");
    let samples = profile(&mut w, &["--perf"]);
    assert_chain(
        &samples,
        in_chain(C_CHAIN),
        Some("_start"),
        C_CHAIN,
        true,
        100,
    );
}

/// A signal handler's stack continues, through the kernel's signal frame
/// and the `__restore_rt` trampoline, at the exact instruction the signal
/// interrupted (any instruction of the chain, prologues included).
#[test]
fn cpu_stacks_through_signal_frames() {
    require_bpf!();
    let mut w = chain_workload("unwind_chain", "signal");
    let samples = profile(&mut w, &["--perf"]);
    let in_handler = |s: &Sample| s.leaf() == "signal_leaf";
    let good = |s: &Sample| {
        let Some(p) = s.frames.iter().position(|f| f == "on_signal") else {
            return false;
        };
        // frames[p - 1] is the trampoline; before it the interrupted code.
        let interrupted = &s.frames[..p.saturating_sub(1)];
        let chain_ok = match interrupted
            .last()
            .and_then(|f| C_CHAIN.iter().position(|c| c == f))
        {
            Some(k) => has_chain(interrupted, &C_CHAIN[..=k], true),
            // Interrupted in main's loop, clock_gettime, ...
            None => interrupted.iter().any(|f| f == "main"),
        };
        s.status == "complete" && p >= 2 && s.frames[0] == "_start" && chain_ok
    };
    let total: u64 = samples
        .iter()
        .filter(|s| in_handler(s))
        .map(|s| s.count)
        .sum();
    let ok: u64 = samples
        .iter()
        .filter(|s| in_handler(s) && good(s))
        .map(|s| s.count)
        .sum();
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| in_handler(s) && !good(s))
        .take(5)
        .collect();
    eprintln!("{ok} of {total} signal-handler samples unwound through the signal frame");
    assert!(
        total >= 30,
        "only {total} samples in the handler: {samples:#?}"
    );
    assert!(
        ok as f64 >= 0.99 * total as f64,
        "only {ok} of {total}; e.g. {bad:#?}"
    );
}

#[test]
fn heap_stacks_of_cxx_without_frame_pointers() {
    require_bpf!();
    let mut w = Proc::spawn(Command::new(build_workload_cc()).args(["alloc", RUN_SECONDS]));
    let samples = profile(&mut w, &[]);
    // malloc's caller is libstdc++'s operator new, called from the chain's
    // leaf (through inlined make_unique / vector code).
    assert_chain(
        &samples,
        |s| s.leaf().starts_with("operator new"),
        Some("_start"),
        CC_CHAIN,
        false,
        10_000,
    );
}

#[test]
fn cpu_stacks_of_cxx_without_frame_pointers() {
    require_bpf!();
    let mut w = Proc::spawn(Command::new(build_workload_cc()).args(["spin", RUN_SECONDS]));
    let samples = profile(&mut w, &["--perf"]);
    assert_chain(
        &samples,
        in_chain(CC_CHAIN),
        Some("_start"),
        CC_CHAIN,
        false,
        100,
    );
}

/// The C++ chain workload (the .c of the same name takes precedence in
/// `build_workload`, so it is compiled under another name).
fn build_workload_cc() -> std::path::PathBuf {
    let src = workspace_root().join("tests/workloads/unwind_chain.cc");
    let out = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), std::path::PathBuf::from)
        .join("workloads/unwind_chain_cc");
    compile(&src, &out, "g++", NO_FP);
    out
}

fn compile(src: &Path, out: &Path, compiler: &str, flags: &[&str]) {
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status = Command::new(compiler)
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(status.success(), "compiling {} failed", src.display());
}

#[test]
fn heap_stacks_of_stripped_python() {
    require_bpf!();
    let python = Path::new("/usr/bin/python3.11");
    assert!(
        python.exists(),
        "python3.11 missing: run `cargo xtask setup`"
    );
    let script = workspace_root().join("tests/workloads/unwind_python.py");
    let mut w = Proc::spawn(Command::new(python).arg(&script).arg(RUN_SECONDS));
    let samples = profile(&mut w, &[]);
    // The stripped binary has no _start symbol and no main: the native chain
    // runs from Py_BytesMain through the interpreter loop to the allocator.
    assert_chain(
        &samples,
        |_| true,
        None,
        &["Py_BytesMain", "_PyEval_EvalFrameDefault"],
        false,
        1000,
    );
}

#[test]
fn heap_stacks_of_library_loaded_after_attach() {
    require_bpf!();
    let lib = build_workload(
        "unwind_dl_lib",
        &["-O2", "-g", "-fomit-frame-pointer", "-shared", "-fPIC"],
    );
    let exe = build_workload("unwind_dlopen", NO_FP);
    let mut w = Proc::spawn(Command::new(exe).arg(&lib).arg(RUN_SECONDS));
    let samples = profile(&mut w, &[]);
    assert_chain(
        &samples,
        |s| s.leaf() == "dl_leaf",
        Some("_start"),
        &["main", "call_lib", "dl_level1", "dl_level2", "dl_leaf"],
        true,
        1000,
    );
}

/// The control for the tests above: without tables the walker follows
/// frame pointers, which this workload does not keep, so the chain is lost
/// while the first frame (read at malloc's entry) is still the caller.
#[test]
fn frame_pointers_alone_lose_the_chain() {
    require_bpf!();
    let mut w = chain_workload("unwind_chain", "alloc");
    let samples = profile(&mut w, &["--fp-only"]);
    let leaf: u64 = samples
        .iter()
        .filter(|s| s.leaf() == "leaf")
        .map(|s| s.count)
        .sum();
    assert!(
        leaf >= 10_000,
        "only {leaf} samples with the direct caller first"
    );
    let full: u64 = samples
        .iter()
        .filter(|s| {
            s.leaf() == "leaf" && s.status == "complete" && has_chain(&s.frames, C_CHAIN, true)
        })
        .map(|s| s.count)
        .sum();
    // -fomit-frame-pointer: frame pointers cannot give the chain.
    assert!(
        full * 100 < leaf,
        "{full} of {leaf} frame-pointer stacks show the full chain"
    );
}
