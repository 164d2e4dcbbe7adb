//! Per-thread caches: one free list per size class, in static
//! (initial-exec) thread-local storage, used by the fast paths without any
//! lock or atomic read-modify-write.
//!
//! Why this TLS: the block is declared in `.tbss` and reached as
//! `%fs:0 + GOTTPOFF(symbol)` (x86-64), two instructions and no call. A
//! `thread_local!` in a shared object goes through `__tls_get_addr`, and a
//! `thread_local!` with a destructor registers it through
//! `__cxa_thread_atexit_impl`, which calls calloc and would recurse. The
//! cost: a library with static TLS can be loaded with LD_PRELOAD or linked,
//! but `dlopen` of it may fail ("cannot allocate memory in static TLS
//! block"); only those two uses are supported.
//!
//! The block starts zeroed, which is a valid, empty, uninitialised cache:
//! every fast path falls through to the slow path, which initialises it.
//! Thread exit: a pthread key (created once) has the cache as value; its
//! destructor flushes the lists to the central tier and marks the cache
//! dead, so later allocations on that thread (other destructors) bypass it.
use core::{
    ptr,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    central,
    lock::SpinLock,
    size_class::{self, NUM_CLASSES},
};

/// The cache has not been set up (all lists empty, limits zero).
pub const UNINIT: u8 = 0;
/// In use.
pub const ACTIVE: u8 = 1;
/// The thread is exiting: allocations go straight to the central tier.
pub const DEAD: u8 = 2;

#[repr(C)]
pub struct FreeList {
    pub head: *mut u8,
    /// Atomic only so that statistics may read it from another thread;
    /// the owner uses plain loads and stores.
    pub len: AtomicU32,
    pub max_len: u32,
}

#[repr(C, align(64))]
pub struct ThreadCache {
    /// Bytes left until the next sampled allocation (see `sampler`).
    pub countdown: isize,
    pub lists: [FreeList; NUM_CLASSES],
    pub state: u8,
    /// Set while the thread runs an allocator slow path: a signal handler
    /// (or a library the slow path calls) that re-enters the allocator on
    /// this thread must not touch the lists or locks this thread holds.
    pub busy: u8,
    pub rng: u64,
    pub next: *mut ThreadCache,
    pub prev: *mut ThreadCache,
}

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".globl __profalloc_thread_cache",
    ".hidden __profalloc_thread_cache",
    ".p2align 6",
    ".type __profalloc_thread_cache,@object",
    ".size __profalloc_thread_cache, {size}",
    "__profalloc_thread_cache:",
    ".zero {size}",
    ".popsection",
    size = const core::mem::size_of::<ThreadCache>(),
);

/// This thread's cache.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn tls() -> *mut ThreadCache {
    let p: usize;
    // SAFETY: reads the thread pointer and the symbol's TLS offset from
    // the GOT (initial-exec model); no memory is written.
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + __profalloc_thread_cache@GOTTPOFF]",
            p = out(reg) p,
            options(pure, readonly, nostack),
        );
    }
    p as *mut ThreadCache
}

#[cfg(not(target_arch = "x86_64"))]
std::thread_local! {
    static CACHE: core::cell::UnsafeCell<core::mem::MaybeUninit<ThreadCache>> =
        const { core::cell::UnsafeCell::new(core::mem::MaybeUninit::zeroed()) };
}

/// This thread's cache.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub fn tls() -> *mut ThreadCache {
    CACHE.with(|c| c.get().cast())
}

/// Every live thread's cache, for statistics.
static REGISTRY_LOCK: SpinLock = SpinLock::new();
struct Registry(core::cell::UnsafeCell<*mut ThreadCache>);
// SAFETY: only touched under REGISTRY_LOCK.
unsafe impl Sync for Registry {}
static REGISTRY: Registry = Registry(core::cell::UnsafeCell::new(ptr::null_mut()));

/// Adds `tc` to the registry.
///
/// # Safety
/// `tc` is this thread's cache, not registered.
pub unsafe fn register(tc: *mut ThreadCache) {
    REGISTRY_LOCK.lock();
    // SAFETY: the registry is touched only under its lock.
    unsafe {
        let head = *REGISTRY.0.get();
        (*tc).prev = ptr::null_mut();
        (*tc).next = head;
        if !head.is_null() {
            (*head).prev = tc;
        }
        *REGISTRY.0.get() = tc;
    }
    REGISTRY_LOCK.unlock();
}

/// # Safety
/// `tc` is registered.
unsafe fn unregister(tc: *mut ThreadCache) {
    REGISTRY_LOCK.lock();
    // SAFETY: the registry is touched only under its lock.
    unsafe {
        if (*tc).prev.is_null() {
            *REGISTRY.0.get() = (*tc).next;
        } else {
            (*(*tc).prev).next = (*tc).next;
        }
        if !(*tc).next.is_null() {
            (*(*tc).next).prev = (*tc).prev;
        }
    }
    REGISTRY_LOCK.unlock();
}

/// Bytes of free objects in every thread cache (racy reads of the lengths).
pub fn cached_bytes() -> usize {
    let mut total = 0;
    REGISTRY_LOCK.lock();
    // SAFETY: registered caches stay alive while registered (a thread
    // unregisters, under this lock, before its TLS goes away).
    unsafe {
        let mut tc = *REGISTRY.0.get();
        while !tc.is_null() {
            for c in 1..NUM_CLASSES {
                total += (*tc).lists[c].len.load(Ordering::Relaxed) as usize
                    * size_class::size_of_class(c);
            }
            tc = (*tc).next;
        }
    }
    REGISTRY_LOCK.unlock();
    total
}

/// Moves every object of `tc`'s lists to the central tier.
///
/// # Safety
/// `tc` is this thread's cache and `busy` is set.
pub unsafe fn flush(tc: *mut ThreadCache) {
    for c in 1..NUM_CLASSES {
        // SAFETY: the owner thread flushes its own lists.
        unsafe {
            let list = &mut (*tc).lists[c];
            let n = list.len.load(Ordering::Relaxed) as usize;
            if n > 0 {
                let head = list.head;
                list.head = ptr::null_mut();
                list.len.store(0, Ordering::Relaxed);
                central::insert_range(c, head, n);
            }
        }
    }
}

/// The pthread key destructor: the thread is exiting.
///
/// # Safety
/// Called by glibc with the value this thread set: its cache.
pub unsafe extern "C" fn thread_exit(arg: *mut libc::c_void) {
    let tc = arg.cast::<ThreadCache>();
    if tc.is_null() || tc != tls() {
        return;
    }
    // SAFETY: tc is this thread's cache.
    unsafe {
        (*tc).busy = 1;
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        flush(tc);
        for c in 1..NUM_CLASSES {
            (*tc).lists[c].max_len = 0;
        }
        (*tc).state = DEAD;
        unregister(tc);
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        (*tc).busy = 0;
    }
}

/// Locks the registry (before fork).
pub fn lock_registry() {
    REGISTRY_LOCK.lock();
}

/// Unlocks the registry (after fork, parent).
pub fn unlock_registry() {
    REGISTRY_LOCK.unlock();
}

/// After fork, in the child: only the forking thread survives. The other
/// caches' memory is the dead threads' stacks; drop them from the registry
/// (their cached objects stay unused, as in every thread-caching
/// allocator).
pub fn reset_registry_in_child() {
    REGISTRY_LOCK.reset();
    let me = tls();
    // SAFETY: single-threaded child; the registry is ours.
    unsafe {
        *REGISTRY.0.get() = ptr::null_mut();
        if (*me).state == ACTIVE {
            (*me).next = ptr::null_mut();
            (*me).prev = ptr::null_mut();
            *REGISTRY.0.get() = me;
        }
    }
}
