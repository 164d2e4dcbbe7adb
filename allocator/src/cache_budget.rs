//! The budget of the thread caches: every thread's capacity (the bytes its
//! list limits allow, `Σ max_len × class size`) is reserved from one total
//! (`PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`, default 32 MiB), and no
//! thread reserves more than [`PER_THREAD_MAX`]. Since a list never holds
//! more objects than its limit, the bytes cached in all threads stay within
//! the total. Limits grow only in slow paths, so the fast paths pay nothing.
//!
//! A thread that finds the total spent takes the capacity back from its
//! own lists of other classes (the least recently grown first: their
//! limits shrink and their excess goes to the central tier), and a thread
//! that exits gives its capacity back; an idle thread keeps what it holds.
//!
//! Lock: none; the total reserved is one atomic counter.
use core::sync::atomic::{AtomicUsize, Ordering};

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
