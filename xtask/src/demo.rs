//! `cargo xtask demo`: builds prof-bpf and profiles a bundled leaky and
//! churny workload (tests/workloads/heap_leaks.c) while it runs: first where
//! its memory is held (heap profile), then what leaks (leak mode).
use std::process::Command;

use anyhow::Context as _;
use prof_bpf_tests::{Proc, build_workload, start_until};

use crate::{setup, util};

pub fn run() -> anyhow::Result<()> {
    let setup = setup::run()?;
    util::build_release()?;
    if !setup.root {
        anyhow::bail!("the demo attaches eBPF probes: run it as root (sudo -E cargo xtask demo)");
    }
    let prof = util::release_artifact("prof-bpf");
    let program = build_workload(
        "heap_leaks",
        &["-O1", "-g", "-fno-omit-frame-pointer", "-fno-builtin"],
    );
    let mut workload = Proc::spawn(&mut Command::new(&program));
    workload.expect_line("ready");
    let pid = workload.pid().to_string();

    println!(
        "demo: {} (pid {pid}) leaks in four places, churns, caches and frees across threads",
        program.display()
    );
    println!(
        "\n$ prof-bpf heap --pid {pid} --duration 4 --nodecount 12      # where is the memory held?"
    );
    let (profiler, _) = start_until(
        &prof,
        &[
            "heap",
            "--pid",
            &pid,
            "--duration",
            "4",
            "--sample-bytes",
            "0",
            "--nodecount",
            "12",
        ],
        "attached",
    );
    workload.send_line("go 50");
    workload.expect_line("done");
    print_output(profiler)?;

    println!(
        "\n$ prof-bpf heap --pid {pid} --leaks --interval 1 --duration 6 --format folded   # what leaks?"
    );
    let (profiler, _) = start_until(
        &prof,
        &[
            "heap",
            "--pid",
            &pid,
            "--leaks",
            "--interval",
            "1",
            "--duration",
            "6",
            "--format",
            "folded",
        ],
        "attached",
    );
    workload.send_line("go 80");
    workload.expect_line("done");
    print_output(profiler)?;
    Ok(())
}

fn print_output(profiler: std::process::Child) -> anyhow::Result<()> {
    let out = profiler
        .wait_with_output()
        .context("waiting for prof-bpf")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "prof-bpf heap failed ({})",
        out.status
    );
    Ok(())
}
