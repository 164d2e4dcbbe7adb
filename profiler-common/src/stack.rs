//! User and kernel call stacks captured in the kernel (interface B).
//! Placeholder until the unwinder lands: the same names and layout.

/// Deepest user stack recorded.
pub const MAX_USER_FRAMES: usize = 127;
/// The walk reached the outermost frame.
pub const STACK_COMPLETE: u32 = 0;
/// The walk stopped early.
pub const STACK_TRUNCATED: u32 = 1;
/// Not even the first frame could be read.
pub const STACK_MISSING: u32 = 2;

/// One user stack, leaf first.
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
    /// The recorded frames.
    pub fn frames(&self) -> &[u64] {
        let len = (self.len as usize).min(MAX_USER_FRAMES);
        &self.ips[..len]
    }
}

crate::impl_pod!(UserStack);

/// Name of the user stack map.
pub const USER_STACKS_MAP: &str = "USER_STACKS";
/// Capacity of [`USER_STACKS_MAP`].
pub const USER_STACKS_MAX: u32 = 32768;
/// Name of the kernel stack map.
pub const KERNEL_STACKS_MAP: &str = "KERNEL_STACKS";
/// Capacity of [`KERNEL_STACKS_MAP`].
pub const KERNEL_STACKS_MAX: u32 = 16384;
