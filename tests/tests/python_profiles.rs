//! Python frames in the kernel-collected profiles (`prof-bpf cpu`), on
//! Debian's stripped /usr/bin/python3.11 and pyenv's shared 3.12 and 3.13.
//! Oracles: the workload's CPU split (3:1 by construction, lines found in
//! its source) and py-spy recording the same process at the same time.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use prof_bpf_tests::{
    Proc, parse_folded, require_bpf, run_prof_bpf, start_prof_bpf, workspace_root,
};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const PYENV: &str = "/root/.pyenv/versions";
/// py-spy as `cargo xtask setup` installs it (see `xtask/src/setup.rs`).
const PY_SPY: &str = "/var/cache/prof-bpf-tools/venv/bin/py-spy";
const SCRIPT: &str = "python_cpu_split.py";
/// Sampling rate of both profilers and how long they record.
const RATE: &str = "499";
const SECONDS: &str = "5";

fn pyenv_python(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new(PYENV).join(format!("{version}/bin/python{minor}"))
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-python-profiles-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn script() -> PathBuf {
    workspace_root().join("tests/workloads").join(SCRIPT)
}

/// The line of the first source line that contains `needle`.
fn line_of(needle: &str) -> u32 {
    let source = std::fs::read_to_string(script()).unwrap();
    let at = source
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` is not in {SCRIPT}"));
    u32::try_from(at + 1).unwrap()
}

/// The workload's Python frames of a stack, root first, as py-spy writes
/// them (`qualname (file.py:LINE)`).
fn python_chain(frames: &[String]) -> Vec<String> {
    python_chain_of(frames, SCRIPT)
}

/// Weight per Python chain (root first, joined by `;`), and the total.
fn chains(stacks: &[(Vec<String>, u64)]) -> (HashMap<String, u64>, u64) {
    let mut out: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for (frames, n) in stacks {
        let chain = python_chain(frames);
        total += n;
        if !chain.is_empty() {
            *out.entry(chain.join(";")).or_default() += n;
        }
    }
    (out, total)
}

/// The chains without lines (py-spy's `--function`).
fn functions(chains: &HashMap<String, u64>) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for (chain, n) in chains {
        let names: Vec<&str> = chain
            .split(';')
            .map(|f| f.split_once(" (").map_or(f, |(name, _)| name))
            .collect();
        *out.entry(names.join(";")).or_default() += n;
    }
    out
}

/// Share of `function`'s frames among the work done by heavy and light.
fn heavy_share(chains: &HashMap<String, u64>) -> f64 {
    let sum = |f: &str| -> u64 {
        chains
            .iter()
            .filter(|(c, _)| c.contains(&format!(";{f} (")) && c.contains(";work ("))
            .map(|(_, n)| n)
            .sum()
    };
    let (heavy, light) = (sum("heavy"), sum("light"));
    assert!(heavy + light > 0, "no work samples: {chains:#?}");
    heavy as f64 / (heavy + light) as f64
}

fn cpu_split_against_py_spy(label: &str, python: &Path) {
    assert!(python.exists(), "{} is missing", python.display());
    assert!(
        Path::new(PY_SPY).exists(),
        "{PY_SPY} is missing: run `cargo xtask setup`"
    );
    let mut workload = Proc::spawn(Command::new(python).arg(script()).arg("60"));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let dir = scratch(&label.replace(' ', "-"));
    let ours = dir.join("prof-bpf.folded");
    let theirs = dir.join("py-spy.raw");
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid,
            "--frequency",
            RATE,
            "--duration",
            SECONDS,
            "--format",
            "folded",
            "-o",
            ours.to_str().unwrap(),
        ],
        "sampling",
    );
    let spy = Command::new(PY_SPY)
        .args([
            "record",
            "--pid",
            &pid,
            "--rate",
            RATE,
            "--duration",
            SECONDS,
        ])
        .args(["--format", "raw", "--nonblocking", "-o"])
        .arg(&theirs)
        .output()
        .expect("running py-spy");
    assert!(
        spy.status.success(),
        "py-spy: {}",
        String::from_utf8_lossy(&spy.stderr)
    );
    let out = prof.wait_with_output().unwrap();
    assert!(out.status.success(), "{label}: prof-bpf failed");
    let ours_text = std::fs::read_to_string(&ours).unwrap();
    let stacks = parse_folded(&ours_text);
    let (our_chains, our_total) = chains(&stacks);
    let (spy_chains, spy_total) = chains(&parse_folded(&std::fs::read_to_string(&theirs).unwrap()));
    eprintln!(
        "{label}: prof-bpf {our_chains:#?} of {our_total}; py-spy {spy_chains:#?} of {spy_total}"
    );

    // Nearly every sample of the burning thread has its Python frames.
    let python_weight: u64 = our_chains.values().sum();
    assert!(
        python_weight as f64 >= 0.9 * our_total as f64,
        "{label}: Python frames in {python_weight} of {our_total}:\n{ours_text}"
    );
    // The split by construction, and py-spy's on the same process.
    let (ours_share, spy_share) = (heavy_share(&our_chains), heavy_share(&spy_chains));
    eprintln!("{label}: heavy share prof-bpf {ours_share:.3}, py-spy {spy_share:.3}");
    assert!(
        (ours_share - 0.75).abs() < 0.06,
        "{label}: heavy {ours_share:.3}"
    );
    assert!(
        (ours_share - spy_share).abs() < 0.08,
        "{label}: prof-bpf {ours_share:.3} vs py-spy {spy_share:.3}"
    );

    // Chains, with their lines from the source, as py-spy names them.
    let heavy = format!(
        "<module> ({SCRIPT}:{});main ({SCRIPT}:{});heavy ({SCRIPT}:{});work ({SCRIPT}:",
        last_line_of("main()"),
        line_of("        heavy()"),
        line_of("return work(3)"),
    );
    let light = format!(
        "<module> ({SCRIPT}:{});main ({SCRIPT}:{});light ({SCRIPT}:{});work ({SCRIPT}:",
        last_line_of("main()"),
        line_of("        light()"),
        line_of("return work(1)"),
    );
    // Three quarters and one quarter of the samples, minus the loop's own.
    for (chain, share) in [(&heavy, 0.6), (&light, 0.15)] {
        let ours: u64 = our_chains
            .iter()
            .filter(|(c, _)| c.starts_with(chain.as_str()))
            .map(|(_, n)| n)
            .sum();
        assert!(
            ours as f64 >= share * our_total as f64,
            "{label}: {chain} has {ours} of {our_total}"
        );
    }
    // Every chain py-spy saw in at least 5% of its samples is ours too.
    // py-spy samples wall time (a runnable thread waiting for a CPU
    // counts), prof-bpf CPU time: on a loaded machine the lines' shares
    // differ by more than the functions' do, so lines are checked for
    // presence and functions for shares.
    for (chain, &n) in &spy_chains {
        let spy = n as f64 / spy_total as f64;
        let ours = our_chains.get(chain).copied().unwrap_or(0) as f64 / our_total as f64;
        assert!(
            spy < 0.05 || ours >= 0.01,
            "{label}: {chain}: prof-bpf {ours:.3}, py-spy {spy:.3}"
        );
    }
    let (our_functions, spy_functions) = (functions(&our_chains), functions(&spy_chains));
    for (chain, &n) in &spy_functions {
        let spy = n as f64 / spy_total as f64;
        let ours = our_functions.get(chain).copied().unwrap_or(0) as f64 / our_total as f64;
        assert!(
            spy < 0.05 || (ours - spy).abs() < 0.08,
            "{label}: {chain}: prof-bpf {ours:.3}, py-spy {spy:.3}"
        );
    }
    // The Python frames stand where the evaluation loop ran: below them
    // the interpreter's entry (native), above them no eval loop frame.
    for (frames, _) in stacks.iter().filter(|(f, _)| !python_chain(f).is_empty()) {
        let first = frames
            .iter()
            .position(|f| f.contains(&format!("({SCRIPT}:")))
            .unwrap();
        assert!(
            frames[..first].iter().any(|f| f == "Py_RunMain"),
            "{label}: no native entry below the Python frames: {frames:?}"
        );
        assert!(
            !frames
                .iter()
                .any(|f| f.starts_with("_PyEval_EvalFrameDefault")),
            "{label}: an eval loop frame was not replaced: {frames:?}"
        );
    }
}

/// The line of the last source line equal to `text` (after trimming).
fn last_line_of(text: &str) -> u32 {
    let source = std::fs::read_to_string(script()).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.trim() == text)
        .unwrap_or_else(|| panic!("`{text}` is not in {SCRIPT}"));
    u32::try_from(at + 1).unwrap()
}

#[test]
fn cpu_split_of_debian_python311_matches_construction_and_py_spy() {
    require_bpf!();
    cpu_split_against_py_spy("Debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn cpu_split_of_pyenv_python312_matches_construction_and_py_spy() {
    require_bpf!();
    cpu_split_against_py_spy("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn cpu_split_of_pyenv_python313_matches_construction_and_py_spy() {
    require_bpf!();
    cpu_split_against_py_spy("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

/// `cpu -- python3.12 script.py`: libpython is mapped after the exec, and
/// the interpreter is found all the same.
#[test]
fn a_launched_interpreter_gets_python_frames() {
    require_bpf!();
    let python = pyenv_python("3.12.1");
    let out = scratch("launch").join("launch.folded");
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--frequency",
        RATE,
        "--format",
        "folded",
        "-o",
        out.to_str().unwrap(),
        "--",
        python.to_str().unwrap(),
        script().to_str().unwrap(),
        "3",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (chains, total) = chains(&parse_folded(&std::fs::read_to_string(&out).unwrap()));
    let share = heavy_share(&chains);
    let python_weight: u64 = chains.values().sum();
    // The first samples come before the interpreter has a thread state.
    assert!(
        python_weight as f64 >= 0.8 * total as f64,
        "Python frames in {python_weight} of {total}: {chains:#?}"
    );
    assert!((share - 0.75).abs() < 0.08, "heavy {share:.3}");
}

/// Block size and counts of `python_heap_split.py`.
const HEAP_BLOCK: u64 = 64 * 1024;
const HEAP_COUNTS: [(&str, u64); 2] = [("keep_big", 300), ("keep_small", 100)];

/// `heap --pid` on a workload that keeps bytearrays from two functions
/// under a 5-deep chain: the bytes are attributed to those functions, in
/// their chain, as many as the workload allocated (each buffer is its size
/// plus one for the NUL) and within 2% of what tracemalloc measured in the
/// workload itself.
fn heap_split(label: &str, python: &Path) {
    assert!(python.exists(), "{} is missing", python.display());
    let script = workspace_root().join("tests/workloads/python_heap_split.py");
    let mut workload = Proc::spawn(Command::new(python).arg(&script));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = scratch(&format!("heap-{}", label.replace(' ', "-"))).join("heap.folded");
    // Every allocation tracked: the bytes are exact.
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--pid",
            &pid,
            "--sample-bytes",
            "0",
            "--duration",
            "4",
            "--format",
            "folded",
            "-o",
            out.to_str().unwrap(),
        ],
        "attached",
    );
    workload.send_line("go");
    let done = workload.read_line();
    let traced: Vec<u64> = done
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("{label}: workload said {done}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    let report = prof.wait_with_output().unwrap();
    assert!(report.status.success(), "{label}: prof-bpf heap failed");
    let text = std::fs::read_to_string(&out).unwrap();
    let stacks = parse_folded(&text);
    for ((function, count), traced) in HEAP_COUNTS.iter().zip(traced) {
        let chain = ["main", "level1", "level2", "level3", "level4", function];
        let mut bytes = 0;
        for (frames, n) in &stacks {
            let python: Vec<String> = python_chain_of(frames, "python_heap_split.py")
                .iter()
                .map(|f| {
                    f.split_once(" (")
                        .map_or(f.clone(), |(name, _)| name.to_owned())
                })
                .collect();
            if python.last().map(String::as_str) == Some(function) {
                assert!(
                    python.ends_with(&chain.map(str::to_owned)),
                    "{label}: {function} under {python:?}"
                );
                bytes += n;
            }
        }
        let made = count * (HEAP_BLOCK + 1);
        eprintln!("{label}: {function}: prof-bpf {bytes} B, tracemalloc {traced} B, made {made} B");
        assert!(
            bytes >= made,
            "{label}: {function}: {bytes} < {made}:\n{text}"
        );
        assert!(
            (bytes as f64 - traced as f64).abs() <= 0.02 * traced as f64,
            "{label}: {function}: prof-bpf {bytes}, tracemalloc {traced}"
        );
    }
}

/// The Python frames of `file` in a stack, root first.
fn python_chain_of(frames: &[String], file: &str) -> Vec<String> {
    let tag = format!("({file}:");
    frames
        .iter()
        .filter(|f| f.contains(&tag))
        .cloned()
        .collect()
}

#[test]
fn heap_of_debian_python311_names_the_allocating_functions() {
    require_bpf!();
    heap_split("Debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn heap_of_pyenv_python312_names_the_allocating_functions() {
    require_bpf!();
    heap_split("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn heap_of_pyenv_python313_names_the_allocating_functions() {
    require_bpf!();
    heap_split("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

/// A Python -> C -> Python chain keeps its order: `sort_with_key` calls
/// `sorted` (C), which calls the `key=` function `burn_key` in an
/// activation of its own; the native frames between them stay.
#[test]
fn a_key_function_called_by_sorted_stays_under_its_caller() {
    require_bpf!();
    for python in [
        PathBuf::from(DEBIAN_311),
        pyenv_python("3.12.1"),
        pyenv_python("3.13.0"),
    ] {
        let script = workspace_root().join("tests/workloads/python_sort_key.py");
        let mut workload = Proc::spawn(Command::new(&python).arg(&script).arg("60"));
        workload.expect_line("ready");
        let out = scratch("sort-key").join("sort.folded");
        let (_, stderr, code) = run_prof_bpf(&[
            "cpu",
            "--pid",
            &workload.pid().to_string(),
            "--frequency",
            RATE,
            "--duration",
            "3",
            "--format",
            "folded",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        drop(workload);
        let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
        let (mut in_key, mut total) = (0, 0);
        for (frames, n) in &stacks {
            total += n;
            let at = |name: &str| {
                frames
                    .iter()
                    .position(|f| f.starts_with(&format!("{name} (")))
            };
            let Some(key) = at("burn_key") else {
                continue;
            };
            let caller = at("sort_with_key").unwrap_or_else(|| {
                panic!(
                    "{}: burn_key without its caller: {frames:?}",
                    python.display()
                )
            });
            assert!(
                caller < key,
                "{}: out of order: {frames:?}",
                python.display()
            );
            assert!(
                frames[caller + 1..key].iter().any(|f| !f.contains(".py:")),
                "{}: no native frame between the activations: {frames:?}",
                python.display()
            );
            in_key += n;
        }
        assert!(
            in_key as f64 >= 0.8 * total as f64,
            "{}: burn_key in {in_key} of {total}",
            python.display()
        );
    }
}

/// An interpreter whose layout is not known (3.10) is named in one line,
/// and its samples keep their native frames.
#[test]
fn an_unsupported_interpreter_is_named_in_one_line() {
    require_bpf!();
    let mut workload = Proc::spawn(
        Command::new(pyenv_python("3.10.13"))
            .arg(script())
            .arg("60"),
    );
    workload.expect_line("ready");
    let out = scratch("unsupported").join("cpu.folded");
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--pid",
        &workload.pid().to_string(),
        "--duration",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("is not supported"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("Python 3.10") && lines[0].contains("only native frames are shown"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains(".py:"), "{text}");
    assert!(text.contains("Py_RunMain"), "{text}");
}
