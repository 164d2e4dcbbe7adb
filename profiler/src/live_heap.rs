//! Reading libprofalloc.so's sampled live heap out of a running process:
//! every sampled allocation still live, since process start, with its
//! stack and, in a CPython process, its thread's Python stack (layout and
//! protocol in `profiler_common::hooks`).
//!
//! The header is found through the `profalloc_live_heap` symbol in the
//! `.dynsym` of a file the process maps; the slots are copied with
//! `process_vm_readv` twice, and a slot counts when both copies agree and
//! its generation is even (no writer inside). Slots that a writer touched
//! between the copies are read again, a few times, then counted as torn.
use std::{iter, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use profiler_common::{
    hooks::{
        LIVE_HEAP_MAGIC, LIVE_HEAP_SYMBOL, LIVE_HEAP_VERSION, LIVE_MAX_FRAMES,
        LIVE_SLOT_PYTHON_CUT, LIVE_SLOT_TRUNCATED, LiveHeapHeader, LiveSlot, live_python_frame,
    },
    python::{ACTIVATION_END, NO_CODE_CHECK, PyFrameSlot},
};

use crate::process;

/// Rounds of re-reading the slots a writer was inside.
const RETRIES: usize = 8;

/// One sampled allocation still live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSample {
    pub address: u64,
    /// Bytes asked for.
    pub size: u64,
    /// Estimated bytes this sample stands for.
    pub weight: u64,
    /// Return addresses, innermost first (the caller of the allocation
    /// function first).
    pub stack: Vec<u64>,
    pub truncated: bool,
    /// The allocating thread's Python stack, innermost first, as the
    /// walkers' slots (empty outside CPython).
    pub python: Vec<PyFrameSlot>,
    /// Python frames are missing at the outer end.
    pub python_cut: bool,
    /// Time since the allocation.
    pub age: Duration,
}

/// The live heap of a process as read once.
#[derive(Clone, Debug, Default)]
pub struct LiveHeap {
    pub samples: Vec<LiveSample>,
    /// Mean sampling distance of the process, in bytes.
    pub sample_bytes: u64,
    /// Samples recorded since start, and those that did not fit.
    pub inserted: u64,
    pub dropped: u64,
    /// Slots a writer kept changing while they were read (left out).
    pub torn: u64,
}

impl LiveHeap {
    /// Estimated live bytes.
    pub fn bytes(&self) -> u64 {
        self.samples.iter().map(|s| s.weight).sum()
    }
}

/// Where the header lives in `pid`: the `.dynsym` symbol of a mapped
/// file, relocated by that file's mapping.
pub fn find_header(pid: u32) -> anyhow::Result<u64> {
    HeaderFinder::default().find(pid)
}

/// Finds headers in many processes, reading each mapped file once: what
/// it learnt of a file (by device and inode) is kept.
#[derive(Default)]
pub struct HeaderFinder {
    /// By (device, inode): the header symbol's address and the segments,
    /// or None for a file without it.
    files: std::collections::HashMap<((u32, u32), u64), Option<HeaderSymbol>>,
}

impl HeaderFinder {
    /// [`find_header`], through what is known of the files already.
    pub fn find(&mut self, pid: u32) -> anyhow::Result<u64> {
        let maps = process::maps(pid)?;
        let mut seen = std::collections::HashSet::new();
        for m in maps.iter().filter(|m| m.is_file()) {
            if !seen.insert((m.dev, m.inode)) {
                continue;
            }
            let found = self.files.entry((m.dev, m.inode)).or_insert_with(|| {
                let file = std::fs::File::open(process::path_in_root(pid, &m.path)).ok()?;
                // SAFETY: the file is mapped read-only and only parsed; a
                // concurrent truncation could fault, which no program does
                // to a library it has loaded.
                let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
                header_symbol(&data)
            });
            let Some((symbol, segments)) = found else {
                continue;
            };
            // The load bias from this mapping and the segment it maps.
            let Some(&(vaddr, _, offset)) = segments
                .iter()
                .find(|&&(_, size, offset)| offset <= m.offset && m.offset < offset + size.max(1))
            else {
                continue;
            };
            let bias = m
                .start
                .wrapping_sub(m.offset)
                .wrapping_sub(vaddr.wrapping_sub(offset));
            return Ok(bias.wrapping_add(*symbol));
        }
        bail!(
            "pid {pid} maps no file that exports {LIVE_HEAP_SYMBOL} (not running on libprofalloc.so?)"
        )
    }

    /// [`read`], through what is known of the files already.
    pub fn read(&mut self, pid: u32) -> anyhow::Result<LiveHeap> {
        let at = self.find(pid)?;
        read_at(pid, at).with_context(|| format!("reading the live heap of pid {pid}"))
    }
}

/// Loadable segments: (address, file size, file offset).
type Segments = Vec<(u64, u64, u64)>;

/// The header symbol's address in a file, and the file's segments.
type HeaderSymbol = (u64, Segments);

/// The symbol's address and the loadable segments of an ELF file, if it
/// exports the header.
fn header_symbol(data: &[u8]) -> Option<HeaderSymbol> {
    let file = object::File::parse(data).ok()?;
    let symbol = file
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok(LIVE_HEAP_SYMBOL))?
        .address();
    let segments = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (s.address(), size, offset)
        })
        .collect();
    Some((symbol, segments))
}

/// Reads the live heap of `pid` (see the module's documentation).
pub fn read(pid: u32) -> anyhow::Result<LiveHeap> {
    let at = find_header(pid)?;
    read_at(pid, at).with_context(|| format!("reading the live heap of pid {pid}"))
}

/// Reads the live heap whose header is at `at` in `pid`.
pub fn read_at(pid: u32, at: u64) -> anyhow::Result<LiveHeap> {
    let header: LiveHeapHeader = read_value(pid, at)?;
    check_header(&header)?;
    let slot_size = size_of::<LiveSlot>();
    let used = header.used.min(header.capacity) as usize;
    let bytes = used * slot_size;
    let mut first = vec![0u8; bytes];
    let mut second = vec![0u8; bytes];
    read_remote(pid, header.slots, &mut first)?;
    read_remote(pid, header.slots, &mut second)?;
    let now = monotonic_ns();
    let mut heap = LiveHeap {
        sample_bytes: header.sample_bytes,
        ..LiveHeap::default()
    };
    let mut retry = Vec::new();
    for i in 0..used {
        let range = i * slot_size..(i + 1) * slot_size;
        match settle(&first[range.clone()], &second[range]) {
            Settled::Sample(s) => heap.samples.push(sample(&s, now)),
            Settled::Empty => {}
            Settled::Changing => retry.push(i),
        }
    }
    for _ in 0..RETRIES {
        if retry.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for &i in &retry {
            let addr = header.slots + (i * slot_size) as u64;
            let (a, b) = (&mut first[..slot_size], &mut second[..slot_size]);
            read_remote(pid, addr, a)?;
            read_remote(pid, addr, b)?;
            match settle(a, b) {
                Settled::Sample(s) => heap.samples.push(sample(&s, now)),
                Settled::Empty => {}
                Settled::Changing => still.push(i),
            }
        }
        retry = still;
    }
    heap.torn = retry.len() as u64;
    // Counters after the slots: they cover everything the copies saw.
    let after: LiveHeapHeader = read_value(pid, at)?;
    heap.inserted = after.inserted;
    heap.dropped = after.dropped;
    Ok(heap)
}

/// A header this reader understands, or why not.
fn check_header(h: &LiveHeapHeader) -> anyhow::Result<()> {
    if h.magic == 0 {
        bail!(
            "the live heap is off (PROFALLOC_LIVE_HEAP_BYTES=0 or PROFALLOC_SAMPLE_BYTES=0) or not started yet"
        );
    }
    if h.magic != LIVE_HEAP_MAGIC {
        bail!("no live heap header at the symbol (magic {:#x})", h.magic);
    }
    if h.version != LIVE_HEAP_VERSION
        || h.header_size as usize != size_of::<LiveHeapHeader>()
        || h.slot_size as usize != size_of::<LiveSlot>()
        || h.max_frames as usize != LIVE_MAX_FRAMES
    {
        bail!(
            "live heap layout version {} (header {} B, slot {} B, {} frames) is not this reader's version {LIVE_HEAP_VERSION}",
            h.version,
            h.header_size,
            h.slot_size,
            h.max_frames
        );
    }
    Ok(())
}

enum Settled {
    Sample(Box<LiveSlot>),
    Empty,
    Changing,
}

/// What two copies of one slot say.
fn settle(a: &[u8], b: &[u8]) -> Settled {
    if a != b {
        return Settled::Changing;
    }
    let slot = from_bytes::<LiveSlot>(a);
    if slot.generation % 2 == 1 {
        Settled::Changing
    } else if slot.ptr == 0 {
        Settled::Empty
    } else {
        Settled::Sample(Box::new(slot))
    }
}

fn sample(s: &LiveSlot, now_ns: u64) -> LiveSample {
    let depth = (s.depth as usize).min(LIVE_MAX_FRAMES);
    let python = (s.python_depth as usize).min(LIVE_MAX_FRAMES - depth);
    LiveSample {
        address: s.ptr,
        size: s.size,
        weight: s.weight,
        stack: s.frames[..depth].to_vec(),
        truncated: s.flags & LIVE_SLOT_TRUNCATED != 0,
        python: s.frames[depth..depth + python]
            .iter()
            .zip(s.python_checks.iter().chain(iter::repeat(&NO_CODE_CHECK)))
            .map(|(&word, &check)| python_slot(word, check))
            .collect(),
        python_cut: s.flags & LIVE_SLOT_PYTHON_CUT != 0,
        age: Duration::from_nanos(now_ns.saturating_sub(s.time_ns)),
    }
}

/// The walker's slot of a live-heap Python word and its code's check.
fn python_slot(word: u64, check: u32) -> PyFrameSlot {
    match live_python_frame(word) {
        Some((code, instr_offset)) => PyFrameSlot {
            code,
            instr_offset,
            check,
        },
        None => PyFrameSlot {
            code: ACTIVATION_END,
            ..PyFrameSlot::default()
        },
    }
}

/// A plain-integer `#[repr(C)]` value from its bytes.
fn from_bytes<T: Copy>(b: &[u8]) -> T {
    assert_eq!(b.len(), size_of::<T>());
    // SAFETY: T is one of the hooks' layout types: integers only, every
    // bit pattern valid; the read is unaligned-safe.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

fn read_value<T: Copy>(pid: u32, at: u64) -> anyhow::Result<T> {
    let mut b = vec![0u8; size_of::<T>()];
    read_remote(pid, at, &mut b)?;
    Ok(from_bytes(&b))
}

/// Copies `buf.len()` bytes at `addr` in `pid`.
fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: the local iovec covers our own buffer; the kernel checks
        // the remote one.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "process_vm_readv of pid {pid} at {:#x}: {e}",
                addr + done as u64
            );
        }
        done += n as usize;
    }
    Ok(())
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of the slots' times).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `path` is an ELF file that exports the live heap.
pub fn exports_live_heap(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|d| header_symbol(&d).is_some())
}

#[cfg(test)]
#[path = "live_heap_tests.rs"]
mod tests;
