//! The thread that reads the kernel's stack copies from the ring buffer,
//! parses them, and reads the mappings of each process the first time its
//! copies need them.
use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use log::debug;
use profiler_common::{
    stack_copy::{COPY_HEADER, StackCopy},
    unwind::{Frame, LeafRegs},
};

use super::Copy;
use crate::process::Mapping;

/// Sends every copy of `ring` to `sender` until `stop` is set, then the
/// ones still queued.
pub(super) fn read_ring(
    mut ring: RingBuf<MapData>,
    sender: &mpsc::Sender<Received>,
    stop: &AtomicBool,
) {
    // The executable mappings last read per process.
    let mut known: HashMap<u32, Known> = HashMap::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Some(item) = ring.next() {
            if let Some((id, copy)) = parse(&item) {
                let maps = read_maps_if_new(&mut known, &copy);
                let _ = sender.send((id, copy, maps));
            }
        }
        if stopping {
            return;
        }
        let mut fd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout so that `stop` is seen.
        unsafe { libc::poll(&mut fd, 1, READER_POLL_MS) };
    }
}

/// How long the reader waits for copies before looking at its stop flag.
const READER_POLL_MS: i32 = 50;

/// A copy, and the mappings of its process when they were read for it.
pub(super) type Received = (u64, Copy, Option<Vec<Mapping>>);

/// The mappings of `copy`'s process, read when its pc is in none of those
/// read before, or when the last read is older than [`REREAD_AFTER`]
/// while the process is young (the loader maps its libraries then: a copy
/// whose first pc was known may have callers in a library mapped since):
/// within milliseconds of the copy, so that a process that exits before
/// the session's loop gets to it still has its tables built for its
/// copies. A process gone already gets the mappings the task-event thread
/// read at its exec.
fn read_maps_if_new(known: &mut HashMap<u32, Known>, copy: &Copy) -> Option<Vec<Mapping>> {
    let pc = copy.frame.pc;
    let now = Instant::now();
    if known.get(&copy.pid).is_some_and(|k| {
        k.ranges.iter().any(|&(s, e)| s <= pc && pc < e)
            && (now.duration_since(k.read) < REREAD_AFTER
                || now.duration_since(k.first) > YOUNG_FOR)
    }) {
        return None;
    }
    let maps = crate::process::maps_or_remembered(copy.pid).ok()?;
    if log::log_enabled!(log::Level::Debug) {
        let at = maps.iter().find(|m| m.start <= pc && pc < m.end);
        debug!(
            "stack copies of pid {} ({}) from {pc:#x} in {}",
            copy.pid,
            crate::process::comm(copy.pid),
            at.map_or("no mapping", |m| m.path.as_str()),
        );
    }
    let ranges = maps
        .iter()
        .filter(|m| m.is_executable())
        .map(|m| (m.start, m.end))
        .collect();
    if known.len() > MAX_KNOWN_PROCESSES {
        known.clear();
    }
    let first = known.get(&copy.pid).map_or(now, |k| k.first);
    known.insert(
        copy.pid,
        Known {
            ranges,
            first,
            read: now,
        },
    );
    Some(maps)
}

/// What the reader knows of a process's mappings.
struct Known {
    /// The executable ones.
    ranges: Vec<(u64, u64)>,
    /// When they were first read, and last.
    first: Instant,
    read: Instant,
}

/// How long a young process's mappings are taken as they were read.
const REREAD_AFTER: Duration = Duration::from_millis(10);
/// How long a process counts as young, from its first copy.
const YOUNG_FOR: Duration = Duration::from_millis(300);

/// Processes whose mappings the reader keeps at once.
const MAX_KNOWN_PROCESSES: usize = 4096;

/// A copy record from the ring buffer.
pub(super) fn parse(item: &[u8]) -> Option<(u64, Copy)> {
    if item.len() < COPY_HEADER {
        return None;
    }
    use std::mem::offset_of;
    let word = |at: usize| u64::from_le_bytes(item[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(item[at..at + 4].try_into().expect("4 bytes"));
    let start = (half(offset_of!(StackCopy, start)) as usize).min(item.len() - COPY_HEADER);
    let len = (half(offset_of!(StackCopy, len)) as usize).min(item.len() - COPY_HEADER - start);
    Some((
        word(offset_of!(StackCopy, id)),
        Copy {
            pid: half(offset_of!(StackCopy, pid)),
            frame: Frame {
                pc: word(offset_of!(StackCopy, pc)),
                sp: word(offset_of!(StackCopy, sp)),
                bp: word(offset_of!(StackCopy, bp)),
                bx: word(offset_of!(StackCopy, bx)),
            },
            leaf: LeafRegs {
                known: word(offset_of!(StackCopy, leaf)),
                di: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, di)),
                dx: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, dx)),
                r8: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, r8)),
                r9: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, r9)),
                r11: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, r11)),
                ax: word(offset_of!(StackCopy, leaf) + offset_of!(LeafRegs, ax)),
            },
            exact: half(offset_of!(StackCopy, exact)) != 0,
            bp_chained: half(offset_of!(StackCopy, bp_chained)) != 0,
            prefix: half(offset_of!(StackCopy, prefix)),
            bytes: item[COPY_HEADER + start..COPY_HEADER + start + len].to_vec(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of process `pid` at the pc of this function.
    fn copy_of(pid: u32) -> Copy {
        Copy {
            pid,
            frame: Frame {
                pc: copy_of as *const () as u64,
                ..Frame::default()
            },
            leaf: LeafRegs::UNKNOWN,
            exact: true,
            bp_chained: false,
            prefix: 0,
            bytes: Vec::new(),
        }
    }

    #[test]
    fn a_young_process_is_read_again_then_left_alone() {
        let copy = copy_of(std::process::id());
        let mut known = HashMap::new();
        let start = Instant::now();
        assert!(read_maps_if_new(&mut known, &copy).is_some());
        // The pc is known now: no read within REREAD_AFTER.
        let again = read_maps_if_new(&mut known, &copy);
        if start.elapsed() < REREAD_AFTER {
            assert!(again.is_none());
        }
        std::thread::sleep(REREAD_AFTER);
        assert!(
            read_maps_if_new(&mut known, &copy).is_some(),
            "young: read again"
        );
        std::thread::sleep(YOUNG_FOR);
        assert!(
            read_maps_if_new(&mut known, &copy).is_none(),
            "no longer young: its known pcs are not read again"
        );
    }

    #[test]
    fn a_process_gone_gets_the_mappings_read_at_its_exec() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        crate::process::remember_maps(pid);
        child.kill().expect("kill");
        child.wait().expect("reap");
        let maps = read_maps_if_new(&mut HashMap::new(), &copy_of(pid));
        assert!(maps.is_some_and(|m| m.iter().any(|m| m.is_executable())));
    }
}
