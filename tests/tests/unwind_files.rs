//! A new process of a binary whose unwind rows are already in the kernel
//! unwinds with them from its first sample (issue 13): the walker finds
//! the rows through the file its pc's mapping maps, before user space has
//! read the process's mappings.
use prof_bpf_tests::{build_workload, require_bpf, run_prof_bpf};

/// The value of `name N` in the notes line that starts with `title`.
fn counter(text: &str, title: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(title))
        .unwrap_or_else(|| panic!("no `{title}` line in:\n{text}"));
    line.split([':', ','])
        .map(str::trim)
        .find_map(|f| f.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {line}"))
}

/// The command runs the workload twice, one after the other: the first
/// run's rows (its executable is statically linked: one object) are loaded
/// while it runs, so the second run's pcs, in a process user space has not
/// read yet, resolve by file.
#[test]
fn second_process_of_a_loaded_binary_unwinds_by_file() {
    require_bpf!();
    let exe = build_workload(
        "unwind_start",
        &["-O2", "-g", "-fomit-frame-pointer", "-static"],
    );
    let exe = exe.to_str().expect("utf-8 path");
    let out = std::env::temp_dir().join("prof-bpf-unwind-files.txt");
    let _ = std::fs::remove_file(&out);
    let script = format!("{exe} early 300 1 && {exe} early 300 1");
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "-F",
        "999",
        "--format",
        "text",
        "-o",
        out.to_str().expect("utf-8 path"),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code, 0, "prof-bpf failed: {stderr}");
    let text = std::fs::read_to_string(&out).expect("read the report");
    let by_file = counter(&text, "Note: user stack walks", "frames_by_file");
    eprintln!("frames_by_file {by_file}");
    assert!(by_file > 0, "no frame resolved by file:\n{text}");
}
