//! `prof-bpf cpu`: the perf-event sampler's maps and records.
//!
//! The sampler counts samples in the kernel, keyed by [`SampleKey`], in one of
//! two maps ([`COUNTS_MAPS`]); user space flips [`CpuConfig::active_counts`]
//! once per interval and drains the map no longer written to, so no count is
//! lost between reading a key and deleting it.
//!
//! - [`CONFIG_MAP`]: `Array<CpuConfig>`, one entry written before attaching
//!   and on every interval flip.
//! - [`COUNTS_MAPS`]: two `PerCpuHashMap<SampleKey, SampleCounts>` (no
//!   atomics in the sampler; user space sums the CPUs).
//! - [`PIDS_MAP`]: `HashMap<u32 (tgid), u32 (unused)>`, the processes sampled
//!   when [`CpuConfig::filter_pids`] is set. With [`CpuConfig::follow_forks`]
//!   the fork tracepoint adds every task its members fork (threads too,
//!   since the tracepoint cannot tell them apart; they leave when they exit).
//! - [`STATS_MAP`]: the [`CpuCounter`] set (`PerCpuArray<u64>`).
//! - [`TASK_EVENTS_MAP`]: `RingBuf` of [`TaskEvent`] (exec and exit of tasks),
//!   so that short-lived processes are named and their mappings read while
//!   they still exist.

/// Name of the configuration map.
pub const CONFIG_MAP: &str = "CPU_CONFIG";
/// Names of the two sample-count maps; [`CpuConfig::active_counts`] selects
/// the one the sampler writes.
pub const COUNTS_MAPS: [&str; 2] = ["CPU_COUNTS_0", "CPU_COUNTS_1"];
/// Capacity of each count map: distinct (thread, stacks) keys per interval.
pub const COUNTS_MAX_ENTRIES: u32 = 16 * 1024;
/// Name of the pid filter map.
pub const PIDS_MAP: &str = "CPU_PIDS";
/// Capacity of [`PIDS_MAP`].
pub const PIDS_MAX_ENTRIES: u32 = 8192;
/// Name of the statistics map.
pub const STATS_MAP: &str = "CPU_STATS";
/// Name of the task event ring buffer.
pub const TASK_EVENTS_MAP: &str = "CPU_TASK_EVENTS";
/// Size in bytes of [`TASK_EVENTS_MAP`] (a power of two, a page multiple).
pub const TASK_EVENTS_BYTES: u32 = 256 * 1024;

/// Sampler settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuConfig {
    /// Index into [`COUNTS_MAPS`] of the map samples go to (0 or 1).
    pub active_counts: u32,
    /// Non-zero: count samples of the idle tasks (pid 0) as well.
    pub include_idle: u32,
    /// Non-zero: sample only the processes listed in [`PIDS_MAP`].
    pub filter_pids: u32,
    /// Non-zero: walk user stacks (zero only for diagnosis).
    pub user_stacks: u32,
    /// Non-zero: a process forked by one in [`PIDS_MAP`] joins it, and
    /// leaves it when it exits (a launched command and its descendants).
    pub follow_forks: u32,
    /// Offset of `child_pid` in the `sched:sched_process_fork` record, as
    /// its `format` file gives it (it differs between kernel versions).
    pub fork_child_pid_offset: u32,
    /// `--duration`: samples taken at or after this CLOCK_MONOTONIC time
    /// (ns) are not counted, however late user space stops; 0: no end.
    pub stop_at_ns: u64,
}

const _: () = assert!(core::mem::size_of::<CpuConfig>() == 32);

/// `SampleKey::flags`: the user stack was walked; `user_stack` is its id in
/// the user stack map.
pub const KEY_USER_STACK: u32 = 1 << 0;
/// `SampleKey::flags`: the task has user memory but its user stack could not
/// be read.
pub const KEY_USER_STACK_FAILED: u32 = 1 << 1;
/// `SampleKey::flags`: the sample was taken in the kernel and
/// `kernel_stack` is its id in the kernel stack map.
pub const KEY_KERNEL_STACK: u32 = 1 << 2;
/// `SampleKey::flags`: the sample was taken in the kernel but its stack
/// could not be recorded (see [`CpuCounter::KernelStackFailed`]).
pub const KEY_KERNEL_STACK_FAILED: u32 = 1 << 3;
/// `SampleKey::flags`: the thread ran Python code; `python_stack` is its
/// id in the Python stack map (`crate::python::STACKS_MAP`).
pub const KEY_PYTHON_STACK: u32 = 1 << 4;
/// `SampleKey::flags`: the sample was taken inside `execve` after the
/// switch to the new program's address space: the caller's user stack is
/// gone and no stack is recorded (see [`CpuCounter::SamplesInExecAfterSwitch`]).
pub const KEY_USER_EXEC_SWITCHED: u32 = 1 << 5;
/// `SampleKey::flags`: the upper 16 bits hold the process's program
/// generation when the sample was taken: how many execs of the process the
/// session has seen, modulo 2^16 ([`TaskEvent::generation`]). Samples of
/// one thread before and after an exec are counted apart, so the old
/// program's are not named after the new one.
pub const KEY_GENERATION_SHIFT: u32 = 16;

/// The program generation of a sample with these `SampleKey::flags`.
pub const fn key_generation(flags: u32) -> u32 {
    flags >> KEY_GENERATION_SHIFT
}

/// Whether generation `sample` of a process is older than generation
/// `latest` (both modulo 2^16): a sample drained before its exec's event
/// was read is newer, not older.
pub const fn generation_is_older(sample: u32, latest: u32) -> bool {
    let behind = latest.wrapping_sub(sample) & 0xffff;
    behind != 0 && behind < 0x8000
}

/// What samples are counted by: thread and both stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    /// Process id (tgid); 0 for the idle tasks.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Id of the user stack (valid with [`KEY_USER_STACK`]).
    pub user_stack: u64,
    /// Id of the kernel stack (valid with [`KEY_KERNEL_STACK`]).
    pub kernel_stack: u32,
    /// `KEY_*` bits.
    pub flags: u32,
    /// Id of the Python stack (valid with [`KEY_PYTHON_STACK`]).
    pub python_stack: u64,
}

const _: () = assert!(core::mem::size_of::<SampleKey>() == 32);

/// What is counted per key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCounts {
    /// Number of samples.
    pub samples: u64,
    /// Sum of the samples' periods (nanoseconds for cpu-clock, events for
    /// hardware counters).
    pub period: u64,
}

const _: () = assert!(core::mem::size_of::<SampleCounts>() == 16);

crate::counter_set! {
    /// What the sampler counted besides the samples' stacks, kept in
    /// [`STATS_MAP`]: every sample left out or lost is counted here.
    pub enum CpuCounter {
        /// Samples taken (every run of the program).
        Samples = "samples",
        /// Samples of the idle tasks, not counted (without `--idle`).
        Idle = "idle",
        /// Samples of processes not selected (`--pid`, a launched command).
        Filtered = "filtered",
        /// Samples lost because the count map was full.
        CountsFull = "counts_full",
        /// Samples whose kernel stack could not be recorded (stack map
        /// full, bucket collision, or an unwinding error).
        KernelStackFailed = "kernel_stack_failed",
        /// Samples whose user stack could not be read.
        UserStackFailed = "user_stack_failed",
        /// Task events lost because the ring buffer was full.
        TaskEventsLost = "task_events_lost",
        /// Forked tasks not followed because [`PIDS_MAP`] was full.
        PidsFull = "pids_full",
        /// Samples after the end of `--duration` ([`CpuConfig::stop_at_ns`]),
        /// not counted.
        AfterDuration = "after_duration",
        /// Exiting threads whose user stack was walked before their memory
        /// went, for their samples after it.
        ExitStacksRecorded = "exit_stacks_recorded",
        /// Exiting threads whose stack could not be kept (the stack map
        /// was full): their samples after the release stay cut.
        ExitStacksNotRecorded = "exit_stacks_not_recorded",
        /// Samples after an exiting thread released its memory that got the
        /// stack walked at its exit.
        SamplesWithExitStack = "samples_with_exit_stack",
        /// Samples inside execve after the switch to the new program's
        /// memory: no user stack ([`KEY_USER_EXEC_SWITCHED`]).
        SamplesInExecAfterSwitch = "samples_in_execve_after_switch",
        /// Execs whose generation could not be kept (map full): the
        /// samples of that process before and after it share a name.
        GenerationsFull = "generations_full",
    }
}

/// [`TaskEvent::kind`]: the task called exec (its comm is the new one).
pub const TASK_EXEC: u32 = 1;
/// [`TaskEvent::kind`]: the task is exiting (its comm is the final one).
pub const TASK_EXIT: u32 = 2;
/// [`TaskEvent::kind`]: the task entered execve (its comm is the caller's,
/// the program of generation [`TaskEvent::generation`]).
pub const TASK_EXEC_CALL: u32 = 3;

/// A task exec or exit, sent through [`TASK_EVENTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    /// [`TASK_EXEC`] or [`TASK_EXIT`].
    pub kind: u32,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The process's program generation (see [`KEY_GENERATION_SHIFT`]):
    /// the new program's for [`TASK_EXEC`], the running one's otherwise.
    pub generation: u32,
    /// The task's comm, NUL-padded.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TaskEvent>() == 32);

crate::impl_pod!(CpuConfig, SampleKey, SampleCounts, TaskEvent);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_compare_across_the_wrap() {
        assert!(generation_is_older(0, 1));
        assert!(generation_is_older(0xffff, 0));
        assert!(!generation_is_older(1, 1));
        // Newer than the last exec read: its event is still on the way.
        assert!(!generation_is_older(2, 1));
        assert!(!generation_is_older(0, 0xffff));
        assert_eq!(
            key_generation(KEY_USER_STACK | 7 << KEY_GENERATION_SHIFT),
            7
        );
    }
}
