//! Giving free pages back to the OS: by age and size (the rules of
//! `decay`) and all at once (`malloc_trim`). Under the page heap's LOCK.
use super::{Heap, LISTS, LOCK, RELEASE_BYTES, heap, insert_free, remove_free};
use crate::{counters, decay, os, size_class::PAGE_SHIFT};

/// Applies `decay`'s rules: ends the epoch when its time or its release
/// credit (`decay::epoch_credit`) is over (spans free for two whole epochs go back); after a free,
/// releases what passes the bound on resident free pages.
///
/// # Safety
/// LOCK must be held; `h` is the heap.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn decay_locked(h: &mut Heap, after_free: bool) {
    let rate = RELEASE_BYTES.load(core::sync::atomic::Ordering::Relaxed) >> PAGE_SHIFT;
    if rate == 0 {
        return;
    }
    let now = decay::now_ns();
    let in_use = (counters::SMALL_SPAN_BYTES.load() + counters::LARGE_BYTES.load()) >> PAGE_SHIFT;
    if h.release_credit >= decay::epoch_credit(rate, in_use)
        || decay::epoch_over(h.epoch_start_ns, now)
    {
        h.release_credit = 0;
        h.epoch += 1;
        h.epoch_start_ns = now;
        // SAFETY: LOCK is held.
        unsafe { release_idle_locked(h.epoch - 2) };
    }
    if after_free {
        let excess = decay::excess_pages(h.free_normal_pages, in_use);
        if excess > 0 {
            // SAFETY: LOCK is held.
            unsafe { release_locked(excess) };
        }
    }
}

/// Gives every resident free page back to the OS; returns the bytes
/// released. Takes LOCK.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn release_all() -> usize {
    LOCK.lock();
    // SAFETY: LOCK is held.
    let n = unsafe { release_locked(usize::MAX) };
    LOCK.unlock();
    n << PAGE_SHIFT
}

/// Releases resident free spans, largest first, until at least `want`
/// pages were released. Returns the pages released.
///
/// # Safety
/// LOCK must be held.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn release_locked(want: usize) -> usize {
    // SAFETY: LOCK is held (caller contract).
    let h = unsafe { heap() };
    let mut done = 0;
    let mut i = LISTS;
    while i > 0 && done < want {
        i -= 1;
        while done < want {
            let s = h.normal[i].head;
            if s.is_null() {
                break;
            }
            // SAFETY: s is a free span on this list, owned by the heap.
            unsafe {
                remove_free(s);
                os::release((*s).start_addr() as *mut u8, (*s).npages << PAGE_SHIFT);
                done += (*s).npages;
                (*s).returned = true;
                insert_free(s);
            }
        }
    }
    counters::RELEASED_BYTES.add(done << PAGE_SHIFT);
    done
}

/// Releases resident free spans last freed in epoch `before` or earlier.
///
/// # Safety
/// LOCK must be held.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn release_idle_locked(before: u64) {
    // SAFETY: LOCK is held (caller contract).
    let h = unsafe { heap() };
    let mut released = 0;
    for i in 0..LISTS {
        let mut s = h.normal[i].head;
        while !s.is_null() {
            // SAFETY: spans on heap lists are live; `next` is read before
            // the span moves to another list.
            unsafe {
                let next = (*s).next;
                if (*s).free_epoch <= before {
                    remove_free(s);
                    os::release((*s).start_addr() as *mut u8, (*s).npages << PAGE_SHIFT);
                    released += (*s).npages;
                    (*s).returned = true;
                    insert_free(s);
                }
                s = next;
            }
        }
    }
    counters::RELEASED_BYTES.add(released << PAGE_SHIFT);
}
