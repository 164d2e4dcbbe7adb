//! Python frames in the agent's profiles: one kernel-side frame walker
//! for both collectors (the `cpu` and `heap` subcommands' tracker), told
//! about every CPython process the agent meets, its Python stacks named
//! while the process lives.
//!
//! Each process is looked at once (its mappings read for an interpreter)
//! and again after an exec; the thread maps follow the interpreters'
//! thread lists every tick.
use std::collections::HashSet;

use super::scope::Scope;
use crate::python::tracker::Tracker;

/// See the module docs.
pub(crate) struct AgentPython {
    tracker: Tracker,
    /// Processes whose mappings were looked at for an interpreter.
    looked: HashSet<u32>,
}

impl AgentPython {
    /// Takes the walker's maps from `ebpf` (with `heap`, the combined
    /// native and Python stack ids of heap samples too) and looks at the
    /// processes running now (only the `--pid` ones when the scope is just
    /// those), so that their first samples have Python frames.
    pub fn new(ebpf: &mut aya::Ebpf, heap: bool, scope: &Scope) -> anyhow::Result<Self> {
        let mut tracker = Tracker::new(ebpf, heap)?;
        // Every stack read is named at once and cached by id: the kernel's
        // map need not keep it, whichever collector read it.
        tracker.set_keep_stacks(false);
        let mut python = Self {
            tracker,
            looked: HashSet::new(),
        };
        let pids = if scope.pids_only() {
            scope.pids().to_vec()
        } else {
            super::session::all_pids()
        };
        for pid in pids {
            python.look(pid);
        }
        Ok(python)
    }

    /// Has `pid` walked when it runs a supported CPython (once per
    /// program it runs).
    pub fn look(&mut self, pid: u32) {
        if pid != 0 && self.looked.insert(pid) {
            self.tracker.add_process(pid);
        }
    }

    /// `pid` runs a new program: looked at again at its next sample.
    pub fn exec(&mut self, pid: u32) {
        self.tracker.forget(pid);
        self.looked.remove(&pid);
    }

    /// `pid` exited: forgotten at the next tick, after its last samples.
    pub fn exited(&mut self, pid: u32) {
        self.tracker.exited(pid);
        self.looked.remove(&pid);
    }

    /// Every tick, after the CPU drain: the heap samples' Python stacks
    /// named while their processes live, the stacks read leave the
    /// kernel's map, the thread maps follow the thread lists.
    pub fn tick(&mut self) {
        self.tracker.name_new_pairs();
        self.tracker.refresh();
    }

    /// Merges CPU sample Python stack `id` into `sample` (its native stack
    /// already there).
    pub fn merge(&mut self, pid: u32, id: u64, sample: &mut crate::profile::RawSample) {
        self.tracker.merge(pid, id, sample);
    }

    /// Heap: the tracker, with the named pairs (combined id to native and
    /// Python stacks); it also names the live heaps' Python stacks.
    pub fn tracker(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// Heap: forgets the pairs of processes that exited (their last
    /// interval was cut), in the kernel's map too.
    pub fn forget_pairs(&mut self, gone: impl Fn(u32) -> bool) {
        self.tracker.forget_pairs(gone);
    }
}
