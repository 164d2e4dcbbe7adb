//! The middle tier, per size class: a transfer cache of whole batches in
//! front of a central free list of spans.
//!
//! Locks: each class has a transfer lock and a central lock (never both at
//! once; the central lock may be held while taking the page heap lock).
//! Threads move objects in and out as null-terminated chains linked
//! through each object's first word.
//!
//! Transfer cache (none for big objects, see `cache_budget`: theirs go
//! back to their spans, and a span of one to the page heap, so that other
//! sizes reuse the pages): chains of exactly `BATCH[c]` objects; a thread that
//! overflows hands over a chain in O(1), and a thread that runs dry takes
//! one back in O(1), without touching spans. It holds [`INITIAL_SLOTS`]
//! chains at first and doubles each time a chain finds it full after a
//! thread found it empty (demand on both sides: a producer/consumer pair
//! whose chains would otherwise go back to their spans object by object,
//! and be carved again, reaches its working set in a few rounds), up to
//! `transfer_slots(c)`: a program that only frees, or allocates, in a
//! class does not hoard whole batches there, and its objects go back to
//! their spans, whose pages other classes can reuse.
//!
//! Central list: the spans of the class that still have free objects. An
//! object goes back to its own span (found through the page map; a run of
//! a chain's objects in one span costs one lookup and is spliced whole);
//! a span whose objects are all back returns to the page heap. The page heap and
//! the page map are reached through [`PageSource`], so that tests can
//! stand in for them.
//!
//! Owner: the thread caches' slow paths (and record-all mode's
//! allocations), through [`remove_range`] and [`insert_range`].
use core::ptr;

use crate::{
    cache_budget, counters,
    lock::SpinLock,
    page_heap, pagemap,
    size_class::{self, BATCH, NUM_CLASSES, PAGE_SHIFT, PAGES},
    span::{Span, SpanList},
};

/// What the central lists need from the tiers below them.
pub(crate) trait PageSource {
    /// A span of `npages` for objects of class `c`, or null.
    fn allocate_span(&self, npages: usize, c: u8) -> *mut Span;
    /// Takes back a span whose objects are all free.
    ///
    /// # Safety
    /// `s` came from [`PageSource::allocate_span`]; nothing uses it.
    unsafe fn free_span(&self, s: *mut Span);
    /// The span holding object `p`.
    fn span_of(&self, p: *mut u8) -> *mut Span;
}

/// The real tiers: the page heap and the page map.
struct PageHeap;

impl PageSource for PageHeap {
    fn allocate_span(&self, npages: usize, c: u8) -> *mut Span {
        page_heap::allocate(npages, c, 1)
    }

    unsafe fn free_span(&self, s: *mut Span) {
        // SAFETY: the caller's contract.
        unsafe { page_heap::deallocate(s) }
    }

    fn span_of(&self, p: *mut u8) -> *mut Span {
        pagemap::span(p as usize >> PAGE_SHIFT)
    }
}

const MAX_SLOTS: usize = 64;
/// Chains a class's transfer cache holds before any demand.
const INITIAL_SLOTS: usize = 2;

/// One class's middle tier. The transfer fields (`slots`, `used`,
/// `capacity`) are touched only under `transfer_lock`, the span list only
/// under `central_lock`.
#[repr(C, align(64))]
struct Class {
    transfer_lock: SpinLock,
    slots: core::cell::UnsafeCell<[*mut u8; MAX_SLOTS]>,
    used: core::cell::Cell<usize>,
    /// The chains it may hold once grown; 0 before: [`INITIAL_SLOTS`] (see
    /// [`Class::capacity`]). So every field starts zero and the table
    /// lives in `.bss`: only the pages of classes in use become resident,
    /// where a table in `.data` (56 KiB) is mapped whole from the file.
    capacity: core::cell::Cell<usize>,
    /// A thread wanted a chain and found none since the capacity last
    /// grew.
    missed: core::cell::Cell<bool>,
    central_lock: SpinLock,
    nonempty: core::cell::UnsafeCell<SpanList>,
}

// SAFETY: each field is only touched under the lock its comment names.
unsafe impl Sync for Class {}

static CLASSES: [Class; NUM_CLASSES] = [const { Class::new() }; NUM_CLASSES];

fn class(c: usize) -> &'static Class {
    &CLASSES[c]
}

/// Takes a chain of up to `want` objects of class `c`. Returns (head, n);
/// n == 0 means out of memory.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn remove_range(c: usize, want: usize) -> (*mut u8, usize) {
    class(c).remove_range(&PageHeap, c, want)
}

/// Gives back a null-terminated chain of `n` objects of class `c`.
///
/// # Safety
/// Every object in the chain is a free object of class `c`.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn insert_range(c: usize, head: *mut u8, n: usize) {
    // SAFETY: the caller's contract.
    unsafe { class(c).insert_range(&PageHeap, c, head, n) }
}

/// Moves every batch in the transfer caches to the central lists (and so
/// empty spans to the page heap): part of malloc_trim.
pub(crate) fn drain_transfer_caches() {
    for c in 1..NUM_CLASSES {
        class(c).drain_transfer(&PageHeap, c);
    }
}

impl Class {
    const fn new() -> Self {
        Self {
            transfer_lock: SpinLock::new(),
            slots: core::cell::UnsafeCell::new([ptr::null_mut(); MAX_SLOTS]),
            used: core::cell::Cell::new(0),
            capacity: core::cell::Cell::new(0),
            missed: core::cell::Cell::new(false),
            central_lock: SpinLock::new(),
            nonempty: core::cell::UnsafeCell::new(SpanList::new()),
        }
    }

    /// The chains the transfer cache of class `c` may hold now
    /// (transfer_lock held).
    fn capacity(&self, c: usize) -> usize {
        if cache_budget::is_big(c) {
            return 0;
        }
        self.capacity.get().max(INITIAL_SLOTS)
    }

    /// Takes a chain of up to `want` objects: a whole batch from the
    /// transfer cache when there is one, else from the spans.
    #[unsafe(link_section = ".text.hot.profalloc")]
    fn remove_range<P: PageSource>(&self, pages: &P, c: usize, want: usize) -> (*mut u8, usize) {
        if want == BATCH[c] as usize {
            self.transfer_lock.lock();
            let used = self.used.get();
            if used > 0 {
                self.used.set(used - 1);
                // SAFETY: the slots are touched only under transfer_lock.
                let head = unsafe { (*self.slots.get())[used - 1] };
                self.transfer_lock.unlock();
                counters::TRANSFER_OBJECTS[c].sub(want);
                return (head, want);
            }
            self.missed.set(true);
            self.transfer_lock.unlock();
        }
        self.central_lock.lock();
        // SAFETY: central_lock is held.
        let r = unsafe { self.fetch_locked(pages, c, want) };
        self.central_lock.unlock();
        r
    }

    /// Takes back a chain of `n` objects: into the transfer cache when it
    /// is a whole batch and there is room, else each to its span.
    ///
    /// # Safety
    /// Every object in the chain is a free object of class `c`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    unsafe fn insert_range<P: PageSource>(&self, pages: &P, c: usize, head: *mut u8, n: usize) {
        if n == BATCH[c] as usize {
            self.transfer_lock.lock();
            let used = self.used.get();
            if used == self.capacity(c) && self.missed.get() && used < size_class::transfer_slots(c)
            {
                self.capacity
                    .set((2 * used).min(size_class::transfer_slots(c)));
                self.missed.set(false);
            }
            if used < self.capacity(c) {
                // SAFETY: the slots are touched only under transfer_lock.
                unsafe { (*self.slots.get())[used] = head };
                self.used.set(used + 1);
                self.transfer_lock.unlock();
                counters::TRANSFER_OBJECTS[c].add(n);
                return;
            }
            self.transfer_lock.unlock();
        }
        // SAFETY: the caller's contract.
        unsafe { self.release_chain(pages, c, head) };
    }

    /// Gives each object of a chain back to its span: a run of objects
    /// that share a span (objects freed in the order they were carved,
    /// which a thread's list keeps) costs one page map lookup and one
    /// update of the span, and keeps its links: it is spliced whole onto
    /// the span's free list.
    ///
    /// # Safety
    /// Every object in the chain is a free object of class `c`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    unsafe fn release_chain<P: PageSource>(&self, pages: &P, c: usize, head: *mut u8) {
        self.central_lock.lock();
        let mut p = head;
        let mut n = 0;
        while !p.is_null() {
            // SAFETY: the chain's objects are ours, linked through their
            // first word; p's span is live while it holds p (central_lock
            // held), and its objects lie in [start, limit).
            unsafe {
                let s = pages.span_of(p);
                let (lo, len) = ((*s).start_addr(), (*s).limit - (*s).start_addr());
                let (first, mut last, mut k) = (p, p, 1);
                loop {
                    let next = *(last as *mut *mut u8);
                    // One compare: null (and anything below the span)
                    // wraps to past its length.
                    if (next as usize).wrapping_sub(lo) >= len {
                        p = next;
                        break;
                    }
                    last = next;
                    k += 1;
                }
                self.release_run_locked(pages, s, first, last, k);
                n += k as usize;
            }
        }
        // Once per chain: an atomic read-modify-write per object cost as
        // much as the rest of giving it back.
        counters::OUTSTANDING[c].sub(n);
        self.central_lock.unlock();
    }

    /// Empties the transfer cache into the spans.
    fn drain_transfer<P: PageSource>(&self, pages: &P, c: usize) {
        loop {
            self.transfer_lock.lock();
            let used = self.used.get();
            let head = if used > 0 {
                self.used.set(used - 1);
                // SAFETY: the slots are touched only under transfer_lock.
                unsafe { (*self.slots.get())[used - 1] }
            } else {
                ptr::null_mut()
            };
            self.transfer_lock.unlock();
            if head.is_null() {
                return;
            }
            counters::TRANSFER_OBJECTS[c].sub(BATCH[c] as usize);
            // SAFETY: a chain of free objects of class c.
            unsafe { self.release_chain(pages, c, head) };
        }
    }

    /// # Safety
    /// central_lock held.
    unsafe fn fetch_locked<P: PageSource>(
        &self,
        pages: &P,
        c: usize,
        want: usize,
    ) -> (*mut u8, usize) {
        let size = size_class::size_of_class(c);
        let mut head: *mut u8 = ptr::null_mut();
        let mut n = 0;
        // SAFETY: central lock held; spans on the nonempty list are ours.
        unsafe {
            let nonempty = &mut *self.nonempty.get();
            while n < want {
                let mut s = nonempty.head;
                if s.is_null() {
                    s = pages.allocate_span(PAGES[c] as usize, c as u8);
                    if s.is_null() {
                        break;
                    }
                    (*s).bump = (*s).start_addr();
                    (*s).limit = (*s).bump + size_class::objects_per_span(c) * size;
                    nonempty.push(s);
                }
                // Objects given back first, taken as one linked run (their
                // links stay), then new ones carved.
                let taken = n;
                let first = (*s).freelist;
                if !first.is_null() {
                    prefetch_free_objects(s, size);
                    let mut last = first;
                    n += 1;
                    while n < want {
                        let next = *(last as *mut *mut u8);
                        if next.is_null() {
                            break;
                        }
                        last = next;
                        n += 1;
                    }
                    (*s).freelist = *(last as *mut *mut u8);
                    *(last as *mut *mut u8) = head;
                    head = first;
                }
                // Carved from the top down, so that the lowest address comes
                // first: a run of allocations walks up through memory, the
                // direction the hardware prefetchers follow best when the
                // program later visits its objects in the order it made them
                // (a garbage collector's object lists, a linked list built
                // by appending).
                let bump = (*s).bump;
                let end = (*s).limit.min(bump + (want - n) * size);
                let mut o = end;
                while o > bump {
                    o -= size;
                    *(o as *mut *mut u8) = head;
                    head = o as *mut u8;
                    n += 1;
                }
                (*s).bump = end;
                (*s).allocated += (n - taken) as u32;
                if (*s).freelist.is_null() && (*s).bump >= (*s).limit {
                    nonempty.remove(s);
                }
            }
        }
        counters::OUTSTANDING[c].add(n);
        (head, n)
    }

    /// Puts the `k` objects linked from `first` to `last` back on their
    /// span `s` (the caller counts them out of `OUTSTANDING`).
    ///
    /// # Safety
    /// central_lock held; the run is free objects of this class, all of
    /// span `s`; `last`'s link is no longer needed.
    unsafe fn release_run_locked<P: PageSource>(
        &self,
        pages: &P,
        s: *mut Span,
        first: *mut u8,
        last: *mut u8,
        k: u32,
    ) {
        // SAFETY: s is the run's live span; central lock held.
        unsafe {
            let nonempty = &mut *self.nonempty.get();
            let was_full = (*s).freelist.is_null() && (*s).bump >= (*s).limit;
            *(last as *mut *mut u8) = (*s).freelist;
            (*s).freelist = first;
            (*s).allocated -= k;
            if (*s).allocated == 0 {
                if !was_full {
                    nonempty.remove(s);
                }
                pages.free_span(s);
            } else if was_full {
                nonempty.push(s);
            }
        }
    }
}

/// Takes every lock of this tier (before fork).
pub(crate) fn lock_all() {
    for c in 1..NUM_CLASSES {
        class(c).transfer_lock.lock();
        class(c).central_lock.lock();
    }
}

/// Releases every lock of this tier (after fork, in the parent).
pub(crate) fn unlock_all() {
    for c in 1..NUM_CLASSES {
        class(c).central_lock.unlock();
        class(c).transfer_lock.unlock();
    }
}

/// Resets every lock of this tier (after fork, in the child).
pub(crate) fn reset_all() {
    for c in 1..NUM_CLASSES {
        class(c).central_lock.reset();
        class(c).transfer_lock.reset();
    }
}

/// Starts fetching the lines of a span's carved objects when most of them
/// are free, before its free list is walked: the list is in the order the
/// objects were freed, often long ago, so each step of the walk would wait
/// for memory in turn (the fragmentation workload spent 12% of its time
/// there); the program is about to write these objects anyway.
///
/// # Safety
/// `s` is a live small-object span of objects of `size` bytes.
#[inline(always)]
unsafe fn prefetch_free_objects(s: *const Span, size: usize) {
    /// Lines fetched at most per span.
    const MAX_LINES: usize = 512;
    // SAFETY: the caller's contract.
    let (start, bump, allocated) = unsafe { ((*s).start_addr(), (*s).bump, (*s).allocated) };
    let carved = (bump - start) / size;
    let free = carved.saturating_sub(allocated as usize);
    if free < 4 || 2 * free < carved {
        return;
    }
    let step = size.max(64);
    let mut a = start;
    let end = bump.min(start + MAX_LINES * step);
    while a < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: prefetching never faults, whatever the address.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(a as *const i8);
        }
        a += step;
    }
}

#[cfg(test)]
#[path = "central_tests.rs"]
mod tests;
