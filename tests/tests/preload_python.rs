//! Python frames in gperftools mode (`LD_PRELOAD=libprofalloc.so`), on
//! Debian's stripped /usr/bin/python3.11 and pyenv's shared 3.12.1 and
//! 3.13.0: HEAPPROFILE dumps and their call graph name the Python leak
//! site, HEAPCHECK finds exactly a ctypes leak under its Python chain and
//! nothing in a leak-free script (pymalloc arenas are roots), CPUPROFILE
//! shows the Python functions. Known by construction: the workloads'
//! chains, their source lines (found in the sources), the leaked bytes.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use prof_bpf_tests::{prof_bpf, profalloc_lib, workspace_root};

const PYTHONS: [&str; 3] = [
    "/usr/bin/python3.11",
    "/root/.pyenv/versions/3.12.1/bin/python3.12",
    "/root/.pyenv/versions/3.13.0/bin/python3.13",
];

fn workload(name: &str) -> PathBuf {
    workspace_root().join("tests/workloads").join(name)
}

/// `name (file:LINE)` of the line of `script` holding `marker`.
fn frame(function: &str, script: &str, marker: &str) -> String {
    let text = std::fs::read_to_string(workload(script)).unwrap();
    let line = text.lines().position(|l| l.contains(marker)).unwrap() + 1;
    format!("{function} ({script}:{line})")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-preload-python-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_python(python: &str, script: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(python);
    cmd.arg(workload(script))
        .args(args)
        .env("LD_PRELOAD", profalloc_lib())
        .env("PROFBPF_PATH", prof_bpf());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn report(args: &[&str]) -> String {
    let out = Command::new(prof_bpf())
        .arg("report")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The folded stacks of a profile as (frames root first, value).
fn folded(file: &Path, sample_type: &str) -> Vec<(Vec<String>, i64)> {
    let text = report(&[
        file.to_str().unwrap(),
        "--format",
        "folded",
        "--sample-type",
        sample_type,
    ]);
    text.lines()
        .filter_map(|l| {
            let (stack, value) = l.rsplit_once(' ')?;
            Some((
                stack.split(';').map(str::to_owned).collect(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// Whether `chain` (root first) appears in `stack` consecutively.
fn holds(stack: &[String], chain: &[String]) -> bool {
    stack.windows(chain.len()).any(|w| w == chain)
}

#[test]
fn heapprofile_names_the_python_leak_site_in_dump_and_callgraph() {
    let script = "preload_python_leak.py";
    // `serve()`, the module's call, is the last line.
    let module_line = std::fs::read_to_string(workload(script))
        .unwrap()
        .lines()
        .count();
    let chain = [
        format!("<module> ({script}:{module_line})"),
        frame("serve", script, "SERVE-CALL"),
        frame("handle", script, "HANDLE-CALL"),
        frame("remember", script, "LEAK-SITE"),
    ];
    for python in PYTHONS {
        let dir = scratch(&format!("heap-{}", python.rsplit('/').next().unwrap()));
        let prefix = dir.join("p");
        // A dump at 16 MB in use, while the 25.6 MB are still held.
        let out = Command::new(python)
            .arg(workload(script))
            .env("LD_PRELOAD", profalloc_lib())
            .env("HEAPPROFILE", &prefix)
            .env("HEAP_PROFILE_INUSE_INTERVAL", "16000000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{python}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = dir.join("p.0001.heap");
        let stacks = folded(&dump, "inuse_space");
        let under: i64 = stacks
            .iter()
            .filter(|(s, _)| holds(s, &chain))
            .map(|(_, v)| v)
            .sum();
        let total: i64 = stacks.iter().map(|(_, v)| v).sum();
        println!("{python}: {under} of {total} in-use bytes under {chain:?}");
        // 16 MB were in use at the dump, all but the interpreter's own
        // (about 1 MB) from the chain; sampling every 512 KiB on average.
        assert!(
            under >= 12 << 20,
            "{python}: {under} bytes under the chain\n{stacks:?}"
        );
        // The Python frames replace the evaluation loop, in order.
        let leak = stacks.iter().find(|(s, _)| holds(s, &chain)).unwrap();
        let at = leak.0.iter().position(|f| *f == chain[3]).unwrap();
        assert!(
            !leak.0[..at]
                .iter()
                .any(|f| f.contains("_PyEval_EvalFrameDefault")),
            "{python}: an evaluation-loop frame is left: {:?}",
            leak.0
        );
        // The walks' counters are in the dump, and report shows them.
        let text = report(&[dump.to_str().unwrap()]);
        let counters = text
            .lines()
            .find_map(|l| l.strip_prefix("Note: python stack walks (in-process): "))
            .unwrap_or_else(|| panic!("{python}: no walk counters in\n{text}"));
        let walks: u64 = counters.split(' ').next().unwrap().parse().unwrap();
        assert!(
            walks > 0 && counters.contains(" walks, 0 cut,"),
            "{python}: {counters}"
        );
        // The walks that read through the kernel (the others read pages
        // kept from earlier walks) are counted.
        let kernel: u64 = counters
            .strip_suffix(" read through the kernel")
            .and_then(|c| c.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{python}: {counters}"));
        assert!(kernel <= walks, "{python}: {counters}");
        let graph = dir.join("p.dot");
        report(&[
            dump.to_str().unwrap(),
            "--format",
            "callgraph",
            "-o",
            graph.to_str().unwrap(),
        ]);
        let dot = std::fs::read_to_string(&graph).unwrap();
        for f in &chain {
            assert!(
                dot.contains(f.as_str()),
                "{python}: {f} not in the call graph"
            );
        }
    }
}

#[test]
fn heapcheck_finds_exactly_the_ctypes_leak_under_its_python_chain() {
    let script = "preload_python_ctypes_leak.py";
    let chain = [
        frame("middle", script, "    lose_it()"),
        frame("lose_it", script, "C-LEAK"),
    ];
    for python in PYTHONS {
        let dir = scratch(&format!("check-{}", python.rsplit('/').next().unwrap()));
        let env = [("TMPDIR", dir.as_path())];
        let clean = run_python(python, script, &[], &[("HEAPCHECK", Path::new("normal"))]);
        let stderr = String::from_utf8_lossy(&clean.stderr);
        assert!(
            clean.status.success() && stderr.contains("no leaks found"),
            "{python}: a leak-free script:\n{stderr}"
        );
        let mut env = env.to_vec();
        env.push(("HEAPCHECK", Path::new("normal")));
        let leaky = run_python(python, script, &["leak"], &env);
        let stderr = String::from_utf8_lossy(&leaky.stderr);
        assert_eq!(leaky.status.code(), Some(1), "{python}:\n{stderr}");
        assert!(
            stderr.contains("found 1 leaked objects (123457 bytes)"),
            "{python}:\n{stderr}"
        );
        let profile = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(".leaks.heap"))
            .expect("leak profile");
        let stacks = folded(&profile, "inuse_space");
        assert_eq!(stacks.len(), 1, "{python}: {stacks:?}");
        assert_eq!(stacks[0].1, 123457);
        assert!(holds(&stacks[0].0, &chain), "{python}: {:?}", stacks[0].0);
    }
}

#[test]
fn cpuprofile_shows_the_python_functions() {
    let script = "preload_python_cpu.py";
    let spin = frame("spin", script, "SPIN-LOOP");
    for python in PYTHONS {
        let dir = scratch(&format!("cpu-{}", python.rsplit('/').next().unwrap()));
        let file = dir.join("cpu.prof");
        let out = run_python(python, script, &[], &[("CPUPROFILE", file.as_path())]);
        assert!(
            out.status.success(),
            "{python}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stacks = folded(&file, "samples");
        let total: i64 = stacks.iter().map(|(_, v)| v).sum();
        let under: i64 = stacks
            .iter()
            .filter(|(s, _)| {
                s.iter().any(|f| f.starts_with("burn ("))
                    && s.iter().any(|f| f.starts_with("spin ("))
            })
            .map(|(_, v)| v)
            .sum();
        let on_line: i64 = stacks
            .iter()
            .filter(|(s, _)| s.contains(&spin))
            .map(|(_, v)| v)
            .sum();
        println!("{python}: {under} of {total} samples under burn <- spin, {on_line} on {spin}");
        // 1.5 s of the run's CPU is in spin (the interpreter's start and
        // exit take about 0.05 s): at 100 Hz, most samples.
        assert!(total >= 100, "{python}: {total} samples");
        assert!(
            under * 10 >= total * 8,
            "{python}: {under} of {total}\n{stacks:?}"
        );
        assert!(on_line > 0, "{python}: no sample on {spin}");
    }
}

/// HEAPPROFILE of the leak workload, dumped at 16 MB in use: (stderr, the
/// dump's folded in-use stacks, its text report).
fn leak_dump(
    python: &str,
    dir: &Path,
    env: &[(&str, &str)],
) -> (String, Vec<(Vec<String>, i64)>, String) {
    let prefix = dir.join("p");
    let out = Command::new(python)
        .arg(workload("preload_python_leak.py"))
        .env("LD_PRELOAD", profalloc_lib())
        .env("HEAPPROFILE", &prefix)
        .env("HEAP_PROFILE_INUSE_INTERVAL", "16000000")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{python}: {stderr}");
    let dump = dir.join("p.0001.heap");
    let text = report(&[dump.to_str().unwrap()]);
    (stderr, folded(&dump, "inuse_space"), text)
}

/// Native frames only, and the 16 MB still found under the interpreter's
/// own code that holds them.
fn assert_native_only(what: &str, stacks: &[(Vec<String>, i64)]) {
    let python_frames: Vec<&String> = stacks
        .iter()
        .flat_map(|(s, _)| s)
        .filter(|f| f.contains(".py"))
        .collect();
    assert!(python_frames.is_empty(), "{what}: {python_frames:?}");
    let under_eval: i64 = stacks
        .iter()
        .filter(|(s, _)| s.iter().any(|f| f.contains("_PyEval_EvalFrameDefault")))
        .map(|(_, v)| v)
        .sum();
    assert!(
        under_eval >= 12 << 20,
        "{what}: {under_eval} bytes\n{stacks:?}"
    );
}

#[test]
fn an_unsupported_python_is_named_in_one_line_and_gets_native_frames() {
    let python = "/root/.pyenv/versions/3.10.13/bin/python3.10";
    let dir = scratch("unsupported-3.10");
    let (stderr, stacks, text) = leak_dump(python, &dir, &[]);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("not supported"))
        .collect();
    assert_eq!(
        lines,
        [
            "profalloc: Python (libpython3.10.so.1.0) is not supported (older than 3.11: \
             it exports no Py_Version): only native frames are shown"
        ],
        "{stderr}"
    );
    assert!(
        text.contains("Note: Python (libpython3.10.so.1.0) is not supported"),
        "{text}"
    );
    assert_native_only(python, &stacks);
}

#[test]
fn profalloc_python_0_turns_the_python_frames_off() {
    let python = PYTHONS[0];
    let dir = scratch("python-off");
    let (stderr, stacks, text) = leak_dump(python, &dir, &[("PROFALLOC_PYTHON", "0")]);
    assert!(!stderr.contains("not supported"), "{stderr}");
    assert!(!text.contains("python stack walks"), "{text}");
    assert_native_only(python, &stacks);
}

/// The evaluation loop's cold parts the profiler's finder reads from the
/// file, as the dumps write them (object addresses).
fn cold_parts_from_file(path: &str) -> String {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let eval = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("_PyEval_EvalFrameDefault"))
        .expect("the evaluation loop is exported");
    let (lo, hi) = (eval.address(), eval.address() + eval.size());
    let cold = profiler::python::eval_code::cold_parts(&elf, lo, hi);
    let mut line = format!("python eval loop (in-process): hot part {lo:#x}-{hi:#x}");
    if cold.is_empty() {
        line.push_str(", no cold part");
    }
    for (i, (lo, hi)) in cold.iter().enumerate() {
        line.push_str(if i == 0 { ", cold parts " } else { " " });
        line.push_str(&format!("{lo:#x}-{hi:#x}"));
    }
    line
}

#[test]
fn the_eval_loops_cold_parts_are_the_profilers() {
    // Debian's stripped executable (a cold part no symbol names), and the
    // shared builds: two with a cold part, 3.13.0 without.
    for (python, object) in [
        (PYTHONS[0], PYTHONS[0]),
        (
            "/root/.pyenv/versions/3.11.7/bin/python3.11",
            "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
        ),
        (
            PYTHONS[1],
            "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
        ),
        (
            PYTHONS[2],
            "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0",
        ),
    ] {
        let want = cold_parts_from_file(object);
        if python == PYTHONS[0] {
            assert!(want.contains("cold parts"), "{want}");
        }
        let dir = scratch("eval-loop");
        let (_, _, text) = leak_dump(python, &dir, &[]);
        let got: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Note: "))
            .filter(|l| l.starts_with("python eval loop"))
            .collect();
        assert_eq!(got, [want.as_str()], "{python}\n{text}");
    }
}
