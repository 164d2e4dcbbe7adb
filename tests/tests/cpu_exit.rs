//! `cpu` samples taken inside exit_group after the process released its
//! memory (do_exit -> exit_mm, then mmput -> exit_mmap frees the pages):
//! the user stack then can no longer be read, but it is the one the
//! process had when it called exit, recorded at its exit tracepoint.
use std::{path::PathBuf, process::Command, time::Duration};

use prof_bpf_tests::{
    Proc, build_workload, parse_folded, require_bpf, run_prof_bpf, start_prof_bpf,
};

/// MiB the workload touches: freeing them at exit takes tens of ms of CPU
/// (about 30 samples at 999 Hz), whatever the machine's load.
const MIB: &str = "256";
/// Samples under exit_mmap a run must have at least (a margin under the
/// expected count: the assertion that matters is about every one of them).
const MIN_EXIT_SAMPLES: u64 = 5;

fn workload() -> PathBuf {
    // No frame pointers: the stack is walked with the unwind tables.
    build_workload("exit_release", &["-O2", "-g"])
}

fn out_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("prof-bpf-cpu-exit-{name}.folded"))
}

/// Asserts that the folded profile `out` has samples under exit_mmap and
/// that each of them carries the user stack that called exit.
fn assert_exit_stacks(out: &PathBuf) {
    let stacks = parse_folded(&std::fs::read_to_string(out).expect("read folded output"));
    let _ = std::fs::remove_file(out);
    let ns_per_sample = 1_000_000_000 / 999;
    // Not those inside execve: there exit_mmap frees the old program's
    // memory after the switch to the new one's (a launched command's
    // first exec), and the caller's stack is shown missing.
    let released: Vec<&(Vec<String>, u64)> = stacks
        .iter()
        .filter(|(f, _)| {
            f.iter().any(|x| x == "exit_mmap_[k]") && !f.iter().any(|x| x.contains("sys_execve"))
        })
        .collect();
    let total: u64 = released.iter().map(|s| s.1).sum::<u64>() / ns_per_sample;
    // Root first: the process, then the user stack down to the call of
    // exit, then the kernel's.
    let from_leave = |f: &[String]| {
        let user: Vec<&str> = f[1..]
            .iter()
            .take_while(|x| !x.ends_with("_[k]"))
            .map(String::as_str)
            .collect();
        user.first() == Some(&"_start")
            && user.contains(&"main")
            && user.contains(&"leave_now")
            && !user.iter().any(|x| x.starts_with('['))
    };
    let cut: Vec<&&(Vec<String>, u64)> = released.iter().filter(|s| !from_leave(&s.0)).collect();
    let cut_samples: u64 = cut.iter().map(|s| s.1).sum::<u64>() / ns_per_sample;
    let cut: Vec<String> = cut
        .iter()
        .map(|s| s.0.iter().take(8).cloned().collect::<Vec<_>>().join(";"))
        .collect();
    eprintln!("{total} samples under exit_mmap, {cut_samples} without the stack that called exit");
    assert!(
        total >= MIN_EXIT_SAMPLES,
        "only {total} samples under exit_mmap (want {MIN_EXIT_SAMPLES})"
    );
    assert!(
        cut.is_empty(),
        "samples under exit_mmap without the stack that called exit: {cut:#?}"
    );
}

#[test]
fn samples_after_exit_released_the_memory_keep_the_callers_stack() {
    require_bpf!();
    let mut workload = Proc::spawn(Command::new(workload()).arg(MIB));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let out = out_file(&pid);
    let (prof, _) = start_prof_bpf(
        &[
            "cpu",
            "--pid",
            &pid,
            "-F",
            "999",
            "-o",
            out.to_str().unwrap(),
        ],
        "sampling",
    );
    workload.send_line("go");
    let (_, code) = workload.wait_output(Duration::from_secs(60));
    assert_eq!(code, 0, "exit_release failed");
    // The session ends with its target.
    let status = prof.wait_with_output().expect("wait for prof-bpf").status;
    assert!(status.success(), "prof-bpf cpu failed: {status:?}");
    assert_exit_stacks(&out);
}

/// A launched command's tasks leave the sampler's filter at their exit
/// tracepoint: their samples after it are still theirs.
#[test]
fn a_launched_process_keeps_its_samples_after_exit() {
    require_bpf!();
    let out = out_file("launched");
    let program = workload();
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "-F",
        "999",
        "-o",
        out.to_str().unwrap(),
        "--",
        program.to_str().unwrap(),
        MIB,
        "now",
    ]);
    assert_eq!(code, 0, "prof-bpf cpu -- exit_release failed: {stderr}");
    assert_exit_stacks(&out);
}
