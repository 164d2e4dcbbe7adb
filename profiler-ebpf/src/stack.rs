//! User and kernel stacks for every program (interface B).
//!
//! [`user_stack_id`] walks the current task's user stack in the kernel and
//! stores it in `USER_STACKS`; [`kernel_stack_id`] uses the kernel's own
//! unwinder. The per-frame work (CFI rows, frame-pointer fallback) is in
//! [`crate::unwind`]; this module owns the walk and the maps that hold its
//! result.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, StackTrace},
    programs::tracing::StackIdContext,
};
use profiler_common::{
    counters::CounterSet as _,
    stack::{
        KERNEL_STACKS_MAX, MAX_USER_FRAMES, StackStatus, USER_STACKS_MAX, UnwindCounter, UserStack,
    },
    stack_copy::COPY_ID_BIT,
    unwind::{Frame, LeafRegs},
};

use crate::{
    stack_copy,
    unwind::{self, StepResult},
};

/// `USER_STACKS`: stack id -> frames (see `profiler_common::stack`).
#[map(name = "USER_STACKS")]
pub static USER_STACKS: HashMap<u64, UserStack> =
    HashMap::with_max_entries(USER_STACKS_MAX, BPF_F_NO_PREALLOC);

/// `KERNEL_STACKS`: filled by `bpf_get_stackid`.
#[map(name = "KERNEL_STACKS")]
pub static KERNEL_STACKS: StackTrace = StackTrace::with_max_entries(KERNEL_STACKS_MAX, 0);

/// `UNWIND_STATS`: the `UnwindCounter` set.
#[map(name = "UNWIND_STATS")]
static UNWIND_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(UnwindCounter::LEN, 0);

/// A walk in progress. The BPF stack (512 bytes) cannot hold a `UserStack`,
/// so the state lives in a map value.
#[repr(C)]
pub(crate) struct Walk {
    pub stack: UserStack,
    pub frame: Frame,
    /// The sampled frame's volatile registers (`known` 0 when the first
    /// frame is not the sampled one): only the first step uses them.
    pub leaf: LeafRegs,
    /// Process (tgid) whose mappings the walk uses.
    pub pid: u32,
    /// 1 when `frame.pc` is an exact pc (the sampled pc, or one interrupted
    /// by a signal) rather than a return address.
    pub exact: u32,
    /// 1 when `frame.bp` was read from a frame-pointer chain.
    pub bp_chained: u32,
    /// 1 while a walk uses this record.
    pub busy: u32,
    /// [`COPY_OFF`], [`COPY_ALLOWED`] or [`COPY_WANTED`] (see `stack_copy`).
    pub copy: u32,
    /// With [`COPY_WANTED`]: frames stored before the copy's frame.
    pub copy_prefix: u32,
    /// With [`COPY_WANTED`]: where the copy starts, and how the walk was.
    pub copy_frame: Frame,
    pub copy_exact: u32,
    pub copy_chained: u32,
    /// 1 when the copy starts at the first frame: it gets `leaf`.
    pub copy_leaf: u32,
}

/// The walk follows frame pointers where no tables are known.
const COPY_OFF: u32 = 0;
/// The walk stops at a pc its process's tables do not cover yet.
const COPY_ALLOWED: u32 = 1;
/// It met such a pc: `copy_frame` is where the copy starts (the walk went
/// on by frame pointers, the floor when the copy cannot be unwound).
const COPY_WANTED: u32 = 2;

/// Walk state per thread. Uprobe programs run preemptibly (only migration
/// is disabled), so two threads can interleave their programs on one CPU
/// and a per-CPU record would be shared; a thread's own record cannot be.
/// LRU: records of threads that stopped walking make room for new ones.
#[map(name = "UNWIND_WALKS")]
static WALKS: LruHashMap<u64, Walk> = LruHashMap::with_max_entries(WALKS_MAX, 0);

/// Per-CPU record for a walk that interrupts its own thread's walk (a perf
/// event during a uprobe program; perf-event programs never nest on a CPU),
/// and the initial value of new per-thread records.
#[map(name = "UNWIND_WALK")]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Threads whose walk state is kept at once.
const WALKS_MAX: u32 = 8192;

/// What the `bpf_loop` callback gets: the record of this walk.
#[repr(C)]
struct LoopCtx {
    walk: *mut Walk,
}

/// The record this walk may use: its thread's, unless that one is busy
/// (this program interrupted its own thread's walk).
#[inline(always)]
fn walk_record(tid: u64) -> Option<*mut Walk> {
    if let Some(w) = WALKS.get_ptr_mut(tid) {
        // SAFETY: a pointer from a successful lookup.
        if unsafe { (*w).busy } == 0 {
            return Some(w);
        }
        return WALK.get_ptr_mut(0);
    }
    let template = WALK.get_ptr(0)?;
    // SAFETY: a pointer from a successful lookup; only its header fields
    // matter and they are reset before use.
    let _ = WALKS.insert(tid, unsafe { &*template }, 0);
    WALKS.get_ptr_mut(tid)
}

/// Why no stack id could be produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackError {
    /// The per-CPU scratch record is missing (cannot happen once loaded).
    NoScratch,
    /// `USER_STACKS` is full (counted in `UnwindCounter::MapFull`).
    MapFull,
}

/// Adds one to `counter` of `UNWIND_STATS`.
#[inline(always)]
pub(crate) fn count(counter: UnwindCounter) {
    crate::counters::count(&UNWIND_STATS, counter);
}

/// The kernel stack of the current context, from the kernel's unwinder.
#[inline(always)]
pub fn kernel_stack_id<C: StackIdContext>(ctx: &C) -> Result<u32, i32> {
    ctx.get_stackid(&KERNEL_STACKS, 0).map(|id| id as u32)
}

/// Walks the current task's user stack from `regs`. `from_entry`: the probe
/// is at a function's first instruction (uprobe on malloc), so frame 0 is
/// the return address at [rsp], the direct caller. Stores the stack in
/// `USER_STACKS` and returns its id.
///
/// `regs` may be kernel registers (a perf event that interrupted the
/// kernel), or null (a tracepoint, whose context is not registers); the
/// task's saved user registers are used then.
#[inline(always)]
pub fn user_stack_id(regs: *const pt_regs, from_entry: bool) -> Result<u64, StackError> {
    let tid = bpf_get_current_pid_tgid();
    let walk_ptr = walk_record(tid).ok_or(StackError::NoScratch)?;
    // SAFETY: the record is this thread's (or this CPU's, for a walk that
    // interrupted its thread's walk) and stays valid while the program runs.
    let walk = unsafe { &mut *walk_ptr };
    walk.busy = 1;
    count(UnwindCounter::Stacks);
    walk.stack.len = 0;
    walk.stack.status = StackStatus::Missing as u32;
    walk.pid = (tid >> 32) as u32;
    walk.exact = 1;
    walk.bp_chained = 0;
    walk.copy = if stack_copy::enabled() {
        COPY_ALLOWED
    } else {
        COPY_OFF
    };
    // SAFETY: `regs` is the program's context (pt_regs), the start of a
    // bpf_perf_event_data, which begins with the registers, or null.
    (walk.frame, walk.leaf) = unsafe { start_frame(regs) };

    if walk.frame.pc != 0 && from_entry {
        // At a function's entry the return address is at [rsp].
        match unwind::read_user(walk.frame.sp) {
            Some(ret) => {
                walk.frame.pc = ret;
                walk.frame.sp += 8;
                walk.exact = 0;
                // The registers are the callee's, not the caller's.
                walk.leaf.known = 0;
            }
            None => walk.frame.pc = 0,
        }
    }
    if walk.frame.pc == 0 {
        count(UnwindCounter::Missing);
    } else {
        walk.stack.status = StackStatus::Truncated as u32;
        let mut ctx = LoopCtx { walk: walk_ptr };
        // SAFETY: `walk_frame` has the callback signature bpf_loop expects
        // and `ctx` outlives the loop.
        unsafe {
            bpf_loop(
                MAX_USER_FRAMES as u32,
                walk_frame as *const () as *mut c_void,
                (&raw mut ctx).cast(),
                0,
            );
        }
        if walk.stack.status == StackStatus::Complete as u32 {
            count(UnwindCounter::Complete);
        } else if walk.stack.len as usize >= MAX_USER_FRAMES {
            count(UnwindCounter::TruncatedDepth);
        } else {
            count(UnwindCounter::TruncatedUnwind);
        }
    }

    let mut id = hash_stack(&walk.stack);
    if walk.copy == COPY_WANTED {
        let (frame, exact, chained) = (
            walk.copy_frame,
            walk.copy_exact != 0,
            walk.copy_chained != 0,
        );
        let prefix = walk.copy_prefix;
        let leaf = if walk.copy_leaf != 0 {
            walk.leaf
        } else {
            LeafRegs::UNKNOWN
        };
        if let Some(copy_id) =
            stack_copy::copy(walk.pid, tid, &frame, &leaf, exact, chained, prefix)
        {
            id = copy_id;
        }
    }
    let mut result = Ok(id);
    if USER_STACKS.get_ptr(id).is_none() {
        match USER_STACKS.insert(id, &walk.stack, BPF_NOEXIST as u64) {
            // -EEXIST: another CPU stored the same stack meanwhile.
            Ok(()) | Err(-17) => {}
            Err(_) => {
                count(UnwindCounter::MapFull);
                result = Err(StackError::MapFull);
            }
        }
    }
    walk.busy = 0;
    result
}

/// The user registers to start from.
///
/// # Safety
/// `regs` must be null or point at a `pt_regs` readable by the program.
#[inline(always)]
unsafe fn start_frame(regs: *const pt_regs) -> (Frame, LeafRegs) {
    if !regs.is_null() {
        // SAFETY: guaranteed by the caller.
        let r = unsafe { &*regs };
        if r.rip < KERNEL_START {
            return (frame_of(r), leaf_regs(r));
        }
    }
    saved_user_regs()
}

/// The current task's user registers, saved when it entered the kernel
/// (a zero frame for a kernel thread).
#[inline(always)]
pub fn saved_user_frame() -> Frame {
    saved_user_regs().0
}

#[inline(always)]
fn saved_user_regs() -> (Frame, LeafRegs) {
    // SAFETY: helper calls; the pointer they return is only read through
    // bpf_probe_read_kernel, which checks it.
    let user = unsafe {
        let task = bpf_get_current_task_btf();
        let uregs = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(uregs)
    };
    match user {
        Ok(u) if u.rip != 0 && u.rip < KERNEL_START => (frame_of(&u), leaf_regs(&u)),
        // A kernel thread has no user stack.
        _ => (Frame::default(), LeafRegs::UNKNOWN),
    }
}

#[inline(always)]
fn frame_of(r: &pt_regs) -> Frame {
    Frame {
        pc: r.rip,
        sp: r.rsp,
        bp: r.rbp,
        bx: r.rbx,
    }
}

/// The sampled frame's registers that only `CFA_REGS` rows use.
#[inline(always)]
fn leaf_regs(r: &pt_regs) -> LeafRegs {
    LeafRegs {
        known: 1,
        di: r.rdi,
        dx: r.rdx,
        r8: r.r8,
        r9: r.r9,
        r11: r.r11,
        ax: r.rax,
    }
}

/// Lowest kernel address on x86-64.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// One iteration of the walk (a `bpf_loop` callback): records the current
/// frame and finds its caller. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the LoopCtx given by `user_stack_id`, whose
    // record is valid for the whole program run (see there).
    let walk = unsafe { &mut *(*ctx.cast::<LoopCtx>()).walk };
    let len = walk.stack.len as usize;
    let Some(slot) = walk.stack.ips.get_mut(len) else {
        // Depth limit: the status stays Truncated.
        return 1;
    };
    *slot = walk.frame.pc;
    walk.stack.len += 1;
    if walk.copy == COPY_ALLOWED && !unwind::is_mapped(walk.pid, &walk.frame, walk.exact != 0) {
        // Code the tables do not know yet: copy the stack from here, to be
        // unwound once they do; the walk goes on by frame pointers.
        walk.copy = COPY_WANTED;
        // The index of this frame's pc: the frames before it are kept when
        // the copy is unwound, the copy's callers replace those after it.
        walk.copy_prefix = len as u32;
        walk.copy_frame = walk.frame;
        walk.copy_exact = walk.exact;
        walk.copy_chained = walk.bp_chained;
        walk.copy_leaf = (len == 0) as u32;
    }
    // The sampled frame's volatile registers serve its own step only.
    let leaf = if len == 0 { walk.leaf.if_known() } else { None };
    match unwind::step(
        walk.pid,
        &walk.frame,
        leaf,
        walk.exact != 0,
        walk.bp_chained != 0,
    ) {
        StepResult::Caller {
            frame,
            exact,
            bp_chained,
        } => {
            walk.frame = frame;
            walk.exact = exact as u32;
            walk.bp_chained = bp_chained as u32;
            0
        }
        StepResult::End => {
            walk.stack.status = StackStatus::Complete as u32;
            1
        }
        StepResult::Stop => 1,
    }
}

/// FNV-1a over the frames, the length and the status.
#[inline(always)]
fn hash_stack(stack: &UserStack) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ ((stack.len as u64) << 8 | stack.status as u64);
    for i in 0..MAX_USER_FRAMES {
        if i >= stack.len as usize {
            break;
        }
        h = (h ^ stack.ips[i]).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The bit marks the ids of copied stacks.
    h & !COPY_ID_BIT
}
