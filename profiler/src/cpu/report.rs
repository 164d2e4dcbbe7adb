//! From the sampler's counts to profile samples: pure functions of the
//! counts, the stacks read so far and the task names, tested without root.
use std::collections::HashMap;

use profiler_common::cpu::{
    KEY_KERNEL_STACK, KEY_USER_EXEC_SWITCHED, KEY_USER_STACK, KEY_USER_STACK_FAILED, SampleCounts,
    SampleKey, key_generation,
};

use super::{
    Event,
    tasks::{ProcFs, Tasks},
};
use crate::profile::{Collector, RawSample, SampleType, StackStatus};

/// The stacks the samples refer to, by id, as read from the kernel's maps.
#[derive(Default)]
pub(crate) struct Stacks {
    /// Kernel stacks. The kernel's stack map is never cleared during a
    /// session, so an id always names the same stack.
    pub kernel: HashMap<u32, Vec<u64>>,
    /// User stacks: frames and the walker's status (a
    /// `profiler_common::stack::StackStatus` as `u32`). The id is a
    /// hash of the content, so an entry stays right after the map's copy is
    /// deleted.
    pub user: HashMap<u64, (Vec<u64>, u32)>,
}

/// A new collector for `event`'s samples. cpu-clock samples at a fixed
/// period of `1 s / frequency`; cycles at a frequency, where each sample
/// carries its own period.
pub(crate) fn collector(event: Event, frequency: u64) -> Collector {
    let (sample_types, default_type, period_type) = match event {
        Event::CpuClock => (
            vec![SampleType::samples(), SampleType::cpu()],
            "cpu",
            SampleType::cpu(),
        ),
        Event::Cycles => (
            vec![SampleType::samples(), SampleType::cycles()],
            "cycles",
            SampleType::cycles(),
        ),
    };
    let mut c = Collector::new(sample_types, default_type);
    if event == Event::CpuClock {
        c.set_period(period_type, sample_period_ns(frequency) as i64);
    }
    c
}

/// The cpu-clock period of `frequency` samples per second, in nanoseconds.
pub(crate) fn sample_period_ns(frequency: u64) -> u64 {
    1_000_000_000 / frequency.max(1)
}

/// The user side of a sample: frames and how far they go.
///
/// - no user stack flag at all: the idle tasks, which have no user side
///   (complete and empty);
/// - a walk that failed or whose stack is unknown, or a sample inside
///   execve after the switch to the new program's memory: missing;
/// - a missing empty stack of a kernel thread: complete, as it has no user
///   memory to walk;
/// - otherwise the walker's own status (an unknown value stays visible as
///   such).
pub(crate) fn user_side(
    key: &SampleKey,
    stacks: &Stacks,
    is_kthread: impl FnOnce() -> bool,
) -> (Vec<u64>, StackStatus) {
    if key.flags & KEY_USER_STACK == 0 {
        // Inside execve after the switch to the new program's memory, the
        // caller's stack is gone and its mappings may never have been
        // read: missing, rather than named with the new program's.
        let status = if key.flags & (KEY_USER_STACK_FAILED | KEY_USER_EXEC_SWITCHED) != 0 {
            StackStatus::Missing
        } else {
            StackStatus::Complete
        };
        return (Vec::new(), status);
    }
    let Some((frames, raw)) = stacks.user.get(&key.user_stack) else {
        return (Vec::new(), StackStatus::Missing);
    };
    match StackStatus::from_kernel(*raw) {
        StackStatus::Missing if frames.is_empty() && is_kthread() => {
            (Vec::new(), StackStatus::Complete)
        }
        status => (frames.clone(), status),
    }
}

/// One profile sample of a count map entry.
pub(crate) fn sample(
    key: &SampleKey,
    counts: &SampleCounts,
    stacks: &Stacks,
    tasks: &mut Tasks,
    proc: &impl ProcFs,
) -> RawSample {
    let pid = key.pid;
    let kernel = if key.flags & KEY_KERNEL_STACK != 0 {
        stacks
            .kernel
            .get(&key.kernel_stack)
            .cloned()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let generation = key_generation(key.flags);
    let (user, user_status, comm, thread_comm) = if tasks.ran_replaced_program(pid, generation) {
        // Taken before an exec that was seen before the sample was drained
        // (in the program that called it, or inside the call): named after
        // that program, as perf names samples by the comm of their time.
        // Its frames would be named with the new program's mappings, the
        // only ones known: left out, as missing.
        let name = tasks.replaced_program_name(pid, generation);
        (Vec::new(), StackStatus::Missing, name.clone(), name)
    } else {
        let (user, status) = user_side(key, stacks, || tasks.is_kthread(pid, proc));
        let comm = tasks.comm(pid, pid, proc);
        let thread_comm = tasks.comm(key.tid, pid, proc);
        (user, status, comm, thread_comm)
    };
    RawSample {
        pid,
        tid: Some(key.tid),
        thread_comm: (thread_comm != comm).then_some(thread_comm),
        python_thread: None,
        comm,
        user,
        // The user stack starts at a pc, not a return address: the sampled
        // one, or the one saved when the task entered the kernel, which
        // is the faulting instruction of an exception. A page fault on the
        // first instruction of a code segment (a library's `_init`, run
        // once) taken as a return address would name the mapping before it.
        leaf_is_pc: true,
        user_status,
        kernel,
        values: vec![counts.samples as i64, counts.period as i64],
        numeric_labels: Vec::new(),
        leaf_marker: None,
        splices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::{
        cpu::{TASK_EXIT, TaskEvent},
        stack::StackStatus as Walk,
    };

    use super::*;
    use crate::cpu::tasks::tests::{FakeProc, event, stat_line};

    const PF_KTHREAD: u64 = 0x0020_0000;
    const STACK_COMPLETE: u32 = Walk::Complete as u32;
    const STACK_TRUNCATED: u32 = Walk::Truncated as u32;
    const STACK_MISSING: u32 = Walk::Missing as u32;

    fn key(pid: u32, tid: u32, flags: u32) -> SampleKey {
        SampleKey {
            pid,
            tid,
            user_stack: 7,
            kernel_stack: 3,
            flags,
            python_stack: 0,
        }
    }

    fn stacks(user_status: u32, user: &[u64]) -> Stacks {
        Stacks {
            kernel: HashMap::from([(3, vec![0xffff_1000, 0xffff_2000])]),
            user: HashMap::from([(7, (user.to_vec(), user_status))]),
        }
    }

    #[test]
    fn stack_status_follows_the_walker() {
        let never = || panic!("only an empty missing stack asks about kernel threads");
        let got = user_side(
            &key(5, 5, KEY_USER_STACK),
            &stacks(STACK_COMPLETE, &[1, 2]),
            never,
        );
        assert_eq!(got, (vec![1, 2], StackStatus::Complete));
        let got = user_side(
            &key(5, 5, KEY_USER_STACK),
            &stacks(STACK_TRUNCATED, &[1]),
            never,
        );
        assert_eq!(got, (vec![1], StackStatus::Truncated));
        let got = user_side(
            &key(5, 5, KEY_USER_STACK),
            &stacks(STACK_MISSING, &[9]),
            never,
        );
        assert_eq!(got, (vec![9], StackStatus::Missing));
        // A value this build does not know is kept, never guessed.
        let got = user_side(&key(5, 5, KEY_USER_STACK), &stacks(9, &[4]), never);
        assert_eq!(got, (vec![4], StackStatus::Unknown(9)));
        // An id no longer in the map nor read before.
        let got = user_side(&key(5, 5, KEY_USER_STACK), &Stacks::default(), never);
        assert_eq!(got, (vec![], StackStatus::Missing));
        // The walk could not start.
        let got = user_side(&key(5, 5, KEY_USER_STACK_FAILED), &Stacks::default(), never);
        assert_eq!(got, (vec![], StackStatus::Missing));
        // The idle tasks: no user side.
        let got = user_side(&key(0, 0, KEY_KERNEL_STACK), &Stacks::default(), never);
        assert_eq!(got, (vec![], StackStatus::Complete));
    }

    #[test]
    fn a_sample_in_execve_after_the_switch_has_no_user_stack() {
        let never = || panic!("no kernel-thread check for a user task");
        let got = user_side(
            &key(5, 5, KEY_USER_EXEC_SWITCHED),
            &Stacks::default(),
            never,
        );
        assert_eq!(got, (Vec::new(), StackStatus::Missing));
    }

    #[test]
    fn a_sample_of_a_program_replaced_by_exec_is_named_after_it() {
        use profiler_common::cpu::{KEY_GENERATION_SHIFT, TASK_EXEC, TASK_EXEC_CALL};
        let proc = FakeProc::default();
        let mut tasks = Tasks::default();
        let at = |generation: u32| key(40, 40, KEY_USER_STACK | generation << KEY_GENERATION_SHIFT);
        let with = |kind, generation, comm: &str| TaskEvent {
            generation,
            ..event(kind, 40, 40, comm)
        };
        let counts = SampleCounts {
            samples: 1,
            period: 1,
        };
        let frames = stacks(STACK_COMPLETE, &[1, 2]);
        // The spawning child calls execve, then the new program runs.
        tasks.apply(&with(TASK_EXEC_CALL, 0, "spawner"));
        tasks.apply(&with(TASK_EXEC, 1, "bpftrace"));
        let old = sample(&at(0), &counts, &frames, &mut tasks, &proc);
        assert_eq!(old.comm, "spawner");
        assert_eq!(old.thread_comm, None);
        assert_eq!((old.user, old.user_status), (vec![], StackStatus::Missing));
        let new = sample(&at(1), &counts, &frames, &mut tasks, &proc);
        assert_eq!(new.comm, "bpftrace");
        assert_eq!(
            (new.user, new.user_status),
            (vec![1, 2], StackStatus::Complete)
        );
        // Taken after an exec whose event is not read yet: the newest
        // program, whatever it is called by then.
        let newer = sample(&at(2), &counts, &frames, &mut tasks, &proc);
        assert_eq!(newer.comm, "bpftrace");
        // A shell that execs without announcing the call (its exec call
        // event was lost): the name known before the exec.
        tasks.apply(&with(TASK_EXEC, 2, "rustc"));
        let wrapper = sample(&at(1), &counts, &frames, &mut tasks, &proc);
        assert_eq!(wrapper.comm, "bpftrace");
        assert_eq!(wrapper.user_status, StackStatus::Missing);
    }

    #[test]
    fn kernel_thread_without_user_stack_is_complete() {
        let missing = stacks(STACK_MISSING, &[]);
        let k = key(2, 2, KEY_USER_STACK | KEY_KERNEL_STACK);
        assert_eq!(
            user_side(&k, &missing, || true),
            (vec![], StackStatus::Complete)
        );
        // The same stack in a user process is a stack that could not be read.
        assert_eq!(
            user_side(&k, &missing, || false),
            (vec![], StackStatus::Missing)
        );
    }

    #[test]
    fn sample_of_a_kernel_thread() {
        let mut tasks = Tasks::default();
        let proc = FakeProc {
            comms: HashMap::from([((2, 2), "kthreadd".to_owned())]),
            stats: HashMap::from([(2, stat_line(2, PF_KTHREAD))]),
        };
        let counts = SampleCounts {
            samples: 4,
            period: 4_000_000,
        };
        let s = sample(
            &key(2, 2, KEY_USER_STACK | KEY_KERNEL_STACK),
            &counts,
            &stacks(STACK_MISSING, &[]),
            &mut tasks,
            &proc,
        );
        assert_eq!(s.comm, "kthreadd");
        assert_eq!(s.thread_comm, None);
        assert_eq!(s.kernel, vec![0xffff_1000, 0xffff_2000]);
        assert_eq!(s.user_status, StackStatus::Complete);
        assert!(s.leaf_is_pc, "the saved user pc is a pc");
        assert_eq!(s.values, vec![4, 4_000_000]);
    }

    #[test]
    fn sample_of_an_exited_thread_uses_its_final_names() {
        let mut tasks = Tasks::default();
        let proc = FakeProc::default();
        tasks.apply(&event(TASK_EXIT, 50, 51, "worker"));
        tasks.apply(&event(TASK_EXIT, 50, 50, "server"));
        let s = sample(
            &key(50, 51, KEY_USER_STACK),
            &SampleCounts {
                samples: 1,
                period: 10,
            },
            &stacks(STACK_COMPLETE, &[0x401000]),
            &mut tasks,
            &proc,
        );
        assert_eq!(s.comm, "server");
        assert_eq!(s.thread_comm.as_deref(), Some("worker"));
        assert_eq!(s.user, vec![0x401000]);
        assert!(s.leaf_is_pc, "sampled in user space");
        assert!(s.kernel.is_empty());
    }

    #[test]
    fn cpu_clock_period_is_one_over_the_frequency() {
        assert_eq!(sample_period_ns(99), 10_101_010);
        assert_eq!(sample_period_ns(1000), 1_000_000);
        assert_eq!(sample_period_ns(0), 1_000_000_000);
        let profile = collector(Event::CpuClock, 100).finish().unwrap();
        assert_eq!(profile.period, 10_000_000);
        let profile = collector(Event::Cycles, 100).finish().unwrap();
        assert_eq!(profile.period, 0);
        assert_eq!(profile.sample_types[1].kind, "cycles");
    }
}
