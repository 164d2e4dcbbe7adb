use core::cell::{Cell, RefCell};

use super::*;

/// A middle tier over a pool of test objects that records every call.
struct FakeMiddle {
    pool: RefCell<Vec<*mut u8>>,
    /// `want` of each remove_range call.
    removes: RefCell<Vec<usize>>,
    /// `n` of each insert_range call (checked against the chain).
    inserts: RefCell<Vec<usize>>,
    out: Cell<usize>,
}

impl FakeMiddle {
    fn with(objects: usize) -> Self {
        let pool = (0..objects)
            .map(|_| Box::into_raw(Box::new([0u64; 2])).cast::<u8>())
            .collect();
        Self {
            pool: RefCell::new(pool),
            removes: RefCell::default(),
            inserts: RefCell::default(),
            out: Cell::new(0),
        }
    }
}

impl MiddleTier for FakeMiddle {
    fn remove_range(&self, _c: usize, want: usize) -> (*mut u8, usize) {
        self.removes.borrow_mut().push(want);
        let mut head = ptr::null_mut();
        let mut n = 0;
        while n < want {
            let Some(p) = self.pool.borrow_mut().pop() else {
                break;
            };
            // SAFETY: a pool object of 16 bytes.
            unsafe { *p.cast::<*mut u8>() = head };
            head = p;
            n += 1;
        }
        self.out.set(self.out.get() + n);
        (head, n)
    }

    unsafe fn insert_range(&self, _c: usize, head: *mut u8, n: usize) {
        let mut p = head;
        let mut seen = 0;
        while !p.is_null() {
            self.pool.borrow_mut().push(p);
            // SAFETY: the caller's chain of free objects.
            p = unsafe { *p.cast::<*mut u8>() };
            seen += 1;
        }
        assert_eq!(seen, n, "the chain's length differs from n");
        self.inserts.borrow_mut().push(n);
        self.out.set(self.out.get() - n);
    }
}

fn empty_list() -> FreeList {
    FreeList {
        head: ptr::null_mut(),
        len: AtomicU32::new(0),
        max_len: 0,
    }
}

/// The class of 1 KiB objects: batches of 16, lists of at most 64.
fn class_1k() -> usize {
    let c = size_class::class_of(1024);
    assert_eq!(BATCH[c], 16);
    assert_eq!(size_class::max_cached(c), 64);
    c
}

#[test]
fn refills_start_slow_and_grow_to_a_batch() {
    let (c, m, mut list) = (class_1k(), FakeMiddle::with(1000), empty_list());
    let mut got = Vec::new();
    while m.removes.borrow().len() < 20 {
        // SAFETY: the list is ours, of class c.
        let p = unsafe { list.pop_or_refill(&m, c, &mut |_, w| w) };
        assert!(!p.is_null());
        got.push(p);
    }
    // One more object per refill until a batch, then a batch each time
    // while the limit grows by a batch to its maximum.
    let expected: Vec<usize> = (1..=16).chain([16; 4]).collect();
    assert_eq!(*m.removes.borrow(), expected);
    assert_eq!(list.max_len, 64);
    // Every object taken is either in the program's hands or the list.
    let len = list.len.load(Ordering::Relaxed) as usize;
    assert_eq!(m.out.get(), got.len() + len);
    got.sort();
    got.dedup();
    assert_eq!(got.len() + len, m.out.get(), "an object handed out twice");
}

#[test]
fn frees_past_the_limit_give_a_batch_back() {
    let (c, m, mut list) = (class_1k(), FakeMiddle::with(100), empty_list());
    let (head, n) = m.remove_range(c, 40);
    assert_eq!(n, 40);
    let mut objs = Vec::new();
    let mut p = head;
    while !p.is_null() {
        objs.push(p);
        // SAFETY: the fake's chain.
        p = unsafe { *p.cast::<*mut u8>() };
    }
    // The limit follows the length up to a batch (16): nothing goes
    // back until the 17th free, which gives back the 16 most recent.
    for (i, &o) in objs.iter().enumerate().take(17) {
        // SAFETY: o is a free object of class c, not on the list.
        unsafe { list.push_or_release(&m, c, o, &mut |_, w| w) };
        let expected_inserts = if i < 16 { 0 } else { 1 };
        assert_eq!(m.inserts.borrow().len(), expected_inserts, "free {i}");
    }
    assert_eq!(*m.inserts.borrow(), [16]);
    assert_eq!(list.len.load(Ordering::Relaxed), 1);
    assert_eq!(list.head, objs[0]);
    // SAFETY: the list is ours, of class c.
    unsafe { list.flush(&m, c) };
    assert_eq!(*m.inserts.borrow(), [16, 1]);
    assert!(list.head.is_null());
    assert_eq!(list.len.load(Ordering::Relaxed), 0);
    assert_eq!(m.out.get(), 40 - 17);
}

#[test]
fn a_refused_growth_keeps_the_limit_and_shrinking_gives_the_excess_back() {
    let (c, m, mut list) = (class_1k(), FakeMiddle::with(100), empty_list());
    let (head, n) = m.remove_range(c, 12);
    assert_eq!(n, 12);
    let mut p = head;
    while !p.is_null() {
        // SAFETY: the fake's chain; each object is pushed once.
        unsafe {
            let next = *p.cast::<*mut u8>();
            list.push_or_release(&m, c, p, &mut |old, w| if old < 10 { w } else { old });
            p = next;
        }
    }
    // The limit stopped at 10: the 11th free gave the 11 objects back,
    // the 12th stays.
    assert_eq!(list.max_len, 10);
    assert_eq!(*m.inserts.borrow(), [11]);
    assert_eq!(list.len.load(Ordering::Relaxed), 1);
    // SAFETY: the list is ours, of class c.
    unsafe { list.pop_or_refill(&m, c, &mut |_, w| w) };
    // SAFETY: as above.
    unsafe { list.pop_or_refill(&m, c, &mut |_, w| w) };
    let len = list.len.load(Ordering::Relaxed);
    assert_eq!(len, list.max_len.min(16) - 1);
    // SAFETY: as above.
    unsafe { list.shrink(&m, c, 3) };
    assert_eq!(list.max_len, 3);
    assert_eq!(list.len.load(Ordering::Relaxed), 3);
    assert_eq!(*m.inserts.borrow(), [11, len as usize - 3]);
}

#[test]
fn an_empty_middle_tier_gives_null_and_an_empty_list() {
    let (c, m, mut list) = (class_1k(), FakeMiddle::with(0), empty_list());
    // SAFETY: the list is ours, of class c.
    let p = unsafe { list.pop_or_refill(&m, c, &mut |_, w| w) };
    assert!(p.is_null());
    assert!(list.head.is_null());
    assert_eq!(list.len.load(Ordering::Relaxed), 0);
    assert_eq!(*m.removes.borrow(), [1]);
}
