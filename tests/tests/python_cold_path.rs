//! A heap stack through the evaluation loop's cold part on Debian's
//! stripped /usr/bin/python3.11 (tests/workloads/python_traced_join.py).
//!
//! GCC (with the build's profile-guided optimization) moved the paths the
//! training run never took out of `_PyEval_EvalFrameDefault` into a part no
//! symbol names. One of them is reachable on demand: with a trace function
//! set, a method descriptor called with `*args` goes through
//! `do_call_core`'s traced path, which calls `_PyObject_FastCallDictTstate`
//! from the cold part. (Found by uprobes on each call instruction of the
//! cold part while Python snippets ran; python3.11-dbg's `.symtab` names
//! the part `_PyEval_EvalFrameDefault.cold`.) The workload's `bytes.join`
//! there allocates a known size from malloc under a known Python chain.
//!
//! Every allocation is tracked (malloc uprobes). With `--python-frames
//! native` the activation's only native frame between `PyEval_EvalCode`
//! and `_PyObject_FastCallDictTstate` is in code no `.dynsym` symbol covers
//! (readelf is the oracle): the cold part. In the default mixed view the
//! Python chain stands exactly there; an activation whose frame was not
//! taken for the evaluation loop would have its Python frames put at the
//! outer end of the stack (beyond `_start`) instead, and be counted.
use std::{path::Path, process::Command, time::Duration};

use prof_bpf_tests::{Proc, require_bpf, run_prof_bpf, start_prof_bpf, workspace_root};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const SCRIPT: &str = "python_traced_join.py";
/// Objects the workload makes per profiled run.
const ROUNDS: i64 = 5;
/// Bytes of one: 256 parts of 4096 bytes, and the bytes object's header
/// and NUL (`offsetof(PyBytesObject, ob_sval) + 1`).
const JOINED: i64 = 256 * 4096 + 33;
/// The native frames on either side of the traced call.
const CALLEE: &str = "_PyObject_FastCallDictTstate";
const ENTRY: &str = "PyEval_EvalCode";
/// Where the joined object is allocated (the join's other allocation, a
/// temporary array of buffer views, is left out).
const LEAF: &str = "PyBytes_FromStringAndSize";

/// `function (script:LINE)` of the workload line holding `marker`.
fn python_frame(function: &str, marker: &str) -> String {
    let text = std::fs::read_to_string(workspace_root().join("tests/workloads").join(SCRIPT))
        .expect("read the workload");
    let line = text.lines().position(|l| l.contains(marker)).unwrap() + 1;
    format!("{function} ({SCRIPT}:{line})")
}

/// What one profiled run gave: folded stacks (outermost first) and the
/// text report's notes.
struct Run {
    folded: String,
    text: String,
}

/// `prof-bpf heap --pid` with every allocation tracked and
/// `--python-frames mode`, while the workload makes ROUNDS objects.
fn profile(w: &mut Proc, mode: &str) -> Run {
    let dir = std::env::temp_dir().join(format!(
        "prof-bpf-python-cold-{mode}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file = file.to_str().unwrap();
    let pid = w.pid().to_string();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--pid",
            &pid,
            "--sample-bytes",
            "0",
            "--python-frames",
            mode,
            "-o",
            file,
        ],
        "prof-bpf: heap: attached",
    );
    w.send_line(&format!("go {ROUNDS}"));
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().unwrap();
    assert!(out.status.success(), "{mode}: prof-bpf heap failed");
    let report = |format: &str| {
        let (stdout, stderr, code) = run_prof_bpf(&[
            "report",
            "--format",
            format,
            "--group-by",
            "none",
            "--sample-type",
            "alloc_space",
            file,
        ]);
        assert_eq!(code, 0, "{mode}: {stderr}");
        stdout
    };
    let run = Run {
        folded: report("folded"),
        text: report("text"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// The stacks of the joined objects (those through the traced call to
/// [`LEAF`]), as (frames, bytes); the bytes they hold together are checked
/// to be the workload's.
fn joined(run: &Run, mode: &str) -> Vec<(Vec<String>, i64)> {
    let stacks: Vec<(Vec<String>, i64)> = run
        .folded
        .lines()
        .filter_map(|l| {
            let (stack, n) = l.rsplit_once(' ')?;
            let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
            (frames.iter().any(|f| f == CALLEE) && frames.last().is_some_and(|f| f == LEAF))
                .then(|| (frames, n.parse().unwrap()))
        })
        .collect();
    let bytes: i64 = stacks.iter().map(|(_, n)| n).sum();
    assert_eq!(
        bytes,
        ROUNDS * JOINED,
        "{mode}: the joined objects' bytes, {LEAF} under {CALLEE}:\n{}",
        run.folded
    );
    stacks
}

/// `(address, size)` of the sized functions of `elf`'s `.dynsym`, and the
/// virtual address of file offset `offset` (readelf as the oracle).
fn dynsym_functions_and_address(elf: &str, offset: u64) -> (Vec<(u64, u64, String)>, u64) {
    let readelf = |args: &[&str]| {
        let out = Command::new("readelf")
            .args(args)
            .arg(elf)
            .output()
            .unwrap();
        assert!(out.status.success(), "readelf {args:?} {elf}");
        String::from_utf8(out.stdout).unwrap()
    };
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let functions = readelf(&["--dyn-syms", "-W"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[3] == "FUNC").then(|| {
                let size = f[2].parse::<u64>().unwrap_or_else(|_| hex(f[2]));
                (hex(f[1]), size, f[7].to_owned())
            })
        })
        .filter(|&(_, size, _)| size > 0)
        .collect();
    // LOAD  Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align
    let address = readelf(&["-lW"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"LOAD")).then(|| (hex(f[1]), hex(f[2]), hex(f[4])))
        })
        .find(|&(file_offset, _, size)| (file_offset..file_offset + size).contains(&offset))
        .map(|(file_offset, vaddr, _)| vaddr + (offset - file_offset))
        .unwrap_or_else(|| panic!("offset {offset:#x} is in no load segment of {elf}"));
    (functions, address)
}

#[test]
fn a_stack_through_the_eval_loops_cold_part_gets_its_python_frames() {
    require_bpf!();
    assert!(
        Path::new(DEBIAN_311).exists(),
        "{DEBIAN_311} is missing: run `cargo xtask setup`"
    );
    let chain = [
        python_frame("<module>", "MODULE-CALL"),
        python_frame("serve", "SERVE-CALL"),
        python_frame("handle", "HANDLE-CALL"),
        python_frame("join_traced", "JOIN-SITE"),
    ];
    let mut w = Proc::spawn(
        Command::new(DEBIAN_311).arg(workspace_root().join("tests/workloads").join(SCRIPT)),
    );
    w.expect_line("ready");

    // Native frames only: the activation's frame is unnamed code.
    let native = profile(&mut w, "native");
    for (frames, _) in joined(&native, "native") {
        let at = frames.iter().position(|f| f == CALLEE).unwrap();
        let stack = frames.join(";");
        assert!(
            at >= 2 && frames[at - 2] == ENTRY,
            "native: one frame between {ENTRY} and {CALLEE}: {stack}"
        );
        let frame = &frames[at - 1];
        let offset = frame
            .strip_prefix("python3.11+0x")
            .map(|o| u64::from_str_radix(o, 16).unwrap())
            .unwrap_or_else(|| {
                panic!(
                    "native: the caller of {CALLEE} is named ({frame}): this build no longer \
                     calls it from an unnamed cold part, the workload does not test it: {stack}"
                )
            });
        let (functions, address) = dynsym_functions_and_address(DEBIAN_311, offset);
        let covering: Vec<&String> = functions
            .iter()
            .filter(|(start, size, _)| (*start..start + size).contains(&address))
            .map(|(_, _, name)| name)
            .collect();
        assert!(
            covering.is_empty(),
            "native: {frame} (address {address:#x}) is in {covering:?}, not in unnamed code"
        );
        let (eval, eval_size, _) = functions
            .iter()
            .find(|(_, _, name)| name == "_PyEval_EvalFrameDefault")
            .expect("the evaluation loop is exported");
        eprintln!(
            "native: {CALLEE} called from {address:#x}, outside every .dynsym function \
             (_PyEval_EvalFrameDefault: {eval:#x}-{:#x})",
            eval + eval_size
        );
    }

    // Mixed (the default): the Python chain in place of that frame.
    let mixed = profile(&mut w, "mixed");
    for (frames, _) in joined(&mixed, "mixed") {
        let at = frames.iter().position(|f| f == CALLEE).unwrap();
        let stack = frames.join(";");
        assert!(
            at > chain.len() && frames[at - chain.len()..at] == chain,
            "mixed: {chain:?} right above {CALLEE}: {stack}"
        );
        assert_eq!(
            frames[at - chain.len() - 1],
            ENTRY,
            "mixed: the chain right below {ENTRY}: {stack}"
        );
    }
    let python = mixed
        .text
        .lines()
        .find(|l| l.contains("python frames: "))
        .unwrap_or_else(|| panic!("mixed: no Python counters:\n{}", mixed.text));
    assert!(
        python.contains("activations without an eval-loop frame 0,"),
        "mixed: {python}"
    );
    // The end of its input ends the workload, unharmed.
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0, "the workload's exit status");
}
