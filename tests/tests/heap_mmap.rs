//! `prof-bpf heap --mmap`: anonymous private mappings counted once, from
//! their caller (tests/workloads/heap_mmap.c).
use std::time::Duration;

use heap_support::*;
use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, require_bpf, run_prof_bpf, start_prof_bpf,
};

mod heap_support;

#[test]
fn mmap_counts_each_anonymous_mapping_once_from_its_caller() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let dir = std::env::temp_dir().join(format!("prof-bpf-heap-mmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heap.pb.gz");
    let file_arg = file.to_string_lossy().into_owned();
    let rounds = 2;
    profile_rounds(
        &mut w,
        &["--mmap", "--sample-bytes", "0", "-o", &file_arg],
        rounds,
    );
    let r = i64::from(rounds);

    let inuse = report_folded(&file_arg, "inuse_space");
    let stacks = parse_folded(&inuse);
    for &(func, bytes) in MAPPED {
        assert_eq!(mmap_total(&stacks, func), r * bytes, "{func}: {inuse}");
    }
    // A file mapping is not heap.
    assert!(!has_chain(&stacks, "map_file"), "{inuse}");
    // glibc's mmap for malloc(1 MiB) is the allocator's: counted once, as
    // the malloc, with the requested size.
    assert_eq!(leaf_total(&stacks, "big_malloc"), r * MIB, "{inuse}");
    assert_eq!(mmap_total(&stacks, "big_malloc"), 0, "{inuse}");
    // Mapping stacks start at mmap's caller (libc's wrapper is not shown),
    // with the known call chain.
    for s in stacks
        .iter()
        .filter(|s| s.frames.last().unwrap() == "[mmap]")
    {
        let caller = &s.frames[s.frames.len() - 2];
        assert!(
            MAPPED.iter().any(|(f, _)| f == caller),
            "unexpected caller of mmap {caller}: {inuse}"
        );
    }
    assert!(
        has_chain(&stacks, "main;run_round;map_leak;[mmap]"),
        "{inuse}"
    );

    // Allocated bytes: mremap retires 1 MiB and maps 3 MiB, the churn maps
    // 100 x 64 KiB, the trimmed mapping was 1 MiB.
    let alloc = report_folded(&file_arg, "alloc_space");
    let stacks = parse_folded(&alloc);
    for (func, bytes) in [
        ("map_leak", 3 * MIB),
        ("map_grow", 4 * MIB),
        ("map_churn", 100 * 64 * KIB),
        ("map_trim", MIB),
        ("map_hole", MIB),
    ] {
        assert_eq!(mmap_total(&stacks, func), r * bytes, "{func}: {alloc}");
    }

    // The report states what it could not follow.
    let (text, stderr, code) = run_prof_bpf(&["report", "--format", "text", &file_arg]);
    assert_eq!(code, 0, "{stderr}");
    let counters = text
        .lines()
        .find(|l| l.contains("heap counters: "))
        .unwrap_or_else(|| panic!("no counters: {text}"));
    assert!(
        counters.contains(&format!("unmaps_partial {rounds}")),
        "{counters}"
    );
    assert!(
        text.contains(&format!(
            "unmapped by calls that did not start at them: {rounds} ({}.0 KiB",
            r * 64
        )),
        "{text}"
    );

    // The target runs on unchanged after detach.
    w.send_line("go 1");
    w.expect_line("done");
    w.send_line("sum");
    w.expect_line(&format!("sum {}", (r + 1) * MMAP_ROUND_SUM));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The overlay functions of the workload and the bytes each holds in the
/// end: the 8 MiB original keeps what the MAP_FIXED mappings over its
/// middle, start and end did not replace.
const OVERLAID: &[(&str, i64)] = &[
    ("map_overlaid", 4 * MIB),
    ("overlay_middle", 2 * MIB),
    ("overlay_start", MIB),
    ("overlay_end", MIB),
];

/// Runs `prof-bpf heap --pid W --mmap --sample-bytes 0 -o FILE` while the
/// workload obeys `commands` (each with the line it answers), stops it and
/// returns FILE.
fn profile_commands(w: &mut Proc, name: &str, commands: &[(&str, &str)]) -> String {
    let file = std::env::temp_dir().join(format!(
        "prof-bpf-heap-mmap-{name}-{}.pb.gz",
        std::process::id()
    ));
    let file = file.to_string_lossy().into_owned();
    let pid = w.pid().to_string();
    let args = [
        "heap",
        "--pid",
        &pid,
        "--mmap",
        "--sample-bytes",
        "0",
        "-o",
        &file,
    ];
    let (prof, _) = start_prof_bpf(&args, ATTACHED);
    for (command, reply) in commands {
        w.send_line(command);
        w.expect_line(reply);
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

#[test]
fn a_map_fixed_overlay_is_counted_once() {
    require_bpf!();
    let mut w = start_mmap_workload();

    // Kept: 8 MiB mapped, each byte once, under the mapping that holds it.
    let file = profile_commands(&mut w, "overlay", &[("overlay", "overlaid")]);
    let inuse = report_folded(&file, "inuse_space");
    let stacks = parse_folded(&inuse);
    for &(func, bytes) in OVERLAID {
        assert_eq!(mmap_total(&stacks, func), bytes, "{func}: {inuse}");
    }
    let mapped: i64 = stacks
        .iter()
        .filter(|s| s.frames.last().unwrap() == "[mmap]")
        .map(|s| s.value)
        .sum();
    assert_eq!(mapped, 8 * MIB, "{inuse}");
    let alloc = report_folded(&file, "alloc_space");
    let stacks = parse_folded(&alloc);
    assert_eq!(mmap_total(&stacks, "map_overlaid"), 8 * MIB, "{alloc}");
    let (text, stderr, code) = run_prof_bpf(&["report", "--format", "text", &file]);
    assert_eq!(code, 0, "{stderr}");
    // The start overlay trimmed the original in the kernel; the middle and
    // end ones were resolved against it in the agent.
    let counters = text
        .lines()
        .find(|l| l.contains("heap counters: "))
        .unwrap_or_else(|| panic!("no counters: {text}"));
    assert!(counters.contains("unmaps_partial 1"), "{counters}");
    assert!(
        text.contains("mapped over by later tracked mappings (MAP_FIXED): 1 (3.0 MiB"),
        "{text}"
    );
    std::fs::remove_file(&file).unwrap();

    // Unmapping the whole range afterwards leaves nothing.
    let file = profile_commands(
        &mut w,
        "unmap",
        &[("overlay", "overlaid"), ("unmap", "unmapped")],
    );
    let inuse = report_folded(&file, "inuse_space");
    let stacks = parse_folded(&inuse);
    for &(func, _) in OVERLAID {
        assert_eq!(mmap_total(&stacks, func), 0, "{func}: {inuse}");
    }
    let alloc = report_folded(&file, "alloc_space");
    let stacks = parse_folded(&alloc);
    for (func, bytes) in [
        ("map_overlaid", 8 * MIB),
        ("overlay_middle", 2 * MIB),
        ("overlay_start", MIB),
        ("overlay_end", MIB),
    ] {
        assert_eq!(mmap_total(&stacks, func), bytes, "{func}: {alloc}");
    }
    std::fs::remove_file(&file).unwrap();
}

/// `mremap(MREMAP_FIXED)` replaces what its destination held, like a
/// `MAP_FIXED` mmap: a tracked mapping moved onto the start of another
/// leaves that one its tail only, and so does an untracked (shared) one.
#[test]
fn an_mremap_fixed_move_replaces_its_destination() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let file = profile_commands(&mut w, "move", &[("move", "moved")]);
    let inuse = report_folded(&file, "inuse_space");
    let stacks = parse_folded(&inuse);
    for (func, bytes) in [
        ("map_move_target", 2 * MIB),
        ("map_moved", 0),
        ("move_over", 2 * MIB),
        ("map_shared_target", 2 * MIB),
        ("move_shared_over", 0),
    ] {
        assert_eq!(mmap_total(&stacks, func), bytes, "{func}: {inuse}");
    }
    let alloc = report_folded(&file, "alloc_space");
    let stacks = parse_folded(&alloc);
    for (func, bytes) in [
        ("map_move_target", 4 * MIB),
        ("map_moved", 2 * MIB),
        ("move_over", 2 * MIB),
        ("map_shared_target", 4 * MIB),
    ] {
        assert_eq!(mmap_total(&stacks, func), bytes, "{func}: {alloc}");
    }
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn without_mmap_no_mapping_is_reported() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let out = profile_rounds(&mut w, EVERY_ALLOCATION_INUSE, 1);
    let stacks = parse_folded(&out);
    assert!(!out.contains("[mmap]"), "{out}");
    assert!(!has_chain(&stacks, "map_"), "{out}");
    assert_eq!(leaf_total(&stacks, "big_malloc"), MIB, "{out}");
}

#[test]
fn launch_mode_tracks_the_mappings_of_the_program() {
    require_bpf!();
    let program = build_workload("heap_mmap", FLAGS);
    let program = program.to_string_lossy().into_owned();
    let out = launch_report_path("mmap");
    let (_, stderr, code) = run_prof_bpf(&[
        "heap",
        "--mmap",
        "--sample-bytes",
        "0",
        "-o",
        &out,
        "--group-by",
        "none",
        "--sample-type",
        "inuse_space",
        "--",
        &program,
        "once",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let stdout = std::fs::read_to_string(&out).expect("the report file");
    let stacks = parse_folded(&stdout);
    for &(func, bytes) in MAPPED {
        let got = mmap_total(&stacks, func);
        // The hole is found in a running process's maps; the program
        // exited, so its mapping counts as it was mapped.
        let want = if func == "map_hole" { MIB } else { bytes };
        assert_eq!(got, want, "{func}: {stdout}");
    }
    assert!(
        has_chain(&stacks, "main;run_round;map_grow;[mmap]"),
        "{stdout}"
    );
    assert_eq!(leaf_total(&stacks, "big_malloc"), MIB, "{stdout}");
}

#[test]
fn mmap_with_hooks_is_one_line_error() {
    require_bpf!();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", "1", "--probe", "hooks", "--mmap"]);
    assert_one_line_error(&stderr, code, "--mmap needs --probe malloc");
}

#[test]
fn all_tracks_the_mappings_of_processes_running_at_attach() {
    require_bpf!();
    let mut w = start_mmap_workload();
    let pid = w.pid();
    let (prof, _) = start_prof_bpf(
        &[
            "heap",
            "--all",
            "--mmap",
            "--sample-bytes",
            "0",
            "--format",
            "folded",
            "--group-by",
            "process",
            "--sample-type",
            "inuse_space",
        ],
        ATTACHED,
    );
    // With --all a process's unwind tables are read when its first walk
    // asks for them; mapping stacks made before are reported missing, not
    // guessed. Later rounds have its tables: how soon depends on the
    // machine's load, so several rounds run a second apart.
    const ROUNDS: i64 = 4;
    for _ in 0..ROUNDS {
        w.send_line("go 1");
        w.expect_line("done");
        std::thread::sleep(Duration::from_secs(1));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let stacks: Vec<Stack> = parse_folded(&stdout)
        .into_iter()
        .filter(|s| s.frames[0].ends_with(&format!("-{pid}")))
        .collect();
    let mapped: i64 = stacks
        .iter()
        .filter(|s| s.frames.last().unwrap() == "[mmap]")
        .map(|s| s.value)
        .sum();
    let per_round: i64 = MAPPED.iter().map(|(_, b)| b).sum();
    assert_eq!(mapped, ROUNDS * per_round, "{stdout}");
    // Every round after the tables arrived is attributed in full; at least
    // the last one is.
    for &(func, bytes) in MAPPED {
        let got = mmap_total(&stacks, func);
        let whole_rounds = if bytes == 0 {
            got == 0
        } else {
            got >= bytes && got % bytes == 0 && got <= ROUNDS * bytes
        };
        assert!(whole_rounds, "{func}: {got}: {stdout}");
    }
    assert_eq!(leaf_total(&stacks, "big_malloc"), ROUNDS * MIB, "{stdout}");
}
