//! The idle-release thread: ages the page heap's free spans while the
//! program makes no allocator call, so that memory freed before a long
//! sleep leaves the resident set within a few seconds (the `decay` rules
//! otherwise only run on the page heap's own calls).
//!
//! Started lazily, once per process, the first time a free leaves at least
//! [`START_PAGES`] resident free pages in the page heap: a program that
//! never frees that much never gets a thread (and stays single-threaded).
//! The request is noted under the page heap's lock and acted on at the end
//! of the free's slow path, outside every lock and with `busy` clear, since
//! `pthread_create` allocates. The thread blocks every signal (they keep
//! going to the program's threads), never allocates, and wakes once per
//! [`TICK_NS`] to run the age rule under the page heap's lock.
//!
//! Fork: the child has no such thread; its flag is reset by the fork
//! handler, so the child starts its own when it needs one.
//!
//! `PROFALLOC_BACKGROUND_RELEASE=0` turns it off (for programs that must
//! stay single-threaded, e.g. to `unshare(CLONE_NEWUSER)` later); so does
//! `PROFALLOC_RELEASE_BYTES=0`, which turns automatic release off.
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use super::{LOCK, decay_locked, heap};
use crate::counters;

/// Resident free pages after a free that start the thread (1 MiB).
pub(crate) const START_PAGES: usize = (1 << 20) >> crate::size_class::PAGE_SHIFT;
/// Time between two passes.
pub(crate) const TICK_NS: u64 = crate::decay::EPOCH_NS / 2;

/// Whether the thread may be started (the setting).
pub(crate) static ENABLED: AtomicBool = AtomicBool::new(true);

const IDLE: u8 = 0;
const WANTED: u8 = 1;
const STARTED: u8 = 2;
/// IDLE, then WANTED (noted under LOCK), then STARTED (for good; also
/// after a failed start, which is not retried).
static STATE: AtomicU8 = AtomicU8::new(IDLE);

/// The page heap holds `free_pages` resident free pages after a free.
/// Called under LOCK.
#[inline]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) fn note_free(free_pages: usize) {
    if free_pages >= START_PAGES
        && STATE.load(Ordering::Relaxed) == IDLE
        && ENABLED.load(Ordering::Relaxed)
    {
        STATE.store(WANTED, Ordering::Relaxed);
    }
}

/// Starts the thread if a free asked for it. Called at the end of a free's
/// slow path: no lock held, `busy` clear (pthread_create may allocate).
#[inline]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn start_if_wanted() {
    if STATE.load(Ordering::Relaxed) == WANTED {
        start();
    }
}

#[cold]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
fn start() {
    if STATE
        .compare_exchange(WANTED, STARTED, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // SAFETY: plain libc calls on local, initialised out-parameters. The
    // thread is created with every signal blocked (the mask is inherited),
    // so no signal meant for the program ever runs on it; this thread's
    // mask is put back at once.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_attr_setstacksize(&mut attr, 64 << 10);
        let mut tid: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut tid, &attr, run, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        if rc == 0 {
            counters::BACKGROUND_THREADS.add(1);
        }
    }
}

#[unsafe(link_section = ".text.hot.profalloc")]
extern "C" fn run(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: names this thread (a literal, NUL-terminated).
    unsafe { libc::prctl(libc::PR_SET_NAME, c"profalloc-bg".as_ptr()) };
    let tick = libc::timespec {
        tv_sec: (TICK_NS / 1_000_000_000) as libc::time_t,
        tv_nsec: (TICK_NS % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: a valid timespec; an early wake-up only shortens a tick.
        unsafe { libc::nanosleep(&tick, core::ptr::null_mut()) };
        pass();
    }
}

/// One pass: the age rule, when free resident pages are left.
#[unsafe(link_section = ".text.hot.profalloc")]
fn pass() {
    if counters::HEAP_FREE_BYTES.load() == 0 {
        return;
    }
    LOCK.lock();
    // SAFETY: LOCK is held.
    unsafe { decay_locked(heap(), false) };
    LOCK.unlock();
}

/// The fork handler of the child: no thread there (yet).
pub(crate) fn after_fork_child() {
    STATE.store(IDLE, Ordering::Relaxed);
}
