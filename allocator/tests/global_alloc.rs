//! profalloc as the `#[global_allocator]` of a multi-threaded Rust program:
//! collections churned on several threads, values moved to (and freed by)
//! other threads, over-aligned layouts, zeroed and grown allocations, and
//! the statistics seeing the live set.
use std::{
    alloc::{GlobalAlloc, Layout},
    collections::{BTreeMap, HashMap},
    sync::mpsc,
    thread,
};

use profalloc::ProfAlloc;

#[global_allocator]
static GLOBAL: ProfAlloc = ProfAlloc;

#[test]
fn threads_churn_collections_and_free_each_others_data() {
    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    let producers: Vec<_> = (0..4u64)
        .map(|t| {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut map = HashMap::new();
                let mut tree = BTreeMap::new();
                for i in 0..200_000u64 {
                    let key = (i * 7919 + t) % 10_000;
                    map.insert(key, format!("{t}-{i}"));
                    tree.entry(key % 100).or_insert_with(Vec::new).push(i);
                    if i % 3 == 0 {
                        map.remove(&((i * 31) % 10_000));
                    }
                    if i % 1000 == 0 {
                        // Sent to the consumer, which frees it.
                        tx.send((0..(i % 5000)).map(|x| x ^ t).collect()).unwrap();
                    }
                }
                for (k, v) in &map {
                    let (tt, _) = v.split_once('-').unwrap();
                    assert_eq!(tt.parse::<u64>().unwrap(), t, "key {k}");
                }
                tree.values().map(Vec::len).sum::<usize>()
            })
        })
        .collect();
    drop(tx);
    let consumer = thread::spawn(move || {
        let mut n = 0;
        for v in rx {
            for (x, &y) in v.iter().enumerate() {
                assert_eq!(y ^ (y & 3), (x as u64) ^ (x as u64 & 3));
            }
            n += 1;
        }
        n
    });
    for p in producers {
        assert_eq!(p.join().unwrap(), 200_000);
    }
    assert_eq!(consumer.join().unwrap(), 4 * 200);
}

#[test]
fn over_aligned_and_zeroed_layouts() {
    for align in [32usize, 64, 4096, 8192, 1 << 16, 1 << 21] {
        for size in [1usize, 8, 100, 4096, 70_000, 3 << 20] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size; freed with the same layout.
            unsafe {
                let p = GLOBAL.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "align {align} size {size}");
                assert!((0..size).all(|i| *p.add(i) == 0));
                p.write_bytes(0x5a, size);
                let q = GLOBAL.realloc(p, layout, size * 2 + 1);
                assert_eq!(q as usize % align, 0);
                assert!((0..size).all(|i| *q.add(i) == 0x5a));
                GLOBAL.dealloc(q, Layout::from_size_align(size * 2 + 1, align).unwrap());
            }
        }
    }
}

#[test]
fn strings_grow_and_shrink() {
    let mut s = String::new();
    for i in 0..100_000 {
        s.push_str(&i.to_string());
    }
    let len = s.len();
    s.truncate(10);
    s.shrink_to_fit();
    assert_eq!(&s, "0123456789");
    assert!(len > 400_000);
    let big: Vec<u8> = vec![7; 50 << 20];
    assert!(big.iter().all(|&b| b == 7));
}
