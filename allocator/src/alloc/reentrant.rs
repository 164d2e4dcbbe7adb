//! Calls on a thread that is already inside a slow path (`busy` set): a
//! signal handler, or a library the slow path calls (glibc's
//! pthread_setspecific or pthread_atfork calling calloc during
//! initialisation, glibc's own fork code between the fork handlers). They
//! take no lock: allocations get a huge mapping, frees of huge objects
//! unmap at once, and other frees wait on a lock-free list that the next
//! slow path of any thread drains.
use core::{
    ptr,
    sync::atomic::{AtomicPtr, Ordering},
};

use super::{checked_span, slow_path::free_large};
use crate::{central, huge, os, pagemap, sampler, span};

/// Frees deferred by re-entrant calls, linked through their first word.
static DEFERRED: AtomicPtr<u8> = AtomicPtr::new(ptr::null_mut());

/// An allocation on a thread already inside a slow path: a huge mapping
/// (no lock).
pub(super) fn reentrant_alloc(size: usize, align: usize) -> *mut u8 {
    let p = huge::alloc(size, align, false);
    if p.is_null() {
        os::set_enomem();
    }
    p
}

/// A free on a thread already inside a slow path: huge objects are
/// unmapped right away (no lock); others wait on a lock-free list.
///
/// # Safety
/// `p` is a live allocation of ours.
pub(super) unsafe fn reentrant_free(p: *mut u8) {
    if pagemap::class_of_addr(p as usize) == 0 {
        let s = checked_span("free", p);
        // SAFETY: a live span; huge objects need no lock.
        unsafe {
            if (*s).state == span::HUGE {
                if (*s).sampled {
                    sampler::on_free(p, true);
                }
                return huge::free(s);
            }
        }
    }
    let mut head = DEFERRED.load(Ordering::Relaxed);
    loop {
        // SAFETY: p is free memory of at least 16 bytes.
        unsafe { *p.cast::<*mut u8>() = head };
        match DEFERRED.compare_exchange_weak(head, p, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// Frees what re-entrant calls deferred (straight to the middle tier).
///
/// # Safety
/// busy is set.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn drain_deferred() {
    if DEFERRED.load(Ordering::Relaxed).is_null() {
        return;
    }
    let mut p = DEFERRED.swap(ptr::null_mut(), Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: deferred objects are ours, linked through their first word.
        unsafe {
            let next = *p.cast::<*mut u8>();
            let c = pagemap::class_of_addr(p as usize);
            if c == 0 {
                free_large(p);
            } else {
                if sampler::record_all() {
                    sampler::on_free(p, false);
                }
                *p.cast::<*mut u8>() = ptr::null_mut();
                central::insert_range(c, p, 1);
            }
            p = next;
        }
    }
}
