//! The user side of the kernel's Python frame walker: tells it which
//! processes run CPython (with their layout) and which thread state each
//! thread has, reads the Python stacks it recorded, and names them.
//!
//! Threads are matched on `native_thread_id` from the interpreters' thread
//! lists, refreshed every interval ([`Tracker::refresh`]); threads started
//! since are counted by the kernel (`thread_unknown`) until then.
use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use log::debug;
use profiler_common::{
    python::{
        PAIRS_MAP, PROCESSES_MAP, PyFrameSlot, PyPair, PyProcess, PyStack, STACKS_MAP, STACKS_MAX,
        THREADS_MAP,
    },
    python_splice::EvalCode,
};
use stack_cache::StackCache;

use super::{
    Unsupported, discover,
    discover::Interpreter,
    memory::{ProcessMemory, ReadError},
    merge,
    symbolize::{Symbolizer, Unnamed},
    thread_names, threads,
};
use crate::profile::{Frame, RawSample};

/// Name of a frame whose code object could not be read (the process
/// exited, or the code was freed before the interval's read).
pub const UNREADABLE_CODE: &str = "[python code unreadable]";

/// Name of a frame whose code object was freed after the frame was
/// recorded: another one is at its address now (see
/// `profiler_common::python::code_check`), or its memory is free.
pub const FREED_CODE: &str = "[python code freed]";

/// Thread-list refreshes that look for the Python names of new threads.
const NAME_LOOKS: u8 = 3;

/// Pairs below which [`Tracker::name_new_pairs_if_few`] names.
const FEW_PAIRS: usize = 2048;

/// A CPython process the kernel walks.
struct Tracked {
    py: Interpreter,
    memory: ProcessMemory,
    /// Threads in the kernel's thread map.
    tids: HashSet<u32>,
    /// Python names of threads (`threading.Thread.name`), by tid, read
    /// when a thread is new, and again at the next [`NAME_LOOKS`] refreshes
    /// while one has none (a `Thread` enters `threading._active` only once
    /// it runs).
    names: HashMap<u32, String>,
    name_looks_left: u8,
    /// What the kernel's process map holds for it.
    layout: PyProcess,
    /// The evaluation loop's cold parts were looked for (at the first
    /// merge, not at discovery: the search takes a while and the kernel
    /// need not wait for it).
    cold_parts_added: bool,
}

/// See the module docs.
pub struct Tracker {
    /// Heap only: combined ids (see `profiler_common::python::PAIRS_MAP`).
    pairs: Option<BpfHashMap<MapData, u64, PyPair>>,
    named_pairs: PairStacks,
    processes: BpfHashMap<MapData, u32, PyProcess>,
    threads: BpfHashMap<MapData, u32, u64>,
    stacks: BpfHashMap<MapData, u64, PyStack>,
    /// Keep the stacks in the kernel's map after reading them (heap
    /// reports read every stack since the attach again).
    keep_stacks: bool,
    /// Stacks read, by id (content hash: an id always names one stack),
    /// as many as the kernel's map holds at most.
    read: StackCache<(Vec<PyFrameSlot>, u32)>,
    /// Ids read from the map since the last [`Tracker::refresh`], deleted
    /// there.
    read_from_map: Vec<u64>,
    tracked: HashMap<u32, Tracked>,
    /// Processes found not to run a supported CPython.
    others: HashSet<u32>,
    /// Processes named like Python whose interpreter was not found yet.
    pending: Pending,
    /// Processes that exited, forgotten at the next refresh (after their
    /// last samples were named).
    exited: Vec<u32>,
    symbolizer: Symbolizer,
    /// Stacks named ahead of their samples ([`Tracker::name_early`]), by
    /// (pid, id), each taken by the sample's [`Tracker::merge`].
    early: HashMap<(u32, u64), NamedStack>,
    /// One line per unsupported interpreter met.
    pub notes: Vec<String>,
    /// False with `--python-frames native`: no process is walked.
    enabled: bool,
    /// `--python-frames python`.
    only_python: bool,
    /// `--python-lines on`.
    lines: bool,
    /// `--gil`.
    gil_only: bool,
    pub counts: TrackerCounts,
}

impl Tracker {
    /// `heap`: the stacks stay in the kernel's map (heap reports read every
    /// stack since the attach again) and events hold combined ids
    /// ([`Tracker::name_new_pairs`]).
    pub fn new(ebpf: &mut aya::Ebpf, heap: bool) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let pairs = if heap {
            Some(take(PAIRS_MAP)?.try_into()?)
        } else {
            None
        };
        Ok(Self {
            pairs,
            named_pairs: HashMap::new(),
            processes: take(PROCESSES_MAP)?.try_into()?,
            threads: take(THREADS_MAP)?.try_into()?,
            stacks: take(STACKS_MAP)?.try_into()?,
            keep_stacks: heap,
            read: StackCache::new(STACKS_MAX as usize),
            read_from_map: Vec::new(),
            tracked: HashMap::new(),
            others: HashSet::new(),
            pending: Pending::default(),
            exited: Vec::new(),
            symbolizer: Symbolizer::default(),
            early: HashMap::new(),
            notes: Vec::new(),
            enabled: true,
            only_python: false,
            lines: true,
            gil_only: false,
            counts: TrackerCounts::default(),
        })
    }

    /// Looks at process `pid` (new, or after an exec: call
    /// [`Tracker::forget`] first) and has its Python frames walked when it
    /// runs a supported CPython. An unsupported one gets one line on stderr
    /// and in the report.
    pub fn add_process(&mut self, pid: u32) {
        if !self.enabled
            || pid == 0
            || self.tracked.contains_key(&pid)
            || self.others.contains(&pid)
        {
            return;
        }
        if !discover::maps_python(pid) {
            // Checked again at the next exec or mapping snapshot.
            return;
        }
        let memory = ProcessMemory::new(pid);
        let py = match discover::find(pid, &memory) {
            Ok(py) => py,
            Err(err) => {
                if let Some(unsupported) = err.downcast_ref::<Unsupported>() {
                    let line = format!("pid {pid}: {unsupported}");
                    eprintln!("prof-bpf: {line}");
                    self.notes.push(line);
                    self.others.insert(pid);
                    self.pending.remove(pid);
                } else {
                    // A launched interpreter may not have mapped libpython
                    // yet: looked at again soon (refresh_starting).
                    self.pending.add(pid, Instant::now());
                }
                debug!("pid {pid}: no Python frames: {err:#}");
                return;
            }
        };
        self.pending.remove(pid);
        let mut layout = kernel_layout(&py);
        layout.gil_only = u64::from(self.gil_only);
        if let Err(err) = self.processes.insert(pid, layout, 0) {
            debug!("pid {pid}: Python process map: {err}");
            return;
        }
        debug!("pid {pid}: Python {} in {}", py.version, py.object);
        self.counts.processes += 1;
        self.tracked.insert(
            pid,
            Tracked {
                py,
                memory,
                tids: HashSet::new(),
                names: HashMap::new(),
                name_looks_left: 0,
                layout,
                cold_parts_added: false,
            },
        );
        self.refresh_process(pid);
    }

    /// `--python-frames` and `--python-lines`: with `native`, no process
    /// is walked.
    pub fn set_view(&mut self, frames: super::PythonFrames, lines: super::PythonLines) {
        self.enabled = frames != super::PythonFrames::Native;
        self.only_python = frames == super::PythonFrames::Python;
        self.lines = lines == super::PythonLines::On;
    }

    /// `--gil`: CPU samples of threads that do not hold the GIL are left
    /// out in the kernel (call before adding processes).
    pub fn set_gil_only(&mut self, gil_only: bool) {
        self.gil_only = gil_only;
    }

    /// Whole host: every process running now, so that their first samples
    /// already have Python frames.
    pub fn add_running(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let pids: Vec<u32> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        for pid in pids {
            self.add_process(pid);
        }
    }

    /// Process `pid` exited or runs another program.
    pub fn forget(&mut self, pid: u32) {
        self.others.remove(&pid);
        self.pending.remove(pid);
        self.symbolizer.forget(pid);
        if let Some(t) = self.tracked.remove(&pid) {
            let _ = self.processes.remove(&pid);
            for tid in t.tids {
                let _ = self.threads.remove(&tid);
            }
        }
    }

    /// Process `pid` exited: forgotten at the next [`Tracker::refresh`].
    pub fn exited(&mut self, pid: u32) {
        self.exited.push(pid);
    }

    /// Once per interval, after the counts were read: the thread maps of every tracked process follow
    /// their thread lists, and the stacks read last time leave the map
    /// (they stay in the cache by id).
    pub fn refresh(&mut self) {
        for pid in std::mem::take(&mut self.exited) {
            self.forget(pid);
        }
        for id in std::mem::take(&mut self.read_from_map) {
            let _ = self.stacks.remove(&id);
        }
        self.read.rotate();
        self.counts.stacks_evicted = self.read.evicted;
        let pids: Vec<u32> = self.tracked.keys().copied().collect();
        for pid in pids {
            self.refresh_process(pid);
        }
    }

    /// Whether a tracked process has no thread in the map yet (its
    /// interpreter was still starting), or a process named like Python has
    /// no interpreter found yet: worth [`Tracker::refresh_starting`] soon
    /// rather than at the next interval.
    pub fn has_starting(&self) -> bool {
        !self.pending.is_empty() || self.tracked.values().any(|t| t.tids.is_empty())
    }

    /// Looks for the interpreter of the pending processes that are due,
    /// and reads the thread lists of the processes that have no thread
    /// yet.
    pub fn refresh_starting(&mut self) {
        // Found (or found unsupported), a process leaves the pending ones.
        for pid in self.pending.take_due(Instant::now()) {
            self.add_process(pid);
        }
        let pids: Vec<u32> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.tids.is_empty())
            .map(|(&pid, _)| pid)
            .collect();
        for pid in pids {
            self.refresh_process(pid);
        }
    }

    fn refresh_process(&mut self, pid: u32) {
        let Some(t) = self.tracked.get_mut(&pid) else {
            return;
        };
        let threads = match threads::threads(&t.memory, &t.py) {
            Ok(threads) => threads,
            Err(threads::ThreadsError::Read(ReadError::ProcessGone)) => return,
            // The list changed under the reader: next interval.
            Err(err) => {
                debug!("pid {pid}: Python threads: {err}");
                return;
            }
        };
        // The GIL is set up with the first thread state.
        if self.gil_only
            && t.layout.gil_locked == 0
            && let Ok(Some((locked, holder))) = threads::gil(&t.memory, &t.py)
        {
            t.layout.gil_locked = locked;
            t.layout.gil_holder = holder;
            if let Err(err) = self.processes.insert(pid, t.layout, 0) {
                debug!("pid {pid}: Python process map: {err}");
            }
        }
        if threads.iter().any(|thread| !t.tids.contains(&thread.tid)) {
            t.name_looks_left = NAME_LOOKS;
        }
        if t.name_looks_left > 0 {
            t.name_looks_left -= 1;
            name_threads(t, &threads);
            if threads
                .iter()
                .all(|thread| t.names.contains_key(&thread.tid))
            {
                t.name_looks_left = 0;
            }
        }
        let now: HashMap<u32, u64> = threads.iter().map(|t| (t.tid, t.tstate)).collect();
        for (&tid, &tstate) in &now {
            if self.threads.insert(tid, tstate, 0).is_ok() {
                t.tids.insert(tid);
            }
        }
        for tid in t.tids.iter().filter(|tid| !now.contains_key(tid)) {
            let _ = self.threads.remove(tid);
        }
        t.tids.retain(|tid| now.contains_key(tid));
        t.names.retain(|tid, _| now.contains_key(tid));
    }

    /// Puts the Python stack `id` of process `pid` into `sample`, which
    /// holds the native stack taken with it.
    pub fn merge(&mut self, pid: u32, id: u64, sample: &mut RawSample) {
        let named = match self.early.remove(&(pid, id)) {
            Some(named) => named,
            None => self.named(pid, id),
        };
        let outcome = named.merge_into(sample);
        self.counts.unmatched += outcome.unmatched as u64;
        if let Some(tid) = sample.tid
            && let Some(name) = self.tracked.get(&pid).and_then(|t| t.names.get(&tid))
        {
            sample.python_thread = Some(name.clone());
        }
    }

    /// Names the Python stack `id` of process `pid` now, while the process
    /// lives, for a sample merged later (one whose native stack waits to
    /// be unwound from a copy: its process may exit meanwhile).
    pub fn name_early(&mut self, pid: u32, id: u64) {
        if !self.early.contains_key(&(pid, id)) {
            let named = self.named(pid, id);
            self.early.insert((pid, id), named);
        }
    }

    /// The Python stack `id` of process `pid`, named now (while the
    /// process lives).
    pub fn named(&mut self, pid: u32, id: u64) -> NamedStack {
        let Some((slots, status)) = self.stack(id) else {
            self.counts.stacks_lost += 1;
            return NamedStack {
                activations: Vec::new(),
                cut: true,
                eval_loop: EvalCode::default(),
                only_python: self.only_python,
            };
        };
        if let Some(t) = self.tracked.get_mut(&pid)
            && !t.cold_parts_added
        {
            discover::add_cold_parts(pid, &mut t.py);
            t.cold_parts_added = true;
        }
        let Some(t) = self.tracked.get(&pid) else {
            // Not named: its process was forgotten (exec) before the read.
            self.counts.stacks_lost += 1;
            return NamedStack {
                activations: Vec::new(),
                cut: true,
                eval_loop: EvalCode::default(),
                only_python: self.only_python,
            };
        };
        let eval_loop = t.py.eval_loop;
        NamedStack {
            activations: self.name_slots(pid, &slots),
            cut: merge::is_cut(status),
            eval_loop,
            only_python: self.only_python,
        }
    }

    /// A Python stack libprofalloc.so's live heap recorded in process
    /// `pid` (its walker's slots: code addresses and offsets, activation
    /// ends), named now; None when `pid` is not walked (not CPython, or
    /// `--python-frames native`).
    pub fn name_live(&mut self, pid: u32, slots: &[PyFrameSlot], cut: bool) -> Option<NamedStack> {
        let eval_loop = self.tracked.get(&pid)?.py.eval_loop;
        Some(NamedStack {
            activations: self.name_slots(pid, slots),
            cut,
            eval_loop,
            only_python: self.only_python,
        })
    }

    /// The frames of a walker's `slots` in tracked process `pid`, named,
    /// by activation (innermost first).
    fn name_slots(&mut self, pid: u32, slots: &[PyFrameSlot]) -> Vec<Vec<Frame>> {
        let Some(t) = self.tracked.get(&pid) else {
            return Vec::new();
        };
        let mut activations = Vec::new();
        for group in merge::activations(slots) {
            let mut frames = Vec::with_capacity(group.len());
            for raw in group {
                self.counts.frames += 1;
                frames.push(match self.symbolizer.frame(pid, &t.memory, &t.py, raw) {
                    // Writers show `qualname (file.py:LINE)`; pprof keeps
                    // the three apart (Function.name and .filename,
                    // Line.line).
                    Ok(f) => Frame {
                        function: f.qualname,
                        file: f.filename,
                        line: if self.lines {
                            f.line.map_or(0, i64::from)
                        } else {
                            0
                        },
                        inlined: false,
                    },
                    Err(Unnamed::Freed) => {
                        self.counts.freed += 1;
                        Frame::named(FREED_CODE)
                    }
                    Err(Unnamed::Unreadable(_)) => {
                        self.counts.unreadable += 1;
                        Frame::named(UNREADABLE_CODE)
                    }
                });
            }
            activations.push(frames);
        }
        activations
    }

    /// Heap: names the Python stacks of the pairs recorded since the last
    /// call, while their processes live (call every interval).
    pub fn name_new_pairs(&mut self) {
        let Some(map) = &self.pairs else {
            return;
        };
        let new: Vec<(u64, PyPair)> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, _)| !self.named_pairs.contains_key(id))
            .collect();
        for (id, pair) in new {
            let named = self.named(pair.pid, pair.python);
            self.named_pairs.insert(id, (pair, named));
        }
    }

    /// Whether a CPython process was found among the targets.
    pub fn walked_any(&self) -> bool {
        self.counts.processes > 0
    }

    /// [`Tracker::name_new_pairs`] while fewer than [`FEW_PAIRS`] are
    /// named: walking the pair map costs two system calls per pair.
    pub fn name_new_pairs_if_few(&mut self) {
        if self.named_pairs.len() < FEW_PAIRS {
            self.name_new_pairs();
        }
    }

    /// Heap: the pairs named so far, by combined id.
    pub fn pairs(&self) -> &PairStacks {
        &self.named_pairs
    }

    /// Whether the stacks read stay in the kernel's map (as [`Tracker::new`]
    /// chose): a long-running reader that names every stack as soon as
    /// it is read (the agent) keeps none.
    pub fn set_keep_stacks(&mut self, keep: bool) {
        self.keep_stacks = keep;
    }

    /// Heap: forgets the pairs of the processes `gone` says have exited,
    /// here and in the kernel's map, which would fill up otherwise.
    pub fn forget_pairs(&mut self, gone: impl Fn(u32) -> bool) {
        let ids: Vec<u64> = self
            .named_pairs
            .iter()
            .filter(|(_, (pair, _))| gone(pair.pid))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.named_pairs.remove(&id);
            if let Some(map) = &mut self.pairs {
                let _ = map.remove(&id);
            }
        }
    }

    fn stack(&mut self, id: u64) -> Option<(Vec<PyFrameSlot>, u32)> {
        if let Some(found) = self.read.get(id) {
            return Some(found);
        }
        let stack = self.stacks.get(&id, 0).ok()?;
        let entry = (stack.slots().to_vec(), stack.status);
        self.read.insert(id, entry.clone());
        self.counts.stacks_evicted = self.read.evicted;
        if !self.keep_stacks {
            self.read_from_map.push(id);
        }
        Some(entry)
    }
}

/// Reads the Python names of `threads` (per interpreter) into `t.names`.
fn name_threads(t: &mut Tracked, threads: &[threads::PyThread]) {
    let interps: HashSet<u64> = threads.iter().map(|thread| thread.interp).collect();
    for interp in interps {
        let Ok(names) = thread_names::thread_names(&t.memory, &t.py, interp) else {
            continue;
        };
        for thread in threads.iter().filter(|thread| thread.interp == interp) {
            if let Some(name) = names.get(&thread.pthread) {
                t.names.insert(thread.tid, name.clone());
            }
        }
    }
}

mod counts;
mod layout;
mod named_stack;
mod pending;
mod stack_cache;
pub use counts::TrackerCounts;
pub use layout::kernel_layout;
pub use named_stack::{NamedStack, PairStacks};
use pending::Pending;

#[cfg(test)]
mod tests;
