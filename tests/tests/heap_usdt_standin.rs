//! `prof-bpf heap --probe usdt` on the C stand-in allocator
//! (`usdt_alloc.c`), whose `<sys/sdt.h>` probes carry their arguments
//! wherever gcc put them: registers other than the argument registers
//! (-O1), memory at the frame pointer (-O0), and in a library it dlopens
//! after the attach, a constant size and a weight read from a global
//! (`-4@$64`, `8@last_weight(%rip)`). The stand-in counts what its probes
//! fired: the report equals those counts, and bpftrace's `usdt:` sums of
//! the program's probes on the same run.
use std::{
    process::Command,
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use heap_support::*;
use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, prof_bpf, require_bpf, run_prof_bpf,
    start_bpftrace, start_following, start_prof_bpf,
};

mod heap_support;

const OBJECTS: &str = "16000";
const SIZE: &str = "100";
const MEAN: &str = "4096";

/// `@name: value` from bpftrace's final map dump (0 when never set).
fn bpftrace_value(out: &str, name: &str) -> i64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("@{name}: ")))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits for a stderr line of prof-bpf containing `needle`.
fn wait_stderr(lines: &Receiver<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(_) => {}
            Err(_) => panic!("prof-bpf did not print `{needle}` in time"),
        }
    }
}

/// The stand-in's own counts: "sampled A freed F weight W live L program
/// A0 F0 W0" as [A, F, W, L, A0, F0, W0].
fn counts(line: &str) -> [i64; 7] {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str, n: usize| -> i64 {
        let i = words.iter().position(|w| *w == k).expect(line);
        words[i + n].parse().unwrap()
    };
    [
        at("sampled", 1),
        at("freed", 1),
        at("weight", 1),
        at("live", 1),
        at("program", 1),
        at("program", 2),
        at("program", 3),
    ]
}

/// Runs the stand-in built with `flags` (and its plugin, dlopened after the
/// attach) under `heap --probe usdt` and bpftrace at once, and checks the
/// report against the stand-in's counts and bpftrace's sums.
fn standin_is_reported_exactly(flags: &[&str]) {
    let program = build_workload("usdt_alloc", flags);
    let plugin = build_workload(
        "usdt_alloc",
        &[
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-DPLUGIN",
            "-shared",
            "-fPIC",
        ],
    );
    let (exe, lib) = (program.to_string_lossy(), plugin.to_string_lossy());
    let mut w = Proc::spawn(Command::new(&program).args([OBJECTS, SIZE, MEAN, &lib]));
    w.expect_line("ready");
    let pid = w.pid();
    // bpftrace sees the program's probes only: it neither follows dlopen
    // nor reads a `sym(%rip)` or a constant argument. The library's share
    // is what the stand-in counted, less the program's.
    let (bt, mut bt_out) = start_bpftrace(
        &format!(
            "usdt:{exe}:otel_memory:alloc {{ @allocs = count(); @weight = sum(arg2); }} \
             usdt:{exe}:otel_memory:free {{ @frees = count(); }}"
        ),
        pid,
    );
    let dir = std::env::temp_dir().join(format!("heap-standin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir
        .join(format!("{}.pb.gz", flags[0]))
        .to_string_lossy()
        .into_owned();
    let pid_text = pid.to_string();
    let (prof, _, stderr) = start_following(
        &prof_bpf(),
        &["heap", "--pid", &pid_text, "--probe", "usdt", "-o", &file],
        ATTACHED,
    );
    w.send_line("go");
    w.expect_line("loaded");
    wait_stderr(&stderr, &format!("USDT probes of {lib}"));
    w.send_line("go");
    let [
        _,
        _,
        weight,
        live,
        program_sampled,
        program_freed,
        program_weight,
    ] = counts(&w.read_line());
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
    w.send_line("quit");
    let (_, code) = w.wait_output(Duration::from_secs(30));
    assert_eq!(code, 0);
    let mut bt_text = String::new();
    std::io::Read::read_to_string(&mut bt_out, &mut bt_text).unwrap();
    let mut bt = bt;
    assert!(bt.wait().unwrap().success(), "bpftrace failed:\n{bt_text}");

    // The program's part of the stand-in's counts, as bpftrace read them.
    assert_eq!(
        bpftrace_value(&bt_text, "allocs"),
        program_sampled,
        "{bt_text}"
    );
    assert_eq!(
        bpftrace_value(&bt_text, "frees"),
        program_freed,
        "{bt_text}"
    );
    let weight_exe = bpftrace_value(&bt_text, "weight");
    assert_eq!(weight_exe, program_weight, "{bt_text}");
    let weight_lib = weight - weight_exe;
    assert!(weight_lib > 0, "the library sampled nothing");

    // The report: every sample under its complete stack, from main.
    let allocated = parse_folded(&report_folded(&file, "alloc_space"));
    let inuse = parse_folded(&report_folded(&file, "inuse_space"));
    let total = |stacks: &[Stack]| stacks.iter().map(|s| s.value).sum::<i64>();
    let under = |stacks: &[Stack], f: &str| -> i64 {
        stacks
            .iter()
            .filter(|s| s.frames.iter().any(|x| x == f))
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(total(&allocated), weight);
    assert_eq!(total(&inuse), live);
    assert_eq!(under(&allocated, "test_malloc"), weight_exe);
    assert_eq!(under(&allocated, "plugin_alloc64"), weight_lib);
    // The constant size: the library's samples stand for weight / 64 objects.
    let objects = parse_folded(&report_folded(&file, "alloc_objects"));
    assert_eq!(under(&objects, "plugin_alloc64"), weight_lib / 64);
    assert!(
        has_chain(&allocated, "main;test_malloc") && has_chain(&allocated, "main;plugin_alloc64"),
        "{}",
        report_folded(&file, "alloc_space")
    );
    let (text, err, code) = run_prof_bpf(&["report", "--format", "text", &file]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.contains("usdt_arg_errors:"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn arguments_in_other_registers_are_read() {
    require_bpf!();
    standin_is_reported_exactly(FLAGS);
}

#[test]
fn arguments_in_memory_are_read() {
    require_bpf!();
    standin_is_reported_exactly(&["-O0", "-g", "-fno-omit-frame-pointer", "-fno-builtin"]);
}

/// A weight passed as a double (`8f@`) breaks the contract: `--probe usdt`
/// refuses in one line naming it, and `--probe auto` takes the malloc
/// uprobes and says so.
#[test]
fn arguments_against_the_contract_are_refused_and_auto_falls_back() {
    require_bpf!();
    let mut flags = FLAGS.to_vec();
    flags.push("-DFLOAT_WEIGHT");
    let mut w = Proc::spawn(
        Command::new(build_workload("usdt_alloc", &flags)).args(["1000", "100", "4096"]),
    );
    w.expect_line("ready");
    let pid = w.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&["heap", "--pid", &pid, "--probe", "usdt"]);
    assert_one_line_error(&stderr, code, "otel_memory:alloc");
    assert!(stderr.contains("8f@%"), "{stderr}");

    let (prof, stderr) = start_prof_bpf(&["heap", "--pid", &pid], ATTACHED);
    assert!(
        stderr.iter().any(|l| l.contains("(malloc uprobes)")),
        "{stderr:?}"
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let out = prof.wait_with_output().expect("wait for prof-bpf");
    assert!(out.status.success());
}
