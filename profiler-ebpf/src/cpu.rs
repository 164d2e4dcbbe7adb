//! `prof-bpf cpu`: the perf-event sampler and the task exec/exit tracker.
//!
//! `cpu_sample` runs on every sample of a per-CPU perf event (cpu-clock or
//! cycles). It counts the sample in the kernel under (pid, tid, user stack,
//! kernel stack), so user space reads aggregated counts once per interval,
//! whatever the sample rate. Map layout: `profiler_common::cpu`.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, perf_event, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{PerfEventContext, TracePointContext},
};
use profiler_common::{
    counters::CounterSet as _,
    cpu::{
        COUNTS_MAX_ENTRIES, CpuConfig, CpuCounter, KEY_GENERATION_SHIFT, KEY_KERNEL_STACK,
        KEY_KERNEL_STACK_FAILED, KEY_PYTHON_STACK, KEY_USER_EXEC_SWITCHED, KEY_USER_STACK,
        KEY_USER_STACK_FAILED, PIDS_MAX_ENTRIES, SampleCounts, SampleKey, TASK_EVENTS_BYTES,
        TASK_EXEC, TASK_EXIT, TaskEvent,
    },
};

use crate::{
    last_stack::{self, Instead},
    stack,
};

#[map(name = "CPU_CONFIG")]
static CPU_CONFIG: Array<CpuConfig> = Array::with_max_entries(1, 0);

#[map(name = "CPU_COUNTS_0")]
static CPU_COUNTS_0: PerCpuHashMap<SampleKey, SampleCounts> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

#[map(name = "CPU_COUNTS_1")]
static CPU_COUNTS_1: PerCpuHashMap<SampleKey, SampleCounts> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

#[map(name = "CPU_PIDS")]
static CPU_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(PIDS_MAX_ENTRIES, 0);

#[map(name = "CPU_STATS")]
static CPU_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CpuCounter::LEN, 0);

#[map(name = "CPU_TASK_EVENTS")]
static CPU_TASK_EVENTS: RingBuf = RingBuf::with_byte_size(TASK_EVENTS_BYTES, 0);

/// `CPU_GENERATIONS`: pid -> execs of the process seen by this session
/// (`profiler_common::cpu::KEY_GENERATION_SHIFT`). LRU: every sample of a
/// process touches its entry; an entry goes when its pid is forked again.
#[map(name = "CPU_GENERATIONS")]
static CPU_GENERATIONS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// The program generation process `pid` runs.
#[inline(always)]
fn generation(pid: u32) -> u32 {
    // SAFETY: the value is copied out at once.
    unsafe { CPU_GENERATIONS.get(&pid) }.copied().unwrap_or(0) & 0xffff
}

/// Adds one to a sampler counter.
#[inline(always)]
pub(crate) fn count(counter: CpuCounter) {
    crate::counters::count(&CPU_STATS, counter);
}

#[inline(always)]
fn config() -> CpuConfig {
    CPU_CONFIG.get(0).copied().unwrap_or_default()
}

/// Whether process `pid` passes the `--pid` filter (not counted).
#[inline(always)]
pub(crate) fn follows(pid: u32) -> bool {
    // SAFETY: the value is not used, only whether the key exists.
    config().filter_pids == 0 || unsafe { CPU_PIDS.get(pid) }.is_some()
}

/// Whether the process is sampled at all (`--pid`, `--idle`).
#[inline(always)]
fn selected(config: &CpuConfig, pid: u32, tid: u32) -> bool {
    // tid 0 is the per-CPU idle task ("swapper/N").
    if tid == 0 && config.include_idle == 0 {
        count(CpuCounter::Idle);
        return false;
    }
    // SAFETY: the value is not used, only whether the key exists.
    if config.filter_pids != 0 && unsafe { CPU_PIDS.get(pid) }.is_none() {
        // A followed task leaves the filter at its exit tracepoint, before
        // it releases its memory: its last samples are still its own.
        if last_stack::exited_while_sampled(tid) {
            return true;
        }
        count(CpuCounter::Filtered);
        return false;
    }
    true
}

#[perf_event]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    count(CpuCounter::Samples);
    let config = config();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    if config.stop_at_ns != 0 && unsafe { bpf_ktime_get_ns() } >= config.stop_at_ns {
        count(CpuCounter::AfterDuration);
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !selected(&config, pid, tid) {
        return 0;
    }
    if tid != 0 && crate::python::not_gil_holder(pid, tid) {
        return 0;
    }
    let mut key = SampleKey {
        pid,
        tid,
        flags: generation(pid) << KEY_GENERATION_SHIFT,
        ..SampleKey::default()
    };
    // SAFETY: the context of a perf_event program is a
    // bpf_perf_event_data, which begins with the interrupted registers.
    let regs = unsafe { &(*ctx.ctx).regs } as *const pt_regs;
    // SAFETY: as above; `cs` is a plain field of the context.
    let in_kernel = unsafe { (*regs).cs } & 3 == 0;
    if in_kernel {
        match stack::kernel_stack_id(&ctx) {
            Ok(id) => {
                key.kernel_stack = id;
                key.flags |= KEY_KERNEL_STACK;
            }
            Err(_) => {
                count(CpuCounter::KernelStackFailed);
                key.flags |= KEY_KERNEL_STACK_FAILED;
            }
        }
    }
    // Kernel threads (and the idle tasks) have no user stack at all.
    if tid != 0 && config.user_stacks != 0 {
        // Past the release of its memory (exit) or the switch to a new
        // program's (execve), the thread's user stack is the one it had
        // when it entered the call (`last_stack`).
        match last_stack::instead_of_walk(tid) {
            Some(Instead::AtExit(id)) => {
                count(CpuCounter::SamplesWithExitStack);
                key.user_stack = id;
                key.flags |= KEY_USER_STACK;
            }
            Some(Instead::ExecSwitched) => {
                count(CpuCounter::SamplesInExecAfterSwitch);
                key.flags |= KEY_USER_EXEC_SWITCHED;
            }
            None => user_stack(regs, &mut key),
        }
    }
    if tid != 0
        && let Some(id) = crate::python::stack_id(pid, tid)
    {
        key.python_stack = id;
        key.flags |= KEY_PYTHON_STACK;
    }
    // SAFETY: reading a field of the perf_event context.
    let period = unsafe { (*ctx.ctx).sample_period };
    add_sample(&config, &key, period);
    0
}

/// Walks the user stack from `regs` into `key`.
#[inline(always)]
fn user_stack(regs: *const pt_regs, key: &mut SampleKey) {
    match stack::user_stack_id(regs, false) {
        Ok(id) => {
            key.user_stack = id;
            key.flags |= KEY_USER_STACK;
        }
        Err(_) => {
            count(CpuCounter::UserStackFailed);
            key.flags |= KEY_USER_STACK_FAILED;
        }
    }
}

/// Adds one sample of `period` to `key` in the active count map.
#[inline(always)]
fn add_sample(config: &CpuConfig, key: &SampleKey, period: u64) {
    let counts = if config.active_counts == 0 {
        &CPU_COUNTS_0
    } else {
        &CPU_COUNTS_1
    };
    // Two attempts: the key may be inserted by another CPU between our
    // lookup and our insert (then the insert fails with EEXIST and the
    // second lookup finds it, with this CPU's slot at zero).
    for _ in 0..2 {
        if let Some(c) = counts.get_ptr_mut(key) {
            // SAFETY: this CPU's slot of a live per-CPU map value; this
            // program is its only writer on this CPU while it runs.
            unsafe {
                (*c).samples += 1;
                (*c).period += period;
            }
            return;
        }
        let first = SampleCounts { samples: 1, period };
        match counts.insert(key, &first, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(e) if e == -17 => continue, // EEXIST
            Err(_) => break,
        }
    }
    count(CpuCounter::CountsFull);
}

/// Sends an exec, exit or exec call of the current task to user space.
#[inline(always)]
pub(crate) fn task_event(kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let config = config();
    // SAFETY: the value is not used, only whether the key exists.
    if config.filter_pids != 0 && unsafe { CPU_PIDS.get(pid) }.is_none() {
        return;
    }
    // A followed task leaves the filter when it exits: a thread by its
    // own id (the fork tracepoint added it), a process at its main
    // thread's exit.
    if kind == TASK_EXIT && config.follow_forks != 0 {
        let _ = CPU_PIDS.remove(&tid);
    }
    let generation = match kind {
        TASK_EXIT => {
            last_stack::at_exit(&config, tid);
            generation(pid)
        }
        TASK_EXEC => {
            last_stack::forget(tid);
            let next = (generation(pid) + 1) & 0xffff;
            if CPU_GENERATIONS.insert(&pid, &next, 0).is_err() {
                count(CpuCounter::GenerationsFull);
            }
            next
        }
        _ => generation(pid),
    };
    let event = TaskEvent {
        kind,
        pid,
        tid,
        generation,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    if CPU_TASK_EVENTS.output::<TaskEvent>(&event, 0).is_err() {
        count(CpuCounter::TaskEventsLost);
    }
}

/// `sched:sched_process_exec`: runs in the new program, after its comm was set.
#[tracepoint]
pub fn cpu_task_exec(ctx: TracePointContext) -> u32 {
    let _ = ctx.as_ptr();
    task_event(TASK_EXEC);
    0
}

/// `sched:sched_process_fork`: runs in the parent. The child's thread id
/// may be a reused one: what its previous owner left goes. With
/// [`CpuConfig::follow_forks`], a task forked by a sampled process is
/// sampled too.
#[tracepoint]
pub fn cpu_task_fork(ctx: TracePointContext) -> u32 {
    let config = config();
    // SAFETY: reads a pid_t of the tracepoint record at the offset its
    // format file gives; the helper checks the access.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(config.fork_child_pid_offset as usize) }) else {
        return 0;
    };
    last_stack::forget(child);
    // A new process of a reused pid runs its first program.
    let _ = CPU_GENERATIONS.remove(&child);
    if config.follow_forks == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is not used, only whether the key exists.
    if unsafe { CPU_PIDS.get(parent) }.is_none() {
        return 0;
    }
    if CPU_PIDS.insert(&child, &0, 0).is_err() {
        count(CpuCounter::PidsFull);
    }
    0
}

/// `sched:sched_process_exit`: runs in each exiting thread.
#[tracepoint]
pub fn cpu_task_exit(ctx: TracePointContext) -> u32 {
    let _ = ctx.as_ptr();
    task_event(TASK_EXIT);
    0
}
