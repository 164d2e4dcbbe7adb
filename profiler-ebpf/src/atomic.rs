//! Counter updates that survive preemption.
//!
//! Uprobe programs run with migration disabled but preemptible: another
//! thread's program can run on the same CPU between the read and the write
//! of a plain `+=` on a per-CPU value and its update would be lost. An
//! atomic add (BPF_ATOMIC | BPF_ADD) cannot be split.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// Adds `v` to `*counter` atomically.
///
/// # Safety
/// `counter` must point at a live map value (from a successful lookup).
#[inline(always)]
pub unsafe fn add(counter: *mut u64, v: u64) {
    // SAFETY: guaranteed by the caller; the result is not used, so this
    // compiles to a plain atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, v) };
}
