//! The loaded and attached sampler: its configuration, the two count maps
//! it alternates between, the stack maps, and the task event ring buffer.
use std::time::Duration;

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{
        PerfEvent, TracePoint,
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use log::{debug, info, warn};
use profiler_common::{
    cpu::{
        CONFIG_MAP, COUNTS_MAPS, CpuConfig, KEY_KERNEL_STACK, KEY_USER_STACK, PIDS_MAP,
        SampleCounts, SampleKey, TASK_EVENTS_MAP, TaskEvent,
    },
    stack::{KERNEL_STACKS_MAP, USER_STACKS_MAP, UserStack},
};

use super::{Event, Settings, Targets, report::Stacks};
use crate::ebpf;

/// Time given to samplers still running on other CPUs after the flip.
/// Perf-event programs run with preemption off and take microseconds.
const FLIP_GRACE: Duration = Duration::from_millis(5);

pub(crate) struct Sampler {
    config: Array<MapData, CpuConfig>,
    config_value: CpuConfig,
    counts: [PerCpuHashMap<MapData, SampleKey, SampleCounts>; 2],
    pids: BpfHashMap<MapData, u32, u32>,
    kernel_stacks: StackTraceMap<MapData>,
    user_stacks: BpfHashMap<MapData, u64, UserStack>,
    /// Taken by the session, which waits on it.
    pub task_events: Option<RingBuf<MapData>>,
    /// User stacks read from the map since the last drain.
    user_stacks_read: Vec<u64>,
    pub cpus: usize,
}

impl Sampler {
    /// Configures the sampler and attaches it to every online CPU.
    pub fn new(ebpf: &mut aya::Ebpf, settings: &Settings) -> anyhow::Result<Self> {
        let take = |ebpf: &mut aya::Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let mut config: Array<MapData, CpuConfig> = take(ebpf, CONFIG_MAP)?.try_into()?;
        let follow_forks = matches!(settings.targets, Targets::Launch(_));
        let config_value = CpuConfig {
            active_counts: 0,
            include_idle: u32::from(settings.idle),
            filter_pids: u32::from(settings.targets != Targets::All),
            user_stacks: 1,
            follow_forks: u32::from(follow_forks),
            fork_child_pid_offset: fork_child_pid_offset()?,
            stop_at_ns: 0,
        };
        config
            .set(0, config_value, 0)
            .context("writing the sampler configuration")?;
        let mut sampler = Self {
            config,
            config_value,
            counts: [
                take(ebpf, COUNTS_MAPS[0])?.try_into()?,
                take(ebpf, COUNTS_MAPS[1])?.try_into()?,
            ],
            pids: take(ebpf, PIDS_MAP)?.try_into()?,
            kernel_stacks: take(ebpf, KERNEL_STACKS_MAP)?.try_into()?,
            user_stacks: take(ebpf, USER_STACKS_MAP)?.try_into()?,
            task_events: Some(take(ebpf, TASK_EVENTS_MAP)?.try_into()?),
            user_stacks_read: Vec::new(),
            cpus: 0,
        };
        for &pid in settings.pids() {
            sampler.add_pid(pid)?;
        }
        // Task events first, so no exec in the first samples goes unseen.
        // The fork tracepoint also forgets what a reused thread id's
        // previous owner left (`last_stack` in the eBPF programs); the
        // execve entries tell the samples after execve's switch apart.
        let tracepoints: [(&str, &str, &[&str]); 4] = [
            ("cpu_task_exec", "sched", &["sched_process_exec"]),
            ("cpu_task_exit", "sched", &["sched_process_exit"]),
            ("cpu_task_fork", "sched", &[FORK_TRACEPOINT]),
            (
                "cpu_exec_entry",
                "syscalls",
                &["sys_enter_execve", "sys_enter_execveat"],
            ),
        ];
        for (program, category, names) in tracepoints {
            let tp: &mut TracePoint = ebpf::program(ebpf, program)?;
            for name in names {
                tp.attach(category, name)
                    .with_context(|| format!("attaching to the tracepoint {category}:{name}"))?;
            }
        }
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        let perf: &mut PerfEvent = ebpf::program(ebpf, "cpu_sample")?;
        let (event, policy) = match settings.event {
            // cpu-clock counts nanoseconds: a fixed period gives exactly
            // `frequency` samples per second of CPU time.
            Event::CpuClock => (
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                SamplePolicy::Period(super::report::sample_period_ns(settings.frequency)),
            ),
            Event::Cycles => (
                PerfEventConfig::Hardware(HardwareEvent::CpuCycles),
                SamplePolicy::Frequency(settings.frequency),
            ),
        };
        for &cpu in &cpus {
            perf.attach(
                event,
                PerfEventScope::AllProcessesOneCpu { cpu },
                policy,
                false,
            )
            .map_err(|e| attach_error(&e, settings.event, cpu))?;
        }
        info!("sampler attached on {} CPUs", cpus.len());
        sampler.cpus = cpus.len();
        Ok(sampler)
    }

    /// Stops counting samples `duration` from now, in the kernel: the
    /// profile covers `--duration` even when user space is late to stop
    /// (building a large unwind table, say).
    pub fn stop_after(&mut self, duration: Duration) -> anyhow::Result<()> {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.config_value.stop_at_ns = monotonic_ns().saturating_add(nanos);
        self.config
            .set(0, self.config_value, 0)
            .context("writing the sampler's end time")
    }

    /// Samples process `pid` too (with a pid filter).
    pub fn add_pid(&mut self, pid: u32) -> anyhow::Result<()> {
        self.pids
            .insert(pid, 0, 0)
            .with_context(|| format!("adding pid {pid} to the sampler's filter"))
    }

    /// Moves the sampler to the other count map and returns every count of
    /// the previous one, deleting them, with the stacks they refer to read
    /// into `stacks`.
    pub fn drain(&mut self, stacks: &mut Stacks) -> anyhow::Result<Vec<(SampleKey, SampleCounts)>> {
        // The user stacks read last time are cached in `stacks` by their
        // content hash, so the map's copies can go: the map then only holds
        // the stacks of the current interval and never fills up on long
        // sessions. A sample already counted under a deleted id finds it in
        // the cache; a new sample with that stack stores it again.
        for id in std::mem::take(&mut self.user_stacks_read) {
            let _ = self.user_stacks.remove(&id);
        }
        let old = self.config_value.active_counts as usize & 1;
        self.config_value.active_counts = (old as u32) ^ 1;
        self.config
            .set(0, self.config_value, 0)
            .context("switching the sampler's count map")?;
        std::thread::sleep(FLIP_GRACE);
        let map = &mut self.counts[old];
        let mut entries = Vec::new();
        for item in map.iter() {
            match item {
                Ok((key, per_cpu)) => {
                    let sum = per_cpu
                        .iter()
                        .fold(SampleCounts::default(), |acc, c| SampleCounts {
                            samples: acc.samples + c.samples,
                            period: acc.period + c.period,
                        });
                    entries.push((key, sum));
                }
                // The key was deleted under us or the iteration restarted.
                Err(e) => debug!("reading a sample count: {e}"),
            }
        }
        for (key, _) in &entries {
            let _ = map.remove(key);
        }
        debug!("drained {} keys from {}", entries.len(), COUNTS_MAPS[old]);
        for (key, _) in &entries {
            self.read_stacks(key, stacks);
        }
        Ok(entries)
    }

    /// User stack `id` as the unwinder stored it, for other readers of the
    /// map this sampler holds (the agent's heap collector).
    pub fn user_stack(&self, id: u64) -> Option<UserStack> {
        self.user_stacks.get(&id, 0).ok()
    }

    /// Reads the stacks of `key` not read yet.
    fn read_stacks(&mut self, key: &SampleKey, stacks: &mut Stacks) {
        if key.flags & KEY_KERNEL_STACK != 0 && !stacks.kernel.contains_key(&key.kernel_stack) {
            match self.kernel_stacks.get(&key.kernel_stack, 0) {
                Ok(trace) => {
                    let frames = trace.frames().iter().map(|f| f.ip).collect();
                    stacks.kernel.insert(key.kernel_stack, frames);
                }
                Err(e) => warn!("kernel stack {} unreadable: {e}", key.kernel_stack),
            }
        }
        if key.flags & KEY_USER_STACK != 0
            && !stacks.user.contains_key(&key.user_stack)
            && let Ok(stack) = self.user_stacks.get(&key.user_stack, 0)
        {
            stacks
                .user
                .insert(key.user_stack, (stack.frames().to_vec(), stack.status));
            self.user_stacks_read.push(key.user_stack);
        }
    }
}

/// CLOCK_MONOTONIC now, in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The tracepoint through which a launched command's descendants are
/// followed, and reused thread ids seen.
const FORK_TRACEPOINT: &str = "sched_process_fork";

/// The offset of `child_pid` in this kernel's fork tracepoint records.
fn fork_child_pid_offset() -> anyhow::Result<u32> {
    let paths = [
        format!("/sys/kernel/tracing/events/sched/{FORK_TRACEPOINT}/format"),
        format!("/sys/kernel/debug/tracing/events/sched/{FORK_TRACEPOINT}/format"),
    ];
    let text = paths
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .with_context(|| format!("reading {} (is tracefs mounted?)", paths[0]))?;
    field_offset(&text, "child_pid").with_context(|| format!("no child_pid field in {}", paths[0]))
}

/// The offset of field `name` in a tracepoint `format` file.
fn field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.rsplit(' ').next()? != name {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:"))?.parse().ok()
    })
}

/// Reads every queued exec/exit event.
pub(crate) fn task_events(ring: &mut RingBuf<MapData>) -> Vec<TaskEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < size_of::<TaskEvent>() {
            continue;
        }
        // SAFETY: the buffer holds at least one TaskEvent (checked above),
        // a plain-old-data type; read_unaligned copes with any alignment.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    events
}

/// Checks that the machine counts `event` before anything is loaded, so
/// that a session that cannot sample fails with its one-line error alone
/// (not after the unwind tables' preload has reported itself): opens, and
/// closes, a disabled counter of it on CPU 0.
pub(crate) fn check_event(event: Event) -> anyhow::Result<()> {
    if event != Event::Cycles {
        return Ok(());
    }
    // perf_event_attr, as far as this needs: type (0: hardware) and size
    // (112 bytes, version 5) in the first word, config 0 (cycles), and the
    // flags word with `disabled` set.
    let mut attr = [0u64; 16];
    attr[0] = 112 << 32;
    attr[5] = 1;
    // SAFETY: attr is a zeroed perf_event_attr of the size it states.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1i32,
            0i32,
            -1i32,
            0u64,
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(unavailable(event, err.raw_os_error())
            .unwrap_or_else(|| anyhow::anyhow!("opening a cycle counter: {err}")));
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// The message for `event` when the kernel refused it with `errno`, if
/// that refusal means the machine has no such counter.
fn unavailable(event: Event, errno: Option<i32>) -> Option<anyhow::Error> {
    matches!(
        (event, errno),
        (
            Event::Cycles,
            Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV | libc::EINVAL)
        )
    )
    .then(|| {
        anyhow::anyhow!(
            "--event cycles is not available: this machine offers no hardware cycle counter \
             (virtual machine without a PMU?); use --event cpu-clock"
        )
    })
}

/// Turns a failed perf-event attach into an actionable message.
fn attach_error(err: &aya::programs::ProgramError, event: Event, cpu: u32) -> anyhow::Error {
    let io = match err {
        aya::programs::ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    unavailable(event, io)
        .unwrap_or_else(|| anyhow::anyhow!("attaching the sampler to CPU {cpu}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_child_pid_offset_follows_the_format_file() {
        // Linux 6.x: comms as __data_loc strings.
        let recent = "name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";
        assert_eq!(field_offset(recent, "child_pid"), Some(20));
        assert_eq!(field_offset(recent, "parent_pid"), Some(12));
        // Older kernels: comms inline as char[16].
        let older = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";
        assert_eq!(field_offset(older, "child_pid"), Some(44));
        assert_eq!(field_offset(older, "child"), None);
    }
}
