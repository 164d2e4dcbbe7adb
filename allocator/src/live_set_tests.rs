use std::collections::BTreeSet;

use super::*;

fn table(slots: usize) -> (&'static Header, LiveSet) {
    let h: &'static Header = Box::leak(Box::new(Header::zeroed()));
    let set = LiveSet::new(h);
    assert!(set.start((slots * size_of::<Slot>()) as u64, 4096));
    (h, set)
}

/// The live samples as a reader sees them: (ptr, size, weight, stack).
fn samples(h: &Header, set: &LiveSet) -> BTreeSet<(u64, u64, u64, Vec<u64>)> {
    (0..h.used.load(Ordering::Relaxed) as usize)
        .map(|i| read_slot(set, i))
        .filter(|s| s.ptr != 0)
        .inspect(|s| assert_eq!(s.generation % 2, 0))
        .map(|s| {
            (
                s.ptr,
                s.size,
                s.weight,
                s.frames[..s.depth as usize].to_vec(),
            )
        })
        .collect()
}

#[test]
fn header_describes_the_table() {
    let (h, _set) = table(10);
    assert_eq!(h.magic.load(Ordering::Relaxed), LIVE_HEAP_MAGIC);
    assert_eq!(h.capacity.load(Ordering::Relaxed), 10);
    assert_eq!(
        h.slot_size.load(Ordering::Relaxed) as usize,
        size_of::<LiveSlot>()
    );
    assert_eq!(h.sample_bytes.load(Ordering::Relaxed), 4096);
    assert!(!LiveSet::new(Box::leak(Box::new(Header::zeroed()))).start(100, 1));
}

#[test]
fn inserts_and_removes_keep_exactly_the_live_samples() {
    let (h, set) = table(16);
    set.insert(0x1000, 100, 4096, &[1, 2, 3], false, PythonWords::NONE);
    set.insert(0x2000, 200, 8192, &[4], true, PythonWords::NONE);
    set.insert(0x3000, 300, 12288, &[], false, PythonWords::NONE);
    assert_eq!(h.live.load(Ordering::Relaxed), 3);
    set.remove(0x2000);
    set.remove(0x9000); // never inserted: nothing happens
    assert_eq!(h.live.load(Ordering::Relaxed), 2);
    assert_eq!(h.generation.load(Ordering::Relaxed), 4);
    let want: BTreeSet<_> = [
        (0x1000, 100, 4096, vec![1, 2, 3]),
        (0x3000, 300, 12288, vec![]),
    ]
    .into_iter()
    .collect();
    assert_eq!(samples(h, &set), want);
    // The freed slot is the next one used.
    set.insert(0x4000, 1, 1, &[7], false, PythonWords::NONE);
    assert_eq!(h.used.load(Ordering::Relaxed), 3);
    assert_eq!(read_slot(&set, 1).ptr, 0x4000);
    assert_eq!(read_slot(&set, 0).flags, 0);
}

#[test]
fn a_full_table_counts_what_it_drops() {
    let (h, set) = table(3);
    for k in 1..=5 {
        set.insert(k * 0x1000, 10, 10, &[k as u64], false, PythonWords::NONE);
    }
    assert_eq!(h.live.load(Ordering::Relaxed), 3);
    assert_eq!(h.dropped.load(Ordering::Relaxed), 2);
    set.remove(0x1000);
    set.insert(0x6000, 10, 10, &[6], false, PythonWords::NONE);
    assert_eq!(h.live.load(Ordering::Relaxed), 3);
    let ptrs: Vec<u64> = samples(h, &set).into_iter().map(|s| s.0).collect();
    assert_eq!(ptrs, [0x2000, 0x3000, 0x6000]);
    // A pointer that cannot be indexed is dropped too.
    set.remove(0x2000);
    set.insert(0x1001, 1, 1, &[], false, PythonWords::NONE);
    assert_eq!(h.dropped.load(Ordering::Relaxed), 3);
}

#[test]
fn deep_stacks_are_cut_and_marked() {
    let (_h, set) = table(2);
    let deep: Vec<u64> = (0..100).collect();
    set.insert(0x1000, 1, 1, &deep, false, PythonWords::NONE);
    let s = read_slot(&set, 0);
    assert_eq!(s.depth as usize, LIVE_MAX_FRAMES);
    assert_eq!(s.flags, LIVE_SLOT_TRUNCATED);
    assert_eq!(s.frames[LIVE_MAX_FRAMES - 1], LIVE_MAX_FRAMES as u64 - 1);
}

#[test]
fn python_words_follow_the_native_stack_and_take_their_share_first() {
    let (_h, set) = table(2);
    let deep: Vec<u64> = (100..200).collect();
    let words = [11, 0, 12];
    set.insert(
        0x1000,
        1,
        1,
        &deep,
        false,
        PythonWords {
            words: &words,
            checks: &[0x11, 0, 0x12],
            cut: false,
        },
    );
    let s = read_slot(&set, 0);
    assert_eq!((s.depth as usize, s.python_depth), (LIVE_MAX_FRAMES - 3, 3));
    assert_eq!(s.flags, LIVE_SLOT_TRUNCATED);
    assert_eq!(&s.frames[LIVE_MAX_FRAMES - 3..], &words);
    assert_eq!(&s.python_checks[..3], &[0x11, 0, 0x12]);
    assert_eq!(s.frames[0], 100);
    // A Python stack past its share: the outer words go, marked cut.
    let many: Vec<u64> = (1..=40).collect();
    let checks: Vec<u32> = (101..=140).collect();
    set.insert(
        0x2000,
        1,
        1,
        &[7, 8],
        false,
        PythonWords {
            words: &many,
            checks: &checks,
            cut: false,
        },
    );
    let s = read_slot(&set, 1);
    assert_eq!(
        (s.depth, s.python_depth as usize),
        (2, LIVE_MAX_PYTHON_WORDS)
    );
    assert_eq!(s.flags, LIVE_SLOT_PYTHON_CUT);
    assert_eq!(s.frames[2], 1);
    assert_eq!(s.python_checks[LIVE_MAX_PYTHON_WORDS - 1], 100 + 32);
}

#[test]
fn concurrent_threads_leave_a_consistent_table() {
    let (h, set) = table(4096);
    let set = &set;
    let threads = 4u64;
    let per = 20_000u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                // Each thread keeps a window of 64 live pointers of its own.
                for k in 0..per {
                    let p = ((t << 32) | (k + 1)) << 4;
                    set.insert(p as usize, k as usize, k, &[t, k], false, PythonWords::NONE);
                    if k >= 64 {
                        set.remove((((t << 32) | (k - 63)) << 4) as usize);
                    }
                }
            });
        }
    });
    let want: BTreeSet<u64> = (0..threads)
        .flat_map(|t| (per - 63..=per).map(move |k| ((t << 32) | k) << 4))
        .collect();
    let got: BTreeSet<u64> = samples(h, set).into_iter().map(|s| s.0).collect();
    assert_eq!(got, want);
    assert_eq!(h.live.load(Ordering::Relaxed), threads * 64);
    assert_eq!(h.dropped.load(Ordering::Relaxed), 0);
    assert!(h.used.load(Ordering::Relaxed) <= threads * 64 + threads);
}

/// Index entries in use, by 4 KiB page of the index.
fn index_pages_in_use(set: &LiveSet) -> BTreeSet<usize> {
    let base = set.index.load(Ordering::Relaxed) as *const AtomicU64;
    let len = 1usize << set.index_bits.load(Ordering::Relaxed);
    (0..len)
        // SAFETY: the index mapping holds `len` entries.
        .filter(|&k| unsafe { (*base.add(k)).load(Ordering::Relaxed) } != 0)
        .map(|k| k * 8 / 4096)
        .collect()
}

#[test]
fn the_index_pages_in_use_follow_the_live_count() {
    // The default cap: an index of hundreds of pages.
    let (h, set) = table(MAX_SLOTS.min((64 << 20) / size_of::<Slot>()));
    assert!(1usize << set.index_bits.load(Ordering::Relaxed) >= 256 * 512);
    // A few samples fit in the first page of the index.
    let few: Vec<usize> = (1..=40).map(|k| k * 0x1_0000).collect();
    for &p in &few {
        set.insert(p, 1, 1, &[1], false, PythonWords::NONE);
    }
    assert_eq!(index_pages_in_use(&set), BTreeSet::from([0]));
    // 5000 samples: the levels they filled, about as many pages as they
    // need (8 bytes an entry), not one page each.
    let many: Vec<usize> = (1..=5000).map(|k| 0x100_0000 + k * 48).collect();
    for &p in &many {
        set.insert(p, 1, 1, &[2], false, PythonWords::NONE);
    }
    assert_eq!(h.live.load(Ordering::Relaxed), 5040);
    assert_eq!(h.dropped.load(Ordering::Relaxed), 0);
    let pages = index_pages_in_use(&set);
    assert!(
        pages.len() <= 32,
        "{} index pages for 5040 samples",
        pages.len()
    );
    // Every one is found again, whatever level it went to.
    for &p in few.iter().chain(&many) {
        set.remove(p);
    }
    assert_eq!(h.live.load(Ordering::Relaxed), 0);
    assert!(index_pages_in_use(&set).is_empty());
    assert!(samples(h, &set).is_empty());
}
