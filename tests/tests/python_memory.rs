//! Python's small objects in heap profiles
//! (tests/workloads/python_small_objects.py), on Debian's stripped
//! /usr/bin/python3.11 and pyenv's shared 3.12 and 3.13: pymalloc's arenas,
//! mapped with mmap, attributed by `--mmap` to the Python code that grows
//! them; the objects themselves with `--pymalloc`, against tracemalloc run
//! in the workload, and its refusal where the allocator is inlined.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use prof_bpf_tests::{
    Proc, assert_one_line_error, require_bpf, run_prof_bpf, start_prof_bpf, workspace_root,
};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const PYENV: &str = "/root/.pyenv/versions";
const SCRIPT: &str = "python_small_objects.py";
const MIB: f64 = 1024.0 * 1024.0;

fn pyenv_python(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new(PYENV).join(format!("{version}/bin/python{minor}"))
}

/// What one profiled run of the workload gave.
struct Run {
    /// Folded in-use stacks (`a;b;c N`).
    folded: String,
    /// The report's comments and coverage (`report --format text`).
    text: String,
    /// Tuples the workload made, and the pymalloc bytes each took with its
    /// int (by construction).
    count: u64,
    blocks: u64,
    /// tracemalloc's bytes for grow_tuples' lines (0 unless `trace`).
    traced: u64,
}

/// `prof-bpf heap --pid W ARGS` over one growth of the workload (its
/// arguments `workload`), stopped once it has grown (before tracemalloc's
/// statistics, which make many objects of their own).
fn profile(label: &str, python: &Path, args: &[&str], workload: &[&str]) -> Run {
    assert!(python.exists(), "{} is missing", python.display());
    let script = workspace_root().join("tests/workloads").join(SCRIPT);
    let mut cmd = Command::new(python);
    cmd.arg(&script).args(workload);
    let mut workload = Proc::spawn(&mut cmd);
    workload.expect_line("ready");
    let dir = std::env::temp_dir().join(format!(
        "prof-bpf-python-memory-{}-{}",
        label.replace(' ', "-"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_str().unwrap();
    let pid = workload.pid().to_string();
    let mut all = vec!["heap", "--pid", &pid, "-o", file_arg];
    all.extend_from_slice(args);
    let (prof, _) = start_prof_bpf(&all, "prof-bpf: heap: attached");
    workload.send_line("go");
    workload.expect_line("grown");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().unwrap();
    assert!(out.status.success(), "{label}: prof-bpf heap failed");
    workload.send_line("");
    let done = workload.read_line();
    let numbers: Vec<u64> = done
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("{label}: workload said {done}"))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    let report = |format: &str| {
        let (stdout, stderr, code) = run_prof_bpf(&[
            "report",
            "--format",
            format,
            "--group-by",
            "none",
            "--sample-type",
            "inuse_space",
            file_arg,
        ]);
        assert_eq!(code, 0, "{label}: {stderr}");
        stdout
    };
    Run {
        folded: report("folded"),
        text: report("text"),
        count: numbers[0],
        blocks: numbers[1],
        traced: numbers[2],
    }
}

/// The bytes of the stacks whose Python frames end
/// `level1;level2;grow_tuples` and whose leaf is `leaf` (all leaves when
/// None); panics on a stack that names grow_tuples under another chain.
fn grow_tuples_bytes(label: &str, folded: &str, leaf: Option<&str>) -> u64 {
    let tag = format!("({SCRIPT}:");
    let mut bytes = 0;
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        let python: Vec<&str> = frames
            .iter()
            .filter(|f| f.contains(&tag))
            .map(|f| f.split_once(" (").map_or(*f, |(name, _)| name))
            .collect();
        if python.last() != Some(&"grow_tuples") {
            continue;
        }
        assert!(
            python.ends_with(&["main", "level1", "level2", "grow_tuples"]),
            "{label}: grow_tuples under {python:?}"
        );
        if leaf.is_none_or(|leaf| frames.last() == Some(&leaf)) {
            bytes += n.parse::<u64>().unwrap();
        }
    }
    bytes
}

/// With `--mmap`, the arenas pymalloc maps while the list of tuples grows
/// are under grow_tuples, and hold what the tuples and their ints take by
/// construction: at least that (less what earlier arenas had free), at
/// most that plus pymalloc's pool headers and partly used pools.
fn arenas_under_their_python_function(label: &str, python: &Path) {
    let run = profile(label, python, &["--mmap"], &[]);
    let arenas = grow_tuples_bytes(label, &run.folded, Some("[mmap]"));
    let made = run.count * run.blocks;
    eprintln!(
        "{label}: arenas under grow_tuples {:.1} MiB, objects by construction {:.1} MiB",
        arenas as f64 / MIB,
        made as f64 / MIB
    );
    assert!(
        arenas as f64 >= 0.9 * made as f64 && arenas as f64 <= 1.1 * made as f64 + 4.0 * MIB,
        "{label}: {arenas} B of arenas for {made} B of objects:\n{}",
        run.folded
    );
    assert!(
        run.text.contains("pymalloc arenas"),
        "{label}: the report does not say it covers the arenas:\n{}",
        run.text
    );
}

#[test]
fn mmap_finds_arenas_under_their_python_function_on_debian_python311() {
    require_bpf!();
    arenas_under_their_python_function("Debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn mmap_finds_arenas_under_their_python_function_on_pyenv_python312() {
    require_bpf!();
    arenas_under_their_python_function("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn mmap_finds_arenas_under_their_python_function_on_pyenv_python313() {
    require_bpf!();
    arenas_under_their_python_function("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

/// In leak mode, the list growing in 8 steps 0.4 s apart, snapshots every
/// 0.5 s: the arenas of the tuples (most of them: tuples and ints share
/// arenas, and the tuples, the larger, map most) are a leaking stack under
/// grow_tuples.
fn arenas_leak_under_their_python_function(label: &str, python: &Path) {
    let run = profile(
        label,
        python,
        &["--mmap", "--leaks", "--interval", "0.5"],
        &["steps=8"],
    );
    let leaking = grow_tuples_bytes(label, &run.folded, Some("[mmap]"));
    let made = run.count * run.blocks;
    eprintln!(
        "{label}: leaking arenas under grow_tuples {:.1} MiB, objects by construction {:.1} MiB",
        leaking as f64 / MIB,
        made as f64 / MIB
    );
    assert!(
        leaking as f64 >= 0.5 * made as f64 && leaking as f64 <= 1.1 * made as f64 + 4.0 * MIB,
        "{label}: {leaking} B of leaking arenas for {made} B of objects:\n{}",
        run.folded
    );
}

#[test]
fn leaking_arenas_are_found_under_their_python_function_on_debian_python311() {
    require_bpf!();
    arenas_leak_under_their_python_function("Debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn leaking_arenas_are_found_under_their_python_function_on_pyenv_python312() {
    require_bpf!();
    arenas_leak_under_their_python_function("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn leaking_arenas_are_found_under_their_python_function_on_pyenv_python313() {
    require_bpf!();
    arenas_leak_under_their_python_function("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

/// Tuples made under `--pymalloc`: every object call traps, so fewer.
const PYMALLOC_TUPLES: &str = "200000";

/// `--pymalloc`, sampled at 4 KiB (about 4700 samples of the ~19 MB made),
/// gives grow_tuples' objects (its tuples and ints, and the list's
/// growth through realloc) within 10% of what tracemalloc measured for
/// the function's lines in the workload itself.
fn objects_agree_with_tracemalloc(label: &str, python: &Path) {
    let run = profile(
        label,
        python,
        &["--pymalloc", "--sample-bytes", "4096"],
        &["trace", PYMALLOC_TUPLES],
    );
    let bytes = grow_tuples_bytes(label, &run.folded, None);
    eprintln!(
        "{label}: --pymalloc under grow_tuples {:.2} MiB, tracemalloc {:.2} MiB",
        bytes as f64 / MIB,
        run.traced as f64 / MIB
    );
    assert!(
        run.traced > run.count * run.blocks / 2,
        "{label}: tracemalloc saw {}",
        run.traced
    );
    assert!(
        (bytes as f64 - run.traced as f64).abs() <= 0.1 * run.traced as f64,
        "{label}: prof-bpf {bytes} B, tracemalloc {} B:\n{}",
        run.traced,
        run.folded
    );
    assert!(
        run.text.contains("PyObject_Malloc"),
        "{label}: the report does not say it covers pymalloc:\n{}",
        run.text
    );
}

#[test]
fn pymalloc_agrees_with_tracemalloc_on_pyenv_python312() {
    require_bpf!();
    objects_agree_with_tracemalloc("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn pymalloc_agrees_with_tracemalloc_on_pyenv_python313() {
    require_bpf!();
    objects_agree_with_tracemalloc("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

/// Debian's python3.11 inlines pymalloc: the mode is refused in one line
/// that says why, before anything is attached.
#[test]
fn pymalloc_is_refused_where_the_allocator_is_inlined() {
    require_bpf!();
    let script = workspace_root().join("tests/workloads").join(SCRIPT);
    let mut workload = Proc::spawn(Command::new(DEBIAN_311).arg(&script));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--pymalloc", "--duration", "1"]);
    assert_one_line_error(&stderr, code, "inlines its object allocator");
}

/// A counter's value in the report's `python stack walks (kernel)` line.
fn walk_counter(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains("python stack walks (kernel)"))
        .unwrap_or_else(|| panic!("no Python walk counters in:\n{text}"));
    line.split([':', ','])
        .filter_map(|part| part.trim().strip_prefix(name)?.trim().parse().ok())
        .next()
        .unwrap_or_else(|| panic!("no `{name}` in {line}"))
}

/// The stack maps against a Python workload that allocates under 2**15
/// distinct Python chains, every allocation tracked: the Python stack map
/// (`PY_STACKS`, kept for the whole heap session) holds its capacity of
/// distinct stacks, every stack refused is counted as `map_full`, and the
/// allocations whose Python stack did not fit keep their bytes under their
/// native stack.
#[test]
fn python_stacks_beyond_the_map_are_counted() {
    require_bpf!();
    use profiler_common::python::STACKS_MAX;
    const PATHS: u64 = 1 << 15;
    let python = pyenv_python("3.12.1");
    let script = workspace_root().join("tests/workloads/python_many_stacks.py");
    let mut workload = Proc::spawn(Command::new(&python).arg(&script).arg("15"));
    workload.expect_line("ready");
    let dir = std::env::temp_dir().join(format!("prof-bpf-python-maps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_str().unwrap();
    let pid = workload.pid().to_string();
    let args = ["heap", "--pid", &pid, "--sample-bytes", "0", "-o", file_arg];
    let (prof, _) = start_prof_bpf(&args, "prof-bpf: heap: attached");
    workload.send_line("go");
    workload.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().unwrap();
    assert!(out.status.success(), "prof-bpf heap failed");
    let report = |format: &str| {
        let (stdout, stderr, code) = run_prof_bpf(&[
            "report",
            "--format",
            format,
            "--group-by",
            "none",
            "--sample-type",
            "alloc_space",
            file_arg,
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let text = report("text");
    let (walks, full) = (
        walk_counter(&text, "walks"),
        walk_counter(&text, "map_full"),
    );
    let stored = walks - full;
    eprintln!("walks {walks}, map_full {full}, capacity {STACKS_MAX}");
    assert!(walks >= PATHS, "{walks} walks for {PATHS} allocations");
    assert!(full >= PATHS - u64::from(STACKS_MAX), "map_full {full}");
    assert!(
        stored >= u64::from(STACKS_MAX),
        "the map filled up: {stored}"
    );
    // Every allocation is in the report, with Python frames or without.
    let folded = report("folded");
    let (mut with_python, mut without, mut chains) = (0, 0, 0);
    for (frames, bytes) in prof_bpf_tests::parse_folded(&folded) {
        if !frames.iter().any(|f| f.starts_with("bytearray")) {
            continue;
        }
        if frames.iter().any(|f| f.starts_with("walk (")) {
            with_python += bytes;
            chains += 1;
        } else {
            without += bytes;
        }
    }
    eprintln!("chains {chains}, bytes with Python frames {with_python}, without {without}");
    assert!(chains <= u64::from(STACKS_MAX), "{chains} chains");
    assert!(
        with_python + without >= PATHS * 1024,
        "{with_python} + {without}"
    );
    assert!(
        without >= (PATHS - u64::from(STACKS_MAX)) * 1024,
        "{without}"
    );
}
