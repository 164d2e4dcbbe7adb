//! The one lock type, for the allocator's tiers and gperftools mode's
//! tables alike: a test-and-test-and-set spin lock that yields the CPU
//! after a short spin. Critical sections are short (list splices, a table
//! insert), and a futex-based lock would need more state to reset in a
//! forked child. `try_lock` serves the paths that must not wait on a lock
//! their own thread may hold (a signal handler's free).
use core::sync::atomic::{AtomicBool, Ordering};

pub(crate) struct SpinLock {
    locked: AtomicBool,
}

impl SpinLock {
    pub(crate) const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
        }
    }

    #[inline]
    pub(crate) fn lock(&self) {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                if spins < 256 {
                    core::hint::spin_loop();
                    spins += 1;
                } else {
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                }
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Takes the lock if it is free; never waits.
    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        !self.locked.load(Ordering::Relaxed)
            && self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    #[inline]
    pub(crate) fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }

    /// Makes the lock free again in a forked child, where the thread that
    /// held it no longer exists.
    pub(crate) fn reset(&self) {
        self.locked.store(false, Ordering::Relaxed);
    }
}

impl Default for SpinLock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_lock_fails_while_held_and_reset_frees() {
        let l = SpinLock::new();
        assert!(l.try_lock());
        assert!(!l.try_lock());
        l.unlock();
        l.lock();
        assert!(!l.try_lock());
        l.reset();
        assert!(l.try_lock());
    }

    #[test]
    fn threads_exclude_each_other() {
        struct Shared(core::cell::UnsafeCell<u64>);
        // SAFETY: only touched under the lock below.
        unsafe impl Sync for Shared {}
        impl Shared {
            /// # Safety
            /// The caller holds the lock.
            unsafe fn bump(&self) {
                // SAFETY: the caller's contract.
                unsafe { *self.0.get() += 1 };
            }
        }
        let lock = SpinLock::new();
        let n = Shared(core::cell::UnsafeCell::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        lock.lock();
                        // SAFETY: under the lock.
                        unsafe { n.bump() };
                        lock.unlock();
                    }
                });
            }
        });
        assert_eq!(n.0.into_inner(), 40_000);
    }
}
