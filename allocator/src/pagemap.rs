//! The page map: a two-level radix tree from page number to span, and to
//! the size class of small-object pages (as its slot, `class <<
//! SLOT_SHIFT`), so that free() and
//! malloc_usable_size() find an object's span in O(1).
//!
//! Layout: 48-bit user addresses, 8 KiB pages, so 35 bits of page number:
//! an 18-bit root (a static array, only touched entries cost memory) and
//! 17-bit leaves, each mapped on first use and never freed.
//!
//! Invariants (the PAGEMAP section of tcmalloc): a span entry is non-null
//! exactly for (a) every page of a small-object span in use, (b) the first
//! and last page of a large span in use or of a free span in the page heap,
//! (c) the first page of a huge mapping. The class slot is non-zero exactly
//! for the pages of small-object spans in use.
//!
//! Locking: reads take no lock. Entries are written under the page heap
//! lock, except huge mappings' entries, which only their owner writes.
//! Owner: the page heap and the huge objects write it; the free paths, the
//! central lists and the heap checker read it.
//! Leaves are installed with a compare-and-swap, so a reader sees either
//! null or a complete (zeroed) leaf.
use core::{
    ptr,
    sync::atomic::{AtomicPtr, AtomicU16, Ordering},
};

use crate::{
    os,
    size_class::{PAGE_SHIFT, SLOT_SHIFT},
    span::Span,
};

const LEAF_BITS: usize = 17;
const ROOT_BITS: usize = 48 - PAGE_SHIFT - LEAF_BITS;
const LEAF_LEN: usize = 1 << LEAF_BITS;
const ROOT_LEN: usize = 1 << ROOT_BITS;

pub struct Leaf {
    spans: [AtomicPtr<Span>; LEAF_LEN],
    /// The class's slot (`class << SLOT_SHIFT`), what the free fast path
    /// indexes the thread cache with.
    slots: [AtomicU16; LEAF_LEN],
}

static ROOT: [AtomicPtr<Leaf>; ROOT_LEN] = [const { AtomicPtr::new(ptr::null_mut()) }; ROOT_LEN];

#[inline(always)]
fn leaf(page: usize) -> *mut Leaf {
    let i = page >> LEAF_BITS;
    if i >= ROOT_LEN {
        return ptr::null_mut();
    }
    // SAFETY: i < ROOT_LEN was checked.
    unsafe { ROOT.get_unchecked(i) }.load(Ordering::Acquire)
}

/// The slot (`class << SLOT_SHIFT`) of the page holding `addr`, 0 when it
/// is not a small-object page (or not ours). The free() fast path.
#[inline(always)]
pub fn slot_of_addr(addr: usize) -> usize {
    let page = addr >> PAGE_SHIFT;
    let mut i = page >> LEAF_BITS;
    // Opaque to the optimiser, so that the range check compares the root
    // index it has anyway (shift, compare) instead of shifting the
    // address a second time (`addr >> 48 != 0`: one more instruction).
    #[cfg(target_arch = "x86_64")]
    // SAFETY: an empty instruction sequence.
    unsafe {
        core::arch::asm!("/* {i} */", i = inout(reg) i, options(pure, nomem, nostack, preserves_flags));
    }
    if i >= ROOT_LEN {
        return 0;
    }
    // SAFETY: i < ROOT_LEN was checked.
    let l = unsafe { ROOT.get_unchecked(i) }.load(Ordering::Acquire);
    if l.is_null() {
        return 0;
    }
    let j = page & (LEAF_LEN - 1);
    // A relaxed load of the slot, widened to a full register by the load
    // itself (`movzx`): the compiler widens an atomic u16 load with a
    // second instruction.
    #[cfg(target_arch = "x86_64")]
    {
        let slot: usize;
        // SAFETY: a non-null leaf is a live, fully initialised Leaf and
        // j < LEAF_LEN; an aligned 2-byte load is atomic on x86-64.
        unsafe {
            core::arch::asm!(
                "movzx {s:e}, word ptr [{l} + {j} * 2 + {slots}]",
                s = lateout(reg) slot,
                l = in(reg) l,
                j = in(reg) j,
                slots = const core::mem::offset_of!(Leaf, slots),
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        slot
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: a non-null leaf is a live, fully initialised Leaf.
    unsafe {
        (*l).slots.get_unchecked(j).load(Ordering::Relaxed) as usize
    }
}

/// The size class of the page holding `addr`, 0 when it is not a
/// small-object page (or not ours).
#[inline(always)]
pub fn class_of_addr(addr: usize) -> usize {
    slot_of_addr(addr) >> SLOT_SHIFT
}

/// The span registered for `page`, or null.
#[inline]
pub fn span(page: usize) -> *mut Span {
    let l = leaf(page);
    if l.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: a non-null leaf is a live Leaf; the index is masked.
    unsafe { (*l).spans.get_unchecked(page & (LEAF_LEN - 1)) }.load(Ordering::Acquire)
}

/// Makes sure the leaf for `page` exists. False when out of memory or the
/// page lies outside the 48-bit space.
pub fn ensure(page: usize) -> bool {
    let i = page >> LEAF_BITS;
    if i >= ROOT_LEN {
        return false;
    }
    if !ROOT[i].load(Ordering::Acquire).is_null() {
        return true;
    }
    let size = core::mem::size_of::<Leaf>();
    let fresh = os::map(size).cast::<Leaf>();
    if fresh.is_null() {
        return false;
    }
    crate::counters::METADATA.add(size);
    if ROOT[i]
        .compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another thread installed one first.
        // SAFETY: `fresh` was never published.
        unsafe { os::unmap(fresh.cast(), size) };
        crate::counters::METADATA.sub(size);
    }
    true
}

/// Sets the span entry of `page` (whose leaf must exist, see [`ensure`]).
#[inline]
pub fn set_span(page: usize, s: *mut Span) {
    let l = leaf(page);
    debug_assert!(!l.is_null());
    // SAFETY: callers ensured the leaf; the index is masked.
    unsafe { (*l).spans.get_unchecked(page & (LEAF_LEN - 1)) }.store(s, Ordering::Release);
}

/// Sets the class (slot) of `page` (whose leaf must exist).
#[inline]
pub fn set_class(page: usize, class: u8) {
    let l = leaf(page);
    debug_assert!(!l.is_null());
    // SAFETY: callers ensured the leaf; the index is masked.
    unsafe { (*l).slots.get_unchecked(page & (LEAF_LEN - 1)) }
        .store(u16::from(class) << SLOT_SHIFT, Ordering::Relaxed);
}

/// Ensures the leaves for pages `first..first+n`.
pub fn ensure_range(first: usize, n: usize) -> bool {
    let mut leaf_start = first >> LEAF_BITS;
    let last = (first + n - 1) >> LEAF_BITS;
    while leaf_start <= last {
        if !ensure(leaf_start << LEAF_BITS) {
            return false;
        }
        leaf_start += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_foreign_pages_are_empty() {
        let page = 0x0007_abc1_2345_usize;
        assert!(ensure(page));
        let s = 0x1000 as *mut Span;
        set_span(page, s);
        set_class(page, 7);
        assert_eq!(span(page), s);
        assert_eq!(class_of_addr(page << PAGE_SHIFT), 7);
        assert_eq!(class_of_addr((page << PAGE_SHIFT) + 8191), 7);
        set_span(page, ptr::null_mut());
        set_class(page, 0);
        assert_eq!(class_of_addr(page << PAGE_SHIFT), 0);
        // Beyond 48 bits and never-touched leaves read as "not ours".
        assert_eq!(class_of_addr(usize::MAX - 5), 0);
        assert!(span(usize::MAX >> PAGE_SHIFT).is_null());
        assert!(span(3).is_null());
    }
}
