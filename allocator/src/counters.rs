//! The counters the tiers keep: relaxed atomics, written on slow paths
//! only (never on a fast path), each by the tier its comment names. They
//! are read together only by the snapshot in [`crate::stats`].
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::size_class::NUM_CLASSES;

pub(crate) struct Counter(AtomicUsize);

impl Counter {
    pub(crate) const fn new() -> Self {
        Self(AtomicUsize::new(0))
    }
    #[inline]
    pub(crate) fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn store(&self, n: usize) {
        self.0.store(n, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn load(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// Page heap: address space it has put to use (reserved but never used
/// address space is not counted).
pub(crate) static MAPPED_BYTES: Counter = Counter::new();
/// Page heap: bytes given back to the OS (or never touched).
pub(crate) static RELEASED_BYTES: Counter = Counter::new();
/// Page heap: resident free bytes.
pub(crate) static HEAP_FREE_BYTES: Counter = Counter::new();
/// Page map and page heap: allocator metadata (leaves, span records).
pub(crate) static METADATA: Counter = Counter::new();
/// Page heap: pages of small-object spans, in bytes.
pub(crate) static SMALL_SPAN_BYTES: Counter = Counter::new();
/// Page heap: large objects, in bytes (page-rounded).
pub(crate) static LARGE_BYTES: Counter = Counter::new();
/// Huge objects: their mappings, in bytes (including the header page).
pub(crate) static HUGE_BYTES: Counter = Counter::new();
/// Huge objects: how many are alive.
pub(crate) static HUGE_OBJECTS: Counter = Counter::new();
/// Central lists, per class: objects handed out (to the transfer
/// cache, thread caches or the program).
pub(crate) static OUTSTANDING: [Counter; NUM_CLASSES] = [const { Counter::new() }; NUM_CLASSES];
/// Transfer caches, per class: objects sitting there.
pub(crate) static TRANSFER_OBJECTS: [Counter; NUM_CLASSES] =
    [const { Counter::new() }; NUM_CLASSES];
/// Sampler: allocations sampled (or recorded) so far.
pub(crate) static SAMPLED: Counter = Counter::new();
/// Page heap: idle-release threads started (0 or 1 per process).
pub(crate) static BACKGROUND_THREADS: Counter = Counter::new();
