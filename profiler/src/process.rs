//! What a target process is made of: its existence, name and memory mappings
//! as `/proc/PID` shows them, and paths to its files as it sees them.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

mod remembered;

pub use remembered::{maps_or_remembered, remember_maps, remembered_maps};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address of the mapping.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `r`, `w`, `x` and `p`/`s` as in the file.
    pub perms: String,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Device (major, minor) of the mapped file.
    pub dev: (u32, u32),
    /// Inode of the mapped file (0 for anonymous mappings).
    pub inode: u64,
    /// Path of the mapped file as the process sees it, or a pseudo name
    /// such as `[heap]`; empty for anonymous mappings.
    pub path: String,
}

impl Mapping {
    /// Whether the mapping is executable.
    pub fn is_executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    /// Whether the mapping is backed by a file (not anonymous or `[...]`).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// The mapped file's name without directories.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// Fails with a one-line reason unless `pid` names a live process: not
/// found, a thread id rather than a process id (`/proc/TID` exists for
/// threads too, though it is not listed), or a zombie.
pub fn check_pid(pid: u32) -> anyhow::Result<()> {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process with pid {pid}");
    }
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(tgid) = status_field(&status, "Tgid")
        && tgid != pid
    {
        bail!(
            "{pid} is a thread of process {tgid} ({}), not a process: use --pid {tgid}",
            comm(tgid)
        );
    }
    if state(pid) == Some('Z') {
        bail!(
            "process {pid} ({}) has exited (a zombie waiting for its parent): nothing is left to profile",
            comm(pid)
        );
    }
    Ok(())
}

/// [`check_pid`], and the process must have user memory: kernel threads
/// have no allocator and no user stacks to probe.
pub fn check_user_process(pid: u32) -> anyhow::Result<()> {
    check_pid(pid)?;
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat"))
        && is_kernel_thread(&stat)
    {
        bail!(
            "pid {pid} ({}) is a kernel thread: it has no user-space memory to profile",
            comm(pid)
        );
    }
    Ok(())
}

/// A numeric field of `/proc/PID/status` (`Tgid:\t123`).
fn status_field(status: &str, name: &str) -> Option<u32> {
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// Whether a `/proc/PID/stat` line is a kernel thread's (flag PF_KTHREAD in
/// the ninth field).
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    // Fields after the command name, which may contain anything, start
    // after the last `)`: state is the first of them, flags the seventh.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    rest.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The process's command name (`/proc/PID/comm`), or `?` once it is gone.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

/// The process's state letter from `/proc/PID/stat` (`R`, `S`, `T` for
/// stopped, `Z` ...), or None once it is gone.
pub fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain anything: the state
    // follows the last `)`.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Reads and parses `/proc/PID/maps`.
pub fn maps(pid: u32) -> anyhow::Result<Vec<Mapping>> {
    check_pid(pid)?;
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|err| {
        let why = match err.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "permission denied: run as root (with CAP_SYS_PTRACE)".to_owned()
            }
            std::io::ErrorKind::NotFound => "the process exited".to_owned(),
            _ => err.to_string(),
        };
        anyhow::anyhow!("cannot read /proc/{pid}/maps: {why}")
    })?;
    Ok(parse_maps(&text))
}

/// Parses the text of a `/proc/PID/maps` file; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.to_owned();
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start().to_owned();
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
        path,
    })
}

/// The path through which this process reaches `path` as the target sees it:
/// through `/proc/PID/root`, so targets in other mount namespaces (containers)
/// resolve to their own files.
pub fn path_in_root(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// The executable mapping of the target's C library (glibc's `libc.so.6`).
pub fn find_libc(maps: &[Mapping]) -> Option<&Mapping> {
    maps.iter().find(|m| {
        m.is_executable() && {
            let name = m.file_name();
            name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
        }
    })
}

/// A descriptor that becomes readable when the process exits (pidfd).
pub struct ExitWatcher {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl ExitWatcher {
    /// Watches `pid`; must be called inside a tokio runtime.
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            let err = std::io::Error::last_os_error();
            // ESRCH: gone; ENOENT/EINVAL: a thread id, which has no pidfd.
            if matches!(
                err.raw_os_error(),
                Some(libc::ESRCH | libc::ENOENT | libc::EINVAL)
            ) {
                check_pid(pid)?;
                bail!("no process with pid {pid}");
            }
            return Err(err)
                .with_context(|| format!("watching pid {pid} for its exit (pidfd_open)"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open
        // and unchanged until it is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)
        .context("watching the target's pidfd")?;
        Ok(Self { fd })
    }

    /// Completes when the process has exited.
    pub async fn exited(&self) {
        // A pidfd only ever reports readiness for exit; an error means the
        // descriptor is unusable, in which case we never complete.
        match self.fd.readable().await {
            Ok(_) => {}
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1311 /usr/bin/cat
7f1c2e228000-7f1c2e3bd000 r-xp 00028000 fe:01 2097 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1a5f0000-7ffd1a611000 rw-p 00000000 00:00 0                          [stack]
7f1c2e400000-7f1c2e401000 rw-p 00000000 00:00 0 
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[1].start, 0x7f1c2e228000);
        assert_eq!(maps[1].offset, 0x28000);
        assert_eq!(maps[1].dev, (0xfe, 1));
        assert_eq!(maps[1].inode, 2097);
        assert!(maps[1].is_executable());
        assert_eq!(maps[2].path, "[stack]");
        assert!(!maps[2].is_file());
        assert_eq!(maps[3].path, "");
        assert_eq!(find_libc(&maps).map(|m| m.inode), Some(2097));
    }

    #[test]
    fn status_and_stat_fields() {
        let status =
            "Name:\tworker\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t100\nNgid:\t0\nPid:\t104\n";
        assert_eq!(status_field(status, "Tgid"), Some(100));
        assert_eq!(status_field(status, "Pid"), Some(104));
        assert_eq!(status_field(status, "Missing"), None);
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0";
        let user = "77 (a (weird) name) S 1 77 77 0 -1 4194560 100 0 0 0 3 1";
        assert!(is_kernel_thread(kthread));
        assert!(!is_kernel_thread(user));
        assert!(!is_kernel_thread("garbage"));
    }

    #[test]
    fn own_threads_and_processes_are_told_apart() {
        assert!(check_user_process(std::process::id()).is_ok());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid takes no arguments and cannot fail.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        let err = check_pid(tid).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{tid} is a thread of process {}",
                std::process::id()
            )),
            "{err}"
        );
        t.join().unwrap();
        if Path::new("/proc/2/stat").exists() && comm(2) == "kthreadd" {
            let err = check_user_process(2).unwrap_err().to_string();
            assert!(err.contains("is a kernel thread"), "{err}");
        }
    }

    #[test]
    fn a_zombie_is_named_as_such() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not yet reaped: it stays a zombie until wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = check_pid(pid).unwrap_err().to_string();
        child.wait().unwrap();
        assert!(err.contains("has exited (a zombie"), "{err}");
    }

    #[test]
    fn path_in_root_goes_through_proc() {
        assert_eq!(
            path_in_root(42, "/usr/lib/libc.so.6"),
            PathBuf::from("/proc/42/root/usr/lib/libc.so.6")
        );
    }
}
