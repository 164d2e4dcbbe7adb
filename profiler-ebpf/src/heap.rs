//! `prof-bpf heap`: uprobes on the allocator's entry points that track live
//! allocations and per-stack totals in the kernel.
//!
//! - `heap_alloc_entry` (uprobe, attach cookie = [`EntryKind`]) runs at the
//!   first instruction of every allocation function. Only the outermost
//!   allocator call of a thread records anything (realloc(NULL, n) calls
//!   malloc, tcmalloc's operator new calls its own malloc ...): it keeps the
//!   requested size, decides whether the call is sampled, and captures the user
//!   stack there, where `[rsp]` is the return address into the direct caller.
//! - `heap_alloc_return` (uretprobe, all allocation functions) completes the
//!   outermost call: it records the returned block in the live map and adds it
//!   to its stack's totals (realloc first retires the old block).
//! - `heap_free_entry` (uprobe, every free function) retires a tracked block;
//!   untracked pointers (allocated before attach, unsampled, NULL) are ignored.
//!
//! - [`mmap`] (`--mmap`): anonymous private mappings made outside allocator
//!   calls, tracked in the same maps from the syscall tracepoints.
//!
//! Nothing is sent to user space per event: the agent reads the maps.
use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_probe_read_user, generated::bpf_send_signal,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::{
    counters::CounterSet as _,
    heap::{
        DEFAULT_MAX_LIVE, DEFAULT_MAX_STACKS, EntryKind, HeapConfig, HeapCounter, LiveAlloc,
        LiveKey, MAX_THREADS, SAMPLE_TABLE_LEN, SOURCE_ALLOCATOR, STACK_ID_MISSING, StackKey,
        StackStats, ThreadState, WEIGHT_ONE, WEIGHT_STEPS_PER_UNIT, WEIGHT_TABLE_LEN,
    },
};

use crate::{atomic::add, counters::count, stack::user_stack_id};

/// Elements are allocated on insert, so an unused capacity costs nothing.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[map(name = "HEAP_LIVE")]
static HEAP_LIVE: HashMap<LiveKey, LiveAlloc> =
    HashMap::with_max_entries(DEFAULT_MAX_LIVE, BPF_F_NO_PREALLOC);

#[map(name = "HEAP_STACK_STATS")]
static HEAP_STACK_STATS: PerCpuHashMap<StackKey, StackStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

#[map(name = "HEAP_THREADS")]
static HEAP_THREADS: LruHashMap<u64, ThreadState> = LruHashMap::with_max_entries(MAX_THREADS, 0);

#[map(name = "HEAP_CONFIG")]
static HEAP_CONFIG: Array<HeapConfig> = Array::with_max_entries(1, 0);

#[map(name = "HEAP_SAMPLE_INTERVALS")]
static HEAP_SAMPLE_INTERVALS: Array<u64> = Array::with_max_entries(SAMPLE_TABLE_LEN, 0);

#[map(name = "HEAP_SAMPLE_WEIGHTS")]
static HEAP_SAMPLE_WEIGHTS: Array<u64> = Array::with_max_entries(WEIGHT_TABLE_LEN, 0);

#[map(name = "HEAP_COUNTERS")]
static HEAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HeapCounter::LEN, 0);

mod mmap;
mod usdt;

#[uprobe]
pub fn heap_alloc_entry(ctx: ProbeContext) -> u32 {
    alloc_entry(&ctx);
    0
}

#[uretprobe]
pub fn heap_alloc_return(ctx: RetProbeContext) -> u32 {
    alloc_return(&ctx);
    0
}

#[uprobe]
pub fn heap_free_entry(ctx: ProbeContext) -> u32 {
    free(&ctx)
}

#[inline(always)]
fn free(ctx: &ProbeContext) -> u32 {
    free_at(ctx.arg(0).unwrap_or(0));
    0
}

/// A free function called on `addr`: retires the block if it is tracked.
#[inline(always)]
fn free_at(addr: u64) {
    let pid = current_pid();
    let config = config();
    if pid == config.agent_pid {
        return;
    }
    mmap::note_target(&config, pid);
    count(&HEAP_COUNTERS, HeapCounter::Frees);
    if addr != 0 {
        untrack(pid, addr, SOURCE_ALLOCATOR);
    }
}

/// libprofalloc.so's `profalloc_sample_alloc(ptr, size, weight)`: called
/// only for the allocations its own sampler picked, with their weight.
#[uprobe]
pub fn heap_hook_alloc(ctx: ProbeContext) -> u32 {
    let arg = |n: usize| -> u64 { ctx.arg(n).unwrap_or(0) };
    sampled_alloc(&ctx, arg(0), arg(1), arg(2), true);
    0
}

/// Tracks an allocation the allocator sampled itself, with its weight in
/// bytes. `from_entry`: the probe is where `[rsp]` is the return address
/// (see `user_stack_id`), else the stack starts at the probe itself.
#[inline(always)]
fn sampled_alloc(ctx: &ProbeContext, addr: u64, size: u64, weight_bytes: u64, from_entry: bool) {
    let pid = current_pid();
    if pid == config().agent_pid {
        return;
    }
    count(&HEAP_COUNTERS, HeapCounter::Allocs);
    if addr == 0 {
        return;
    }
    let stack_id = crate::python::with_python(match user_stack_id(ctx.regs, from_entry) {
        Ok(id) => id,
        Err(_) => {
            count(&HEAP_COUNTERS, HeapCounter::StackErrors);
            STACK_ID_MISSING
        }
    });
    track(
        pid,
        addr,
        SOURCE_ALLOCATOR,
        LiveAlloc {
            size,
            weight_bytes,
            weight_objects: weight_bytes * WEIGHT_ONE / size.max(1),
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            stack_id,
        },
    );
}

/// Launch mode: a uprobe on the dynamic loader's `_dl_debug_state`, which it
/// calls before and after mapping the program's libraries. The program
/// stops itself there (the signal is taken on the way back to user mode),
/// so that the agent loads the unwind tables of what is mapped before any
/// of that code runs; the agent then continues it.
#[uprobe]
pub fn heap_loader_stop(_ctx: ProbeContext) -> u32 {
    const SIGSTOP: u32 = 19;
    // SAFETY: bpf_send_signal has no memory-safety preconditions; it
    // signals the current process.
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

/// libprofalloc.so's `profalloc_sample_free(ptr)`: a sampled block is freed.
#[uprobe]
pub fn heap_hook_free(ctx: ProbeContext) -> u32 {
    free(&ctx)
}

#[inline(always)]
fn alloc_entry(ctx: &ProbeContext) {
    // SAFETY: the context of a uprobe program is its pt_regs, as the helper expects.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.regs.cast()) };
    let Some(kind) = EntryKind::from_cookie(cookie) else {
        return;
    };
    let pid = current_pid();
    let config = config();
    if pid == config.agent_pid {
        return;
    }
    mmap::note_target(&config, pid);
    let Some(state) = thread_state() else {
        count(&HEAP_COUNTERS, HeapCounter::ThreadsFull);
        return;
    };
    // SAFETY: `ctx.regs` points at the probed task's saved registers.
    let sp = unsafe { (*ctx.regs).rsp };
    // SAFETY: the pointer comes from a successful lookup; only this thread
    // (the key is its pid_tgid) touches the entry while it runs.
    let state = unsafe { &mut *state };
    if state.depth != 0 && sp > state.entry_sp {
        // The outer call this thread was in has returned without its
        // uretprobe firing (left by longjmp, say): this call is not nested in
        // it. An equal stack pointer is a tail call from the outer call
        // (glibc's realloc(NULL, n) jumps to malloc), which is nested.
        state.depth = 0;
    }
    state.depth += 1;
    if state.depth != 1 {
        return;
    }
    count(&HEAP_COUNTERS, HeapCounter::Allocs);
    let arg = |n: usize| -> u64 { ctx.arg(n).unwrap_or(0) };
    let (size, arg_ptr) = match kind {
        EntryKind::Malloc => (arg(0), 0),
        EntryKind::Calloc => (mul_saturating(arg(0), arg(1)), 0),
        EntryKind::Realloc => (arg(1), arg(0)),
        EntryKind::ReallocArray => (mul_saturating(arg(1), arg(2)), arg(0)),
        EntryKind::Memalign => (arg(1), 0),
        EntryKind::PosixMemalign => (arg(2), arg(0)),
    };
    state.kind = kind as u32;
    state.size = size;
    state.arg_ptr = arg_ptr;
    state.entry_sp = sp;
    state.sampled = u32::from(sample(state, size));
    state.stack_id = STACK_ID_MISSING;
    if state.sampled != 0 {
        match user_stack_id(ctx.regs, true) {
            Ok(id) => state.stack_id = id,
            Err(_) => count(&HEAP_COUNTERS, HeapCounter::StackErrors),
        }
        state.stack_id = crate::python::with_python(state.stack_id);
    }
}

#[inline(always)]
fn alloc_return(ctx: &RetProbeContext) {
    let Some(state) = HEAP_THREADS.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        return;
    };
    // SAFETY: as in `alloc_entry`, the entry belongs to this thread.
    let state = unsafe { &mut *state };
    if state.depth == 0 {
        // A call entered before the entry probe was attached.
        return;
    }
    state.depth -= 1;
    if state.depth != 0 {
        return;
    }
    let pid = current_pid();
    let ret: u64 = ctx.ret();
    let size = state.size;
    let addr = match EntryKind::from_cookie(u64::from(state.kind)) {
        Some(EntryKind::Realloc | EntryKind::ReallocArray) => {
            // realloc retires the old block when it succeeds, and when asked
            // for 0 bytes (it frees and may return NULL); on failure the
            // old block stays valid.
            if state.arg_ptr != 0 && (ret != 0 || size == 0) {
                untrack(pid, state.arg_ptr, SOURCE_ALLOCATOR);
            }
            ret
        }
        Some(EntryKind::PosixMemalign) => {
            if ret != 0 {
                return;
            }
            // SAFETY: reads user memory through the checked helper; the
            // pointer is the one the caller passed to posix_memalign.
            unsafe { bpf_probe_read_user(state.arg_ptr as *const u64) }.unwrap_or(0)
        }
        Some(_) => ret,
        None => return,
    };
    if addr == 0 || state.sampled == 0 {
        return;
    }
    let (weight_bytes, weight_objects) = weight(size);
    track(
        pid,
        addr,
        SOURCE_ALLOCATOR,
        LiveAlloc {
            size,
            weight_bytes,
            weight_objects,
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            stack_id: state.stack_id,
        },
    );
}

/// Records a new live block and adds it to its stack's totals.
#[inline(always)]
fn track(pid: u32, addr: u64, source: u32, alloc: LiveAlloc) {
    let key = LiveKey { addr, pid, source };
    // A block still recorded at this address was freed by a path we do not
    // probe; retire it so its stack's totals stay balanced.
    untrack(pid, addr, source);
    if HEAP_LIVE.insert(&key, &alloc, BPF_NOEXIST).is_err() {
        count(&HEAP_COUNTERS, HeapCounter::LiveFull);
        return;
    }
    count(&HEAP_COUNTERS, HeapCounter::Tracked);
    let Some(stats) = stack_stats(pid, alloc.stack_id, source) else {
        // The block stays out of every total; drop it so its free does not
        // subtract what was never added.
        let _ = HEAP_LIVE.remove(&key);
        count(&HEAP_COUNTERS, HeapCounter::StacksFull);
        return;
    };
    // SAFETY: pointers into this CPU's copy of a live map value.
    unsafe {
        add(&raw mut (*stats).alloc_objects, alloc.weight_objects);
        add(&raw mut (*stats).alloc_bytes, alloc.weight_bytes);
    }
}

/// The tracked block at `addr`, copied.
#[inline(always)]
fn tracked(pid: u32, addr: u64, source: u32) -> Option<LiveAlloc> {
    let key = LiveKey { addr, pid, source };
    // SAFETY: the pointer comes from a successful lookup; the value is copied
    // at once (the map is not preallocated, so the element stays valid until
    // this program ends even if another CPU deletes it).
    HEAP_LIVE.get_ptr(&key).map(|live| unsafe { *live })
}

/// Retires a tracked block; pointers that are not tracked are ignored.
#[inline(always)]
fn untrack(pid: u32, addr: u64, source: u32) {
    let Some(live) = tracked(pid, addr, source) else {
        return;
    };
    if HEAP_LIVE.remove(&LiveKey { addr, pid, source }).is_err() {
        // Another thread retired it first (a double free in the target).
        return;
    }
    add_freed(
        pid,
        source,
        live.stack_id,
        live.weight_bytes,
        live.weight_objects,
    );
}

/// Adds freed bytes and objects to a stack's totals.
#[inline(always)]
fn add_freed(pid: u32, source: u32, stack_id: u64, bytes: u64, objects: u64) {
    let stats_key = StackKey {
        stack_id,
        pid,
        source,
    };
    if let Some(stats) = HEAP_STACK_STATS.get_ptr_mut(&stats_key) {
        // SAFETY: as in `track`. A block freed on another CPU than the one
        // that allocated it counts its free there; user space sums the CPUs.
        unsafe {
            add(&raw mut (*stats).free_objects, objects);
            add(&raw mut (*stats).free_bytes, bytes);
        }
    }
}

/// Decides whether an outermost allocation of `size` bytes is tracked:
/// always when not sampling, else when it crosses the thread's byte countdown
/// (exponential intervals with the sampling rate as mean, as tcmalloc does).
#[inline(always)]
fn sample(state: &mut ThreadState, size: u64) -> bool {
    let rate = config().sample_bytes;
    if rate == 0 {
        return true;
    }
    if state.countdown_set == 0 {
        state.countdown = next_interval();
        state.countdown_set = 1;
    }
    state.countdown -= size as i64;
    if state.countdown > 0 {
        return false;
    }
    state.countdown = next_interval();
    true
}

/// A random exponential interval in bytes from the agent's precomputed table.
#[inline(always)]
fn next_interval() -> i64 {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let index = unsafe { bpf_get_prandom_u32() } & (SAMPLE_TABLE_LEN - 1);
    HEAP_SAMPLE_INTERVALS.get(index).map_or(1, |&v| v as i64)
}

/// The estimated (bytes, objects in WEIGHT_ONE units) a tracked block of
/// `size` bytes stands for: itself when not sampling, else
/// S / (1 - exp(-S/N)) bytes and 1 / (1 - exp(-S/N)) objects.
#[inline(always)]
fn weight(size: u64) -> (u64, u64) {
    let rate = config().sample_bytes;
    if rate == 0 {
        return (size, WEIGHT_ONE);
    }
    let size = size.max(1);
    // x = size / rate in 1/1024ths of a table step.
    let x = if size >> 40 == 0 {
        size * (u64::from(WEIGHT_STEPS_PER_UNIT) * 1024) / rate
    } else {
        u64::MAX
    };
    let index = x >> 10;
    let bytes = if index >= u64::from(WEIGHT_TABLE_LEN - 1) {
        // h(x) = x to within exp(-16): a block this large is always sampled.
        size
    } else {
        let index = index as u32;
        let lo = HEAP_SAMPLE_WEIGHTS
            .get(index)
            .copied()
            .unwrap_or(WEIGHT_ONE);
        let hi = HEAP_SAMPLE_WEIGHTS.get(index + 1).copied().unwrap_or(lo);
        let h = lo + (hi.saturating_sub(lo) * (x & 1023) >> 10);
        (rate * h) >> 16
    };
    (bytes, bytes * WEIGHT_ONE / size)
}

#[inline(always)]
fn config() -> HeapConfig {
    HEAP_CONFIG.get(0).copied().unwrap_or_default()
}

/// This thread's state, created on first use.
#[inline(always)]
fn thread_state() -> Option<*mut ThreadState> {
    let id = bpf_get_current_pid_tgid();
    if let Some(state) = HEAP_THREADS.get_ptr_mut(id) {
        return Some(state);
    }
    HEAP_THREADS.insert(&id, &ThreadState::default(), 0).ok()?;
    HEAP_THREADS.get_ptr_mut(id)
}

/// The totals of (pid, stack, source), created zeroed on first use.
#[inline(always)]
fn stack_stats(pid: u32, stack_id: u64, source: u32) -> Option<*mut StackStats> {
    let key = StackKey {
        stack_id,
        pid,
        source,
    };
    if let Some(stats) = HEAP_STACK_STATS.get_ptr_mut(&key) {
        return Some(stats);
    }
    // Another CPU may create it at the same time: that insert failing with
    // EEXIST is fine, the lookup below finds its entry.
    let _ = HEAP_STACK_STATS.insert(&key, &StackStats::default(), BPF_NOEXIST);
    HEAP_STACK_STATS.get_ptr_mut(&key)
}

/// `a * b` for calloc-style sizes, or u64::MAX when it overflows (calloc
/// then fails). Built from 32x32-bit products because any overflow check
/// LLVM recognizes on a 64-bit multiply becomes a 128-bit one, which BPF
/// lacks.
#[inline(always)]
fn mul_saturating(a: u64, b: u64) -> u64 {
    let (small, big) = if a <= b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        // Both are at least 2^32.
        return u64::MAX;
    }
    // small * big = small * hi * 2^32 + small * lo, each product of two
    // 32-bit numbers fitting 64 bits.
    let high = small * (big >> 32);
    if high >> 32 != 0 {
        return u64::MAX;
    }
    let low = small * (big & 0xffff_ffff);
    let sum = (high << 32).wrapping_add(low);
    if sum < low { u64::MAX } else { sum }
}

#[inline(always)]
fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}
