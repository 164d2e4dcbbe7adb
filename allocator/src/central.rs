//! The middle tier, per size class: a transfer cache of whole batches in
//! front of a central free list of spans.
//!
//! Locks: each class has a transfer lock and a central lock (never both at
//! once; the central lock may be held while taking the page heap lock).
//! Threads move objects in and out as null-terminated chains linked
//! through each object's first word.
//!
//! Transfer cache: up to `transfer_slots(c)` chains of exactly `BATCH[c]`
//! objects; a thread that overflows hands over a chain in O(1), and a thread
//! that runs dry takes one back in O(1), without touching spans.
//!
//! Central list: the spans of the class that still have free objects. An
//! object goes back to its own span (found through the page map); a span
//! whose objects are all back returns to the page heap.
use core::ptr;

use crate::{
    counters,
    lock::SpinLock,
    page_heap, pagemap,
    size_class::{self, BATCH, NUM_CLASSES, PAGE_SHIFT, PAGES},
    span::{Span, SpanList},
};

const MAX_SLOTS: usize = 64;

#[repr(C, align(64))]
struct Class {
    transfer_lock: SpinLock,
    slots: [*mut u8; MAX_SLOTS],
    used: usize,
    capacity: usize,
    central_lock: SpinLock,
    nonempty: SpanList,
}

struct Classes([core::cell::UnsafeCell<Class>; NUM_CLASSES]);
// SAFETY: each Class's fields are only touched under its own locks.
unsafe impl Sync for Classes {}

static CLASSES: Classes = Classes(
    [const {
        core::cell::UnsafeCell::new(Class {
            transfer_lock: SpinLock::new(),
            slots: [ptr::null_mut(); MAX_SLOTS],
            used: 0,
            capacity: 0,
            central_lock: SpinLock::new(),
            nonempty: SpanList::new(),
        })
    }; NUM_CLASSES],
);

fn class(c: usize) -> *mut Class {
    CLASSES.0[c].get()
}

/// Takes a chain of up to `want` objects of class `c`. Returns (head, n);
/// n == 0 means out of memory.
pub fn remove_range(c: usize, want: usize) -> (*mut u8, usize) {
    let k = class(c);
    if want == BATCH[c] as usize {
        // SAFETY: the transfer fields are touched only under transfer_lock.
        unsafe {
            (*k).transfer_lock.lock();
            if (*k).used > 0 {
                (*k).used -= 1;
                let head = (*k).slots[(*k).used];
                (*k).transfer_lock.unlock();
                counters::TRANSFER_OBJECTS[c].sub(want);
                return (head, want);
            }
            (*k).transfer_lock.unlock();
        }
    }
    // SAFETY: central fields are touched only under central_lock.
    unsafe {
        (*k).central_lock.lock();
        let r = fetch_locked(c, k, want);
        (*k).central_lock.unlock();
        r
    }
}

/// Gives back a chain of `n` objects of class `c`.
///
/// # Safety
/// Every object in the chain is a free object of class `c`.
pub unsafe fn insert_range(c: usize, head: *mut u8, n: usize) {
    let k = class(c);
    if n == BATCH[c] as usize {
        // SAFETY: transfer fields only under transfer_lock.
        unsafe {
            (*k).transfer_lock.lock();
            if (*k).capacity == 0 {
                (*k).capacity = size_class::transfer_slots(c);
            }
            if (*k).used < (*k).capacity {
                (*k).slots[(*k).used] = head;
                (*k).used += 1;
                (*k).transfer_lock.unlock();
                counters::TRANSFER_OBJECTS[c].add(n);
                return;
            }
            (*k).transfer_lock.unlock();
        }
    }
    // SAFETY: central fields only under central_lock; objects are ours.
    unsafe {
        (*k).central_lock.lock();
        let mut p = head;
        while !p.is_null() {
            let next = *(p as *mut *mut u8);
            release_locked(c, k, p);
            p = next;
        }
        (*k).central_lock.unlock();
    }
}

/// # Safety
/// central_lock of `k` held.
unsafe fn fetch_locked(c: usize, k: *mut Class, want: usize) -> (*mut u8, usize) {
    let size = size_class::size_of_class(c);
    let mut head: *mut u8 = ptr::null_mut();
    let mut n = 0;
    // SAFETY: central lock held; spans on the nonempty list are ours.
    unsafe {
        while n < want {
            let mut s = (*k).nonempty.head;
            if s.is_null() {
                s = page_heap::allocate(PAGES[c] as usize, c as u8, 1);
                if s.is_null() {
                    break;
                }
                (*s).bump = (*s).start_addr();
                (*s).limit = (*s).bump + size_class::objects_per_span(c) * size;
                (*k).nonempty.push(s);
            }
            while n < want {
                let obj = if !(*s).freelist.is_null() {
                    let o = (*s).freelist;
                    (*s).freelist = *(o as *mut *mut u8);
                    o
                } else if (*s).bump < (*s).limit {
                    let o = (*s).bump as *mut u8;
                    (*s).bump += size;
                    o
                } else {
                    break;
                };
                *(obj as *mut *mut u8) = head;
                head = obj;
                n += 1;
                (*s).allocated += 1;
            }
            if (*s).freelist.is_null() && (*s).bump >= (*s).limit {
                (*k).nonempty.remove(s);
            }
        }
    }
    counters::OUTSTANDING[c].add(n);
    (head, n)
}

/// # Safety
/// central_lock of `k` held; `p` is a free object of class `c`.
unsafe fn release_locked(c: usize, k: *mut Class, p: *mut u8) {
    // SAFETY: the page map names p's live span (p is an object of ours).
    unsafe {
        let s: *mut Span = pagemap::span(p as usize >> PAGE_SHIFT);
        let was_full = (*s).freelist.is_null() && (*s).bump >= (*s).limit;
        *(p as *mut *mut u8) = (*s).freelist;
        (*s).freelist = p;
        (*s).allocated -= 1;
        counters::OUTSTANDING[c].sub(1);
        if (*s).allocated == 0 {
            if !was_full {
                (*k).nonempty.remove(s);
            }
            page_heap::deallocate(s);
        } else if was_full {
            (*k).nonempty.push(s);
        }
    }
}

/// Moves every batch in the transfer caches to the central lists (and so
/// empty spans to the page heap): part of malloc_trim.
pub fn drain_transfer_caches() {
    #[expect(
        clippy::needless_range_loop,
        reason = "c names the class in several tables"
    )]
    for c in 1..NUM_CLASSES {
        let k = class(c);
        loop {
            // SAFETY: transfer fields only under transfer_lock.
            let head = unsafe {
                (*k).transfer_lock.lock();
                let h = if (*k).used > 0 {
                    (*k).used -= 1;
                    (*k).slots[(*k).used]
                } else {
                    ptr::null_mut()
                };
                (*k).transfer_lock.unlock();
                h
            };
            if head.is_null() {
                break;
            }
            let n = BATCH[c] as usize;
            counters::TRANSFER_OBJECTS[c].sub(n);
            // SAFETY: central fields only under central_lock; the chain
            // holds free objects of class c.
            unsafe {
                (*k).central_lock.lock();
                let mut p = head;
                while !p.is_null() {
                    let next = *(p as *mut *mut u8);
                    release_locked(c, k, p);
                    p = next;
                }
                (*k).central_lock.unlock();
            }
        }
    }
}

/// Takes every lock of this tier (before fork).
pub fn lock_all() {
    for c in 1..NUM_CLASSES {
        // SAFETY: only the lock fields are touched.
        unsafe {
            (*class(c)).transfer_lock.lock();
            (*class(c)).central_lock.lock();
        }
    }
}

/// Releases every lock of this tier (after fork, in the parent).
pub fn unlock_all() {
    for c in 1..NUM_CLASSES {
        // SAFETY: only the lock fields are touched.
        unsafe {
            (*class(c)).central_lock.unlock();
            (*class(c)).transfer_lock.unlock();
        }
    }
}

/// Resets every lock of this tier (after fork, in the child).
pub fn reset_all() {
    for c in 1..NUM_CLASSES {
        // SAFETY: only the lock fields are touched.
        unsafe {
            (*class(c)).central_lock.reset();
            (*class(c)).transfer_lock.reset();
        }
    }
}
