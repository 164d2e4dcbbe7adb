//! Stacks sampled in the code that switches stacks by hand: the last
//! instructions of glibc's `__longjmp` and `setcontext`, whose CFI names
//! the sampled frame's registers (rdi, rdx, r8, r9). `prof-bpf cpu -p` must
//! give complete stacks there: the walker carries those registers into the
//! first step (without them, about 5% of these workloads' samples were
//! `[truncated]`). Also the code after the syscall of glibc's `clone3`,
//! which no FDE covers, and whose row tests the sampled frame's rax.
use std::{process::Command, time::Duration};

use prof_bpf_tests::{Proc, build_workload, parse_folded, require_bpf, start_prof_bpf};

/// No frame pointers: every frame is unwound from the CFI.
const NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer", "-U_FORTIFY_SOURCE"];

/// Profiles the workload in `mode` for its 2 s run; its folded stacks.
fn profile(mode: &str) -> Vec<(Vec<String>, u64)> {
    profile_workload(
        Command::new(build_workload("unwind_longjmp", NO_FP)).args([mode, "2"]),
        mode,
    )
}

/// Profiles `command` (a workload that prints "ready", runs on a line of
/// stdin and prints "done"); its folded stacks.
fn profile_workload(command: &mut Command, mode: &str) -> Vec<(Vec<String>, u64)> {
    let mut workload = Proc::spawn(command);
    workload.expect_line("ready");
    let pid = workload.pid().to_string();
    let dir = std::env::temp_dir().join("prof-bpf-unwind-leaf");
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let out = dir.join(format!("{mode}-{pid}.folded"));
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
    workload.expect_line("done");
    let output = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(
        output.status.success(),
        "prof-bpf cpu failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(workload.wait_output(Duration::from_secs(10)));
    parse_folded(&std::fs::read_to_string(&out).expect("read folded output"))
}

/// Every sample is complete, from `_start` through `main` (or through
/// `exit`, for a sample in the exit handlers after `main` returned), with
/// nothing cut; returns the nanoseconds sampled in the loop. Samples taken
/// while the kernel tears the exiting process down are left out: its stack
/// may be unmapped already.
fn assert_complete(mode: &str, stacks: &[(Vec<String>, u64)]) -> u64 {
    let looping = format!("{mode}_loop");
    let mut in_loop = 0;
    for (frames, value) in stacks {
        if frames.iter().any(|f| f == "do_exit_[k]") {
            continue;
        }
        let user: Vec<&str> = frames
            .iter()
            .skip(1) // the process name
            .map(String::as_str)
            .filter(|f| !f.ends_with("_[k]"))
            .collect();
        assert!(
            user.starts_with(&["_start"]) && (user.contains(&"main") || after_main(&user)),
            "{mode}: an incomplete stack ({value} ns): {}",
            frames.join(";")
        );
        if user.contains(&&*looping) {
            in_loop += value;
        }
    }
    in_loop
}

/// Whether `user` (outermost first) is libc's exit path after `main`
/// returned: `exit` called by `__libc_start_call_main` itself.
fn after_main(user: &[&str]) -> bool {
    user.windows(2)
        .any(|w| w[0] == "__libc_start_call_main" && matches!(w[1], "exit" | "__GI_exit"))
}

#[test]
fn the_exit_path_after_main_counts_as_complete() {
    let after = [
        "_start",
        "__libc_start_main_impl",
        "__libc_start_call_main",
        "__GI_exit",
    ];
    assert!(after_main(&after));
    let cut = ["_start", "__libc_start_main_impl", "__run_exit_handlers"];
    assert!(!after_main(&cut));
}

#[test]
fn samples_in_longjmp_are_complete() {
    require_bpf!();
    let stacks = profile("longjmp");
    let in_loop = assert_complete("longjmp", &stacks);
    assert!(
        in_loop >= 500_000_000,
        "{in_loop} ns sampled in 2 s of work"
    );
    // With libc's symbols, the samples after the register switch show
    // `__longjmp` called from the loop itself: it returns to the setjmp.
    let named = stacks
        .iter()
        .any(|(f, _)| f.iter().any(|x| x == "__longjmp"));
    if named {
        assert!(
            stacks
                .iter()
                .any(|(f, _)| f.ends_with(&["longjmp_loop".to_owned(), "__longjmp".to_owned()])),
            "no sample after __longjmp's register switch"
        );
    }
}

#[test]
fn samples_in_setcontext_are_complete() {
    require_bpf!();
    let stacks = profile("setcontext");
    let in_loop = assert_complete("setcontext", &stacks);
    assert!(
        in_loop >= 500_000_000,
        "{in_loop} ns sampled in 2 s of work"
    );
}

/// Threads created and joined in a loop: the caller's samples in the
/// clone3 syscall and the new threads' first ones are at a pc no FDE
/// covers. Without rows there, 345 of 564 samples (61%) of this workload
/// lost everything above `clone3`, or were the new thread's `clone3` with
/// `[truncated]`.
#[test]
fn samples_in_clone3_are_complete() {
    require_bpf!();
    let stacks = profile_workload(
        Command::new(build_workload("unwind_clone", NO_FP)).arg("2"),
        "clone",
    );
    let (mut total, mut complete, mut in_caller, mut in_thread) = (0, 0, 0, 0);
    for (frames, value) in &stacks {
        // A thread's exit releases its memory: no stack is left to walk.
        if frames.iter().any(|f| f == "do_exit_[k]") {
            continue;
        }
        let user: Vec<&str> = frames
            .iter()
            .skip(1)
            .map(String::as_str)
            .filter(|f| !f.ends_with("_[k]"))
            .collect();
        let main_thread = user.starts_with(&["_start"]) && user.contains(&"main");
        // A thread's stack starts in clone3 (glibc's CFI marks it so).
        let new_thread = user.first() == Some(&"clone3");
        total += value;
        if main_thread || new_thread {
            complete += value;
        } else {
            eprintln!("incomplete ({value} ns): {}", frames.join(";"));
        }
        if main_thread && user.last() == Some(&"clone3") {
            in_caller += value;
        }
        if user == ["clone3"] {
            in_thread += value;
        }
    }
    // A sample in a thread's exit whose kernel stack was not recorded
    // cannot be told apart: hence 99%, not all.
    assert!(
        complete * 100 >= total * 99,
        "{complete} of {total} ns complete"
    );
    // With libc's symbols, both sides of the syscall were sampled.
    if stacks.iter().any(|(f, _)| f.iter().any(|x| x == "clone3")) {
        assert!(in_caller > 0, "no sample of the caller inside clone3");
        assert!(in_thread > 0, "no sample of a new thread's first instant");
    }
}

/// Rows of `readelf --debug-dump=frames-interp` whose CFA or saved
/// registers come from rdi, rdx, r8 or r9: the rows that need the sampled
/// frame's registers.
fn readelf_leaf_rows(lib: &str) -> usize {
    let out = Command::new("readelf")
        .args(["--debug-dump=frames-interp", lib])
        .output()
        .expect("run readelf");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            let mut cells = line.split_whitespace();
            let is_row = cells
                .next()
                .is_some_and(|loc| loc.len() == 16 && loc.bytes().all(|b| b.is_ascii_hexdigit()));
            let cfa = cells.next().unwrap_or_default();
            is_row
                && (["rdi+", "rdx+", "r8+", "r9+"]
                    .iter()
                    .any(|r| cfa.starts_with(r))
                    || ["(rdi)", "(rdx)", "(r8)", "(r9)"]
                        .iter()
                        .any(|r| line.contains(r)))
        })
        .count()
}

/// The per-library report (`debug-unwind --cfi`): no unsupported row in
/// the C library, the loader, the C++ library or libpython, and as many
/// rows that need the sampled frame's registers as readelf shows.
#[test]
fn system_libraries_report_no_unsupported_rows() {
    let libs: Vec<&str> = [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    ]
    .into_iter()
    .filter(|p| std::path::Path::new(p).exists())
    .collect();
    let mut args = vec!["debug-unwind", "--cfi"];
    args.extend(&libs);
    let out = Command::new(prof_bpf_tests::prof_bpf())
        .args(&args)
        .output()
        .expect("run debug-unwind --cfi");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for lib in &libs {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("cfi {lib} ")))
            .unwrap_or_else(|| panic!("no report line for {lib}:\n{text}"));
        let field = |name: &str| -> usize {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        assert_eq!(field("unsupported"), 0, "{text}");
        // Besides readelf's rows, libc's clone and clone3 return paths
        // (no FDE covers them) test rax.
        let clone_returns = if lib.contains("libc.so") { 2 } else { 0 };
        assert_eq!(
            field("leaf_only"),
            readelf_leaf_rows(lib) + clone_returns,
            "{line}"
        );
        if lib.contains("libc.so") || lib.contains("ld-linux") {
            assert!(field("leaf_only") > 0, "{line}");
        }
    }
}
