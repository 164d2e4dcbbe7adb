//! The budget of the thread caches: every thread's capacity (the bytes its
//! list limits allow, `Σ max_len × class size`) is reserved from one total
//! (`PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`, default 32 MiB), and no
//! thread reserves more than [`PER_THREAD_MAX`]. Since a list never holds
//! more objects than its limit, the bytes cached in all threads stay within
//! the total. Limits grow only in slow paths, so the fast paths pay nothing.
//!
//! Each thread also has a limit of its own that starts at [`START_LIMIT`]
//! and grows with demand, as in gperftools: a list that wants to grow past
//! it first takes room from the thread's largest other list (halving it),
//! and the limit rises by [`LIMIT_STEP`], up to [`PER_THREAD_MAX`]. A
//! thread that allocates a little keeps a little; only one whose lists
//! keep asking for more grows toward the maximum.
//!
//! Big objects (over [`BIG_OBJECT_SIZE`]) have a share of their own in each
//! thread, [`BIG_LISTS_BYTES`]: a list of them that wants more than the
//! share leaves empties the thread's largest other big lists first (see
//! [`make_big_room`]).
//!
//! A thread that finds the budget spent takes capacity back from its own
//! largest other list (its limit halves and its excess goes to the central
//! tier); failing that, it steals from an idle thread (one that ran no
//! slow path for [`IDLE_NS`]), as gperftools does. Only a thread's lists
//! touch its objects, so what is stolen is *headroom*: capacity its lists
//! do not fill (`capacity - debt - cached`). (The objects an idle thread
//! caches stay until it runs again: taking them would need the owner
//! stopped, e.g. a claim on its `busy` flag made safe by membarrier.) The thief's capacity grows,
//! the victim's `debt` grows by as much, and the victim shrinks its lists
//! by its debt on its next slow path. A cache's share of the total is
//! `capacity - debt`, and the shares never pass the total. The cached
//! bytes stay within it too: a victim holds no more than its share while
//! idle, and once back it may fill the headroom it lost only until its
//! next slow path (a list at its limit or empty) pays the debt. A thread
//! that exits gives its share back.
//!
//! Lock: none for the total (one atomic counter); stealing walks the
//! registry of caches under its lock.
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{
    decay,
    size_class::{self, NUM_CLASSES},
    thread_cache::{self, ACTIVE, Central, ThreadCache},
};

/// A thread that ran no slow path for this long is idle.
pub(crate) const IDLE_NS: u64 = 100_000_000;
/// After a look for a victim found none, the next look waits this long
/// (so a thread at its limit does not walk the registry on every miss).
const STEAL_RETRY_NS: u64 = 10_000_000;

/// The default total of all thread caches.
pub(crate) const DEFAULT_TOTAL: usize = 32 << 20;
/// The most one thread's cache may hold.
pub(crate) const PER_THREAD_MAX: usize = 4 << 20;
/// A new thread's limit.
pub(crate) const START_LIMIT: usize = 256 << 10;
/// How much a thread's limit grows each time a list wants more room than
/// it allows.
pub(crate) const LIMIT_STEP: usize = 64 << 10;

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

/// Past its limit, a list of objects larger than this grows on frees
/// only when the thread also allocates from it (see [`Growth`]).
pub(crate) const FREE_GROWTH_MAX_SIZE: usize = 4 << 10;

/// Objects larger than this are *big*: a thread's lists of big objects
/// share [`BIG_LISTS_BYTES`] (see [`make_big_room`]).
pub(crate) const BIG_OBJECT_SIZE: usize = 1 << 10;
/// The bytes all of a thread's lists of big objects may hold together.
pub(crate) const BIG_LISTS_BYTES: usize = 128 << 10;

/// Why a list asks to grow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Growth {
    /// It ran empty: an allocation missed (demand).
    Refill,
    /// A free found it at its slow-start limit.
    Free,
}

/// The limit list `c` of `tc` may grow to, from `old` toward `wanted`:
/// `wanted` if the budget grants the bytes, after taking back half the
/// limit of this thread's largest other list, or stealing from an idle
/// thread, when the budget is spent; else `old`.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn grant(
    tc: *mut ThreadCache,
    c: usize,
    old: u32,
    wanted: u32,
    why: Growth,
) -> u32 {
    if wanted <= old {
        return old;
    }
    let size = size_class::size_of_class(c);
    let mut bytes = (wanted - old) as usize * size;
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        if size > BIG_OBJECT_SIZE && !make_big_room(tc, c, bytes) {
            return old;
        }
        if share(tc) + bytes > (*tc).limit.load(Ordering::Relaxed) {
            if why == Growth::Free && size > FREE_GROWTH_MAX_SIZE {
                // Frees alone are no demand for large objects: past the
                // limit, the list gives them back one by one (a small
                // cost beside the object's size) instead of keeping
                // them in a thread that may never allocate them again.
                return old;
            }
            bytes = within_limit(tc, c, bytes, size);
            if bytes == 0 {
                return old;
            }
        }
        if !BUDGET.reserve(share(tc), bytes) {
            BUDGET.give_back(shrink_largest_other(tc, c));
            if !BUDGET.reserve(share(tc), bytes) {
                // Whole objects' worth of what an idle thread can spare.
                bytes = steal(tc, bytes, size);
                if bytes == 0 {
                    return old;
                }
            }
        }
        let cap = (*tc).capacity.load(Ordering::Relaxed);
        (*tc).capacity.store(cap + bytes, Ordering::Relaxed);
        if size > BIG_OBJECT_SIZE {
            (*tc).big_capacity += bytes;
        }
        old + (bytes / size) as u32
    }
}

/// The first class of big objects.
fn first_big_class() -> usize {
    size_class::class_of(BIG_OBJECT_SIZE) + 1
}

/// Whether class `c` holds big objects.
pub(crate) fn is_big(c: usize) -> bool {
    size_class::size_of_class(c) > BIG_OBJECT_SIZE
}

/// Makes room for `bytes` more in `tc`'s lists of big objects (class `c`
/// among them) by halving its other big lists in turn (a clock: the lists
/// grown since the hand last passed keep theirs longest); false when they
/// cannot make enough. Why a share of their own: a program that uses many
/// big sizes a few times each (a buffer sized by each file it reads) would
/// otherwise keep some of every size, on pages no other size can use,
/// where a general-purpose heap reuses them for the next size. The others
/// go back to their spans, and a span of one big object to the page heap.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn make_big_room(tc: *mut ThreadCache, c: usize, bytes: usize) -> bool {
    if bytes > BIG_LISTS_BYTES {
        return false;
    }
    let first = first_big_class();
    let count = NUM_CLASSES - first;
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        while (*tc).big_capacity + bytes > BIG_LISTS_BYTES {
            // The next other big list with room to give, from the hand on.
            let hand = (*tc).big_hand.max(first);
            let Some(k) = (0..count)
                .map(|i| first + (hand - first + i) % count)
                .find(|&k| k != c && (*tc).lists[k].max_len > 0)
            else {
                return false;
            };
            (*tc).big_hand = k + 1;
            let old = (*tc).lists[k].max_len;
            BUDGET.give_back(shrink_list(tc, k, old / 2));
        }
    }
    true
}

/// A list of class `c` (objects of `size`) wants `bytes` more than
/// `tc`'s limit allows: makes room by halving the thread's largest other
/// list, and raises the limit a step for the next time (demand). Returns
/// the bytes (whole objects) the list may grow by now.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn within_limit(tc: *mut ThreadCache, c: usize, bytes: usize, size: usize) -> usize {
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        BUDGET.give_back(shrink_largest_other(tc, c));
        let limit = (*tc).limit.load(Ordering::Relaxed);
        let raised = (limit + LIMIT_STEP).min(PER_THREAD_MAX);
        (*tc).limit.fetch_add(raised - limit, Ordering::Relaxed);
        let room = raised.saturating_sub(share(tc));
        bytes.min(room) / size * size
    }
}

/// `tc`'s share of the total.
///
/// # Safety
/// `tc` is a live cache.
unsafe fn share(tc: *const ThreadCache) -> usize {
    // SAFETY: the caller's contract.
    unsafe {
        (*tc)
            .capacity
            .load(Ordering::Relaxed)
            .saturating_sub((*tc).debt.load(Ordering::Relaxed))
    }
}

/// Halves the limit of `tc`'s list with the largest capacity other than
/// `c` (0: any), giving its excess objects to the central tier. Returns the
/// capacity it dropped (the caller decides where those bytes go).
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn shrink_largest_other(tc: *mut ThreadCache, c: usize) -> usize {
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        let cap = |k: usize| (*tc).lists[k].max_len as usize * size_class::size_of_class(k);
        let Some(victim) = (1..NUM_CLASSES).filter(|&k| k != c).max_by_key(|&k| cap(k)) else {
            return 0;
        };
        let old = (*tc).lists[victim].max_len;
        shrink_list(tc, victim, old / 2)
    }
}

/// Lowers the limit of `tc`'s list of class `k` to `new` (at most its
/// limit), giving its excess objects to the central tier. Returns the
/// capacity it dropped.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn shrink_list(tc: *mut ThreadCache, k: usize, new: u32) -> usize {
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        let old = (*tc).lists[k].max_len;
        if new >= old {
            return 0;
        }
        (*tc).lists[k].shrink(&Central, k, new);
        let freed = (old - new) as usize * size_class::size_of_class(k);
        let cap = (*tc).capacity.load(Ordering::Relaxed);
        (*tc).capacity.store(cap - freed, Ordering::Relaxed);
        if is_big(k) {
            (*tc).big_capacity -= freed;
        }
        freed
    }
}

/// Takes up to `bytes` (a multiple of `unit`) of headroom from the idle
/// thread's cache that has the most, for `tc`'s (without reserving from
/// the total: the victim's share drops by as much). Returns the bytes
/// taken, a multiple of `unit`: 0 when no idle cache has `unit` to spare,
/// or `tc` would pass its maximum.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn steal(tc: *mut ThreadCache, bytes: usize, unit: usize) -> usize {
    let now = decay::now_ns();
    // SAFETY: the owner thread works on its own cache; registered caches
    // are live while `any_cache` holds the registry lock, which is held
    // from the choice of the victim to its debt.
    unsafe {
        if share(tc) + bytes > PER_THREAD_MAX.min(BUDGET.total()) || now < (*tc).steal_retry_ns {
            return 0;
        }
        let mut taken = 0;
        thread_cache::any_cache_locked(|caches| {
            let mut best: Option<(*mut ThreadCache, usize)> = None;
            for v in caches {
                if v == tc || (*v).state != ACTIVE {
                    continue;
                }
                let last = (*v).last_active_ns.load(Ordering::Relaxed);
                if now.saturating_sub(last) < IDLE_NS {
                    continue;
                }
                // An idle owner changes neither its capacity nor its
                // lists; if it wakes meanwhile, it pays the debt on its
                // next slow path.
                let headroom = share(v).saturating_sub(thread_cache::cached_bytes_of(v));
                if best.is_none_or(|(_, h)| headroom > h) {
                    best = Some((v, headroom));
                }
            }
            if let Some((v, headroom)) = best {
                taken = bytes.min(headroom) / unit * unit;
                (*v).debt.fetch_add(taken, Ordering::Relaxed);
                // Its limit drops by as much (no lower than a new
                // thread's), so that it grows back only under demand.
                let _ = (*v)
                    .limit
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        Some(l.saturating_sub(taken).max(START_LIMIT))
                    });
            }
        });
        if taken == 0 {
            (*tc).steal_retry_ns = now + STEAL_RETRY_NS;
        }
        taken
    }
}

/// On each slow path of an active thread: marks it active, and pays the
/// debt other threads left by shrinking its lists.
///
/// # Safety
/// `tc` is this thread's cache, `busy` set, state ACTIVE.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn on_slow_path(tc: *mut ThreadCache) {
    // SAFETY: the owner thread works on its own cache.
    unsafe {
        (*tc)
            .last_active_ns
            .store(decay::now_ns(), Ordering::Relaxed);
        if (*tc).debt.load(Ordering::Relaxed) == 0 {
            return;
        }
        let debt = (*tc).debt.swap(0, Ordering::Relaxed);
        let mut dropped = 0;
        while dropped < debt {
            let freed = shrink_largest_other(tc, 0);
            if freed == 0 {
                break;
            }
            dropped += freed;
        }
        if dropped >= debt {
            BUDGET.give_back(dropped - debt);
        } else {
            // Not enough left to drop (debts come from headroom, so only
            // if the lists shrank meanwhile): the rest stays owed.
            (*tc).debt.fetch_add(debt - dropped, Ordering::Relaxed);
        }
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

    /// An empty cache (as a new thread's) at the start limit.
    fn new_cache() -> Box<ThreadCache> {
        // SAFETY: all zeroes is a valid, empty cache (the TLS block starts
        // so).
        let tc = unsafe { Box::<ThreadCache>::new_zeroed().assume_init() };
        tc.limit.store(START_LIMIT, Ordering::Relaxed);
        tc
    }

    /// Grants list `c` of `tc` growth to `wanted` objects and sets its
    /// limit to what was granted.
    fn grow(tc: &mut ThreadCache, c: usize, wanted: u32) -> u32 {
        let old = tc.lists[c].max_len;
        // SAFETY: the cache is this test's; its lists are empty, so
        // shrinking them gives nothing to the central tier.
        let new = unsafe { grant(tc, c, old, wanted, Growth::Refill) };
        tc.lists[c].max_len = new;
        new
    }

    #[test]
    fn a_thread_limit_grows_from_its_start_only_under_demand() {
        let (c, d) = (size_class::class_of(1024), size_class::class_of(512));
        let big = size_class::class_of(64 << 10);
        assert_eq!(size_class::size_of_class(c), 1024);
        assert_eq!(size_class::size_of_class(d), 512);
        assert_eq!(size_class::size_of_class(big), 64 << 10);
        let mut tc = new_cache();
        let limit = |tc: &ThreadCache| tc.limit.load(Ordering::Relaxed);
        // Up to the limit: granted, the limit stays.
        assert_eq!(grow(&mut tc, d, 64), 64);
        assert_eq!(grow(&mut tc, c, 224), 224);
        assert_eq!(tc.capacity.load(Ordering::Relaxed), START_LIMIT);
        assert_eq!(limit(&tc), START_LIMIT);
        // A refill past it: the other list halves (16 KiB), the limit
        // rises one step, and the list gets what it asked for.
        assert_eq!(grow(&mut tc, c, 240), 240);
        assert_eq!(tc.lists[d].max_len, 32);
        assert_eq!(limit(&tc), START_LIMIT + LIMIT_STEP);
        // Up to the new limit: granted, the limit stays.
        assert_eq!(grow(&mut tc, c, 304), 304);
        assert_eq!(
            tc.capacity.load(Ordering::Relaxed),
            START_LIMIT + LIMIT_STEP
        );
        assert_eq!(limit(&tc), START_LIMIT + LIMIT_STEP);
        // A free of a large object past it is no demand: refused.
        // SAFETY: the cache is this test's.
        let granted = unsafe { grant(&mut *tc, big, 0, 1, Growth::Free) };
        assert_eq!(granted, 0);
        assert_eq!(limit(&tc), START_LIMIT + LIMIT_STEP);
        // A refill of it is: the largest other list halves, the limit
        // rises another step.
        assert_eq!(grow(&mut tc, big, 1), 1);
        assert_eq!(tc.lists[c].max_len, 152);
        assert_eq!(limit(&tc), START_LIMIT + 2 * LIMIT_STEP);
        BUDGET.give_back(tc.capacity.load(Ordering::Relaxed));
    }

    #[test]
    fn big_objects_share_a_small_part_of_a_thread_cache() {
        let class = |size: usize| {
            let c = size_class::class_of(size);
            assert_eq!(size_class::size_of_class(c), size);
            c
        };
        let (k48, k64, k32) = (class(48 << 10), class(64 << 10), class(32 << 10));
        let mut tc = new_cache();
        assert_eq!(grow(&mut tc, k48, 1), 1);
        assert_eq!(grow(&mut tc, k64, 1), 1);
        assert_eq!(tc.big_capacity, 112 << 10);
        // A third big list past the share: the clock's hand halves the
        // first other big list with room (48 KiB: emptied).
        assert_eq!(grow(&mut tc, k32, 1), 1);
        assert_eq!(tc.lists[k48].max_len, 0);
        assert_eq!(tc.big_capacity, 96 << 10);
        // The next time, the hand has moved on: 64 KiB goes.
        assert_eq!(grow(&mut tc, k48, 1), 1);
        assert_eq!(tc.lists[k64].max_len, 0);
        assert_eq!(tc.big_capacity, 80 << 10);
        // An object larger than the whole share is never kept, and costs
        // the others nothing.
        assert_eq!(grow(&mut tc, class(size_class::MAX_SMALL), 1), 0);
        assert_eq!(tc.lists[k48].max_len + tc.lists[k32].max_len, 2);
        // Objects up to BIG_OBJECT_SIZE are not part of it.
        let small = class(BIG_OBJECT_SIZE);
        assert_eq!(grow(&mut tc, small, 32), 32);
        assert_eq!(
            tc.capacity.load(Ordering::Relaxed),
            (80 << 10) + 32 * BIG_OBJECT_SIZE
        );
        BUDGET.give_back(tc.capacity.load(Ordering::Relaxed));
    }

    #[test]
    fn stealing_from_an_idle_thread_lowers_its_limit() {
        let mut idle = new_cache();
        // Idle since boot, with 4 MiB reserved and nothing cached.
        idle.state = ACTIVE;
        idle.capacity.store(PER_THREAD_MAX, Ordering::Relaxed);
        idle.limit.store(PER_THREAD_MAX, Ordering::Relaxed);
        let idle: *mut ThreadCache = &mut *idle;
        let mut thief = new_cache();
        // SAFETY: both caches are this test's; `idle` leaves the registry
        // before it is dropped.
        unsafe {
            thread_cache::register(idle);
            let taken = steal(&mut *thief, 64 << 10, 1024);
            thread_cache::unregister(idle);
            assert_eq!(taken, 64 << 10);
            assert_eq!((*idle).debt.load(Ordering::Relaxed), 64 << 10);
            assert_eq!(
                (*idle).limit.load(Ordering::Relaxed),
                PER_THREAD_MAX - (64 << 10)
            );
        }
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
