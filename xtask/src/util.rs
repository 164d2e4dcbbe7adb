//! Small helpers shared by the xtask commands.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Why BPF integration tests cannot run here, or `None` when they can.
pub fn bpf_unavailable_reason() -> Option<String> {
    if !is_root() {
        return Some("not root (BPF and uprobes need CAP_BPF/CAP_PERFMON)".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("no BTF at /sys/kernel/btf/vmlinux".into());
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Some("the kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)".into());
    }
    None
}

/// `cargo` of the toolchain that runs xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with `what` when it does not exit 0.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing with `what` on a non-zero exit.
pub fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the release binaries (prof-bpf, libprofalloc.so).
pub fn build_release() -> anyhow::Result<()> {
    run(
        cargo().args([
            "build",
            "--release",
            "-p",
            "profiler",
            "-p",
            "profalloc",
            "-p",
            "profalloc-preload",
        ]),
        "release build",
    )
}

/// Path of a release artifact in the target directory.
pub fn release_artifact(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// The cargo target directory (CARGO_TARGET_DIR or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}
