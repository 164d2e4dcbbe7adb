use std::collections::HashMap;

use profiler_common::{
    counters::CounterSet as _,
    heap::{
        HeapCounter, LiveAlloc, LiveKey, SOURCE_ALLOCATOR, SOURCE_MMAP, StackKey, StackStats,
        WEIGHT_ONE,
    },
    stack::{MAX_USER_FRAMES, StackStatus as Kernel, UserStack},
};

use super::*;
use crate::{
    heap::{
        coverage::{Coverage, Memory, ProcessMemory},
        leaks::History,
        processes::Processes,
        settings::Tracking,
    },
    process::Mapping,
    profile::{Collector, StackStatus},
    runtime::counters::Counts,
};

const STACK_COMPLETE: u32 = Kernel::Complete as u32;
const STACK_TRUNCATED: u32 = Kernel::Truncated as u32;
const STACK_MISSING: u32 = Kernel::Missing as u32;

const PAGE: u64 = 4096;
const PID: u32 = 100;
/// Where the test process maps its allocator (inode 7) and libc (inode 9).
const ALLOCATOR: (u64, u64) = (0x7000_0000, 0x7010_0000);
const LIBC: (u64, u64) = (0x7100_0000, 0x7120_0000);
const PROGRAM: (u64, u64) = (0x40_0000, 0x50_0000);

fn mapping(range: (u64, u64), inode: u64, path: &str, perms: &str) -> Mapping {
    Mapping {
        start: range.0,
        end: range.1,
        perms: perms.to_owned(),
        offset: 0,
        dev: (8, 1),
        inode,
        path: path.to_owned(),
    }
}

fn anon(start: u64, end: u64) -> Mapping {
    mapping((start, end), 0, "", "rw-p")
}

fn processes() -> Processes {
    let mut p = Processes::default();
    p.maps.insert(
        PID,
        vec![
            mapping(PROGRAM, 5, "/usr/bin/prog", "r-xp"),
            mapping(ALLOCATOR, 7, "/usr/lib/libprofalloc.so", "r-xp"),
            mapping(LIBC, 9, "/usr/lib/x86_64-linux-gnu/libc.so.6", "r-xp"),
        ],
    );
    p.comms.insert(PID, "prog".to_owned());
    p
}

fn context(processes: &Processes, tracking: Tracking, mmap: bool) -> Context<'_> {
    Context {
        tracking,
        coverage: Coverage::SinceStart,
        mmap,
        processes,
        allocator_inodes: vec![7],
        python: None,
    }
}

const EVERY: Tracking = Tracking::Malloc { sample_bytes: 0 };

fn stack(ips: &[u64], status: u32) -> UserStack {
    let mut s = UserStack::EMPTY;
    s.ips[..ips.len()].copy_from_slice(ips);
    s.len = ips.len() as u32;
    s.status = status;
    s
}

fn key(stack_id: u64, source: u32) -> StackKey {
    StackKey {
        stack_id,
        pid: PID,
        source,
    }
}

/// Totals of `n` objects of `size` bytes allocated, `freed` of them freed.
fn stats(n: u64, freed: u64, size: u64) -> StackStats {
    StackStats {
        alloc_objects: n * WEIGHT_ONE,
        alloc_bytes: n * size,
        free_objects: freed * WEIGHT_ONE,
        free_bytes: freed * size,
    }
}

fn live_mapping(addr: u64, pages: u64, stack_id: u64) -> (LiveKey, LiveAlloc) {
    (
        LiveKey {
            addr,
            pid: PID,
            source: SOURCE_MMAP,
        },
        LiveAlloc {
            size: pages * PAGE,
            weight_bytes: pages * PAGE,
            weight_objects: WEIGHT_ONE,
            timestamp_ns: 0,
            stack_id,
        },
    )
}

#[test]
fn unmapped_counts_what_the_process_no_longer_maps() {
    let base = 0x1000_0000;
    let tracked = [
        // Whole: still mapped by one anonymous mapping.
        live_mapping(base, 4, 1),
        // Half of it unmapped from inside.
        live_mapping(base + 0x10_0000, 4, 2),
        // Gone, and a file mapped at its place does not cover it.
        live_mapping(base + 0x20_0000, 2, 3),
    ];
    let current = HashMap::from([(
        PID,
        vec![
            anon(base, base + 4 * PAGE),
            anon(base + 0x10_0000, base + 0x10_0000 + 2 * PAGE),
            mapping(
                (base + 0x20_0000, base + 0x20_0000 + 2 * PAGE),
                3,
                "/f",
                "r--p",
            ),
        ],
    )]);
    let u = unmapped(&tracked.into_iter().collect(), &current);
    assert_eq!(u.mappings, 2);
    assert_eq!(u.bytes, 4 * PAGE);
    let held = |u: &Unmapped, stack_id| {
        let h = u.held[&key(stack_id, SOURCE_MMAP)];
        (h.objects, h.bytes)
    };
    assert_eq!(held(&u, 1), (WEIGHT_ONE, 4 * PAGE));
    assert_eq!(held(&u, 2), (WEIGHT_ONE, 2 * PAGE));
    assert_eq!(held(&u, 3), (0, 0));
    // A process with no current maps (it exited) is reported as it was.
    let u = unmapped(&tracked.into_iter().collect(), &HashMap::new());
    assert_eq!((u.mappings, u.bytes), (0, 0));
    assert_eq!(held(&u, 2), (WEIGHT_ONE, 4 * PAGE));
    assert_eq!(held(&u, 3), (WEIGHT_ONE, 2 * PAGE));
}

#[test]
fn heap_report_takes_unmapped_pages_out_of_the_in_use_values() {
    let base = 0x1000_0000;
    let tracked = [
        live_mapping(base, 4, 2),
        live_mapping(base + 0x10_0000, 2, 3),
    ];
    let current = HashMap::from([(PID, vec![anon(base, base + PAGE)])]);
    let processes = processes();
    let totals = Totals {
        stats: vec![
            (key(2, SOURCE_MMAP), stats(1, 0, 4 * PAGE)),
            (key(3, SOURCE_MMAP), stats(1, 0, 2 * PAGE)),
        ],
        unmapped: unmapped(&tracked.into_iter().collect(), &current),
        ..Totals::default()
    };
    let report = heap_report(&totals, &context(&processes, EVERY, true));
    let values: HashMap<u64, Vec<i64>> = report
        .samples
        .iter()
        .zip(&totals.stats)
        .map(|(s, (k, _))| (k.stack_id, s.values.clone()))
        .collect();
    let p = PAGE as i64;
    // alloc_objects, alloc_space, inuse_objects, inuse_space.
    assert_eq!(values[&2], vec![1, 4 * p, 1, p]);
    assert_eq!(values[&3], vec![1, 2 * p, 0, 0]);
    assert!(
        report
            .comments
            .iter()
            .any(|c| c.contains("unmapped by calls that did not start at them: 2 (20.0 KiB")),
        "{:?}",
        report.comments
    );
    assert!(
        report
            .samples
            .iter()
            .all(|s| s.leaf_marker == Some(crate::profile::MMAP))
    );
}

/// The in-use values of mapping stacks of one report, by stack id.
fn mapping_inuse(totals: &Totals) -> HashMap<u64, (i64, i64)> {
    let processes = processes();
    heap_report(totals, &context(&processes, EVERY, true))
        .samples
        .iter()
        .zip(super::stacks_of(totals))
        .map(|(s, (k, _))| (k.stack_id, (s.values[2], s.values[3])))
        .collect()
}

#[test]
fn a_mapping_retired_between_the_reads_is_freed_once() {
    // The live map was read with the mapping; the process unmapped it from
    // its start (the kernel retired it: its free is in the totals read
    // next), and the maps read then no longer show it.
    let base = 0x1000_0000;
    let tracked = HashMap::from([live_mapping(base, 4, 1)]);
    let totals = Totals {
        stats: vec![(key(1, SOURCE_MMAP), stats(1, 1, 4 * PAGE))],
        unmapped: unmapped(&tracked, &HashMap::from([(PID, vec![anon(0x10, 0x20)])])),
        ..Totals::default()
    };
    assert_eq!(mapping_inuse(&totals)[&1], (0, 0));
}

#[test]
fn a_mapping_tracked_between_the_reads_counts_what_it_holds() {
    // Read in the live map (with a hole the maps show), and tracked after
    // the totals were read: the stack has no totals yet. Stack 2's
    // mapping was tracked and trimmed before.
    let base = 0x1000_0000;
    let tracked = HashMap::from([
        live_mapping(base, 4, 1),
        live_mapping(base + 0x10_0000, 3, 2),
    ]);
    let current = HashMap::from([(
        PID,
        vec![
            anon(base, base + PAGE),
            anon(base + 2 * PAGE, base + 4 * PAGE),
            anon(base + 0x10_0000, base + 0x10_0000 + 3 * PAGE),
        ],
    )]);
    let totals = Totals {
        stats: vec![(key(2, SOURCE_MMAP), stats(1, 0, 4 * PAGE))],
        unmapped: unmapped(&tracked, &current),
        ..Totals::default()
    };
    let p = PAGE as i64;
    let inuse = mapping_inuse(&totals);
    assert_eq!(inuse[&1], (1, 3 * p));
    assert_eq!(inuse[&2], (1, 3 * p));
}

#[test]
fn a_walk_of_the_live_map_that_started_over_counts_each_mapping_once() {
    // The walk stood on a block another process freed, and started over:
    // both mappings came twice. The second has a hole.
    let base = 0x1000_0000;
    let (a, b) = (
        live_mapping(base, 4, 1),
        live_mapping(base + 0x10_0000, 4, 1),
    );
    let (tracked, repeated) = crate::heap::maps::once_each([a, b, a, b]);
    assert_eq!(repeated, 2);
    let current = HashMap::from([(
        PID,
        vec![
            anon(base, base + 4 * PAGE),
            anon(base + 0x10_0000, base + 0x10_0000 + PAGE),
            anon(base + 0x10_0000 + 2 * PAGE, base + 0x10_0000 + 4 * PAGE),
        ],
    )]);
    let totals = Totals {
        stats: vec![(key(1, SOURCE_MMAP), stats(2, 0, 4 * PAGE))],
        unmapped: unmapped(&tracked, &current),
        ..Totals::default()
    };
    assert_eq!(mapping_inuse(&totals)[&1], (2, 7 * PAGE as i64));
    assert_eq!((totals.unmapped.mappings, totals.unmapped.bytes), (1, PAGE));
    assert_eq!(totals.unmapped.replaced_mappings, 0);
}

/// A history whose stack 1 grows at every snapshot and stack 2 stays level.
fn history() -> History<StackKey> {
    let mut h = History::new();
    for (i, t) in [2.0, 4.0, 6.0, 8.0].into_iter().enumerate() {
        let i = i as i64 + 1;
        h.push(
            t,
            [
                (key(1, SOURCE_ALLOCATOR), 100 * i),
                (key(2, SOURCE_ALLOCATOR), 500),
            ],
        );
    }
    h
}

fn leak_totals() -> Totals {
    Totals {
        stats: vec![
            (key(1, SOURCE_ALLOCATOR), stats(4, 0, 100)),
            (key(2, SOURCE_ALLOCATOR), stats(10, 5, 100)),
            (key(3, SOURCE_ALLOCATOR), stats(3, 3, 100)),
        ],
        ..Totals::default()
    }
}

fn listed(report: &Report) -> Vec<(u32, Vec<i64>)> {
    let mut out: Vec<_> = report
        .samples
        .iter()
        .map(|s| (s.values[1] as u32, s.values.clone()))
        .collect();
    out.sort();
    out
}

#[test]
fn leak_report_lists_only_growing_stacks_once_growth_is_measured() {
    let processes = processes();
    let ctx = context(&processes, EVERY, false);
    let history = history();
    let input = LeakInput {
        history: &history,
        live_history: &History::new(),
        min_age: None,
        launched_exit: false,
    };
    let report = leak_report(&leak_totals(), &ctx, &input);
    assert_eq!(listed(&report), vec![(400, vec![4, 400])]);
    assert_eq!(report.samples[0].numeric_labels[0].0, "growth");
    assert_eq!(report.samples[0].numeric_labels[0].1, 50);
    assert_eq!(report.summary.as_deref(), Some("1 leaking stack(s)"));
}

#[test]
fn leak_report_adds_stacks_with_old_allocations() {
    let processes = processes();
    let ctx = context(&processes, EVERY, false);
    let history = history();
    let input = LeakInput {
        history: &history,
        live_history: &History::new(),
        min_age: None,
        launched_exit: false,
    };
    let blocks = HashMap::from([(
        LiveKey {
            addr: 0x5000,
            pid: PID,
            source: SOURCE_ALLOCATOR,
        },
        LiveAlloc {
            size: 100,
            weight_bytes: 100,
            weight_objects: WEIGHT_ONE,
            timestamp_ns: 1_000_000_000,
            stack_id: 2,
        },
    )]);
    let mut totals = leak_totals();
    // At 61 s, a 60 s minimum lists the block of 1 s; 70 s does not.
    assert!(old_allocations(&blocks, 61_000_000_000, 70_000_000_000).is_empty());
    totals.old = old_allocations(&blocks, 61_000_000_000, 60_000_000_000);
    let report = leak_report(&totals, &ctx, &input);
    // The level stack shows its old block only, not all it holds.
    assert_eq!(
        listed(&report),
        vec![(100, vec![1, 100]), (400, vec![4, 400])]
    );
    let old = report.samples.iter().find(|s| s.values[1] == 100).unwrap();
    assert!(
        old.numeric_labels
            .contains(&("age".to_owned(), 60, "seconds".to_owned()))
    );
}

#[test]
fn leak_report_lists_everything_held_when_it_cannot_decide() {
    let processes = processes();
    let ctx = context(&processes, EVERY, false);
    for (history, launched_exit) in [(History::new(), false), (history(), true)] {
        let input = LeakInput {
            history: &history,
            live_history: &History::new(),
            min_age: None,
            launched_exit,
        };
        let report = leak_report(&leak_totals(), &ctx, &input);
        // Stack 3 freed all it allocated.
        assert_eq!(
            listed(&report),
            vec![(400, vec![4, 400]), (500, vec![5, 500])]
        );
        let summary = report.summary.unwrap();
        assert!(summary.starts_with("2 stack(s) hold memory"), "{summary}");
    }
}

#[test]
fn interval_reports_count_allocations_since_the_baseline_and_all_that_is_held() {
    let processes = processes();
    let ctx = context(&processes, EVERY, false);
    let (growing, quiet, gone) = (
        key(1, SOURCE_ALLOCATOR),
        key(2, SOURCE_ALLOCATOR),
        key(3, SOURCE_ALLOCATOR),
    );
    let totals = Totals {
        stats: vec![
            (growing, stats(10, 4, 100)),
            (quiet, stats(5, 2, 64)),
            (gone, stats(3, 3, 32)),
        ],
        ..Totals::default()
    };
    let baseline = HashMap::from([
        (growing, stats(6, 1, 100)),
        (quiet, stats(5, 2, 64)),
        (gone, stats(3, 3, 32)),
    ]);
    let report = heap_report_since(&totals, &ctx, &baseline);
    let values: Vec<Vec<i64>> = report.samples.iter().map(|s| s.values.clone()).collect();
    // 4 objects allocated in the interval, 6 held; nothing allocated but 3
    // held; nothing at all (left out).
    assert_eq!(values, [vec![4, 400, 6, 600], vec![0, 0, 3, 192]]);
}

#[test]
fn purged_processes_hold_nothing() {
    let mut processes = processes();
    processes.purged.insert(PID);
    let ctx = context(&processes, EVERY, false);
    let totals = leak_totals();
    let heap = heap_report(&totals, &ctx);
    assert!(heap.samples.iter().all(|s| s.values[2..] == [0, 0]));
    assert_eq!(heap.samples[0].values[..2], [4, 400]);
    let history = History::new();
    let input = LeakInput {
        history: &history,
        live_history: &History::new(),
        min_age: None,
        launched_exit: false,
    };
    assert!(leak_report(&totals, &ctx, &input).samples.is_empty());
}

#[test]
fn hook_frames_inside_the_allocator_are_trimmed() {
    let processes = processes();
    let in_allocator = [ALLOCATOR.0 + 0x10, ALLOCATOR.0 + 0x20];
    let callers = [PROGRAM.0 + 0x100, PROGRAM.0 + 0x200];
    let frames = [in_allocator.as_slice(), &callers].concat();
    let only_allocator = stack(&in_allocator, STACK_COMPLETE);
    let full = stack(&frames, STACK_COMPLETE);
    let stacks = HashMap::from([(1, full), (2, only_allocator)]);
    let totals = Totals {
        stats: vec![
            (key(1, SOURCE_ALLOCATOR), stats(1, 0, 8)),
            (key(2, SOURCE_ALLOCATOR), stats(1, 0, 8)),
        ],
        stacks,
        ..Totals::default()
    };
    let hooks = context(&processes, Tracking::Hooks { sample_bytes: 64 }, false);
    let report = heap_report(&totals, &hooks);
    assert_eq!(report.samples[0].user, callers);
    // A stack wholly inside the allocator keeps its last frame.
    assert_eq!(report.samples[1].user, [in_allocator[1]]);
    assert_eq!(report.period, Some(64));
    // The malloc family's stacks start at the caller already.
    let malloc = context(&processes, EVERY, false);
    assert_eq!(heap_report(&totals, &malloc).samples[0].user, frames);
}

#[test]
fn mapping_stacks_start_at_the_caller_of_libc_wrappers() {
    let processes = processes();
    let wrapper = LIBC.0 + 0x40;
    let own_syscall = PROGRAM.0 + 0x40;
    let caller = PROGRAM.0 + 0x300;
    let totals = Totals {
        stats: vec![
            (key(1, SOURCE_MMAP), stats(1, 0, PAGE)),
            (key(2, SOURCE_MMAP), stats(1, 0, PAGE)),
        ],
        stacks: HashMap::from([
            (1, stack(&[wrapper, caller], STACK_COMPLETE)),
            (2, stack(&[own_syscall, caller], STACK_COMPLETE)),
        ]),
        ..Totals::default()
    };
    let report = heap_report(&totals, &context(&processes, EVERY, true));
    assert_eq!(report.samples[0].user, [caller]);
    assert_eq!(report.samples[1].user, [own_syscall, caller]);
}

#[test]
fn stack_status_maps_to_the_profile_and_trampolines_cut_stacks() {
    let ips = [PROGRAM.0 + 1, PROGRAM.0 + 2];
    assert_eq!(
        stack_frames(Some(&stack(&ips, STACK_COMPLETE))),
        (ips.to_vec(), StackStatus::Complete)
    );
    assert_eq!(
        stack_frames(Some(&stack(&ips, STACK_TRUNCATED))),
        (ips.to_vec(), StackStatus::Truncated)
    );
    assert_eq!(
        stack_frames(Some(&stack(&ips, STACK_MISSING))),
        (Vec::new(), StackStatus::Missing)
    );
    assert_eq!(stack_frames(None), (Vec::new(), StackStatus::Missing));
    // A value this build does not know keeps the frames, for the collector
    // to mark `[unknown stack status 9]` and count.
    assert_eq!(
        stack_frames(Some(&stack(&ips, 9))),
        (ips.to_vec(), StackStatus::Unknown(9))
    );
    let mut deep = stack(&[], STACK_TRUNCATED);
    deep.len = u32::MAX;
    assert_eq!(stack_frames(Some(&deep)).0.len(), MAX_USER_FRAMES);

    // A return address in the uretprobe trampoline ends the stack.
    let processes = processes();
    let trampoline = 0x7fff_ffff_e000;
    let totals = Totals {
        stats: vec![(key(1, SOURCE_ALLOCATOR), stats(1, 0, 8))],
        stacks: HashMap::from([(1, stack(&[ips[0], trampoline, ips[1]], STACK_COMPLETE))]),
        ..Totals::default()
    };
    let report = heap_report(&totals, &context(&processes, EVERY, false));
    assert_eq!(report.samples[0].user, [ips[0]]);
    assert_eq!(report.samples[0].user_status, StackStatus::Truncated);
}

#[test]
fn comments_state_the_mode_the_counters_and_every_loss() {
    let processes = processes();
    let mut values = vec![0; HeapCounter::LEN as usize];
    for (counter, n) in [
        (HeapCounter::Allocs, 10),
        (HeapCounter::Tracked, 7),
        (HeapCounter::LiveFull, 1),
        (HeapCounter::StacksFull, 2),
        (HeapCounter::ThreadsFull, 3),
        (HeapCounter::StackErrors, 4),
    ] {
        values[counter.index() as usize] = n;
    }
    let totals = Totals {
        counters: Counts::from_values(values),
        ..Totals::default()
    };
    let sampled = Tracking::Malloc { sample_bytes: 1024 };
    let report = heap_report(&totals, &context(&processes, sampled, false));
    assert_eq!(
        report.comments,
        [
            "mode: malloc uprobes, sampled, one allocation per 1024 bytes on average (values are estimates)",
            "coverage: allocations made since the program started",
            "heap counters: allocs 10, frees 0, tracked 7, live_full 1, stacks_full 2, stack_errors 4, threads_full 3, mmaps 0, mmaps_in_allocator 0, unmaps_partial 0, usdt_arg_errors 0",
            "live_full: 1 (allocations lost: the live-allocation map was full; raise --max-live)",
            "stacks_full: 2 (allocations lost: the stack map was full; raise --max-stacks)",
            "threads_full: 3 (allocations lost: the thread map was full)",
            "stack_errors: 4 (allocations without a user stack)",
        ]
    );
    let profile = report
        .into_profile(Collector::new(sample_types(false), "inuse_space"))
        .unwrap();
    assert_eq!(profile.period, 1024);
    assert_eq!(profile.comments.len(), 7);
    assert_eq!(profile.sample_types.len(), 4);
}

#[test]
fn coverage_and_memory_come_after_the_mode() {
    let processes = processes();
    let totals = Totals {
        memory: vec![ProcessMemory {
            pid: PID,
            comm: "prog".to_owned(),
            memory: Some(Memory {
                anonymous: Some(64 << 20),
                heap_rss: Some(128 << 10),
            }),
        }],
        ..Totals::default()
    };
    let report = heap_report(&totals, &context(&processes, EVERY, false));
    let expected = [
        "coverage: allocations made since the program started",
        "memory of prog (100) now: Anonymous 64.0 MiB, [heap] Rss 128.0 KiB",
    ];
    assert_eq!(report.comments[1..3], expected);
    assert_eq!(report.coverage, expected);
}
