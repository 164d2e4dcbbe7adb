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
    maps::{HashMap, PerCpuArray, StackTrace},
    programs::tracing::StackIdContext,
};
use profiler_common::{
    stack::{
        KERNEL_STACKS_MAX, MAX_USER_FRAMES, STACK_COMPLETE, STACK_MISSING, STACK_TRUNCATED,
        STAT_COMPLETE, STAT_MAP_FULL, STAT_MISSING, STAT_STACKS, STAT_TRUNCATED_DEPTH,
        STAT_TRUNCATED_UNWIND, STATS_LEN, USER_STACKS_MAX, UserStack,
    },
    unwind::Frame,
};

use crate::unwind::{self, StepResult};

/// `USER_STACKS`: stack id -> frames (see `profiler_common::stack`).
#[map(name = "USER_STACKS")]
pub static USER_STACKS: HashMap<u64, UserStack> =
    HashMap::with_max_entries(USER_STACKS_MAX, BPF_F_NO_PREALLOC);

/// `KERNEL_STACKS`: filled by `bpf_get_stackid`.
#[map(name = "KERNEL_STACKS")]
pub static KERNEL_STACKS: StackTrace = StackTrace::with_max_entries(KERNEL_STACKS_MAX, 0);

/// `UNWIND_STATS`: per-CPU counters indexed by `profiler_common::stack::STAT_*`.
#[map(name = "UNWIND_STATS")]
static UNWIND_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// The walk in progress on this CPU. The BPF stack (512 bytes) cannot hold a
/// `UserStack`, and the `bpf_loop` callback reaches its state through here.
#[repr(C)]
pub(crate) struct Walk {
    pub stack: UserStack,
    pub frame: Frame,
    /// Process (tgid) whose mappings the walk uses.
    pub pid: u32,
    /// 1 when `frame.pc` is an exact pc (the sampled pc, or one interrupted
    /// by a signal) rather than a return address.
    pub exact: u32,
    /// 1 when `frame.bp` was read from a frame-pointer chain.
    pub bp_chained: u32,
    pub _pad: u32,
}

#[map(name = "UNWIND_WALK")]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Why no stack id could be produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackError {
    /// The per-CPU scratch record is missing (cannot happen once loaded).
    NoScratch,
    /// `USER_STACKS` is full (counted in `STAT_MAP_FULL`).
    MapFull,
}

/// Adds one to counter `index` of `UNWIND_STATS`.
#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = UNWIND_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot; this program is its only writer
        // on this CPU while it runs.
        unsafe { *c += 1 };
    }
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
/// kernel); the task's saved user registers are used then.
#[inline(always)]
pub fn user_stack_id(regs: *const pt_regs, from_entry: bool) -> Result<u64, StackError> {
    let walk = WALK.get_ptr_mut(0).ok_or(StackError::NoScratch)?;
    // SAFETY: the per-CPU slot is valid for the whole program run and only
    // this program touches it on this CPU.
    let walk = unsafe { &mut *walk };
    count(STAT_STACKS);
    walk.stack.len = 0;
    walk.stack.status = STACK_MISSING;
    walk.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    walk.exact = 1;
    walk.bp_chained = 0;
    // SAFETY: `regs` is the program's context (pt_regs) or the start of a
    // bpf_perf_event_data, which begins with the registers.
    walk.frame = unsafe { start_frame(regs) };

    if walk.frame.pc != 0 && from_entry {
        // At a function's entry the return address is at [rsp].
        match unwind::read_user(walk.frame.sp) {
            Some(ret) => {
                walk.frame.pc = ret;
                walk.frame.sp += 8;
                walk.exact = 0;
            }
            None => walk.frame.pc = 0,
        }
    }
    if walk.frame.pc == 0 {
        count(STAT_MISSING);
    } else {
        walk.stack.status = STACK_TRUNCATED;
        // SAFETY: `walk_frame` has the callback signature bpf_loop expects
        // and takes its state from the per-CPU record, not from the context.
        unsafe {
            bpf_loop(
                MAX_USER_FRAMES as u32,
                walk_frame as *const () as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
        match walk.stack.status {
            STACK_COMPLETE => count(STAT_COMPLETE),
            _ if walk.stack.len as usize >= MAX_USER_FRAMES => count(STAT_TRUNCATED_DEPTH),
            _ => count(STAT_TRUNCATED_UNWIND),
        }
    }

    let id = hash_stack(&walk.stack);
    if USER_STACKS.get_ptr(id).is_none() {
        match USER_STACKS.insert(id, &walk.stack, BPF_NOEXIST as u64) {
            // -EEXIST: another CPU stored the same stack meanwhile.
            Ok(()) | Err(-17) => {}
            Err(_) => {
                count(STAT_MAP_FULL);
                return Err(StackError::MapFull);
            }
        }
    }
    Ok(id)
}

/// The user registers to start from.
///
/// # Safety
/// `regs` must point at a `pt_regs` readable by the program.
#[inline(always)]
unsafe fn start_frame(regs: *const pt_regs) -> Frame {
    // SAFETY: guaranteed by the caller.
    let r = unsafe { &*regs };
    let (pc, sp, bp) = (r.rip, r.rsp, r.rbp);
    if pc < KERNEL_START {
        return Frame { pc, sp, bp };
    }
    // Interrupted in the kernel: the user registers were saved on entry.
    // SAFETY: helper calls; the pointer they return is only read through
    // bpf_probe_read_kernel, which checks it.
    let user = unsafe {
        let task = bpf_get_current_task_btf();
        let uregs = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(uregs)
    };
    match user {
        Ok(u) if u.rip != 0 && u.rip < KERNEL_START => Frame {
            pc: u.rip,
            sp: u.rsp,
            bp: u.rbp,
        },
        // A kernel thread has no user stack.
        _ => Frame::default(),
    }
}

/// Lowest kernel address on x86-64.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// One iteration of the walk (a `bpf_loop` callback): records the current
/// frame and finds its caller. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_frame(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: see `user_stack_id`.
    let walk = unsafe { &mut *walk };
    let len = walk.stack.len as usize;
    let Some(slot) = walk.stack.ips.get_mut(len) else {
        // Depth limit: status stays STACK_TRUNCATED.
        return 1;
    };
    *slot = walk.frame.pc;
    walk.stack.len += 1;
    match unwind::step(walk.pid, &walk.frame, walk.exact != 0, walk.bp_chained != 0) {
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
            walk.stack.status = STACK_COMPLETE;
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
    h
}
