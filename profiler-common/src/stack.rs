//! User and kernel call stacks captured in the kernel (interface B).
//!
//! Map [`USER_STACKS_MAP`]: `HashMap<u64 (stack id), UserStack>`. The id is a
//! hash of the frames, the length and the status, so equal stacks share one
//! entry and user space reads each distinct stack once.
//!
//! Map [`KERNEL_STACKS_MAP`]: the kernel's `StackTrace` map filled by
//! `bpf_get_stackid` (key `u32` stack id, value `[u64; 127]`).
//!
//! Map [`UNWIND_STATS_MAP`]: `PerCpuArray<u64>` indexed by the `STAT_*`
//! constants, so that every stack that ended early can be explained.

/// Deepest user stack recorded; deeper stacks end with [`STACK_TRUNCATED`].
pub const MAX_USER_FRAMES: usize = 127;

/// The walk reached the outermost frame (`_start`, thread start, or a zero
/// return address / frame pointer).
pub const STACK_COMPLETE: u32 = 0;
/// The walk stopped early: the depth limit, or a frame could not be unwound.
pub const STACK_TRUNCATED: u32 = 1;
/// Not even the first frame could be read.
pub const STACK_MISSING: u32 = 2;

/// One user stack, leaf first. `ips[0]` is the sampled pc for a perf event,
/// or the return address at `[rsp]` (the direct caller) for a probe at a
/// function's entry; every later entry is a return address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserStack {
    /// Frame addresses; only the first `len` are meaningful.
    pub ips: [u64; MAX_USER_FRAMES],
    /// Number of frames in `ips`.
    pub len: u32,
    /// [`STACK_COMPLETE`], [`STACK_TRUNCATED`] or [`STACK_MISSING`].
    pub status: u32,
}

const _: () = assert!(core::mem::size_of::<UserStack>() == 1024);

impl UserStack {
    /// An empty stack marked missing.
    pub const EMPTY: Self = Self {
        ips: [0; MAX_USER_FRAMES],
        len: 0,
        status: STACK_MISSING,
    };

    /// The recorded frames.
    pub fn frames(&self) -> &[u64] {
        let len = (self.len as usize).min(MAX_USER_FRAMES);
        &self.ips[..len]
    }
}

impl Default for UserStack {
    fn default() -> Self {
        Self::EMPTY
    }
}

crate::impl_pod!(UserStack);

/// Name of the user stack map.
pub const USER_STACKS_MAP: &str = "USER_STACKS";
/// Capacity of [`USER_STACKS_MAP`] (distinct stacks). Entries are allocated
/// on insert (`BPF_F_NO_PREALLOC`), so an idle map costs little.
pub const USER_STACKS_MAX: u32 = 32768;
/// Name of the kernel stack map (`BPF_MAP_TYPE_STACK_TRACE`).
pub const KERNEL_STACKS_MAP: &str = "KERNEL_STACKS";
/// Capacity of [`KERNEL_STACKS_MAP`].
pub const KERNEL_STACKS_MAX: u32 = 16384;

/// Name of the per-CPU unwinder counters.
pub const UNWIND_STATS_MAP: &str = "UNWIND_STATS";
/// Stacks walked.
pub const STAT_STACKS: u32 = 0;
/// Stacks that reached the outermost frame.
pub const STAT_COMPLETE: u32 = 1;
/// Stacks cut at [`MAX_USER_FRAMES`].
pub const STAT_TRUNCATED_DEPTH: u32 = 2;
/// Stacks cut because a frame could not be unwound.
pub const STAT_TRUNCATED_UNWIND: u32 = 3;
/// Stacks whose first frame could not be read.
pub const STAT_MISSING: u32 = 4;
/// Frames unwound with CFI rows.
pub const STAT_FRAMES_CFI: u32 = 5;
/// Frames unwound by following the frame pointer (no CFI for the pc).
pub const STAT_FRAMES_FP: u32 = 6;
/// Stacks not stored because [`USER_STACKS_MAP`] was full.
pub const STAT_MAP_FULL: u32 = 7;
/// Walks stopped on a pc outside every known mapping of the process.
pub const STAT_UNKNOWN_MAPPING: u32 = 8;
/// Walks stopped on a CFI rule the kernel walker cannot evaluate.
pub const STAT_UNSUPPORTED_RULE: u32 = 9;
/// Walks stopped because reading the user stack failed.
pub const STAT_READ_FAILED: u32 = 10;
/// Walks stopped because the stack pointer did not move up.
pub const STAT_BAD_FRAME: u32 = 11;
/// Signal frames unwound.
pub const STAT_SIGNAL_FRAMES: u32 = 12;
/// Number of counters in [`UNWIND_STATS_MAP`].
pub const STATS_LEN: u32 = 16;

/// Names of the counters, indexed like the map (for logs and reports).
pub const STAT_NAMES: [&str; 13] = [
    "stacks",
    "complete",
    "truncated_depth",
    "truncated_unwind",
    "missing",
    "frames_cfi",
    "frames_fp",
    "map_full",
    "unknown_mapping",
    "unsupported_rule",
    "read_failed",
    "bad_frame",
    "signal_frames",
];
