//! One heap session: load the programs, attach them to the allocator of
//! each target, read the kernel's aggregates every second (live status) and
//! every interval (reports, leak snapshots), and write the final report.
use std::{
    collections::{HashMap, HashSet},
    io::IsTerminal as _,
    num::NonZeroU32,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use log::{debug, info, warn};
use profiler_common::{
    heap::{
        CONFIG_MAP, COUNTERS_MAP, HeapConfig, HeapCounters, LIVE_MAP, LiveAlloc, LiveKey,
        MMAP_TARGETS_MAP, SAMPLE_INTERVALS_MAP, SAMPLE_WEIGHTS_MAP, SOURCE_MMAP, STACK_ID_MISSING,
        STACK_STATS_MAP, StackKey, StackStats, WEIGHT_ONE,
    },
    stack::{STACK_COMPLETE, STACK_MISSING, USER_STACKS_MAP, UserStack},
};

use super::{
    Probe, Settings, Targets,
    discover::{self, Allocator, Role},
    launch, leaks, sampling,
};
use crate::{
    ebpf,
    output::{OutputArgs, OutputPlan},
    process::{self, Mapping},
    profile::{self, Collector, Profile, RawSample, SampleType, StackStatus},
    unwind::Tables,
};

const ENTRY_PROGRAM: &str = "heap_alloc_entry";
const RETURN_PROGRAM: &str = "heap_alloc_return";
const FREE_PROGRAM: &str = "heap_free_entry";
const HOOK_ALLOC_PROGRAM: &str = "heap_hook_alloc";
const HOOK_FREE_PROGRAM: &str = "heap_hook_free";
const LOADER_STOP_PROGRAM: &str = "heap_loader_stop";
/// How often the walker's requests for unwind tables (a new process under
/// --all, code loaded by dlopen) are served: this bounds how long such code
/// is walked by frame pointers only.
const TABLES_POLL: Duration = Duration::from_millis(100);
/// `--mmap`: (program, syscall tracepoint), exits and munmap before the
/// entries that start calls, so that every call started has its end seen.
const MMAP_PROGRAMS: [(&str, &str); 5] = [
    ("heap_mmap_exit", "sys_exit_mmap"),
    ("heap_mremap_exit", "sys_exit_mremap"),
    ("heap_munmap_enter", "sys_enter_munmap"),
    ("heap_mmap_enter", "sys_enter_mmap"),
    ("heap_mremap_enter", "sys_enter_mremap"),
];

/// Runs a heap session to its end and writes the report.
pub fn run(mut settings: Settings, output: OutputArgs) -> anyhow::Result<()> {
    let output = output.check(if settings.leaks {
        &["inuse_objects", "inuse_space"]
    } else {
        &[
            "alloc_objects",
            "alloc_space",
            "inuse_objects",
            "inuse_space",
        ]
    })?;
    // Resolve targets before loading anything, so bad input fails fast.
    let mut suspended = None;
    let mut loader = None;
    let mut plan: Vec<(Allocator, UProbeScope)> = Vec::new();
    let mut pids = Vec::new();
    match &settings.targets {
        Targets::Pids(list) => {
            for &pid in list {
                let nz = NonZeroU32::new(pid).context("no process with pid 0")?;
                process::check_pid(pid)?;
                let allocator = discover::for_process(pid, settings.lib.as_deref())?;
                plan.push((allocator, UProbeScope::OneProcess(nz)));
                pids.push(pid);
            }
            choose_hooks(&mut settings, &plan)?;
        }
        Targets::All | Targets::Launch(_) if settings.probe == Probe::Hooks => {
            bail!("--probe hooks works with --pid targets only")
        }
        Targets::All => {
            settings.probe = Probe::Malloc;
            let allocator = match &settings.lib {
                Some(lib) => Allocator::from_file(&lib.to_string_lossy(), lib.clone())?,
                None => discover::own_libc()?,
            };
            plan.push((allocator, UProbeScope::AllProcesses));
        }
        Targets::Launch(command) => {
            settings.probe = Probe::Malloc;
            let child = launch::spawn_suspended(command)?;
            let allocator = match &settings.lib {
                Some(lib) => Allocator::from_file(&lib.to_string_lossy(), lib.clone()),
                None => launch::allocator_of_program(&child.program),
            };
            // On error the child sees EOF on its pipe and never runs.
            let allocator = allocator?;
            let pid = NonZeroU32::new(child.pid).context("fork returned pid 0")?;
            plan.push((allocator, UProbeScope::OneProcess(pid)));
            pids.push(child.pid);
            loader = launch::loader_of_program(&child.program);
            suspended = Some(child);
        }
    }

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(async move {
            let mut session = Session::start(settings, plan, pids)?;
            let mut child = None;
            if let Some(suspended) = suspended {
                let pid = suspended.pid;
                if let Some((path, offset)) = &loader {
                    session.attach_loader_stop(pid, path, *offset)?;
                }
                child = Some(suspended.resume()?);
                session.serve_loader_stops(pid);
            }
            session.record(child.is_some(), &output).await?;
            let profile = session.report()?;
            drop(session); // detaches every probe
            if let Some(mut child) = child
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("prof-bpf: the program exited ({status})");
            }
            output.write(&profile)
        })
}

struct Session {
    ebpf: Ebpf,
    settings: Settings,
    /// Processes targeted by pid (empty with --all).
    pids: Vec<u32>,
    allocators: Vec<(Allocator, UProbeScope)>,
    /// CLOCK_MONOTONIC at attach, in ns (the kernel's timestamps' clock).
    attached_ns: u64,
    started: tokio::time::Instant,
    history: leaks::History<StackKey>,
    /// Last mappings read for each process (kept after it exits).
    maps: HashMap<u32, Vec<Mapping>>,
    comms: HashMap<u32, String>,
    exited: HashSet<u32>,
    /// With --all: processes that exited and whose live blocks were dropped
    /// from the kernel's table. They hold nothing any more; what they
    /// allocated stays in the alloc_* totals.
    purged: HashSet<u32>,
    /// The final report's collector, created at attach and told the targets'
    /// mappings while they live, so that it can place their addresses after
    /// they exit.
    live: Option<Collector>,
    /// CFI tables of the targets for the kernel-side unwinder.
    tables: Tables,
    /// Launch mode: the probe that stops the program in its loader.
    loader_stop: Option<UProbeLinkId>,
}

impl Session {
    fn start(
        settings: Settings,
        plan: Vec<(Allocator, UProbeScope)>,
        pids: Vec<u32>,
    ) -> anyhow::Result<Self> {
        let (max_live, max_stacks) = (settings.max_live, settings.max_stacks);
        let mut ebpf = ebpf::load_with(|loader| {
            loader
                .map_max_entries(LIVE_MAP, max_live)
                .map_max_entries(STACK_STATS_MAP, max_stacks);
        })?;
        ebpf::spawn_logger(&mut ebpf);
        let kernel_sampling = if settings.probe == Probe::Hooks {
            0
        } else {
            settings.sample_bytes
        };
        let mmap_new_targets = settings.mmap && matches!(settings.targets, Targets::All);
        configure(&mut ebpf, kernel_sampling, mmap_new_targets)?;
        let tables = Tables::new(&mut ebpf)?;
        let programs: &[&str] = if settings.probe == Probe::Hooks {
            &[HOOK_FREE_PROGRAM, HOOK_ALLOC_PROGRAM]
        } else {
            &[FREE_PROGRAM, RETURN_PROGRAM, ENTRY_PROGRAM]
        };
        for name in programs {
            let _: &mut UProbe = ebpf::program(&mut ebpf, name)?;
        }
        let mut session = Self {
            ebpf,
            settings,
            pids,
            allocators: Vec::new(),
            attached_ns: 0,
            started: tokio::time::Instant::now(),
            history: leaks::History::new(),
            maps: HashMap::new(),
            comms: HashMap::new(),
            exited: HashSet::new(),
            purged: HashSet::new(),
            live: None,
            tables,
            loader_stop: None,
        };
        // Unwind tables before the probes: the first stacks are complete too.
        // A launched child has not exec'd yet; its tables come after exec.
        if !matches!(session.settings.targets, Targets::Launch(_)) {
            for pid in session.pids.clone() {
                session.add_unwind_tables(pid);
            }
        }
        for (allocator, scope) in plan {
            session.attach(&allocator, scope)?;
            session.allocators.push((allocator, scope));
        }
        // After the allocator's probes: a mapping made inside an allocator
        // call must find the call's depth recorded.
        if session.settings.mmap {
            session.attach_mmap()?;
        }
        session.attached_ns = monotonic_ns();
        session.started = tokio::time::Instant::now();
        for &pid in &session.pids.clone() {
            session.refresh_process(pid);
        }
        session.live = Some(session.new_collector());
        Ok(session)
    }

    /// Launch mode: makes the program stop each time its loader calls
    /// `_dl_debug_state` (file `loader`, at `offset`), before and after it
    /// maps the libraries (see `heap_loader_stop`).
    fn attach_loader_stop(&mut self, pid: u32, loader: &Path, offset: u64) -> anyhow::Result<()> {
        let nz = NonZeroU32::new(pid).context("no process with pid 0")?;
        let probe: &mut UProbe = ebpf::program(&mut self.ebpf, LOADER_STOP_PROGRAM)?;
        let link = probe
            .attach(
                UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(offset),
                    cookie: None,
                },
                loader,
                UProbeScope::OneProcess(nz),
            )
            .with_context(|| format!("attaching a uprobe to {}", loader.display()))?;
        self.loader_stop = Some(link);
        Ok(())
    }

    /// Serves the launched program's stops in its loader: each time, loads
    /// the unwind tables of what it has mapped and continues it. The second
    /// stop comes once every library is mapped, before any of their code
    /// (constructors, main) runs: from there on its stacks are complete.
    /// The program is never left stopped.
    fn serve_loader_stops(&mut self, pid: u32) {
        let Some(link) = self.loader_stop.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + LOADER_STOP_WAIT;
        let mut stops = 0;
        while stops < 2 && std::time::Instant::now() < deadline {
            match process::state(pid) {
                Some('T') => {
                    stops += 1;
                    self.refresh_process(pid);
                    if self.tables.has_process(pid) {
                        if let Err(err) = self.tables.refresh_process(pid) {
                            debug!("refreshing the unwind tables of pid {pid}: {err:#}");
                        }
                    } else {
                        self.add_unwind_tables(pid);
                    }
                    resume(pid);
                    // Not the same stop twice: wait until it runs again.
                    while process::state(pid) == Some('T') && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                Some(_) => std::thread::sleep(Duration::from_micros(200)),
                None => break,
            }
        }
        if let Ok(probe) = ebpf::program::<UProbe>(&mut self.ebpf, LOADER_STOP_PROGRAM)
            && let Err(err) = probe.detach(link)
        {
            debug!("detaching the loader probe: {err}");
        }
        // A stop that came after the wait ended.
        if process::state(pid) == Some('T') {
            resume(pid);
        }
    }

    /// Attaches frees first, then the allocation returns, then the
    /// allocation entries: every block recorded has its free probed, and every
    /// entry seen has its return probed.
    fn attach(&mut self, allocator: &Allocator, scope: UProbeScope) -> anyhow::Result<()> {
        let what = match scope {
            UProbeScope::OneProcess(pid) => format!("pid {pid}"),
            _ => "all processes".to_owned(),
        };
        if self.settings.probe == Probe::Hooks {
            let hooks = allocator
                .hooks
                .context("the allocator has no sampling hooks")?;
            // The free hook first, as with the malloc family.
            for (program, offset) in [
                (HOOK_FREE_PROGRAM, hooks.free_offset),
                (HOOK_ALLOC_PROGRAM, hooks.alloc_offset),
            ] {
                let probe: &mut UProbe = self
                    .ebpf
                    .program_mut(program)
                    .context("heap program missing")?
                    .try_into()
                    .context("heap program has the wrong type")?;
                probe
                    .attach(
                        UProbeAttachLocation::AbsoluteOffset(offset),
                        &allocator.open_path,
                        scope,
                    )
                    .with_context(|| {
                        format!(
                            "attaching to the sampling hooks of {} for {what}",
                            allocator.path
                        )
                    })?;
            }
            return Ok(());
        }
        for program in [FREE_PROGRAM, RETURN_PROGRAM, ENTRY_PROGRAM] {
            for point in &allocator.points {
                let cookie = match (program, point.role) {
                    (FREE_PROGRAM, Role::Free) => None,
                    (RETURN_PROGRAM | ENTRY_PROGRAM, Role::Alloc(kind)) => Some(kind as u64),
                    _ => continue,
                };
                let probe: &mut UProbe = self
                    .ebpf
                    .program_mut(program)
                    .context("heap program missing")?
                    .try_into()
                    .context("heap program has the wrong type")?;
                let result = probe.attach(
                    UProbeAttachPoint {
                        location: UProbeAttachLocation::AbsoluteOffset(point.probe_offset),
                        cookie,
                    },
                    &allocator.open_path,
                    scope,
                );
                if let Err(err) = result {
                    if let UProbeScope::OneProcess(pid) = scope
                        && process::check_pid(pid.get()).is_err()
                    {
                        bail!("pid {pid} exited while the probes were being attached");
                    }
                    return Err(err).with_context(|| {
                        format!(
                            "attaching to {} in {} for {what}",
                            point.symbol, allocator.path
                        )
                    });
                }
            }
        }
        info!(
            "attached to {} entry points of {} (inode {}) for {what}",
            allocator.points.len(),
            allocator.path,
            allocator.inode
        );
        Ok(())
    }

    /// `--mmap`: marks the targets and attaches the syscall tracepoints.
    /// With --all, the processes that map the allocator now are marked here,
    /// later ones by the allocator probes at their first call.
    fn attach_mmap(&mut self) -> anyhow::Result<()> {
        let mut pids = self.pids.clone();
        if matches!(self.settings.targets, Targets::All) {
            let inodes: Vec<u64> = self.allocators.iter().map(|(a, _)| a.inode).collect();
            pids.extend(processes_mapping(&inodes));
        }
        let mut targets: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(MMAP_TARGETS_MAP)
                .context("mapping target map missing")?,
        )?;
        for pid in pids {
            targets
                .insert(pid, 1, 0)
                .context("writing the mapping targets")?;
        }
        for (program, name) in MMAP_PROGRAMS {
            let tp: &mut TracePoint = ebpf::program(&mut self.ebpf, program)?;
            tp.attach("syscalls", name)
                .with_context(|| format!("attaching to the tracepoint syscalls:{name}"))?;
        }
        Ok(())
    }

    /// Records until Ctrl-C, --duration or the targets' exit.
    async fn record(&mut self, launched: bool, output: &OutputPlan) -> anyhow::Result<()> {
        let targets = match self.settings.targets {
            Targets::All => "all processes".to_owned(),
            _ => self
                .pids
                .iter()
                .map(|&p| format!("{} ({p})", process::comm(p)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let allocator = self
            .allocators
            .first()
            .map(|(a, _)| a.path.clone())
            .unwrap_or_default();
        let mode = if self.settings.probe == Probe::Hooks {
            format!(
                "libprofalloc.so's sampling hooks (one sample per {} bytes)",
                self.settings.sample_bytes
            )
        } else if self.settings.sample_bytes == 0 {
            "every allocation".to_owned()
        } else {
            format!("one sample per {} bytes", self.settings.sample_bytes)
        };
        eprintln!(
            "prof-bpf: heap: attached to {allocator} of {targets}, tracking {mode}{}{}; Ctrl-C to stop",
            if self.settings.mmap {
                " and every anonymous mapping"
            } else {
                ""
            },
            if self.settings.leaks {
                ", leak mode"
            } else {
                ""
            }
        );

        let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel();
        for &pid in &self.pids {
            let watcher = process::ExitWatcher::new(pid)
                .with_context(|| format!("pid {pid} exited while attaching"))?;
            let tx = exit_tx.clone();
            tokio::spawn(async move {
                watcher.exited().await;
                let _ = tx.send(pid);
            });
        }
        let started = self.started;
        let deadline = self
            .settings
            .duration
            .map(|d| started + Duration::from_secs_f64(d));
        let mut tick =
            tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
        let mut tables_tick = tokio::time::interval(TABLES_POLL);
        let period = self.settings.interval.map(Duration::from_secs_f64);
        let mut interval = period.map(|p| tokio::time::interval_at(started + p, p));
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let tty = std::io::stderr().is_terminal();
        let mut status = Status::default();
        let mut ticks = 0u64;
        // A launched program maps its libraries after exec and may exit soon:
        // its mappings are reread often, as they are needed once it is gone.
        let mut maps_tick = launched.then(|| tokio::time::interval(Duration::from_millis(100)));
        loop {
            tokio::select! {
                _ = next_tick(&mut maps_tick) => {
                    for pid in self.pids.clone() {
                        if !self.exited.contains(&pid) {
                            self.refresh_process(pid);
                            if self.tables.has_process(pid) {
                                if ticks < 3 {
                                    // The loader is still mapping libraries.
                                    let _ = self.tables.refresh_process(pid);
                                }
                            } else {
                                self.add_unwind_tables(pid);
                            }
                        }
                    }
                }
                _ = tables_tick.tick() => {
                    // Processes whose walks met code outside their tables
                    // (dlopen) are refreshed; with --all, new processes get
                    // tables. Until then their stacks follow frame pointers.
                    for pid in self.tables.poll() {
                        let all = matches!(self.settings.targets, Targets::All);
                        if all || self.pids.contains(&pid) {
                            self.add_unwind_tables(pid);
                        }
                        if all {
                            // Its mappings, so that its stacks can be placed
                            // and named after it exits.
                            self.refresh_process(pid);
                        }
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if launched && (ticks == 1 || ticks.is_multiple_of(5)) {
                        self.check_launched();
                    }
                    if matches!(self.settings.targets, Targets::All) && ticks.is_multiple_of(2) {
                        self.purge_exited()?;
                    }
                    let line = status.update(self)?;
                    if tty {
                        eprint!("\r\x1b[K{line}");
                    } else if ticks.is_multiple_of(10) {
                        eprintln!("{line}");
                    }
                }
                _ = next_tick(&mut interval) => {
                    if self.settings.leaks {
                        self.snapshot()?;
                    } else {
                        let c = self.new_collector();
                        let profile = self.heap_profile(c)?;
                        if tty { eprint!("\r\x1b[K"); }
                        eprintln!("prof-bpf: report after {:.0} s", started.elapsed().as_secs_f64());
                        output.write(&profile)?;
                    }
                }
                _ = &mut ctrl_c => break,
                () = sleep_until(deadline) => break,
                Some(pid) = exit_rx.recv() => {
                    self.exited.insert(pid);
                    self.tables.remove_process(pid);
                    if self.exited.len() == self.pids.len() {
                        break;
                    }
                }
            }
        }
        if tty {
            eprint!("\r\x1b[K");
        }
        if self.settings.leaks {
            self.snapshot()?;
        }
        Ok(())
    }

    /// After exec the program's real mappings exist: check that the probed
    /// allocator is the one it uses, and probe the one it does use if not.
    fn check_launched(&mut self) {
        for pid in self.pids.clone() {
            if self.exited.contains(&pid) {
                continue;
            }
            self.refresh_process(pid);
            let Ok(found) = discover::for_process(pid, self.settings.lib.as_deref()) else {
                continue;
            };
            if self.allocators.iter().any(|(a, _)| a.inode == found.inode) {
                continue;
            }
            warn!(
                "pid {pid} uses {} rather than the allocator found before exec; probing it too",
                found.path
            );
            let Some(nz) = NonZeroU32::new(pid) else {
                continue;
            };
            match self.attach(&found, UProbeScope::OneProcess(nz)) {
                Ok(()) => self.allocators.push((found, UProbeScope::OneProcess(nz))),
                Err(err) => warn!("{err:#}"),
            }
        }
    }

    fn add_unwind_tables(&mut self, pid: u32) {
        if let Err(err) = self.tables.add_process(pid) {
            warn!("pid {pid}: no unwind tables, stacks follow frame pointers only: {err:#}");
        }
    }

    /// Rereads the mappings and name of a live process.
    fn refresh_process(&mut self, pid: u32) {
        if let Ok(maps) = process::maps(pid) {
            self.maps.insert(pid, maps);
            self.comms.insert(pid, process::comm(pid));
            if let Some(c) = &mut self.live {
                c.note_process(pid);
            }
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
        let dead: HashSet<u32> = self
            .stack_stats()?
            .iter()
            .map(|(k, _)| k.pid)
            .filter(|&pid| {
                !self.purged.contains(&pid) && !Path::new(&format!("/proc/{pid}")).exists()
            })
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        let mut live: BpfHashMap<&mut MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map_mut(LIVE_MAP).context("live map missing")?)?;
        let keys: Vec<LiveKey> = live
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead.contains(&k.pid))
            .collect();
        for key in &keys {
            // Gone already: a free raced with this pass.
            let _ = live.remove(key);
        }
        debug!(
            "dropped {} live blocks of {} exited processes",
            keys.len(),
            dead.len()
        );
        for pid in dead {
            self.tables.remove_process(pid);
            self.purged.insert(pid);
        }
        Ok(())
    }

    /// Bytes and objects still held by the process of `key`: none when it
    /// exited and was purged (--all).
    fn holds(&self, key: &StackKey) -> bool {
        !self.purged.contains(&key.pid)
    }

    fn stack_stats(&self) -> anyhow::Result<Vec<(StackKey, StackStats)>> {
        let map: PerCpuHashMap<&MapData, StackKey, StackStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map(STACK_STATS_MAP)
                .context("stack map missing")?,
        )?;
        let mut out = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok((key, per_cpu)) => {
                    let sum = per_cpu
                        .iter()
                        .fold(StackStats::default(), |a, s| StackStats {
                            alloc_objects: a.alloc_objects + s.alloc_objects,
                            alloc_bytes: a.alloc_bytes + s.alloc_bytes,
                            free_objects: a.free_objects + s.free_objects,
                            free_bytes: a.free_bytes + s.free_bytes,
                        });
                    out.push((key, sum));
                }
                // An entry deleted while iterating.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(err).context("reading the stack totals"),
            }
        }
        Ok(out)
    }

    fn counters(&self) -> anyhow::Result<HeapCounters> {
        let map: PerCpuArray<&MapData, HeapCounters> =
            PerCpuArray::try_from(self.ebpf.map(COUNTERS_MAP).context("counter map missing")?)?;
        let values = map.get(&0, 0).context("reading the counters")?;
        Ok(values
            .iter()
            .fold(HeapCounters::default(), |a, c| HeapCounters {
                allocs: a.allocs + c.allocs,
                frees: a.frees + c.frees,
                tracked: a.tracked + c.tracked,
                live_full: a.live_full + c.live_full,
                stacks_full: a.stacks_full + c.stacks_full,
                stack_errors: a.stack_errors + c.stack_errors,
                threads_full: a.threads_full + c.threads_full,
                mmaps: a.mmaps + c.mmaps,
                mmaps_in_allocator: a.mmaps_in_allocator + c.mmaps_in_allocator,
                unmaps_partial: a.unmaps_partial + c.unmaps_partial,
            }))
    }

    fn snapshot(&mut self) -> anyhow::Result<()> {
        let stats = self.stack_stats()?;
        let time = self.started.elapsed().as_secs_f64();
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
            if !self.exited.contains(&pid) {
                self.refresh_process(pid);
            }
        }
        let c = match self.live.take() {
            Some(c) => c,
            None => self.new_collector(),
        };
        if self.settings.leaks {
            self.leak_profile(c)
        } else {
            self.heap_profile(c)
        }
    }

    /// A collector for this session's report, knowing the targets' mappings.
    fn new_collector(&self) -> Collector {
        let types = if self.settings.leaks {
            vec![SampleType::inuse_objects(), SampleType::inuse_space()]
        } else {
            vec![
                SampleType::alloc_objects(),
                SampleType::alloc_space(),
                SampleType::inuse_objects(),
                SampleType::inuse_space(),
            ]
        };
        let mut c = Collector::new(types, "inuse_space");
        for &pid in &self.pids {
            c.note_process(pid);
        }
        c
    }

    fn add_comments(&mut self, c: &mut Collector, unmapped: &Unmapped) -> anyhow::Result<()> {
        if self.settings.probe == Probe::Hooks {
            c.add_comment(format!(
                "mode: libprofalloc.so sampling hooks, one allocation per {} bytes on average (values are estimates)",
                self.settings.sample_bytes
            ));
            c.set_period(SampleType::alloc_space(), self.settings.sample_bytes as i64);
        } else if self.settings.sample_bytes == 0 {
            c.add_comment("mode: every allocation tracked");
        } else {
            c.add_comment(format!(
                "mode: sampled, one allocation per {} bytes on average (values are estimates)",
                self.settings.sample_bytes
            ));
            c.set_period(SampleType::alloc_space(), self.settings.sample_bytes as i64);
        }
        let counters = self.counters()?;
        c.add_comment(format!(
            "allocations seen: {}, tracked: {}{}",
            counters.allocs,
            counters.tracked,
            if self.settings.mmap {
                " (with the mappings)"
            } else {
                ""
            }
        ));
        if counters.live_full > 0 {
            c.add_comment(format!(
                "lost allocations: {} (live-allocation map full; raise --max-live)",
                counters.live_full
            ));
        }
        if counters.stacks_full > 0 {
            c.add_comment(format!(
                "lost allocations: {} (stack map full; raise --max-stacks)",
                counters.stacks_full
            ));
        }
        if counters.threads_full > 0 {
            c.add_comment(format!(
                "lost allocations: {} (thread map full)",
                counters.threads_full
            ));
        }
        if counters.stack_errors > 0 {
            c.add_comment(format!(
                "allocations without a user stack: {}",
                counters.stack_errors
            ));
        }
        if self.settings.mmap {
            c.add_comment(format!(
                "anonymous mappings tracked: {} (stacks end in {}); made by the allocator, counted as its allocations: {}; unmaps of a mapping's front part: {}",
                counters.mmaps,
                profile::MMAP,
                counters.mmaps_in_allocator,
                counters.unmaps_partial
            ));
            if unmapped.mappings > 0 {
                c.add_comment(format!(
                    "tracked mappings partly or wholly unmapped by calls that did not start at them: {} ({} no longer mapped, taken out of the in-use values by comparing with the process's maps)",
                    unmapped.mappings,
                    human_bytes(unmapped.bytes as i64)
                ));
            }
        }
        if !self.purged.is_empty() {
            c.add_comment(format!(
                "processes that exited while recording: {} (they hold nothing; their allocations count in alloc_*)",
                self.purged.len()
            ));
        }
        Ok(())
    }

    /// alloc_objects, alloc_space, inuse_objects, inuse_space per stack.
    fn heap_profile(&mut self, mut c: Collector) -> anyhow::Result<Profile> {
        let (stats, unmapped) = self.report_stats()?;
        self.add_comments(&mut c, &unmapped)?;
        let stacks = self.user_stacks(&stats)?;
        for (key, s) in stats {
            let (inuse_objects, inuse_bytes) = if self.holds(&key) {
                (
                    objects(s.alloc_objects) - objects(s.free_objects),
                    s.alloc_bytes as i64 - s.free_bytes as i64,
                )
            } else {
                (0, 0)
            };
            let values = vec![
                objects(s.alloc_objects),
                s.alloc_bytes as i64,
                inuse_objects,
                inuse_bytes,
            ];
            let sample = self.sample(&key, &stacks, values, Vec::new());
            c.add(sample);
        }
        c.finish()
    }

    /// Leaking stacks (and, with --min-age, stacks holding old allocations)
    /// with their outstanding objects and bytes.
    fn leak_profile(&mut self, mut c: Collector) -> anyhow::Result<Profile> {
        let (stats, unmapped) = self.report_stats()?;
        self.add_comments(&mut c, &unmapped)?;
        let launched_exit =
            matches!(self.settings.targets, Targets::Launch(_)) && !self.exited.is_empty();
        let decided = self.history.len() >= leaks::MIN_SNAPSHOTS;
        c.add_comment(format!("leak rule: {}", leaks::RULE));
        if launched_exit {
            c.add_comment("the program exited: everything it never freed is listed");
        } else if !decided {
            c.add_comment(
                "run too short to measure growth: every outstanding allocation is listed",
            );
        }
        let old = match self.settings.min_age {
            Some(age) => self.old_allocations(age)?,
            None => HashMap::new(),
        };
        let mut keys: Vec<(StackKey, StackStats)> = stats.clone();
        keys.extend(old.keys().map(|k| (*k, StackStats::default())));
        let stacks = self.user_stacks(&keys)?;
        let (mut leaking, mut listed) = (0, 0);
        for (key, s) in stats {
            if !self.holds(&key) {
                continue;
            }
            let outstanding = (
                objects(s.alloc_objects) - objects(s.free_objects),
                s.alloc_bytes as i64 - s.free_bytes as i64,
            );
            let growth = self.history.classify(&key);
            let grows = growth.is_some_and(|g| g.leaking);
            let mut labels = Vec::new();
            if let Some(g) = growth {
                labels.push((
                    "growth".to_owned(),
                    g.bytes_per_sec.round() as i64,
                    "bytes/s".to_owned(),
                ));
            }
            let old_here = old.get(&key);
            if let Some(o) = old_here {
                labels.push(("age".to_owned(), o.oldest_secs as i64, "seconds".to_owned()));
            }
            let values = if grows || launched_exit || !decided {
                if outstanding.1 <= 0 {
                    continue;
                }
                leaking += usize::from(grows);
                vec![outstanding.0, outstanding.1]
            } else if let Some(o) = old_here {
                vec![objects(o.objects), o.bytes as i64]
            } else {
                continue;
            };
            listed += 1;
            let sample = self.sample(&key, &stacks, values, labels);
            c.add(sample);
        }
        let old_note = if old.is_empty() {
            String::new()
        } else {
            format!(
                ", {} stack(s) holding allocations older than the minimum age",
                old.len()
            )
        };
        if launched_exit {
            eprintln!("prof-bpf: {listed} stack(s) hold memory the program never freed{old_note}");
        } else if decided {
            eprintln!("prof-bpf: {leaking} leaking stack(s){old_note}");
        } else {
            eprintln!(
                "prof-bpf: {listed} stack(s) hold memory (too few snapshots to measure growth){old_note}"
            );
        }
        c.finish()
    }

    /// Live tracked allocations at least `min_age` seconds old, per stack.
    fn old_allocations(&self, min_age: f64) -> anyhow::Result<HashMap<StackKey, OldAllocs>> {
        let map: BpfHashMap<&MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map(LIVE_MAP).context("live map missing")?)?;
        let now = monotonic_ns();
        let min_ns = (min_age * 1e9) as u64;
        let mut out: HashMap<StackKey, OldAllocs> = HashMap::new();
        for entry in map.iter() {
            let Ok((key, live)) = entry else { continue };
            let age = now.saturating_sub(live.timestamp_ns);
            if age < min_ns {
                continue;
            }
            let stack = StackKey {
                stack_id: live.stack_id,
                pid: key.pid,
                source: key.source,
            };
            let o = out.entry(stack).or_default();
            o.objects += live.weight_objects;
            o.bytes += live.weight_bytes;
            o.oldest_secs = o.oldest_secs.max(age as f64 / 1e9);
        }
        Ok(out)
    }

    /// The user stacks of `stats`' keys, from the unwinder's map.
    fn user_stacks(
        &self,
        stats: &[(StackKey, StackStats)],
    ) -> anyhow::Result<HashMap<u64, UserStack>> {
        let map: BpfHashMap<&MapData, u64, UserStack> = BpfHashMap::try_from(
            self.ebpf
                .map(USER_STACKS_MAP)
                .context("user stack map missing")?,
        )?;
        let mut out = HashMap::new();
        for (key, _) in stats {
            if key.stack_id != STACK_ID_MISSING
                && !out.contains_key(&key.stack_id)
                && let Ok(stack) = map.get(&key.stack_id, 0)
            {
                out.insert(key.stack_id, stack);
            }
        }
        Ok(out)
    }

    /// One profile sample for a stack: its frames checked against the
    /// process's executable mappings (a frame outside them ends the stack,
    /// marked truncated, rather than showing garbage).
    fn sample(
        &mut self,
        key: &StackKey,
        stacks: &HashMap<u64, UserStack>,
        values: Vec<i64>,
        numeric_labels: Vec<(String, i64, String)>,
    ) -> RawSample {
        let pid = key.pid;
        if !self.comms.contains_key(&pid) {
            self.refresh_process(pid);
        }
        let (mut user, mut status) = match stacks.get(&key.stack_id).copied() {
            Some(stack) if stack.status != STACK_MISSING => {
                let len = (stack.len as usize).min(stack.ips.len());
                let status = if stack.status == STACK_COMPLETE {
                    StackStatus::Complete
                } else {
                    StackStatus::Truncated
                };
                (stack.ips[..len].to_vec(), status)
            }
            _ => (Vec::new(), StackStatus::Missing),
        };
        if let Some(cut) = self.first_bad_frame(pid, &user) {
            user.truncate(cut);
            status = StackStatus::Truncated;
        }
        if key.source == SOURCE_MMAP && user.len() > 1 && self.in_libc(pid, user[0]) {
            // Frame 0 is the pc at the syscall instruction, in libc's
            // wrapper (mmap, mremap): like malloc stacks, mapping stacks start
            // at the caller. A program's own syscall instruction stays.
            user.remove(0);
        }
        if self.settings.probe == Probe::Hooks {
            // A hook's caller is the allocator itself: the stack starts at
            // the first frame outside it, the allocation's real caller.
            let inodes: Vec<u64> = self.allocators.iter().map(|(a, _)| a.inode).collect();
            if let Some(maps) = self.maps.get(&pid) {
                let inside = |ip: u64| {
                    maps.iter()
                        .any(|m| inodes.contains(&m.inode) && ip >= m.start && ip < m.end)
                };
                let skip = user.iter().take_while(|&&ip| inside(ip)).count();
                user.drain(..skip.min(user.len().saturating_sub(1)));
            }
        }
        RawSample {
            pid,
            tid: None,
            comm: self
                .comms
                .get(&pid)
                .cloned()
                .unwrap_or_else(|| "?".to_owned()),
            thread_comm: None,
            user,
            user_status: status,
            kernel: Vec::new(),
            values,
            numeric_labels,
            leaf_is_pc: false,
            leaf_marker: (key.source == SOURCE_MMAP).then_some(profile::MMAP),
        }
    }

    /// Whether `ip` is in the C library of `pid`.
    fn in_libc(&self, pid: u32, ip: u64) -> bool {
        let Some(maps) = self.maps.get(&pid) else {
            return false;
        };
        let Some(libc) = process::find_libc(maps) else {
            return false;
        };
        maps.iter()
            .any(|m| m.inode == libc.inode && m.dev == libc.dev && ip >= m.start && ip < m.end)
    }

    /// The per-stack totals for a report: with --mmap, corrected for the
    /// tracked mappings that are no longer wholly mapped.
    fn report_stats(&mut self) -> anyhow::Result<(Vec<(StackKey, StackStats)>, Unmapped)> {
        let mut stats = self.stack_stats()?;
        let unmapped = if self.settings.mmap {
            self.unmapped_mappings()?
        } else {
            Unmapped::default()
        };
        for (key, s) in &mut stats {
            if let Some(gone) = unmapped.per_stack.get(key) {
                s.free_objects += gone.free_objects;
                s.free_bytes += gone.free_bytes;
            }
        }
        Ok((stats, unmapped))
    }

    /// Tracked mappings that are no longer wholly mapped: an unmap that
    /// started inside one (the kernel side finds mappings by their start)
    /// or covered more than it follows. Compared with the maps of the
    /// processes still running; what is gone counts as freed (the whole
    /// object once nothing of it is left).
    ///
    /// A range unmapped and then mapped again by a mapping that is not
    /// tracked (MAP_FIXED over a hole) still counts as the old mapping's.
    fn unmapped_mappings(&mut self) -> anyhow::Result<Unmapped> {
        let map: BpfHashMap<&MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map(LIVE_MAP).context("live map missing")?)?;
        let mut current: HashMap<u32, Option<Vec<Mapping>>> = HashMap::new();
        let mut unmapped = Unmapped::default();
        for entry in map.iter() {
            let Ok((key, live)) = entry else { continue };
            if key.source != SOURCE_MMAP {
                continue;
            }
            // An exited process (a zombie too) has no maps left to compare
            // with: it is reported as it was when it exited.
            if self.exited.contains(&key.pid) {
                continue;
            }
            let Some(maps) = current
                .entry(key.pid)
                .or_insert_with(|| process::maps(key.pid).ok().filter(|m| !m.is_empty()))
            else {
                continue;
            };
            let (start, end) = (key.addr, key.addr + live.size);
            let covered: u64 = maps
                .iter()
                .filter(|m| m.inode == 0)
                .map(|m| m.end.min(end).saturating_sub(m.start.max(start)))
                .sum();
            if covered >= live.size {
                continue;
            }
            unmapped.mappings += 1;
            unmapped.bytes += live.size - covered;
            let gone = unmapped
                .per_stack
                .entry(StackKey {
                    stack_id: live.stack_id,
                    pid: key.pid,
                    source: SOURCE_MMAP,
                })
                .or_default();
            gone.free_bytes += live.size - covered;
            if covered == 0 {
                gone.free_objects += live.weight_objects;
            }
        }
        Ok(unmapped)
    }

    /// Index of the first frame that is the kernel's uretprobe trampoline
    /// (a return address replaced by the kernel says nothing about the caller;
    /// the collector ends stacks at frames outside executable mappings).
    fn first_bad_frame(&self, pid: u32, user: &[u64]) -> Option<usize> {
        let uprobes = self
            .maps
            .get(&pid)
            .and_then(|maps| maps.iter().find(|m| m.path == "[uprobes]"))
            .map_or(UPROBES_PAGE, |m| (m.start, m.end));
        user.iter()
            .position(|&ip| ip >= uprobes.0 && ip < uprobes.1)
    }
}

/// The processes (but this one) that map a file with one of `inodes`.
fn processes_mapping(inodes: &[u64]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            process::maps(pid).is_ok_and(|maps| maps.iter().any(|m| inodes.contains(&m.inode)))
        })
        .collect()
}

/// Where x86-64 Linux places the uprobes page (`[uprobes]`) unless taken.
const UPROBES_PAGE: (u64, u64) = (0x7fff_ffff_e000, 0x7fff_ffff_f000);

#[derive(Default)]
struct OldAllocs {
    objects: u64,
    bytes: u64,
    oldest_secs: f64,
}

/// The live status line.
#[derive(Default)]
struct Status {
    last: Option<(tokio::time::Instant, u64)>,
}

impl Status {
    fn update(&mut self, session: &Session) -> anyhow::Result<String> {
        let counters = session.counters()?;
        let events = counters.allocs + counters.frees + counters.mmaps;
        let now = tokio::time::Instant::now();
        let rate = match self.last {
            Some((at, before)) => (events - before) as f64 / (now - at).as_secs_f64().max(1e-3),
            None => events as f64 / session.started.elapsed().as_secs_f64().max(1e-3),
        };
        self.last = Some((now, events));
        let (mut bytes, mut objs) = (0i64, 0i64);
        for (_, s) in session.stack_stats()? {
            bytes += s.alloc_bytes as i64 - s.free_bytes as i64;
            objs += objects(s.alloc_objects) - objects(s.free_objects);
        }
        let lost = counters.live_full + counters.stacks_full + counters.threads_full;
        let mappings = if session.settings.mmap {
            format!(
                ", {} mappings ({} front unmaps)",
                counters.mmaps, counters.unmaps_partial
            )
        } else {
            String::new()
        };
        Ok(format!(
            "prof-bpf: heap {:.0} s: {:.0} events/s, live {} in {} objects{mappings}, lost {}",
            session.started.elapsed().as_secs_f64(),
            rate,
            human_bytes(bytes),
            objs,
            lost
        ))
    }
}

fn human_bytes(bytes: i64) -> String {
    let b = bytes as f64;
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Weighted object count (WEIGHT_ONE fixed point) to objects.
fn objects(fixed: u64) -> i64 {
    ((fixed + WEIGHT_ONE / 2) / WEIGHT_ONE) as i64
}

/// Writes the sampler settings and tables before any probe is attached.
fn configure(ebpf: &mut Ebpf, sample_bytes: u64, mmap_new_targets: bool) -> anyhow::Result<()> {
    let mut config: Array<&mut MapData, HeapConfig> =
        Array::try_from(ebpf.map_mut(CONFIG_MAP).context("config map missing")?)?;
    let settings = HeapConfig {
        sample_bytes,
        agent_pid: std::process::id(),
        mmap_new_targets: u32::from(mmap_new_targets),
    };
    config
        .set(0, settings, 0)
        .context("writing the heap config")?;
    if sample_bytes == 0 {
        return Ok(());
    }
    let mut intervals: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(SAMPLE_INTERVALS_MAP)
            .context("interval table missing")?,
    )?;
    for (i, v) in sampling::intervals(sample_bytes).into_iter().enumerate() {
        intervals
            .set(i as u32, v, 0)
            .context("writing the interval table")?;
    }
    let mut weights: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(SAMPLE_WEIGHTS_MAP)
            .context("weight table missing")?,
    )?;
    for (i, v) in sampling::weights().into_iter().enumerate() {
        weights
            .set(i as u32, v, 0)
            .context("writing the weight table")?;
    }
    Ok(())
}

/// Resolves `--probe auto` for running processes: the hooks when every
/// target runs libprofalloc.so with its sampler on (the report then uses its
/// rate), else the malloc family.
fn choose_hooks(settings: &mut Settings, plan: &[(Allocator, UProbeScope)]) -> anyhow::Result<()> {
    if settings.probe == Probe::Malloc {
        return Ok(());
    }
    let mut rates = Vec::new();
    for (allocator, scope) in plan {
        let UProbeScope::OneProcess(pid) = scope else {
            continue;
        };
        let rate = match allocator.hooks {
            Some(hooks) => discover::hook_rate(pid.get(), allocator, &hooks)?,
            None if settings.probe == Probe::Hooks => {
                bail!(
                    "--probe hooks: pid {pid} does not run libprofalloc.so (its allocator is {})",
                    allocator.path
                )
            }
            None => 0,
        };
        if rate == 0 && settings.probe == Probe::Hooks {
            bail!(
                "--probe hooks: the sampler of libprofalloc.so is off in pid {pid} (PROFALLOC_SAMPLE_BYTES=0)"
            );
        }
        rates.push(rate);
    }
    if rates.is_empty() || rates.contains(&0) {
        settings.probe = Probe::Malloc;
        return Ok(());
    }
    settings.probe = Probe::Hooks;
    settings.sample_bytes = rates[0];
    if rates.iter().any(|&r| r != rates[0]) {
        warn!("the targets sample at different rates; the report states the first one's");
    }
    Ok(())
}

/// Tracked mappings found partly or wholly unmapped (see
/// `Session::unmapped_mappings`), and what is gone per stack, as frees.
#[derive(Default)]
struct Unmapped {
    mappings: u64,
    bytes: u64,
    per_stack: HashMap<StackKey, StackStats>,
}

/// How long the launched program may take to reach its loader's stops.
const LOADER_STOP_WAIT: Duration = Duration::from_secs(5);

/// Continues a stopped process.
fn resume(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
