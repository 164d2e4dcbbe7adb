//! Exec and exit events without the CPU collector (`--no-cpu`): the
//! sampler's `sched_process_exec` and `sched_process_exit` tracepoint
//! programs alone, so that a process that runs a new program (a shell
//! that execs a program under libprofalloc.so) is examined again at once,
//! not at the next interval's cut.
use anyhow::Context as _;
use aya::{
    maps::{MapData, RingBuf},
    programs::TracePoint,
};
use profiler_common::cpu::{TASK_EVENTS_MAP, TaskEvent};

use crate::{
    cpu::{
        task_watch,
        tasks::{Change, Tasks},
    },
    ebpf,
};

/// See the module docs.
pub(crate) struct TaskWatch {
    events: task_watch::TaskWatch,
    tasks: Tasks,
}

impl TaskWatch {
    /// Attaches the two tracepoint programs (the sampler's configuration
    /// map is left zeroed: every process's events are sent).
    pub fn attach(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let ring: RingBuf<MapData> = ebpf
            .take_map(TASK_EVENTS_MAP)
            .with_context(|| format!("map {TASK_EVENTS_MAP} missing from the eBPF object"))?
            .try_into()?;
        for (program, name) in [
            ("cpu_task_exec", "sched_process_exec"),
            ("cpu_task_exit", "sched_process_exit"),
        ] {
            let tp: &mut TracePoint = ebpf::program(ebpf, program)?;
            tp.attach("sched", name)
                .with_context(|| format!("attaching to the tracepoint sched:{name}"))?;
        }
        let events =
            task_watch::TaskWatch::start(ring).context("starting the task event thread")?;
        Ok(Self {
            events,
            tasks: Tasks::default(),
        })
    }

    /// Waits for task events and returns them with what they change
    /// (cancel-safe).
    pub async fn next(&mut self) -> anyhow::Result<Vec<(TaskEvent, Change)>> {
        let events = self.events.next().await;
        let changes = events
            .into_iter()
            .map(|e| {
                let change = self.tasks.apply(&e);
                (e, change)
            })
            .collect();
        // Only the changes matter here: names are not kept.
        self.tasks = Tasks::default();
        Ok(changes)
    }
}
