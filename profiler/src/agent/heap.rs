//! The agent's heap collector.
//!
//! - Processes that sample their heap in-process are found by their mapped
//!   objects: an object with the `otel_memory:alloc/free` USDT probes, or
//!   with libprofalloc.so's sampling hooks, gets the hook programs attached
//!   once for every process that maps it (a uprobe on the file), so new
//!   processes are covered from their first sample on.
//! - Processes named by `--pid`/`--include` that do not get malloc uprobes
//!   of their own (a cost on every call), which are detached when the
//!   process calls malloc and free more often than the ceiling.
//! - Every interval, one profile per process: alloc_* as deltas over the
//!   interval, inuse_* as snapshots; for processes whose allocator exports
//!   its live heap (libprofalloc.so), in-use values from it: the sampled
//!   heap since the process started.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use log::{debug, warn};
use profiler_common::{
    heap::{LIVE_MAP, STACK_STATS_MAP, StackKey, StackStats},
    stack::UserStack,
};

use super::scope::{Facts, Scope};
use crate::{
    ebpf,
    heap::{
        attach,
        coverage::{Clock, Coverage},
        discover::{self, Allocator},
        live_set, maps,
        processes::Processes,
        report::{self, Context, Totals},
        settings::Tracking,
        usdt_attach::{self, UsdtAttacher},
        usdt_sites,
    },
    live_heap::{self, LiveHeap},
    process,
    profile::{Collector, SampleType},
    python::tracker::Tracker,
    symbolize::MapsCache,
};

/// After an exec, how long a process is examined again at every tick
/// while it maps no in-process sampler: the exec event comes before the
/// dynamic loader has mapped the program's libraries.
const EXEC_SETTLE: Duration = Duration::from_secs(3);

/// What an object file offers the hook programs.
#[derive(Clone, Debug)]
enum Offer {
    /// The otel_memory USDT probes, attached for every process mapping it.
    Usdt,
    /// libprofalloc.so's hooks, attached for every process mapping it
    /// (the allocator, to read each process's sampling rate).
    Hooks(Box<Allocator>),
    Nothing,
}

/// The heap side of the agent (see the module docs).
pub(crate) struct HeapCollector {
    sample_bytes: u64,
    max_rate: u64,
    /// Object files examined, by inode.
    objects: HashMap<u64, Offer>,
    /// The USDT sites' argument specs, shared by every object probed.
    usdt: UsdtAttacher,
    /// Inodes of the objects with in-process sampling.
    sampler_inodes: Vec<u64>,
    /// Processes examined (forgotten again on exec).
    seen: HashSet<u32>,
    /// When each process last ran a new program (see [`EXEC_SETTLE`]).
    execs: HashMap<u32, Instant>,
    /// Processes sampled in-process, and how.
    in_process: HashMap<u32, Tracking>,
    uprobed: HashMap<u32, Uprobed>,
    /// Processes detached for calling malloc too often: never probed again.
    over_ceiling: HashSet<u32>,
    /// Processes out of scope (their in-process samples are not reported).
    out_of_scope: HashSet<u32>,
    /// Cumulative totals at the last cut: alloc_* are deltas from it.
    baseline: HashMap<StackKey, StackStats>,
    /// User stacks read so far, by id (a hash of their content).
    stacks: HashMap<u64, UserStack>,
    processes: Processes,
    /// Mappings shared with the CPU collector's profiles.
    maps_cache: Arc<MapsCache>,
    /// Where each process's allocator keeps its live heap (None: it
    /// exports none), found once per program.
    live_headers: HashMap<u32, Option<u64>>,
    attached_at: SystemTime,
    /// Processes detached for their rate, counted.
    pub detached: u64,
    /// Processes whose samples were dropped: they exited before their
    /// mappings could be read.
    pub unplaced: u64,
}

impl HeapCollector {
    /// Loads the heap programs into `ebpf` (not attached yet).
    pub fn new(
        ebpf: &mut Ebpf,
        sample_bytes: u64,
        max_rate: u64,
        maps_cache: Arc<MapsCache>,
    ) -> anyhow::Result<Self> {
        maps::configure(ebpf, sample_bytes, false)?;
        for name in [
            attach::HOOK_FREE_PROGRAM,
            attach::HOOK_ALLOC_PROGRAM,
            usdt_attach::FREE_PROGRAM,
            usdt_attach::ALLOC_PROGRAM,
            attach::FREE_PROGRAM,
            attach::RETURN_PROGRAM,
            attach::ENTRY_PROGRAM,
        ] {
            let _: &mut UProbe = ebpf::program(ebpf, name)?;
        }
        Ok(Self {
            sample_bytes,
            max_rate,
            objects: HashMap::new(),
            usdt: UsdtAttacher::default(),
            sampler_inodes: Vec::new(),
            seen: HashSet::new(),
            execs: HashMap::new(),
            in_process: HashMap::new(),
            uprobed: HashMap::new(),
            over_ceiling: HashSet::new(),
            out_of_scope: HashSet::new(),
            baseline: HashMap::new(),
            stacks: HashMap::new(),
            processes: Processes::default(),
            maps_cache,
            live_headers: HashMap::new(),
            attached_at: SystemTime::now(),
            detached: 0,
            unplaced: 0,
        })
    }

    /// The map capacities the heap programs are loaded with.
    pub fn map_sizes(loader: &mut aya::EbpfLoader<'_>) {
        loader
            .map_max_entries(LIVE_MAP, profiler_common::heap::DEFAULT_MAX_LIVE)
            .map_max_entries(STACK_STATS_MAP, profiler_common::heap::DEFAULT_MAX_STACKS);
    }

    fn is_target(&self, pid: u32) -> bool {
        self.in_process.contains_key(&pid) || self.uprobed.contains_key(&pid)
    }

    /// The processes whose heap is profiled.
    pub fn targets(&self) -> impl Iterator<Item = u32> + '_ {
        self.in_process.keys().chain(self.uprobed.keys()).copied()
    }

    /// `pid` runs a new program: it is examined again.
    pub fn exec(&mut self, ebpf: &mut Ebpf, pid: u32) {
        self.seen.remove(&pid);
        self.execs.insert(pid, Instant::now());
        self.in_process.remove(&pid);
        self.out_of_scope.remove(&pid);
        self.live_headers.remove(&pid);
        if let Some(u) = self.uprobed.remove(&pid) {
            attach::detach(ebpf, u.links);
        }
    }

    /// Forgets what was decided about processes that are not among
    /// `running` (all processes now): their pids may come back.
    pub fn forget_gone(&mut self, running: &[u32]) {
        let running: HashSet<u32> = running.iter().copied().collect();
        self.seen.retain(|pid| running.contains(pid));
        self.out_of_scope.retain(|pid| running.contains(pid));
        self.execs
            .retain(|pid, at| running.contains(pid) && at.elapsed() < EXEC_SETTLE);
    }

    /// Examines the processes among `pids` not seen yet: attaches to the
    /// in-process samplers they map, and gives malloc uprobes to those that
    /// `scope` names and that have none.
    pub fn discover(&mut self, ebpf: &mut Ebpf, scope: &Scope, pids: &[u32]) {
        let me = std::process::id();
        for &pid in pids {
            if pid == me || !self.seen.insert(pid) {
                continue;
            }
            let Some(read) = self.maps_cache.maps(pid) else {
                continue;
            };
            let maps = &read.maps;
            if maps.is_empty() {
                // A kernel thread, or gone.
                continue;
            }
            let facts = Facts::read(pid);
            if !scope.profiles(&facts) {
                self.out_of_scope.insert(pid);
                continue;
            }
            let mut tracking = None;
            for object in discover::mapped_objects(maps) {
                if !self.objects.contains_key(&object.inode) {
                    let offer = self.examine(ebpf, pid, &object.path, object.inode);
                    self.objects.insert(object.inode, offer);
                }
                tracking = match &self.objects[&object.inode] {
                    Offer::Usdt => Some(Tracking::Usdt),
                    Offer::Hooks(allocator) => allocator.hooks.map(|hooks| Tracking::Hooks {
                        sample_bytes: discover::hook_rate(pid, allocator, &hooks).unwrap_or(0),
                    }),
                    Offer::Nothing => continue,
                };
                break;
            }
            if let Some(tracking) = tracking {
                self.in_process.insert(pid, tracking);
                self.refresh(pid);
            } else if self
                .execs
                .get(&pid)
                .is_some_and(|at| at.elapsed() < EXEC_SETTLE)
            {
                // Its libraries may not be mapped yet: the next tick looks
                // again.
                self.seen.remove(&pid);
            } else if scope.named(&facts) && !self.over_ceiling.contains(&pid) {
                self.uprobe(ebpf, pid, &facts);
            }
        }
    }

    /// Looks at one object for in-process sampling and, when it has it,
    /// attaches the hook programs to it for every process.
    fn examine(&mut self, ebpf: &mut Ebpf, pid: u32, path: &str, inode: u64) -> Offer {
        let open_path = process::path_in_root(pid, path);
        // Mapped, not read: only the ELF headers, symbols and notes are
        // touched, whatever the file's size.
        let Some(data) = map_file(&open_path) else {
            return Offer::Nothing;
        };
        let usdt = match usdt_sites::in_object(path, open_path.clone(), inode, &data) {
            Ok(sites) => sites,
            Err(err) => {
                warn!("heap: {path}: {err:#}; its processes are not sampled through it");
                None
            }
        };
        let hooks = if usdt.is_some() {
            None
        } else {
            discover::hooks(&data)
        };
        let tracking = match (&usdt, hooks) {
            (Some(_), _) => Tracking::Usdt,
            // The kernel side takes the hooks' weights as they come.
            (None, Some(_)) => Tracking::Hooks { sample_bytes: 0 },
            (None, None) => return Offer::Nothing,
        };
        let allocator = Allocator {
            path: path.to_owned(),
            open_path,
            inode,
            points: Vec::new(),
            hooks,
            usdt: usdt.into_iter().collect(),
        };
        match attach::allocator(
            ebpf,
            tracking,
            &allocator,
            UProbeScope::AllProcesses,
            &mut self.usdt,
        ) {
            Ok(()) => {
                eprintln!(
                    "prof-bpf: heap: sampling in-process through {} of {path} (every process mapping it)",
                    match tracking {
                        Tracking::Usdt => "the otel_memory USDT probes",
                        _ => "the sampling hooks",
                    }
                );
                self.sampler_inodes.push(inode);
                match tracking {
                    Tracking::Usdt => Offer::Usdt,
                    _ => Offer::Hooks(Box::new(allocator)),
                }
            }
            Err(err) => {
                warn!("heap: {err:#}");
                Offer::Nothing
            }
        }
    }

    /// The mappings (shared with the CPU profiles: read again only when
    /// old, see [`MapsCache`]) and name of a process; false when none are
    /// known.
    fn refresh(&mut self, pid: u32) -> bool {
        let Some(read) = self.maps_cache.maps(pid) else {
            return false;
        };
        self.processes.maps.insert(pid, read.maps.to_vec());
        self.processes.comms.insert(pid, process::comm(pid));
        true
    }

    /// The live heap of a process whose allocator exports one, read at the
    /// address found for its program.
    fn live_heap(&mut self, pid: u32) -> HashMap<u32, LiveHeap> {
        let at = *self
            .live_headers
            .entry(pid)
            .or_insert_with(|| live_heap::find_header(pid).ok());
        let Some(at) = at else {
            return HashMap::new();
        };
        match live_heap::read_at(pid, at) {
            Ok(heap) => HashMap::from([(pid, heap)]),
            Err(err) => {
                // Looked for again next time.
                self.live_headers.remove(&pid);
                debug!("no live heap read from pid {pid}: {err:#}");
                HashMap::new()
            }
        }
    }

    /// Cuts the interval: one collector per heap-profiled process with
    /// this interval's allocations and what is in use now. `stack` reads a
    /// user stack by id from the unwinder's map; `python` named the
    /// Python halves of combined stack ids, and names the Python stacks of
    /// the live heaps.
    pub fn cut(
        &mut self,
        ebpf: &mut Ebpf,
        scope: &Scope,
        stack: impl Fn(&Ebpf, u64) -> Option<UserStack>,
        python: &mut Tracker,
    ) -> anyhow::Result<Vec<(u32, Collector)>> {
        let stats = maps::stack_stats(ebpf)?;
        // Processes first seen by their samples: started since the last
        // scan, or seen before they ran their program (a fork before exec).
        let new: Vec<u32> = stats
            .iter()
            .map(|(k, _)| k.pid)
            .filter(|pid| {
                !self.is_target(*pid)
                    && !self.out_of_scope.contains(pid)
                    && !self.over_ceiling.contains(pid)
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for pid in &new {
            self.seen.remove(pid);
        }
        self.discover(ebpf, scope, &new);
        let counters = maps::counters(ebpf)?;
        let mut per_pid: HashMap<u32, Vec<(StackKey, StackStats)>> = HashMap::new();
        for (key, s) in &stats {
            per_pid.entry(key.pid).or_default().push((*key, *s));
        }
        for &pid in self.in_process.keys() {
            per_pid.entry(pid).or_default();
        }
        for &pid in per_pid.keys() {
            if !self.processes.maps.contains_key(&pid) && !self.processes.purged.contains(&pid) {
                // Read now while it runs, else those kept since its exec
                // (it exited before the agent looked at it).
                self.refresh(pid);
            }
        }
        let mut out = Vec::new();
        for (pid, pid_stats) in per_pid {
            if self.out_of_scope.contains(&pid) {
                continue;
            }
            if !self.processes.maps.contains_key(&pid) {
                // Gone before its mappings could be read, even at its exec.
                if !self.processes.purged.contains(&pid) {
                    self.unplaced += 1;
                    warn!(
                        "heap: pid {pid} exited before its mappings could be read: its samples are dropped (so far: {})",
                        self.unplaced
                    );
                }
                continue;
            }
            let alive = super::running(pid);
            if alive {
                self.refresh(pid);
            }
            for (key, _) in &pid_stats {
                // A combined id stands for a native and a Python stack.
                let native = python
                    .pairs()
                    .get(&key.stack_id)
                    .map_or(key.stack_id, |(pair, _)| pair.native);
                if !self.stacks.contains_key(&key.stack_id)
                    && let Some(s) = stack(ebpf, native)
                {
                    self.stacks.insert(key.stack_id, s);
                }
            }
            let in_process = self
                .in_process
                .get(&pid)
                .copied()
                .or_else(|| self.sampler_of(&self.processes.maps[&pid]));
            let tracking = in_process.unwrap_or(Tracking::Malloc {
                sample_bytes: self.sample_bytes,
            });
            let in_process = in_process.is_some();
            let live = if in_process && alive {
                self.live_heap(pid)
            } else {
                HashMap::new()
            };
            let at = Clock::local(self.attached_at);
            let coverage = if live.is_empty() {
                Coverage::SinceAttach { tracking, at }
            } else {
                Coverage::AllocatorSinceStart { at }
            };
            let stacks = pid_stats
                .iter()
                .filter_map(|(k, _)| Some((k.stack_id, *self.stacks.get(&k.stack_id)?)))
                .collect();
            let live_python = live_set::name_python(python, &live);
            let totals = Totals {
                stats: pid_stats,
                stacks,
                counters: counters.clone(),
                live,
                live_python,
                ..Totals::default()
            };
            let ctx = Context {
                tracking,
                coverage,
                mmap: false,
                processes: &self.processes,
                allocator_inodes: self.sampler_inodes.clone(),
                python: Some(python.pairs()),
            };
            let report = report::heap_report_since(&totals, &ctx, &self.baseline);
            if report.samples.is_empty() {
                continue;
            }
            let mut collector = Collector::new(report::sample_types(false), "inuse_space");
            // The mappings read while it lived: a process that exited
            // since is placed all the same.
            collector.share_maps(Arc::clone(&self.maps_cache));
            collector.note_process_maps(pid, &self.processes.maps[&pid]);
            for comment in report.comments {
                collector.add_comment(comment);
            }
            if let Some(period) = report.period {
                collector.set_period(SampleType::alloc_space(), period);
            }
            for sample in report.samples {
                collector.add(sample);
            }
            out.push((pid, collector));
        }
        let sampled: HashSet<u32> = stats.iter().map(|(k, _)| k.pid).collect();
        self.baseline = stats.into_iter().collect();
        self.forget_exited(ebpf, sampled)?;
        Ok(out)
    }

    /// How a process is sampled in-process, from the objects it maps
    /// (for one that exited before it was examined).
    fn sampler_of(&self, maps: &[process::Mapping]) -> Option<Tracking> {
        maps.iter().find_map(|m| match self.objects.get(&m.inode)? {
            Offer::Usdt => Some(Tracking::Usdt),
            // Its sampling rate can no longer be read: the hooks'
            // weights are taken as they come.
            Offer::Hooks(_) => Some(Tracking::Hooks { sample_bytes: 0 }),
            Offer::Nothing => None,
        })
    }

    /// Drops what the processes that exited held in the kernel's live and
    /// stack tables (`sampled`: the processes with samples there).
    fn forget_exited(&mut self, ebpf: &mut Ebpf, sampled: HashSet<u32>) -> anyhow::Result<()> {
        let dead: HashSet<u32> = sampled
            .into_iter()
            .chain(self.processes.maps.keys().copied())
            .filter(|&pid| !super::running(pid))
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        let dropped = maps::drop_live_blocks(ebpf, &dead)?;
        let stacks = maps::drop_stack_stats(ebpf, &dead)?;
        debug!(
            "heap: dropped {dropped} live blocks and {stacks} stack totals of {} exited processes",
            dead.len()
        );
        self.baseline.retain(|key, _| !dead.contains(&key.pid));
        for pid in dead {
            // Their last interval was cut: nothing of them is kept.
            self.processes.maps.remove(&pid);
            self.processes.comms.remove(&pid);
            self.live_headers.remove(&pid);
            self.in_process.remove(&pid);
            self.seen.remove(&pid);
            self.out_of_scope.remove(&pid);
            if let Some(u) = self.uprobed.remove(&pid) {
                attach::detach(ebpf, u.links);
            }
        }
        let used: HashSet<u64> = self.baseline.keys().map(|k| k.stack_id).collect();
        self.stacks.retain(|id, _| used.contains(id));
        Ok(())
    }

    /// One line on what is being profiled.
    pub fn summary(&self) -> String {
        format!(
            "{} processes sampled in-process, {} with malloc uprobes, {} detached over the ceiling, {} gone before their mappings were read",
            self.in_process.len(),
            self.uprobed.len(),
            self.detached,
            self.unplaced
        )
    }
}

/// A read-only map of the file at `path`.
fn map_file(path: &std::path::Path) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: the map is read-only and private to this function's callers;
    // a file truncated meanwhile can fault, which object files of running
    // processes are not (the loader maps them too).
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

mod uprobes;
use uprobes::Uprobed;
