//! Python frames in heap stacks the kernel copied because the unwind
//! tables of their code were not loaded yet (a C extension imported a
//! moment before it allocates: tests/workloads/python_copied_stacks.py).
//! Few stacks, so that the kernel's copy rate limit leaves them all.
//! The copy is unwound once the tables are there, and the Python frames
//! recorded with the event are merged into the unwound stack as into any
//! other, on Debian's python3.11 and pyenv's 3.12 and 3.13.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use prof_bpf_tests::{Proc, require_bpf, run_prof_bpf, start_prof_bpf, workspace_root};

const DEBIAN_311: &str = "/usr/bin/python3.11";
const BUFFERS: u64 = 20;
const BUFFER: u64 = 1 << 16;

fn pyenv_python(version: &str) -> PathBuf {
    let minor = &version[..version.rfind('.').unwrap()];
    Path::new("/root/.pyenv/versions").join(format!("{version}/bin/python{minor}"))
}

fn copied_stacks_get_their_python_frames(label: &str, python: &Path) {
    assert!(python.exists(), "{} is missing", python.display());
    let script = workspace_root().join("tests/workloads/python_copied_stacks.py");
    let mut workload = Proc::spawn(Command::new(python).arg(&script));
    workload.expect_line("ready");
    let dir = std::env::temp_dir().join(format!(
        "prof-bpf-python-copies-{}-{}",
        label.replace(' ', "-"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_str().unwrap();
    let pid = workload.pid().to_string();
    let (prof, _) = start_prof_bpf(
        &["heap", "--pid", &pid, "--sample-bytes", "0", "-o", file_arg],
        "prof-bpf: heap: attached",
    );
    workload.send_line("go");
    workload.expect_line("grown");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().unwrap();
    assert!(out.status.success(), "{label}: prof-bpf heap failed");
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
    let (folded, text) = (report("folded"), report("text"));
    let field = |line: &str, name: &str| -> u64 {
        line.split(", ")
            .find_map(|f| f.trim().strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{label}: no `{name}` in {line}"))
    };
    let copies = text
        .lines()
        .find(|l| l.contains("stack copies: "))
        .unwrap_or_else(|| panic!("{label}: no copy counters:\n{text}"));
    let python = text
        .lines()
        .find(|l| l.contains("python frames: "))
        .unwrap_or_else(|| panic!("{label}: no Python counters:\n{text}"));
    eprintln!("{label}: {copies}\n{label}: {python}");
    assert!(
        field(copies, "unwound") > 0,
        "{label}: no stack was copied and unwound, the test does not test: {copies}"
    );
    // Every activation found its evaluation-loop frame: merged into the
    // frames walked before the copy, they would not have.
    assert_eq!(
        field(python, "activations without an eval-loop frame"),
        0,
        "{label}: {python}"
    );
    // The strings (allocated by _json.so right after its import: copied
    // stacks; those of make_buffers through PyUnicode_New, not in the
    // import), under their Python chain, in stacks complete to _start.
    let (mut buffers, mut cut) = (0, 0);
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        let Some(at) = frames.iter().position(|f| f.starts_with("make_buffers (")) else {
            continue;
        };
        let n: u64 = n.parse().unwrap();
        let buffer = frames.contains(&"PyUnicode_New")
            && !frames.contains(&"PyImport_ImportModuleLevelObject");
        if !buffer {
            cut += u32::from(frames[0] != "_start");
            continue;
        }
        assert!(
            frames[0] == "_start" && frames[at - 1].starts_with("level1 ("),
            "{label}: {stack}"
        );
        buffers += n;
    }
    eprintln!("{label}: other stacks under make_buffers cut short: {cut}");
    assert!(buffers >= BUFFERS * BUFFER, "{label}:\n{folded}");
}

#[test]
fn copied_stacks_get_their_python_frames_on_debian_python311() {
    require_bpf!();
    copied_stacks_get_their_python_frames("Debian 3.11", Path::new(DEBIAN_311));
}

#[test]
fn copied_stacks_get_their_python_frames_on_pyenv_python312() {
    require_bpf!();
    copied_stacks_get_their_python_frames("pyenv 3.12.1", &pyenv_python("3.12.1"));
}

#[test]
fn copied_stacks_get_their_python_frames_on_pyenv_python313() {
    require_bpf!();
    copied_stacks_get_their_python_frames("pyenv 3.13.0", &pyenv_python("3.13.0"));
}
