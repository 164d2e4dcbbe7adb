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
//! - both: the thread is already inside the allocator (`busy`): a signal
//!   handler that interrupted a list operation or a slow path, or a library
//!   a slow path calls. The slow path sends such calls to the re-entrant
//!   path, which never touches the thread's lists.
//!
//! Async-signal safety: a list operation reads the head, then the head's
//! link, then writes both back; a handler that ran in between and popped
//! or pushed on the same list (or gave a batch back to the central tier)
//! would leave the interrupted operation writing a stale head: an object
//! handed out twice, or a list through user data. So each operation runs
//! with `busy` set: a compare tests it and a store sets it, a store clears
//! it. A handler that runs between the test and the set sees the flag
//! clear and the lists untouched, and leaves both so before the
//! interrupted operation goes on; any later handler sees the flag set.
//! Not one `bts`: with a memory operand it is a slow, multi-micro-op
//! instruction on AMD's cores (replacing it made the small-churn benchmark
//! 10% faster on an EPYC). All three are compiler barriers (a handler
//! runs on this thread, which sees its own stores in program order).
//!
//! Indexing: the size-class table and the page map give the class's slot
//! (`class << SLOT_SHIFT`), the byte offset of its list, so neither path
//! shifts or widens the class it loaded.
use core::sync::atomic::{Ordering, compiler_fence};

use super::slow_path::{alloc_slow, free_slow};
use crate::{
    pagemap,
    size_class::{self, MAX_SMALL, MIN_ALIGN, SLOT_SHIFT},
    thread_cache::{FreeList, LISTS, ThreadCache, tls},
};

/// Sets this thread's `busy` flag (`$tc` is its cache); when it was set
/// already, runs `$nested`, which must return.
macro_rules! enter_or {
    ($tc:expr, $nested:expr) => {
        #[cfg(target_arch = "x86_64")]
        core::arch::asm!(
            "cmp dword ptr [{tc} + {busy}], 0",
            "jne {nested}",
            "mov dword ptr [{tc} + {busy}], 1",
            tc = in(reg) $tc,
            busy = const crate::thread_cache::BUSY,
            // SAFETY: `$nested` is the caller's slow-path call, made under
            // the caller's contract.
            nested = label { unsafe { $nested } },
            options(nostack),
        );
        #[cfg(not(target_arch = "x86_64"))]
        {
            if (*$tc).busy != 0 {
                $nested
            }
            (*$tc).busy = 1;
            compiler_fence(Ordering::SeqCst);
        }
    };
}

/// Clears this thread's `busy` flag after the list operation's stores.
///
/// # Safety
/// `tc` is this thread's cache.
#[inline(always)]
unsafe fn leave(tc: *mut ThreadCache) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller's contract.
    unsafe { (*tc).busy = 0 };
}

/// The list at byte offset `slot` of the list array.
///
/// # Safety
/// `tc` is a cache; `slot` is a class's slot.
#[inline(always)]
unsafe fn list_at(tc: *mut ThreadCache, slot: usize) -> *mut FreeList {
    // SAFETY: the caller's contract: inside the cache's list array.
    unsafe { tc.cast::<u8>().add(LISTS + slot).cast() }
}

/// Allocates `size` bytes aligned to 16; null (errno ENOMEM) on failure.
#[inline(always)]
pub fn malloc(size: usize) -> *mut u8 {
    if size <= MAX_SMALL {
        alloc_slot(size_class::slot_of(size), size)
    } else {
        // SAFETY: the slow path accepts any request.
        unsafe { alloc_slow(size, 0, MIN_ALIGN, false) }
    }
}

/// Allocates `size` bytes from class `c`.
#[inline(always)]
pub(super) fn alloc_class(c: usize, size: usize) -> *mut u8 {
    alloc_slot(c << SLOT_SHIFT, size)
}

#[inline(always)]
fn alloc_slot(slot: usize, size: usize) -> *mut u8 {
    let tc = tls();
    // SAFETY: tc is this thread's cache; slot is a class's slot; a non-null
    // head is a free object whose first word links to the next one.
    unsafe {
        enter_or!(
            tc,
            return alloc_slow(size, slot >> SLOT_SHIFT, MIN_ALIGN, false)
        );
        let countdown = (*tc).countdown - size as isize;
        (*tc).countdown = countdown;
        let list = list_at(tc, slot);
        let head = (*list).head;
        if countdown < 0 || head.is_null() {
            leave(tc);
            return alloc_slow(size, slot >> SLOT_SHIFT, MIN_ALIGN, true);
        }
        let next = *head.cast::<*mut u8>();
        (*list).head = next;
        let len = (*list).len.load(Ordering::Relaxed);
        (*list).len.store(len - 1, Ordering::Relaxed);
        leave(tc);
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
    let slot = pagemap::slot_of_addr(p as usize);
    if slot == 0 {
        // SAFETY: caller contract.
        return unsafe { free_slow(p) };
    }
    let tc = tls();
    // SAFETY: tc is this thread's cache; slot is p's class's slot from the
    // page map.
    unsafe {
        enter_or!(tc, return free_slow(p));
        let list = list_at(tc, slot);
        let len = (*list).len.load(Ordering::Relaxed);
        let head = (*list).head;
        if len >= (*list).max_len || head == p {
            leave(tc);
            return free_slow(p);
        }
        *p.cast::<*mut u8>() = head;
        (*list).head = p;
        (*list).len.store(len + 1, Ordering::Relaxed);
        leave(tc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that finds `busy` set (as a signal handler interrupting a
    /// list operation does) leaves the thread's list alone: its allocation
    /// is a huge mapping, its free of a small object is deferred.
    #[test]
    fn a_nested_call_does_not_touch_the_interrupted_list() {
        let c = size_class::class_of(24);
        let warm: Vec<*mut u8> = (0..8).map(|_| malloc(24)).collect();
        let small = malloc(24);
        for &p in &warm {
            // SAFETY: live allocations.
            unsafe { free(p) };
        }
        let tc = tls();
        // SAFETY: this thread's cache; only this thread touches it.
        unsafe {
            let list = &(*tc).lists[c];
            let (head, len) = (list.head, list.len.load(Ordering::Relaxed));
            assert!(!head.is_null(), "the frees filled the list");
            (*tc).busy = 1;
            compiler_fence(Ordering::SeqCst);
            let nested = malloc(24);
            free(small);
            compiler_fence(Ordering::SeqCst);
            (*tc).busy = 0;
            let list = &(*tc).lists[c];
            assert_eq!(list.head, head);
            assert_eq!(list.len.load(Ordering::Relaxed), len);
            assert!(!nested.is_null());
            assert_ne!(nested, head);
            assert_eq!(
                pagemap::class_of_addr(nested as usize),
                0,
                "not a small object"
            );
            free(nested);
        }
    }
}
