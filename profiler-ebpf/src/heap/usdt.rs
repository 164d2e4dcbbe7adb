//! USDT probe sites (`otel_memory:alloc(ptr, size, weight)`,
//! `otel_memory:free(ptr)`) whose arguments are wherever the compiler put
//! them: each attached site's cookie is the index of its argument spec in
//! `HEAP_USDT_SPECS` (see `profiler_common::usdt`), written by the agent
//! from the site's `.note.stapsdt` note before it attaches.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_attach_cookie, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::Array,
    programs::ProbeContext,
};
use profiler_common::{
    heap::HeapCounter,
    usdt::{
        MAX_USDT_SPECS, USDT_ARG_CONSTANT, USDT_ARG_MEMORY, USDT_ARG_NONE, USDT_ARG_REGISTER,
        USDT_NO_REGISTER, UsdtArgSpec, UsdtSpec,
    },
};

use super::{HEAP_COUNTERS, free_at, sampled_alloc};
use crate::counters::count;

#[map(name = "HEAP_USDT_SPECS")]
static HEAP_USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_USDT_SPECS, 0);

/// `otel_memory:alloc(ptr, size, weight)`: a sampled allocation.
#[uprobe]
pub fn heap_usdt_alloc(ctx: ProbeContext) -> u32 {
    let Some(spec) = spec(&ctx) else {
        return 0;
    };
    let (Some(addr), Some(size), Some(weight)) = (
        arg(&ctx, &spec.args[0]),
        arg(&ctx, &spec.args[1]),
        arg(&ctx, &spec.args[2]),
    ) else {
        count(&HEAP_COUNTERS, HeapCounter::UsdtArgErrors);
        return 0;
    };
    sampled_alloc(&ctx, addr, size, weight, spec.from_entry != 0);
    0
}

/// `otel_memory:free(ptr)`: a sampled allocation is freed.
#[uprobe]
pub fn heap_usdt_free(ctx: ProbeContext) -> u32 {
    let Some(spec) = spec(&ctx) else {
        return 0;
    };
    match arg(&ctx, &spec.args[0]) {
        Some(addr) => free_at(addr),
        None => count(&HEAP_COUNTERS, HeapCounter::UsdtArgErrors),
    }
    0
}

/// The spec of the site that fired, copied.
#[inline(always)]
fn spec(ctx: &ProbeContext) -> Option<UsdtSpec> {
    // SAFETY: the context of a uprobe program is its pt_regs, as the helper expects.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.regs.cast()) };
    let spec = u32::try_from(cookie)
        .ok()
        .and_then(|i| HEAP_USDT_SPECS.get(i))
        .copied();
    if spec.is_none() {
        count(&HEAP_COUNTERS, HeapCounter::UsdtArgErrors);
    }
    spec
}

/// One argument's value, or None when it cannot be read.
#[inline(always)]
fn arg(ctx: &ProbeContext, spec: &UsdtArgSpec) -> Option<u64> {
    let raw = match spec.kind {
        USDT_ARG_REGISTER => register(ctx.regs, spec.base)?,
        USDT_ARG_MEMORY => {
            let mut addr = register(ctx.regs, spec.base)?.wrapping_add(spec.offset as u64);
            if spec.index != USDT_NO_REGISTER {
                let index = register(ctx.regs, spec.index)?;
                addr = addr.wrapping_add(index.wrapping_mul(u64::from(spec.scale)));
            }
            memory(addr, spec.size)?
        }
        USDT_ARG_CONSTANT => spec.offset as u64,
        USDT_ARG_NONE => 0,
        _ => return None,
    };
    Some(spec.extend(raw))
}

/// The saved register at byte `offset` of `struct pt_regs`.
#[inline(always)]
fn register(regs: *mut pt_regs, offset: u16) -> Option<u64> {
    let offset = usize::from(offset);
    if offset % 8 != 0 || offset + 8 > core::mem::size_of::<pt_regs>() {
        return None;
    }
    // SAFETY: reads 8 bytes inside the program's own pt_regs through the
    // checked helper (a variable offset into the context cannot be read
    // directly).
    unsafe { bpf_probe_read_kernel(regs.cast::<u8>().add(offset).cast::<u64>()) }.ok()
}

/// `size` bytes of the task's memory at `addr`, as a little-endian number.
#[inline(always)]
fn memory(addr: u64, size: u8) -> Option<u64> {
    // SAFETY: each read goes through the checked helper, which fails
    // (rather than faults) on memory that is not mapped.
    unsafe {
        match size {
            1 => bpf_probe_read_user(addr as *const u8).ok().map(u64::from),
            2 => bpf_probe_read_user(addr as *const u16).ok().map(u64::from),
            4 => bpf_probe_read_user(addr as *const u32).ok().map(u64::from),
            8 => bpf_probe_read_user(addr as *const u64).ok(),
            _ => None,
        }
    }
}
