//! The fast paths of malloc and free: one thread-cache list operation, no
//! lock, no call; everything else tail-calls the slow paths. `cargo xtask
//! check-fast-path` pins their instruction counts (`fast_path.golden`).
//!
//! Every reason they fall through to the slow path:
//! - malloc: size above MAX_SMALL; the sampling countdown went negative
//!   (also the case in a thread that has not initialised its cache); the
//!   class's list is empty (always the case in record-all mode).
//! - free: the page is not a small-object page (null, large, huge, sampled,
//!   foreign pointers); the list is at its length limit (always the case
//!   for uninitialised and exiting threads, and in record-all mode); the
//!   object is the list's head (a double free).
use core::sync::atomic::Ordering;

use super::slow_path::{alloc_slow, free_slow};
use crate::{
    pagemap,
    size_class::{self, MAX_SMALL, MIN_ALIGN},
    thread_cache::tls,
};

/// Allocates `size` bytes aligned to 16; null (errno ENOMEM) on failure.
#[inline(always)]
pub fn malloc(size: usize) -> *mut u8 {
    if size <= MAX_SMALL {
        alloc_class(size_class::class_of(size), size)
    } else {
        // SAFETY: the slow path accepts any request.
        unsafe { alloc_slow(size, 0, MIN_ALIGN, false) }
    }
}

#[inline(always)]
pub(super) fn alloc_class(c: usize, size: usize) -> *mut u8 {
    let tc = tls();
    // SAFETY: tc is this thread's cache; c < NUM_CLASSES; a non-null head
    // is a free object whose first word links to the next one.
    unsafe {
        let countdown = (*tc).countdown - size as isize;
        (*tc).countdown = countdown;
        let list = (*tc).lists.as_mut_ptr().add(c);
        let head = (*list).head;
        if countdown < 0 || head.is_null() {
            return alloc_slow(size, c, MIN_ALIGN, true);
        }
        let next = *head.cast::<*mut u8>();
        (*list).head = next;
        let len = (*list).len.load(Ordering::Relaxed);
        (*list).len.store(len - 1, Ordering::Relaxed);
        // The next malloc of this class reads `next`'s first word: start
        // fetching it now (a free list's objects are often cold).
        prefetch(next);
        head
    }
}

#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Frees `p` (null is ignored). Aborts with a message on a pointer that is
/// not ours or on a detected double free.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
#[inline(always)]
pub unsafe fn free(p: *mut u8) {
    let c = pagemap::class_of_addr(p as usize);
    if c == 0 {
        // SAFETY: caller contract.
        return unsafe { free_slow(p) };
    }
    let tc = tls();
    // SAFETY: tc is this thread's cache; c is p's class from the page map.
    unsafe {
        let list = (*tc).lists.as_mut_ptr().add(c);
        let len = (*list).len.load(Ordering::Relaxed);
        let head = (*list).head;
        if len >= (*list).max_len || head == p {
            return free_slow(p);
        }
        *p.cast::<*mut u8>() = head;
        (*list).head = p;
        (*list).len.store(len + 1, Ordering::Relaxed);
    }
}
