//! The slow paths behind malloc and free: thread set-up on first use,
//! sampling (and record-all mode), refilling and draining the thread
//! cache, large objects from the page heap, huge objects, double-free and
//! foreign-pointer checks. The only way toward the profilers is the
//! sampler ([`sampler::on_alloc`], [`sampler::on_free`]).
//!
//! Both are `extern "C"` so that they cannot unwind: the fast paths can
//! then tail-call them (no frame, no landing pad). Each brackets its work
//! with the thread's `busy` flag (see [`super::reentrant`]).
use core::{
    ptr,
    sync::atomic::{Ordering, compiler_fence},
};

use super::{
    HUGE_THRESHOLD, checked_span,
    lifecycle::{init_thread, init_thread_on_free, on_first_allocation},
    reentrant::{drain_deferred, reentrant_alloc, reentrant_free},
};
use crate::{
    cache_budget::{self, Growth},
    central, huge, os, page_heap, pagemap, sampler,
    size_class::{PAGE_SHIFT, PAGE_SIZE},
    span,
    thread_cache::{ACTIVE, Central, DEAD, ThreadCache, UNINIT, tls},
};
#[cold]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe extern "C" fn alloc_slow(
    size: usize,
    c: usize,
    align: usize,
    counted: bool,
) -> *mut u8 {
    let tc = tls();
    // SAFETY: tc is this thread's cache; busy brackets everything below.
    unsafe {
        if (*tc).busy != 0 {
            return reentrant_alloc(size, align);
        }
        (*tc).busy = 1;
        compiler_fence(Ordering::SeqCst);
        if (*tc).state == UNINIT {
            init_thread(tc);
        } else if (*tc).frees_only {
            on_first_allocation(tc);
        } else if !counted {
            (*tc).countdown -= size.min(isize::MAX as usize) as isize;
        }
        if (*tc).state == ACTIVE {
            cache_budget::on_slow_path(tc);
        }
        let p = if sampler::record_all() && (*tc).state == ACTIVE {
            alloc_recorded(size, c, align)
        } else if (*tc).countdown < 0 {
            let rate = sampler::rate();
            (*tc).countdown = sampler::next_distance(&mut (*tc).rng, rate);
            if rate != 0 && (*tc).state == ACTIVE {
                alloc_sampled(size, align, rate)
            } else {
                alloc_unsampled(tc, size, c, align)
            }
        } else {
            alloc_unsampled(tc, size, c, align)
        };
        drain_deferred();
        compiler_fence(Ordering::SeqCst);
        (*tc).busy = 0;
        if p.is_null() {
            os::set_enomem();
        }
        p
    }
}

/// An allocation that is not sampled: a small object from the thread's
/// cache (refilled from the middle tier), or a large or huge object.
///
/// # Safety
/// `tc` is this thread's cache, busy set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn alloc_unsampled(tc: *mut ThreadCache, size: usize, c: usize, align: usize) -> *mut u8 {
    if c == 0 {
        return alloc_large(size, align, false);
    }
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        if (*tc).state == DEAD {
            // The thread is exiting: its cache no longer holds objects.
            let (head, n) = central::remove_range(c, 1);
            return if n == 0 { ptr::null_mut() } else { head };
        }
        (*tc).lists[c].pop_or_refill(&Central, c, &mut |old, wanted| {
            cache_budget::grant(tc, c, old, wanted, Growth::Refill)
        })
    }
}

/// A large object from the page heap, or a huge mapping.
#[unsafe(link_section = ".text.hot.profalloc")]
fn alloc_large(size: usize, align: usize, sampled: bool) -> *mut u8 {
    if size > isize::MAX as usize / 2 {
        return ptr::null_mut();
    }
    if size > HUGE_THRESHOLD {
        return huge::alloc(size, align, sampled);
    }
    let npages = size.max(1).div_ceil(PAGE_SIZE);
    let s = page_heap::allocate(npages, 0, (align >> PAGE_SHIFT).max(1));
    if s.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: a fresh large span, ours until freed.
    unsafe {
        (*s).requested = size;
        (*s).sampled = sampled;
        (*s).start_addr() as *mut u8
    }
}

/// An allocation in record-all mode: where it would go anyway (a small
/// object straight from the class's central list, so that the thread's
/// list never fills and every free of the class takes the slow path),
/// recorded with weight = size.
#[unsafe(link_section = ".text.hot.profalloc")]
fn alloc_recorded(size: usize, c: usize, align: usize) -> *mut u8 {
    let p = if c != 0 {
        let (head, n) = central::remove_range(c, 1);
        if n == 0 { ptr::null_mut() } else { head }
    } else {
        alloc_large(size, align, true)
    };
    if !p.is_null() {
        sampler::on_alloc(p, size, size as u64);
    }
    p
}

/// A sampled allocation: on its own span (its free then takes the slow
/// path), with its unbiased weight.
#[unsafe(link_section = ".text.hot.profalloc")]
fn alloc_sampled(size: usize, align: usize, rate: u64) -> *mut u8 {
    let p = alloc_large(size, align, true);
    if !p.is_null() {
        sampler::on_alloc(p, size, sampler::weight(size, rate));
    }
    p
}

#[cold]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe extern "C" fn free_slow(p: *mut u8) {
    if p.is_null() {
        return;
    }
    let tc = tls();
    // SAFETY: tc is this thread's cache; p is ours (checked below).
    unsafe {
        if (*tc).busy != 0 {
            return reentrant_free(p);
        }
        (*tc).busy = 1;
        compiler_fence(Ordering::SeqCst);
        let c = pagemap::class_of_addr(p as usize);
        if c == 0 {
            free_large(p);
        } else {
            if (*tc).state == UNINIT {
                init_thread_on_free(tc);
            }
            if (*tc).state == ACTIVE {
                cache_budget::on_slow_path(tc);
            }
            free_small(tc, c, p);
        }
        drain_deferred();
        compiler_fence(Ordering::SeqCst);
        (*tc).busy = 0;
    }
    page_heap::background::start_if_wanted();
}

/// Frees a small object: into the thread's cache (which gives a batch
/// back when over its limit), or straight to the central list when the
/// thread is exiting or every object is recorded.
///
/// # Safety
/// `tc` is this thread's cache, busy set; `p` is an object of class `c`.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn free_small(tc: *mut ThreadCache, c: usize, p: *mut u8) {
    // SAFETY: the owner thread works on its own cache; p is ours.
    unsafe {
        let list = &mut (*tc).lists[c];
        if list.head == p {
            os::fatal(
                "free",
                p as usize,
                "double free (the object is already free)",
            );
        }
        if sampler::record_all() {
            // Every object was recorded (see `alloc_recorded`).
            sampler::on_free(p, false);
            *p.cast::<*mut u8>() = ptr::null_mut();
            central::insert_range(c, p, 1);
        } else if (*tc).state == DEAD {
            *p.cast::<*mut u8>() = ptr::null_mut();
            central::insert_range(c, p, 1);
        } else {
            list.push_or_release(&Central, c, p, &mut |old, wanted| {
                cache_budget::grant(tc, c, old, wanted, Growth::Free)
            });
        }
    }
}

/// Frees a large, huge or sampled object.
///
/// # Safety
/// busy is set; `p` is not a small object.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn free_large(p: *mut u8) {
    let s = checked_span("free", p);
    // SAFETY: a live large or huge span whose object is p.
    unsafe {
        if (*s).sampled {
            sampler::on_free(p, false);
        }
        if (*s).state == span::HUGE {
            huge::free(s);
        } else {
            page_heap::deallocate(s);
        }
    }
}
