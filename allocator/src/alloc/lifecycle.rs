//! The allocator's life cycle: the one-time set-up (settings, thread-exit
//! key, fork handlers), each thread's set-up on its first slow path, the
//! fork handlers, and the exit handler. Everything else is statically
//! initialised, so allocation works before (and during) all of this.
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use crate::{
    cache_budget, central, env, page_heap, sampler, stats,
    thread_cache::{self, ACTIVE, ThreadCache, tls},
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
// fast paths test and set it in one `bts`), so the value it had before
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
