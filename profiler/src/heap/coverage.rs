//! What a heap report covers, and the process's memory next to it.
//!
//! Probes see only what is allocated after they are attached: a process
//! that allocated 1 GiB before the attach and 1 MiB after shows 1 MiB. Each
//! report states that coverage and the process's current memory
//! (`Anonymous` of `/proc/PID/smaps_rollup`, the `[heap]` mapping's `Rss`
//! in `/proc/PID/smaps`), so the gap between the two is visible.
use std::time::SystemTime;

use super::{report::human_bytes, settings::Tracking};

/// From when the report's allocations were seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coverage {
    /// Running processes: since the probes were attached.
    SinceAttach { tracking: Tracking, at: Clock },
    /// A launched program: since it started (the probes came first).
    SinceStart,
    /// In-use values from the allocator's sampled live heap, since the
    /// process started; alloc values since the attach.
    AllocatorSinceStart { at: Clock },
}

/// A local wall-clock time of day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Clock {
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Clock {
    /// The local time of day of `time`.
    pub fn local(time: SystemTime) -> Self {
        let secs = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = libc::time_t::try_from(secs).unwrap_or(0);
        // SAFETY: localtime_r only writes the tm it is given; a zeroed tm is
        // a valid value to overwrite.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
        if !ok {
            // No time zone information: UTC.
            let day = secs % 86_400;
            return Self {
                hour: (day / 3600) as u32,
                minute: (day / 60 % 60) as u32,
                second: (day % 60) as u32,
            };
        }
        Self {
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
        }
    }
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

impl Coverage {
    /// The report's `coverage:` comment.
    pub fn comment(self) -> String {
        match self {
            Self::SinceAttach {
                tracking: Tracking::Hooks { .. },
                at,
            } => format!(
                "coverage: what libprofalloc.so sampled since the attach at {at} (earlier allocations are not seen)"
            ),
            Self::SinceAttach {
                tracking: Tracking::Usdt,
                at,
            } => format!(
                "coverage: what the allocator sampled since the attach at {at} (earlier allocations are not seen)"
            ),
            Self::SinceAttach { at, .. } => format!(
                "coverage: allocations made since the attach at {at} (earlier allocations are not seen)"
            ),
            Self::SinceStart => "coverage: allocations made since the program started".to_owned(),
            Self::AllocatorSinceStart { at } => format!(
                "coverage: sampled heap since process start (from the allocator) for in-use values; allocations since the attach at {at} for alloc values"
            ),
        }
    }
}

/// A process's memory now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Anonymous memory resident (`Anonymous` of smaps_rollup), bytes.
    pub anonymous: Option<u64>,
    /// Resident size of the `[heap]` mapping (brk heap), bytes.
    pub heap_rss: Option<u64>,
}

impl Memory {
    /// Reads `/proc/PID/smaps_rollup` and `/proc/PID/smaps`; None once
    /// the process is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok();
        Some(Self {
            anonymous: field_bytes(&rollup, "Anonymous"),
            heap_rss: smaps.as_deref().and_then(heap_rss),
        })
    }
}

/// The value of `name:` in the first block of smaps-formatted `text`, in
/// bytes (the file says kB).
pub(crate) fn field_bytes(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| field(line, name))
}

fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// The `Rss` of the `[heap]` mapping in smaps `text` (None without one).
pub(crate) fn heap_rss(text: &str) -> Option<u64> {
    let mut in_heap = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            in_heap = line.split_whitespace().nth(5) == Some("[heap]");
        } else if in_heap && let Some(rss) = field(line, "Rss") {
            return Some(rss);
        }
    }
    None
}

/// A process's memory as read at a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcessMemory {
    pub pid: u32,
    pub comm: String,
    /// None once the process is gone.
    pub memory: Option<Memory>,
}

/// One process's memory for the report, e.g. `memory of prog (42) now:
/// Anonymous 64.2 MiB, [heap] Rss 132.0 KiB`.
pub(crate) fn memory_comment(process: &ProcessMemory) -> String {
    let (pid, comm) = (process.pid, &process.comm);
    let Some(memory) = process.memory else {
        return format!("memory of {comm} ({pid}) now: unknown, it exited");
    };
    let show = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), |b| human_bytes(b as i64));
    format!(
        "memory of {comm} ({pid}) now: Anonymous {}, [heap] Rss {}",
        show(memory.anonymous),
        show(memory.heap_rss)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234                       /usr/bin/prog
Size:                132 kB
Rss:                 100 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
55d0c1000000-55d0c1800000 rw-p 00000000 00:00 0                          [heap]
Size:               8192 kB
KernelPageSize:        4 kB
Rss:                6144 kB
Anonymous:          6144 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:               65536 kB
VmFlags: rd wr mr mw me ac sd
";

    const ROLLUP: &str = "\
55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:               71780 kB
Pss:               71000 kB
Pss_Anon:          71680 kB
Anonymous:         71680 kB
LazyFree:              0 kB
";

    #[test]
    fn heap_rss_is_the_heap_mappings_own() {
        assert_eq!(heap_rss(SMAPS), Some(6144 * 1024));
        let no_heap = SMAPS.replace("[heap]", "");
        assert_eq!(heap_rss(&no_heap), None);
    }

    #[test]
    fn anonymous_comes_from_the_rollup() {
        assert_eq!(field_bytes(ROLLUP, "Anonymous"), Some(71680 * 1024));
        // `Pss_Anon` does not pass for `Anonymous`, nor `Anonymous` for `Anon`.
        assert_eq!(field_bytes(ROLLUP, "Anon"), None);
        assert_eq!(field_bytes("Anonymous: 12 pages\n", "Anonymous"), None);
    }

    #[test]
    fn comments_state_coverage_and_memory() {
        let at = Clock {
            hour: 9,
            minute: 5,
            second: 7,
        };
        let probes = Coverage::SinceAttach {
            tracking: Tracking::Malloc { sample_bytes: 0 },
            at,
        };
        assert_eq!(
            probes.comment(),
            "coverage: allocations made since the attach at 09:05:07 (earlier allocations are not seen)"
        );
        let hooks = Coverage::SinceAttach {
            tracking: Tracking::Hooks { sample_bytes: 64 },
            at,
        };
        assert!(
            hooks
                .comment()
                .contains("libprofalloc.so sampled since the attach at 09:05:07")
        );
        assert!(
            Coverage::SinceStart
                .comment()
                .contains("since the program started")
        );
        let memory = Memory {
            anonymous: Some(64 << 20),
            heap_rss: None,
        };
        let mut process = ProcessMemory {
            pid: 42,
            comm: "prog".to_owned(),
            memory: Some(memory),
        };
        assert_eq!(
            memory_comment(&process),
            "memory of prog (42) now: Anonymous 64.0 MiB, [heap] Rss unknown"
        );
        process.memory = None;
        assert!(memory_comment(&process).contains("exited"));
    }
}
