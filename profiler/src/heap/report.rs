//! The heap reports, built from what was read (per-stack totals, stacks,
//! counters, live blocks) and the session's view of its processes. Nothing
//! here touches the kernel or `/proc`: the session reads, this decides.
//!
//! - [`heap_report`]: alloc_objects, alloc_space, inuse_objects,
//!   inuse_space per stack.
//! - [`leak_report`]: the leaking stacks (and old allocations) with their
//!   outstanding objects and bytes.
//! - [`unmapped`]: `--mmap` coverage, what the targets no longer map.
use std::collections::HashMap;

mod unmapped;
pub(crate) use unmapped::{Unmapped, unmapped};

use profiler_common::{
    counters::CounterSet as _,
    heap::{HeapCounter, LiveAlloc, LiveKey, SOURCE_MMAP, StackKey, StackStats, WEIGHT_ONE},
    stack::UserStack,
};

use super::{
    coverage::{self, Coverage, ProcessMemory},
    leaks,
    processes::Processes,
    settings::Tracking,
};
use crate::{
    process::{self, Mapping},
    profile::{self, Collector, Profile, RawSample, SampleType, StackStatus},
    runtime::counters::Counts,
};

/// What a report is built from, read from the maps.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    /// Per-(process, stack) totals since attach.
    pub stats: Vec<(StackKey, StackStats)>,
    /// The user stacks of `stats` (and of `old`) by id.
    pub stacks: HashMap<u64, UserStack>,
    /// Event and loss counters.
    pub counters: Counts<HeapCounter>,
    /// `--mmap`: tracked mappings the targets no longer wholly map.
    pub unmapped: Unmapped,
    /// `--min-age`: per stack, the live allocations at least that old.
    pub old: HashMap<StackKey, OldAllocs>,
    /// The targets' memory now, beside what the profile covers.
    pub memory: Vec<ProcessMemory>,
    /// The allocator's own live heap, per target that exports one: their
    /// in-use values come from it (see `live_set`).
    pub live: HashMap<u32, crate::live_heap::LiveHeap>,
    /// Their Python stacks, named.
    pub live_python: super::live_set::LiveNames,
}

/// How the session ran, for the report.
#[derive(Debug)]
pub(crate) struct Context<'a> {
    pub tracking: Tracking,
    /// From when allocations were seen.
    pub coverage: Coverage,
    /// `--mmap`.
    pub mmap: bool,
    pub processes: &'a Processes,
    /// Inodes of the probed allocators: with the hooks, a stack's first
    /// frames are inside them.
    pub allocator_inodes: Vec<u64>,
    /// Stacks with Python frames, by combined id.
    pub python: Option<&'a crate::python::tracker::PairStacks>,
}

/// What a leak report needs beyond the totals.
#[derive(Debug)]
pub(crate) struct LeakInput<'a> {
    pub history: &'a leaks::History<StackKey>,
    /// The snapshots of the live heaps in `Totals::live`, whose stacks
    /// replace the probes' for their processes.
    pub live_history: &'a leaks::History<super::live_set::LiveStackKey>,
    /// `--min-age`.
    pub min_age: Option<std::time::Duration>,
    /// A launched program exited: everything it never freed is listed.
    pub launched_exit: bool,
}

/// A report before symbolization: its comments and samples.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub comments: Vec<String>,
    /// What the profile covers and the targets' memory now (also among
    /// `comments`), for stderr.
    pub coverage: Vec<String>,
    /// The mean bytes between samples, when sampled (pprof's period).
    pub period: Option<i64>,
    pub samples: Vec<RawSample>,
    /// One line for stderr (leak reports).
    pub summary: Option<String>,
}

impl Report {
    /// The profile: `collector` (which knows the targets' mappings) takes
    /// the samples and symbolizes them.
    pub fn into_profile(self, mut collector: Collector) -> anyhow::Result<Profile> {
        for comment in self.comments {
            collector.add_comment(comment);
        }
        if let Some(period) = self.period {
            collector.set_period(SampleType::alloc_space(), period);
        }
        for sample in self.samples {
            collector.add(sample);
        }
        collector.finish()
    }
}

/// The sample types of a report, the default shown being inuse_space.
pub(crate) fn sample_types(leaks: bool) -> Vec<SampleType> {
    if leaks {
        vec![SampleType::inuse_objects(), SampleType::inuse_space()]
    } else {
        vec![
            SampleType::alloc_objects(),
            SampleType::alloc_space(),
            SampleType::inuse_objects(),
            SampleType::inuse_space(),
        ]
    }
}

/// Live allocations at least the minimum age, of one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct OldAllocs {
    /// Weighted objects ([`WEIGHT_ONE`] units).
    pub objects: u64,
    pub bytes: u64,
    /// Age of the oldest, in seconds.
    pub oldest_secs: f64,
}

/// The live blocks at least `min_ns` old at `now_ns`, per stack.
pub(crate) fn old_allocations(
    blocks: &HashMap<LiveKey, LiveAlloc>,
    now_ns: u64,
    min_ns: u64,
) -> HashMap<StackKey, OldAllocs> {
    let mut out: HashMap<StackKey, OldAllocs> = HashMap::new();
    for (key, live) in blocks {
        let age = now_ns.saturating_sub(live.timestamp_ns);
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
    out
}

/// The stacks of a report: those of the totals, and the mapping stacks
/// whose mappings were read in the live map but not yet in the totals (a
/// mapping tracked between the two reads: it holds bytes, allocated after
/// the totals were read).
fn stacks_of(totals: &Totals) -> Vec<(StackKey, StackStats)> {
    let mut stats = totals.stats.clone();
    let known: std::collections::HashSet<StackKey> = stats.iter().map(|(k, _)| *k).collect();
    stats.extend(
        totals
            .unmapped
            .held
            .keys()
            .filter(|k| !known.contains(k))
            .map(|k| (*k, StackStats::default())),
    );
    stats
}

/// Weighted object count ([`WEIGHT_ONE`] fixed point) to objects.
pub(crate) fn objects(fixed: u64) -> i64 {
    ((fixed + WEIGHT_ONE / 2) / WEIGHT_ONE) as i64
}

/// Outstanding (objects, bytes) of one stack: for allocator blocks, its
/// totals' allocations less frees; for mappings, what they hold (see
/// [`unmapped`]).
fn outstanding(key: &StackKey, s: &StackStats, totals: &Totals) -> (i64, i64) {
    if key.source == SOURCE_MMAP {
        let held = totals.unmapped.held.get(key).copied().unwrap_or_default();
        return (objects(held.objects), held.bytes as i64);
    }
    (
        objects(s.alloc_objects) - objects(s.free_objects),
        s.alloc_bytes as i64 - s.free_bytes as i64,
    )
}

pub(crate) fn human_bytes(bytes: i64) -> String {
    let b = bytes as f64;
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// The comments every report carries: the mode, the counters, and what
/// each loss means.
fn comments(totals: &Totals, ctx: &Context<'_>) -> Vec<String> {
    let counters = &totals.counters;
    let mut out = vec![ctx.tracking.comment(), counters.comment("heap counters")];
    for (counter, meaning) in [
        (
            HeapCounter::LiveFull,
            "allocations lost: the live-allocation map was full; raise --max-live",
        ),
        (
            HeapCounter::StacksFull,
            "allocations lost: the stack map was full; raise --max-stacks",
        ),
        (
            HeapCounter::ThreadsFull,
            "allocations lost: the thread map was full",
        ),
        (HeapCounter::StackErrors, "allocations without a user stack"),
        (
            HeapCounter::UsdtArgErrors,
            "USDT probe events lost: an argument could not be read",
        ),
    ] {
        let n = counters.get(counter);
        if n > 0 {
            out.push(format!("{}: {n} ({meaning})", counter.name()));
        }
    }
    if ctx.mmap {
        out.push(format!(
            "anonymous mappings: stacks end in {}; mmaps_in_allocator were made by the allocator and count as its allocations",
            profile::MMAP,
        ));
        let unmapped = &totals.unmapped;
        if unmapped.mappings > 0 {
            out.push(format!(
                "tracked mappings partly or wholly unmapped by calls that did not start at them: {} ({} no longer mapped, taken out of the in-use values by comparing with the process's maps)",
                unmapped.mappings,
                human_bytes(unmapped.bytes as i64)
            ));
        }
        if unmapped.replaced_mappings > 0 {
            out.push(format!(
                "tracked mappings partly or wholly mapped over by later tracked mappings (MAP_FIXED): {} ({} counted once, under the later mapping)",
                unmapped.replaced_mappings,
                human_bytes(unmapped.replaced_bytes as i64)
            ));
        }
    }
    if !ctx.processes.purged.is_empty() {
        out.push(format!(
            "processes that exited while recording: {} (they hold nothing; their allocations count in alloc_*)",
            ctx.processes.purged.len()
        ));
    }
    out
}

fn new_report(totals: &Totals, ctx: &Context<'_>) -> Report {
    let sample_bytes = ctx.tracking.sample_bytes();
    let coverage: Vec<String> = std::iter::once(ctx.coverage.comment())
        .chain(totals.memory.iter().map(coverage::memory_comment))
        .collect();
    let mut comments = comments(totals, ctx);
    comments.splice(1..1, coverage.iter().cloned());
    Report {
        comments,
        coverage,
        period: (sample_bytes != 0).then_some(sample_bytes as i64),
        ..Report::default()
    }
}

/// alloc_objects, alloc_space, inuse_objects, inuse_space per stack.
pub(crate) fn heap_report(totals: &Totals, ctx: &Context<'_>) -> Report {
    heap_report_since(totals, ctx, &HashMap::new())
}

/// [`heap_report`] whose alloc_* values count only what was allocated
/// since `baseline` (the totals of an earlier read: one interval's
/// allocations); the inuse_* values are what is outstanding now.
pub(crate) fn heap_report_since(
    totals: &Totals,
    ctx: &Context<'_>,
    baseline: &HashMap<StackKey, StackStats>,
) -> Report {
    let mut report = new_report(totals, ctx);
    for (key, s) in stacks_of(totals) {
        let from_probes = !totals.live.contains_key(&key.pid);
        let (inuse_objects, inuse_bytes) = if from_probes && ctx.processes.holds(key.pid) {
            outstanding(&key, &s, totals)
        } else {
            (0, 0)
        };
        let before = baseline.get(&key).copied().unwrap_or_default();
        let values = vec![
            objects(s.alloc_objects) - objects(before.alloc_objects),
            s.alloc_bytes as i64 - before.alloc_bytes as i64,
            inuse_objects,
            inuse_bytes,
        ];
        if values.iter().all(|&v| v == 0) && !baseline.is_empty() {
            // Nothing allocated this interval and nothing outstanding.
            continue;
        }
        report
            .samples
            .push(sample(&key, &totals.stacks, values, Vec::new(), ctx));
    }
    for (&pid, heap) in &totals.live {
        let comm = ctx.processes.comm(pid);
        report.samples.extend(super::live_set::inuse_samples(
            pid,
            &comm,
            heap,
            &totals.live_python,
        ));
    }
    report
}

/// Leaking stacks (and, with --min-age, stacks holding old allocations)
/// with their outstanding objects and bytes. Before growth can be measured
/// (too few snapshots), or once a launched program exited, every stack
/// still holding memory is listed.
pub(crate) fn leak_report(totals: &Totals, ctx: &Context<'_>, input: &LeakInput<'_>) -> Report {
    let mut report = new_report(totals, ctx);
    let decided = input.history.len() >= leaks::MIN_SNAPSHOTS;
    report.comments.push(format!("leak rule: {}", leaks::RULE));
    let list_all = input.launched_exit || !decided;
    if input.launched_exit {
        report
            .comments
            .push("the program exited: everything it never freed is listed".to_owned());
    } else if !decided {
        report.comments.push(
            "run too short to measure growth: every outstanding allocation is listed".to_owned(),
        );
    }
    let (mut leaking, mut listed) = (0, 0);
    for (key, s) in stacks_of(totals) {
        if !ctx.processes.holds(key.pid) || totals.live.contains_key(&key.pid) {
            continue;
        }
        let (objects_out, bytes_out) = outstanding(&key, &s, totals);
        let growth = input.history.classify(&key);
        let grows = growth.is_some_and(|g| g.leaking);
        let mut labels = Vec::new();
        if let Some(g) = growth {
            labels.push((
                "growth".to_owned(),
                g.bytes_per_sec.round() as i64,
                "bytes/s".to_owned(),
            ));
        }
        let old = totals.old.get(&key);
        if let Some(o) = old {
            labels.push(("age".to_owned(), o.oldest_secs as i64, "seconds".to_owned()));
        }
        let values = if grows || list_all {
            if bytes_out <= 0 {
                continue;
            }
            leaking += usize::from(grows);
            vec![objects_out, bytes_out]
        } else if let Some(o) = old {
            vec![objects(o.objects), o.bytes as i64]
        } else {
            continue;
        };
        listed += 1;
        report
            .samples
            .push(sample(&key, &totals.stacks, values, labels, ctx));
    }
    let mut old_stacks = totals.old.len();
    for (&pid, heap) in &totals.live {
        let comm = ctx.processes.comm(pid);
        let found = super::live_set::leak_samples(
            pid,
            &comm,
            heap,
            &totals.live_python,
            input.live_history,
            input.min_age,
            list_all,
        );
        leaking += found.leaking;
        listed += found.samples.len();
        old_stacks += found.old;
        report.samples.extend(found.samples);
    }
    let old_note = if old_stacks == 0 {
        String::new()
    } else {
        format!(", {old_stacks} stack(s) holding allocations older than the minimum age")
    };
    report.summary = Some(if input.launched_exit {
        format!("{listed} stack(s) hold memory the program never freed{old_note}")
    } else if decided {
        format!("{leaking} leaking stack(s){old_note}")
    } else {
        format!("{listed} stack(s) hold memory (too few snapshots to measure growth){old_note}")
    });
    report
}

/// A captured stack's frames and how far it goes. A stack that is not
/// there, or whose status says missing, has no frames; one whose status is
/// unknown keeps its frames and its status (the collector marks and counts it).
pub(crate) fn stack_frames(stack: Option<&UserStack>) -> (Vec<u64>, StackStatus) {
    let Some(stack) = stack else {
        return (Vec::new(), StackStatus::Missing);
    };
    match StackStatus::from_kernel(stack.status) {
        StackStatus::Missing => (Vec::new(), StackStatus::Missing),
        status => (stack.frames().to_vec(), status),
    }
}

/// One profile sample for a stack (see [`user_frames`]).
fn sample(
    key: &StackKey,
    stacks: &HashMap<u64, UserStack>,
    values: Vec<i64>,
    numeric_labels: Vec<(String, i64, String)>,
    ctx: &Context<'_>,
) -> RawSample {
    let maps = ctx
        .processes
        .maps
        .get(&key.pid)
        .map_or(&[][..], Vec::as_slice);
    let (user, user_status) = user_frames(key, stacks.get(&key.stack_id), maps, ctx);
    let mut sample = RawSample {
        pid: key.pid,
        tid: None,
        comm: ctx.processes.comm(key.pid),
        thread_comm: None,
        python_thread: None,
        user,
        user_status,
        kernel: Vec::new(),
        values,
        numeric_labels,
        leaf_is_pc: false,
        leaf_marker: (key.source == SOURCE_MMAP).then_some(profile::MMAP),
        splices: Vec::new(),
    };
    if let Some((_, named)) = ctx.python.and_then(|pairs| pairs.get(&key.stack_id)) {
        named.merge_into(&mut sample);
    }
    sample
}

/// The frames of a sample, from its captured stack and its process's
/// mappings `maps`:
/// - a frame in the kernel's uretprobe trampoline ends the stack (a return
///   address replaced by the kernel says nothing about the caller);
/// - a mapping's frame 0 is the pc at the syscall instruction in libc's
///   wrapper (mmap, mremap): like malloc stacks, mapping stacks start at
///   the caller. A program's own syscall instruction stays;
/// - with the hooks, a hook's caller is the allocator itself: the stack
///   starts at the first frame outside it, the allocation's real caller.
fn user_frames(
    key: &StackKey,
    stack: Option<&UserStack>,
    maps: &[Mapping],
    ctx: &Context<'_>,
) -> (Vec<u64>, StackStatus) {
    let (mut user, mut status) = stack_frames(stack);
    if let Some(cut) = first_trampoline_frame(maps, &user) {
        user.truncate(cut);
        status = StackStatus::Truncated;
    }
    if key.source == SOURCE_MMAP && user.len() > 1 && in_libc(maps, user[0]) {
        user.remove(0);
    }
    if matches!(ctx.tracking, Tracking::Hooks { .. } | Tracking::Usdt) && !maps.is_empty() {
        trim_allocator_frames(&mut user, maps, &ctx.allocator_inodes);
    }
    (user, status)
}

/// Drops the leading frames inside the objects `inodes`, keeping at least one.
fn trim_allocator_frames(user: &mut Vec<u64>, maps: &[Mapping], inodes: &[u64]) {
    let inside = |ip: u64| {
        maps.iter()
            .any(|m| inodes.contains(&m.inode) && ip >= m.start && ip < m.end)
    };
    let skip = user.iter().take_while(|&&ip| inside(ip)).count();
    user.drain(..skip.min(user.len().saturating_sub(1)));
}

/// Where x86-64 Linux places the uprobes page (`[uprobes]`) unless taken.
const UPROBES_PAGE: (u64, u64) = (0x7fff_ffff_e000, 0x7fff_ffff_f000);

/// Index of the first frame in the uprobes page (the kernel's uretprobe
/// trampoline).
fn first_trampoline_frame(maps: &[Mapping], user: &[u64]) -> Option<usize> {
    let uprobes = maps
        .iter()
        .find(|m| m.path == "[uprobes]")
        .map_or(UPROBES_PAGE, |m| (m.start, m.end));
    user.iter()
        .position(|&ip| ip >= uprobes.0 && ip < uprobes.1)
}

/// Whether `ip` is in the C library of the process mapping `maps`.
fn in_libc(maps: &[Mapping], ip: u64) -> bool {
    let Some(libc) = process::find_libc(maps) else {
        return false;
    };
    maps.iter()
        .any(|m| m.inode == libc.inode && m.dev == libc.dev && ip >= m.start && ip < m.end)
}

#[cfg(test)]
mod tests;
