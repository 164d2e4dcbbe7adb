//! Kernel-side user stacks (interface shared by heap and cpu).
//!
//! Map [`USER_STACKS_MAP`]: `HashMap<u64 (stack id, a hash of the ips), UserStack>`.

/// Most user frames kept per stack.
pub const MAX_USER_FRAMES: usize = 127;
/// The walk reached the outermost frame.
pub const STACK_COMPLETE: u32 = 0;
/// Depth limit, or a frame could not be unwound.
pub const STACK_TRUNCATED: u32 = 1;
/// The user stack could not be read at all.
pub const STACK_MISSING: u32 = 2;
/// Name of the user stack map.
pub const USER_STACKS_MAP: &str = "USER_STACKS";

/// One user stack, leaf first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStack {
    /// Return addresses (ips[0] may be a pc or the caller's return address).
    pub ips: [u64; MAX_USER_FRAMES],
    /// Frames used.
    pub len: u32,
    /// One of the `STACK_*` values.
    pub status: u32,
}

const _: () = assert!(core::mem::size_of::<UserStack>() == MAX_USER_FRAMES * 8 + 8);

crate::impl_pod!(UserStack);
