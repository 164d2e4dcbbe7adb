//! `--mmap`: anonymous private mappings as allocations, from the syscall
//! tracepoints (syscalls:sys_{enter,exit}_{mmap,mremap}, sys_enter_munmap).
//!
//! - Only the processes in `HEAP_MMAP_TARGETS` count: tracepoints fire for
//!   every process on the machine.
//! - Only `MAP_PRIVATE | MAP_ANONYMOUS` mappings are memory the process
//!   allocated; file and shared mappings are not heap.
//! - A mapping made inside an allocator call (the thread's depth is not 0)
//!   is the allocator's own: glibc serves big mallocs by mmap, and that
//!   malloc is already tracked with its caller's stack and size.
//! - Mappings are never sampled: they are few and large, and each one is a
//!   syscall already, so each is tracked with its own size as weight (a
//!   sampled estimate would add noise for no saving).
//! - Sizes are whole pages, what the kernel maps, in the same live map and
//!   per-stack totals as allocator blocks under [`SOURCE_MMAP`].
//! - The stack is captured at syscall entry from the task's saved user
//!   registers: frame 0 is the syscall's wrapper (libc's mmap); the agent
//!   removes it so that, like malloc stacks, the stack starts at the caller.
//!   A walk from there needs the wrapper's CFI (see `begin`).
//! - A `MAP_FIXED` mmap replaces whatever the range held: it first
//!   releases that range as a munmap would (`release`), whatever the new
//!   mapping is. The kernel side finds tracked mappings only by their start
//!   (a hash map cannot be searched by range), so a fixed mapping placed
//!   inside a tracked one leaves that one whole here; the agent gives each
//!   overlapped range to the newest tracked mapping over it (see
//!   `profiler/src/heap/report/unmapped.rs`), so it counts once.
//! - An `mremap` with `MREMAP_FIXED` also replaces its destination range:
//!   that range is released at the call's exit, once it succeeded (it
//!   fails when the ranges overlap), before the moved mapping is tracked
//!   there; a tracked mapping at the same start is never overwritten in
//!   place with its bytes still counted.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use profiler_common::heap::{
    HeapConfig, HeapCounter, LiveAlloc, LiveKey, MAX_MMAP_TARGETS, MAX_THREADS, MappingCall,
    PendingMapping, SOURCE_MMAP, STACK_ID_MISSING, WEIGHT_ONE,
};

use super::{
    HEAP_COUNTERS, HEAP_LIVE, HEAP_THREADS, add_freed, current_pid, track, tracked, untrack,
};
use crate::{
    counters::count,
    stack::{saved_user_frame, user_stack_id},
    unwind::has_cfi,
};

#[map(name = "HEAP_MMAP_TARGETS")]
static HEAP_MMAP_TARGETS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(MAX_MMAP_TARGETS, 0);

#[map(name = "HEAP_MMAP_PENDING")]
static HEAP_MMAP_PENDING: LruHashMap<u64, PendingMapping> =
    LruHashMap::with_max_entries(MAX_THREADS, 0);

/// `flags & MAP_TYPE` tells shared from private mappings.
const MAP_TYPE: u64 = 0x0f;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FIXED: u64 = 0x10;
const MREMAP_FIXED: u64 = 0x02;
const PAGE_SIZE: u64 = 4096;
/// Tracked mappings one munmap retires at most: a range covering adjacent
/// tracked mappings (the kernel merges such areas) is rare, and a bounded
/// loop keeps the program small.
const MAX_UNMAPPED_PER_CALL: u32 = 4;

/// Offsets in the syscall tracepoints' records (see their `format` files):
/// the 8-byte common header, `int __syscall_nr` padded to 8, then
/// `unsigned long args[6]` (sys_enter_*) or `long ret` (sys_exit_*).
const ARGS_OFFSET: usize = 16;
const RET_OFFSET: usize = 16;

#[tracepoint]
pub fn heap_mmap_enter(ctx: TracePointContext) -> u32 {
    let Some(pid) = target() else { return 0 };
    let (len, flags) = (arg(&ctx, 1), arg(&ctx, 3));
    if flags & MAP_FIXED != 0
        && let Some(len) = whole_pages(len)
    {
        // The kernel unmaps the range before mapping it again; released at
        // entry as munmap is (the new mapping is tracked at exit, after).
        release(pid, arg(&ctx, 0), len);
    }
    if flags & MAP_TYPE != MAP_PRIVATE || flags & MAP_ANONYMOUS == 0 {
        return 0;
    }
    if let Some(size) = whole_pages(len) {
        begin(MappingCall::Mmap, size, 0, 0);
    }
    0
}

#[tracepoint]
pub fn heap_mmap_exit(ctx: TracePointContext) -> u32 {
    if let Some((pending, addr)) = finish(&ctx).filter(|(p, _)| p.call == MappingCall::Mmap as u32)
    {
        track_mapping(addr, &pending);
    }
    0
}

/// munmap(addr, len) retires the tracked mappings the range covers from
/// its start; a range that starts inside a tracked mapping cannot be found
/// in a map keyed by start address (the agent checks the live mappings
/// against the process's maps for those, see the session).
#[tracepoint]
pub fn heap_munmap_enter(ctx: TracePointContext) -> u32 {
    let Some(pid) = target() else { return 0 };
    if let Some(len) = whole_pages(arg(&ctx, 1)) {
        // Released at entry: the call fails only for invalid arguments, and
        // the range cannot be mapped again before it returns.
        release(pid, arg(&ctx, 0), len);
    }
    0
}

/// mremap of a tracked mapping: as realloc, the old mapping is retired from
/// the stack that made it and the new one is charged to the stack that
/// called mremap (where the memory grew). Mappings that are not tracked
/// (made before the attach, file mappings) stay untracked when moved, but
/// a fixed move still replaces what its destination held.
#[tracepoint]
pub fn heap_mremap_enter(ctx: TracePointContext) -> u32 {
    let Some(pid) = target() else { return 0 };
    let (old_addr, old_len, new_len, flags) =
        (arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2), arg(&ctx, 3));
    let Some(size) = whole_pages(new_len) else {
        return 0;
    };
    let moves_tracked = old_len != 0 && tracked(pid, old_addr, SOURCE_MMAP).is_some();
    match whole_pages(old_len) {
        Some(old_len) if moves_tracked => begin(MappingCall::Mremap, size, old_addr, old_len),
        _ if flags & MREMAP_FIXED != 0 => begin(MappingCall::MremapOver, size, 0, 0),
        _ => {}
    }
    0
}

#[tracepoint]
pub fn heap_mremap_exit(ctx: TracePointContext) -> u32 {
    let Some((pending, addr)) = finish(&ctx) else {
        return 0;
    };
    let pid = current_pid();
    if pending.call == MappingCall::Mremap as u32 {
        release(pid, pending.old_addr, pending.old_len);
        // With MREMAP_FIXED the destination held other mappings (a move
        // without it lands on free addresses, where this finds nothing).
        release(pid, addr, pending.size);
        track_mapping(addr, &pending);
    } else if pending.call == MappingCall::MremapOver as u32 {
        release(pid, addr, pending.size);
    }
    0
}

/// With `--all`, makes `pid` a mapping target at its allocator calls.
#[inline(always)]
pub(super) fn note_target(config: &HeapConfig, pid: u32) {
    if config.mmap_new_targets != 0 && HEAP_MMAP_TARGETS.get_ptr(&pid).is_none() {
        let _ = HEAP_MMAP_TARGETS.insert(&pid, &1, 0);
    }
}

/// The current process, if its mappings are tracked.
#[inline(always)]
fn target() -> Option<u32> {
    let pid = current_pid();
    HEAP_MMAP_TARGETS.get_ptr(&pid).map(|_| pid)
}

/// Records a mapping call at its entry, unless the allocator makes it.
#[inline(always)]
fn begin(call: MappingCall, size: u64, old_addr: u64, old_len: u64) {
    let user = saved_user_frame();
    if in_allocator_call(user.sp) {
        count(&HEAP_COUNTERS, HeapCounter::MmapsInAllocator);
        return;
    }
    // Frame 0 is in the syscall's wrapper, which sets up no frame (glibc's
    // mmap) or one only its CFI describes (mremap): without CFI the walk
    // would skip the wrapper's caller, so the stack is reported missing
    // rather than wrong (until the agent loads the process's tables).
    let stack_id = if call == MappingCall::MremapOver {
        // Nothing is charged to this call: only its destination is released.
        STACK_ID_MISSING
    } else if !has_cfi(current_pid(), user.pc) {
        count(&HEAP_COUNTERS, HeapCounter::StackErrors);
        STACK_ID_MISSING
    } else {
        match user_stack_id(core::ptr::null(), false) {
            Ok(id) => id,
            Err(_) => {
                count(&HEAP_COUNTERS, HeapCounter::StackErrors);
                STACK_ID_MISSING
            }
        }
    };
    let stack_id = crate::python::with_python(stack_id);
    let pending = PendingMapping {
        size,
        old_addr,
        old_len,
        stack_id,
        call: call as u32,
        _pad: 0,
    };
    if HEAP_MMAP_PENDING
        .insert(&bpf_get_current_pid_tgid(), &pending, 0)
        .is_err()
    {
        count(&HEAP_COUNTERS, HeapCounter::ThreadsFull);
    }
}

/// The pending call of this thread and the address it returned, if the
/// call succeeded.
#[inline(always)]
fn finish(ctx: &TracePointContext) -> Option<(PendingMapping, u64)> {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: the pointer comes from a successful lookup; copied at once.
    let pending = unsafe { *HEAP_MMAP_PENDING.get_ptr(&tid)? };
    let _ = HEAP_MMAP_PENDING.remove(&tid);
    // SAFETY: reads the tracepoint record through the checked helper.
    let ret: i64 = unsafe { ctx.read_at(RET_OFFSET) }.unwrap_or(-1);
    // Failures return -errno (-4095..-1).
    if (-4095..0).contains(&ret) {
        return None;
    }
    Some((pending, ret as u64))
}

#[inline(always)]
fn track_mapping(addr: u64, pending: &PendingMapping) {
    count(&HEAP_COUNTERS, HeapCounter::Mmaps);
    track(
        current_pid(),
        addr,
        SOURCE_MMAP,
        LiveAlloc {
            size: pending.size,
            weight_bytes: pending.size,
            weight_objects: WEIGHT_ONE,
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            stack_id: pending.stack_id,
        },
    );
}

/// Releases `len` bytes from `addr`: retires the tracked mappings the range
/// covers, and trims the front of one it covers only in part (the rest
/// stays tracked, moved to its new start, with its stack and age).
#[inline(always)]
fn release(pid: u32, addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    let mut at = addr;
    for _ in 0..MAX_UNMAPPED_PER_CALL {
        let Some(live) = tracked(pid, at, SOURCE_MMAP) else {
            return;
        };
        let left = end - at;
        if left < live.size {
            trim_front(pid, at, live, left);
            return;
        }
        untrack(pid, at, SOURCE_MMAP);
        at += live.size;
        if at >= end {
            return;
        }
    }
}

/// Moves the tracked mapping at `addr` to `addr + cut`, `cut` bytes
/// smaller, and counts those bytes as freed.
#[inline(always)]
fn trim_front(pid: u32, addr: u64, live: LiveAlloc, cut: u64) {
    count(&HEAP_COUNTERS, HeapCounter::UnmapsPartial);
    let key = LiveKey {
        addr,
        pid,
        source: SOURCE_MMAP,
    };
    if HEAP_LIVE.remove(&key).is_err() {
        return;
    }
    add_freed(pid, SOURCE_MMAP, live.stack_id, cut, 0);
    let rest = LiveAlloc {
        size: live.size - cut,
        weight_bytes: live.weight_bytes - cut,
        ..live
    };
    let moved = LiveKey {
        addr: addr + cut,
        ..key
    };
    if HEAP_LIVE.insert(&moved, &rest, 0).is_err() {
        // The rest can no longer be retired by its unmap: take it out of
        // the totals now, as a lost block.
        count(&HEAP_COUNTERS, HeapCounter::LiveFull);
        add_freed(
            pid,
            SOURCE_MMAP,
            live.stack_id,
            rest.weight_bytes,
            rest.weight_objects,
        );
    }
}

/// Whether this thread, making a syscall with user stack pointer `sp`, is
/// inside an allocator call. A call whose return was never seen (left by
/// longjmp) leaves the depth set; `sp` is then above that call's entry and
/// it does not count (equal is an allocator that jumps to the syscall's
/// wrapper: inside).
#[inline(always)]
fn in_allocator_call(sp: u64) -> bool {
    let Some(state) = HEAP_THREADS.get_ptr(bpf_get_current_pid_tgid()) else {
        return false;
    };
    // SAFETY: the pointer comes from a successful lookup; this thread's
    // entry, read while the thread is in this syscall.
    let (depth, entry_sp) = unsafe { ((*state).depth, (*state).entry_sp) };
    depth != 0 && sp <= entry_sp
}

/// `len` rounded up to whole pages, or None for a length no mapping has.
#[inline(always)]
fn whole_pages(len: u64) -> Option<u64> {
    if len == 0 || len > u64::MAX - PAGE_SIZE {
        return None;
    }
    Some((len + PAGE_SIZE - 1) & !(PAGE_SIZE - 1))
}

/// Argument `n` of a sys_enter_* record.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reads the tracepoint record through the checked helper.
    unsafe { ctx.read_at(ARGS_OFFSET + 8 * n) }.unwrap_or(0)
}
