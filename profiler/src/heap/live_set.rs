//! In-use values from libprofalloc.so's own sampled live heap
//! (`crate::live_heap`): every sampled object still live, allocated before
//! the attach too, with the stack the allocator captured in-process.
//!
//! When a target's live heap is read, its in-use values come from it alone
//! (it is the allocator's exact view of its samples; each object, keyed by
//! address, is counted once), and the probes give only the alloc_* values
//! since the attach.
//!
//! In a CPython process the allocator also recorded each sample's Python
//! stack (code objects and offsets): the Python tracker names those while
//! the process lives ([`name_python`]) and they are spliced into the
//! native stacks as for the kernel walker's stacks.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use profiler_common::{heap::WEIGHT_ONE, python::PyFrameSlot};

use super::{leaks::History, report::objects, settings::Tracking};
use crate::{
    live_heap::{self, HeaderFinder, LiveHeap},
    profile::{RawSample, StackStatus},
    python::tracker::{NamedStack, Tracker},
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

/// With `--all`: the live heaps of every process that exports one (this
/// one excepted), the processes whose allocator is libprofalloc.so.
pub(crate) fn read_all(finder: &mut HeaderFinder) -> HashMap<u32, LiveHeap> {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter_map(|pid| Some((pid, finder.read(pid).ok()?)))
        .collect()
}

/// With --all, the coverage of the processes whose in-use values come
/// from their allocator's live heap.
pub(crate) fn all_coverage(pids: &[u32]) -> String {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    format!(
        "coverage: pid {}: sampled heap since process start (from the allocator) for in-use values",
        pids.join(", ")
    )
}

/// A stack of a live heap: its native return addresses and whether they
/// were cut, its Python frames and whether they were cut.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LiveStack<N, P> {
    pub native: N,
    pub truncated: bool,
    pub python: P,
    pub python_cut: bool,
}

type Borrowed<'a> = LiveStack<&'a [u64], &'a [PyFrameSlot]>;
type Owned = LiveStack<Vec<u64>, Vec<PyFrameSlot>>;

impl Borrowed<'_> {
    fn owned(&self) -> Owned {
        LiveStack {
            native: self.native.to_vec(),
            truncated: self.truncated,
            python: self.python.to_vec(),
            python_cut: self.python_cut,
        }
    }
}

/// A stack of a live heap in its process.
pub(crate) type LiveStackKey = (u32, Owned);

/// The Python stacks of the live heaps, named: by (pid, frames, cut).
pub(crate) type LiveNames = HashMap<(u32, Vec<PyFrameSlot>, bool), NamedStack>;

/// Names the Python stacks of `live` through `tracker` (their code
/// objects are read now, while the processes live).
pub(crate) fn name_python(tracker: &mut Tracker, live: &HashMap<u32, LiveHeap>) -> LiveNames {
    let mut names = LiveNames::new();
    for (&pid, heap) in live {
        for s in heap.samples.iter().filter(|s| !s.python.is_empty()) {
            let key = (pid, s.python.clone(), s.python_cut);
            if names.contains_key(&key) {
                continue;
            }
            if let Some(named) = tracker.name_live(pid, &s.python, s.python_cut) {
                names.insert(key, named);
            }
        }
    }
    names
}

/// What the samples of one stack add up to.
#[derive(Clone, Copy, Debug, Default)]
struct StackSum {
    /// Estimated objects, in WEIGHT_ONE units.
    fixed: u64,
    bytes: u64,
    /// The same for the samples at least the minimum age old.
    old_fixed: u64,
    old_bytes: u64,
    oldest: Duration,
}

/// The samples of `heap` summed per stack (each address once); `min_age`
/// sets what counts as old.
fn by_stack(heap: &LiveHeap, min_age: Option<Duration>) -> BTreeMap<Borrowed<'_>, StackSum> {
    let mut out: BTreeMap<Borrowed<'_>, StackSum> = BTreeMap::new();
    let mut seen = HashSet::new();
    for s in &heap.samples {
        if !seen.insert(s.address) {
            continue;
        }
        let stack = LiveStack {
            native: s.stack.as_slice(),
            truncated: s.truncated,
            python: s.python.as_slice(),
            python_cut: s.python_cut,
        };
        let sum = out.entry(stack).or_default();
        let fixed = s.weight.saturating_mul(WEIGHT_ONE) / s.size.max(1);
        sum.fixed += fixed;
        sum.bytes += s.weight;
        sum.oldest = sum.oldest.max(s.age);
        if min_age.is_some_and(|age| s.age >= age) {
            sum.old_fixed += fixed;
            sum.old_bytes += s.weight;
        }
    }
    out
}

/// The live bytes of every stack of the live heaps: a leak snapshot.
pub(crate) fn stack_bytes(live: &HashMap<u32, LiveHeap>) -> Vec<(LiveStackKey, i64)> {
    live.iter()
        .flat_map(|(&pid, heap)| {
            by_stack(heap, None)
                .into_iter()
                .map(move |(stack, sum)| ((pid, stack.owned()), sum.bytes as i64))
        })
        .collect()
}

/// A sample of one live-heap stack, its Python frames spliced in when
/// `names` has them.
fn raw_sample(
    pid: u32,
    comm: &str,
    live: &Borrowed<'_>,
    names: &LiveNames,
    values: Vec<i64>,
    numeric_labels: Vec<(String, i64, String)>,
) -> RawSample {
    let (stack, truncated) = (live.native, live.truncated);
    let mut sample = RawSample {
        pid,
        tid: None,
        comm: comm.to_owned(),
        thread_comm: None,
        python_thread: None,
        user: stack.to_vec(),
        user_status: if stack.is_empty() {
            StackStatus::Missing
        } else if truncated {
            StackStatus::Truncated
        } else {
            StackStatus::Complete
        },
        kernel: Vec::new(),
        values,
        numeric_labels,
        leaf_is_pc: false,
        leaf_marker: None,
        splices: Vec::new(),
    };
    if !live.python.is_empty()
        && let Some(named) = names.get(&(pid, live.python.to_vec(), live.python_cut))
    {
        named.merge_into(&mut sample);
    }
    sample
}

/// The in-use samples of one process's live heap: one per distinct stack,
/// values `[alloc_objects, alloc_space, inuse_objects, inuse_space]` with
/// the alloc_* left at 0 (they come from the probes).
pub(crate) fn inuse_samples(
    pid: u32,
    comm: &str,
    heap: &LiveHeap,
    names: &LiveNames,
) -> Vec<RawSample> {
    by_stack(heap, None)
        .into_iter()
        .map(|(stack, sum)| {
            let values = vec![0, 0, objects(sum.fixed), sum.bytes as i64];
            raw_sample(pid, comm, &stack, names, values, Vec::new())
        })
        .collect()
}

/// What leak mode lists of one live heap.
pub(crate) struct LeakSamples {
    pub samples: Vec<RawSample>,
    /// Stacks the growth rule calls leaking.
    pub leaking: usize,
    /// Stacks listed for holding allocations at least the minimum age old.
    pub old: usize,
}

/// Leak mode on one process's live heap, values `[inuse_objects,
/// inuse_space]`: the stacks whose live bytes grow by the rule (all that
/// hold memory with `list_all`), and with `min_age` those holding samples
/// at least that old (their old part), each with its growth and the age
/// of its oldest sample (known since the process started).
pub(crate) fn leak_samples(
    pid: u32,
    comm: &str,
    heap: &LiveHeap,
    names: &LiveNames,
    history: &History<LiveStackKey>,
    min_age: Option<Duration>,
    list_all: bool,
) -> LeakSamples {
    let mut out = LeakSamples {
        samples: Vec::new(),
        leaking: 0,
        old: 0,
    };
    for (stack, sum) in by_stack(heap, min_age) {
        let growth = history.classify(&(pid, stack.owned()));
        let grows = growth.is_some_and(|g| g.leaking);
        let mut labels = Vec::new();
        if let Some(g) = growth {
            let rate = g.bytes_per_sec.round() as i64;
            labels.push(("growth".to_owned(), rate, "bytes/s".to_owned()));
        }
        let age = sum.oldest.as_secs() as i64;
        labels.push(("age".to_owned(), age, "seconds".to_owned()));
        let values = if (grows || list_all) && sum.bytes > 0 {
            out.leaking += usize::from(grows);
            vec![objects(sum.fixed), sum.bytes as i64]
        } else if sum.old_bytes > 0 {
            out.old += 1;
            vec![objects(sum.old_fixed), sum.old_bytes as i64]
        } else {
            continue;
        };
        out.samples
            .push(raw_sample(pid, comm, &stack, names, values, labels));
    }
    out
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
            python: Vec::new(),
            python_cut: false,
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
        let got = inuse_samples(7, "w", &heap, &LiveNames::new());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].user, vec![0x10, 0x20]);
        // 2 * 65536 bytes of 1000-byte objects: 131 objects.
        assert_eq!(got[0].values, vec![0, 0, 131, 131_072]);
        assert_eq!(got[1].values, vec![0, 0, 1, 300_100]);
        assert!(got.iter().all(|s| s.pid == 7 && s.comm == "w"));
        assert_eq!(got[0].user_status, StackStatus::Complete);
    }

    #[test]
    fn leaks_are_growing_stacks_and_old_ones_are_listed_by_age() {
        let old = |address, stack: &[u64]| LiveSample {
            age: Duration::from_secs(100),
            ..sample(address, 1000, 4000, stack)
        };
        let heap = LiveHeap {
            samples: vec![
                // A leak: 1 then 2 then 3 samples.
                sample(0x1, 1000, 4000, &[0x10]),
                sample(0x2, 1000, 4000, &[0x10]),
                old(0x3, &[0x10]),
                // A cache, old and steady.
                old(0x4, &[0x20]),
                // Young and steady: not listed.
                sample(0x5, 1000, 4000, &[0x30]),
            ],
            ..LiveHeap::default()
        };
        let key = |s: u64| {
            let stack = LiveStack {
                native: vec![s],
                truncated: false,
                python: Vec::new(),
                python_cut: false,
            };
            (7, stack)
        };
        let mut history =
            History::starting_with([(key(0x10), 4000), (key(0x20), 4000), (key(0x30), 4000)]);
        history.push(
            1.0,
            [(key(0x10), 8000), (key(0x20), 4000), (key(0x30), 4000)],
        );
        history.push(
            2.0,
            [(key(0x10), 12000), (key(0x20), 4000), (key(0x30), 4000)],
        );
        let got = leak_samples(
            7,
            "w",
            &heap,
            &LiveNames::new(),
            &history,
            Some(Duration::from_secs(60)),
            false,
        );
        assert_eq!((got.leaking, got.old), (1, 1));
        let listed: Vec<(Vec<u64>, Vec<i64>)> = got
            .samples
            .iter()
            .map(|s| (s.user.clone(), s.values.clone()))
            .collect();
        // The leak with all it holds, the cache with its old part.
        assert_eq!(
            listed,
            vec![(vec![0x10], vec![12, 12000]), (vec![0x20], vec![4, 4000])]
        );
        let age = |s: &RawSample| s.numeric_labels.iter().find(|l| l.0 == "age").unwrap().1;
        assert_eq!(age(&got.samples[1]), 100);
        // Too short to decide: everything that holds memory.
        let all = leak_samples(
            7,
            "w",
            &heap,
            &LiveNames::new(),
            &History::new(),
            None,
            true,
        );
        assert_eq!(all.samples.len(), 3);
    }
}
