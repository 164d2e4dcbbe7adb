//! The user stack a thread leaves behind when its memory goes.
//!
//! A sample taken inside `exit`/`exit_group` after `exit_mm` (the task's
//! `mm` is NULL while `mmput`, `exit_files`, ... run), or inside `execve`
//! after `exec_mmap` switched to the new program's address space, cannot
//! walk its user stack: the saved registers are those of a program whose
//! memory is gone. During a system call the thread's user stack does not
//! change, so the stack as it was when the task entered the kernel is the
//! right one for all of these samples:
//!
//! - at `sched_process_exit`, which runs in every exiting thread before
//!   `exit_mm` (since Linux 6.16; on older kernels the memory is gone there
//!   already and nothing is recorded), the stack is walked from the saved
//!   user registers as any sample's, and its id kept under the thread's
//!   id with the `mm` it was walked in. (A copy unwound later in user space
//!   would be cheaper to load, but user space could not read the mappings
//!   of a process whose memory is gone by the time the copy arrives: a
//!   fork child that lived a few milliseconds was never read.)
//! - at `sys_enter_execve(at)`, only the caller's `mm` is kept: user space
//!   cannot know the old program's mappings once the new one runs (a fork
//!   child that execs at once was never read), so its frames could only be
//!   named with the new program's. Such samples carry
//!   `KEY_USER_EXEC_SWITCHED` instead of a stack, shown as a missing user
//!   stack under the kernel's execve frames. They are named as the process
//!   is when its counts are drained: the new program's once its exec event
//!   was read, as perf names the samples after the exec's comm change (the
//!   few between the switch and that change it names by the old comm).
//!
//! A sample uses a record only when the task's `mm` is no longer the one
//! recorded: before the switch or the release, the walk reads live memory.
//! Records go at `sched_process_exec` (the new program runs with its own
//! registers) and when a task is forked with the recorded id (a reused
//! thread id); an exit's record replaces an earlier exec's.
use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use profiler_common::cpu::{CpuConfig, CpuCounter, TASK_EXEC_CALL};

use crate::{stack, vma};

/// What a thread left behind.
#[repr(C)]
#[derive(Clone, Copy)]
struct LastStack {
    /// The `mm` the thread had when this was recorded.
    mm: u64,
    /// The stack id of the walk made at exit; 0 for an execve's record.
    id: u64,
}

/// `CPU_LAST_STACKS`: thread id -> [`LastStack`]. LRU: a thread's record
/// stays after it exited (its last samples come after the tracepoint)
/// until the id is forked again or newer records need the room.
#[map(name = "CPU_LAST_STACKS")]
static LAST_STACKS: LruHashMap<u32, LastStack> = LruHashMap::with_max_entries(8192, 0);

/// What a sample gets instead of a walk.
pub(crate) enum Instead {
    /// The stack walked when the thread began to exit.
    AtExit(u64),
    /// Inside execve, after the switch to the new program's memory.
    ExecSwitched,
}

/// For a sample of thread `tid`: what replaces the walk of its user stack,
/// when its memory is no longer the one it had when it entered the call.
#[inline(always)]
pub(crate) fn instead_of_walk(tid: u32) -> Option<Instead> {
    // SAFETY: the value is copied out at once.
    let record = unsafe { LAST_STACKS.get(&tid) }.copied()?;
    let mm = vma::current_mm()?;
    if mm == record.mm {
        return None;
    }
    if record.id == 0 {
        Some(Instead::ExecSwitched)
    } else {
        Some(Instead::AtExit(record.id))
    }
}

/// Whether thread `tid` began to exit while it was sampled (its stack was
/// walked then): it never runs user code again, and its record goes when
/// the id is forked again.
#[inline(always)]
pub(crate) fn exited_while_sampled(tid: u32) -> bool {
    // SAFETY: the value is read at once.
    unsafe { LAST_STACKS.get(&tid) }.is_some_and(|r| r.id != 0)
}

/// At `sched_process_exit` of thread `tid` (of a selected process): walks
/// its user stack while its memory is still there.
#[inline(always)]
pub(crate) fn at_exit(config: &CpuConfig, tid: u32) {
    let _ = LAST_STACKS.remove(&tid);
    if config.user_stacks == 0 {
        return;
    }
    let Some(mm) = vma::current_mm() else {
        return;
    };
    if mm == 0 {
        // A kernel thread, or a kernel whose tracepoint comes after
        // exit_mm.
        return;
    }
    // From the registers saved when the task entered the kernel.
    match stack::user_stack_id(core::ptr::null(), false) {
        Ok(id) if LAST_STACKS.insert(&tid, &LastStack { mm, id }, 0).is_ok() => {
            crate::cpu::count(CpuCounter::ExitStacksRecorded);
        }
        _ => crate::cpu::count(CpuCounter::ExitStacksNotRecorded),
    }
}

/// `syscalls:sys_enter_execve` and `sys_enter_execveat`: keeps the
/// caller's `mm`, so that samples after the switch are told apart.
#[tracepoint]
pub fn cpu_exec_entry(ctx: TracePointContext) -> u32 {
    let _ = ctx.as_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !crate::cpu::follows(pid) {
        return 0;
    }
    if let Some(mm) = vma::current_mm() {
        let _ = LAST_STACKS.insert(&tid, &LastStack { mm, id: 0 }, 0);
    }
    // The caller's name, for its samples drained after the exec.
    crate::cpu::task_event(TASK_EXEC_CALL);
    0
}

/// The thread runs a new program, or a new task got thread id `tid`.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    let _ = LAST_STACKS.remove(&tid);
}
