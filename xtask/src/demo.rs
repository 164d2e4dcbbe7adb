//! `cargo xtask demo`: builds prof-bpf and runs it on a bundled workload.
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
    let program = build_workload("malloc_count", &["-O1", "-g", "-fno-builtin"]);
    let mut workload = Proc::spawn(Command::new(&program).arg("30000000"));
    workload.expect_line("ready");
    let pid = workload.pid();
    println!(
        "demo: counting malloc/free of {} (pid {pid}) for 3 s",
        program.display()
    );
    let (counter, _) = start_until(
        &prof,
        &["count", "--pid", &pid.to_string(), "--duration", "3"],
        "counting malloc/free",
    );
    workload.send_line("go");
    let out = counter.wait_with_output().context("waiting for prof-bpf")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "prof-bpf count failed ({})",
        out.status
    );
    Ok(())
}
