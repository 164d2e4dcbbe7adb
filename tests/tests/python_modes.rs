//! Python frames in leak mode, after the target exits, in coroutines and
//! generators (read back by `go tool pprof`), and `prof-bpf python-dump`
//! against `py-spy dump`; every test on Debian's stripped python3.11 and
//! pyenv's shared 3.12.1 and 3.13.0. Known by construction: the workloads'
//! chains and block sizes; oracles: py-spy and go tool pprof.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use prof_bpf_tests::{
    Proc, is_root, parse_folded, prof_bpf, require_bpf, run_prof_bpf, start_following,
    start_prof_bpf, workspace_root,
};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const PYENV: &str = "/root/.pyenv/versions";
/// py-spy as `cargo xtask setup` installs it (see `xtask/src/setup.rs`).
const PY_SPY: &str = "/var/cache/prof-bpf-tools/venv/bin/py-spy";
/// `python_leak_chain.py`: bytes one bytearray of its BLOCK allocates.
const LEAK_BLOCK: u64 = (1 << 20) + 1;

fn pyenv_python(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new(PYENV).join(format!("{version}/bin/python{minor}"))
}

fn interpreters() -> [(&'static str, PathBuf); 3] {
    [
        ("Debian 3.11", PathBuf::from(DEBIAN_311)),
        ("pyenv 3.12.1", pyenv_python("3.12.1")),
        ("pyenv 3.13.0", pyenv_python("3.13.0")),
    ]
}

fn workload(name: &str) -> PathBuf {
    workspace_root().join("tests/workloads").join(name)
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-python-modes-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The function names of a stack (`qualname (file.py:LINE)` → `qualname`).
fn names(frames: &[String]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f.split_once(" (").map_or(f.as_str(), |(n, _)| n))
        .collect()
}

/// The leak chain's frames as `--python-frames python` shows them.
const LEAK_CHAIN: [&str; 7] = [
    "<module>", "main", "level1", "level2", "level3", "level4", "keep",
];

/// `heap --pid --leaks --python-frames python` while the workload keeps a
/// bytearray of 1 MiB per round from its 5-deep chain and allocates and
/// frees another: the leak is exactly the kept bytes, under exactly that
/// chain (only Python frames, in order, lines from the source), and the
/// function that frees is absent.
#[test]
fn leak_mode_names_the_python_chain_that_keeps_memory() {
    require_bpf!();
    let rounds: u32 = 24;
    for (label, python) in interpreters() {
        let mut w = Proc::spawn(Command::new(&python).arg(workload("python_leak_chain.py")));
        w.expect_line("ready");
        let pid = w.pid().to_string();
        let (prof, _) = start_prof_bpf(
            &[
                "heap",
                "--pid",
                &pid,
                "--leaks",
                "--interval",
                "0.4",
                "--python-frames",
                "python",
                "--format",
                "folded",
                "--group-by",
                "none",
                "--sample-type",
                "inuse_space",
            ],
            "attached",
        );
        w.send_line(&format!("go {rounds}"));
        w.expect_line("done");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(prof.id().cast_signed(), libc::SIGINT) };
        let out = prof.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{label}: prof-bpf heap failed");
        let stacks = parse_folded(&text);
        let kept: Vec<&(Vec<String>, u64)> = stacks
            .iter()
            .filter(|(f, _)| names(f).last() == Some(&"keep"))
            .collect();
        assert_eq!(
            kept.len(),
            1,
            "{label}: one leaking stack for keep:\n{text}"
        );
        let (frames, bytes) = kept[0];
        eprintln!(
            "{label}: leak under keep {bytes} B, by construction {} B",
            u64::from(rounds) * LEAK_BLOCK
        );
        assert_eq!(names(frames), LEAK_CHAIN, "{label}:\n{text}");
        assert!(
            frames.iter().all(|f| f.contains("(python_leak_chain.py:")),
            "{label}: only Python frames: {frames:?}"
        );
        assert_eq!(*bytes, u64::from(rounds) * LEAK_BLOCK, "{label}:\n{text}");
        assert!(!text.contains("churn"), "{label}: churn leaks:\n{text}");
        w.send_line("exit");
    }
}

/// `heap --pid` on a workload that exits while it is profiled: the
/// report ends with the process, and every block has its Python chain,
/// named while the process lived: keep and churn each allocated exactly
/// their blocks, `--python-lines off` names them by function.
#[test]
fn a_process_that_exits_mid_run_keeps_its_python_frames() {
    require_bpf!();
    let rounds: u32 = 10;
    for (label, python) in interpreters() {
        let mut w = Proc::spawn(Command::new(&python).arg(workload("python_leak_chain.py")));
        w.expect_line("ready");
        let pid = w.pid().to_string();
        let (prof, _, later) = start_following(
            &prof_bpf(),
            &[
                "heap",
                "--pid",
                &pid,
                "--sample-bytes",
                "0",
                "--python-lines",
                "off",
                "--format",
                "folded",
                "--group-by",
                "none",
                "--sample-type",
                "alloc_space",
            ],
            "attached",
        );
        w.send_line(&format!("go {rounds}"));
        w.expect_line("done");
        // The program ends; the session ends with it.
        w.send_line("exit");
        let out = prof.wait_with_output().unwrap();
        let stderr: Vec<String> = later.try_iter().collect();
        let stderr = stderr.join("\n");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{label}: {}: {stderr}", out.status);
        assert!(stderr.contains("it exited"), "{label}: {stderr}");
        assert!(
            !text.contains("[python code unreadable]"),
            "{label}:\n{text}"
        );
        let stacks = parse_folded(&text);
        for leaf in ["keep", "churn"] {
            let chain = format!(
                "main (python_leak_chain.py);level1 (python_leak_chain.py);level2 \
                 (python_leak_chain.py);level3 (python_leak_chain.py);level4 \
                 (python_leak_chain.py);{leaf} (python_leak_chain.py);"
            );
            let bytes: u64 = stacks
                .iter()
                .filter(|(f, _)| (f.join(";") + ";").contains(&chain))
                .map(|(_, n)| n)
                .sum();
            eprintln!("{label}: {leaf} allocated {bytes} B");
            assert_eq!(bytes, u64::from(rounds) * LEAK_BLOCK, "{label}:\n{text}");
        }
    }
}

/// `go tool pprof` output of one profile file.
fn go_pprof(dir: &Path, args: &[&str], file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .env("HOME", dir)
        .output()
        .expect("run go tool pprof");
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CPU samples of Python threads carry their Python names
/// (`python_thread`), as `go tool pprof -tags` lists them: the main thread
/// and two named threads burning alike, each with a good share.
#[test]
fn cpu_samples_carry_python_thread_names() {
    require_bpf!();
    for (label, python) in interpreters() {
        let dir = scratch(&format!("names-{}", label.replace(' ', "-")));
        let file = dir.join("cpu.pb.gz");
        let script = workload("python_named_threads.py");
        let (_, stderr, code) = run_prof_bpf(&[
            "cpu",
            "--format",
            "pprof",
            "-o",
            file.to_str().unwrap(),
            "--",
            python.to_str().unwrap(),
            script.to_str().unwrap(),
            "3",
        ]);
        assert_eq!(code, 0, "{label}: {stderr}");
        let tags = go_pprof(&dir, &["-tags"], &file);
        let section = tags
            .split("\n\n")
            .find(|s| s.trim_start().starts_with("python_thread:"))
            .unwrap_or_else(|| panic!("{label}: no python_thread label in\n{tags}"));
        for name in ["MainThread", "alpha", "beta"] {
            let share: f64 = section
                .lines()
                .find(|l| l.trim_end().ends_with(&format!(": {name}")))
                .and_then(|l| l.split('(').nth(1)?.split('%').next()?.parse().ok())
                .unwrap_or_else(|| panic!("{label}: {name} missing in\n{section}"));
            assert!(share > 15.0, "{label}: {name} has {share}%:\n{section}");
        }
    }
}

/// `go tool pprof -traces`: each trace's functions (leaf first) and value
/// in milliseconds.
fn traces(text: &str) -> Vec<(Vec<String>, f64)> {
    let mut out = Vec::new();
    for block in text.split("-----------+").skip(1) {
        let mut frames = Vec::new();
        let mut value = 0.0;
        for line in block.lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.contains(":  ") {
                continue;
            }
            if let Some((v, name)) = line.split_once("ms ") {
                value = v.trim().parse().unwrap_or(0.0);
                frames.push(name.trim().to_owned());
            } else {
                frames.push(line.to_owned());
            }
        }
        out.push((frames, value));
    }
    out
}

/// A CPU profile of a coroutine chain (asyncio: serve -> handle, both
/// `async def`) and a generator chain (serve -> consume -> produce), the
/// same work under each: in the pprof file the frames stand in their
/// chains with their functions, files and lines apart (`go tool pprof
/// -traces` and `-list` as the oracle), splitting the work about evenly.
#[test]
fn coroutine_and_generator_frames_stand_under_their_chains_in_pprof() {
    require_bpf!();
    for (label, python) in interpreters() {
        let script = workload("python_async_gen.py");
        let mut w = Proc::spawn(Command::new(&python).arg(&script).arg("30"));
        w.expect_line("ready");
        let dir = scratch(&label.replace(' ', "-"));
        let file = dir.join("cpu.pb.gz");
        let (_, stderr, code) = run_prof_bpf(&[
            "cpu",
            "--pid",
            &w.pid().to_string(),
            "-F",
            "499",
            "--duration",
            "2",
            "--python-frames",
            "python",
            "-o",
            file.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{label}: {stderr}");
        drop(w);
        let text = go_pprof(&dir, &["-traces"], &file);
        let (mut coroutine, mut generator, mut total) = (0.0, 0.0, 0.0);
        for (frames, ms) in traces(&text) {
            total += ms;
            let stack = frames.join(";");
            if stack.starts_with("spin;handle;serve;") {
                coroutine += ms;
            } else if stack.starts_with("spin;produce;consume;serve;") {
                generator += ms;
            }
        }
        let share = coroutine / (coroutine + generator);
        eprintln!(
            "{label}: coroutine {coroutine:.0} ms, generator {generator:.0} ms of {total:.0} ms"
        );
        assert!(
            coroutine + generator >= 0.7 * total,
            "{label}: the chains hold {:.0} of {total:.0} ms:\n{text}",
            coroutine + generator
        );
        assert!(
            (share - 0.5).abs() < 0.15,
            "{label}: coroutine share {share:.2}"
        );
        // -list finds the source by the file name and puts the samples on
        // the loop's lines.
        let source = std::fs::read_to_string(&script).unwrap();
        let body = |needle: &str| 1 + source.lines().position(|l| l.contains(needle)).unwrap();
        let listing = go_pprof(&dir, &["-list", "^spin$"], &file);
        assert!(
            listing.contains(&format!(
                "ROUTINE ======================== spin in {}",
                script.display()
            )),
            "{label}:\n{listing}"
        );
        let mut on_lines = BTreeMap::new();
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [flat, _, number, ..] = words[..]
                && let Some(n) = number
                    .strip_suffix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                && flat != "."
            {
                on_lines.insert(n, flat.to_owned());
            }
        }
        let lines: Vec<usize> = on_lines.keys().copied().collect();
        assert!(
            lines.contains(&body("total += i * i"))
                && lines
                    .iter()
                    .all(|&n| (body("def spin(n)")..=body("return total")).contains(&n)),
            "{label}: samples on lines {on_lines:?}:\n{listing}"
        );
    }
}

/// The threads said to hold the GIL in a dump (`Thread TID (...+gil)`).
fn gil_holders(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Thread "))
        .filter(|rest| rest.contains("+gil)"))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// Thread id → frames of a dump in py-spy's layout (`Thread TID ...`,
/// then one indented frame a line).
fn parse_dump(text: &str) -> HashMap<u32, Vec<String>> {
    let mut threads: HashMap<u32, Vec<String>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Thread ") {
            let tid = rest.split_whitespace().next().unwrap().parse().unwrap();
            threads.insert(tid, Vec::new());
            current = Some(tid);
        } else if let (Some(frame), Some(tid)) = (line.strip_prefix("    "), current) {
            threads.get_mut(&tid).unwrap().push(frame.trim().to_owned());
        }
    }
    threads
}

/// Thread id → the name in quotes of its `Thread TID (...): "NAME"` line.
fn dump_names(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Thread ")?;
            let tid = rest.split_whitespace().next()?.parse().ok()?;
            let name = rest.split_once(": \"")?.1.strip_suffix('"')?;
            Some((tid, name.to_owned()))
        })
        .collect()
}

/// `prof-bpf python-dump` and `py-spy dump` of a process whose three
/// threads block in three distinct 4-deep chains (sleep, Event.wait, a
/// generator) while a fourth burns CPU: the same threads, each with the
/// same frames (the burning thread's lines move between the two reads,
/// its functions do not), and the burning thread holding the GIL.
#[test]
fn python_dump_agrees_with_py_spy_dump() {
    if !is_root() {
        eprintln!("skipping python_dump_agrees_with_py_spy_dump: not root");
        return;
    }
    assert!(
        Path::new(PY_SPY).exists(),
        "{PY_SPY} is missing: run `cargo xtask setup`"
    );
    for (label, python) in interpreters() {
        let mut w = Proc::spawn(Command::new(&python).arg(workload("python_threads.py")));
        let mut roles = HashMap::new();
        loop {
            let line = w.read_line();
            if line == "ready" {
                break;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            roles.insert(words[1].to_owned(), words[2].parse::<u32>().unwrap());
        }
        let pid = w.pid().to_string();
        // The main thread may still be between printing "ready" and
        // blocking in readline when the first pair of dumps is taken:
        // take the pair again until every blocked thread is settled.
        let mut attempt = 0;
        let (ours, theirs, names_ours, names_theirs) = loop {
            attempt += 1;
            let (ours_text, stderr, code) = run_prof_bpf(&["python-dump", "--pid", &pid]);
            assert_eq!(code, 0, "{label}: {stderr}");
            let spy = Command::new(PY_SPY)
                .args(["dump", "--pid", &pid])
                .output()
                .expect("running py-spy");
            assert!(spy.status.success(), "{label}: py-spy failed");
            let spy_text = String::from_utf8_lossy(&spy.stdout).into_owned();
            // The burning thread is the only one that wants the GIL: it
            // holds it in both dumps.
            assert_eq!(
                gil_holders(&ours_text),
                [roles["burn"]],
                "{label}:\n{ours_text}"
            );
            assert_eq!(
                gil_holders(&spy_text),
                [roles["burn"]],
                "{label}:\n{spy_text}"
            );
            let (ours, theirs) = (parse_dump(&ours_text), parse_dump(&spy_text));
            let settled = roles
                .iter()
                .filter(|(role, _)| *role != "burn")
                .all(|(_, tid)| ours.get(tid) == theirs.get(tid));
            if settled || attempt == 5 {
                break (ours, theirs, dump_names(&ours_text), dump_names(&spy_text));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let mut tids: Vec<&u32> = ours.keys().collect();
        tids.sort();
        let mut want: Vec<&u32> = theirs.keys().collect();
        want.sort();
        assert_eq!(tids, want, "{label}: thread ids");
        for (role, tid) in &roles {
            let (a, b) = (&ours[tid], &theirs[tid]);
            if role == "burn" {
                // The two dumps are taken at different moments: the loop
                // may be inside `stop.is_set()` in one of them. From
                // burn_d2 outwards the stacks are the same.
                let strip = |v: &[String]| {
                    let names = names(v);
                    let from = names.iter().position(|&n| n == "burn_d2").unwrap_or(0);
                    names[from..].join(";")
                };
                assert_eq!(strip(a), strip(b), "{label}: burning thread");
            } else {
                assert_eq!(a, b, "{label}: thread {role} ({tid})");
            }
        }
        // Thread names: the workload names each thread after its role.
        assert_eq!(names_ours, names_theirs, "{label}: thread names");
        for (role, tid) in &roles {
            let want = if role == "main" { "MainThread" } else { role };
            assert_eq!(names_ours[tid], want, "{label}: name of thread {tid}");
        }
        let chain = |role: &str| names(&ours[&roles[role]]).join(";");
        assert!(chain("sleep").starts_with("sleep_a4;sleep_a3;sleep_a2;sleep_a1;"));
        assert!(chain("gen").starts_with("gen_c4;gen_c3;gen_c2;gen_c1;"));
        assert!(chain("event").contains(";event_b4;évènement_b3;событие_b2;event_b1;"));
        assert!(chain("burn").starts_with("burn_d2;burn_d1;"));
        eprintln!("{label}: {} threads, same chains as py-spy", ours.len());
    }
}

/// An interpreter this build cannot read (3.10) is named in one line, and
/// the dump fails.
#[test]
fn python_dump_of_python310_says_so_in_one_line() {
    if !is_root() {
        eprintln!("skipping python_dump_of_python310_says_so_in_one_line: not root");
        return;
    }
    let mut w = Proc::spawn(Command::new(pyenv_python("3.10.13")).args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.readline()",
    ]));
    w.expect_line("ready");
    let (out, stderr, code) = run_prof_bpf(&["python-dump", "--pid", &w.pid().to_string()]);
    assert_ne!(code, 0, "{out}");
    prof_bpf_tests::assert_one_line_error(&stderr, code, "Python 3.10 (");
    assert!(stderr.contains("only native frames are shown"), "{stderr}");
}

/// CPU time per thread id in folded stacks grouped by thread
/// (`comm-PID/TID;...`).
fn per_thread(text: &str) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    for (frames, n) in parse_folded(text) {
        let tid = frames[0].rsplit('/').next().unwrap().parse().unwrap();
        *out.entry(tid).or_default() += n;
    }
    out
}

/// `cpu --gil` on two busy threads, one running Python code (it holds the
/// GIL), one hashing in C with the GIL released: without `--gil` both
/// take CPU time; with it, only the first is left (the hashing thread
/// holds the GIL only between two hashes).
#[test]
fn gil_keeps_only_the_thread_holding_the_gil() {
    require_bpf!();
    for (label, python) in interpreters() {
        let mut w = Proc::spawn(
            Command::new(&python)
                .arg(workload("python_gil.py"))
                .arg("60"),
        );
        let mut roles = HashMap::new();
        loop {
            let line = w.read_line();
            if line == "ready" {
                break;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            roles.insert(words[1].to_owned(), words[2].parse::<u32>().unwrap());
        }
        let pid = w.pid().to_string();
        let profile = |gil: bool| {
            let mut args = vec![
                "cpu",
                "--pid",
                &pid,
                "-F",
                "499",
                "--duration",
                "2",
                "--group-by",
                "thread",
                "--python-frames",
                "python",
                "--format",
                "folded",
            ];
            if gil {
                args.push("--gil");
            }
            let (out, stderr, code) = run_prof_bpf(&args);
            assert_eq!(code, 0, "{label}: {stderr}");
            let threads = per_thread(&out);
            let total: u64 = threads.values().sum();
            let share = |role: &str| {
                threads.get(&roles[role]).copied().unwrap_or(0) as f64 / total.max(1) as f64
            };
            (share("spin"), share("digest"), out)
        };
        let (spin, digest, all) = profile(false);
        let (gil_spin, gil_digest, held) = profile(true);
        eprintln!(
            "{label}: without --gil spin {spin:.2} digest {digest:.2}; with --gil spin \
             {gil_spin:.2} digest {gil_digest:.2}"
        );
        assert!(digest >= 0.2 && spin >= 0.2, "{label}:\n{all}");
        assert!(gil_digest <= 0.05 && gil_spin >= 0.9, "{label}:\n{held}");
    }
}
