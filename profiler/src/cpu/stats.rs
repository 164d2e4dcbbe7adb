//! The sampler's counters as the report shows them: the profile's comments,
//! the closing summary line and the live status line on stderr.
use std::time::Duration;

use profiler_common::cpu::CpuCounter;

use crate::runtime::counters::Counts;

/// The sampler's counters, summed over the CPUs.
pub(crate) type Counters = Counts<CpuCounter>;

/// Samples of the selected tasks within the duration (counted in the
/// profile or lost).
fn selected(c: &Counters) -> u64 {
    c.get(CpuCounter::Samples).saturating_sub(
        c.get(CpuCounter::Idle) + c.get(CpuCounter::Filtered) + c.get(CpuCounter::AfterDuration),
    )
}

/// Samples lost: the count map was full.
fn lost(c: &Counters) -> u64 {
    c.get(CpuCounter::CountsFull)
}

/// How the samples were taken.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sampling {
    pub event: &'static str,
    pub frequency: u64,
    pub cpus: usize,
    pub elapsed: Duration,
}

/// One line for stderr at the end: what was sampled and everything lost.
pub(crate) fn summary(c: &Counters, s: &Sampling) -> String {
    format!(
        "{} samples of {} taken ({} at {} Hz on {} CPUs for {:.1} s); \
         lost: {} (count map full); stacks not recorded: {} kernel, {} user; \
         task events lost: {}; forks not followed: {}; \
         after exit released the memory: {} samples with the stack walked at exit \
         ({} exits walked, {} not); inside execve after the switch: {} samples \
         without user stack; execs not told apart: {}",
        selected(c),
        c.get(CpuCounter::Samples),
        s.event,
        s.frequency,
        s.cpus,
        s.elapsed.as_secs_f64(),
        lost(c),
        c.get(CpuCounter::KernelStackFailed),
        c.get(CpuCounter::UserStackFailed),
        c.get(CpuCounter::TaskEventsLost),
        c.get(CpuCounter::PidsFull),
        c.get(CpuCounter::SamplesWithExitStack),
        c.get(CpuCounter::ExitStacksRecorded),
        c.get(CpuCounter::ExitStacksNotRecorded),
        c.get(CpuCounter::SamplesInExecAfterSwitch),
        c.get(CpuCounter::GenerationsFull),
    )
}

/// The profile's comments: how it was taken, and every counter.
pub(crate) fn comments(c: &Counters, s: &Sampling) -> Vec<String> {
    vec![
        format!(
            "prof-bpf cpu: {} at {} Hz on {} CPUs for {:.1} s",
            s.event,
            s.frequency,
            s.cpus,
            s.elapsed.as_secs_f64()
        ),
        c.comment("sampler"),
    ]
}

/// The live status line: samples per second since the previous line.
#[derive(Default)]
pub(crate) struct Status {
    /// Seconds into the session and selected samples at the previous line.
    last: Option<(f64, u64)>,
}

impl Status {
    /// The line at `elapsed` into the session, for `processes` sampled ones.
    pub fn line(&mut self, c: &Counters, elapsed: Duration, processes: usize) -> String {
        let now = elapsed.as_secs_f64();
        let (since, before) = self.last.unwrap_or((0.0, 0));
        let rate = selected(c).saturating_sub(before) as f64 / (now - since).max(1e-3);
        self.last = Some((now, selected(c)));
        format!(
            "prof-bpf: cpu {now:.0} s: {rate:.0} samples/s, {processes} processes, lost {}",
            lost(c)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Counters {
        // Samples, Idle, Filtered, CountsFull, KernelStackFailed,
        // UserStackFailed, TaskEventsLost, PidsFull, AfterDuration,
        // ExitStacksRecorded, ExitStacksNotRecorded, SamplesWithExitStack,
        // SamplesInExecAfterSwitch, GenerationsFull.
        Counters::from_values(vec![1000, 300, 100, 7, 2, 3, 1, 4, 9, 5, 1, 40, 6, 8])
    }

    const SAMPLING: Sampling = Sampling {
        event: "cpu-clock",
        frequency: 99,
        cpus: 2,
        elapsed: Duration::from_millis(5_000),
    };

    #[test]
    fn summary_counts_selected_samples_and_every_loss() {
        assert_eq!(
            summary(&counters(), &SAMPLING),
            "591 samples of 1000 taken (cpu-clock at 99 Hz on 2 CPUs for 5.0 s); \
             lost: 7 (count map full); stacks not recorded: 2 kernel, 3 user; \
             task events lost: 1; forks not followed: 4; \
             after exit released the memory: 40 samples with the stack walked at exit \
             (5 exits walked, 1 not); inside execve after the switch: 6 samples \
             without user stack; execs not told apart: 8"
        );
    }

    #[test]
    fn comments_name_every_counter() {
        let comments = comments(&counters(), &SAMPLING);
        assert_eq!(
            comments,
            [
                "prof-bpf cpu: cpu-clock at 99 Hz on 2 CPUs for 5.0 s",
                "sampler: samples 1000, idle 300, filtered 100, counts_full 7, \
                 kernel_stack_failed 2, user_stack_failed 3, task_events_lost 1, pids_full 4, \
                 after_duration 9, exit_stacks_recorded 5, exit_stacks_not_recorded 1, \
                 samples_with_exit_stack 40, samples_in_execve_after_switch 6, \
                 generations_full 8"
            ]
        );
    }

    #[test]
    fn status_rate_is_since_the_previous_line() {
        let mut status = Status::default();
        let first = status.line(&counters(), Duration::from_secs(3), 3);
        assert_eq!(
            first,
            "prof-bpf: cpu 3 s: 197 samples/s, 3 processes, lost 7"
        );
        let later = Counters::from_values(vec![2000, 300, 100, 7, 2, 3, 1, 4, 9, 5, 1, 40, 6]);
        let second = status.line(&later, Duration::from_secs(13), 4);
        assert_eq!(
            second,
            "prof-bpf: cpu 13 s: 100 samples/s, 4 processes, lost 7"
        );
    }
}
