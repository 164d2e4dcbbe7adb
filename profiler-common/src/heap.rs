//! `prof-bpf heap`: live-allocation tracking by uprobes on the allocator.
//!
//! Maps (names are the `*_MAP` constants):
//! - [`LIVE_MAP`]: `HashMap<LiveKey, LiveAlloc>`, one entry per tracked live
//!   allocation; capacity set by the agent (`--max-live`), created without
//!   preallocation so memory follows use.
//! - [`STACK_STATS_MAP`]: `PerCpuHashMap<StackKey, StackStats>`, per-(process,
//!   stack) aggregates updated in the kernel without atomics (one copy per
//!   CPU), summed by the agent when it reads them (no per-event wake-ups).
//! - [`THREADS_MAP`]: `LruHashMap<u64 (pid_tgid), ThreadState>`, per-thread
//!   call depth, the pending outermost call and the sampler's countdown.
//! - [`CONFIG_MAP`]: `Array<HeapConfig>` with one entry written before attach.
//! - [`SAMPLE_INTERVALS_MAP`]: `Array<u64>` of [`SAMPLE_TABLE_LEN`] exponential
//!   intervals in bytes (mean = the sampling rate), precomputed by the agent
//!   because BPF has no floating point.
//! - [`SAMPLE_WEIGHTS_MAP`]: `Array<u64>` of [`WEIGHT_TABLE_LEN`] values of
//!   h(x) = x / (1 - exp(-x)) in [`WEIGHT_ONE`] fixed point at
//!   x = i / [`WEIGHT_STEPS_PER_UNIT`], so that a sampled allocation of size S
//!   at rate N weighs N * h(S/N) = S / (1 - exp(-S/N)) bytes.
//! - [`COUNTERS_MAP`]: `PerCpuArray<u64>` of the [`HeapCounter`] set:
//!   events and losses, summed over CPUs by the agent.
//! - [`MMAP_TARGETS_MAP`]: `LruHashMap<u32 (tgid), u32>`, the processes whose
//!   mappings are tracked (`--mmap`): the syscall tracepoints fire for every
//!   process, uprobes only for the probed ones.
//! - [`MMAP_PENDING_MAP`]: `LruHashMap<u64 (pid_tgid), PendingMapping>`, a
//!   mapping call between its syscall entry and exit.
//!
//! Live blocks and stack totals carry a [`LiveKey::source`]: what made them
//! ([`SOURCE_ALLOCATOR`] or [`SOURCE_MMAP`]). The sources are separate key
//! spaces: free() never retires a mapping, munmap() never a malloc block.

/// Name of the live-allocation map.
pub const LIVE_MAP: &str = "HEAP_LIVE";
/// Name of the per-stack aggregate map.
pub const STACK_STATS_MAP: &str = "HEAP_STACK_STATS";
/// Name of the per-thread state map.
pub const THREADS_MAP: &str = "HEAP_THREADS";
/// Name of the configuration map.
pub const CONFIG_MAP: &str = "HEAP_CONFIG";
/// Name of the sampling-interval table.
pub const SAMPLE_INTERVALS_MAP: &str = "HEAP_SAMPLE_INTERVALS";
/// Name of the sample-weight table.
pub const SAMPLE_WEIGHTS_MAP: &str = "HEAP_SAMPLE_WEIGHTS";
/// Name of the counter map.
pub const COUNTERS_MAP: &str = "HEAP_COUNTERS";
/// Name of the map of processes whose mappings are tracked.
pub const MMAP_TARGETS_MAP: &str = "HEAP_MMAP_TARGETS";
/// Name of the map of mapping calls in progress.
pub const MMAP_PENDING_MAP: &str = "HEAP_MMAP_PENDING";

/// Default capacity of [`LIVE_MAP`] (live allocations tracked at once).
pub const DEFAULT_MAX_LIVE: u32 = 1 << 21;
/// Capacity of [`STACK_STATS_MAP`] (distinct (process, stack) pairs).
pub const DEFAULT_MAX_STACKS: u32 = 1 << 16;
/// Capacity of [`THREADS_MAP`] and [`MMAP_PENDING_MAP`]; least recently
/// used threads are evicted.
pub const MAX_THREADS: u32 = 1 << 14;
/// Capacity of [`MMAP_TARGETS_MAP`]; with `--all`, processes that stopped
/// calling the allocator are evicted first.
pub const MAX_MMAP_TARGETS: u32 = 1 << 14;

/// [`LiveKey::source`] of blocks from the allocator's functions.
pub const SOURCE_ALLOCATOR: u32 = 0;
/// [`LiveKey::source`] of anonymous private mappings (`--mmap`).
pub const SOURCE_MMAP: u32 = 1;

/// Entries of [`SAMPLE_INTERVALS_MAP`] (a power of two: indexed by a random mask).
pub const SAMPLE_TABLE_LEN: u32 = 4096;
/// Entries of [`SAMPLE_WEIGHTS_MAP`]: x from 0 to 16 in steps of 1/64, plus one.
pub const WEIGHT_TABLE_LEN: u32 = 16 * WEIGHT_STEPS_PER_UNIT + 1;
/// Table steps per unit of x = S/N.
pub const WEIGHT_STEPS_PER_UNIT: u32 = 64;
/// Fixed-point one of the weight table and of weighted object counts.
pub const WEIGHT_ONE: u64 = 1 << 16;

/// Stack id used when the user stack could not be captured.
pub const STACK_ID_MISSING: u64 = u64::MAX;

/// What an allocator entry point does, passed to the entry program as the
/// uprobe's attach cookie.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// `malloc(size)`, `valloc(size)`, `pvalloc(size)`, `operator new(size)`,
    /// jemalloc's `mallocx(size, flags)`: size in the first argument.
    Malloc = 0,
    /// `calloc(n, size)`.
    Calloc = 1,
    /// `realloc(ptr, size)`, `rallocx(ptr, size, flags)`.
    Realloc = 2,
    /// `reallocarray(ptr, n, size)`.
    ReallocArray = 3,
    /// `memalign(align, size)`, `aligned_alloc(align, size)`: size second.
    Memalign = 4,
    /// `posix_memalign(&ptr, align, size)`: the result is stored through the
    /// first argument and the return value is 0 on success.
    PosixMemalign = 5,
}

impl EntryKind {
    /// The kind for a cookie value, if it is one.
    pub const fn from_cookie(cookie: u64) -> Option<Self> {
        Some(match cookie {
            0 => Self::Malloc,
            1 => Self::Calloc,
            2 => Self::Realloc,
            3 => Self::ReallocArray,
            4 => Self::Memalign,
            5 => Self::PosixMemalign,
            _ => return None,
        })
    }
}

/// Agent-written settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapConfig {
    /// Mean bytes between samples; 0 tracks every allocation.
    pub sample_bytes: u64,
    /// The agent's own pid, never tracked (it allocates while reading maps,
    /// and `--all` would otherwise profile it).
    pub agent_pid: u32,
    /// 1 with `--all --mmap`: a process becomes a mapping target
    /// ([`MMAP_TARGETS_MAP`]) at its first allocator call.
    pub mmap_new_targets: u32,
}

const _: () = assert!(core::mem::size_of::<HeapConfig>() == 16);

/// Key of [`LIVE_MAP`]: an address in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    /// The allocation's address.
    pub addr: u64,
    /// Process (tgid) that owns it.
    pub pid: u32,
    /// What made it: [`SOURCE_ALLOCATOR`] or [`SOURCE_MMAP`].
    pub source: u32,
}

const _: () = assert!(core::mem::size_of::<LiveKey>() == 16);

/// Value of [`LIVE_MAP`]: one tracked live allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAlloc {
    /// Requested size in bytes.
    pub size: u64,
    /// Estimated bytes this sample stands for (= size when not sampling).
    pub weight_bytes: u64,
    /// Estimated objects this sample stands for, in [`WEIGHT_ONE`] units.
    pub weight_objects: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at allocation.
    pub timestamp_ns: u64,
    /// User stack id in the unwinder's stack map, or [`STACK_ID_MISSING`].
    pub stack_id: u64,
}

const _: () = assert!(core::mem::size_of::<LiveAlloc>() == 40);

/// Key of [`STACK_STATS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// User stack id (see [`LiveAlloc::stack_id`]).
    pub stack_id: u64,
    /// Process (tgid).
    pub pid: u32,
    /// What made the blocks (see [`LiveKey::source`]).
    pub source: u32,
}

const _: () = assert!(core::mem::size_of::<StackKey>() == 16);

/// Value of [`STACK_STATS_MAP`]: totals since attach for one (process, stack).
/// Outstanding = allocated - freed. All fields are estimates when sampling.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Objects allocated, in [`WEIGHT_ONE`] units.
    pub alloc_objects: u64,
    /// Bytes allocated.
    pub alloc_bytes: u64,
    /// Tracked objects freed, in [`WEIGHT_ONE`] units.
    pub free_objects: u64,
    /// Tracked bytes freed.
    pub free_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<StackStats>() == 32);

/// Value of [`THREADS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// Allocator calls in progress on this thread (entries minus returns).
    pub depth: u32,
    /// [`EntryKind`] of the outermost call.
    pub kind: u32,
    /// Requested size of the outermost call.
    pub size: u64,
    /// realloc's old pointer, or posix_memalign's result pointer location.
    pub arg_ptr: u64,
    /// Stack id captured at the outermost call's entry.
    pub stack_id: u64,
    /// 1 when the outermost call is sampled (its result is tracked).
    pub sampled: u32,
    /// 1 once `countdown` holds a drawn interval.
    pub countdown_set: u32,
    /// Bytes left until the next sample (sampling mode only).
    pub countdown: i64,
    /// Stack pointer at the outermost call's entry. An entry whose stack
    /// pointer is not below it cannot be nested in that call, so a return
    /// that was never seen (no uretprobe yet, longjmp) cannot wedge the depth.
    pub entry_sp: u64,
}

const _: () = assert!(core::mem::size_of::<ThreadState>() == 56);

/// What a mapping call in progress is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingCall {
    /// `mmap`: the result is a new mapping of `size` bytes.
    Mmap = 1,
    /// `mremap` of a tracked mapping: on success, `old_len` bytes at
    /// `old_addr` are released and the result is a mapping of `size` bytes.
    Mremap = 2,
    /// `mremap` of an untracked mapping with `MREMAP_FIXED`: on success,
    /// the `size` bytes at the result replaced whatever was mapped there.
    MremapOver = 3,
}

/// Value of [`MMAP_PENDING_MAP`]: a mapping call seen at syscall entry,
/// completed at its exit (where the result address is known).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingMapping {
    /// Bytes of the new mapping (the length rounded up to whole pages).
    pub size: u64,
    /// mremap's old address.
    pub old_addr: u64,
    /// mremap's old length, rounded up to whole pages.
    pub old_len: u64,
    /// Stack id captured at the call.
    pub stack_id: u64,
    /// [`MappingCall`] as a number.
    pub call: u32,
    /// Explicit padding (zero).
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PendingMapping>() == 40);

crate::counter_set! {
    /// Heap events and losses, kept in [`COUNTERS_MAP`].
    pub enum HeapCounter {
        /// Allocation calls seen (outermost calls only).
        Allocs = "allocs",
        /// Calls to a free function seen (including `free(NULL)` and untracked pointers).
        Frees = "frees",
        /// Allocations sampled and tracked.
        Tracked = "tracked",
        /// Tracked allocations lost because [`LIVE_MAP`] was full.
        LiveFull = "live_full",
        /// Allocations whose stack could not be aggregated because
        /// [`STACK_STATS_MAP`] was full.
        StacksFull = "stacks_full",
        /// Allocations whose user stack could not be captured.
        StackErrors = "stack_errors",
        /// Threads whose state could not be stored.
        ThreadsFull = "threads_full",
        /// Anonymous private mappings made (mmap, mremap of a tracked
        /// mapping) outside allocator calls, each tracked (`--mmap`).
        Mmaps = "mmaps",
        /// Anonymous private mappings made inside an allocator call: the
        /// allocator's own (glibc serves big mallocs by mmap), already
        /// counted as the allocation that asked for them.
        MmapsInAllocator = "mmaps_in_allocator",
        /// munmap, mremap and MAP_FIXED mmap calls that released only the front part of a
        /// tracked mapping (the rest stays tracked with its new start and size).
        UnmapsPartial = "unmaps_partial",
        /// USDT probe events dropped: an argument could not be read (its
        /// spec missing, or user memory not readable at the site).
        UsdtArgErrors = "usdt_arg_errors",
    }
}

crate::impl_pod!(
    HeapConfig,
    LiveKey,
    LiveAlloc,
    StackKey,
    StackStats,
    ThreadState,
    PendingMapping
);
