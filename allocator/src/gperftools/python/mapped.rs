//! Pages a walk may read directly, without a system call.
//!
//! The fault-safe read ([`super::read`]) costs a process_vm_readv, most of
//! it per page pinned (about 2 us a page here): a walk through a few
//! frames and their code objects touches five to eight pages. A thread's
//! walks read the same pages again and again (its thread state, stack,
//! frames and the code objects it runs), so each thread keeps the pages
//! its earlier walks read successfully ([`PageCache`]) and reads those
//! directly. That is safe while none of them has been unmapped since,
//! which libprofalloc.so knows: it exports `munmap` (the loader binds
//! every call through the PLT, Python's arenas and frame chunks included,
//! to the first definition, ours under `LD_PRELOAD`), and [`unmapping`]
//!
//! - waits, before unmapping, until no walk is reading directly, and makes
//!   walks that start meanwhile read through the system call only;
//! - then counts the unmap in [`EPOCH`]: a thread's pages are forgotten at
//!   its next walk when the epoch has moved since they were read.
//!
//! So a page is read directly only when no unmap completed since a system
//! call read it, and none can run while it is read. Only pages of walks
//! that passed every check are kept (a garbage pointer's page never is).
//! Unmaps that bypass the PLT (glibc's own, of thread stacks it caches or
//! of objects dlclose unloads) reach none of these pages: a thread's pages
//! are its own stack, its frames and live code objects.
//!
//! Where munmap is not ours (libprofalloc linked rather than preloaded,
//! the allocator as a Rust global allocator), every read is a system call.
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

/// Unmaps completed through [`unmapping`].
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// Unmaps waiting for readers or under way.
static UNMAPPING: AtomicU64 = AtomicU64::new(0);
/// Walks reading directly (or entitled to), process-wide.
static READERS: AtomicU64 = AtomicU64::new(0);
/// Every munmap of the process goes through [`unmapping`].
static HOOKED: AtomicBool = AtomicBool::new(false);

/// Pages kept per thread (a power of two).
pub(crate) const PAGES: usize = 64;
const PAGE_SHIFT: u32 = 12;

/// Turns direct reads on: munmap is libprofalloc's.
pub(crate) fn hooked() {
    HOOKED.store(true, SeqCst);
}

/// Runs `unmap` (the system call) once no walk reads directly. A signal
/// handler that unmaps while its thread is inside a walk does not wait for
/// that walk (it would wait forever): the walk finds the epoch moved
/// before its next direct read ([`PageCache::covers`]) and reads through
/// the system call from then on.
pub fn unmapping<T>(unmap: impl FnOnce() -> T) -> T {
    UNMAPPING.fetch_add(1, SeqCst);
    // SAFETY: this thread's counter.
    let own = unsafe { *walks_here() };
    while READERS.load(SeqCst) > own {
        core::hint::spin_loop();
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
    let r = unmap();
    EPOCH.fetch_add(1, SeqCst);
    UNMAPPING.fetch_sub(1, SeqCst);
    r
}

/// In a forked child only the forking thread runs: no walk is under way.
pub(crate) fn after_fork_child() {
    READERS.store(0, SeqCst);
    UNMAPPING.store(0, SeqCst);
    EPOCH.fetch_add(1, SeqCst);
}

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".globl __profalloc_python_in_walk",
    ".hidden __profalloc_python_in_walk",
    ".p2align 3",
    ".type __profalloc_python_in_walk,@object",
    ".size __profalloc_python_in_walk, 8",
    "__profalloc_python_in_walk:",
    ".zero 8",
    ".popsection",
);

/// The calling thread's count of walks under way (nested by signals).
#[cfg(target_arch = "x86_64")]
fn walks_here() -> *mut u64 {
    let p: usize;
    // SAFETY: reads the thread pointer and the symbol's TLS offset from
    // the GOT (initial-exec model); no memory is written.
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + __profalloc_python_in_walk@GOTTPOFF]",
            p = out(reg) p,
            options(pure, readonly, nostack),
        );
    }
    p as *mut u64
}

#[cfg(not(target_arch = "x86_64"))]
fn walks_here() -> *mut u64 {
    std::thread_local! {
        static N: core::cell::UnsafeCell<u64> = const { core::cell::UnsafeCell::new(0) };
    }
    N.with(|c| c.get())
}

/// A walk's right to read its thread's kept pages directly; dropped at
/// the walk's end.
pub(crate) struct Readers {
    /// Direct reads allowed (no unmap waiting or under way).
    pub direct: bool,
    hooked: bool,
}

impl Readers {
    /// Enters a walk; `cache` is forgotten when an unmap completed since
    /// its pages were read.
    pub(crate) fn enter(cache: &mut PageCache) -> Self {
        if !HOOKED.load(SeqCst) {
            return Self {
                direct: false,
                hooked: false,
            };
        }
        // READERS first, the thread's own count after (and the reverse on
        // leaving): the own count never exceeds what READERS holds for
        // this thread, so an unmap never skips another thread's walk.
        READERS.fetch_add(1, SeqCst);
        // SAFETY: this thread's counter; signal handlers nest and undo.
        unsafe { *walks_here() += 1 };
        let direct = UNMAPPING.load(SeqCst) == 0;
        let epoch = EPOCH.load(SeqCst);
        if cache.epoch != epoch {
            cache.clear(epoch);
        }
        Self {
            direct,
            hooked: true,
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        if self.hooked {
            // SAFETY: as in enter.
            unsafe { *walks_here() -= 1 };
            READERS.fetch_sub(1, SeqCst);
        }
    }
}

/// A thread's pages read successfully since the epoch it names: a
/// set-associative table ([`WAYS`] pages a set, replaced in turn), so a
/// look-up is a few compares and two pages a walk needs rarely evict each
/// other.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct PageCache {
    epoch: u64,
    /// Page numbers (0: free), by set.
    pages: [[u64; WAYS]; SETS],
    /// The way each set replaces next.
    victim: [u8; SETS],
}

const WAYS: usize = 4;
const SETS: usize = PAGES / WAYS;

impl PageCache {
    #[cfg(any(test, not(target_arch = "x86_64")))]
    pub(crate) const EMPTY: PageCache = PageCache {
        epoch: 0,
        pages: [[0; WAYS]; SETS],
        victim: [0; SETS],
    };

    fn clear(&mut self, epoch: u64) {
        self.pages = [[0; WAYS]; SETS];
        self.epoch = epoch;
    }

    /// Every page of `[addr, addr + len)` is kept, and no unmap completed
    /// since (one in a signal handler that interrupted this walk).
    pub(crate) fn covers(&self, addr: u64, len: usize) -> bool {
        if EPOCH.load(SeqCst) != self.epoch {
            return false;
        }
        let (first, last) = pages_of(addr, len);
        (first..=last).all(|p| self.pages[set(p)].contains(&p))
    }

    /// Keeps the pages of `[addr, addr + len)`.
    pub(crate) fn keep(&mut self, addr: u64, len: usize) {
        let (first, last) = pages_of(addr, len);
        for p in first..=last {
            let s = set(p);
            if !self.pages[s].contains(&p) {
                let way = self.victim[s] as usize % WAYS;
                self.pages[s][way] = p;
                self.victim[s] = (way as u8 + 1) % WAYS as u8;
            }
        }
    }
}

fn set(page: u64) -> usize {
    (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SETS.trailing_zeros())) as usize
}

/// The pages `[addr, addr + len)` spans (first, last).
pub(crate) fn pages_of(addr: u64, len: usize) -> (u64, u64) {
    let end = addr + len.max(1) as u64 - 1;
    (addr >> PAGE_SHIFT, end >> PAGE_SHIFT)
}

#[cfg(test)]
mod tests;
