//! In-use values from libprofalloc.so's own sampled live heap
//! (`crate::live_heap`): every sampled object still live, allocated before
//! the attach too, with the stack the allocator captured in-process.
//!
//! When a target's live heap is read, its in-use values come from it alone
//! (it is the allocator's exact view of its samples; each object, keyed by
//! address, is counted once), and the probes give only the alloc_* values
//! since the attach.
use std::collections::{BTreeMap, HashMap, HashSet};

use profiler_common::heap::WEIGHT_ONE;

use super::{report::objects, settings::Tracking};
use crate::{
    live_heap::{self, LiveHeap},
    profile::{RawSample, StackStatus},
};

/// The live heaps of the running `pids` whose allocator exports one, when
/// the probes are its sampling hooks or USDT probes (the same samples).
pub(crate) fn read_targets(
    tracking: Tracking,
    pids: &[u32],
    exited: &HashSet<u32>,
) -> HashMap<u32, LiveHeap> {
    let mut live = HashMap::new();
    if !matches!(tracking, Tracking::Usdt | Tracking::Hooks { .. }) {
        return live;
    }
    for &pid in pids.iter().filter(|pid| !exited.contains(pid)) {
        match live_heap::read(pid) {
            Ok(heap) => {
                live.insert(pid, heap);
            }
            Err(err) => log::debug!("no live heap read from pid {pid}: {err:#}"),
        }
    }
    live
}

/// The in-use samples of one process's live heap: one per distinct stack,
/// values `[alloc_objects, alloc_space, inuse_objects, inuse_space]` with
/// the alloc_* left at 0 (they come from the probes).
pub(crate) fn inuse_samples(pid: u32, comm: &str, heap: &LiveHeap) -> Vec<RawSample> {
    // (stack, truncated) -> (weighted objects in WEIGHT_ONE units, bytes).
    let mut by_stack: BTreeMap<(&[u64], bool), (u64, u64)> = BTreeMap::new();
    let mut seen = HashSet::new();
    for s in &heap.samples {
        if !seen.insert(s.address) {
            continue;
        }
        let entry = by_stack
            .entry((s.stack.as_slice(), s.truncated))
            .or_default();
        entry.0 += s.weight.saturating_mul(WEIGHT_ONE) / s.size.max(1);
        entry.1 += s.weight;
    }
    by_stack
        .into_iter()
        .map(|((stack, truncated), (fixed, bytes))| RawSample {
            pid,
            tid: None,
            comm: comm.to_owned(),
            thread_comm: None,
            user: stack.to_vec(),
            user_status: if stack.is_empty() {
                StackStatus::Missing
            } else if truncated {
                StackStatus::Truncated
            } else {
                StackStatus::Complete
            },
            kernel: Vec::new(),
            values: vec![0, 0, objects(fixed), bytes as i64],
            numeric_labels: Vec::new(),
            leaf_is_pc: false,
            leaf_marker: None,
            splices: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::live_heap::LiveSample;

    fn sample(address: u64, size: u64, weight: u64, stack: &[u64]) -> LiveSample {
        LiveSample {
            address,
            size,
            weight,
            stack: stack.to_vec(),
            truncated: false,
            age: Duration::ZERO,
        }
    }

    #[test]
    fn samples_are_summed_per_stack_and_each_address_counts_once() {
        let heap = LiveHeap {
            samples: vec![
                sample(0x1000, 1000, 65_536, &[0x10, 0x20]),
                sample(0x2000, 1000, 65_536, &[0x10, 0x20]),
                // The same object seen twice.
                sample(0x2000, 1000, 65_536, &[0x10, 0x20]),
                sample(0x3000, 300_000, 300_100, &[0x30, 0x20]),
            ],
            sample_bytes: 65_536,
            inserted: 4,
            dropped: 0,
            torn: 0,
        };
        let got = inuse_samples(7, "w", &heap);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].user, vec![0x10, 0x20]);
        // 2 * 65536 bytes of 1000-byte objects: 131 objects.
        assert_eq!(got[0].values, vec![0, 0, 131, 131_072]);
        assert_eq!(got[1].values, vec![0, 0, 1, 300_100]);
        assert!(got.iter().all(|s| s.pid == 7 && s.comm == "w"));
        assert_eq!(got[0].user_status, StackStatus::Complete);
    }
}
