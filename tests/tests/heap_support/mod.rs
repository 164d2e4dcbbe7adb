//! What the heap tests share: the workloads' known sizes, folded-output
//! parsing, and starting workloads and sessions.
#![allow(dead_code, reason = "each heap test file uses a part of it")]
use std::process::Command;

use prof_bpf_tests::{Proc, build_workload, run_prof_bpf, start_prof_bpf};

pub const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-builtin"];

pub const ATTACHED: &str = "prof-bpf: heap: attached";
/// Every allocation tracked; in-use bytes as folded stacks, one tree.
pub const EVERY_ALLOCATION_INUSE: &[&str] = &[
    "--sample-bytes",
    "0",
    "--format",
    "folded",
    "--group-by",
    "none",
    "--sample-type",
    "inuse_space",
];

// Per round of heap_leaks.c.
pub const SMALL: i64 = 20 * 1000;

pub const CALLOC: i64 = 3000;

pub const BIG_CALLOC: i64 = 200_000;

pub const REALLOC_NULL: i64 = 500;

pub const CACHE_BLOCK: i64 = 2048;

pub const CACHE_ROUNDS: i64 = 3;

/// Functions whose memory is always freed.
pub const FREED: &[&str] = &[
    "churn",
    "handoff",
    "realloc_zero",
    "churn_background",
    "free_prealloc",
];

/// One folded line: frames outermost first, and the value.
pub struct Stack {
    pub frames: Vec<String>,
    pub value: i64,
}

pub fn parse_folded(text: &str) -> Vec<Stack> {
    text.lines()
        .filter_map(|line| {
            let (frames, value) = line.rsplit_once(' ')?;
            Some(Stack {
                frames: frames.split(';').map(str::to_owned).collect(),
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// Sum of the values of stacks whose leaf (innermost) frame is `func`.
pub fn leaf_total(stacks: &[Stack], func: &str) -> i64 {
    stacks
        .iter()
        .filter(|s| s.frames.last().is_some_and(|f| f == func))
        .map(|s| s.value)
        .sum()
}

/// The workload's four leak sites hold exactly what `rounds` rounds leaked.
pub fn assert_leak_sites(stacks: &[Stack], rounds: u32, out: &str) {
    let r = i64::from(rounds);
    assert_eq!(leaf_total(stacks, "leak_small"), r * SMALL, "{out}");
    // calloc from its real caller with its real size (glibc serves the big one by mmap).
    assert_eq!(leaf_total(stacks, "leak_calloc"), r * CALLOC, "{out}");
    assert_eq!(
        leaf_total(stacks, "leak_big_calloc"),
        r * BIG_CALLOC,
        "{out}"
    );
    // realloc(NULL, n) is one allocation of n from its caller, not a nested malloc.
    assert_eq!(
        leaf_total(stacks, "realloc_null"),
        r * REALLOC_NULL,
        "{out}"
    );
}

pub fn has_chain(stacks: &[Stack], chain: &str) -> bool {
    stacks.iter().any(|s| s.frames.join(";").contains(chain))
}

pub fn start_workload() -> Proc {
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_leaks", FLAGS)));
    w.expect_line("ready");
    w
}

/// Runs `prof-bpf heap --pid W ARGS` while the workload does `rounds`
/// rounds, stops it with SIGINT, and returns its stdout.
pub fn profile_rounds(w: &mut Proc, args: &[&str], rounds: u32) -> String {
    let pid = w.pid().to_string();
    let mut all = vec!["heap", "--pid", &pid];
    all.extend_from_slice(args);
    let (prof, _) = start_prof_bpf(&all, ATTACHED);
    w.send_line(&format!("go {rounds}"));
    w.expect_line("done");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "prof-bpf heap failed ({}); stdout: {stdout}",
        out.status
    );
    stdout
}

/// The workload's checksum after `rounds` rounds of `go` from a fresh start.
pub fn expected_sum(go_commands: &[i64]) -> i64 {
    go_commands
        .iter()
        .map(|&rounds| {
            let per_round = SMALL + CALLOC + BIG_CALLOC + REALLOC_NULL + 700 + 1000 * 64 + 333;
            rounds * per_round + rounds.min(CACHE_ROUNDS) * CACHE_BLOCK
        })
        .sum()
}

/// A fresh `.folded` path for a launch-mode report (launch mode never writes
/// the report into the program's stdout).
pub fn launch_report_path(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.folded"));
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}

// --mmap: per round of heap_mmap.c (sizes are whole pages, as mapped).
pub const MIB: i64 = 1 << 20;

pub const KIB: i64 = 1 << 10;

/// The workload's functions that call mmap, and what one round keeps mapped.
pub const MAPPED: &[(&str, i64)] = &[
    ("map_leak", 3 * MIB),
    ("map_grow", 3 * MIB),
    ("map_trim", 768 * KIB),
    // The 64 KiB hole in its middle is found in the process's maps.
    ("map_hole", 960 * KIB),
    ("map_churn", 0),
];

/// What one round writes to the workload's checksum.
pub const MMAP_ROUND_SUM: i64 = 3 * MIB + 100 * 64 * KIB + 3 * MIB + 768 * KIB + 512 * KIB + MIB
    // The second byte of the workload's own ELF header ('E').
    + 0x45;

/// Sum of the values of mapping stacks made by `func` (`...;func;[mmap]`).
pub fn mmap_total(stacks: &[Stack], func: &str) -> i64 {
    stacks
        .iter()
        .filter(|s| s.frames.ends_with(&[func.to_owned(), "[mmap]".to_owned()]))
        .map(|s| s.value)
        .sum()
}

pub fn start_mmap_workload() -> Proc {
    let mut w = Proc::spawn(&mut Command::new(build_workload("heap_mmap", FLAGS)));
    w.expect_line("ready");
    w
}

/// `prof-bpf report FILE --format folded --group-by none --sample-type TYPE`.
pub fn report_folded(file: &str, sample_type: &str) -> String {
    let (stdout, stderr, code) = run_prof_bpf(&[
        "report",
        "--format",
        "folded",
        "--group-by",
        "none",
        "--sample-type",
        sample_type,
        file,
    ]);
    assert_eq!(code, 0, "{stderr}");
    stdout
}
