use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use profiler_common::hooks::{LIVE_MAX_PYTHON_WORDS, live_python_word};

use super::*;

fn pid() -> u32 {
    std::process::id()
}

fn empty_slot() -> LiveSlot {
    LiveSlot {
        generation: 0,
        ptr: 0,
        size: 0,
        weight: 0,
        time_ns: 0,
        depth: 0,
        flags: 0,
        link: 0,
        python_depth: 0,
        _reserved: 0,
        frames: [0; LIVE_MAX_FRAMES],
        python_checks: [0; LIVE_MAX_PYTHON_WORDS],
    }
}

fn header(slots: &[LiveSlot]) -> LiveHeapHeader {
    LiveHeapHeader {
        magic: LIVE_HEAP_MAGIC,
        version: LIVE_HEAP_VERSION,
        header_size: size_of::<LiveHeapHeader>() as u32,
        slot_size: size_of::<LiveSlot>() as u32,
        max_frames: LIVE_MAX_FRAMES as u32,
        capacity: slots.len() as u64,
        slots: slots.as_ptr() as u64,
        used: slots.len() as u64,
        generation: 0,
        live: 0,
        inserted: 7,
        dropped: 3,
        sample_bytes: 65536,
        start_ns: 0,
    }
}

#[test]
fn a_table_in_memory_reads_back_its_live_samples() {
    let mut slots = vec![empty_slot(); 4];
    slots[0] = LiveSlot {
        generation: 2,
        ptr: 0x1000,
        size: 100,
        weight: 65536,
        time_ns: monotonic_ns() - 2_000_000_000,
        depth: 3,
        flags: LIVE_SLOT_PYTHON_CUT,
        python_depth: 2,
        ..empty_slot()
    };
    let word = live_python_word(0x7700, 42);
    slots[0].frames[..5].copy_from_slice(&[10, 20, 30, word, 0]);
    slots[0].python_checks[0] = 0x1234;
    // Removed: generation even, ptr 0.
    slots[1].generation = 4;
    slots[2] = LiveSlot {
        generation: 6,
        ptr: 0x2000,
        size: 1 << 20,
        weight: 1 << 20,
        depth: 200,
        flags: LIVE_SLOT_TRUNCATED,
        ..empty_slot()
    };
    // A writer is inside slot 3 (odd generation) for the whole read.
    slots[3] = LiveSlot {
        generation: 1,
        ptr: 0x3000,
        ..empty_slot()
    };
    let h = header(&slots);
    let heap = read_at(pid(), std::ptr::from_ref(&h) as u64).unwrap();
    assert_eq!(heap.samples.len(), 2);
    let a = &heap.samples[0];
    assert_eq!((a.address, a.size, a.weight), (0x1000, 100, 65536));
    assert_eq!(a.stack, [10, 20, 30]);
    assert!(!a.truncated);
    let frame = PyFrameSlot {
        code: 0x7700,
        instr_offset: 42,
        check: 0x1234,
    };
    assert_eq!(a.python, [frame, PyFrameSlot::default()]);
    assert!(a.python_cut);
    assert!((2.0..60.0).contains(&a.age.as_secs_f64()), "{:?}", a.age);
    let b = &heap.samples[1];
    assert_eq!(b.stack.len(), LIVE_MAX_FRAMES);
    assert!(b.truncated);
    assert_eq!(heap.bytes(), 65536 + (1 << 20));
    assert_eq!((heap.torn, heap.inserted, heap.dropped), (1, 7, 3));
    assert_eq!(heap.sample_bytes, 65536);
}

#[test]
fn other_layouts_and_missing_tables_are_refused() {
    let slots = vec![empty_slot(); 1];
    let mut h = header(&slots);
    h.version = LIVE_HEAP_VERSION + 1;
    let e = read_at(pid(), std::ptr::from_ref(&h) as u64).unwrap_err();
    assert!(
        format!("{e:#}").contains("not this reader's version"),
        "{e:#}"
    );
    h = header(&slots);
    h.magic = 0;
    let e = read_at(pid(), std::ptr::from_ref(&h) as u64).unwrap_err();
    assert!(format!("{e:#}").contains("off"), "{e:#}");
    h = header(&slots);
    h.slots = 8; // unmapped
    assert!(read_at(pid(), std::ptr::from_ref(&h) as u64).is_err());
}

#[test]
fn a_busy_writer_never_yields_a_torn_sample() {
    let mut slots = vec![empty_slot(); 1];
    let h = header(&slots);
    let slot = slots.as_mut_ptr() as usize;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Every write makes all fields equal to k, under the protocol.
            let base = slot as *mut u64;
            // SAFETY: the slot outlives the scope; the words are only
            // touched through atomics while the reader copies them.
            let word = |i: usize| unsafe { AtomicU64::from_ptr(base.add(i)) };
            let words = size_of::<LiveSlot>() / 8;
            let mut k = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let g = word(0).load(Ordering::Relaxed);
                word(0).store(g + 1, Ordering::Relaxed);
                std::sync::atomic::fence(Ordering::Release);
                for i in 1..words {
                    // depth and flags share word 5: depth = 1, flags = 0.
                    let v = if i == 5 { 1 } else { k };
                    word(i).store(v, Ordering::Relaxed);
                }
                word(0).store(g + 2, Ordering::Release);
                k += 1;
                // A slot settles between writes (as a sample does between
                // its allocation and its free); writes still land inside
                // many of the reader's copies.
                for _ in 0..2000 {
                    std::hint::spin_loop();
                }
            }
        });
        let mut seen = 0;
        for _ in 0..2000 {
            let heap = read_at(pid(), std::ptr::from_ref(&h) as u64).unwrap();
            for s in &heap.samples {
                assert_eq!((s.size, s.weight), (s.address, s.address));
                assert_eq!(s.stack, [s.address]);
                seen += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(seen > 0, "the reader never saw a settled slot");
    });
}
