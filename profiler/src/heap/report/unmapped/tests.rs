use std::collections::HashMap;

use profiler_common::heap::{LiveAlloc, LiveKey, SOURCE_ALLOCATOR, SOURCE_MMAP, WEIGHT_ONE};

use super::*;

const PID: u32 = 100;
const MIB: u64 = 1 << 20;
const BASE: u64 = 0x7f00_0000_0000;

/// A tracked mapping of `mib` MiB at `BASE + at_mib` MiB, made at `ts`.
fn tracked(at_mib: u64, mib: u64, stack_id: u64, ts: u64) -> (LiveKey, LiveAlloc) {
    (
        LiveKey {
            addr: BASE + at_mib * MIB,
            pid: PID,
            source: SOURCE_MMAP,
        },
        LiveAlloc {
            size: mib * MIB,
            weight_bytes: mib * MIB,
            weight_objects: WEIGHT_ONE,
            timestamp_ns: ts,
            stack_id,
        },
    )
}

fn anon(from_mib: u64, to_mib: u64) -> Mapping {
    Mapping {
        start: BASE + from_mib * MIB,
        end: BASE + to_mib * MIB,
        perms: "rw-p".to_owned(),
        offset: 0,
        dev: (0, 0),
        inode: 0,
        path: String::new(),
    }
}

/// (objects, bytes) the mappings of `stack_id` hold.
fn held(u: &Unmapped, stack_id: u64) -> (u64, u64) {
    let h = u
        .held
        .get(&StackKey {
            stack_id,
            pid: PID,
            source: SOURCE_MMAP,
        })
        .copied()
        .unwrap_or_default();
    (h.objects, h.bytes)
}

/// One read of the live map.
fn read(entries: &[(LiveKey, LiveAlloc)]) -> HashMap<LiveKey, LiveAlloc> {
    entries.iter().copied().collect()
}

/// 8 MiB mapped (stack 1), then MAP_FIXED 2 MiB over its middle (2), 1 MiB
/// over its start (3: the kernel side trimmed the original to 7 MiB from
/// 1 MiB) and 1 MiB over its end (4).
fn overlaid() -> Vec<(LiveKey, LiveAlloc)> {
    vec![
        tracked(1, 7, 1, 10),
        tracked(3, 2, 2, 20),
        tracked(0, 1, 3, 30),
        tracked(7, 1, 4, 40),
    ]
}

#[test]
fn a_range_mapped_over_counts_once_under_the_newer_mapping() {
    // The kernel may show the range as one area or several.
    for maps in [
        vec![anon(0, 8)],
        vec![anon(0, 1), anon(1, 3), anon(3, 5), anon(5, 7), anon(7, 8)],
    ] {
        let current = HashMap::from([(PID, maps)]);
        let u = unmapped(&read(&overlaid()), &current);
        // The original keeps 4 MiB of its 7: the overlays hold the rest.
        assert_eq!(held(&u, 1), (WEIGHT_ONE, 4 * MIB));
        for (stack, mib) in [(2, 2), (3, 1), (4, 1)] {
            assert_eq!(held(&u, stack), (WEIGHT_ONE, mib * MIB), "stack {stack}");
        }
        assert_eq!((u.replaced_mappings, u.replaced_bytes), (1, 3 * MIB));
        assert_eq!((u.mappings, u.bytes), (0, 0));
    }
    // An exited process: the overlaps are still known.
    let u = unmapped(&read(&overlaid()), &HashMap::new());
    assert_eq!(held(&u, 1), (WEIGHT_ONE, 4 * MIB));
    assert_eq!((u.mappings, u.replaced_bytes), (0, 3 * MIB));
}

#[test]
fn the_newer_mapping_wins_whatever_the_order_in_the_map() {
    let mut all = overlaid();
    all.reverse();
    let current = HashMap::from([(PID, vec![anon(0, 8)])]);
    assert_eq!(
        unmapped(&read(&all), &current),
        unmapped(&read(&overlaid()), &current)
    );
    // An older mapping under a newer one loses nothing of what it alone holds.
    let two = [tracked(0, 4, 1, 50), tracked(2, 4, 2, 60)];
    let u = unmapped(&read(&two), &HashMap::from([(PID, vec![anon(0, 6)])]));
    assert_eq!(
        (held(&u, 1), held(&u, 2)),
        ((WEIGHT_ONE, 2 * MIB), (WEIGHT_ONE, 4 * MIB))
    );
}

#[test]
fn after_unmapping_the_whole_range_nothing_is_left() {
    // munmap of the 8 MiB from their start retired the start overlay and the
    // original in the kernel; the other two are found gone from the maps.
    let left = [tracked(3, 2, 2, 20), tracked(7, 1, 4, 40)];
    let current = HashMap::from([(PID, vec![anon(20, 21)])]);
    let u = unmapped(&read(&left), &current);
    assert_eq!(held(&u, 2), (0, 0));
    assert_eq!(held(&u, 4), (0, 0));
    assert_eq!((u.mappings, u.bytes), (2, 3 * MIB));
    assert_eq!(u.replaced_mappings, 0);
}

#[test]
fn a_range_both_replaced_and_unmapped_is_taken_out_once() {
    // The newer mapping over the middle was unmapped again: the original
    // does not get it back (the range is empty) and loses it once.
    let two = [tracked(0, 8, 1, 10), tracked(3, 2, 2, 20)];
    let current = HashMap::from([(PID, vec![anon(0, 3), anon(5, 8)])]);
    let u = unmapped(&read(&two), &current);
    assert_eq!(held(&u, 1), (WEIGHT_ONE, 6 * MIB));
    assert_eq!(held(&u, 2), (0, 0));
    assert_eq!(u.replaced_bytes, 0);
}

#[test]
fn other_processes_and_sources_do_not_overlap() {
    let mut other = tracked(3, 2, 2, 20);
    other.0.pid = PID + 1;
    let mut block = tracked(5, 1, 3, 30);
    block.0.source = SOURCE_ALLOCATOR;
    let all = [tracked(0, 8, 1, 10), other, block];
    let u = unmapped(&read(&all), &HashMap::new());
    assert_eq!((u.mappings, u.replaced_mappings), (0, 0));
    assert_eq!(held(&u, 1), (WEIGHT_ONE, 8 * MIB));
    assert_eq!(held(&u, 3), (0, 0));
    let other_pid = StackKey {
        stack_id: 2,
        pid: PID + 1,
        source: SOURCE_MMAP,
    };
    assert_eq!(u.held[&other_pid].bytes, 2 * MIB);
}

#[test]
fn the_union_joins_touching_and_overlapping_ranges() {
    let mut u = Union::default();
    for r in [(40, 50), (0, 10), (20, 30), (10, 20), (45, 60)] {
        u.add(r);
    }
    assert_eq!(
        u.0.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
        [(0, 30), (40, 60)]
    );
    assert_eq!(u.within((5, 45)), [(5, 30), (40, 45)]);
    assert_eq!(u.within((30, 40)), []);
    assert_eq!(u.within((50, 70)), [(50, 60)]);
}
