//! `prof-bpf count`: per-process malloc/free call counters.
//!
//! Map [`COUNTS_MAP`]: `PerCpuHashMap<u32 (tgid), AllocCounts>`. Per-CPU
//! values need no atomics in the probe; user space sums the CPUs.

/// Name of the per-process counter map.
pub const COUNTS_MAP: &str = "ALLOC_COUNTS";
/// Capacity of [`COUNTS_MAP`]: processes counted at once.
pub const COUNTS_MAX_PROCESSES: u32 = 1024;

/// Calls seen for one process on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// Entries into `malloc`.
    pub malloc_calls: u64,
    /// Sum of the sizes requested from `malloc`.
    pub malloc_bytes: u64,
    /// Entries into `free`, including `free(NULL)`.
    pub free_calls: u64,
}

const _: () = assert!(core::mem::size_of::<AllocCounts>() == 24);

crate::impl_pod!(AllocCounts);
