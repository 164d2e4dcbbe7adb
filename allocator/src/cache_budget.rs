//! The budget of the thread caches: every thread's capacity (the bytes its
//! list limits allow, `Σ max_len × class size`) is reserved from one total
//! (`PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`, default 32 MiB), and no
//! thread reserves more than [`PER_THREAD_MAX`]. Since a list never holds
//! more objects than its limit, the bytes cached in all threads stay within
//! the total. Limits grow only in slow paths, so the fast paths pay nothing.
//!
//! A thread that finds the budget spent takes capacity back from its own
//! largest other list (its limit halves and its excess goes to the central
//! tier) before it gives up growing; a thread that exits gives its
//! capacity back; an idle thread keeps what it holds.
//!
//! Lock: none; the total reserved is one atomic counter.
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{
    size_class::{self, NUM_CLASSES},
    thread_cache::{Central, ThreadCache},
};

/// The default total of all thread caches.
pub(crate) const DEFAULT_TOTAL: usize = 32 << 20;
/// The most one thread's cache may hold.
pub(crate) const PER_THREAD_MAX: usize = 4 << 20;

pub(crate) struct Budget {
    total: AtomicUsize,
    reserved: AtomicUsize,
}

impl Budget {
    pub(crate) const fn new(total: usize) -> Self {
        Self {
            total: AtomicUsize::new(total),
            reserved: AtomicUsize::new(0),
        }
    }

    pub(crate) fn set_total(&self, total: usize) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes reserved by all threads.
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` more for a thread that holds `have`; false (and
    /// nothing reserved) when the thread would pass its maximum or all
    /// threads the total.
    pub(crate) fn reserve(&self, have: usize, bytes: usize) -> bool {
        let total = self.total();
        if have + bytes > PER_THREAD_MAX.min(total) {
            return false;
        }
        let mut cur = self.reserved.load(Ordering::Relaxed);
        loop {
            if cur + bytes > total {
                return false;
            }
            match self.reserved.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Gives back `bytes` a thread had reserved.
    pub(crate) fn give_back(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// After fork, in the child: only the forking thread's `have` remains.
    pub(crate) fn reset(&self, have: usize) {
        self.reserved.store(have, Ordering::Relaxed);
    }
}

/// The budget of this process's thread caches.
pub(crate) static BUDGET: Budget = Budget::new(DEFAULT_TOTAL);

/// The limit list `c` of `tc` may grow to, from `old` toward `wanted`:
/// `wanted` if the budget grants the bytes, after taking back half the
/// limit of this thread's largest other list when the budget is spent;
/// else `old`.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
pub(crate) unsafe fn grant(tc: *mut ThreadCache, c: usize, old: u32, wanted: u32) -> u32 {
    if wanted <= old {
        return old;
    }
    let bytes = (wanted - old) as usize * size_class::size_of_class(c);
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        if !BUDGET.reserve((*tc).capacity, bytes) {
            shrink_largest_other(tc, c);
            if !BUDGET.reserve((*tc).capacity, bytes) {
                return old;
            }
        }
        (*tc).capacity += bytes;
    }
    wanted
}

/// Halves the limit of `tc`'s list with the largest capacity other than
/// `c`, giving its excess objects and the bytes back.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
unsafe fn shrink_largest_other(tc: *mut ThreadCache, c: usize) {
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        let cap = |k: usize| (*tc).lists[k].max_len as usize * size_class::size_of_class(k);
        let Some(victim) = (1..NUM_CLASSES).filter(|&k| k != c).max_by_key(|&k| cap(k)) else {
            return;
        };
        let old = (*tc).lists[victim].max_len;
        if old == 0 {
            return;
        }
        let new = old / 2;
        (*tc).lists[victim].shrink(&Central, victim, new);
        let freed = (old - new) as usize * size_class::size_of_class(victim);
        (*tc).capacity -= freed;
        BUDGET.give_back(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_thread_maximum_and_the_total() {
        let b = Budget::new(6 << 20);
        assert!(b.reserve(0, 4 << 20));
        assert!(!b.reserve(4 << 20, 1), "past the per-thread maximum");
        assert!(b.reserve(0, 2 << 20));
        assert!(!b.reserve(0, 1), "past the total");
        assert_eq!(b.reserved(), 6 << 20);
        b.give_back(1 << 20);
        assert!(b.reserve(0, 1 << 20));
        assert!(!b.reserve(0, 1));
        b.reset(100);
        assert_eq!(b.reserved(), 100);
    }

    #[test]
    fn a_total_below_the_thread_maximum_caps_one_thread() {
        let b = Budget::new(1 << 20);
        assert!(!b.reserve(0, (1 << 20) + 1));
        assert!(b.reserve(0, 1 << 20));
    }

    #[test]
    fn concurrent_reservations_never_pass_the_total() {
        let b = Budget::new(1000 * 64);
        let granted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut have = 0;
                    for _ in 0..1000 {
                        if b.reserve(have, 64) {
                            have += 64;
                            granted.fetch_add(64, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.load(Ordering::Relaxed), 1000 * 64);
        assert_eq!(b.reserved(), 1000 * 64);
    }
}
