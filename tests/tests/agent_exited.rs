//! `prof-bpf agent`: heap profiles of libprofalloc.so processes that exit
//! before their interval is cut. Their stacks are placed with the mappings
//! read while they lived (by the agent, or at their exec), not lost as
//! `[truncated]`.
#[path = "sinks/check.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod check;
#[path = "agent_support/run.rs"]
#[allow(dead_code, reason = "shared by the agent tests")]
mod run;
#[path = "sinks/wire.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod wire;

use std::{process::Command, time::Duration};

use check::Pprof;
use prof_bpf_tests::{Proc, build_workload, profalloc_lib, require_bpf};
use run::{scratch, start_agent, stop_agent, value, wait_profile};

const FLAGS: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer"];
/// Bytes of one block of the heap workload.
const BLOCK: i64 = 64 * 1024;
/// Blocks leaked (and as many churned) by each process before it exits.
const BLOCKS: i64 = 8;

/// The heap workload under libprofalloc.so, sampling every 4 KiB: each
/// 64 KiB block is sampled with its own size as weight. One block is
/// leaked at start.
fn workload() -> Proc {
    let mut w = Proc::spawn(
        Command::new(build_workload("agent_heap", FLAGS))
            .arg("1")
            .env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", "4096"),
    );
    w.expect_line("ready");
    w
}

/// Leaks and churns [`BLOCKS`] blocks, then exits.
fn allocate_and_exit(mut w: Proc) {
    w.send_line(&BLOCKS.to_string());
    w.expect_line(&format!("leaked {}", BLOCKS + 1));
    let (_, code) = w.wait_output(Duration::from_secs(10));
    assert_eq!(code, 0);
}

/// Within 2% (the heap values are estimates, a hair above the bytes).
fn assert_close(got: i64, want: i64, what: &str) {
    let slack = (want as f64 * 0.02).max(1.0);
    assert!(
        (got - want).abs() as f64 <= slack,
        "{what}: got {got}, want {want}"
    );
}

/// alloc_space of the stacks where `function` is called by `caller`.
fn under(p: &Pprof, function: &str, caller: &str) -> i64 {
    let i = p
        .sample_types
        .iter()
        .position(|t| t == "alloc_space")
        .unwrap();
    p.samples
        .iter()
        .filter(|s| {
            let frames: Vec<&str> = s.stack.split(';').collect();
            let at = frames.iter().position(|f| *f == function);
            at.is_some_and(|at| frames[at..].contains(&caller))
        })
        .map(|s| s.values[i])
        .sum()
}

/// The blocks of `pid` allocated in the profiles `new`: all under their
/// functions, called by main(); no stack without a placed frame.
fn check_symbolized(new: &[Pprof], pid: u32) {
    for function in ["leak_block", "churn_block"] {
        let total: i64 = new.iter().map(|p| value(p, "alloc_space", function)).sum();
        assert_close(
            total,
            BLOCKS * BLOCK,
            &format!("pid {pid}: {function} alloc_space"),
        );
        let under_main: i64 = new.iter().map(|p| under(p, function, "main")).sum();
        assert_eq!(
            under_main, total,
            "pid {pid}: {function} is called by main()"
        );
    }
    for p in new {
        for s in &p.samples {
            assert!(
                !s.stack.starts_with("[truncated]") && !s.stack.contains("[missing user stack]"),
                "pid {pid}: a stack was not placed: {}",
                s.stack
            );
        }
    }
}

#[test]
fn heap_stacks_of_processes_that_exit_before_the_cut_are_symbolized() {
    require_bpf!();
    let dir = scratch("exited");
    // Running before the agent starts: its mappings are known from the
    // agent's own reads while it runs.
    let before = workload();
    let (agent, _) = start_agent(&["--interval", "2", "--dir", dir.to_str().unwrap()]);
    // Started under the agent: its mappings are kept since its exec too.
    let after = workload();
    // Two profiles of each (the block leaked at start, in use): the agent
    // has looked at both since at least one of its ticks, which gave them
    // their unwind tables (stacks through the allocator are complete).
    let seen: Vec<usize> = [&before, &after]
        .iter()
        .map(|w| {
            wait_profile(&dir, w.pid(), "heap", 1, |p| {
                value(p, "inuse_space", "leak_block") > 0
            })
            .len()
        })
        .collect();
    // Both allocate and exit well within an interval: their blocks are
    // cut after they are gone.
    let pids = [before.pid(), after.pid()];
    allocate_and_exit(before);
    allocate_and_exit(after);
    for (pid, seen) in pids.into_iter().zip(seen) {
        let all = wait_profile(&dir, pid, "heap", seen, |p| {
            value(p, "alloc_space", "leak_block") > 0
        });
        check_symbolized(&all[seen..], pid);
    }
    stop_agent(agent);
}
