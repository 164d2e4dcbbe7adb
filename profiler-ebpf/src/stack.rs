//! User and kernel stacks (interface B). Placeholder until the unwinder
//! lands: records the sampled pc only, marked truncated.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, pt_regs},
    macros::map,
    maps::{HashMap, PerCpuArray, StackTrace},
    programs::tracing::StackIdContext,
};
use profiler_common::stack::{KERNEL_STACKS_MAX, STACK_TRUNCATED, USER_STACKS_MAX, UserStack};

#[map(name = "USER_STACKS")]
pub static USER_STACKS: HashMap<u64, UserStack> =
    HashMap::with_max_entries(USER_STACKS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "STACK_SCRATCH")]
static SCRATCH: PerCpuArray<UserStack> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "KERNEL_STACKS")]
pub static KERNEL_STACKS: StackTrace = StackTrace::with_max_entries(KERNEL_STACKS_MAX, 0);

/// Why no stack id could be produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackError {
    /// The user registers could not be read.
    NoRegs,
}

/// The kernel stack of the current context.
#[inline(always)]
pub fn kernel_stack_id<C: StackIdContext>(ctx: &C) -> Result<u32, i32> {
    ctx.get_stackid(&KERNEL_STACKS, 0).map(|id| id as u32)
}

/// Records the user pc of `regs` (user registers only).
#[inline(always)]
pub fn user_stack_id(regs: *const pt_regs, _from_entry: bool) -> Result<u64, StackError> {
    // SAFETY: `regs` points at the program's context registers.
    let pc = unsafe { (*regs).rip };
    if pc == 0 || pc >= 0xffff_8000_0000_0000 {
        return Err(StackError::NoRegs);
    }
    let stack = SCRATCH.get_ptr_mut(0).ok_or(StackError::NoRegs)?;
    // SAFETY: this CPU's scratch slot, used only while this program runs.
    let stack = unsafe { &mut *stack };
    stack.ips[0] = pc;
    stack.len = 1;
    stack.status = STACK_TRUNCATED;
    let _ = USER_STACKS.insert(pc, &*stack, BPF_NOEXIST as u64);
    Ok(pc)
}
