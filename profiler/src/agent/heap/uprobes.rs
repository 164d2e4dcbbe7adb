//! Malloc uprobes for the processes named by `--pid`/`--include` that do
//! not sample in-process, and the call-rate ceiling above which they are
//! detached.
use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    time::Instant,
};

use aya::{
    Ebpf,
    programs::{uprobe::UProbeLinkId, uprobe::UProbeScope},
};
use log::warn;
use profiler_common::heap::WEIGHT_ONE;

use super::HeapCollector;
use crate::{
    agent::scope::Facts,
    heap::{attach, discover, maps},
};

/// A process with malloc uprobes of its own.
pub(super) struct Uprobed {
    pub(super) links: Vec<(&'static str, UProbeLinkId)>,
    /// Estimated calls (allocations and frees) at the last rate check.
    calls: f64,
    checked: Instant,
}

impl HeapCollector {
    /// Malloc uprobes for one named process, with the cost said once.
    pub(super) fn uprobe(&mut self, ebpf: &mut Ebpf, pid: u32, facts: &Facts) {
        let Some(nz) = NonZeroU32::new(pid) else {
            return;
        };
        let allocator = match discover::for_process(pid, None) {
            Ok(a) => a,
            Err(err) => {
                warn!("heap: pid {pid}: {err:#}");
                return;
            }
        };
        let what = format!("pid {pid}");
        match attach::malloc_family(ebpf, &allocator, UProbeScope::OneProcess(nz), &what) {
            Ok(links) => {
                eprintln!(
                    "prof-bpf: heap: malloc uprobes on pid {pid} ({}): each malloc and free call now costs it about 1.5 us; detached above {} calls/s",
                    facts.executable, self.max_rate
                );
                self.uprobed.insert(
                    pid,
                    Uprobed {
                        links,
                        calls: 0.0,
                        checked: Instant::now(),
                    },
                );
                self.refresh(pid);
            }
            Err(err) => warn!("heap: {err:#}"),
        }
    }

    /// Detaches the malloc uprobes of processes calling malloc and free more
    /// often than the ceiling (estimated from the sampled totals), drops
    /// their live blocks, and says so.
    pub fn enforce_ceiling(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        if self.uprobed.is_empty() {
            return Ok(());
        }
        let mut calls: HashMap<u32, f64> = HashMap::new();
        for (key, s) in maps::stack_stats(ebpf)? {
            if self.uprobed.contains_key(&key.pid) {
                *calls.entry(key.pid).or_default() +=
                    (s.alloc_objects + s.free_objects) as f64 / WEIGHT_ONE as f64;
            }
        }
        let now = Instant::now();
        let mut over = Vec::new();
        for (&pid, u) in &mut self.uprobed {
            let total = calls.get(&pid).copied().unwrap_or(0.0);
            let secs = now.duration_since(u.checked).as_secs_f64();
            if secs < 0.5 {
                continue;
            }
            let rate = (total - u.calls) / secs;
            u.calls = total;
            u.checked = now;
            if rate > self.max_rate as f64 {
                over.push((pid, rate));
            }
        }
        for (pid, rate) in over {
            if let Some(u) = self.uprobed.remove(&pid) {
                attach::detach(ebpf, u.links);
            }
            let dropped = maps::drop_live_blocks(ebpf, &HashSet::from([pid]))?;
            self.over_ceiling.insert(pid);
            self.processes.purged.insert(pid);
            self.detached += 1;
            eprintln!(
                "prof-bpf: heap: detached the malloc uprobes of pid {pid}: about {rate:.0} calls/s is above the ceiling of {} ({dropped} live blocks dropped; detached so far: {})",
                self.max_rate, self.detached
            );
        }
        Ok(())
    }
}
