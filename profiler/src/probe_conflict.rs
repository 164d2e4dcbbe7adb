//! Why the kernel refused a uprobe, when another tracer holds one at the
//! same place.
//!
//! The kernel keeps one uprobe per (file, offset). A probe created with a
//! reference counter (a USDT semaphore, `ref_ctr_offset`: bcc and bpftrace
//! set it for USDT probes and for some function probes) makes every other
//! probe at that place fail unless it carries the same counter:
//! `perf_event_open` answers EINVAL and only the kernel log says `ref_ctr_offset
//! mismatch`. This module finds who holds the probe, the way `bpftool perf`
//! does (perf-event descriptors in `/proc/*/fd`, asked with
//! `BPF_TASK_FD_QUERY`), falling back to tracefs `uprobe_events` for probes
//! made there, and turns the bare EINVAL into a sentence that names them.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A uprobe somebody else holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process holding it (None for a tracefs probe).
    pub pid: Option<u32>,
    /// Its command name, or the tracefs event name.
    pub name: String,
    /// The probed file as the holder named it.
    pub path: PathBuf,
    /// File offset of the probe.
    pub offset: u64,
    /// The reference counter's file offset, when known (tracefs shows it).
    pub ref_ctr_offset: Option<u64>,
}

/// The error to show for a failed uprobe attach at `offset` of `path`:
/// `err` itself unless the kernel's EINVAL points at a conflicting probe,
/// in which case it says so and names the holders found.
pub fn explain(err: anyhow::Error, path: &Path, offset: u64) -> anyhow::Error {
    let einval = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(libc::EINVAL))
    });
    if !einval {
        return err;
    }
    let mut holders = perf_event_holders(path, offset);
    holders.extend(tracefs_holders(path, offset));
    err.context(conflict_message(path, offset, &holders))
}

/// The sentence for a refused probe and the holders found.
fn conflict_message(path: &Path, offset: u64, holders: &[Holder]) -> String {
    let place = format!("{}+{offset:#x}", path.display());
    if holders.is_empty() {
        return format!(
            "the kernel refused a uprobe at {place}: another tracer probably holds one there \
             with a reference counter (the kernel log says `ref_ctr_offset mismatch`); \
             stop it, or probe with the same tool"
        );
    }
    let who: Vec<String> = holders
        .iter()
        .map(|h| {
            let counter = h
                .ref_ctr_offset
                .map_or(String::new(), |r| format!(", reference counter at {r:#x}"));
            match h.pid {
                Some(pid) => format!("pid {pid} ({}){counter}", h.name),
                None => format!("tracefs probe {}{counter}", h.name),
            }
        })
        .collect();
    format!(
        "the kernel refused a uprobe at {place}: it is held by {} with a reference counter \
         this probe cannot share; stop that tracer and try again",
        who.join(", ")
    )
}

/// Whether `a` and `b` name the same file (same device and inode; the
/// strings when either cannot be read).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => a == b,
    }
}

/// Parses one line of tracefs `uprobe_events`:
/// `p:uprobes/NAME /path/to/file:0xOFFSET(0xREFCTR) ARGS...`.
fn parse_uprobe_event(line: &str) -> Option<Holder> {
    let mut words = line.split_whitespace();
    let (kind, name) = words.next()?.split_once(':')?;
    if kind != "p" && kind != "r" {
        return None;
    }
    let (file, place) = words.next()?.rsplit_once(':')?;
    let (offset, ref_ctr) = match place.split_once('(') {
        Some((offset, rest)) => (offset, Some(rest.trim_end_matches(')'))),
        None => (place, None),
    };
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some(Holder {
        pid: None,
        name: name.to_owned(),
        path: PathBuf::from(file),
        offset: hex(offset)?,
        ref_ctr_offset: ref_ctr.and_then(hex),
    })
}

/// tracefs probes at (`path`, `offset`) that carry a reference counter.
fn tracefs_holders(path: &Path, offset: u64) -> Vec<Holder> {
    [
        "/sys/kernel/tracing/uprobe_events",
        "/sys/kernel/debug/tracing/uprobe_events",
    ]
    .iter()
    .find_map(|f| fs::read_to_string(f).ok())
    .unwrap_or_default()
    .lines()
    .filter_map(parse_uprobe_event)
    .filter(|h| h.offset == offset && h.ref_ctr_offset.is_some() && same_file(&h.path, path))
    .collect()
}

/// Uprobes at (`path`, `offset`) held through perf-event descriptors with
/// a BPF program, in any process other than this one.
fn perf_event_holders(path: &Path, offset: u64) -> Vec<Holder> {
    let own = std::process::id();
    let mut holders = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return holders;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_perf_event =
                fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[perf_event]");
            let Some(fd_num) = fd.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if !is_perf_event {
                continue;
            }
            if let Some((file, probe_offset)) = task_fd_uprobe(pid, fd_num)
                && probe_offset == offset
                && same_file(&file, path)
            {
                holders.push(Holder {
                    pid: Some(pid),
                    name: crate::process::comm(pid),
                    path: file,
                    offset,
                    ref_ctr_offset: None,
                });
            }
        }
    }
    holders
}

/// `BPF_TASK_FD_QUERY` on descriptor `fd` of `pid`: the probed file and
/// offset when it is a uprobe perf event with a BPF program.
fn task_fd_uprobe(pid: u32, fd: u32) -> Option<(PathBuf, u64)> {
    /// `union bpf_attr` for BPF_TASK_FD_QUERY.
    #[repr(C)]
    #[derive(Default)]
    struct TaskFdQuery {
        pid: u32,
        fd: u32,
        flags: u32,
        buf_len: u32,
        buf: u64,
        prog_id: u32,
        fd_type: u32,
        probe_offset: u64,
        probe_addr: u64,
    }
    const BPF_TASK_FD_QUERY: libc::c_long = 20;
    const BPF_FD_TYPE_UPROBE: u32 = 4;
    const BPF_FD_TYPE_URETPROBE: u32 = 5;
    let mut buf = vec![0u8; 4096];
    let mut attr = TaskFdQuery {
        pid,
        fd,
        buf_len: buf.len() as u32,
        buf: buf.as_mut_ptr() as u64,
        ..TaskFdQuery::default()
    };
    // SAFETY: bpf(2) reads and writes `attr`, whose size is passed, and
    // writes at most `buf_len` bytes to `buf`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_TASK_FD_QUERY,
            &raw mut attr,
            std::mem::size_of::<TaskFdQuery>(),
        )
    };
    if rc != 0 || !matches!(attr.fd_type, BPF_FD_TYPE_UPROBE | BPF_FD_TYPE_URETPROBE) {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    // Unix paths are bytes: nothing to convert.
    let file = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&buf[..len]);
    Some((PathBuf::from(file), attr.probe_offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracefs_lines() {
        let h = parse_uprobe_event(
            "p:uprobes/p_libc_malloc /usr/lib/x86_64-linux-gnu/libc.so.6:0x00000000000a0d40(0x1f00)",
        )
        .unwrap();
        assert_eq!(h.name, "uprobes/p_libc_malloc");
        assert_eq!(h.path, PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(h.offset, 0xa0d40);
        assert_eq!(h.ref_ctr_offset, Some(0x1f00));
        let plain = parse_uprobe_event("r:uprobes/ret /bin/x:0x10 arg1=%ax").unwrap();
        assert_eq!((plain.offset, plain.ref_ctr_offset), (0x10, None));
        assert!(parse_uprobe_event("").is_none());
        assert!(parse_uprobe_event("-:uprobes/x").is_none());
    }

    #[test]
    fn messages_name_the_holders_or_the_likely_cause() {
        let path = Path::new("/lib/libc.so.6");
        let none = conflict_message(path, 0x20, &[]);
        assert!(none.contains("/lib/libc.so.6+0x20"), "{none}");
        assert!(none.contains("ref_ctr_offset mismatch"), "{none}");
        let holders = [Holder {
            pid: Some(77),
            name: "memleak-bpfcc".into(),
            path: path.into(),
            offset: 0x20,
            ref_ctr_offset: None,
        }];
        let named = conflict_message(path, 0x20, &holders);
        assert!(named.contains("held by pid 77 (memleak-bpfcc)"), "{named}");
    }

    #[test]
    fn other_errors_pass_through() {
        let err = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EPERM));
        let out = explain(err, Path::new("/x"), 1);
        assert_eq!(out.chain().count(), 1);
    }
}
