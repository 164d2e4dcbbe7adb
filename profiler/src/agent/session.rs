//! The agent's loop: one BPF object, one unwind-table manager and one
//! process view for both collectors; every interval, one profile per
//! process and kind to the sinks; on SIGTERM or Ctrl-C, the partial
//! interval too, then a bounded flush.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::Ebpf;
use log::{debug, info, warn};
use profiler_common::{
    cpu::CpuCounter,
    heap::HeapCounter,
    stack::{UNWIND_STATS_MAP, UnwindCounter, UserStack},
};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    Settings,
    cpu::CpuCollector,
    emit::{Emitter, Job},
    heap::HeapCollector,
    metrics_http::{CollectorCounters, MetricsServer, Readings},
    name_process,
    python::AgentPython,
    tasks::TaskWatch,
};
use crate::{
    cpu::budget::{self, Budget},
    cpu::tasks::Change,
    ebpf, heap, process,
    runtime::{Stop, StopEvent, counters::Counts},
    sinks::{ProfileKind, Sinks, Source},
    symbolize::MapsCache,
    unwind::Tables,
};

mod lines;
use lines::{banner, counters_line};

/// How long the last profiles may take to reach the sinks at exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often CPU counts are drained, new processes looked at, unwind
/// tables served and the uprobe ceiling enforced.
const TICK: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM, Ctrl-C or `--duration`.
pub(crate) async fn run(settings: Settings) -> anyhow::Result<()> {
    // Signals first: one that arrives while attaching still flushes.
    let mut stop = Stop::without_hangup()?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // --metrics before attaching: a bad address fails at once. What a
    // scrape shows is refreshed every tick.
    let readings = Arc::new(Mutex::new(Readings::default()));
    let _metrics = match &settings.metrics {
        Some(addr) => {
            let shared = Arc::clone(&readings);
            let server = MetricsServer::start(
                addr,
                Arc::new(move || shared.lock().map(|r| r.clone()).unwrap_or_default()),
            )?;
            eprintln!(
                "prof-bpf: agent: metrics at http://{}/metrics",
                server.local_addr()
            );
            Some(server)
        }
        None => None,
    };
    let mut agent = Agent::start(settings)?;
    let started = tokio::time::Instant::now();
    if let Some(duration) = agent.settings.duration {
        stop.set_deadline(started + duration);
    }
    let mut tick = tokio::time::interval_at(started + TICK, TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let period = agent.settings.interval;
    let mut interval = tokio::time::interval_at(started + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            // In this order when several are due (after a long table
            // build): an interval that ended is cut before a stop.
            biased;
            _ = interval.tick() => agent.cut(),
            event = stop.next() => match event {
                StopEvent::Exited(_) => {}
                StopEvent::Stop(reason) => break reason,
            },
            events = task_events(&mut agent.cpu, &mut agent.task_watch) => agent.task_events(events?),
            _ = tick.tick() => {
                agent.tick();
                if _metrics.is_some()
                    && let Ok(mut shown) = readings.lock()
                {
                    *shown = agent.readings();
                }
            }
            _ = hangup.recv() => agent.reload(),
        }
    };
    eprintln!("prof-bpf: agent: stopping ({reason}): sending the partial interval");
    agent.cut();
    agent.finish().await;
    Ok(())
}

/// The next task events: the CPU collector's, or without it the
/// tracepoints' alone.
async fn task_events(
    cpu: &mut Option<CpuCollector>,
    watch: &mut Option<TaskWatch>,
) -> anyhow::Result<Vec<(profiler_common::cpu::TaskEvent, Change)>> {
    match (cpu, watch) {
        (Some(cpu), _) => cpu.task_events().await,
        (None, Some(watch)) => watch.next().await,
        (None, None) => std::future::pending().await,
    }
}

/// Everything the agent holds while it runs.
struct Agent {
    settings: Settings,
    ebpf: Ebpf,
    tables: Tables,
    table_budget: Budget<Instant>,
    heap: Option<HeapCollector>,
    cpu: Option<CpuCollector>,
    /// Exec and exit events when there is no CPU collector.
    task_watch: Option<TaskWatch>,
    /// Processes' mappings, shared by both collectors' profiles.
    maps_cache: Arc<MapsCache>,
    python: AgentPython,
    sinks: Arc<Sinks>,
    emitter: Emitter,
    /// The last name of each process profiled (kept after it exits).
    sources: HashMap<u32, Arc<Source>>,
    /// Wall-clock start of the current interval, and its monotonic twin.
    interval_start: (SystemTime, Instant),
    intervals: u64,
}

impl Agent {
    fn start(settings: Settings) -> anyhow::Result<Self> {
        let sinks = Arc::new(Sinks::start(settings.sinks.clone(), &settings.delivery)?);
        let with_heap = settings.heap;
        let mut ebpf = ebpf::load_with(|loader| {
            if with_heap {
                HeapCollector::map_sizes(loader);
            }
        })?;
        ebpf::spawn_logger(&mut ebpf);
        eprintln!("prof-bpf: agent: {}", settings.unwind.start_line());
        let mut tables = Tables::with_options(&mut ebpf, &settings.unwind)?;
        tables.preload(!settings.scope.pids_only());
        // The named processes' tables before any probe: their first stacks
        // are complete.
        for &pid in settings.scope.pids() {
            if let Err(err) = tables.add_process(pid) {
                warn!("pid {pid}: no unwind tables, stacks follow frame pointers only: {err:#}");
            }
        }
        let mut python = AgentPython::new(&mut ebpf, settings.heap, &settings.scope)?;
        let maps_cache = Arc::new(MapsCache::default());
        let mut heap = if settings.heap {
            Some(HeapCollector::new(
                &mut ebpf,
                settings.sample_bytes,
                settings.max_uprobe_rate,
                Arc::clone(&maps_cache),
            )?)
        } else {
            None
        };
        let cpu = if settings.cpu {
            Some(CpuCollector::new(
                &mut ebpf,
                settings.frequency,
                &settings.scope,
                Arc::clone(&maps_cache),
            )?)
        } else {
            None
        };
        let task_watch = if cpu.is_none() {
            Some(TaskWatch::attach(&mut ebpf)?)
        } else {
            None
        };
        if let Some(heap) = &mut heap {
            heap.discover(&mut ebpf, &settings.scope, &all_pids());
            for pid in heap.targets() {
                python.look(pid);
            }
        }
        let emitter = Emitter::start(Arc::clone(&sinks))?;
        eprintln!(
            "prof-bpf: agent: {}",
            banner(&settings, cpu.as_ref(), heap.as_ref())
        );
        Ok(Self {
            settings,
            ebpf,
            tables,
            table_budget: Budget::new(Instant::now()),
            heap,
            cpu,
            task_watch,
            maps_cache,
            python,
            sinks,
            emitter,
            sources: HashMap::new(),
            interval_start: (SystemTime::now(), Instant::now()),
            intervals: 0,
        })
    }

    /// Every second: CPU counts drained (so short-lived processes are
    /// placed while they live), new processes examined, unwind tables
    /// served, the uprobe ceiling enforced. A failure is logged: the agent
    /// goes on.
    fn tick(&mut self) {
        if let Err(err) = self.try_tick() {
            warn!("agent: {err:#}");
        }
    }

    fn try_tick(&mut self) -> anyhow::Result<()> {
        let mut profiled = Vec::new();
        if let Some(cpu) = &mut self.cpu {
            cpu.drain(&self.settings.scope, &mut self.python)?;
            profiled.extend(cpu.sampled());
        }
        if let Some(heap) = &mut self.heap {
            let running = all_pids();
            heap.forget_gone(&running);
            heap.discover(&mut self.ebpf, &self.settings.scope, &running);
            heap.enforce_ceiling(&mut self.ebpf)?;
            for pid in heap.targets() {
                self.python.look(pid);
            }
            profiled.extend(heap.targets());
        }
        self.python.tick();
        // Named while they run: a short-lived process is gone by the cut.
        for pid in profiled {
            self.source(pid);
        }
        self.update_tables();
        Ok(())
    }

    /// Unwind tables: heap-profiled processes get theirs as soon as they
    /// are found (their samples are few and each stack counts); the
    /// others, when their walks ask, busiest first, within the CPU budget
    /// that `cpu` sessions use on the whole host (a large object can take
    /// seconds to compile).
    fn update_tables(&mut self) {
        if let Some(heap) = &self.heap {
            let targets: Vec<u32> = heap
                .targets()
                .filter(|pid| !self.tables.has_process(*pid))
                .collect();
            for pid in targets {
                let started = Instant::now();
                self.add_tables(pid);
                self.table_budget.spend(started.elapsed());
            }
        }
        let Some(cpu) = &mut self.cpu else {
            return;
        };
        let recent = std::mem::take(&mut cpu.recent_samples);
        budget::serve_requests(
            &mut self.tables,
            &mut self.table_budget,
            &recent,
            true,
            false,
            |pid| cpu.has_exited(pid),
        );
    }

    fn add_tables(&mut self, pid: u32) {
        if let Err(err) = self.tables.add_process(pid) {
            debug!("no unwind tables for pid {pid}: {err:#}");
        }
    }

    /// Exec and exit events of every task.
    fn task_events(&mut self, events: Vec<(profiler_common::cpu::TaskEvent, Change)>) {
        for (_, change) in events {
            match change {
                Change::Exec(pid) => {
                    // The old program's tables, probes and interpreter
                    // mean nothing now.
                    self.tables.remove_process(pid);
                    self.sources.remove(&pid);
                    self.maps_cache.forget(pid);
                    self.python.exec(pid);
                    if let Some(heap) = &mut self.heap {
                        heap.exec(&mut self.ebpf, pid);
                    }
                }
                Change::ProcessExit(pid) => {
                    self.tables.remove_process(pid);
                    self.maps_cache.forget(pid);
                    self.python.exited(pid);
                }
                Change::None => {}
            }
        }
    }

    /// Ends the interval: one profile per process and kind, to the sinks.
    /// A failure is logged: the next interval is cut as usual.
    fn cut(&mut self) {
        if let Err(err) = self.try_cut() {
            warn!("agent: interval {}: {err:#}", self.intervals);
        }
    }

    fn try_cut(&mut self) -> anyhow::Result<()> {
        let (start, began) = self.interval_start;
        let duration = began.elapsed();
        self.interval_start = (SystemTime::now(), Instant::now());
        self.intervals += 1;
        let mut profiles = Vec::new();
        // Heap first: it reads the user stacks before the CPU drain deletes
        // those it read last time.
        if let Some(heap) = &mut self.heap {
            let cpu = self.cpu.as_ref();
            let read = |ebpf: &Ebpf, id: u64| -> Option<UserStack> {
                match cpu {
                    Some(cpu) => cpu.user_stack(id),
                    None => heap::maps::user_stack(ebpf, id),
                }
            };
            self.python.tick();
            let cut = heap.cut(
                &mut self.ebpf,
                &self.settings.scope,
                read,
                self.python.tracker(),
            )?;
            for (pid, c) in cut {
                profiles.push((ProfileKind::Heap, pid, c));
            }
            self.python.forget_pairs(|pid| !super::running(pid));
        }
        if let Some(cpu) = &mut self.cpu {
            for (pid, c) in cpu.cut(&self.settings.scope, &mut self.python)? {
                profiles.push((ProfileKind::Cpu, pid, c));
            }
        }
        let (mut cpus, mut heaps) = (0, 0);
        for (kind, pid, collector) in profiles {
            match kind {
                ProfileKind::Cpu => cpus += 1,
                ProfileKind::Heap => heaps += 1,
            }
            let source = self.source(pid);
            self.emitter.send(Job {
                kind,
                collector,
                source,
                start,
                duration,
            });
        }
        info!(
            "agent: interval {} ({:.1} s): {cpus} cpu and {heaps} heap profiles",
            self.intervals,
            duration.as_secs_f64()
        );
        self.sources.retain(|&pid, _| super::running(pid));
        self.maps_cache.prune();
        Ok(())
    }

    /// The name and labels of `pid`, read while it lives.
    fn source(&mut self, pid: u32) -> Arc<Source> {
        if let Some(source) = self.sources.get(&pid) {
            return Arc::clone(source);
        }
        let mut source = name_process(
            pid,
            &self.settings.service_name_rules,
            &self.settings.labels,
        );
        if process::check_pid(pid).is_err()
            && let Some(comm) = self.cpu.as_mut().and_then(|c| c.last_name(pid))
        {
            // Gone before it was named: the name its exit event carried.
            source.service_name = comm;
        }
        let source = Arc::new(source);
        self.sources.insert(pid, Arc::clone(&source));
        source
    }

    /// The sinks' and collectors' counters, for --metrics.
    fn readings(&self) -> Readings {
        let mut collectors = Vec::new();
        if self.cpu.is_some()
            && let Ok(c) = CpuCollector::counters(&self.ebpf)
        {
            collectors.push(CollectorCounters {
                collector: "cpu".into(),
                lost_events: c.get(CpuCounter::CountsFull) + c.get(CpuCounter::TaskEventsLost),
                truncated_stacks: c.get(CpuCounter::UserStackFailed)
                    + c.get(CpuCounter::KernelStackFailed),
            });
        }
        if self.heap.is_some()
            && let Ok(c) = heap::maps::counters(&self.ebpf)
        {
            collectors.push(CollectorCounters {
                collector: "heap".into(),
                lost_events: c.get(HeapCounter::LiveFull) + c.get(HeapCounter::StacksFull),
                truncated_stacks: c.get(HeapCounter::StackErrors),
            });
        }
        // The user stack walker both collectors share.
        if let Ok(c) = Counts::<UnwindCounter>::read(&self.ebpf, UNWIND_STATS_MAP) {
            collectors.push(CollectorCounters {
                collector: "unwinder".into(),
                lost_events: c.get(UnwindCounter::MapFull),
                truncated_stacks: c.get(UnwindCounter::TruncatedDepth)
                    + c.get(UnwindCounter::TruncatedUnwind),
            });
        }
        Readings {
            sinks_text: self.sinks.metrics_text(),
            collectors,
        }
    }

    /// SIGHUP: settings re-read; what changed takes effect from the next
    /// interval.
    fn reload(&mut self) {
        match super::reload(&self.settings) {
            Ok(Some(settings)) => self.apply(settings),
            Ok(None) => {}
            Err(err) => eprintln!("prof-bpf: agent: SIGHUP: settings unchanged: {err:#}"),
        }
    }

    /// Takes new settings: labels, scope and sinks change at once (the old
    /// sinks deliver what they hold in the background); the rest needs a
    /// restart.
    fn apply(&mut self, settings: Settings) {
        if settings.sinks.len() != self.settings.sinks.len()
            || format!("{:?}", settings.sinks) != format!("{:?}", self.settings.sinks)
        {
            match Sinks::start(settings.sinks.clone(), &settings.delivery) {
                Ok(sinks) => {
                    let sinks = Arc::new(sinks);
                    let old = std::mem::replace(
                        &mut self.emitter,
                        match Emitter::start(Arc::clone(&sinks)) {
                            Ok(e) => e,
                            Err(err) => {
                                eprintln!("prof-bpf: agent: SIGHUP: sinks unchanged: {err:#}");
                                return;
                            }
                        },
                    );
                    let old_sinks = std::mem::replace(&mut self.sinks, sinks);
                    tokio::spawn(async move {
                        old.finish().await;
                        old_sinks.flush(FLUSH_TIMEOUT).await;
                    });
                }
                Err(err) => {
                    eprintln!("prof-bpf: agent: SIGHUP: sinks unchanged: {err:#}");
                    return;
                }
            }
        }
        let old = &self.settings;
        let restart: Vec<&str> = [
            ("--interval", old.interval != settings.interval),
            ("-F", old.frequency != settings.frequency),
            ("--sample-bytes", old.sample_bytes != settings.sample_bytes),
            ("--unwind-*", old.unwind != settings.unwind),
            (
                "--no-heap/--no-cpu",
                (old.heap, old.cpu) != (settings.heap, settings.cpu),
            ),
        ]
        .into_iter()
        .filter_map(|(flag, changed)| changed.then_some(flag))
        .collect();
        if !restart.is_empty() {
            eprintln!(
                "prof-bpf: agent: SIGHUP: {} take effect at the next start",
                restart.join(", ")
            );
        }
        let (interval, frequency, sample_bytes, heap, cpu, unwind) = (
            old.interval,
            old.frequency,
            old.sample_bytes,
            old.heap,
            old.cpu,
            old.unwind.clone(),
        );
        self.sources.clear();
        self.settings = Settings {
            interval,
            frequency,
            sample_bytes,
            heap,
            cpu,
            unwind,
            ..settings
        };
        eprintln!("prof-bpf: agent: SIGHUP: new labels, scope and sinks in effect");
    }

    /// Symbolizes and queues what is left, then waits (bounded) for the
    /// sinks to deliver it; says what each sink did.
    async fn finish(self) {
        let Self {
            ebpf,
            emitter,
            sinks,
            heap,
            tables: unwind_tables,
            ..
        } = self;
        let counters = counters_line(&ebpf, heap.as_ref());
        let tables = unwind_tables.stats().summary();
        // Detach every probe: the targets run unprofiled from here.
        drop(ebpf);
        emitter.finish().await;
        let delivered = sinks.flush(FLUSH_TIMEOUT).await;
        if !delivered {
            eprintln!(
                "prof-bpf: agent: some profiles were not delivered within {} s",
                FLUSH_TIMEOUT.as_secs()
            );
        }
        for (name, c) in sinks.counters() {
            eprintln!(
                "prof-bpf: agent: sink {name}: sent {}, failed {}, retried {}, dropped {}, {} bytes",
                c.sent, c.failed, c.retried, c.dropped, c.bytes
            );
        }
        eprintln!("prof-bpf: agent: {counters}");
        eprintln!("prof-bpf: agent: {tables}");
    }
}

/// Every process now.
pub(super) fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}
