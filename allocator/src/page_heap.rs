//! The page heap: hands out spans of pages and takes them back, coalescing
//! free neighbours; gets address space from the OS in large reservations
//! and gives physical pages back (madvise) after they stayed free a while,
//! past a bound on free resident pages (both in `decay`) and on
//! `malloc_trim`.
//!
//! Lock: one global lock, [`LOCK`], around every function here. Lock order:
//! a class's central lock may be held when taking it, never the reverse.
//! Owner: the central lists (spans for small objects) and the slow paths
//! (large objects); the fork handlers take and reset its lock.
//!
//! Free spans sit on `normal` (resident) or `returned` (given back) lists,
//! indexed by length in pages; the last list holds every span of
//! `LISTS - 1` pages or more. Neighbours merge only when both are in the
//! same state, so freeing never needs a syscall.
use core::ptr;

use crate::{
    counters,
    lock::SpinLock,
    os, pagemap,
    size_class::{PAGE_SHIFT, PAGE_SIZE},
    span::{self, Span, SpanList},
};

const LISTS: usize = 129;
/// Address space reserved at a time (touched only as spans are used).
const RESERVE_BYTES: usize = 64 << 20;
/// Smallest growth of the heap, in pages (1 MiB).
const MIN_GROW_PAGES: usize = 128;
/// Metadata arena chunk.
const META_CHUNK: usize = 256 << 10;

pub(crate) mod background;
mod release;

use release::decay_locked;
pub use release::release_all;

pub static LOCK: SpinLock = SpinLock::new();

struct Heap {
    normal: [SpanList; LISTS],
    returned: [SpanList; LISTS],
    /// Bit `i` (below `LISTS - 1`): `normal[i]` or `returned[i]` holds a
    /// span, so that a search finds the first fitting length with one
    /// `tzcnt` instead of testing up to 254 list heads (600 instructions a
    /// call when only the long list had spans).
    exact_nonempty: u128,
    /// Unused part of the current reservation (page numbers).
    reserve_next: usize,
    reserve_end: usize,
    /// Recycled span records, and the metadata arena's unused part.
    spare_spans: *mut Span,
    meta_next: usize,
    meta_end: usize,
    /// Pages freed into the heap since the last rate-driven release.
    release_credit: usize,
    /// Release epochs so far (see `decay`), and when the current began.
    epoch: u64,
    epoch_start_ns: u64,
    free_normal_pages: usize,
    free_returned_pages: usize,
}

struct HeapCell(core::cell::UnsafeCell<Heap>);
// SAFETY: the heap is only touched with LOCK held.
unsafe impl Sync for HeapCell {}

static HEAP: HeapCell = HeapCell(core::cell::UnsafeCell::new(Heap {
    normal: [const { SpanList::new() }; LISTS],
    returned: [const { SpanList::new() }; LISTS],
    exact_nonempty: 0,
    reserve_next: 0,
    reserve_end: 0,
    spare_spans: ptr::null_mut(),
    meta_next: 0,
    meta_end: 0,
    release_credit: 0,
    epoch: 2,
    epoch_start_ns: 0,
    free_normal_pages: 0,
    free_returned_pages: 0,
}));

/// Bytes freed into the heap that end a release epoch, or the heap in use
/// when larger (`decay::epoch_credit`; 0 = release only on malloc_trim: no
/// epochs, no bound). Set from PROFALLOC_RELEASE_BYTES at
/// start-up.
pub static RELEASE_BYTES: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(16 << 20);

/// # Safety
/// LOCK must be held.
unsafe fn heap() -> &'static mut Heap {
    // SAFETY: LOCK is held (caller contract), so this is the only reference.
    unsafe { &mut *HEAP.0.get() }
}

/// Allocates a span of `npages` for small objects of class `class` (all
/// pages registered with the class) or, with class 0, a large span (first
/// and last page registered). `align_pages` (a power of two) aligns its
/// start. Null when out of memory. Takes LOCK.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn allocate(npages: usize, class: u8, align_pages: usize) -> *mut Span {
    LOCK.lock();
    // SAFETY: LOCK is held.
    let s = unsafe { allocate_locked(npages, class, align_pages) };
    LOCK.unlock();
    s
}

/// Gives a small or large span back to the heap. Takes LOCK.
///
/// # Safety
/// `s` is a live SMALL or LARGE span nobody uses any more.
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe fn deallocate(s: *mut Span) {
    LOCK.lock();
    // SAFETY: LOCK is held; the caller gives up `s`.
    unsafe {
        let n = (*s).npages;
        if (*s).state == span::SMALL {
            // Interior pages leave the map; first/last stay for coalescing.
            for p in (*s).start..(*s).start + n {
                pagemap::set_class(p, 0);
                if p != (*s).start && p != (*s).start + n - 1 {
                    pagemap::set_span(p, ptr::null_mut());
                }
            }
            counters::SMALL_SPAN_BYTES.sub(n << PAGE_SHIFT);
        } else {
            counters::LARGE_BYTES.sub(n << PAGE_SHIFT);
        }
        (*s).state = span::FREE;
        (*s).returned = false;
        (*s).sampled = false;
        let h = heap();
        (*s).free_epoch = h.epoch;
        insert_free(s);
        h.release_credit += n;
        // SAFETY: LOCK is held.
        decay_locked(h, true);
        background::note_free(h.free_normal_pages);
    }
    LOCK.unlock();
}

/// Grows the large span `s` in place to `npages` when the pages after it
/// form a free span long enough (realloc's growth without a copy); the
/// rest of that free span stays free. False (nothing changed) otherwise.
/// Takes LOCK.
///
/// # Safety
/// `s` is a live LARGE span owned by the caller.
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe fn grow_in_place(s: *mut Span, npages: usize) -> bool {
    LOCK.lock();
    // SAFETY: LOCK is held; the caller owns `s`; neighbours found through
    // the map are live records.
    let grown = unsafe {
        let (start, old) = ((*s).start, (*s).npages);
        let next = pagemap::span(start + old);
        let extra = npages.saturating_sub(old);
        let fits = extra > 0
            && !next.is_null()
            && (*next).state == span::FREE
            && (*next).start == start + old
            && (*next).npages >= extra;
        if fits {
            remove_free(next);
            let taken = if (*next).npages > extra {
                let front = split_front(next, extra);
                insert_free(next);
                front
            } else {
                next
            };
            if (*taken).returned {
                counters::RELEASED_BYTES.sub(extra << PAGE_SHIFT);
            }
            // Only the first and last pages of a large span are mapped.
            pagemap::set_span((*taken).start, ptr::null_mut());
            if old > 1 {
                pagemap::set_span(start + old - 1, ptr::null_mut());
            }
            free_span_record(taken);
            (*s).returned = false;
            (*s).npages = npages;
            pagemap::set_span(start + npages - 1, s);
            counters::LARGE_BYTES.add(extra << PAGE_SHIFT);
        }
        fits
    };
    LOCK.unlock();
    grown
}

/// # Safety
/// LOCK must be held.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn allocate_locked(npages: usize, class: u8, align_pages: usize) -> *mut Span {
    // A program that only allocates still ages the free spans it left.
    // SAFETY: LOCK is held.
    unsafe { decay_locked(heap(), false) };
    let want = npages + align_pages.max(1) - 1;
    // SAFETY: LOCK is held.
    let mut s = unsafe { find_free(want) };
    if s.is_null() {
        // SAFETY: LOCK is held.
        if !unsafe { grow(want) } {
            return ptr::null_mut();
        }
        // SAFETY: LOCK is held.
        s = unsafe { find_free(want) };
        if s.is_null() {
            return ptr::null_mut();
        }
    }
    // SAFETY: s is a free span just taken off its list; its pieces are
    // registered below before the lock is dropped. Marking it in use
    // first keeps insert_free() from merging the pieces back into it.
    unsafe {
        remove_free(s);
        (*s).state = 0;
        // Cut an aligned run of `npages` out of s; head and tail go back.
        let align = align_pages.max(1);
        let aligned_start = ((*s).start + align - 1) & !(align - 1);
        if aligned_start > (*s).start {
            let head = split_front(s, aligned_start - (*s).start);
            (*head).state = span::FREE;
            insert_free(head);
        }
        if (*s).npages > npages {
            let front = split_front(s, npages);
            (*s).state = span::FREE;
            insert_free(s);
            s = front;
        }
        let n = (*s).npages;
        debug_assert_eq!(n, npages);
        // `returned` stays as it is: in use, it says whether the pages
        // read as zero (calloc need not clear them).
        if (*s).returned {
            counters::RELEASED_BYTES.sub(n << PAGE_SHIFT);
        }
        (*s).class = class;
        (*s).freelist = ptr::null_mut();
        (*s).allocated = 0;
        (*s).sampled = false;
        (*s).next = ptr::null_mut();
        (*s).prev = ptr::null_mut();
        if class != 0 {
            (*s).state = span::SMALL;
            for p in (*s).start..(*s).start + n {
                pagemap::set_span(p, s);
                pagemap::set_class(p, class);
            }
            counters::SMALL_SPAN_BYTES.add(n << PAGE_SHIFT);
        } else {
            (*s).state = span::LARGE;
            pagemap::set_span((*s).start, s);
            pagemap::set_span((*s).start + n - 1, s);
            counters::LARGE_BYTES.add(n << PAGE_SHIFT);
        }
    }
    s
}

/// Splits the first `n` pages off span `s` into a new span (state 0, in
/// transition) and returns it; `s` keeps the rest. Both are registered.
///
/// # Safety
/// LOCK held; `s` is off every list and longer than `n` pages.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn split_front(s: *mut Span, n: usize) -> *mut Span {
    // SAFETY: caller contract; new_span is called under LOCK.
    unsafe {
        let front = new_span();
        if front.is_null() {
            os::fatal("page heap", s as usize, "out of memory for span metadata");
        }
        *front = Span::zeroed();
        (*front).start = (*s).start;
        (*front).npages = n;
        (*front).returned = (*s).returned;
        (*front).free_epoch = (*s).free_epoch;
        (*s).start += n;
        (*s).npages -= n;
        pagemap::set_span((*front).start, front);
        pagemap::set_span((*front).start + n - 1, front);
        pagemap::set_span((*s).start, s);
        pagemap::set_span((*s).start + (*s).npages - 1, s);
        front
    }
}

/// Finds the best-fitting free span of at least `n` pages, preferring
/// resident spans at each length.
///
/// # Safety
/// LOCK must be held.
unsafe fn find_free(n: usize) -> *mut Span {
    const _: () = assert!(LISTS - 1 == u128::BITS as usize);
    // SAFETY: LOCK is held.
    let h = unsafe { heap() };
    debug_assert_eq!(
        h.exact_nonempty,
        (0..LISTS - 1)
            .filter(|&i| !h.normal[i].head.is_null() || !h.returned[i].head.is_null())
            .fold(0u128, |bits, i| bits | 1 << i),
        "the bitmap of exact lists is out of date"
    );
    if n < LISTS - 1 {
        let fitting = h.exact_nonempty & (u128::MAX << n);
        if fitting != 0 {
            let i = fitting.trailing_zeros() as usize;
            let s = if h.normal[i].head.is_null() {
                h.returned[i].head
            } else {
                h.normal[i].head
            };
            debug_assert!(!s.is_null(), "list {i} is marked but empty");
            return s;
        }
    }
    // Best fit among the long spans.
    let mut best: *mut Span = ptr::null_mut();
    for list in [&h.normal[LISTS - 1], &h.returned[LISTS - 1]] {
        let mut s = list.head;
        while !s.is_null() {
            // SAFETY: spans on heap lists are live.
            unsafe {
                if (*s).npages >= n && (best.is_null() || (*s).npages < (*best).npages) {
                    best = s;
                }
                s = (*s).next;
            }
        }
        if !best.is_null() {
            return best;
        }
    }
    best
}

/// Adds at least `n` pages of fresh address space to the free lists.
///
/// # Safety
/// LOCK must be held.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn grow(n: usize) -> bool {
    // SAFETY: LOCK is held.
    let h = unsafe { heap() };
    let want = n.max(MIN_GROW_PAGES);
    if h.reserve_end - h.reserve_next < want {
        // Whatever is left of the old reservation becomes a free span.
        if h.reserve_end > h.reserve_next {
            let left = h.reserve_end - h.reserve_next;
            // SAFETY: LOCK is held.
            unsafe { add_fresh(h.reserve_next, left) };
            h.reserve_next = h.reserve_end;
        }
        let bytes = ((want + 2) << PAGE_SHIFT).max(RESERVE_BYTES);
        let p = os::map_aligned(bytes, PAGE_SIZE);
        if p.is_null() {
            return false;
        }
        let first = p as usize >> PAGE_SHIFT;
        if !pagemap::ensure_range(first, bytes >> PAGE_SHIFT) {
            // SAFETY: the mapping was just created and is unused.
            unsafe { os::unmap(p, bytes) };
            return false;
        }
        // The first and last page of a reservation are never used: so the
        // neighbour lookups of coalescing never leave the reservation, and
        // never read the header of a huge object (which its owner may be
        // unmapping without a lock) that the kernel placed next to it.
        h.reserve_next = first + 1;
        h.reserve_end = first + (bytes >> PAGE_SHIFT) - 1;
    }
    let take = want.min(h.reserve_end - h.reserve_next);
    let start = h.reserve_next;
    h.reserve_next += take;
    // SAFETY: LOCK is held.
    unsafe { add_fresh(start, take) }
}

/// Registers never-touched pages as a free (returned: not resident) span.
///
/// # Safety
/// LOCK must be held; the pages are ours and unused.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn add_fresh(start: usize, n: usize) -> bool {
    // SAFETY: LOCK is held.
    let s = unsafe { new_span() };
    if s.is_null() {
        return false;
    }
    counters::MAPPED_BYTES.add(n << PAGE_SHIFT);
    counters::RELEASED_BYTES.add(n << PAGE_SHIFT);
    // SAFETY: s is a fresh record; LOCK is held.
    unsafe {
        *s = Span::zeroed();
        (*s).start = start;
        (*s).npages = n;
        (*s).state = span::FREE;
        (*s).returned = true;
        insert_free(s);
    }
    true
}

/// Puts free span `s` on its list after merging it with free neighbours in
/// the same state, keeping the page map invariants.
///
/// # Safety
/// LOCK held; `s` is a FREE span on no list.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn insert_free(s: *mut Span) {
    // SAFETY: LOCK is held; neighbours found through the map are live.
    unsafe {
        // A merged span is as old as its larger part: a small span freed
        // (or cut off) next to a long-idle one does not make it young.
        let prev = pagemap::span((*s).start.wrapping_sub(1));
        if !prev.is_null() && (*prev).state == span::FREE && (*prev).returned == (*s).returned {
            if (*prev).npages > (*s).npages {
                (*s).free_epoch = (*prev).free_epoch;
            }
            remove_free(prev);
            pagemap::set_span((*prev).start + (*prev).npages - 1, ptr::null_mut());
            pagemap::set_span((*s).start, ptr::null_mut());
            (*s).start = (*prev).start;
            (*s).npages += (*prev).npages;
            free_span_record(prev);
        }
        let next = pagemap::span((*s).start + (*s).npages);
        if !next.is_null() && (*next).state == span::FREE && (*next).returned == (*s).returned {
            if (*next).npages > (*s).npages {
                (*s).free_epoch = (*next).free_epoch;
            }
            remove_free(next);
            pagemap::set_span((*s).start + (*s).npages - 1, ptr::null_mut());
            pagemap::set_span((*next).start, ptr::null_mut());
            (*s).npages += (*next).npages;
            free_span_record(next);
        }
        pagemap::set_span((*s).start, s);
        pagemap::set_span((*s).start + (*s).npages - 1, s);
        let h = heap();
        let i = (*s).npages.min(LISTS - 1);
        if (*s).returned {
            h.returned[i].push(s);
            h.free_returned_pages += (*s).npages;
        } else {
            h.normal[i].push(s);
            h.free_normal_pages += (*s).npages;
        }
        if i < LISTS - 1 {
            h.exact_nonempty |= 1 << i;
        }
        counters::HEAP_FREE_BYTES.store((h.free_normal_pages) << PAGE_SHIFT);
    }
}

/// # Safety
/// LOCK held; `s` is a FREE span on its list.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn remove_free(s: *mut Span) {
    // SAFETY: LOCK is held; s is on the list its state and length name.
    unsafe {
        let h = heap();
        let i = (*s).npages.min(LISTS - 1);
        if (*s).returned {
            h.returned[i].remove(s);
            h.free_returned_pages -= (*s).npages;
        } else {
            h.normal[i].remove(s);
            h.free_normal_pages -= (*s).npages;
        }
        if i < LISTS - 1 && h.normal[i].head.is_null() && h.returned[i].head.is_null() {
            h.exact_nonempty &= !(1 << i);
        }
        counters::HEAP_FREE_BYTES.store((h.free_normal_pages) << PAGE_SHIFT);
    }
}

/// A span record from the metadata arena, or null.
///
/// # Safety
/// LOCK must be held.
unsafe fn new_span() -> *mut Span {
    // SAFETY: LOCK is held.
    let h = unsafe { heap() };
    if !h.spare_spans.is_null() {
        let s = h.spare_spans;
        // SAFETY: spare records are linked through `next`.
        h.spare_spans = unsafe { (*s).next };
        return s;
    }
    let size = core::mem::size_of::<Span>();
    if h.meta_end - h.meta_next < size {
        let p = os::map(META_CHUNK);
        if p.is_null() {
            return ptr::null_mut();
        }
        counters::METADATA.add(META_CHUNK);
        h.meta_next = p as usize;
        h.meta_end = p as usize + META_CHUNK;
    }
    let s = h.meta_next as *mut Span;
    h.meta_next += size;
    s
}

/// # Safety
/// LOCK held; nothing refers to `s` any more.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn free_span_record(s: *mut Span) {
    // SAFETY: LOCK is held; s is unused.
    unsafe {
        let h = heap();
        (*s).state = 0;
        (*s).next = h.spare_spans;
        h.spare_spans = s;
    }
}

/// Pages in free spans: (resident, returned). Takes LOCK.
pub fn free_pages() -> (usize, usize) {
    LOCK.lock();
    // SAFETY: LOCK is held.
    let h = unsafe { heap() };
    let r = (h.free_normal_pages, h.free_returned_pages);
    LOCK.unlock();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_reused_coalesced_and_aligned() {
        let a = allocate(3, 0, 1);
        let b = allocate(5, 0, 1);
        assert!(!a.is_null() && !b.is_null());
        // SAFETY: spans just allocated, used only here.
        unsafe {
            assert_eq!((*a).npages, 3);
            assert_eq!((*b).npages, 5);
            assert_eq!(pagemap::span((*a).start), a);
            assert_eq!(pagemap::span((*b).start + 4), b);
            let c = allocate(4, 0, 8);
            assert_eq!((*c).start % 8, 0);
            let pa = (*a).start_addr() as *mut u8;
            pa.write_bytes(1, 3 * PAGE_SIZE);
            deallocate(c);
            deallocate(a);
            deallocate(b);
            let small = allocate(2, 5, 1);
            assert_eq!(pagemap::class_of_addr((*small).start_addr() + PAGE_SIZE), 5);
            deallocate(small);
            assert_eq!(pagemap::class_of_addr((*small).start_addr()), 0);
        }
        assert!(release_all().is_multiple_of(PAGE_SIZE));
    }

    #[test]
    fn a_large_span_grows_into_the_free_pages_after_it() {
        // A long span cut in two: the first 8 pages in use, the rest free;
        // the piece grows into the rest (best fit keeps other tests' spans
        // off a free span this long).
        let big = allocate(3000, 0, 1);
        assert!(!big.is_null());
        // SAFETY: spans allocated here, used only here; LOCK held to cut.
        unsafe {
            let start = (*big).start;
            LOCK.lock();
            let a = split_front(big, 8);
            (*a).state = span::LARGE;
            (*big).state = span::FREE;
            insert_free(big);
            LOCK.unlock();
            counters::LARGE_BYTES.sub(2992 << PAGE_SHIFT);
            assert!(!grow_in_place(a, 8), "no growth asked");
            assert!(grow_in_place(a, 20));
            assert_eq!((*a).npages, 20);
            assert_eq!(pagemap::span(start), a);
            assert_eq!(pagemap::span(start + 19), a);
            assert!(pagemap::span(start + 7).is_null(), "the old last page");
            let rest = pagemap::span(start + 20);
            assert_eq!((*rest).state, span::FREE);
            assert!((*rest).npages >= 2980, "{}", (*rest).npages);
            ((*a).start_addr() as *mut u8).write_bytes(1, 20 * PAGE_SIZE);
            deallocate(a);
        }
    }
}
