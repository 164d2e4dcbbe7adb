//! When the page heap gives free pages back to the OS unasked (the policy;
//! `page_heap` applies it under its lock). Decisions are taken on the page
//! heap's own calls, which are the slowest paths, with a coarse clock read
//! (vDSO, no syscall), and by the idle-release thread
//! (`page_heap::background`) while the program makes no call.
//!
//! Two rules, compared with the peers:
//! - Age (jemalloc's dirty-page decay, in steps): the heap's life is cut
//!   into epochs, ended by [`EPOCH_NS`] of time or by [`epoch_credit`]
//!   bytes freed into the heap (gperftools' release on the free path: the
//!   release rate, or the heap in use when larger, since a heap that frees
//!   less than its own size is reusing its pages, not leaving them); a
//!   span that stayed free for two whole epochs goes back. A program that
//!   freed memory and keeps running gets it back within two epochs.
//! - Size, by construction: the resident free pages never stay above
//!   [`resident_free_limit`] (as many as the pages in use, at least
//!   [`FREE_FLOOR_PAGES`]) after a free; past it the heap releases down to
//!   half the limit, largest spans first. A program that frees most of its
//!   heap and then goes idle (calls nothing) holds at most as much free as
//!   its live data beside it even without the idle-release thread (between
//!   half and all of it: where the frees stop between two releases); the
//!   age rule and that thread take it within 1.2x of the live data in
//!   seconds.
//!
//! Churn keeps its spans: they are reused (LIFO) long before they are two
//! epochs old, and the limit leaves room for the free pages a working set
//! of the current size moves through: a program whose phases free most of
//! one phase's objects and allocate as many again (a compiler's passes,
//! the bench's fragmentation workload) reuses them instead of paying an
//! `madvise` and a page fault for each page. With a sixteenth of the pages
//! in use as the limit and 16 MiB as the credit, that workload made 1,635
//! `madvise` calls and 37.4k page faults (mimalloc 31.5k, releasing
//! nothing during it); with these, none and 33.7k.
use crate::size_class::PAGE_SHIFT;

/// Longest an epoch lasts.
pub(crate) const EPOCH_NS: u64 = 1_000_000_000;
/// Resident free pages kept whatever the heap's size (4 MiB).
pub(crate) const FREE_FLOOR_PAGES: usize = (4 << 20) >> PAGE_SHIFT;

/// The most resident free pages kept beside `in_use` pages in use.
pub(crate) fn resident_free_limit(in_use: usize) -> usize {
    in_use.max(FREE_FLOOR_PAGES)
}

/// Pages freed into the heap that end an epoch: the release rate `rate`
/// (pages), or the `in_use` pages when more.
pub(crate) fn epoch_credit(rate: usize, in_use: usize) -> usize {
    rate.max(in_use)
}

/// Pages to release now that `free` resident pages are free beside
/// `in_use` in use: down to half the limit once past it (so that a heap at
/// its limit does not pay a release per free), else none.
pub(crate) fn excess_pages(free: usize, in_use: usize) -> usize {
    let limit = resident_free_limit(in_use);
    if free > limit { free - limit / 2 } else { 0 }
}

/// Whether the epoch that began at `start` is over at `now` (nanoseconds of
/// the same clock).
pub(crate) fn epoch_over(start: u64, now: u64) -> bool {
    now.saturating_sub(start) >= EPOCH_NS
}

/// A monotonic clock, coarse (a few ms) and cheap.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_the_pages_in_use_above_the_floor() {
        assert_eq!(resident_free_limit(0), FREE_FLOOR_PAGES);
        assert_eq!(resident_free_limit(FREE_FLOOR_PAGES / 2), FREE_FLOOR_PAGES);
        assert_eq!(resident_free_limit(160_000), 160_000);
    }

    #[test]
    fn past_the_limit_the_heap_releases_to_half_of_it() {
        // 1.6 GiB in use at first, 90% freed: the limit is the 160 MiB
        // still in use (20480 pages) and the heap keeps 80 MiB of the
        // 1440 MiB freed: 1.5x the live bytes right after this release,
        // up to 2x as later frees add to it, until the age rule runs.
        let in_use = (160 << 20) >> PAGE_SHIFT;
        let freed = (1440 << 20) >> PAGE_SHIFT;
        let limit = resident_free_limit(in_use);
        assert_eq!(limit, 20480);
        assert_eq!(excess_pages(freed, in_use), freed - 10240);
        assert_eq!(excess_pages(limit, in_use), 0);
        assert_eq!(excess_pages(limit + 1, in_use), limit + 1 - 10240);
    }

    #[test]
    fn an_epoch_ends_after_the_rate_or_the_heap_in_use_was_freed() {
        assert_eq!(epoch_credit(2048, 100), 2048);
        assert_eq!(epoch_credit(2048, 10_000), 10_000);
    }

    #[test]
    fn an_epoch_lasts_a_second_and_the_clock_moves_forward() {
        assert!(!epoch_over(5, 5 + EPOCH_NS - 1));
        assert!(epoch_over(5, 5 + EPOCH_NS));
        assert!(!epoch_over(10, 3), "a clock read before the start");
        let a = now_ns();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = now_ns();
        assert!(b > a && b - a >= 20_000_000, "{a} {b}");
    }
}
