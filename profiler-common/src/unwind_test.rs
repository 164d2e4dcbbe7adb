//! The walker's own test programs (`unwind_test_uprobe`, `unwind_test_perf`).
//!
//! Map [`TEST_COUNTS_MAP`]: `HashMap<u64 (user stack id), u64 (times seen)>`;
//! the key [`TEST_STACK_FAILED`] counts samples whose stack was not stored.

/// Name of the count map.
pub const TEST_COUNTS_MAP: &str = "UNWIND_TEST_COUNTS";
/// Capacity of [`TEST_COUNTS_MAP`].
pub const TEST_COUNTS_MAX: u32 = 16384;
/// Key counting samples whose stack could not be stored.
pub const TEST_STACK_FAILED: u64 = u64::MAX;
