//! The allocator's entry points: malloc, free and the rest of the family
//! as Rust functions, with their fast paths and the slow paths behind them.
//! The C ABI (`libprofalloc.so`) and [`crate::ProfAlloc`] call these.
//!
//! SYNCHRONIZATION (after tcmalloc):
//! - thread caches: no lock; only the owner thread touches its lists.
//! - transfer cache and central list of a class: one lock each.
//! - page heap: one lock; may be taken with a central lock held.
//! - page map: lock-free reads; see `pagemap`.
//! - huge objects: no lock; see `huge`.
//! - re-entrancy: a thread inside a slow path has `busy` set; a nested
//!   call on the same thread (signal handler, or glibc calling malloc from
//!   pthread_setspecific/pthread_atfork during initialisation) allocates a
//!   huge mapping and defers frees to a lock-free list, so it never waits
//!   for a lock its own thread holds.
//!
//! Fast paths, and every reason they fall through to the slow path:
//! - malloc: size above MAX_SMALL; the sampling countdown went negative
//!   (also the case in a thread that has not initialised its cache); the
//!   class's list is empty.
//! - free: the page is not a small-object page (null, large, huge, sampled,
//!   foreign pointers); the list is at its length limit (always the case
//!   for uninitialised and exiting threads); the object is the list's head
//!   (a double free).
use core::{
    ptr,
    sync::atomic::{AtomicPtr, AtomicU8, Ordering, compiler_fence},
};

use crate::{
    central, huge, os, page_heap, pagemap, sampler,
    size_class::{self, BATCH, MAX_SMALL, MIN_ALIGN, NUM_CLASSES, PAGE_SHIFT, PAGE_SIZE},
    span, stats,
    thread_cache::{self, ACTIVE, DEAD, ThreadCache, UNINIT, tls},
};

/// Objects larger than this get their own mapping (and grow with mremap).
pub const HUGE_THRESHOLD: usize = 1 << 20;

/// Allocates `size` bytes aligned to 16; null (errno ENOMEM) on failure.
#[inline(always)]
pub fn malloc(size: usize) -> *mut u8 {
    if size <= MAX_SMALL {
        alloc_class(size_class::class_of(size), size)
    } else {
        // SAFETY: the slow path accepts any request.
        unsafe { alloc_slow(size, 0, MIN_ALIGN, false) }
    }
}

#[inline(always)]
fn alloc_class(c: usize, size: usize) -> *mut u8 {
    let tc = tls();
    // SAFETY: tc is this thread's cache; c < NUM_CLASSES; a non-null head
    // is a free object whose first word links to the next one.
    unsafe {
        let countdown = (*tc).countdown - size as isize;
        (*tc).countdown = countdown;
        let list = (*tc).lists.as_mut_ptr().add(c);
        let head = (*list).head;
        if countdown < 0 || head.is_null() {
            return alloc_slow(size, c, MIN_ALIGN, true);
        }
        let next = *head.cast::<*mut u8>();
        (*list).head = next;
        let len = (*list).len.load(Ordering::Relaxed);
        (*list).len.store(len - 1, Ordering::Relaxed);
        // The next malloc of this class reads `next`'s first word: start
        // fetching it now (a free list's objects are often cold).
        prefetch(next);
        head
    }
}

#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Frees `p` (null is ignored). Aborts with a message on a pointer that is
/// not ours or on a detected double free.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
#[inline(always)]
pub unsafe fn free(p: *mut u8) {
    let c = pagemap::class_of_addr(p as usize);
    if c == 0 {
        // SAFETY: caller contract.
        return unsafe { free_slow(p) };
    }
    let tc = tls();
    // SAFETY: tc is this thread's cache; c is p's class from the page map.
    unsafe {
        let list = (*tc).lists.as_mut_ptr().add(c);
        let len = (*list).len.load(Ordering::Relaxed);
        let head = (*list).head;
        if len >= (*list).max_len || head == p {
            return free_slow(p);
        }
        *p.cast::<*mut u8>() = head;
        (*list).head = p;
        (*list).len.store(len + 1, Ordering::Relaxed);
    }
}

/// Allocates `size` bytes aligned to `align` (a power of two).
pub fn memalign(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN {
        return malloc(size);
    }
    if size <= MAX_SMALL && align <= PAGE_SIZE {
        // A class whose size is a multiple of `align` has aligned objects
        // (spans start on page boundaries).
        let mut c = size_class::class_of(size.max(align));
        while c < NUM_CLASSES && !size_class::size_of_class(c).is_multiple_of(align) {
            c += 1;
        }
        if c < NUM_CLASSES {
            return alloc_class(c, size);
        }
    }
    // SAFETY: the slow path accepts any request.
    unsafe { alloc_slow(size, 0, align, false) }
}

/// calloc: overflow-checked, zeroed.
pub fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        os::set_enomem();
        return ptr::null_mut();
    };
    let p = malloc(total);
    // Huge objects come straight from mmap, already zero.
    if !p.is_null() && total <= HUGE_THRESHOLD {
        // SAFETY: p holds at least `total` bytes.
        unsafe { p.write_bytes(0, total) };
    }
    p
}

/// Usable bytes of `p` (0 for null). Aborts on a foreign pointer.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
pub unsafe fn usable_size(p: *mut u8) -> usize {
    if p.is_null() {
        return 0;
    }
    let c = pagemap::class_of_addr(p as usize);
    if c != 0 {
        return size_class::size_of_class(c);
    }
    let s = checked_span("malloc_usable_size", p);
    // SAFETY: checked_span returns a live large or huge span holding p.
    unsafe {
        if (*s).state == span::HUGE {
            huge::usable(s)
        } else {
            (*s).npages << PAGE_SHIFT
        }
    }
}

/// realloc with glibc's semantics: null `p` allocates; size 0 frees and
/// returns null; on failure `p` is unchanged and null is returned.
///
/// # Safety
/// `p` is null or a live allocation of this allocator.
pub unsafe fn realloc(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: caller contract.
        unsafe { free(p) };
        return ptr::null_mut();
    }
    let c = pagemap::class_of_addr(p as usize);
    let old = if c != 0 {
        size_class::size_of_class(c)
    } else {
        let s = checked_span("realloc", p);
        // SAFETY: a live large or huge span holding p.
        unsafe {
            if (*s).state == span::HUGE {
                if size > HUGE_THRESHOLD {
                    if (*s).sampled {
                        // The object may move: its sample ends here.
                        sampler::profalloc_sample_free(p.cast());
                        crate::preload::sampled_free(p, false);
                        (*s).sampled = false;
                    }
                    let q = huge::resize(s, size);
                    if q.is_null() {
                        os::set_enomem();
                    }
                    return q;
                }
                huge::usable(s)
            } else {
                (*s).npages << PAGE_SHIFT
            }
        }
    };
    // Keep the object when the new size fits and wastes at most half.
    if size <= old && size >= old / 2 {
        return p;
    }
    // Growing: take at least 25% more, so that a buffer grown by small
    // appends is copied O(log n) times, not once per size class or page.
    let q = if size > old {
        let amortized = size.max(old + old / 4);
        let q = malloc(amortized);
        if q.is_null() { malloc(size) } else { q }
    } else {
        malloc(size)
    };
    if q.is_null() {
        return q;
    }
    // SAFETY: both hold at least min(old, size) bytes and do not overlap.
    unsafe {
        ptr::copy_nonoverlapping(p, q, old.min(size));
        free(p);
    }
    q
}

/// malloc_trim: flushes this thread's cache and the transfer caches, and
/// gives every free page back to the OS. Returns the bytes released.
pub fn trim() -> usize {
    let tc = tls();
    // SAFETY: tc is this thread's cache; busy guards the flush.
    unsafe {
        if (*tc).busy == 0 && (*tc).state == ACTIVE {
            (*tc).busy = 1;
            compiler_fence(Ordering::SeqCst);
            thread_cache::flush(tc);
            compiler_fence(Ordering::SeqCst);
            (*tc).busy = 0;
        }
    }
    central::drain_transfer_caches();
    page_heap::release_all()
}

/// Frees deferred by re-entrant calls, linked through their first word.
static DEFERRED: AtomicPtr<u8> = AtomicPtr::new(ptr::null_mut());

/// The span of a non-small pointer, or an abort naming the misuse.
fn checked_span(what: &str, p: *mut u8) -> *mut span::Span {
    let s = pagemap::span(p as usize >> PAGE_SHIFT);
    if s.is_null() {
        os::fatal(
            what,
            p as usize,
            "invalid pointer (not allocated by profalloc: not in the page map)",
        );
    }
    // SAFETY: the page map only holds live span records.
    unsafe {
        match (*s).state {
            span::LARGE if (*s).start_addr() == p as usize => s,
            span::HUGE if huge::user(s) == p as usize => s,
            span::FREE => os::fatal(
                what,
                p as usize,
                "double free (the object's pages are free)",
            ),
            _ => os::fatal(
                what,
                p as usize,
                "invalid pointer (not the start of an allocation)",
            ),
        }
    }
}

// The slow paths are `extern "C"` so that they cannot unwind: the fast
// paths can then tail-call them (no frame, no landing pad).
#[cold]
#[inline(never)]
unsafe extern "C" fn alloc_slow(size: usize, c: usize, align: usize, counted: bool) -> *mut u8 {
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
        } else if !counted {
            (*tc).countdown -= size.min(isize::MAX as usize) as isize;
        }
        let p = if sampler::RECORD_ALL.load(Ordering::Relaxed) && (*tc).state == ACTIVE {
            alloc_recorded(size, c, align)
        } else if (*tc).countdown < 0 {
            let rate = sampler::rate();
            (*tc).countdown = sampler::next_distance(&mut (*tc).rng, rate);
            if rate != 0 && (*tc).state == ACTIVE {
                alloc_sampled(size, align, rate)
            } else if c != 0 {
                refill(tc, c)
            } else {
                alloc_large(size, align, false)
            }
        } else if c != 0 {
            refill(tc, c)
        } else {
            alloc_large(size, align, false)
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

/// Pops from the class's list, refilling it from the middle tier first
/// when empty (and growing its length limit: slow start).
///
/// # Safety
/// `tc` is this thread's cache, busy set.
unsafe fn refill(tc: *mut ThreadCache, c: usize) -> *mut u8 {
    // SAFETY: the owner thread works on its own list.
    unsafe {
        let list = &mut (*tc).lists[c];
        if !list.head.is_null() {
            let head = list.head;
            list.head = *head.cast::<*mut u8>();
            let len = list.len.load(Ordering::Relaxed);
            list.len.store(len - 1, Ordering::Relaxed);
            return head;
        }
        if (*tc).state == DEAD {
            let (head, n) = central::remove_range(c, 1);
            return if n == 0 { ptr::null_mut() } else { head };
        }
        let batch = BATCH[c] as u32;
        if list.max_len < batch {
            list.max_len += 1;
        } else {
            list.max_len = (list.max_len + batch).min(size_class::max_cached(c));
        }
        let want = list.max_len.min(batch) as usize;
        let (head, n) = central::remove_range(c, want);
        if n == 0 {
            return ptr::null_mut();
        }
        list.head = *head.cast::<*mut u8>();
        list.len.store(n as u32 - 1, Ordering::Relaxed);
        head
    }
}

/// A large object from the page heap, or a huge mapping.
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

/// An allocation under [`sampler::RECORD_ALL`]: where it would go anyway
/// (a small object straight from the class's central list, so that the
/// thread's list never fills and every free of the class takes the slow
/// path), recorded with weight = size and reported to the hook.
fn alloc_recorded(size: usize, c: usize, align: usize) -> *mut u8 {
    let p = if c != 0 {
        let (head, n) = central::remove_range(c, 1);
        if n == 0 { ptr::null_mut() } else { head }
    } else {
        alloc_large(size, align, true)
    };
    if !p.is_null() {
        stats::SAMPLED.add(1);
        sampler::profalloc_sample_alloc(p.cast(), size, size as u64);
        crate::preload::sampled_alloc(p, size, size as u64);
    }
    p
}

/// A sampled allocation: on its own span, reported to the hook.
fn alloc_sampled(size: usize, align: usize, rate: u64) -> *mut u8 {
    let p = alloc_large(size, align, true);
    if !p.is_null() {
        stats::SAMPLED.add(1);
        let weight = sampler::weight(size, rate);
        sampler::profalloc_sample_alloc(p.cast(), size, weight);
        crate::preload::sampled_alloc(p, size, weight);
    }
    p
}

fn reentrant_alloc(size: usize, align: usize) -> *mut u8 {
    let p = huge::alloc(size, align, false);
    if p.is_null() {
        os::set_enomem();
    }
    p
}

#[cold]
#[inline(never)]
unsafe extern "C" fn free_slow(p: *mut u8) {
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
                init_thread(tc);
            }
            let list = &mut (*tc).lists[c];
            if list.head == p {
                os::fatal(
                    "free",
                    p as usize,
                    "double free (the object is already free)",
                );
            }
            if sampler::RECORD_ALL.load(Ordering::Relaxed) {
                // Every object was recorded (see `alloc_recorded`).
                sampler::profalloc_sample_free(p.cast());
                crate::preload::sampled_free(p, false);
                *p.cast::<*mut u8>() = ptr::null_mut();
                central::insert_range(c, p, 1);
            } else if (*tc).state == DEAD {
                *p.cast::<*mut u8>() = ptr::null_mut();
                central::insert_range(c, p, 1);
            } else {
                *p.cast::<*mut u8>() = list.head;
                list.head = p;
                let len = list.len.load(Ordering::Relaxed) + 1;
                list.len.store(len, Ordering::Relaxed);
                let batch = BATCH[c] as u32;
                if list.max_len < batch {
                    // Slow start: let the list grow before giving back.
                    list.max_len += 1;
                }
                if len > list.max_len {
                    release_batch(list, c, batch.min(len) as usize);
                }
            }
        }
        drain_deferred();
        compiler_fence(Ordering::SeqCst);
        (*tc).busy = 0;
    }
}

/// Gives `n` objects from the head of `list` to the middle tier.
///
/// # Safety
/// `list` is this thread's list of class `c` with at least `n` objects.
unsafe fn release_batch(list: &mut thread_cache::FreeList, c: usize, n: usize) {
    let head = list.head;
    let mut tail = head;
    // SAFETY: the list holds at least n linked objects.
    unsafe {
        for _ in 1..n {
            tail = *tail.cast::<*mut u8>();
        }
        list.head = *tail.cast::<*mut u8>();
        *tail.cast::<*mut u8>() = ptr::null_mut();
        let len = list.len.load(Ordering::Relaxed);
        list.len.store(len - n as u32, Ordering::Relaxed);
        central::insert_range(c, head, n);
    }
}

/// Frees a large, huge or sampled object.
///
/// # Safety
/// busy is set; `p` is not a small object.
unsafe fn free_large(p: *mut u8) {
    let s = checked_span("free", p);
    // SAFETY: a live large or huge span whose object is p.
    unsafe {
        if (*s).sampled {
            sampler::profalloc_sample_free(p.cast());
            crate::preload::sampled_free(p, false);
        }
        if (*s).state == span::HUGE {
            huge::free(s);
        } else {
            page_heap::deallocate(s);
        }
    }
}

/// A free on a thread already inside a slow path: huge objects are
/// unmapped right away (no lock); others wait on a lock-free list.
///
/// # Safety
/// `p` is a live allocation of ours.
unsafe fn reentrant_free(p: *mut u8) {
    if pagemap::class_of_addr(p as usize) == 0 {
        let s = checked_span("free", p);
        // SAFETY: a live span; huge objects need no lock.
        unsafe {
            if (*s).state == span::HUGE {
                if (*s).sampled {
                    sampler::profalloc_sample_free(p.cast());
                    crate::preload::sampled_free(p, true);
                }
                return huge::free(s);
            }
        }
    }
    let mut head = DEFERRED.load(Ordering::Relaxed);
    loop {
        // SAFETY: p is free memory of at least 16 bytes.
        unsafe { *p.cast::<*mut u8>() = head };
        match DEFERRED.compare_exchange_weak(head, p, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// Frees what re-entrant calls deferred (straight to the middle tier).
///
/// # Safety
/// busy is set.
unsafe fn drain_deferred() {
    if DEFERRED.load(Ordering::Relaxed).is_null() {
        return;
    }
    let mut p = DEFERRED.swap(ptr::null_mut(), Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: deferred objects are ours, linked through their first word.
        unsafe {
            let next = *p.cast::<*mut u8>();
            let c = pagemap::class_of_addr(p as usize);
            if c == 0 {
                free_large(p);
            } else {
                if sampler::RECORD_ALL.load(Ordering::Relaxed) {
                    sampler::profalloc_sample_free(p.cast());
                    crate::preload::sampled_free(p, false);
                }
                *p.cast::<*mut u8>() = ptr::null_mut();
                central::insert_range(c, p, 1);
            }
            p = next;
        }
    }
}

/// Sets up this thread's cache (and, the first time, the allocator).
///
/// # Safety
/// `tc` is this thread's cache, busy set.
unsafe fn init_thread(tc: *mut ThreadCache) {
    global_init();
    // SAFETY: the owner initialises its own cache.
    unsafe {
        (*tc).state = ACTIVE;
        (*tc).rng = (tc as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ now_nanos();
        (*tc).countdown = sampler::next_distance(&mut (*tc).rng, sampler::rate());
        thread_cache::register(tc);
        crate::preload::thread_started();
        if INIT.load(Ordering::Acquire) == INIT_DONE {
            // May call calloc (keys past the first 32): a re-entrant call.
            libc::pthread_setspecific(*KEY.0.get(), tc.cast());
        }
    }
}

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
/// PROFALLOC_STATS=1: write the report at exit.
static STATS_AT_EXIT: AtomicU8 = AtomicU8::new(0);

/// One-time set-up: settings from the environment, the thread-exit key,
/// the fork handlers. Everything else is statically initialised, so
/// allocation works before (and during) this.
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
    read_env();
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

fn env_u64(name: &core::ffi::CStr) -> Option<u64> {
    // SAFETY: getenv does not allocate; the result is a NUL-terminated
    // string or null.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    if v.is_null() {
        return None;
    }
    // SAFETY: non-null getenv result.
    let bytes = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
    let mut n: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if bytes.is_empty() { None } else { Some(n) }
}

fn read_env() {
    if let Some(n) = env_u64(c"PROFALLOC_SAMPLE_BYTES") {
        sampler::profalloc_sample_bytes.store(n, Ordering::Relaxed);
    }
    if let Some(n) = env_u64(c"PROFALLOC_RELEASE_BYTES") {
        page_heap::RELEASE_BYTES.store(n as usize, Ordering::Relaxed);
    }
    if env_u64(c"PROFALLOC_STATS").is_some_and(|v| v != 0) {
        STATS_AT_EXIT.store(1, Ordering::Relaxed);
    }
    crate::preload::init();
}

// Between these handlers this thread holds every lock; `busy` sends any
// allocation in between (glibc's own fork code) down the lock-free
// re-entrant path instead of deadlocking on them.
extern "C" fn before_fork() {
    thread_cache::lock_registry();
    central::lock_all();
    page_heap::LOCK.lock();
    // SAFETY: this thread's cache; only its owner writes `busy`.
    unsafe { (*tls()).busy += 1 };
}

extern "C" fn after_fork_parent() {
    // SAFETY: as above.
    unsafe { (*tls()).busy -= 1 };
    page_heap::LOCK.unlock();
    central::unlock_all();
    thread_cache::unlock_registry();
}

extern "C" fn after_fork_child() {
    // SAFETY: as above.
    unsafe { (*tls()).busy -= 1 };
    page_heap::LOCK.reset();
    central::reset_all();
    thread_cache::reset_registry_in_child();
}

extern "C" fn report_at_exit() {
    crate::preload::at_exit();
    if STATS_AT_EXIT.load(Ordering::Relaxed) != 0 {
        stats::write_report();
    }
}

#[used]
#[unsafe(link_section = ".fini_array")]
static REPORT_AT_EXIT: extern "C" fn() = report_at_exit;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_aligned_sized_and_distinct() {
        let mut ptrs = Vec::new();
        for size in [
            0usize,
            1,
            15,
            16,
            17,
            100,
            1000,
            1024,
            1025,
            5000,
            65536,
            262144,
            262145,
            2 << 20,
        ] {
            let p = malloc(size);
            assert!(!p.is_null());
            assert_eq!(p as usize % 16, 0);
            // SAFETY: p is a live allocation of at least `size` bytes.
            unsafe {
                assert!(usable_size(p) >= size);
                p.write_bytes(0xab, size);
            }
            ptrs.push((p, size));
        }
        for (p, _) in ptrs {
            // SAFETY: live allocations.
            unsafe { free(p) };
        }
    }

    #[test]
    fn memalign_honours_big_alignments() {
        for align in [32usize, 64, 4096, 8192, 16384, 1 << 21] {
            for size in [1usize, 100, 5000, 300_000, 3 << 20] {
                let p = memalign(align, size);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "align {align} size {size}");
                // SAFETY: live allocation.
                unsafe {
                    assert!(usable_size(p) >= size);
                    p.write_bytes(1, size);
                    free(p);
                }
            }
        }
    }

    #[test]
    fn realloc_keeps_data_and_follows_glibc() {
        // SAFETY: pointers come from this allocator and are used once.
        unsafe {
            let mut p = malloc(10);
            for i in 0..10 {
                *p.add(i) = i as u8;
            }
            for size in [100usize, 5000, 300_000, 3 << 20, 9 << 20, 50, 20] {
                p = realloc(p, size);
                assert!(!p.is_null());
                for i in 0..10 {
                    assert_eq!(*p.add(i), i as u8, "size {size}");
                }
            }
            assert!(realloc(p, 0).is_null());
            let q = realloc(ptr::null_mut(), 0);
            assert!(!q.is_null());
            free(q);
        }
    }

    #[test]
    fn calloc_checks_overflow_and_zeroes() {
        assert!(calloc(usize::MAX, 2).is_null());
        // SAFETY: errno of this thread.
        assert_eq!(unsafe { *libc::__errno_location() }, libc::ENOMEM);
        let p = malloc(512);
        // SAFETY: live allocation.
        unsafe {
            p.write_bytes(0xff, 512);
            free(p);
        }
        let q = calloc(4, 128);
        // SAFETY: 512 zeroed bytes.
        unsafe {
            assert!((0..512).all(|i| *q.add(i) == 0));
            free(q);
        }
        assert!(malloc(usize::MAX - 100).is_null());
    }
}
