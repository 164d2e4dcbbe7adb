//! The rest of the malloc family on top of the fast and slow paths:
//! memalign (and through it aligned_alloc, posix_memalign, valloc),
//! calloc, realloc, malloc_usable_size and malloc_trim; and the lookup of
//! an address's block for the heap checker.
use core::{
    ptr,
    sync::atomic::{Ordering, compiler_fence},
};

use super::{
    HUGE_THRESHOLD, checked_span,
    fast_path::{alloc_class, free, malloc},
    slow_path::alloc_slow,
};
use crate::{
    central, huge, os, page_heap, pagemap, sampler,
    size_class::{self, MAX_SMALL, MIN_ALIGN, NUM_CLASSES, PAGE_SHIFT, PAGE_SIZE},
    span,
    thread_cache::{self, ACTIVE, tls},
};

/// Allocates `size` bytes aligned to `align` (a power of two).
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn memalign(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN {
        return malloc(size);
    }
    if size <= MAX_SMALL && align <= PAGE_SIZE {
        // A class whose size is a multiple of `align` has aligned objects
        // (spans start on page boundaries).
        let mut c = size_class::class_of(size.max(align));
        while c < NUM_CLASSES && !size_class::size_of_class(c).is_multiple_of(align) {
            c += 1;
        }
        if c < NUM_CLASSES {
            return alloc_class(c, size);
        }
    }
    // SAFETY: the slow path accepts any request.
    unsafe { alloc_slow(size, 0, align, false) }
}

/// calloc: overflow-checked, zeroed.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        os::set_enomem();
        return ptr::null_mut();
    };
    let p = malloc(total);
    // Huge objects come straight from mmap, already zero; so do large ones
    // on pages that were not resident (fresh, or given back to the OS):
    // clearing them would make every page resident, where a program that
    // uses part of a large zeroed table (a hash table) touches only that.
    if !p.is_null() && total <= HUGE_THRESHOLD && !(total > MAX_SMALL && reads_as_zero(p)) {
        // SAFETY: p holds at least `total` bytes.
        unsafe { p.write_bytes(0, total) };
    }
    p
}

/// Whether large object `p`, just allocated, lies on pages that were not
/// resident when its span was handed out (see `Span::returned`).
#[unsafe(link_section = ".text.hot.profalloc")]
fn reads_as_zero(p: *mut u8) -> bool {
    let s = pagemap::span(p as usize >> PAGE_SHIFT);
    // SAFETY: p is a live large object: its first page maps to its span,
    // which this thread owns.
    !s.is_null() && unsafe { (*s).state == span::LARGE && (*s).returned }
}

/// Usable bytes of `p` (0 for null). Aborts on a foreign pointer.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe fn usable_size(p: *mut u8) -> usize {
    if p.is_null() {
        return 0;
    }
    let c = pagemap::class_of_addr(p as usize);
    if c != 0 {
        return size_class::size_of_class(c);
    }
    let s = checked_span("malloc_usable_size", p);
    // SAFETY: checked_span returns a live large or huge span holding p.
    unsafe {
        if (*s).state == span::HUGE {
            huge::usable(s)
        } else {
            (*s).npages << PAGE_SHIFT
        }
    }
}

/// A large object that realloc grows past this (and cannot grow in place)
/// moves into a mapping of its own, as glibc's mmapped chunks: a buffer
/// grown by appends is then remapped, not copied, and leaves no freed
/// blocks behind in the page heap.
pub(super) const MOVE_TO_HUGE: usize = 256 << 10;

/// realloc with glibc's semantics: null `p` allocates; size 0 frees and
/// returns null; on failure `p` is unchanged and null is returned.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe fn realloc(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: caller contract.
        unsafe { free(p) };
        return ptr::null_mut();
    }
    let c = pagemap::class_of_addr(p as usize);
    let old = if c != 0 {
        size_class::size_of_class(c)
    } else {
        let s = checked_span("realloc", p);
        // SAFETY: a live large or huge span holding p.
        unsafe {
            if (*s).state == span::HUGE {
                let usable = huge::usable(s);
                if size <= usable && size >= usable / 2 {
                    // Fits its mapping: no call to the OS.
                    return p;
                }
                if size > HUGE_THRESHOLD || size > usable {
                    // Growing: 25% more, as below (only address space:
                    // the pages past `size` stay untouched until used).
                    let amortized = if size > usable {
                        size.max(usable + usable / 4)
                    } else {
                        size
                    };
                    if (*s).sampled {
                        // The object may move: its sample ends here.
                        sampler::on_free(p, false);
                        (*s).sampled = false;
                    }
                    let mut q = huge::resize(s, amortized);
                    if q.is_null() && amortized != size {
                        q = huge::resize(s, size);
                    }
                    if q.is_null() {
                        os::set_enomem();
                    }
                    return q;
                }
                usable
            } else {
                let old = (*s).npages << PAGE_SHIFT;
                if size > old && size <= HUGE_THRESHOLD && !(*s).sampled {
                    // Into the free pages after it, if there are enough:
                    // the amortized size (as below), or at least `size`.
                    let amortized = size.max(old + old / 4).min(HUGE_THRESHOLD);
                    if page_heap::grow_in_place(s, amortized.div_ceil(PAGE_SIZE))
                        || page_heap::grow_in_place(s, size.div_ceil(PAGE_SIZE))
                    {
                        return p;
                    }
                }
                if size > old && size >= MOVE_TO_HUGE && !sampler::record_all() {
                    // Growing where it cannot grow in place: into a mapping
                    // of its own, which later grows with mremap (no copy,
                    // and no freed block left behind at each step).
                    let q = huge::alloc(size.max(old + old / 4), MIN_ALIGN, false);
                    if !q.is_null() {
                        ptr::copy_nonoverlapping(p, q, old);
                        free(p);
                        return q;
                    }
                }
                old
            }
        }
    };
    // Keep the object when the new size fits and wastes at most half.
    if size <= old && size >= old / 2 {
        return p;
    }
    // Growing: take at least 25% more, so that a buffer grown by small
    // appends is copied O(log n) times, not once per size class or page.
    let q = if size > old {
        let amortized = size.max(old + old / 4);
        let q = malloc(amortized);
        if q.is_null() { malloc(size) } else { q }
    } else {
        malloc(size)
    };
    if q.is_null() {
        return q;
    }
    // SAFETY: both hold at least min(old, size) bytes and do not overlap.
    unsafe {
        ptr::copy_nonoverlapping(p, q, old.min(size));
        free(p);
    }
    q
}

/// malloc_trim: flushes this thread's cache and the transfer caches, and
/// gives every free page back to the OS. Returns the bytes released.
pub fn trim() -> usize {
    let tc = tls();
    // SAFETY: tc is this thread's cache; busy guards the flush.
    unsafe {
        if (*tc).busy == 0 && (*tc).state == ACTIVE {
            (*tc).busy = 1;
            compiler_fence(Ordering::SeqCst);
            thread_cache::flush(tc);
            compiler_fence(Ordering::SeqCst);
            (*tc).busy = 0;
        }
    }
    central::drain_transfer_caches();
    page_heap::release_all()
}

/// The block of ours that holds `addr`, as (start, usable bytes), for the
/// heap checker's scan: the slot of a small object (in use or not), or a
/// large or huge object that was recorded (its span is marked sampled).
/// Only the pages the page map names are found: every page of a small
/// span, the first and last page of a large object, the first page of a
/// huge one. Reads the page map and span records without a lock: the
/// caller keeps them from changing (the other threads are stopped).
pub(crate) fn recorded_block_at(addr: usize) -> Option<(usize, usize)> {
    let s = pagemap::span(addr >> PAGE_SHIFT);
    if s.is_null() {
        return None;
    }
    // SAFETY: the page map only holds live span records (caller contract:
    // nothing frees them meanwhile).
    unsafe {
        match (*s).state {
            span::SMALL => {
                let size = size_class::size_of_class((*s).class as usize);
                let base = (*s).start_addr();
                Some((base + (addr - base) / size * size, size))
            }
            span::LARGE if (*s).sampled => Some(((*s).start_addr(), (*s).npages << PAGE_SHIFT)),
            span::HUGE if (*s).sampled => Some((huge::user(s), huge::usable(s))),
            _ => None,
        }
    }
}
