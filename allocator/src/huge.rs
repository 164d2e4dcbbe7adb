//! Huge objects: each in its own mapping, with its span record in the
//! mapping's first system page, so that it needs no lock at all: not for
//! allocating, freeing, or growing in place with mremap. This is also the
//! path of re-entrant allocations (a signal handler interrupting a slow
//! path on its own thread), which must not take the locks that thread may
//! hold.
//!
//! Lock: none (the page map entry of the object's first page is written
//! only by the object's owner). Owner: the thread that holds the object.
//! The OS calls go through [`Os`], so that tests can count them.
use core::ptr;

use crate::{
    counters,
    os::{self, Os, System},
    pagemap,
    size_class::PAGE_SHIFT,
    span::{self, Span},
};

/// Bytes before the object: the header page.
pub(crate) const HEADER: usize = 4096;
const SYS_PAGE: usize = 4096;

#[unsafe(link_section = ".text.hot.profalloc")]
fn mapping_len(size: usize) -> Option<usize> {
    size.checked_add(HEADER + SYS_PAGE - 1)
        .map(|n| n & !(SYS_PAGE - 1))
}

/// Maps a huge object of `size` bytes aligned to `align` (a power of two);
/// null when out of memory.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn alloc(size: usize, align: usize, sampled: bool) -> *mut u8 {
    alloc_in(&System, size, align, sampled)
}

/// [`alloc`] through `os`.
#[unsafe(link_section = ".text.hot.profalloc")]
fn alloc_in<O: Os>(os: &O, size: usize, align: usize, sampled: bool) -> *mut u8 {
    let Some(len) = mapping_len(size) else {
        return ptr::null_mut();
    };
    let (hdr, user) = if align <= SYS_PAGE {
        let base = os.map(len);
        if base.is_null() {
            return base;
        }
        (base as usize, base as usize + HEADER)
    } else {
        let Some(total) = len.checked_add(align) else {
            return ptr::null_mut();
        };
        let base = os.map(total);
        if base.is_null() {
            return base;
        }
        let base = base as usize;
        let user = (base + HEADER + align - 1) & !(align - 1);
        let hdr = user - HEADER;
        // SAFETY: both ranges are unused parts of the mapping just made.
        unsafe {
            if hdr > base {
                os.unmap(base as *mut u8, hdr - base);
            }
            if base + total > hdr + len {
                os.unmap((hdr + len) as *mut u8, base + total - (hdr + len));
            }
        }
        (hdr, user)
    };
    if !pagemap::ensure(user >> PAGE_SHIFT) {
        // SAFETY: the mapping is unused.
        unsafe { os.unmap(hdr as *mut u8, len) };
        return ptr::null_mut();
    }
    let s = hdr as *mut Span;
    // SAFETY: the header page is ours and writable.
    unsafe {
        *s = Span::zeroed();
        (*s).state = span::HUGE;
        (*s).base = hdr;
        (*s).npages = len;
        (*s).requested = size;
        (*s).sampled = sampled;
    }
    pagemap::set_span(user >> PAGE_SHIFT, s);
    counters::HUGE_BYTES.add(len);
    counters::HUGE_OBJECTS.add(1);
    user as *mut u8
}

/// The object's address.
///
/// # Safety
/// `s` is a live huge span.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn user(s: *const Span) -> usize {
    // SAFETY: caller contract.
    unsafe { (*s).base + HEADER }
}

/// Usable bytes of a huge object.
///
/// # Safety
/// `s` is a live huge span.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn usable(s: *const Span) -> usize {
    // SAFETY: caller contract.
    unsafe { (*s).npages - HEADER }
}

/// Unmaps a huge object.
///
/// # Safety
/// `s` is a live huge span; nothing uses the object any more.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn free(s: *mut Span) {
    // SAFETY: caller contract.
    unsafe { free_in(&System, s) }
}

/// [`free`] through `os`.
///
/// # Safety
/// As [`free`].
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn free_in<O: Os>(os: &O, s: *mut Span) {
    // SAFETY: caller contract.
    unsafe {
        let len = (*s).npages;
        pagemap::set_span(user(s) >> PAGE_SHIFT, ptr::null_mut());
        counters::HUGE_BYTES.sub(len);
        counters::HUGE_OBJECTS.sub(1);
        os.unmap((*s).base as *mut u8, len);
    }
}

/// Resizes a huge object with mremap (no copy); null when that fails (the
/// object is then unchanged).
///
/// # Safety
/// `s` is a live huge span owned by the caller.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn resize(s: *mut Span, size: usize) -> *mut u8 {
    // SAFETY: caller contract.
    unsafe { resize_in(&System, s, size) }
}

/// [`resize`] through `os`.
///
/// # Safety
/// As [`resize`].
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn resize_in<O: Os>(os: &O, s: *mut Span, size: usize) -> *mut u8 {
    let Some(len) = mapping_len(size) else {
        return ptr::null_mut();
    };
    // SAFETY: caller contract; the page map entry moves with the object.
    unsafe {
        let old_len = (*s).npages;
        let old_user = user(s);
        // Out of the map before mremap: once it has moved the object, the
        // old place is free address space that another thread may map (a
        // page heap span, another huge object) and register on this very
        // page, and clearing the entry then would unregister that span.
        pagemap::set_span(old_user >> PAGE_SHIFT, ptr::null_mut());
        let base = os.remap((*s).base as *mut u8, old_len, len);
        if base.is_null() {
            pagemap::set_span(old_user >> PAGE_SHIFT, s);
            return base;
        }
        let ns = base as *mut Span;
        let new_user = base as usize + HEADER;
        if !pagemap::ensure(new_user >> PAGE_SHIFT) {
            // The old place is gone and the new one cannot be registered.
            os::fatal("realloc", old_user, "out of memory for the page map");
        }
        (*ns).base = base as usize;
        (*ns).npages = len;
        (*ns).requested = size;
        pagemap::set_span(new_user >> PAGE_SHIFT, ns);
        counters::HUGE_BYTES.add(len);
        counters::HUGE_BYTES.sub(old_len);
        new_user as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use core::cell::{Cell, RefCell};

    use super::*;

    /// The real system calls, counted; `fail_maps` makes every map fail.
    #[derive(Default)]
    struct Counting {
        maps: RefCell<Vec<usize>>,
        unmaps: RefCell<Vec<usize>>,
        remaps: RefCell<Vec<(usize, usize)>>,
        fail_maps: Cell<bool>,
    }

    impl Os for Counting {
        fn map(&self, len: usize) -> *mut u8 {
            self.maps.borrow_mut().push(len);
            if self.fail_maps.get() {
                return ptr::null_mut();
            }
            System.map(len)
        }
        unsafe fn unmap(&self, p: *mut u8, len: usize) {
            self.unmaps.borrow_mut().push(len);
            // SAFETY: the caller's contract.
            unsafe { System.unmap(p, len) }
        }
        unsafe fn remap(&self, p: *mut u8, old: usize, new: usize) -> *mut u8 {
            self.remaps.borrow_mut().push((old, new));
            // SAFETY: the caller's contract.
            unsafe { System.remap(p, old, new) }
        }
        unsafe fn release(&self, _p: *mut u8, _len: usize) {
            unreachable!("huge objects are unmapped, never released");
        }
    }

    /// mremap that always moves the object, after which another thread
    /// maps the old place and registers its own span on the object's old
    /// page (`claimed`), or that fails when `fail` is set.
    struct MovesAway {
        claimed: Cell<usize>,
        other: *mut Span,
        fail: bool,
    }

    impl Os for MovesAway {
        fn map(&self, len: usize) -> *mut u8 {
            System.map(len)
        }
        unsafe fn unmap(&self, p: *mut u8, len: usize) {
            // SAFETY: the caller's contract.
            unsafe { System.unmap(p, len) }
        }
        unsafe fn remap(&self, p: *mut u8, old: usize, new: usize) -> *mut u8 {
            if self.fail {
                return ptr::null_mut();
            }
            let q = System.map(new);
            assert!(!q.is_null());
            // SAFETY: p..p+old is the caller's mapping; q is a new one.
            unsafe {
                ptr::copy_nonoverlapping(p, q, old.min(new));
                System.unmap(p, old);
            }
            let page = (p as usize + HEADER) >> PAGE_SHIFT;
            pagemap::set_span(page, self.other);
            self.claimed.set(page);
            q
        }
        unsafe fn release(&self, _p: *mut u8, _len: usize) {
            unreachable!("huge objects are unmapped, never released");
        }
    }

    #[test]
    fn a_moved_object_leaves_its_old_page_to_whoever_maps_it_next() {
        let mut other = Span::zeroed();
        let os = MovesAway {
            claimed: Cell::new(0),
            other: &raw mut other,
            fail: false,
        };
        let p = alloc_in(&os, 2 << 20, 16, false);
        // SAFETY: p is a live huge object of ours, used only here.
        unsafe {
            p.write_bytes(3, 2 << 20);
            let q = resize_in(&os, span_of(p), 4 << 20);
            assert!(!q.is_null());
            assert_ne!(q, p);
            assert_eq!(*q.add((2 << 20) - 1), 3);
            assert_eq!(span_of(q), q.sub(HEADER).cast());
            // The other thread's span is still registered on that page.
            assert_eq!(pagemap::span(os.claimed.get()), os.other);
            pagemap::set_span(os.claimed.get(), ptr::null_mut());
            free_in(&os, span_of(q));
        }
    }

    #[test]
    fn a_failed_resize_leaves_the_object_registered() {
        let os = MovesAway {
            claimed: Cell::new(0),
            other: ptr::null_mut(),
            fail: true,
        };
        let p = alloc_in(&os, 2 << 20, 16, false);
        let s = span_of(p);
        // SAFETY: p is a live huge object of ours, used only here.
        unsafe {
            assert!(resize_in(&os, s, 4 << 20).is_null());
            assert_eq!(span_of(p), s);
            assert_eq!(usable(s), 2 << 20);
            free_in(&os, s);
        }
    }

    fn span_of(p: *mut u8) -> *mut Span {
        pagemap::span(p as usize >> PAGE_SHIFT)
    }

    #[test]
    fn an_object_is_one_mapping_with_a_header_page() {
        let os = Counting::default();
        let size = 3 << 20;
        let p = alloc_in(&os, size, 16, true);
        assert!(!p.is_null());
        // One mapping: the header page plus the object, page-rounded.
        assert_eq!(*os.maps.borrow(), [size + HEADER]);
        let s = span_of(p);
        // SAFETY: s is the live span of the object just made.
        unsafe {
            assert_eq!(s as usize + HEADER, p as usize);
            assert_eq!((*s).state, span::HUGE);
            assert!((*s).sampled);
            assert_eq!((*s).requested, size);
            assert_eq!(user(s), p as usize);
            assert_eq!(usable(s), size);
            p.write_bytes(0x5a, size);
            free_in(&os, s);
        }
        assert_eq!(*os.unmaps.borrow(), [size + HEADER]);
        assert!(span_of(p).is_null());
    }

    #[test]
    fn odd_sizes_round_up_to_the_system_page() {
        let os = Counting::default();
        let p = alloc_in(&os, (1 << 20) + 1, 16, false);
        assert_eq!(*os.maps.borrow(), [(1 << 20) + 2 * 4096]);
        // SAFETY: the live span of p.
        unsafe {
            assert_eq!(usable(span_of(p)), (1 << 20) + 4096);
            free_in(&os, span_of(p));
        }
    }

    #[test]
    fn big_alignments_trim_exactly_the_excess() {
        let os = Counting::default();
        let (size, align) = (3 << 19, 2 << 20);
        let p = alloc_in(&os, size, align, false);
        assert_eq!(p as usize % align, 0);
        let len = size + HEADER;
        // One mapping with room to align, then the parts before the header
        // and after the object go back: `align` bytes in all.
        assert_eq!(*os.maps.borrow(), [len + align]);
        assert_eq!(os.unmaps.borrow().iter().sum::<usize>(), align);
        // SAFETY: the live span of p.
        unsafe { free_in(&os, span_of(p)) };
        assert_eq!(os.unmaps.borrow().last(), Some(&len));
    }

    #[test]
    fn failures_return_null_and_leave_nothing_mapped() {
        let os = Counting::default();
        os.fail_maps.set(true);
        assert!(alloc_in(&os, 2 << 20, 16, false).is_null());
        assert!(alloc_in(&os, 2 << 20, 1 << 21, false).is_null());
        assert_eq!(os.maps.borrow().len(), 2);
        // A size whose mapping length overflows never reaches the OS.
        assert!(alloc_in(&os, usize::MAX - 100, 16, false).is_null());
        assert_eq!(os.maps.borrow().len(), 2);
        assert!(os.unmaps.borrow().is_empty());
    }

    #[test]
    fn resizing_remaps_and_moves_the_page_map_entry() {
        let os = Counting::default();
        let p = alloc_in(&os, 2 << 20, 16, false);
        // SAFETY: p is a live huge object of ours, used only here.
        unsafe {
            p.write_bytes(7, 2 << 20);
            let q = resize_in(&os, span_of(p), 64 << 20);
            assert!(!q.is_null());
            assert_eq!(
                *os.remaps.borrow(),
                [((2 << 20) + HEADER, (64 << 20) + HEADER)]
            );
            assert_eq!(*q, 7);
            assert_eq!(*q.add((2 << 20) - 1), 7);
            let s = span_of(q);
            assert_eq!(usable(s), 64 << 20);
            assert_eq!((*s).requested, 64 << 20);
            if q != p {
                assert!(span_of(p).is_null());
            }
            free_in(&os, s);
        }
        assert_eq!(os.unmaps.borrow().last(), Some(&((64 << 20) + HEADER)));
    }
}
