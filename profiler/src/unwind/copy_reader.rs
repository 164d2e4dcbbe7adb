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
    let mut known: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
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
/// read before: within milliseconds of the copy, so that a process that
/// exits before the session's loop gets to it still has its tables built
/// for its copies.
fn read_maps_if_new(
    known: &mut HashMap<u32, Vec<(u64, u64)>>,
    copy: &Copy,
) -> Option<Vec<Mapping>> {
    let pc = copy.frame.pc;
    if known
        .get(&copy.pid)
        .is_some_and(|ranges| ranges.iter().any(|&(s, e)| s <= pc && pc < e))
    {
        return None;
    }
    let maps = crate::process::maps(copy.pid).ok()?;
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
    known.insert(copy.pid, ranges);
    Some(maps)
}

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
