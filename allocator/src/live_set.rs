//! The sampled live heap: every sampled allocation that is still live,
//! with its stack, in a table an agent reads from another process
//! (`process_vm_readv`) at any time. The layout and the reading protocol
//! are the ABI in `profiler_common::hooks` ([`LiveHeapHeader`] exported as
//! `profalloc_live_heap`, [`LiveSlot`]s).
//!
//! Memory: the slots and a pointer index live in their own mappings
//! (gperftools mode's arena: `MAP_NORESERVE`, never the profiled heap),
//! capped by `PROFALLOC_LIVE_HEAP_BYTES` (default 64 MiB); samples that do
//! not fit are counted in the header's `dropped`. Empty slots are reused
//! last-in first-out, so the pages touched follow the live count.
//!
//! The pointer index (internal: readers scan the slots) is sized for the
//! cap but split in levels that double: the first is one page, level k
//! (k >= 1) the `2^(k-1)` pages after the first `2^(k-1)`. An insert takes
//! the first free entry of its pointer's window in the lowest level that
//! has one, so a few live samples touch one page of index, not one random
//! page of the whole index per sample; a remove looks through the levels
//! used so far.
//!
//! Lock: none. Inserts and removes run on any thread, in signal handlers
//! and re-entrant frees too: a slot is taken from a tagged lock-free stack
//! (or from the never-used tail), written under its own generation
//! (odd while written), then published in the index by one compare-and-swap;
//! a remove clears the index entry by compare-and-swap, so exactly one
//! thread owns the slot afterwards. Owner: the sampler (insert on a sampled
//! allocation, remove on its free).
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

use profiler_common::hooks::{
    LIVE_HEAP_MAGIC, LIVE_HEAP_VERSION, LIVE_MAX_FRAMES, LIVE_MAX_PYTHON_WORDS,
    LIVE_SLOT_PYTHON_CUT, LIVE_SLOT_TRUNCATED, LiveHeapHeader, LiveSlot,
};

use crate::os;

/// [`LiveHeapHeader`] with atomic fields (same layout, checked below).
#[repr(C)]
pub struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    header_size: AtomicU32,
    slot_size: AtomicU32,
    max_frames: AtomicU32,
    capacity: AtomicU64,
    slots: AtomicU64,
    used: AtomicU64,
    generation: AtomicU64,
    live: AtomicU64,
    inserted: AtomicU64,
    dropped: AtomicU64,
    sample_bytes: AtomicU64,
    start_ns: AtomicU64,
}

/// [`LiveSlot`] with atomic fields (same layout, checked below).
#[repr(C)]
struct Slot {
    generation: AtomicU64,
    ptr: AtomicU64,
    size: AtomicU64,
    weight: AtomicU64,
    time_ns: AtomicU64,
    depth: AtomicU32,
    flags: AtomicU32,
    link: AtomicU64,
    python_depth: AtomicU32,
    _reserved: AtomicU32,
    frames: [AtomicU64; LIVE_MAX_FRAMES],
    python_checks: [AtomicU32; LIVE_MAX_PYTHON_WORDS],
}

macro_rules! same_layout {
    ($ours:ty, $abi:ty, $($f:ident),*) => {
        const _: () = assert!(core::mem::size_of::<$ours>() == core::mem::size_of::<$abi>());
        $(const _: () = assert!(
            core::mem::offset_of!($ours, $f) == core::mem::offset_of!($abi, $f)
        );)*
    };
}
same_layout!(
    Header,
    LiveHeapHeader,
    magic,
    version,
    header_size,
    slot_size,
    max_frames,
    capacity,
    slots,
    used,
    generation,
    live,
    inserted,
    dropped,
    sample_bytes,
    start_ns
);
same_layout!(
    Slot,
    LiveSlot,
    generation,
    ptr,
    size,
    weight,
    time_ns,
    depth,
    flags,
    link,
    python_depth,
    frames,
    python_checks
);

/// A sample's Python stack for the table: its words
/// (`profiler_common::hooks::live_python_word`), innermost first, the check
/// of each word's code object (`profiler_common::python::code_check`, 0 for
/// an activation's end), and whether the walk stopped before the outermost
/// frame.
#[derive(Clone, Copy)]
pub(crate) struct PythonWords<'a> {
    pub words: &'a [u64],
    pub checks: &'a [u32],
    pub cut: bool,
}

impl PythonWords<'_> {
    pub(crate) const NONE: PythonWords<'static> = PythonWords {
        words: &[],
        checks: &[],
        cut: false,
    };
}

/// An index entry: the pointer (8-aligned, below 2^48) over the slot number.
const SLOT_BITS: u32 = 19;
/// Most slots an index entry can name.
pub(crate) const MAX_SLOTS: usize = (1 << SLOT_BITS) - 1;
/// Index entries looked at from a pointer's hash (insert and remove), in
/// each level.
const WINDOW: usize = 16;
/// Entries of the index's first level: one page.
const FIRST_LEVEL: usize = 4096 / 8;
/// The free stack's empty value (slot numbers are stored + 1).
const NO_SLOT: u64 = 0;

fn entry(ptr: usize, slot: usize) -> Option<u64> {
    (ptr != 0 && ptr & 7 == 0 && ptr < 1 << 48)
        .then_some(((ptr as u64 >> 3) << SLOT_BITS) | slot as u64)
}

/// One live-heap table: the exported header and the memory behind it.
pub(crate) struct LiveSet {
    header: &'static Header,
    slots: AtomicUsize,
    index: AtomicUsize,
    /// log2 of the index's entries.
    index_bits: AtomicU32,
    /// log2 of the first level's entries.
    first_bits: AtomicU32,
    /// Levels an insert has reached so far (removes look through these).
    levels: AtomicU32,
    /// Tagged free-stack head: (tag << 32) | (slot + 1).
    free: AtomicU64,
}

impl LiveSet {
    pub(crate) const fn new(header: &'static Header) -> Self {
        Self {
            header,
            slots: AtomicUsize::new(0),
            index: AtomicUsize::new(0),
            index_bits: AtomicU32::new(0),
            first_bits: AtomicU32::new(0),
            levels: AtomicU32::new(0),
            free: AtomicU64::new(NO_SLOT),
        }
    }

    /// Makes a table of at most `bytes` of slots (plus its index). Called
    /// once, before any insert. False when `bytes` holds no slot or the
    /// memory could not be mapped (the table stays off).
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(crate) fn start(&self, bytes: u64, sample_bytes: u64) -> bool {
        let capacity = (bytes as usize / size_of::<Slot>()).min(MAX_SLOTS);
        if capacity == 0 {
            return false;
        }
        let index_len = (capacity * 2).next_power_of_two().max(WINDOW);
        let slots = os::map((capacity * size_of::<Slot>()).next_multiple_of(4096));
        let index = os::map((index_len * 8).next_multiple_of(4096));
        if slots.is_null() || index.is_null() {
            return false;
        }
        self.slots.store(slots as usize, Ordering::Relaxed);
        self.index.store(index as usize, Ordering::Relaxed);
        self.index_bits
            .store(index_len.trailing_zeros(), Ordering::Relaxed);
        self.first_bits.store(
            index_len.min(FIRST_LEVEL).trailing_zeros(),
            Ordering::Relaxed,
        );
        let h = self.header;
        h.version.store(LIVE_HEAP_VERSION, Ordering::Relaxed);
        h.header_size
            .store(size_of::<Header>() as u32, Ordering::Relaxed);
        h.slot_size
            .store(size_of::<Slot>() as u32, Ordering::Relaxed);
        h.max_frames
            .store(LIVE_MAX_FRAMES as u32, Ordering::Relaxed);
        h.capacity.store(capacity as u64, Ordering::Relaxed);
        h.slots.store(slots as u64, Ordering::Relaxed);
        h.sample_bytes.store(sample_bytes, Ordering::Relaxed);
        h.start_ns.store(now_ns(), Ordering::Relaxed);
        // Published last: a reader seeing the magic sees the rest.
        h.magic.store(LIVE_HEAP_MAGIC, Ordering::Release);
        true
    }

    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.slots.load(Ordering::Relaxed) != 0
    }

    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: i < capacity (the callers' invariant); the mapping lives
        // as long as the process and is only accessed through atomics.
        unsafe { &*(self.slots.load(Ordering::Relaxed) as *const Slot).add(i) }
    }

    /// Levels of the index.
    fn level_count(&self) -> u32 {
        self.index_bits.load(Ordering::Relaxed) - self.first_bits.load(Ordering::Relaxed) + 1
    }

    /// The entries of index level `level` a pointer may sit in.
    fn window(&self, ptr: usize, level: u32) -> impl Iterator<Item = &AtomicU64> {
        let first = self.first_bits.load(Ordering::Relaxed);
        // Level 0: [0, 2^first); level k: [2^(first+k-1), 2^(first+k)).
        let bits = first + level.saturating_sub(1);
        let start = if level == 0 { 0 } else { 1usize << bits };
        let base = self.index.load(Ordering::Relaxed) as *const AtomicU64;
        let mask = (1usize << bits) - 1;
        let h = ((ptr as u64 >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize;
        // SAFETY: every position is masked into the level, which lies in
        // the index mapping.
        (0..WINDOW).map(move |k| unsafe { &*base.add(start + ((h + k) & mask)) })
    }

    /// Records a sampled allocation, with its native `stack` and its
    /// thread's Python stack; counts it as dropped when it does not fit (or
    /// the pointer cannot be indexed). The Python words come first in what
    /// is kept (at most [`LIVE_MAX_PYTHON_WORDS`], the outer ones cut), the
    /// native stack gets the rest.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(crate) fn insert(
        &self,
        ptr: usize,
        size: usize,
        weight: u64,
        stack: &[u64],
        truncated: bool,
        python: PythonWords<'_>,
    ) {
        if !self.on() {
            return;
        }
        let h = self.header;
        let Some(i) = self.take_slot() else {
            h.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(e) = entry(ptr, i) else {
            self.give_back(i);
            h.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let py = python.words.len().min(LIVE_MAX_PYTHON_WORDS);
        let depth = stack.len().min(LIVE_MAX_FRAMES - py);
        let mut flags = 0;
        if truncated || stack.len() > depth {
            flags |= LIVE_SLOT_TRUNCATED;
        }
        if python.cut || python.words.len() > py {
            flags |= LIVE_SLOT_PYTHON_CUT;
        }
        self.write(i, |s| {
            s.ptr.store(ptr as u64, Ordering::Relaxed);
            s.size.store(size as u64, Ordering::Relaxed);
            s.weight.store(weight, Ordering::Relaxed);
            s.time_ns.store(now_ns(), Ordering::Relaxed);
            s.depth.store(depth as u32, Ordering::Relaxed);
            s.flags.store(flags, Ordering::Relaxed);
            s.python_depth.store(py as u32, Ordering::Relaxed);
            let words = stack[..depth].iter().chain(&python.words[..py]);
            for (f, &word) in s.frames.iter().zip(words) {
                f.store(word, Ordering::Relaxed);
            }
            for (c, &check) in s.python_checks.iter().zip(&python.checks[..py]) {
                c.store(check, Ordering::Relaxed);
            }
        });
        let published = (0..self.level_count()).find(|&level| {
            self.window(ptr, level).any(|cell| {
                cell.compare_exchange(0, e, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
        });
        if let Some(level) = published {
            self.levels.fetch_max(level + 1, Ordering::Release);
        } else {
            self.write(i, |s| s.ptr.store(0, Ordering::Relaxed));
            self.give_back(i);
            h.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        h.live.fetch_add(1, Ordering::Relaxed);
        h.inserted.fetch_add(1, Ordering::Relaxed);
        h.generation.fetch_add(1, Ordering::Release);
    }

    /// Forgets a sampled allocation being freed (nothing when it is not in
    /// the table: dropped, or sampled before the table existed).
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(crate) fn remove(&self, ptr: usize) {
        if !self.on() {
            return;
        }
        let key = (ptr as u64 >> 3) << SLOT_BITS;
        let mask = (1u64 << SLOT_BITS) - 1;
        let levels = self.levels.load(Ordering::Acquire);
        let cells = (0..levels).flat_map(|level| self.window(ptr, level));
        for cell in cells {
            let e = cell.load(Ordering::Acquire);
            if e & !mask != key || e == 0 {
                continue;
            }
            if cell
                .compare_exchange(e, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let i = (e & mask) as usize;
                self.write(i, |s| s.ptr.store(0, Ordering::Relaxed));
                self.give_back(i);
                let h = self.header;
                h.live.fetch_sub(1, Ordering::Relaxed);
                h.generation.fetch_add(1, Ordering::Release);
            }
            return;
        }
    }

    /// Writes slot `i` (owned by the caller) under its generation.
    fn write(&self, i: usize, f: impl FnOnce(&Slot)) {
        let s = self.slot(i);
        let g = s.generation.load(Ordering::Relaxed);
        s.generation.store(g | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        f(s);
        s.generation.store((g | 1) + 1, Ordering::Release);
    }

    /// An empty slot: the most recently freed one, else a never-used one.
    fn take_slot(&self) -> Option<usize> {
        let mut head = self.free.load(Ordering::Acquire);
        loop {
            let top = head & 0xffff_ffff;
            if top == NO_SLOT {
                break;
            }
            let next = self.slot(top as usize - 1).link.load(Ordering::Relaxed) & 0xffff_ffff;
            let tagged = (head & !0xffff_ffff).wrapping_add(1 << 32) | next;
            match self
                .free
                .compare_exchange_weak(head, tagged, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(top as usize - 1),
                Err(h) => head = h,
            }
        }
        let h = self.header;
        let capacity = h.capacity.load(Ordering::Relaxed);
        h.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u < capacity).then_some(u + 1)
            })
            .ok()
            .map(|u| u as usize)
    }

    fn give_back(&self, i: usize) {
        let s = self.slot(i);
        let mut head = self.free.load(Ordering::Acquire);
        loop {
            s.link.store(head & 0xffff_ffff, Ordering::Relaxed);
            let tagged = (head & !0xffff_ffff).wrapping_add(1 << 32) | (i as u64 + 1);
            match self
                .free
                .compare_exchange_weak(head, tagged, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, to the kernel's tick: the coarse clock
/// is the same clock as of the last tick (at most a few milliseconds
/// behind, so ages read against CLOCK_MONOTONIC are at most that much
/// older), and the vDSO returns it without reading the TSC, several times
/// cheaper on the sampled path. No allocation, no lock.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The process's table, found by agents through `.dynsym`.
#[unsafe(no_mangle)]
pub static profalloc_live_heap: Header = Header::zeroed();

static LIVE: LiveSet = LiveSet::new(&profalloc_live_heap);

impl Header {
    pub(crate) const fn zeroed() -> Self {
        Self {
            magic: AtomicU64::new(0),
            version: AtomicU32::new(0),
            header_size: AtomicU32::new(0),
            slot_size: AtomicU32::new(0),
            max_frames: AtomicU32::new(0),
            capacity: AtomicU64::new(0),
            slots: AtomicU64::new(0),
            used: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            live: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            sample_bytes: AtomicU64::new(0),
            start_ns: AtomicU64::new(0),
        }
    }
}

/// The process's live set (see [`LiveSet`]).
pub(crate) fn live() -> &'static LiveSet {
    &LIVE
}

/// Samples that did not fit, and samples in the table (statistics).
pub(crate) fn counts() -> (u64, u64) {
    let h = &profalloc_live_heap;
    (
        h.dropped.load(Ordering::Relaxed),
        h.live.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
#[path = "live_set_tests.rs"]
mod tests;

#[cfg(test)]
pub(crate) fn read_slot(set: &LiveSet, i: usize) -> LiveSlot {
    let s = set.slot(i);
    // SAFETY: the slot's memory is a LiveSlot (same layout).
    unsafe { core::ptr::read_volatile(core::ptr::from_ref(s).cast::<LiveSlot>()) }
}
