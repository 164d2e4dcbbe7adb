use core::cell::{Cell, RefCell};

use super::*;
use crate::{
    os::{Os, System},
    size_class::PAGE_SIZE,
};

/// Spans in mappings of their own, found by address; counts what it
/// hands out and takes back.
#[derive(Default)]
struct FakePages {
    #[expect(
        clippy::vec_box,
        reason = "span records must not move: the central list links them"
    )]
    spans: RefCell<Vec<Box<Span>>>,
    allocated: Cell<usize>,
    freed: Cell<usize>,
    fail: Cell<bool>,
}

impl PageSource for FakePages {
    fn allocate_span(&self, npages: usize, c: u8) -> *mut Span {
        if self.fail.get() {
            return ptr::null_mut();
        }
        let p = System.map_aligned(npages * PAGE_SIZE, PAGE_SIZE);
        assert!(!p.is_null());
        let mut s = Box::new(Span::zeroed());
        s.start = p as usize >> PAGE_SHIFT;
        s.npages = npages;
        s.class = c;
        let ptr: *mut Span = &mut *s;
        self.spans.borrow_mut().push(s);
        self.allocated.set(self.allocated.get() + 1);
        ptr
    }

    unsafe fn free_span(&self, s: *mut Span) {
        let mut spans = self.spans.borrow_mut();
        let i = spans
            .iter()
            .position(|b| ptr::eq(&**b, s))
            .expect("a span of ours");
        let b = spans.swap_remove(i);
        assert_eq!(b.allocated, 0, "freed with objects in use");
        // SAFETY: the span's pages are ours and unused.
        unsafe { System.unmap(b.start_addr() as *mut u8, b.npages * PAGE_SIZE) };
        self.freed.set(self.freed.get() + 1);
    }

    fn span_of(&self, p: *mut u8) -> *mut Span {
        let a = p as usize;
        let spans = self.spans.borrow();
        let s = spans
            .iter()
            .find(|s| s.start_addr() <= a && a < s.start_addr() + s.npages * PAGE_SIZE)
            .expect("an object of ours");
        ptr::from_ref::<Span>(s).cast_mut()
    }
}

/// The class of 1 KiB objects: one-page spans of 8 objects, batches of
/// 16 (two spans), 32 batches in the transfer cache at most.
fn class_1k() -> usize {
    let c = size_class::class_of(1024);
    assert_eq!(size_class::size_of_class(c), 1024);
    assert_eq!(size_class::objects_per_span(c), 8);
    assert_eq!(BATCH[c], 16);
    assert_eq!(size_class::transfer_slots(c), 32);
    c
}

fn chain(head: *mut u8) -> Vec<*mut u8> {
    let mut v = Vec::new();
    let mut p = head;
    while !p.is_null() {
        v.push(p);
        // SAFETY: a chain of free objects linked through their first word.
        p = unsafe { *p.cast::<*mut u8>() };
    }
    v
}

#[test]
fn spans_are_carved_lazily_and_go_back_when_empty() {
    let (c, pages, k) = (class_1k(), FakePages::default(), Class::new());
    let (a, n) = k.remove_range(&pages, c, 5);
    assert_eq!((n, pages.allocated.get()), (5, 1));
    // The next five: the first span's last three, then a new span.
    let (b, m) = k.remove_range(&pages, c, 5);
    assert_eq!((m, pages.allocated.get()), (5, 2));
    let mut objs = chain(a);
    objs.extend(chain(b));
    assert_eq!(objs.len(), 10);
    objs.sort();
    objs.dedup();
    assert_eq!(objs.len(), 10, "an object handed out twice");
    assert!(objs.iter().all(|&p| (p as usize).is_multiple_of(1024)));
    // Objects go back one at a time (not a whole batch): each to its
    // span, and the empty spans to the page source.
    // SAFETY: the chains hold free objects of class c.
    unsafe {
        k.insert_range(&pages, c, a, 5);
        assert_eq!(pages.freed.get(), 0, "the first span still has 3 out");
        k.insert_range(&pages, c, b, 5);
    }
    assert_eq!(pages.freed.get(), 2);
}

/// A fresh span's objects come out lowest first, each the next one up, so
/// that a run of allocations walks up through memory (as a garbage
/// collector later visits them).
#[test]
fn a_carved_batch_comes_out_in_address_order() {
    let (c, pages, k) = (class_1k(), FakePages::default(), Class::new());
    let (a, n) = k.remove_range(&pages, c, 5);
    assert_eq!(n, 5);
    let objs: Vec<usize> = chain(a).iter().map(|&p| p as usize).collect();
    let start = objs[0];
    assert!(
        start.is_multiple_of(PAGE_SIZE),
        "not the span's first object"
    );
    assert_eq!(objs, (0..5).map(|i| start + i * 1024).collect::<Vec<_>>());
    // SAFETY: the chain holds free objects of class c.
    unsafe { k.insert_range(&pages, c, a, 5) };
    assert_eq!(pages.freed.get(), 1);
}

#[test]
fn a_big_object_goes_back_to_its_span_and_its_pages_at_once() {
    // One object per span and per batch: with no transfer cache, its
    // free returns the span to the page source.
    let c = size_class::class_of(64 << 10);
    assert_eq!(size_class::objects_per_span(c), 1);
    assert_eq!(BATCH[c], 1);
    let (pages, k) = (FakePages::default(), Class::new());
    for round in 1..=3 {
        let (a, n) = k.remove_range(&pages, c, 1);
        assert_eq!((n, pages.allocated.get()), (1, round));
        // SAFETY: a chain of one free object of class c.
        unsafe { k.insert_range(&pages, c, a, 1) };
        assert_eq!(pages.freed.get(), round, "the span went back");
    }
}

#[test]
fn freed_objects_are_handed_out_again_before_new_spans() {
    let (c, pages, k) = (class_1k(), FakePages::default(), Class::new());
    let (a, _) = k.remove_range(&pages, c, 3);
    let first = chain(a);
    // SAFETY: one free object of class c, alone on its chain.
    unsafe {
        *first[0].cast::<*mut u8>() = ptr::null_mut();
        k.insert_range(&pages, c, first[0], 1);
    }
    let (again, n) = k.remove_range(&pages, c, 1);
    assert_eq!((again, n), (first[0], 1));
    assert_eq!(pages.allocated.get(), 1);
}

#[test]
fn whole_batches_move_through_a_transfer_cache_grown_by_demand() {
    let (c, pages, k) = (class_1k(), FakePages::default(), Class::new());
    let take = || {
        let (head, n) = k.remove_range(&pages, c, 16);
        assert_eq!(n, 16);
        head
    };
    // 17 batches of 16: 34 one-page spans, carved in order, so each
    // batch is exactly two whole spans. The first found the transfer
    // cache empty: demand.
    let batches: Vec<_> = (0..17).map(|_| take()).collect();
    assert_eq!(pages.allocated.get(), 34);
    // SAFETY: each chain holds 16 free objects of class c.
    unsafe {
        for &b in &batches {
            k.insert_range(&pages, c, b, 16);
        }
    }
    // Two fit at first, the cache doubled after that demand and took
    // two more; the other 13 went back to their 26 spans, which went
    // back to the page source.
    assert_eq!(k.capacity(c), 2 * INITIAL_SLOTS);
    assert_eq!(pages.freed.get(), 26);
    // A batch comes back out of the transfer cache as it went in.
    let head = take();
    assert_eq!(head, batches[3]);
    // SAFETY: as above.
    unsafe { k.insert_range(&pages, c, head, 16) };
    // Four batches out of the transfer cache and a fifth carved
    // (demand again): all five fit back, the cache doubled again.
    let five: Vec<_> = (0..5).map(|_| take()).collect();
    assert_eq!(pages.allocated.get(), 36);
    // SAFETY: as above.
    unsafe {
        for &b in &five {
            k.insert_range(&pages, c, b, 16);
        }
    }
    assert_eq!(k.capacity(c), 4 * INITIAL_SLOTS);
    assert_eq!(pages.freed.get(), 26);
    // Draining gives every span back.
    k.drain_transfer(&pages, c);
    assert_eq!(pages.freed.get(), 36);
    assert!(pages.spans.borrow().is_empty());
}

#[test]
fn out_of_pages_hands_out_what_there_is() {
    let (c, pages, k) = (class_1k(), FakePages::default(), Class::new());
    let (a, n) = k.remove_range(&pages, c, 6);
    assert_eq!(n, 6);
    pages.fail.set(true);
    let (b, m) = k.remove_range(&pages, c, 5);
    assert_eq!((m, chain(b).len()), (2, 2), "the span's last two");
    let (none, zero) = k.remove_range(&pages, c, 1);
    assert_eq!((none, zero), (ptr::null_mut(), 0));
    // SAFETY: the chains hold free objects of class c.
    unsafe {
        k.insert_range(&pages, c, a, 6);
        k.insert_range(&pages, c, b, 2);
    }
    assert_eq!(pages.freed.get(), 1);
}
