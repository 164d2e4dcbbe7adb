//! User and kernel call stacks captured in the kernel (interface B).
//!
//! Map [`USER_STACKS_MAP`]: `HashMap<u64 (stack id), UserStack>`. The id is a
//! hash of the frames, the length and the status, so equal stacks share one
//! entry and user space reads each distinct stack once.
//!
//! Map [`KERNEL_STACKS_MAP`]: the kernel's `StackTrace` map filled by
//! `bpf_get_stackid` (key `u32` stack id, value `[u64; 127]`).
//!
//! Map [`UNWIND_STATS_MAP`]: the [`UnwindCounter`] set, so that every stack
//! that ended early can be explained.

/// Deepest user stack recorded; deeper stacks end [`StackStatus::Truncated`]
/// (counted in `truncated_depth`). rustc's and LLVM's stacks reach ~90
/// frames, and interpreter frames share the same stacks.
pub const MAX_USER_FRAMES: usize = 512;

/// How a user stack walk ended. Stored as `u32` in [`UserStack::status`];
/// [`StackStatus::try_from`] is the one conversion back (an unknown value is
/// returned as the error, for the reader to show and count).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackStatus {
    /// The walk reached the outermost frame (`_start`, thread start, or a
    /// zero return address / frame pointer).
    Complete = 0,
    /// The walk stopped early: the depth limit, or a frame could not be unwound.
    Truncated = 1,
    /// Not even the first frame could be read.
    Missing = 2,
}

impl TryFrom<u32> for StackStatus {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            0 => Ok(Self::Complete),
            1 => Ok(Self::Truncated),
            2 => Ok(Self::Missing),
            other => Err(other),
        }
    }
}

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
    /// A [`StackStatus`] as `u32`.
    pub status: u32,
}

const _: () = assert!(core::mem::size_of::<UserStack>() == 4104);

impl UserStack {
    /// An empty stack marked missing.
    pub const EMPTY: Self = Self {
        ips: [0; MAX_USER_FRAMES],
        len: 0,
        status: StackStatus::Missing as u32,
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

/// Name of the per-CPU unwinder counters: `PerCpuArray<u64>` of
/// [`UnwindCounter::LEN`](crate::counters::CounterSet::LEN) entries.
pub const UNWIND_STATS_MAP: &str = "UNWIND_STATS";

crate::counter_set! {
    /// What the user stack walker did, so that every stack that ended early
    /// can be explained.
    pub enum UnwindCounter {
        /// Stacks walked.
        Stacks = "stacks",
        /// Stacks that reached the outermost frame.
        Complete = "complete",
        /// Stacks cut at [`MAX_USER_FRAMES`].
        TruncatedDepth = "truncated_depth",
        /// Stacks cut because a frame could not be unwound.
        TruncatedUnwind = "truncated_unwind",
        /// Stacks whose first frame could not be read.
        Missing = "missing",
        /// Frames unwound with CFI rows.
        FramesCfi = "frames_cfi",
        /// Frames unwound by following the frame pointer (no CFI for the pc).
        FramesFp = "frames_fp",
        /// Stacks not stored because [`USER_STACKS_MAP`] was full.
        MapFull = "map_full",
        /// Walks stopped on a pc outside every known mapping of the process.
        UnknownMapping = "unknown_mapping",
        /// Walks stopped on a CFI rule the kernel walker cannot evaluate.
        UnsupportedRule = "unsupported_rule",
        /// Walks stopped because reading the user stack failed.
        ReadFailed = "read_failed",
        /// Walks stopped because the stack pointer did not move up.
        BadFrame = "bad_frame",
        /// Signal frames unwound.
        SignalFrames = "signal_frames",
        /// Frames of code the process's tables did not know yet whose rows
        /// were found by the file of the pc's mapping (rows loaded for
        /// another process, or from the disk cache): no stack copy needed.
        FramesByFile = "frames_by_file",
        /// Pcs in no file mapping (JIT code, anonymous memory, or no
        /// mapping at all): no tables can cover them, so they get no copy.
        NoFileCode = "no_file_code",
        /// Pcs whose mapping the kernel could not look up (its mapping lock
        /// was held): copied as before.
        VmaBusy = "vma_busy",
        /// Pcs in a file whose loaded rows were built for another
        /// modification time of it (rewritten in place): not used.
        FileChanged = "file_changed",
    }
}
