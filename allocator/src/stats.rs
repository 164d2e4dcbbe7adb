//! Statistics: the snapshot [`stats`] takes of the tiers' counters
//! ([`crate::counters`]), the thread caches' lengths and the page heap's
//! free pages, and the report written from it. Reads only.
use crate::{
    counters::{
        HUGE_BYTES, HUGE_OBJECTS, LARGE_BYTES, MAPPED_BYTES, METADATA, OUTSTANDING, SAMPLED,
        SMALL_SPAN_BYTES, TRANSFER_OBJECTS,
    },
    os::Message,
    page_heap,
    size_class::{self, NUM_CLASSES},
    thread_cache,
};

/// A snapshot of where the allocator's memory is, in bytes. The same
/// layout is returned by the C function `profalloc_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Held by the program: small objects at their class size, large
    /// objects at their page-rounded size, huge ones at their usable size.
    pub in_use: u64,
    /// Free objects in thread caches.
    pub thread_caches: u64,
    /// Free objects in transfer caches and central lists (including the
    /// unused tails of small-object spans).
    pub central: u64,
    /// Free, resident pages in the page heap.
    pub page_heap: u64,
    /// Pages given back to the OS (mapped, not resident).
    pub returned: u64,
    /// Mapped for objects: page heap plus huge mappings.
    pub mapped: u64,
    /// Mapped for the allocator's own metadata.
    pub metadata: u64,
    /// Allocations sampled by the always-on sampler.
    pub sampled: u64,
}

const _: () = assert!(core::mem::size_of::<Stats>() == 64);

/// Takes a snapshot. Exact when no other thread allocates meanwhile.
pub fn stats() -> Stats {
    let thread = thread_cache::cached_bytes();
    let mut outstanding = 0usize;
    let mut transfer = 0usize;
    for c in 1..NUM_CLASSES {
        let size = size_class::size_of_class(c);
        outstanding += OUTSTANDING[c].load() * size;
        transfer += TRANSFER_OBJECTS[c].load() * size;
    }
    let (free_normal, free_returned) = page_heap::free_pages();
    let small_in_use = outstanding.saturating_sub(transfer + thread);
    let central = SMALL_SPAN_BYTES.load().saturating_sub(outstanding) + transfer;
    Stats {
        in_use: (small_in_use + LARGE_BYTES.load() + HUGE_BYTES.load()
            - HUGE_OBJECTS.load() * crate::huge::HEADER) as u64,
        thread_caches: thread as u64,
        central: central as u64,
        page_heap: (free_normal << size_class::PAGE_SHIFT) as u64,
        returned: (free_returned << size_class::PAGE_SHIFT) as u64,
        mapped: (MAPPED_BYTES.load() + HUGE_BYTES.load()) as u64,
        metadata: METADATA.load() as u64,
        sampled: SAMPLED.load() as u64,
    }
}

/// Writes the human-readable report to stderr (PROFALLOC_STATS=1 at exit).
pub fn write_report() {
    let s = stats();
    let rows: [(&str, u64); 8] = [
        ("in use by the program", s.in_use),
        ("in thread caches", s.thread_caches),
        ("in central lists", s.central),
        ("free in the page heap", s.page_heap),
        ("returned to the OS", s.returned),
        ("mapped", s.mapped),
        ("metadata", s.metadata),
        ("sampled allocations", s.sampled),
    ];
    let mut m = Message::new();
    m.str("profalloc: stats at exit\n");
    m.write_stderr();
    for (name, v) in rows {
        let mut m = Message::new();
        m.str("profalloc:   ").str(name).str(": ").dec(v);
        if name != "sampled allocations" {
            m.str(" bytes");
        }
        m.str("\n");
        m.write_stderr();
    }
    let (dropped, live) = crate::live_set::counts();
    let mut m = Message::new();
    m.str("profalloc:   live heap samples: ")
        .dec(live)
        .str(" kept, ")
        .dec(dropped)
        .str(" dropped (table full)\n");
    m.write_stderr();
    let mut m = Message::new();
    m.str("profalloc:   idle-release threads started: ")
        .dec(crate::counters::BACKGROUND_THREADS.load() as u64)
        .str("\n");
    m.write_stderr();
}
