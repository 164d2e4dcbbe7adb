//! Every type that crosses the kernel/user boundary of prof-bpf.
//!
//! Rules for this crate: `#[repr(C)]`, `Copy`, explicit padding fields, no
//! `bool`/`Option`, every enum `#[repr(u32)]`, and a size assertion per
//! struct, so that the eBPF side and user space agree byte for byte. The key
//! and value types of each map are documented next to the map's name.
#![no_std]

pub mod count;
pub mod counters;
pub mod cpu;
pub mod heap;
pub mod hooks;
pub mod python;
pub mod python_layout;
pub mod python_splice;
pub mod stack;
pub mod stack_copy;
pub mod unwind;
pub mod unwind_files;
pub mod unwind_test;
pub mod usdt;

/// Implements aya's `Pod` for user space (feature `user`), so maps holding
/// these types can be read with aya.
#[macro_export]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, has no padding bytes
            // (checked by a size assertion) and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
