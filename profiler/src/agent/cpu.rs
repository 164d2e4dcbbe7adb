//! The agent's CPU collector: the `cpu` subcommand's sampler, drained every
//! second into one collector per process for the current interval (a
//! process's addresses are placed while it lives), and its task events
//! (exec, exit), which the agent shares with the heap collector and the
//! unwind tables.
use std::{collections::HashMap, sync::Arc};

use anyhow::Context as _;
use profiler_common::{
    cpu::{KEY_PYTHON_STACK, TaskEvent},
    stack::UserStack,
};

use super::{
    python::AgentPython,
    scope::{Facts, Scope},
};
use crate::{
    cpu::{
        Event, Settings, Targets,
        report::{self, Stacks},
        sampler::Sampler,
        stats::Counters,
        task_watch::TaskWatch,
        tasks::{Change, LiveProc, Tasks},
    },
    profile::Collector,
    symbolize::MapsCache,
};

/// User stacks kept by content hash before the cache is emptied (about
/// 1 KiB each).
const MAX_CACHED_USER_STACKS: usize = 50_000;

/// The CPU side of the agent.
pub(crate) struct CpuCollector {
    sampler: Sampler,
    events: TaskWatch,
    tasks: Tasks,
    stacks: Stacks,
    frequency: u64,
    /// This interval's collector of each process sampled.
    interval: HashMap<u32, Collector>,
    /// Samples per process since the last table update (the busiest get
    /// unwind tables first).
    pub recent_samples: HashMap<u32, u64>,
    /// Whether each process sampled is profiled (decided at its first sample).
    in_scope: HashMap<u32, bool>,
    /// Mappings shared with the heap profiles and kept across intervals.
    maps_cache: Arc<MapsCache>,
}

impl CpuCollector {
    /// Attaches the sampler at `frequency` Hz on every CPU (only the --pid
    /// processes when the scope is just those).
    pub fn new(
        ebpf: &mut aya::Ebpf,
        frequency: u64,
        scope: &Scope,
        maps_cache: Arc<MapsCache>,
    ) -> anyhow::Result<Self> {
        let only_pids = scope.pids_only();
        let settings = Settings {
            targets: if only_pids {
                Targets::Pids(scope.pids().to_vec())
            } else {
                Targets::All
            },
            frequency,
            duration: None,
            interval: None,
            python_lines: crate::python::PythonLines::On,
            python_gil: false,
            idle: false,
            event: Event::CpuClock,
            // The agent's own walker tracker (see `agent::python`) decides
            // which processes are walked.
            python_frames: crate::python::PythonFrames::Mixed,
            // The agent's tables are its own (see the agent's session).
            unwind: crate::unwind::UnwindOptions::default(),
        };
        let mut sampler = Sampler::new(ebpf, &settings)?;
        let ring = sampler
            .task_events
            .take()
            .context("task event ring buffer")?;
        let events = TaskWatch::start(ring).context("starting the task event thread")?;
        Ok(Self {
            sampler,
            events,
            tasks: Tasks::default(),
            stacks: Stacks::default(),
            frequency,
            interval: HashMap::new(),
            recent_samples: HashMap::new(),
            in_scope: HashMap::new(),
            maps_cache,
        })
    }

    /// CPUs sampled.
    pub fn cpus(&self) -> usize {
        self.sampler.cpus
    }

    /// A user stack by id, from the map the sampler holds.
    pub fn user_stack(&self, id: u64) -> Option<UserStack> {
        self.sampler.user_stack(id)
    }

    /// Waits for task events and returns them once applied to the task
    /// names (cancel-safe).
    pub async fn task_events(&mut self) -> anyhow::Result<Vec<(TaskEvent, Change)>> {
        let events = self.events.next().await;
        Ok(events
            .into_iter()
            .map(|e| {
                let change = self.tasks.apply(&e);
                if let Change::Exec(pid) = change {
                    self.in_scope.remove(&pid);
                }
                (e, change)
            })
            .collect())
    }

    /// The command name `pid` had when it was last seen (its exit event).
    pub fn last_name(&mut self, pid: u32) -> Option<String> {
        let name = self.tasks.comm(pid, pid, &LiveProc);
        (name != "?").then_some(name)
    }

    pub fn has_exited(&self, pid: u32) -> bool {
        self.tasks.has_exited(pid)
    }

    /// Feeds every count since the last drain to the interval's collectors
    /// of the processes in `scope` (kernel threads and the idle task are
    /// not processes of anyone's), Python frames spliced in.
    pub fn drain(&mut self, scope: &Scope, python: &mut AgentPython) -> anyhow::Result<()> {
        for (key, counts) in self.sampler.drain(&mut self.stacks)? {
            let pid = key.pid;
            if pid == 0 || pid == std::process::id() {
                continue;
            }
            let profiled = *self
                .in_scope
                .entry(pid)
                .or_insert_with(|| scope.everything() || scope.profiles(&Facts::read(pid)));
            if !profiled || self.tasks.is_kthread(pid, &LiveProc) {
                continue;
            }
            *self.recent_samples.entry(pid).or_default() += counts.samples;
            python.look(pid);
            let mut sample =
                report::sample(&key, &counts, &self.stacks, &mut self.tasks, &LiveProc);
            if key.flags & KEY_PYTHON_STACK != 0 {
                python.merge(pid, key.python_stack, &mut sample);
            }
            let frequency = self.frequency;
            let maps_cache = &self.maps_cache;
            self.interval
                .entry(pid)
                .or_insert_with(|| {
                    let mut c = report::collector(Event::CpuClock, frequency);
                    c.share_maps(Arc::clone(maps_cache));
                    c.note_process(pid);
                    c
                })
                .add(sample);
        }
        Ok(())
    }

    /// The processes sampled in this interval so far.
    pub fn sampled(&self) -> impl Iterator<Item = u32> + '_ {
        self.interval.keys().copied()
    }

    /// The interval's collectors, one per process sampled; a new interval starts.
    pub fn cut(
        &mut self,
        scope: &Scope,
        python: &mut AgentPython,
    ) -> anyhow::Result<Vec<(u32, Collector)>> {
        self.drain(scope, python)?;
        // What was learnt of tasks is for the interval: processes are
        // decided and named again in the next (a pid may be reused), and
        // nothing grows with the number of processes ever seen.
        self.in_scope.clear();
        self.tasks = Tasks::default();
        if self.stacks.user.len() > MAX_CACHED_USER_STACKS {
            // A sample counted under an id whose map copy is gone shows as
            // a missing user stack (counted), never as a wrong one.
            self.stacks.user.clear();
        }
        Ok(self.interval.drain().collect())
    }

    /// The sampler's counters (lost samples, truncated stacks).
    pub fn counters(ebpf: &aya::Ebpf) -> anyhow::Result<Counters> {
        Counters::read(ebpf, profiler_common::cpu::STATS_MAP)
    }
}
