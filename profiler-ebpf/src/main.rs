//! The eBPF programs of prof-bpf, one module per concern.
#![no_std]
#![no_main]
// Atomic adds (BPF_XADD): core's atomics lack fetch_add on the BPF target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod count;
mod counters;
mod cpu;
mod heap;
mod last_stack;
mod python;
pub mod stack;
mod stack_copy;
mod unwind;
mod unwind_test;
mod vma;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this loop, so a panic
    // path that survives compilation shows up as a load error, not a hang.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
