//! Stacks of the biggest real binaries: rustc (`librustc_driver`,
//! BOLT-split, and the toolchain's `libLLVM`; rustc runs the compiler on a
//! stack that `psm` switches to).
//!
//! The test stops the program once its libraries are mapped, start
//! `cpu -p` (which builds the tables before it samples) and let the program
//! go: every sample is walked with the tables, so they test the rules, the
//! row storage and the depth.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prof_bpf_tests::{Proc, big_rust_source, require_bpf, start_prof_bpf};

/// Share of a program's samples that must be complete, in percent. The
/// goal is 99; rustc reaches 98.0-99.3% over runs (what remains: thread
/// start and exit, futex waits, a few libLLVM pcs that no FDE covers), so
/// the test holds the line at 97 and prints the figure.
const MIN_COMPLETE: f64 = 97.0;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("prof-bpf-unwind-big").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The folded stacks of `prog`'s processes (root frame `prog-PID`), frames
/// root first, with their values.
fn stacks_of(folded: &Path, prog: &str) -> Vec<(Vec<String>, u64)> {
    let text = std::fs::read_to_string(folded).expect("read folded output");
    text.lines()
        .filter_map(|line| {
            let (stack, value) = line.rsplit_once(' ')?;
            let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
            frames[0]
                .starts_with(&format!("{prog}-"))
                .then(|| Some((frames, value.parse().ok()?)))?
        })
        .collect()
}

/// Functions where a process's or a thread's stack starts.
const THREAD_STARTS: &[&str] = &[
    "_start",
    "_dl_start_user",
    "clone3",
    "clone",
    "start_thread",
];

/// Checks that at least [`MIN_COMPLETE`]% of `prog`'s samples are complete
/// (no `[truncated]` or `[missing user stack]` frame, and the outermost
/// frame starts a process or thread: a walk that merely stopped on a zero
/// frame pointer is not complete) and that the samples reach code whose
/// names contain each of `needles`; prints the numbers.
fn assert_complete(folded: &Path, prog: &str, needles: &[&str]) {
    let stacks = stacks_of(folded, prog);
    let total: u64 = stacks.iter().map(|s| s.1).sum();
    assert!(total > 0, "no samples of {prog}");
    let cut = |f: &[String]| {
        f.iter()
            .any(|x| x == "[truncated]" || x == "[missing user stack]")
            || !f
                .get(1)
                .is_some_and(|root| THREAD_STARTS.contains(&root.as_str()))
    };
    let complete: u64 = stacks.iter().filter(|s| !cut(&s.0)).map(|s| s.1).sum();
    let pct = 100.0 * complete as f64 / total as f64;
    let deepest = stacks.iter().map(|s| s.0.len() - 1).max().unwrap_or(0);
    // Where the walks that did not reach a thread start stopped.
    let mut stopped: Vec<&str> = stacks
        .iter()
        .filter(|s| cut(&s.0))
        .filter_map(|s| s.0.get(1).map(String::as_str))
        .collect();
    stopped.sort_unstable();
    stopped.dedup();
    stopped.truncate(12);
    eprintln!(
        "{prog}: {complete} of {total} ns complete ({pct:.2}%), {} stacks, deepest {deepest} \
         frames; incomplete stacks start at {stopped:?}",
        stacks.len()
    );
    for needle in needles {
        assert!(
            stacks
                .iter()
                .any(|s| !cut(&s.0) && s.0.iter().any(|f| f.contains(needle))),
            "no complete {prog} stack reaches a function named like `{needle}`"
        );
    }
    assert!(
        pct >= MIN_COMPLETE,
        "{prog}: only {pct:.2}% of the samples are complete (want {MIN_COMPLETE}%)"
    );
}

/// `cpu -p` on `cmd`, stopped once it maps `libs` and resumed once
/// sampling: the folded output of its whole run.
fn sample_stopped(name: &str, cmd: &mut Command, libs: &[&str]) -> PathBuf {
    let out = scratch(&format!("{name}-out")).join("cpu.folded");
    let program = Proc::spawn(cmd);
    for lib in libs {
        program.wait_mapped(lib);
    }
    program.signal(libc::SIGSTOP);
    let pid = program.pid().to_string();
    let (prof, _) = start_prof_bpf(
        &["cpu", "-p", &pid, "-F", "999", "-o", out.to_str().unwrap()],
        "sampling",
    );
    program.signal(libc::SIGCONT);
    let (_, code) = program.wait_output(Duration::from_secs(150));
    assert_eq!(code, 0, "{name} failed");
    let status = prof.wait_with_output().expect("wait for prof-bpf").status;
    assert!(status.success(), "prof-bpf cpu failed: {status:?}");
    out
}

#[test]
fn rustc_stacks_with_tables_are_complete() {
    require_bpf!();
    let dir = scratch("rustc-p");
    std::fs::write(dir.join("big.rs"), big_rust_source()).expect("write big.rs");
    let folded = sample_stopped(
        "rustc-p",
        Command::new("rustc")
            .args(["-O", "-C", "codegen-units=2", "big.rs", "-o", "big"])
            .current_dir(&dir),
        &["librustc_driver", "libLLVM", "libz.so"],
    );
    assert_complete(&folded, "rustc", &["rustc_", "llvm::"]);
}
