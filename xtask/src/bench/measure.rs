//! What several benchmarks measure the same way: a process's CPU time, the
//! median of repeated runs, and the kernel header tree bcc's tools need.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::util;

/// User + system CPU seconds of a process (all its threads).
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// The median of `values` (the upper one of an even count).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A kernel header tree bcc can compile against: the kernel here ships no
/// headers, so bcc uses Debian's generic ones, the `-common` tree overlaid
/// with the `-amd64` one (pointing bcc at `-amd64` alone fails). Built once,
/// as symlinks, under the target directory; pass it as BCC_KERNEL_SOURCE.
pub fn bcc_kernel_headers() -> anyhow::Result<PathBuf> {
    let dir = util::target_dir().join("bcc-kernel-headers");
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let find = |suffix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(Path::new("/usr/src"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("linux-headers-") && n.ends_with(suffix)
                })
            })
            .max()
            .with_context(|| {
                format!("no /usr/src/linux-headers-*{suffix}: install linux-headers-amd64 (cargo xtask setup)")
            })
    };
    let common = find("-common")?;
    let amd64 = find("-amd64")?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    util::run(
        Command::new("cp")
            .arg("-rs")
            .arg(format!("{}/.", common.display()))
            .arg(&dir),
        "linking the common kernel headers",
    )?;
    util::run(
        Command::new("cp")
            .args(["-rs", "--remove-destination"])
            .arg(format!("{}/.", amd64.display()))
            .arg(&dir),
        "linking the amd64 kernel headers",
    )?;
    std::fs::write(dir.join(".complete"), "")?;
    Ok(dir)
}
