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
//!
//! Lists: a list refills from the middle tier when empty and gives a
//! batch back when it grows past its limit; the limit starts at zero and
//! grows by one per refill or free up to a batch, then by a batch per
//! refill up to `max_cached` (slow start: a thread that allocates a few
//! objects of a class keeps few). Every growth is granted by the caller
//! (the budget of all thread caches, see `cache_budget`). The middle tier
//! is reached through [`MiddleTier`], so that tests can stand in for it.
//!
//! Lock: none for the lists (only the owner thread touches them, with
//! `busy` set, on the fast paths and inside its slow paths); the registry of
//! caches (for statistics) has its own lock. Owner: the thread.
use core::{
    ptr,
    sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

use crate::{
    cache_budget::BUDGET,
    central,
    lock::SpinLock,
    size_class::{self, BATCH, NUM_CLASSES},
};

/// The tier behind the thread caches: the transfer caches and central
/// lists of [`central`].
pub(crate) trait MiddleTier {
    /// A chain of up to `want` objects of class `c`: (head, n), n == 0
    /// when out of memory.
    fn remove_range(&self, c: usize, want: usize) -> (*mut u8, usize);
    /// Takes back a null-terminated chain of `n` objects of class `c`.
    ///
    /// # Safety
    /// Every object of the chain is a free object of class `c`.
    unsafe fn insert_range(&self, c: usize, head: *mut u8, n: usize);
}

/// The real middle tier.
pub(crate) struct Central;

impl MiddleTier for Central {
    #[inline]
    fn remove_range(&self, c: usize, want: usize) -> (*mut u8, usize) {
        central::remove_range(c, want)
    }

    #[inline]
    unsafe fn insert_range(&self, c: usize, head: *mut u8, n: usize) {
        // SAFETY: the caller's contract.
        unsafe { central::insert_range(c, head, n) }
    }
}

/// The cache has not been set up (all lists empty, limits zero).
pub(crate) const UNINIT: u8 = 0;
/// In use.
pub(crate) const ACTIVE: u8 = 1;
/// The thread is exiting: allocations go straight to the central tier.
pub(crate) const DEAD: u8 = 2;

/// One class's free objects, linked through their first word. The fast
/// paths read and write these fields directly (the layout is part of their
/// instruction count).
#[repr(C)]
pub(crate) struct FreeList {
    pub(crate) head: *mut u8,
    /// Atomic only so that statistics may read it from another thread;
    /// the owner uses plain loads and stores.
    pub(crate) len: AtomicU32,
    pub(crate) max_len: u32,
}

impl FreeList {
    /// Pops an object, refilling the list from the middle tier first when
    /// empty (and growing its limit: slow start, as far as `grant(old,
    /// wanted)` allows). Null when out of memory.
    ///
    /// # Safety
    /// The list is this thread's list of class `c`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(crate) unsafe fn pop_or_refill<M: MiddleTier>(
        &mut self,
        m: &M,
        c: usize,
        grant: &mut impl FnMut(u32, u32) -> u32,
    ) -> *mut u8 {
        // SAFETY: the list's objects are free objects linked through their
        // first word.
        unsafe {
            if !self.head.is_null() {
                let head = self.head;
                self.head = *head.cast::<*mut u8>();
                let len = self.len.load(Ordering::Relaxed);
                self.len.store(len - 1, Ordering::Relaxed);
                return head;
            }
            let batch = u32::from(BATCH[c]);
            let wanted = if self.max_len < batch {
                self.max_len + 1
            } else {
                (self.max_len + batch).min(size_class::max_cached(c))
            };
            self.max_len = grant(self.max_len, wanted);
            // The first object goes to the caller, the rest (at most the
            // limit) stay on the list.
            let want = self.max_len.min(batch).max(1) as usize;
            let (head, n) = m.remove_range(c, want);
            if n == 0 {
                return ptr::null_mut();
            }
            self.head = *head.cast::<*mut u8>();
            self.len.store(n as u32 - 1, Ordering::Relaxed);
            head
        }
    }

    /// Pushes a freed object; past the limit, gives a batch from the head
    /// back to the middle tier. `grant` as for [`Self::pop_or_refill`].
    ///
    /// # Safety
    /// The list is this thread's list of class `c`; `p` is a free object
    /// of class `c` that is not on it.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(crate) unsafe fn push_or_release<M: MiddleTier>(
        &mut self,
        m: &M,
        c: usize,
        p: *mut u8,
        grant: &mut impl FnMut(u32, u32) -> u32,
    ) {
        // SAFETY: p is a free object of at least 16 bytes.
        unsafe { *p.cast::<*mut u8>() = self.head };
        self.head = p;
        let len = self.len.load(Ordering::Relaxed) + 1;
        self.len.store(len, Ordering::Relaxed);
        let batch = u32::from(BATCH[c]);
        if self.max_len < batch {
            // Slow start: let the list grow before giving back.
            self.max_len = grant(self.max_len, self.max_len + 1);
        }
        if len > self.max_len {
            // SAFETY: the list holds len >= min(batch, len) objects.
            unsafe { self.release(m, c, batch.min(len) as usize) };
        }
    }

    /// Lowers the limit to `limit`, giving the objects past it to the
    /// middle tier.
    ///
    /// # Safety
    /// The list is this thread's list of class `c`.
    pub(crate) unsafe fn shrink<M: MiddleTier>(&mut self, m: &M, c: usize, limit: u32) {
        self.max_len = limit;
        let len = self.len.load(Ordering::Relaxed);
        if len > limit {
            // SAFETY: the list holds len objects.
            unsafe { self.release(m, c, (len - limit) as usize) };
        }
    }

    /// Gives `n` objects from the head to the middle tier.
    ///
    /// # Safety
    /// The list is of class `c` and holds at least `n` objects.
    #[unsafe(link_section = ".text.hot.profalloc")]
    unsafe fn release<M: MiddleTier>(&mut self, m: &M, c: usize, n: usize) {
        let head = self.head;
        let mut tail = head;
        // SAFETY: the list holds at least n linked objects.
        unsafe {
            for _ in 1..n {
                tail = *tail.cast::<*mut u8>();
            }
            self.head = *tail.cast::<*mut u8>();
            *tail.cast::<*mut u8>() = ptr::null_mut();
            let len = self.len.load(Ordering::Relaxed);
            self.len.store(len - n as u32, Ordering::Relaxed);
            m.insert_range(c, head, n);
        }
    }

    /// Puts fresh objects from the middle tier ahead of the list's objects,
    /// so that the next pops hand out the fresh ones (a batch, within the
    /// limit `grant` allows: a thread that keeps a few objects live and
    /// churns others still does not reach the list's own). Where the
    /// limit leaves no room, the list's objects go to the middle tier
    /// instead. For a thread's first allocation: its lists then hold only
    /// objects other threads allocated and this one freed, whose cache
    /// lines those threads may still write (see `ThreadCache::frees_only`).
    ///
    /// # Safety
    /// The list is this thread's list of class `c`.
    pub(crate) unsafe fn put_behind_fresh<M: MiddleTier>(
        &mut self,
        m: &M,
        c: usize,
        grant: &mut impl FnMut(u32, u32) -> u32,
    ) {
        let n = self.len.load(Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let fresh = u32::from(BATCH[c]);
        self.max_len = grant(self.max_len, self.max_len.max(n + fresh));
        if self.max_len <= n {
            // SAFETY: the caller's contract.
            unsafe { self.flush(m, c) };
            return;
        }
        let (head, got) = m.remove_range(c, fresh.min(self.max_len - n) as usize);
        if got == 0 {
            return;
        }
        // SAFETY: the middle tier gave a null-terminated chain of `got`
        // free objects; link its last one to the list's objects.
        unsafe {
            let mut tail = head;
            for _ in 1..got {
                tail = *tail.cast::<*mut u8>();
            }
            *tail.cast::<*mut u8>() = self.head;
        }
        self.head = head;
        self.len.store(n + got as u32, Ordering::Relaxed);
    }

    /// Gives every object to the middle tier (the chain is null-terminated:
    /// the list's last object links to null).
    ///
    /// # Safety
    /// The list is of class `c`.
    unsafe fn flush<M: MiddleTier>(&mut self, m: &M, c: usize) {
        let n = self.len.load(Ordering::Relaxed) as usize;
        if n > 0 {
            let head = self.head;
            self.head = ptr::null_mut();
            self.len.store(0, Ordering::Relaxed);
            // SAFETY: the list's n objects are free objects of class c.
            unsafe { m.insert_range(c, head, n) };
        }
    }
}

#[repr(C, align(64))]
pub(crate) struct ThreadCache {
    /// Bytes left until the next sampled allocation (see `sampler`).
    pub(crate) countdown: isize,
    /// Non-zero while the thread is inside the allocator, on a fast path
    /// (a list operation) or a slow path: a signal handler (or a library
    /// the slow path calls) that re-enters the allocator on this thread
    /// must not touch the lists or locks this thread holds. Beside
    /// `countdown` so that the fast paths touch one cache line of it. A
    /// flag (0 or 1), 32 bits wide: the fast paths test it with a compare
    /// and set and clear it with stores of the same width (a narrower store
    /// would stall the next compare's load).
    pub(crate) busy: u32,
    pub(crate) state: u8,
    /// Set while the thread has freed but not yet allocated (its cache was
    /// set up by a free): its lists hold only objects other threads
    /// allocated, the neighbours of objects those threads still use. Its
    /// `countdown` stays negative, so that its first allocation takes the
    /// slow path, which puts fresh objects ahead of them (a thread that
    /// takes over another's objects would otherwise write the cache lines
    /// that thread writes: false sharing). Beside `state`, in padding
    /// before `lists`: the fast paths' layout is unchanged.
    pub(crate) frees_only: bool,
    pub(crate) lists: [FreeList; NUM_CLASSES],
    /// Σ max_len × class size: the bytes the lists may hold. Written by
    /// the owner only; atomic so that a thread stealing budget may read it.
    pub(crate) capacity: AtomicUsize,
    /// The capacity this thread may reach (see `cache_budget`): starts
    /// small and grows a step each time a list wants more than it allows;
    /// threads that steal from an idle one lower its limit.
    pub(crate) limit: AtomicUsize,
    /// Part of `capacity` other threads took (see `cache_budget`): the
    /// owner shrinks its lists by that much on its next slow path. The
    /// cache's share of the budget is `capacity - debt`.
    pub(crate) debt: AtomicUsize,
    /// When the owner last ran a slow path (`decay::now_ns`): a cache
    /// whose owner has not for a while is idle, and may be stolen from.
    pub(crate) last_active_ns: AtomicU64,
    /// Before this time the owner does not look for a thread to steal
    /// from again (the last look found none). Owner only.
    pub(crate) steal_retry_ns: u64,
    pub(crate) rng: u64,
    /// Σ max_len × class size over the lists of big objects, and the
    /// clock's hand that picks which of them gives room (see
    /// `cache_budget`). Owner only.
    pub(crate) big_capacity: usize,
    pub(crate) big_hand: usize,
    pub(crate) next: *mut ThreadCache,
    pub(crate) prev: *mut ThreadCache,
}

/// The byte offset of class `c`'s list is `LISTS + (c << SLOT_SHIFT)`.
const _: () = assert!(core::mem::size_of::<FreeList>() == 1 << size_class::SLOT_SHIFT);
/// Offset of the list array in the cache.
pub(crate) const LISTS: usize = core::mem::offset_of!(ThreadCache, lists);
/// Offset of `busy` in the cache (the fast paths' assembly names it).
pub(crate) const BUSY: usize = core::mem::offset_of!(ThreadCache, busy);

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
pub(crate) fn tls() -> *mut ThreadCache {
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
pub(crate) fn tls() -> *mut ThreadCache {
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
pub(crate) unsafe fn register(tc: *mut ThreadCache) {
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
pub(crate) unsafe fn unregister(tc: *mut ThreadCache) {
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

/// Bytes of free objects in `tc`'s lists (racy reads of the lengths).
///
/// # Safety
/// `tc` is a live cache.
pub(crate) unsafe fn cached_bytes_of(tc: *const ThreadCache) -> usize {
    (1..NUM_CLASSES)
        // SAFETY: the caller's contract; the lengths are atomics.
        .map(|c| unsafe { (*tc).lists[c].len.load(Ordering::Relaxed) } as usize)
        .zip((1..NUM_CLASSES).map(size_class::size_of_class))
        .map(|(n, size)| n * size)
        .sum()
}

/// Calls `f` with an iterator over every registered cache, under the
/// registry's lock (so every cache it yields stays live). `f` must not
/// allocate.
pub(crate) fn any_cache_locked(f: impl FnOnce(&mut dyn Iterator<Item = *mut ThreadCache>)) {
    REGISTRY_LOCK.lock();
    // SAFETY: registered caches stay alive while registered (a thread
    // unregisters, under this lock, before its TLS goes away).
    let mut tc = unsafe { *REGISTRY.0.get() };
    let mut caches = core::iter::from_fn(|| {
        if tc.is_null() {
            return None;
        }
        let this = tc;
        // SAFETY: as above.
        tc = unsafe { (*tc).next };
        Some(this)
    });
    f(&mut caches);
    REGISTRY_LOCK.unlock();
}

/// Bytes of free objects in every thread cache (racy reads of the lengths).
pub(crate) fn cached_bytes() -> usize {
    let mut total = 0;
    any_cache_locked(|caches| {
        // SAFETY: a registered cache is live.
        total = caches.map(|tc| unsafe { cached_bytes_of(tc) }).sum();
    });
    total
}

/// Moves every object of `tc`'s lists to the central tier.
///
/// # Safety
/// `tc` is this thread's cache and `busy` is set.
pub(crate) unsafe fn flush(tc: *mut ThreadCache) {
    for c in 1..NUM_CLASSES {
        // SAFETY: the owner thread flushes its own lists.
        unsafe { (*tc).lists[c].flush(&Central, c) };
    }
}

/// The pthread key destructor: the thread is exiting.
///
/// # Safety
/// Called by glibc with the value this thread set: its cache.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe extern "C" fn thread_exit(arg: *mut libc::c_void) {
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
        (*tc).big_capacity = 0;
        // Out of the registry first: no thread can steal from it after.
        unregister(tc);
        (*tc).state = DEAD;
        let share = (*tc)
            .capacity
            .load(Ordering::Relaxed)
            .saturating_sub((*tc).debt.swap(0, Ordering::Relaxed));
        BUDGET.give_back(share);
        (*tc).capacity.store(0, Ordering::Relaxed);
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        (*tc).busy = 0;
    }
}

/// Locks the registry (before fork).
pub(crate) fn lock_registry() {
    REGISTRY_LOCK.lock();
}

/// Unlocks the registry (after fork, parent).
pub(crate) fn unlock_registry() {
    REGISTRY_LOCK.unlock();
}

/// After fork, in the child: only the forking thread survives. The other
/// caches' memory is the dead threads' stacks; drop them from the registry
/// (their cached objects stay unused, as in every thread-caching
/// allocator).
pub(crate) fn reset_registry_in_child() {
    REGISTRY_LOCK.reset();
    let me = tls();
    // SAFETY: single-threaded child; the registry is ours.
    unsafe {
        *REGISTRY.0.get() = ptr::null_mut();
        BUDGET.reset(
            (*me)
                .capacity
                .load(Ordering::Relaxed)
                .saturating_sub((*me).debt.load(Ordering::Relaxed)),
        );
        if (*me).state == ACTIVE {
            (*me).next = ptr::null_mut();
            (*me).prev = ptr::null_mut();
            *REGISTRY.0.get() = me;
        }
    }
}

#[cfg(test)]
#[path = "thread_cache_tests.rs"]
mod tests;
