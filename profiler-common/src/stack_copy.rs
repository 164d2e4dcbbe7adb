//! Stack copies: the fallback for events whose unwind tables are not loaded
//! yet (a process the tables do not know, or code it mapped since: a new
//! process, a `dlopen`, the start of a whole-host session).
//!
//! When the kernel walker meets a pc outside the known mappings of its
//! process, it copies the user stack from that frame's stack pointer up
//! (at most [`COPY_BYTES`]) with the frame's registers into
//! [`STACK_COPIES_MAP`], gives the event a stack id with [`COPY_ID_BIT`]
//! set, and goes on by frame pointers as before; that stack is stored under
//! the id as usual. User space unwinds the copy with the same rows and the
//! same `step` once the tables exist, and the event's stack becomes the
//! frames walked before that pc followed by those found in the copy. A copy
//! whose tables never come (its process exited first) leaves the
//! frame-pointer stack in place.
//!
//! - [`STACK_COPIES_MAP`]: `RingBuf` of [`StackCopy`].
//! - [`COPY_CONFIG_MAP`]: `Array<u32>` of one entry: non-zero while user
//!   space reads the copies (otherwise the walker follows frame pointers as
//!   before).
//! - [`COPY_STATS_MAP`]: the [`CopyCounter`] set.

/// Stack ids of events whose stack was copied have this bit set; the walker
/// clears it in every other id.
pub const COPY_ID_BIT: u64 = 1 << 63;

/// Bytes of stack one copy spans: 32 KiB from the start of the stack
/// pointer's page (so 28-32 KiB above the stack pointer), read a page at a
/// time, so a copy ends at the end of the stack (the first unreadable
/// page) or here. Real stacks measured by
/// `prof-bpf` (the unwound depth of copies, reported as
/// `copy_bytes_used_max`) stay well below it for C, C++ and Rust programs;
/// perf's default is 8 KiB, its maximum 64 KiB.
pub const COPY_BYTES: usize = 32 * 1024;
/// Pages of 4 KiB a copy reads at most (the first one partial).
pub const COPY_PAGES: usize = COPY_BYTES / 4096;

/// One copied stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackCopy {
    /// The event's stack id ([`COPY_ID_BIT`] set).
    pub id: u64,
    /// Process (tgid) and thread.
    pub pid: u32,
    pub tid: u32,
    /// Registers of the frame where the kernel walk stopped (its pc is the
    /// last frame stored under `id`); `sp` is the address of
    /// `bytes[start]`.
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    pub bx: u64,
    /// 1 when `pc` is exact (the sampled pc), not a return address.
    pub exact: u32,
    /// 1 when `bp` came from a frame-pointer chain.
    pub bp_chained: u32,
    /// Bytes of `bytes` that were read, from `start`.
    pub len: u32,
    /// Where `sp` is in `bytes`: `sp % 4096`, so that each page of the
    /// stack lands at a fixed offset.
    pub start: u32,
    /// Frames stored under `id` before `pc` (`pc` is frame `prefix`); the
    /// frames after it there come from a frame-pointer walk, kept when the
    /// copy cannot be unwound with tables.
    pub prefix: u32,
    /// Zero.
    pub _pad: u32,
    /// The sampled frame's volatile registers when `pc` is the sampled pc
    /// (`prefix` 0), for `CFA_REGS` rows; else unknown.
    pub leaf: crate::unwind::LeafRegs,
    /// The stack from `sp` up (before `start`: not written).
    pub bytes: [u8; COPY_BYTES],
}

/// Size of a [`StackCopy`] record before its bytes.
pub const COPY_HEADER: usize = 128;
const _: () = assert!(core::mem::size_of::<StackCopy>() == COPY_HEADER + COPY_BYTES);

/// Copies one process may have per [`COPY_WINDOW_NS`]: 1000 a second,
/// a CPU's samples at 999 Hz, and at most about 32 MB/s of stack.
pub const COPIES_PER_WINDOW: u64 = 100;
/// Copies all processes may have per [`COPY_WINDOW_NS`]: 4000 a second,
/// at most about 128 MB/s of stack, whatever a busy host's processes do
/// before their tables arrive.
pub const COPIES_PER_WINDOW_ALL: u64 = 400;
/// See [`COPIES_PER_WINDOW`]: 100 ms.
pub const COPY_WINDOW_NS: u64 = 100_000_000;

/// Name of the copy ring buffer.
pub const STACK_COPIES_MAP: &str = "STACK_COPIES";
/// Size of [`STACK_COPIES_MAP`]: 8 MiB, about 250 copies in flight.
pub const STACK_COPIES_BYTES: u32 = 8 << 20;
/// Name of the switch that turns copies on.
pub const COPY_CONFIG_MAP: &str = "STACK_COPY_CONFIG";
/// Name of the copy counters.
pub const COPY_STATS_MAP: &str = "STACK_COPY_STATS";

crate::counter_set! {
    /// What the stack-copy fallback did in the kernel.
    pub enum CopyCounter {
        /// Stacks copied.
        Copies = "copies",
        /// Bytes copied.
        Bytes = "bytes_copied",
        /// Copies lost because the ring buffer was full (those stacks stay
        /// truncated where the walk stopped).
        Lost = "copies_lost",
        /// Copies not made: the process had [`COPIES_PER_WINDOW`] in the
        /// current window already, or the host [`COPIES_PER_WINDOW_ALL`]
        /// (those stacks stay truncated).
        RateLimited = "copies_rate_limited",
    }
}
