//! User stacks from a frame-pointer walk (validated: the walk must move up
//! the stack and stay in user space).
use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_user, macros::map, maps::{HashMap, PerCpuArray}};
use profiler_common::stack::{MAX_USER_FRAMES, STACK_COMPLETE, STACK_TRUNCATED, UserStack};

#[map(name = "USER_STACKS")]
static USER_STACKS: HashMap<u64, UserStack> = HashMap::with_max_entries(1 << 16, 0);

#[map(name = "USER_STACK_SCRATCH")]
static SCRATCH: PerCpuArray<UserStack> = PerCpuArray::with_max_entries(1, 0);

/// Why no stack id was produced.
pub enum StackError {
    /// No scratch space or the map is full.
    NoSpace,
}

const USER_TOP: u64 = 0x0000_7fff_ffff_ffff;

/// Walks the user stack from `regs`; with `from_entry` the first frame is
/// the return address at [rsp] (the probe is at a function's first instruction).
#[inline(always)]
pub fn user_stack_id(regs: *const pt_regs, from_entry: bool) -> Result<u64, StackError> {
    let stack = SCRATCH.get_ptr_mut(0).ok_or(StackError::NoSpace)?;
    // SAFETY: per-CPU scratch entry, only this program uses it while it runs.
    let stack = unsafe { &mut *stack };
    // SAFETY: regs points at the probed task's saved registers.
    let (ip, sp, mut fp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let mut n: usize = 0;
    if from_entry {
        // SAFETY: checked user read.
        let ret = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
        stack.ips[0] = ret;
    } else {
        stack.ips[0] = ip;
    }
    n += 1;
    let mut status = STACK_TRUNCATED;
    let mut last = sp;
    let mut hash: u64 = stack.ips[0].wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for i in 1..MAX_USER_FRAMES {
        if fp == 0 {
            status = STACK_COMPLETE;
            break;
        }
        if fp < last || fp > USER_TOP || fp & 7 != 0 {
            break;
        }
        // SAFETY: checked user reads.
        let ret = unsafe { bpf_probe_read_user((fp + 8) as *const u64) }.unwrap_or(0);
        let next = unsafe { bpf_probe_read_user(fp as *const u64) }.unwrap_or(0);
        if ret == 0 || ret > USER_TOP {
            if ret == 0 {
                status = STACK_COMPLETE;
            }
            break;
        }
        stack.ips[i] = ret;
        hash = (hash ^ ret).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        n = i + 1;
        last = fp + 16;
        fp = next;
    }
    stack.len = n as u32;
    stack.status = status;
    for i in n..MAX_USER_FRAMES {
        stack.ips[i] = 0;
    }
    let id = hash ^ (n as u64);
    USER_STACKS.insert(&id, stack, 0).map_err(|_| StackError::NoSpace)?;
    Ok(id)
}
