//! The allocator's entry points: malloc, free and the rest of the family
//! as Rust functions, with their fast paths and the slow paths behind them.
//! The C ABI (`libprofalloc.so`, package `profalloc-preload`) and
//! [`crate::ProfAlloc`] call these.
//!
//! - [`fast_path`]: `malloc` and `free` on the thread cache.
//! - [`slow_path`]: everything the fast paths fall through to.
//! - [`family`]: memalign, calloc, realloc, malloc_usable_size, malloc_trim.
//! - [`reentrant`]: calls on a thread already inside a slow path.
//! - [`lifecycle`]: start-up, thread set-up, fork, exit.
//!
//! SYNCHRONIZATION (after tcmalloc):
//! - thread caches: no lock; only the owner thread touches its lists.
//! - transfer cache and central list of a class: one lock each.
//! - page heap: one lock; may be taken with a central lock held.
//! - page map: lock-free reads; see `pagemap`.
//! - huge objects: no lock; see `huge`.
//! - sampler and gperftools mode: reached only after the slow path's own
//!   work, with no allocator lock held; their tables have their own lock.
//! - re-entrancy: a thread inside a slow path has `busy` set; a nested
//!   call on the same thread (signal handler, or glibc calling malloc from
//!   pthread_setspecific/pthread_atfork during initialisation) allocates a
//!   huge mapping and defers frees to a lock-free list, so it never waits
//!   for a lock its own thread holds.
mod family;
mod fast_path;
mod lifecycle;
mod reentrant;
mod slow_path;

pub(crate) use family::recorded_block_at;
pub use family::{calloc, memalign, realloc, trim, usable_size};
pub use fast_path::{free, malloc};

use crate::{huge, os, pagemap, size_class::PAGE_SHIFT, span};

/// Objects larger than this get their own mapping (and grow with mremap).
pub const HUGE_THRESHOLD: usize = 1 << 20;

/// The span of a non-small pointer, or an abort naming the misuse.
#[unsafe(link_section = ".text.hot.profalloc")]
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

#[cfg(test)]
mod tests {
    use core::ptr;

    use super::*;
    use crate::{
        pagemap,
        size_class::{MAX_SMALL, PAGE_SHIFT, PAGE_SIZE},
        span,
    };

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

    /// A buffer grown by small appends past 256 KiB lives in a mapping of
    /// its own, grown by a quarter at a time: appends that fit it keep the
    /// object where it is, and the data follows every move.
    #[test]
    fn realloc_grows_large_buffers_in_mappings_of_their_own() {
        // SAFETY: pointers come from this allocator and are used once.
        unsafe {
            let mut p = malloc(200 << 10);
            p.write_bytes(7, 200 << 10);
            let mut len = 200 << 10;
            let mut moves = 0;
            while len < (3 << 20) {
                let q = realloc(p, len + 4096);
                assert!(!q.is_null());
                assert_eq!(*q.add(len - 1), 7);
                q.add(len).write_bytes(7, 4096);
                len += 4096;
                if q != p {
                    moves += 1;
                    if len > family::MOVE_TO_HUGE {
                        let s = pagemap::span(q as usize >> PAGE_SHIFT);
                        assert_eq!((*s).state, span::HUGE, "at {len}");
                    }
                }
                p = q;
            }
            // Two moves to reach a mapping of its own (a larger class,
            // then past 256 KiB), then steps of at least 25% up to 3 MiB
            // (at most 10): at most 12 moves, not one per 4 KiB (700).
            assert!(moves <= 12, "{moves} moves");
            assert!(usable_size(p) >= len);
            free(p);
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

    #[test]
    fn calloc_zeroes_a_large_object_on_pages_used_before() {
        // Large (page heap), not huge: calloc clears it unless its pages
        // were not resident; a span just freed after use is, and is the
        // one the next allocation of its length most likely gets.
        let size = MAX_SMALL + 3 * PAGE_SIZE;
        for _ in 0..4 {
            let p = malloc(size);
            // SAFETY: live allocation of `size` bytes.
            unsafe {
                p.write_bytes(0xff, size);
                free(p);
            }
            let q = calloc(1, size);
            // SAFETY: `size` bytes, zeroed.
            unsafe {
                assert!((0..size).all(|i| *q.add(i) == 0));
                free(q);
            }
        }
    }
}
