//! Reading and writing the heap programs' maps (see
//! `profiler_common::heap` for their layout). Everything here is a thin
//! copy between a map and plain values; what the values mean is decided in
//! [`super::report`].
//!
//! A hash map is read key by key (`BPF_MAP_GET_NEXT_KEY`) while the probes
//! go on adding and deleting entries (with `--all`, every process on the
//! host allocates and frees). When the key a walk stands on is deleted
//! before the next step, the kernel starts the walk over from its first
//! bucket, and the keys before come again: a walk may see a key twice, so
//! every reader here keeps each key once ([`once_each`]). The live map,
//! the busiest, is read in batches instead where the kernel can (see
//! `batch`).
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuHashMap},
};
use log::debug;
use profiler_common::{
    heap::{
        CONFIG_MAP, COUNTERS_MAP, HeapConfig, HeapCounter, LIVE_MAP, LiveAlloc, LiveKey,
        MMAP_TARGETS_MAP, SAMPLE_INTERVALS_MAP, SAMPLE_WEIGHTS_MAP, SOURCE_MMAP, STACK_ID_MISSING,
        STACK_STATS_MAP, StackKey, StackStats,
    },
    stack::{USER_STACKS_MAP, UserStack},
};

use super::sampling;

mod batch;
use crate::runtime::counters::Counts;

/// Writes the sampler settings and tables before any probe is attached.
pub(crate) fn configure(
    ebpf: &mut Ebpf,
    sample_bytes: u64,
    mmap_new_targets: bool,
) -> anyhow::Result<()> {
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

/// Marks the processes whose anonymous mappings are tracked (`--mmap`).
pub(crate) fn add_mmap_targets(ebpf: &mut Ebpf, pids: &[u32]) -> anyhow::Result<()> {
    let mut targets: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(
        ebpf.map_mut(MMAP_TARGETS_MAP)
            .context("mapping target map missing")?,
    )?;
    for &pid in pids {
        targets
            .insert(pid, 1, 0)
            .context("writing the mapping targets")?;
    }
    Ok(())
}

/// The per-(process, stack) totals since attach, summed over CPUs, each
/// stack once.
pub(crate) fn stack_stats(ebpf: &Ebpf) -> anyhow::Result<Vec<(StackKey, StackStats)>> {
    let map: PerCpuHashMap<&MapData, StackKey, StackStats> =
        PerCpuHashMap::try_from(ebpf.map(STACK_STATS_MAP).context("stack map missing")?)?;
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
    let (once, repeated) = once_each(out);
    if repeated > 0 {
        debug!("the walk of the stack totals started over: {repeated} stacks read again");
    }
    Ok(once.into_iter().collect())
}

/// The user stacks of `keys`, from the unwinder's map.
pub(crate) fn user_stacks<'a>(
    ebpf: &Ebpf,
    keys: impl IntoIterator<Item = &'a StackKey>,
) -> anyhow::Result<HashMap<u64, UserStack>> {
    let map: BpfHashMap<&MapData, u64, UserStack> = BpfHashMap::try_from(
        ebpf.map(USER_STACKS_MAP)
            .context("user stack map missing")?,
    )?;
    let mut out = HashMap::new();
    for key in keys {
        if key.stack_id != STACK_ID_MISSING
            && !out.contains_key(&key.stack_id)
            && let Ok(stack) = map.get(&key.stack_id, 0)
        {
            out.insert(key.stack_id, stack);
        }
    }
    Ok(out)
}

/// User stack `id`, from the unwinder's map (when no other reader holds it).
pub(crate) fn user_stack(ebpf: &Ebpf, id: u64) -> Option<UserStack> {
    let map: BpfHashMap<&MapData, u64, UserStack> =
        BpfHashMap::try_from(ebpf.map(USER_STACKS_MAP)?).ok()?;
    map.get(&id, 0).ok()
}

/// The live blocks for which `keep` holds, each once.
pub(crate) fn live_blocks(
    ebpf: &Ebpf,
    keep: impl Fn(&LiveKey, &LiveAlloc) -> bool,
) -> anyhow::Result<HashMap<LiveKey, LiveAlloc>> {
    let map = ebpf.map(LIVE_MAP).context("live map missing")?;
    let batch = match map {
        Map::HashMap(data) => batch::live_entries(data),
        _ => Err(std::io::Error::other("not a hash map")),
    };
    let (once, repeated) = match batch {
        Ok(entries) => once_each(entries.into_iter().filter(|(key, live)| keep(key, live))),
        Err(err) => {
            // A kernel without batch reads (before 5.6): walked key by key.
            debug!("reading the live blocks in batches: {err}; walking them by key");
            let walk: BpfHashMap<&MapData, LiveKey, LiveAlloc> = BpfHashMap::try_from(map)?;
            once_each(
                walk.iter()
                    .filter_map(Result::ok)
                    .filter(|(key, live)| keep(key, live)),
            )
        }
    };
    if repeated > 0 {
        debug!("the read of the live blocks met {repeated} blocks again");
    }
    Ok(once)
}

/// The tracked anonymous mappings (`--mmap`) still live.
pub(crate) fn live_mappings(ebpf: &Ebpf) -> anyhow::Result<HashMap<LiveKey, LiveAlloc>> {
    live_blocks(ebpf, |key, _| key.source == SOURCE_MMAP)
}

/// The entries of a map walk, each key once (the value read last), and how
/// many were read again (see the module's documentation).
pub(crate) fn once_each<K: Eq + Hash, V>(
    walk: impl IntoIterator<Item = (K, V)>,
) -> (HashMap<K, V>, usize) {
    let mut once = HashMap::new();
    let mut repeated = 0;
    for (key, value) in walk {
        if once.insert(key, value).is_some() {
            repeated += 1;
        }
    }
    (once, repeated)
}

/// Drops the live blocks of processes `dead` from the kernel's table;
/// returns how many there were.
pub(crate) fn drop_live_blocks(ebpf: &mut Ebpf, dead: &HashSet<u32>) -> anyhow::Result<usize> {
    let mut live: BpfHashMap<&mut MapData, LiveKey, LiveAlloc> =
        BpfHashMap::try_from(ebpf.map_mut(LIVE_MAP).context("live map missing")?)?;
    let keys: Vec<LiveKey> = live
        .keys()
        .filter_map(Result::ok)
        .filter(|k| dead.contains(&k.pid))
        .collect();
    for key in &keys {
        // Gone already: a free raced with this pass.
        let _ = live.remove(key);
    }
    Ok(keys.len())
}

/// Drops the per-stack totals of processes `dead`; returns how many there were.
pub(crate) fn drop_stack_stats(ebpf: &mut Ebpf, dead: &HashSet<u32>) -> anyhow::Result<usize> {
    let mut stats: PerCpuHashMap<&mut MapData, StackKey, StackStats> =
        PerCpuHashMap::try_from(ebpf.map_mut(STACK_STATS_MAP).context("stack map missing")?)?;
    let keys: Vec<StackKey> = stats
        .keys()
        .filter_map(Result::ok)
        .filter(|k| dead.contains(&k.pid))
        .collect();
    for key in &keys {
        let _ = stats.remove(key);
    }
    Ok(keys.len())
}

/// The event and loss counters, summed over CPUs.
pub(crate) fn counters(ebpf: &Ebpf) -> anyhow::Result<Counts<HeapCounter>> {
    Counts::read(ebpf, COUNTERS_MAP)
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's timestamps.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_that_started_over_yields_each_key_once() {
        // The walk stood on c when it was deleted: it started over from a,
        // and read b's new value on the second pass.
        let walk = [("a", 1), ("b", 2), ("c", 3), ("a", 1), ("b", 20), ("d", 4)];
        let (once, repeated) = once_each(walk);
        assert_eq!(repeated, 2);
        assert_eq!(
            once,
            HashMap::from([("a", 1), ("b", 20), ("c", 3), ("d", 4)])
        );
    }
}
