//! Python frames read from user space (`profiler::python`), against real
//! interpreters: Debian's stripped /usr/bin/python3.11 and pyenv's shared
//! builds. Oracles: the DWARF of the pyenv builds (through gdb) for the
//! structure offsets, the workload's own `# at:` markers for the chains,
//! and py-spy for the whole dump. Reading another process's memory needs
//! root.
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use prof_bpf_tests::{Proc, is_root, workspace_root};
use profiler::python::{
    self, ThreadStack, Unsupported,
    discover::{self, Interpreter},
    memory::ProcessMemory,
    offsets::{FrameAnchor, GilAnchor, Offsets},
    thread_names,
};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const PYENV: &str = "/root/.pyenv/versions";

/// py-spy as `cargo xtask setup` installs it (see `xtask/src/setup.rs`).
const PY_SPY: &str = "/var/cache/prof-bpf-tools/venv/bin/py-spy";

fn pyenv_python(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new(PYENV).join(format!("{version}/bin/python{minor}"))
}

fn pyenv_libpython(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new(PYENV).join(format!("{version}/lib/libpython{minor}.so.1.0"))
}

fn runnable(test: &str, python: &Path) -> bool {
    if !is_root() {
        eprintln!("skipping {test}: not root (reads another process's memory)");
        return false;
    }
    assert!(python.exists(), "{} is missing", python.display());
    true
}

/// A Python process waiting on stdin after printing "ready".
fn idle_python(python: &Path) -> Proc {
    let mut proc = Proc::spawn(Command::new(python).args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.readline()",
    ]));
    proc.expect_line("ready");
    proc
}

/// Evaluates `print (long)(EXPR)` for each expression in gdb against `lib`.
fn gdb_values(lib: &Path, exprs: &[String]) -> Vec<u64> {
    let mut cmd = Command::new("gdb");
    cmd.arg("-batch");
    for e in exprs {
        cmd.arg("-ex").arg(format!("print (long)({e})"));
    }
    let out = cmd.arg(lib).output().expect("running gdb");
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_once(" = ").and_then(|(_, v)| v.trim().parse().ok()))
        .collect();
    assert_eq!(
        values.len(),
        exprs.len(),
        "gdb answered {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    values
}

/// Every offset of `o`, each beside the C expression DWARF must agree with.
fn offsets_vs_c(o: &Offsets, minor: u32) -> Vec<(u64, String)> {
    let field = |ty: &str, f: &str| format!("&(({ty}*)0)->{f}");
    let code = if minor >= 13 {
        "f_executable"
    } else {
        "f_code"
    };
    let instr = if minor >= 13 {
        "instr_ptr"
    } else {
        "prev_instr"
    };
    let frame = "struct _PyInterpreterFrame";
    let mut pairs = vec![
        (
            o.runtime_interpreters_head,
            field("_PyRuntimeState", "interpreters.head"),
        ),
        (o.interp_next, field("PyInterpreterState", "next")),
        (
            o.interp_threads_head,
            field("PyInterpreterState", "threads.head"),
        ),
        (o.tstate_next, field("PyThreadState", "next")),
        (o.tstate_interp, field("PyThreadState", "interp")),
        (o.tstate_thread_id, field("PyThreadState", "thread_id")),
        (
            o.tstate_native_thread_id,
            field("PyThreadState", "native_thread_id"),
        ),
        (o.frame_code, field(frame, code)),
        (o.frame_previous, field(frame, "previous")),
        (o.frame_instr, field(frame, instr)),
        (o.frame_owner, field(frame, "owner")),
        (
            u64::from(o.owner_generator),
            "FRAME_OWNED_BY_GENERATOR".into(),
        ),
        (o.object_type, field("PyObject", "ob_type")),
        (o.var_object_size, field("PyVarObject", "ob_size")),
        (o.code_qualname, field("PyCodeObject", "co_qualname")),
        (o.code_name, field("PyCodeObject", "co_name")),
        (o.code_filename, field("PyCodeObject", "co_filename")),
        (o.code_firstlineno, field("PyCodeObject", "co_firstlineno")),
        (o.code_linetable, field("PyCodeObject", "co_linetable")),
        (o.code_adaptive, field("PyCodeObject", "co_code_adaptive")),
        (
            o.code_firsttraceable,
            field("PyCodeObject", "_co_firsttraceable"),
        ),
        (o.unicode_length, field("PyASCIIObject", "length")),
        (o.unicode_state, field("PyASCIIObject", "state")),
        (o.unicode_ascii_data, "sizeof(PyASCIIObject)".into()),
        (
            o.unicode_compact_data,
            "sizeof(PyCompactUnicodeObject)".into(),
        ),
        (o.bytes_data, field("PyBytesObject", "ob_sval")),
    ];
    match o.tstate_frame {
        FrameAnchor::ThroughCFrame {
            cframe,
            current_frame,
        } => {
            pairs.push((cframe, field("PyThreadState", "cframe")));
            pairs.push((current_frame, field("_PyCFrame", "current_frame")));
        }
        FrameAnchor::Direct { current_frame } => {
            pairs.push((current_frame, field("PyThreadState", "current_frame")));
        }
    }
    match o.gil {
        GilAnchor::InRuntime { locked, holder } => {
            pairs.push((locked, field("_PyRuntimeState", "ceval.gil.locked")));
            pairs.push((holder, field("_PyRuntimeState", "ceval.gil.last_holder")));
        }
        GilAnchor::ThroughInterpreter {
            gil,
            locked,
            holder,
        } => {
            pairs.push((gil, field("PyInterpreterState", "ceval.gil")));
            pairs.push((locked, field("struct _gil_runtime_state", "locked")));
            pairs.push((holder, field("struct _gil_runtime_state", "last_holder")));
        }
    }
    match o.frame_is_entry {
        Some(at) => pairs.push((at, field(frame, "is_entry"))),
        None => assert!(minor >= 12, "3.11 frames have is_entry"),
    }
    match o.owner_cstack {
        Some(v) => pairs.push((u64::from(v), "FRAME_OWNED_BY_CSTACK".into())),
        None => assert_eq!(minor, 11, "3.12+ have C-stack shim frames"),
    }
    pairs
}

/// The interpreter a live process of `python` is found to run.
fn interpreter_of(python: &Path) -> Interpreter {
    let proc = idle_python(python);
    discover::find(proc.pid(), &ProcessMemory::new(proc.pid()))
        .unwrap_or_else(|e| panic!("{}: {e:#}", python.display()))
}

#[test]
fn offsets_match_the_dwarf_of_pyenv_builds() {
    for version in ["3.11.7", "3.12.1", "3.13.0"] {
        let python = pyenv_python(version);
        if !runnable("offsets_match_the_dwarf_of_pyenv_builds", &python) {
            return;
        }
        // Tables for 3.11/3.12, _Py_DebugOffsets read from the process for 3.13.
        let py = interpreter_of(&python);
        assert_eq!(py.version.to_string(), version);
        let minor = py.version.minor();
        let pairs = offsets_vs_c(&py.offsets, minor);
        let exprs: Vec<String> = pairs.iter().map(|(_, e)| e.clone()).collect();
        let dwarf = gdb_values(&pyenv_libpython(version), &exprs);
        for ((ours, expr), theirs) in pairs.iter().zip(dwarf) {
            assert_eq!(*ours, theirs, "{version}: {expr}");
        }
    }
}

/// The evaluation loop of a live interpreter, cold parts included, where
/// the process maps its code: Debian's stripped 3.11 and pyenv's 3.12.1
/// have one cold part (the unit tests check which), 3.13.0 none.
#[test]
fn a_live_interpreter_has_its_eval_loop_cold_parts() {
    for (python, parts) in [
        (PathBuf::from(DEBIAN_311), 2),
        (pyenv_python("3.12.1"), 2),
        (pyenv_python("3.13.0"), 1),
    ] {
        if !runnable("a_live_interpreter_has_its_eval_loop_cold_parts", &python) {
            return;
        }
        let proc = idle_python(&python);
        let mut py = discover::find(proc.pid(), &ProcessMemory::new(proc.pid())).unwrap();
        assert_eq!(py.eval_loop.parts().len(), 1, "discovery: the symbol only");
        discover::add_cold_parts(proc.pid(), &mut py);
        let found = py.eval_loop.parts().to_vec();
        assert_eq!(found.len(), parts, "{}: {found:x?}", python.display());
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", proc.pid())).unwrap();
        for (start, end) in found {
            let in_code = maps.lines().any(|l| {
                let (range, rest) = l.split_once(' ').unwrap();
                let (lo, hi) = range.split_once('-').unwrap();
                let (lo, hi) = (
                    u64::from_str_radix(lo, 16).unwrap(),
                    u64::from_str_radix(hi, 16).unwrap(),
                );
                rest.starts_with("r-x") && lo <= start && end <= hi && l.ends_with(&py.object)
            });
            assert!(in_code, "{start:x}-{end:x} is not in {}'s code", py.object);
        }
    }
}

/// The thread-name reader's layout against the DWARF of the pyenv builds.
#[test]
fn thread_name_layout_matches_the_dwarf_of_pyenv_builds() {
    for version in ["3.11.7", "3.12.1", "3.13.0"] {
        let lib = pyenv_libpython(version);
        if !lib.exists() {
            eprintln!("skipped: {} is missing", lib.display());
            return;
        }
        let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
        let l = thread_names::NameLayout::for_minor(minor).unwrap();
        let modules = if minor == 11 {
            "modules"
        } else {
            "imports.modules"
        };
        let field = |ty: &str, f: &str| format!("&(({ty}*)0)->{f}");
        let pairs = [
            (l.interp_modules, field("PyInterpreterState", modules)),
            (
                l.heap_type_cached_keys,
                field("PyHeapTypeObject", "ht_cached_keys"),
            ),
            (l.dict_values_data, field("PyDictValues", "values")),
        ];
        let exprs: Vec<String> = pairs.iter().map(|(_, e)| e.clone()).collect();
        let dwarf = gdb_values(&lib, &exprs);
        for ((ours, expr), theirs) in pairs.iter().zip(dwarf) {
            assert_eq!(*ours, theirs, "{version}: {expr}");
        }
    }
}

/// Line numbers of the `# at:NAME` markers of a workload.
fn markers(source: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for (n, line) in source.lines().enumerate() {
        for (tag, rest) in [
            ("at:", line.split("# at:").nth(1)),
            ("burn:", line.split("# burn:").nth(1)),
        ] {
            if let Some(name) = rest {
                out.insert(
                    format!("{tag}{}", name.trim()),
                    u32::try_from(n + 1).unwrap(),
                );
            }
        }
    }
    out
}

struct Workload {
    proc: Proc,
    /// Role (sleep, event, gen, burn, main) → kernel thread id.
    tids: HashMap<String, u32>,
    markers: HashMap<String, u32>,
}

fn start_threads_workload(python: &Path) -> Workload {
    let script = workspace_root().join("tests/workloads/python_threads.py");
    let source = std::fs::read_to_string(&script).expect("read workload");
    let mut proc = Proc::spawn(Command::new(python).arg(&script));
    let mut tids = HashMap::new();
    loop {
        let line = proc.read_line();
        if line == "ready" {
            break;
        }
        let mut words = line.split_whitespace().skip(1);
        let (role, tid) = (words.next().unwrap(), words.next().unwrap());
        tids.insert(role.to_owned(), tid.parse().unwrap());
    }
    assert_eq!(tids.len(), 5, "{tids:?}");
    // The main thread prints "ready" just before it reads stdin: wait until
    // it is blocked in read(2) (syscall 0), where its marker says it is.
    let syscall = format!("/proc/{}/task/{}/syscall", proc.pid(), tids["main"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 ")) {
        assert!(
            Instant::now() < deadline,
            "the main thread never blocks in read"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Workload {
        proc,
        tids,
        markers: markers(&source),
    }
}

/// The frames of `stack` as (qualname, line) pairs from the workload file.
fn workload_frames(stack: &ThreadStack) -> Vec<(String, Option<u32>)> {
    stack
        .frames
        .iter()
        .filter(|f| f.filename.ends_with("/python_threads.py"))
        .map(|f| (f.qualname.clone(), f.line))
        .collect()
}

fn check_chains(label: &str, w: &Workload, stacks: &[ThreadStack]) {
    let by_tid: HashMap<u32, &ThreadStack> = stacks.iter().map(|s| (s.tid, s)).collect();
    let at = |name: &str| Some(w.markers[&format!("at:{name}")]);
    let chain = |names: &[&str]| -> Vec<(String, Option<u32>)> {
        let mut v: Vec<_> = names.iter().map(|n| ((*n).to_owned(), at(n))).collect();
        v.push(("spawn.<locals>.run".to_owned(), at("run")));
        v
    };
    let expected = [
        (
            "sleep",
            chain(&["sleep_a4", "sleep_a3", "sleep_a2", "sleep_a1"]),
        ),
        (
            "event",
            chain(&["event_b4", "évènement_b3", "событие_b2", "event_b1"]),
        ),
        ("gen", chain(&["gen_c4", "gen_c3", "gen_c2", "gen_c1"])),
        ("main", vec![("<module>".to_owned(), at("main"))]),
    ];
    for (role, want) in expected {
        let stack = by_tid
            .get(&w.tids[role])
            .unwrap_or_else(|| panic!("{label}: no stack for thread {role}: {stacks:#?}"));
        assert_eq!(workload_frames(stack), want, "{label}: {role}: {stack:#?}");
        assert_eq!(
            stack.end,
            python::stack::WalkEnd::Complete,
            "{label}: {role}"
        );
        let innermost = &stack.frames[0];
        if role == "event" {
            // Event.wait → Condition.wait in threading.py sit above it.
            assert!(
                innermost.filename.ends_with("/threading.py"),
                "{label}: {innermost}"
            );
        } else {
            assert_eq!(innermost.qualname, want[0].0, "{label}: {role} innermost");
        }
    }
    let burn = workload_frames(by_tid[&w.tids["burn"]]);
    let names: Vec<&str> = burn.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["burn_d2", "burn_d1", "spawn.<locals>.run"],
        "{label}"
    );
    let line = burn[0].1.expect("burning frame has a line");
    assert!(
        (w.markers["burn:first"]..=w.markers["burn:last"]).contains(&line),
        "{label}: burning at line {line}"
    );
}

/// `py-spy dump` of `pid`: thread id → frames as py-spy writes them.
fn py_spy_dump(pid: u32) -> HashMap<u32, Vec<String>> {
    assert!(
        Path::new(PY_SPY).exists(),
        "{PY_SPY} is missing: run `cargo xtask setup`"
    );
    let out = Command::new(PY_SPY)
        .args(["dump", "--pid", &pid.to_string()])
        .output()
        .expect("running py-spy");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spy: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut threads: HashMap<u32, Vec<String>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Thread ") {
            let tid = rest.split_whitespace().next().unwrap();
            let tid = tid
                .parse()
                .unwrap_or_else(|_| panic!("py-spy thread id `{tid}`"));
            threads.insert(tid, Vec::new());
            current = Some(tid);
        } else if let (Some(frame), Some(tid)) = (line.strip_prefix("    "), current) {
            threads.get_mut(&tid).unwrap().push(frame.trim().to_owned());
        }
    }
    threads
}

fn dump_and_compare(label: &str, python: &Path) {
    if !runnable(label, python) {
        return;
    }
    let w = start_threads_workload(python);
    let pid = w.proc.pid();
    let stacks = python::dump(pid).unwrap_or_else(|e| panic!("{label}: {e:#}"));
    check_chains(label, &w, &stacks);
    let ours: HashMap<u32, Vec<String>> = stacks
        .iter()
        .map(|s| (s.tid, s.frames.iter().map(ToString::to_string).collect()))
        .collect();
    let theirs = py_spy_dump(pid);
    let ids = |m: &HashMap<u32, Vec<String>>| m.keys().copied().collect::<BTreeSet<u32>>();
    assert_eq!(ids(&ours), ids(&theirs), "{label}: thread ids");
    let burn = w.tids["burn"];
    for (tid, frames) in &theirs {
        if *tid == burn {
            // Its line moves between the two dumps; its functions do not.
            let strip = |v: &[String]| -> Vec<String> {
                v.iter()
                    .map(|f| f.split(" (").next().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(strip(&ours[tid]), strip(frames), "{label}: burning thread");
        } else {
            assert_eq!(&ours[tid], frames, "{label}: thread {tid}");
        }
    }
}

#[test]
fn dump_of_debian_python311_matches_construction_and_py_spy() {
    dump_and_compare("debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn dump_of_pyenv_python312_matches_construction_and_py_spy() {
    dump_and_compare("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn dump_of_pyenv_python313_matches_construction_and_py_spy() {
    dump_and_compare("pyenv 3.13.0", &pyenv_python("3.13.0"));
}

#[test]
fn a_generator_frame_stands_in_its_chain() {
    for python in [
        PathBuf::from(DEBIAN_311),
        pyenv_python("3.12.1"),
        pyenv_python("3.13.0"),
    ] {
        if !runnable("a_generator_frame_stands_in_its_chain", &python) {
            return;
        }
        let w = start_threads_workload(&python);
        let stacks = python::dump(w.proc.pid()).unwrap();
        let chain = stacks.iter().find(|s| s.tid == w.tids["gen"]).unwrap();
        let names: Vec<&str> = chain.frames.iter().map(|f| f.qualname.as_str()).collect();
        let at = names.iter().position(|&n| n == "gen_c3");
        assert_eq!(
            at.map(|i| (names[i - 1], names[i + 1])),
            Some(("gen_c4", "gen_c2")),
            "{}: {names:?}",
            python.display()
        );
        assert_eq!(chain.frames[at.unwrap()].line, Some(w.markers["at:gen_c3"]));
    }
}

#[test]
fn python310_is_named_unsupported_in_one_line() {
    let python = pyenv_python("3.10.13");
    if !runnable("python310_is_named_unsupported_in_one_line", &python) {
        return;
    }
    let proc = idle_python(&python);
    let err = python::dump(proc.pid()).expect_err("3.10 is not supported");
    let text = format!("{err:#}");
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("Python 3.10 ("), "{text}");
    assert!(text.contains("only native frames are shown"), "{text}");
    assert_eq!(err.downcast_ref::<Unsupported>().unwrap().version, "3.10");
}

#[test]
fn a_dead_process_gives_a_clean_error() {
    let python = pyenv_python("3.12.1");
    if !runnable("a_dead_process_gives_a_clean_error", &python) {
        return;
    }
    // A zombie: the pid exists but its memory is gone.
    let proc = idle_python(&python);
    proc.signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while profiler::process::state(proc.pid()) != Some('Z') {
        assert!(Instant::now() < deadline, "the child did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = format!("{:#}", python::dump(proc.pid()).unwrap_err());
    assert!(err.contains("exited"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn a_process_killed_during_dumps_gives_a_clean_error() {
    let python = pyenv_python("3.13.0");
    if !runnable("a_process_killed_during_dumps_gives_a_clean_error", &python) {
        return;
    }
    // Threads come and go while the dumps run, then the process is killed
    // at an arbitrary point of one of them.
    let churn = "import sys, threading, time\n\
                 def leaf(): time.sleep(0.001)\n\
                 def spawn():\n    \
                     while True:\n        \
                         ts = [threading.Thread(target=leaf) for _ in range(8)]\n        \
                         [t.start() for t in ts]; [t.join() for t in ts]\n\
                 threading.Thread(target=spawn, daemon=True).start()\n\
                 print('ready', flush=True); sys.stdin.readline()";
    let mut proc = Proc::spawn(Command::new(&python).args(["-c", churn]));
    proc.expect_line("ready");
    let pid = proc.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
    });
    let mut ok = 0;
    let err = loop {
        match python::dump(pid) {
            Ok(stacks) => {
                assert!(!stacks.is_empty());
                ok += 1;
            }
            Err(err) => break format!("{err:#}"),
        }
    };
    killer.join().unwrap();
    assert!(ok > 0, "no dump succeeded before the kill");
    assert!(err.contains("exited"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}
