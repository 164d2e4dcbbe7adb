//! The allocator's life cycle: the one-time set-up (settings, thread-exit
//! key, fork handlers), each thread's set-up on its first slow path, the
//! fork handlers, and the exit handler. Everything else is statically
//! initialised, so allocation works before (and during) all of this.
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use crate::{
    cache_budget::{self, Growth},
    central, env, page_heap, sampler, stats,
    thread_cache::{self, ACTIVE, Central, ThreadCache, tls},
};

/// Sets up this thread's cache (and, the first time, the allocator).
///
/// # Safety
/// `tc` is this thread's cache, busy set.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn init_thread(tc: *mut ThreadCache) {
    global_init();
    // SAFETY: the owner initialises its own cache.
    unsafe {
        (*tc).state = ACTIVE;
        (*tc)
            .limit
            .store(cache_budget::START_LIMIT, Ordering::Relaxed);
        (*tc).rng = (tc as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ now_nanos();
        (*tc).countdown = sampler::next_distance(&mut (*tc).rng, sampler::rate());
        thread_cache::register(tc);
        if INIT.load(Ordering::Acquire) == INIT_DONE {
            // May call calloc (keys past the first 32): a re-entrant call.
            libc::pthread_setspecific(*KEY.0.get(), tc.cast());
        }
    }
}

/// Sets up this thread's cache on a free, before the thread has
/// allocated: its first allocation then takes the slow path (a negative
/// countdown), which calls [`on_first_allocation`].
///
/// # Safety
/// As for [`init_thread`].
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn init_thread_on_free(tc: *mut ThreadCache) {
    // SAFETY: the caller's contract.
    unsafe {
        init_thread(tc);
        (*tc).frees_only = true;
        (*tc).countdown = -1;
    }
}

/// A thread's first allocation after frees (see
/// `ThreadCache::frees_only`): every list's objects (other threads'
/// objects) go behind fresh ones, and the sampling countdown starts (the
/// `-1` it held was not a distance drawn by the sampler).
///
/// # Safety
/// `tc` is this thread's cache, busy set, `frees_only` set.
#[cold]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn on_first_allocation(tc: *mut ThreadCache) {
    // SAFETY: the owner works on its own cache.
    unsafe {
        (*tc).frees_only = false;
        (*tc).countdown = sampler::next_distance(&mut (*tc).rng, sampler::rate());
        if (*tc).state != ACTIVE {
            return;
        }
        for c in 1..crate::size_class::NUM_CLASSES {
            (*tc).lists[c].put_behind_fresh(&Central, c, &mut |old, wanted| {
                cache_budget::grant(tc, c, old, wanted, Growth::Refill)
            });
        }
    }
}

#[unsafe(link_section = ".text.hot.profalloc")]
fn now_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) ^ ts.tv_nsec as u64
}

const INIT_NONE: u8 = 0;
const INIT_RUNNING: u8 = 1;
const INIT_DONE: u8 = 2;
static INIT: AtomicU8 = AtomicU8::new(INIT_NONE);
struct Key(core::cell::UnsafeCell<libc::pthread_key_t>);
// SAFETY: written once before INIT becomes DONE, read-only afterwards.
unsafe impl Sync for Key {}
static KEY: Key = Key(core::cell::UnsafeCell::new(0));
/// One-time set-up: settings from the environment, the thread-exit key,
/// the fork handlers. Everything else is statically initialised, so
/// allocation works before (and during) this.
#[unsafe(link_section = ".text.hot.profalloc")]
fn global_init() {
    match INIT.compare_exchange(INIT_NONE, INIT_RUNNING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(INIT_DONE) => return,
        Err(_) => {
            // Another thread is initialising (it cannot be this one: busy
            // guards re-entry); it never waits for us.
            while INIT.load(Ordering::Acquire) != INIT_DONE {
                core::hint::spin_loop();
            }
            return;
        }
    }
    apply_settings();
    // SAFETY: KEY is written only here, before INIT_DONE is published.
    unsafe {
        libc::pthread_key_create(KEY.0.get(), Some(thread_cache::thread_exit));
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(after_fork_child),
        );
    }
    INIT.store(INIT_DONE, Ordering::Release);
}

/// Reads the settings (the one read of the environment) and hands them
/// to the tiers and the sampler.
#[unsafe(link_section = ".text.hot.profalloc")]
fn apply_settings() {
    // SAFETY: called once, from global_init, before INIT_DONE.
    unsafe { env::read() };
    let s = env::settings();
    if let Some(n) = s.release_bytes {
        page_heap::RELEASE_BYTES.store(n as usize, Ordering::Relaxed);
    }
    if s.background_release == Some(0) {
        page_heap::background::ENABLED.store(false, Ordering::Relaxed);
    }
    if let Some(n) = s.max_total_thread_cache_bytes {
        cache_budget::BUDGET.set_total(n as usize);
    }
    sampler::start(s);
}

// Between these handlers this thread holds every lock; `busy` sends any
// allocation in between (glibc's own fork code) down the lock-free
// re-entrant path instead of deadlocking on them. `busy` is a flag (the
// fast paths test and set it), so the value it had before
// (set when fork runs in a handler that interrupted the allocator) is kept
// aside and put back. Only the forking thread, holding every lock, touches
// it.
static BUSY_BEFORE_FORK: AtomicU32 = AtomicU32::new(0);

extern "C" fn before_fork() {
    thread_cache::lock_registry();
    central::lock_all();
    page_heap::LOCK.lock();
    // SAFETY: this thread's cache; only its owner writes `busy`.
    unsafe {
        BUSY_BEFORE_FORK.store((*tls()).busy, Ordering::Relaxed);
        (*tls()).busy = 1;
    }
}

extern "C" fn after_fork_parent() {
    // SAFETY: as above.
    unsafe { (*tls()).busy = BUSY_BEFORE_FORK.load(Ordering::Relaxed) };
    page_heap::LOCK.unlock();
    central::unlock_all();
    thread_cache::unlock_registry();
}

extern "C" fn after_fork_child() {
    // SAFETY: as above.
    unsafe { (*tls()).busy = BUSY_BEFORE_FORK.load(Ordering::Relaxed) };
    page_heap::LOCK.reset();
    page_heap::background::after_fork_child();
    central::reset_all();
    thread_cache::reset_registry_in_child();
}

#[unsafe(link_section = ".text.hot.profalloc")]
extern "C" fn report_at_exit() {
    sampler::at_exit();
    if env::settings().stats_at_exit {
        stats::write_report();
    }
}

#[used]
#[unsafe(link_section = ".fini_array")]
static REPORT_AT_EXIT: extern "C" fn() = report_at_exit;

/// Makes sure the allocator (and the profiling the settings ask for) is
/// set up before the program runs, even if it never allocates before
/// creating its first thread.
#[unsafe(link_section = ".text.hot.profalloc")]
extern "C" fn init_before_main() {
    let p = super::malloc(1);
    // SAFETY: p was just allocated (or is null).
    unsafe { super::free(p) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT_BEFORE_MAIN: extern "C" fn() = init_before_main;

#[cfg(test)]
mod tests {
    use super::super::fast_path::{free, malloc};

    /// A thread whose first call frees an object another thread allocated
    /// does not get it back from its first malloc of that size, nor from a
    /// malloc/free churn after it (cache-scratch's pattern): it would write
    /// a cache line whose other objects the first thread still uses. (It
    /// gets it only after the fresh objects put ahead of it.)
    #[test]
    fn a_thread_that_frees_first_does_not_reuse_the_foreign_object() {
        let line = |p: usize| p & !63;
        let live: Vec<usize> = (0..256).map(|_| malloc(16) as usize).collect();
        // An object whose line holds four objects, all live here: no free
        // object shares its line, so only it could land there.
        let foreign = *live
            .iter()
            .find(|&&p| live.iter().filter(|&&q| line(q) == line(p)).count() == 4)
            .expect("256 objects of 16 bytes fill whole cache lines");
        let handed_out = std::thread::spawn(move || {
            // SAFETY: a live allocation, freed once (by this thread).
            unsafe { free(foreign as *mut u8) };
            let mine = vec![malloc(16) as usize];
            // A malloc/free churn after them, as cache-scratch does.
            let churn: Vec<usize> = (0..8)
                .map(|_| {
                    let p = malloc(16);
                    // SAFETY: just allocated.
                    unsafe { free(p) };
                    p as usize
                })
                .collect();
            for &p in &mine {
                // SAFETY: live allocations of this thread.
                unsafe { free(p as *mut u8) };
            }
            [mine, churn].concat()
        })
        .join()
        .unwrap();
        for p in handed_out {
            assert_ne!(line(p), line(foreign), "{p:#x} shares {foreign:#x}'s line");
        }
        for &p in &live {
            if p != foreign {
                // SAFETY: live allocations of this thread.
                unsafe { free(p as *mut u8) };
            }
        }
    }
}
