//! `--mmap`: which bytes of each tracked mapping it still holds, from the
//! tracked mappings themselves and the processes' maps.
//!
//! The kernel side finds a tracked mapping only by its start address, so
//! two kinds of change leave it whole in the live map:
//! - an unmap that starts inside it (or covers more than it follows): the
//!   range is no longer in the process's maps;
//! - a mapping placed over part of it (`MAP_FIXED`, mremap to a fixed
//!   address) that is tracked itself: both hold the range. The kernel gives
//!   the range to the newer mapping, and so does this: each byte counts
//!   once, under the newest tracked mapping over it.
//!
//! The in-use values of mapping stacks are what their mappings hold here,
//! not the per-stack totals less what is gone: the totals, the live map and
//! the maps are read at different moments while the targets run, and a
//! difference between them can take out bytes the totals never counted (a
//! mapping tracked after they were read) or a free they already hold (a
//! mapping the kernel retired after the live map was read), down to
//! negative values. What one read of the live map holds, clipped to the
//! maps read next, is never negative and counts each byte once.
use std::collections::{BTreeMap, HashMap};

use profiler_common::heap::{LiveAlloc, LiveKey, SOURCE_MMAP, StackKey};

use crate::process::Mapping;

/// What the tracked mappings hold per stack, and what they no longer hold.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Unmapped {
    /// Tracked mappings partly or wholly no longer mapped.
    pub mappings: u64,
    /// Their bytes no longer mapped.
    pub bytes: u64,
    /// Tracked mappings partly or wholly mapped over by newer tracked ones.
    pub replaced_mappings: u64,
    /// Their bytes that the newer mappings hold (and count).
    pub replaced_bytes: u64,
    /// Per stack, what its tracked mappings still hold: its in-use values.
    pub held: HashMap<StackKey, Held>,
}

/// What the tracked mappings of one stack hold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Held {
    /// Mappings holding at least one byte ([`WEIGHT_ONE`] units).
    ///
    /// [`WEIGHT_ONE`]: profiler_common::heap::WEIGHT_ONE
    pub objects: u64,
    pub bytes: u64,
}

/// A half-open address range.
type Range = (u64, u64);

/// What each tracked mapping of one read of the live map (each key once)
/// still holds. `current` holds the maps of the processes still running;
/// for a process without an entry (it exited) only the overlaps between its
/// tracked mappings are known. A mapping holds an object while it holds a
/// byte.
///
/// A range unmapped and then mapped again by a mapping that is not tracked
/// (a file, or one the allocator made) still counts as the old mapping's.
pub(crate) fn unmapped(
    mappings: &HashMap<LiveKey, LiveAlloc>,
    current: &HashMap<u32, Vec<Mapping>>,
) -> Unmapped {
    let mut out = Unmapped::default();
    // Per process, newest first: the union of the mappings already seen is
    // what newer ones hold. Newer is later, or as late and higher (any
    // order will do, as long as there is one).
    let mut tracked: Vec<(&LiveKey, &LiveAlloc)> = mappings
        .iter()
        .filter(|(key, _)| key.source == SOURCE_MMAP)
        .collect();
    tracked.sort_unstable_by_key(|(k, l)| std::cmp::Reverse((k.pid, l.timestamp_ns, k.addr)));
    let anonymous: HashMap<u32, Vec<Range>> = current
        .iter()
        .map(|(&pid, maps)| {
            let ranges = maps
                .iter()
                .filter(|m| m.inode == 0)
                .map(|m| (m.start, m.end));
            (pid, merged(ranges))
        })
        .collect();
    let mut held_by_newer: HashMap<u32, Union> = HashMap::new();
    for (key, live) in tracked {
        let whole = (key.addr, key.addr.saturating_add(live.size));
        let mapped = match anonymous.get(&key.pid) {
            Some(ranges) => clipped(ranges, whole),
            None => vec![whole],
        };
        let union = held_by_newer.entry(key.pid).or_default();
        let newer = union.within(whole);
        union.add(whole);
        let still_mapped = length(&mapped);
        let replaced = length(&intersection(&mapped, &newer));
        if still_mapped < live.size {
            out.mappings += 1;
            out.bytes += live.size - still_mapped;
        }
        if replaced > 0 {
            out.replaced_mappings += 1;
            out.replaced_bytes += replaced;
        }
        let held = out
            .held
            .entry(StackKey {
                stack_id: live.stack_id,
                pid: key.pid,
                source: SOURCE_MMAP,
            })
            .or_default();
        let bytes = still_mapped - replaced;
        if bytes > 0 {
            held.objects += live.weight_objects;
            held.bytes += bytes;
        }
    }
    out
}

/// `ranges` sorted, with overlapping and adjacent ones joined.
fn merged(ranges: impl Iterator<Item = Range>) -> Vec<Range> {
    let mut all: Vec<Range> = ranges.filter(|(s, e)| s < e).collect();
    all.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The parts of merged `ranges` inside `within`.
fn clipped(ranges: &[Range], within: Range) -> Vec<Range> {
    let first = ranges.partition_point(|&(_, e)| e <= within.0);
    ranges[first..]
        .iter()
        .take_while(|&&(s, _)| s < within.1)
        .map(|&(s, e)| (s.max(within.0), e.min(within.1)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// A union of address ranges, built one range at a time: disjoint ranges,
/// start to end.
#[derive(Default)]
struct Union(BTreeMap<u64, u64>);

impl Union {
    /// The parts of the union inside `within`, in order.
    fn within(&self, within: Range) -> Vec<Range> {
        // The one range that may start before `within` and reach into it.
        let from = match self.0.range(..=within.0).next_back() {
            Some((&s, _)) => s,
            None => within.0,
        };
        self.0
            .range(from..within.1)
            .map(|(&s, &e)| (s.max(within.0), e.min(within.1)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    fn add(&mut self, (mut start, mut end): Range) {
        // Joins the ranges that overlap or touch it.
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
        }
        let joined: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in joined {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }
}

/// The intersection of two merged range lists.
fn intersection(a: &[Range], b: &[Range]) -> Vec<Range> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn length(ranges: &[Range]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

#[cfg(test)]
mod tests;
