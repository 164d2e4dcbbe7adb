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

/// What wait4 tells of a finished child.
pub struct Usage {
    /// User + system CPU seconds, all threads.
    pub cpu_seconds: f64,
    /// Peak resident set, KiB.
    pub max_rss_kib: u64,
}

/// Waits for our child `pid` and returns its resource usage; an error
/// naming the status unless it exited with status 0.
pub fn wait_usage(pid: u32) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for a child of ours (its pid is valid until reaped here).
    let reaped = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if reaped < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        anyhow::bail!("exit status {status:#x}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage {
        cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
    })
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
