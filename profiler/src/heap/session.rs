//! One heap session: attach (see [`super::attach`]), read the kernel's
//! aggregates every second (live status) and every interval (reports, leak
//! snapshots), and write the final report (see [`super::report`]).
use std::{
    collections::{HashMap, HashSet},
    io::IsTerminal as _,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use aya::{Ebpf, programs::uprobe::UProbeScope};
use log::{debug, info, warn};
use profiler_common::{
    heap::{StackKey, StackStats},
    python::{PyCounter, STATS_MAP as PY_STATS_MAP},
    stack::UserStack,
};

use super::{
    attach::{self, Plan},
    coverage::{Clock, Coverage, Memory, ProcessMemory},
    discover::Allocator,
    leaks, live_set, maps,
    processes::{self, Processes},
    report::{self, Context, LeakInput, Totals},
    settings::{Settings, Targets, Tracking},
    status::Status,
    usdt_attach::UsdtAttacher,
};
use crate::{
    live_heap::HeaderFinder,
    output::{OutputArgs, OutputPlan},
    profile::{Collector, Profile},
    python::tracker::Tracker as PythonTracker,
    runtime::{self, Stop, StopEvent, StopReason, counters::Counts},
    unwind::{Tables, copied::CopiedStacks},
};

/// With --all, the report gives the memory of this many processes.
const MEMORY_LINES_WITH_ALL: usize = 8;
/// How often the walker's requests for unwind tables (a new process under
/// --all, code loaded by dlopen) are served: this bounds how long such code
/// is walked by frame pointers only.
const TABLES_POLL: Duration = Duration::from_millis(100);
/// How often new Python stacks are named while few (a process that exits
/// soon after allocating still has them named; more are named every
/// second).
const PYTHON_NAMING: Duration = Duration::from_millis(250);

/// Runs a heap session to its end and writes the report; in launch mode,
/// returns the program's status.
pub(crate) fn run(
    settings: Settings,
    output: OutputArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let mut output = output.check(if settings.leaks {
        &["inuse_objects", "inuse_space"]
    } else {
        &[
            "alloc_objects",
            "alloc_space",
            "inuse_objects",
            "inuse_space",
        ]
    })?;
    if matches!(settings.targets, Targets::Launch(_)) {
        // The program owns stdout (`heap -- gzip -c f > f.gz`).
        output.stdout_to_stderr();
    }
    runtime::block_on(async move {
        let mut stop = Stop::new()?;
        // Targets are resolved before anything is loaded: bad input fails fast.
        let Plan {
            tracking,
            allocators,
            pids,
            launch,
        } = attach::plan(&settings)?;
        let mut session = Session::start(settings, tracking, allocators, pids)?;
        let launched = match launch {
            Some(launch) => Some(session.release(launch)?),
            None => None,
        };
        let result = async {
            let reason = session
                .record(&mut stop, launched.is_some(), &output)
                .await?;
            let profile = session.report()?;
            drop(session); // detaches every probe
            output.write(&profile)?;
            Ok(reason)
        }
        .await;
        match launched {
            // The program's status, whatever happened to the session; a
            // signal that ended it is passed on once the report is written.
            Some(program) => {
                if let Ok(reason) = &result {
                    program.pass_on(*reason);
                }
                Ok(program.finish(result.map(|_| ())))
            }
            None => result.map(|_| std::process::ExitCode::SUCCESS),
        }
    })
}

mod banner;
mod follow;
mod stacks;

struct Session {
    ebpf: Ebpf,
    settings: Settings,
    tracking: Tracking,
    /// Processes targeted by pid (empty with --all).
    pids: Vec<u32>,
    allocators: Vec<(Allocator, UProbeScope)>,
    started: tokio::time::Instant,
    /// Wall-clock time of the attach, for the report's coverage.
    attached_at: std::time::SystemTime,
    history: leaks::History<StackKey>,
    processes: Processes,
    /// The final report's collector, created at attach and told the targets'
    /// mappings while they live, so that it can place their addresses after
    /// they exit.
    live: Option<Collector>,
    /// CFI tables of the targets for the kernel-side unwinder.
    tables: Tables,
    /// The USDT sites attached, and their argument specs.
    usdt: UsdtAttacher,
    /// Leak mode: the snapshots of the targets' own live heaps (see
    /// `live_set`), from the attach on.
    live_history: leaks::History<live_set::LiveStackKey>,
    /// With --all: which files export a live heap, each read once.
    live_finder: HeaderFinder,
    /// The Python frame walker's processes, threads and names.
    python: PythonTracker,
    /// Stacks copied by the kernel where tables were missing, and those
    /// already unwound (by stack id).
    copies: CopiedStacks,
    copied: HashMap<u64, UserStack>,
}

impl Session {
    fn start(
        settings: Settings,
        tracking: Tracking,
        allocators: Vec<(Allocator, UProbeScope)>,
        pids: Vec<u32>,
    ) -> anyhow::Result<Self> {
        let all = settings.targets == Targets::All;
        let mut ebpf = attach::load(&settings, tracking, settings.mmap && all)?;
        let mut tables = Tables::with_options(&mut ebpf, &settings.unwind)?;
        tables.preload(all);
        let mut python = PythonTracker::new(&mut ebpf, true)?;
        python.set_view(settings.python.python_frames, settings.python.python_lines);
        let copies = CopiedStacks::new(&mut ebpf)?;
        let mut session = Self {
            python,
            ebpf,
            settings,
            tracking,
            pids,
            allocators: Vec::new(),
            started: tokio::time::Instant::now(),
            attached_at: std::time::SystemTime::now(),
            history: leaks::History::new(),
            processes: Processes::default(),
            live: None,
            tables,
            usdt: UsdtAttacher::default(),
            live_history: leaks::History::new(),
            live_finder: HeaderFinder::default(),
            copies,
            copied: HashMap::new(),
        };
        // Unwind tables before the probes: the first stacks are complete too.
        // A launched child has not exec'd yet; its tables come after exec.
        if !matches!(session.settings.targets, Targets::Launch(_)) {
            for pid in session.pids.clone() {
                session.add_unwind_tables(pid);
            }
        }
        let running = if all {
            // Built in the background; stacks are copied until then.
            let running = session.tables.request_running();
            debug!(
                "unwind tables requested for {} running processes",
                running.len()
            );
            running
        } else {
            Vec::new()
        };
        for (allocator, scope) in allocators {
            attach::allocator(
                &mut session.ebpf,
                tracking,
                &allocator,
                scope,
                &mut session.usdt,
            )?;
            session.allocators.push((allocator, scope));
        }
        // After the allocator's probes: a mapping made inside an allocator
        // call must find the call's depth recorded. With --all, the
        // processes that map the allocator now are marked here, later ones
        // by the allocator probes at their first call.
        if session.settings.mmap {
            let mut targets = session.pids.clone();
            if all {
                targets.extend(processes::mapping(&session.allocator_inodes()));
            }
            attach::mmap_tracepoints(&mut session.ebpf, &targets)?;
        }
        session.started = tokio::time::Instant::now();
        session.attached_at = std::time::SystemTime::now();
        for pid in session.pids.clone() {
            session.refresh_process(pid);
        }
        session.live = Some(session.new_collector());
        // With --all, the names and mappings of the processes running now:
        // one whose tables are in before its first allocation never asks for
        // them again, and if it exits before the report its stacks could
        // not be placed or named.
        for pid in running {
            session.refresh_process(pid);
        }
        if session.settings.leaks {
            // The heap held at the attach is the first snapshot.
            let live = session.read_live();
            session.live_history = leaks::History::starting_with(live_set::stack_bytes(&live));
        }
        Ok(session)
    }

    fn allocator_inodes(&self) -> Vec<u64> {
        self.allocators.iter().map(|(a, _)| a.inode).collect()
    }

    /// Records until a signal, --duration or the targets' exit; says which.
    async fn record(
        &mut self,
        stop: &mut Stop,
        launched: bool,
        output: &OutputPlan,
    ) -> anyhow::Result<StopReason> {
        eprintln!("prof-bpf: {}", self.settings.unwind.start_line());
        eprintln!("{}", self.banner());
        for &pid in &self.pids {
            stop.watch(pid)
                .with_context(|| format!("pid {pid} exited while attaching"))?;
        }
        let started = self.started;
        if let Some(duration) = self.settings.duration {
            stop.set_deadline(started + duration);
        }
        let second = Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(started + second, second);
        let mut tables_tick = tokio::time::interval(TABLES_POLL);
        let mut interval = self
            .settings
            .interval
            .map(|p| tokio::time::interval_at(started + p, p));
        let tty = std::io::stderr().is_terminal();
        let mut status = Status::default();
        let mut ticks = 0u64;
        // A launched program maps its libraries after exec and may exit soon:
        // its mappings are reread often, as they are needed once it is gone.
        let mut maps_tick = launched.then(|| tokio::time::interval(Duration::from_millis(100)));
        let mut python_tick = tokio::time::interval(PYTHON_NAMING);
        let reason = loop {
            tokio::select! {
                _ = python_tick.tick() => self.python.name_new_pairs_if_few(),
                _ = runtime::next_tick(&mut maps_tick) => self.follow_launched(ticks),
                _ = tables_tick.tick() => self.serve_table_requests(),
                _ = tick.tick() => {
                    ticks += 1;
                    self.python.name_new_pairs();
                    self.python.refresh();
                    if launched && (ticks == 1 || ticks.is_multiple_of(5)) {
                        self.check_launched();
                    }
                    if self.settings.targets == Targets::All && ticks.is_multiple_of(2) {
                        self.purge_exited()?;
                    }
                    if self.tracking == Tracking::Usdt {
                        self.follow_usdt_objects();
                    }
                    let line = status.line(
                        started.elapsed().as_secs_f64(),
                        &maps::counters(&self.ebpf)?,
                        &maps::stack_stats(&self.ebpf)?,
                        self.settings.mmap,
                    );
                    if tty {
                        eprint!("\r\x1b[K{line}");
                    } else if ticks.is_multiple_of(10) {
                        eprintln!("{line}");
                    }
                }
                _ = runtime::next_tick(&mut interval) => {
                    if self.settings.leaks {
                        self.snapshot()?;
                    } else {
                        let profile = self.build(self.new_collector(), false)?;
                        if tty { eprint!("\r\x1b[K"); }
                        eprintln!("prof-bpf: report after {:.0} s", started.elapsed().as_secs_f64());
                        output.write(&profile)?;
                    }
                }
                event = stop.next() => match event {
                    StopEvent::Exited(pid) => {
                        self.processes.exited.insert(pid);
                        self.forget_tables(pid);
                    }
                    StopEvent::Stop(reason) => {
                        info!("stopping: {reason}");
                        break reason;
                    }
                },
            }
        };
        if tty {
            eprint!("\r\x1b[K");
        }
        if self.settings.leaks {
            self.snapshot()?;
        }
        Ok(reason)
    }

    fn add_unwind_tables(&mut self, pid: u32) {
        if let Err(err) = self.tables.add_process(pid) {
            warn!("pid {pid}: no unwind tables, stacks follow frame pointers only: {err:#}");
        }
    }

    /// Rereads the mappings and name of a live process, and tells the
    /// final report's collector.
    fn refresh_process(&mut self, pid: u32) {
        self.python.add_process(pid);
        if self.processes.refresh(pid)
            && let Some(c) = &mut self.live
        {
            c.note_process(pid);
        }
    }

    /// With --all, processes come and go: the live blocks of those that
    /// exited are dropped from the kernel's table, which they would
    /// otherwise fill, and their unwind tables are released.
    ///
    /// A pid reused by a new process while the old one's entries are being
    /// dropped could lose blocks allocated in that window (pids are reused
    /// only after the whole pid space, so this needs a very busy host).
    fn purge_exited(&mut self) -> anyhow::Result<()> {
        let dead: HashSet<u32> = maps::stack_stats(&self.ebpf)?
            .iter()
            .map(|(k, _)| k.pid)
            .filter(|&pid| {
                !self.processes.purged.contains(&pid)
                    && !Path::new(&format!("/proc/{pid}")).exists()
            })
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        let dropped = maps::drop_live_blocks(&mut self.ebpf, &dead)?;
        debug!(
            "dropped {dropped} live blocks of {} exited processes",
            dead.len()
        );
        for pid in dead {
            self.forget_tables(pid);
            self.processes.purged.insert(pid);
        }
        Ok(())
    }

    fn snapshot(&mut self) -> anyhow::Result<()> {
        let stats = maps::stack_stats(&self.ebpf)?;
        let time = self.started.elapsed().as_secs_f64();
        let live = self.read_live();
        self.live_history.push(time, live_set::stack_bytes(&live));
        self.history.push(
            time,
            stats
                .iter()
                .map(|(k, s)| (*k, s.alloc_bytes as i64 - s.free_bytes as i64)),
        );
        debug!(
            "leak snapshot {} at {time:.1} s: {} stacks",
            self.history.len(),
            stats.len()
        );
        Ok(())
    }

    /// The report at the end of the session.
    fn report(&mut self) -> anyhow::Result<Profile> {
        for pid in self.pids.clone() {
            if !self.processes.exited.contains(&pid) {
                self.refresh_process(pid);
            }
        }
        let copies = self.finish_copies()?;
        let mut collector = match self.live.take() {
            Some(c) => c,
            None => self.new_collector(),
        };
        collector.add_comment(copies);
        let tables = self.tables.stats().summary();
        eprintln!("prof-bpf: {tables}");
        collector.add_comment(tables);
        self.build(collector, true)
    }

    /// A collector for this session's report, knowing the targets' mappings.
    fn new_collector(&self) -> Collector {
        let mut c = Collector::new(report::sample_types(self.settings.leaks), "inuse_space");
        for &pid in &self.pids {
            c.note_process(pid);
        }
        c
    }

    /// Reads what a report needs from the maps and `/proc`.
    fn totals(&mut self) -> anyhow::Result<Totals> {
        // The mappings before the totals: the allocation of every mapping
        // read is in the totals read after (the in-use values of mappings
        // come from this read alone, see `report::unmapped`).
        let unmapped = if self.settings.mmap {
            let mappings = maps::live_mappings(&self.ebpf)?;
            let current = self.processes.current_maps(mappings.keys().map(|k| k.pid));
            report::unmapped(&mappings, &current)
        } else {
            report::Unmapped::default()
        };
        let stats = maps::stack_stats(&self.ebpf)?;
        // With --all, processes first seen in the totals.
        for pid in stats.iter().map(|(k, _)| k.pid).collect::<HashSet<_>>() {
            if !self.processes.comms.contains_key(&pid) {
                self.refresh_process(pid);
            }
        }
        let old = match self.settings.min_age {
            Some(age) => {
                let blocks = maps::live_blocks(&self.ebpf, |_, _| true)?;
                let min_ns = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
                report::old_allocations(&blocks, maps::monotonic_ns(), min_ns)
            }
            None => std::collections::HashMap::new(),
        };
        let memory = self.memory(&stats);
        let live = self.read_live();
        if self.settings.targets == Targets::All {
            for &pid in live.keys() {
                if !self.processes.comms.contains_key(&pid) {
                    self.refresh_process(pid);
                }
            }
        }
        self.python.name_new_pairs();
        let live_python = live_set::name_python(&mut self.python, &live);
        let mut stacks =
            maps::user_stacks(&self.ebpf, stats.iter().map(|(k, _)| k).chain(old.keys()))?;
        let native_of =
            self.add_paired_stacks(&mut stacks, stats.iter().map(|(k, _)| k).chain(old.keys()))?;
        self.resolve_copies(&mut stacks, &native_of);
        Ok(Totals {
            stats,
            stacks,
            counters: maps::counters(&self.ebpf)?,
            unmapped,
            old,
            memory,
            live,
            live_python,
        })
    }

    /// The live heaps the allocators of the targets export (libprofalloc.so):
    /// with --all, of every process that has one (the libc probes do not see
    /// their allocations); else of the targets, when the probes are the
    /// allocator's own samples.
    fn read_live(&mut self) -> HashMap<u32, crate::live_heap::LiveHeap> {
        match self.settings.targets {
            Targets::All => live_set::read_all(&mut self.live_finder),
            _ => live_set::read_targets(self.tracking, &self.pids, &self.processes.exited),
        }
    }

    /// The memory of the targets now; with --all, of the first processes
    /// (by pid) in the totals.
    fn memory(&self, stats: &[(StackKey, StackStats)]) -> Vec<ProcessMemory> {
        let pids = if self.settings.targets == Targets::All {
            let mut pids: Vec<u32> = stats.iter().map(|(k, _)| k.pid).collect();
            pids.sort_unstable();
            pids.dedup();
            pids.truncate(MEMORY_LINES_WITH_ALL);
            pids
        } else {
            self.pids.clone()
        };
        pids.into_iter()
            .map(|pid| ProcessMemory {
                pid,
                comm: self.processes.comm(pid),
                memory: if self.processes.exited.contains(&pid) {
                    None
                } else {
                    Memory::read(pid)
                },
            })
            .collect()
    }

    /// From when the report's allocations were seen.
    fn coverage(&self, totals: &Totals) -> Coverage {
        if !totals.live.is_empty() && self.settings.targets != Targets::All {
            return Coverage::AllocatorSinceStart {
                at: Clock::local(self.attached_at),
            };
        }
        match self.settings.targets {
            Targets::Launch(_) => Coverage::SinceStart,
            _ => Coverage::SinceAttach {
                tracking: self.tracking,
                at: Clock::local(self.attached_at),
            },
        }
    }

    /// The heap profile or leak report, into `collector`; the final one
    /// also tells stderr what it covers.
    fn build(&mut self, collector: Collector, last: bool) -> anyhow::Result<Profile> {
        let totals = self.totals()?;
        let ctx = Context {
            tracking: self.tracking,
            coverage: self.coverage(&totals),
            mmap: self.settings.mmap,
            processes: &self.processes,
            allocator_inodes: self.allocator_inodes(),
            python: Some(self.python.pairs()),
        };
        let report = if self.settings.leaks {
            let launched = matches!(self.settings.targets, Targets::Launch(_));
            let input = LeakInput {
                history: &self.history,
                live_history: &self.live_history,
                min_age: self.settings.min_age,
                launched_exit: launched && !self.processes.exited.is_empty(),
            };
            report::leak_report(&totals, &ctx, &input)
        } else {
            report::heap_report(&totals, &ctx)
        };
        let mut report = report;
        if self.settings.targets == Targets::All && !totals.live.is_empty() {
            let mut pids: Vec<u32> = totals.live.keys().copied().collect();
            pids.sort_unstable();
            let line = live_set::all_coverage(&pids);
            report.comments.push(line.clone());
            report.coverage.push(line);
        }
        if self.python.walked_any() {
            let line = super::pymalloc::coverage_line(self.settings.mmap, self.settings.pymalloc);
            report.comments.push(line.clone());
            report.coverage.push(line);
        }
        let walks = Counts::<PyCounter>::read(&self.ebpf, PY_STATS_MAP)?;
        report.comments.extend(self.python.comments(&walks));
        if last {
            for line in &report.coverage {
                eprintln!("prof-bpf: {line}");
            }
        }
        if let Some(summary) = &report.summary {
            eprintln!("prof-bpf: {summary}");
        }
        report.into_profile(collector)
    }
}
