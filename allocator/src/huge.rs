//! Huge objects: each in its own mapping, with its span record in the
//! mapping's first system page, so that it needs no lock at all: not for
//! allocating, freeing, or growing in place with mremap. This is also the
//! path of re-entrant allocations (a signal handler interrupting a slow
//! path on its own thread), which must not take the locks that thread may
//! hold.
use core::ptr;

use crate::{
    counters, os, pagemap,
    size_class::PAGE_SHIFT,
    span::{self, Span},
};

/// Bytes before the object: the header page.
pub const HEADER: usize = 4096;
const SYS_PAGE: usize = 4096;

fn mapping_len(size: usize) -> Option<usize> {
    size.checked_add(HEADER + SYS_PAGE - 1)
        .map(|n| n & !(SYS_PAGE - 1))
}

/// Maps a huge object of `size` bytes aligned to `align` (a power of two);
/// null when out of memory.
pub fn alloc(size: usize, align: usize, sampled: bool) -> *mut u8 {
    let Some(len) = mapping_len(size) else {
        return ptr::null_mut();
    };
    let (hdr, user) = if align <= SYS_PAGE {
        let base = os::map(len);
        if base.is_null() {
            return base;
        }
        (base as usize, base as usize + HEADER)
    } else {
        let Some(total) = len.checked_add(align) else {
            return ptr::null_mut();
        };
        let base = os::map(total);
        if base.is_null() {
            return base;
        }
        let base = base as usize;
        let user = (base + HEADER + align - 1) & !(align - 1);
        let hdr = user - HEADER;
        // SAFETY: both ranges are unused parts of the mapping just made.
        unsafe {
            if hdr > base {
                os::unmap(base as *mut u8, hdr - base);
            }
            if base + total > hdr + len {
                os::unmap((hdr + len) as *mut u8, base + total - (hdr + len));
            }
        }
        (hdr, user)
    };
    if !pagemap::ensure(user >> PAGE_SHIFT) {
        // SAFETY: the mapping is unused.
        unsafe { os::unmap(hdr as *mut u8, len) };
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
pub unsafe fn user(s: *const Span) -> usize {
    // SAFETY: caller contract.
    unsafe { (*s).base + HEADER }
}

/// Usable bytes of a huge object.
///
/// # Safety
/// `s` is a live huge span.
pub unsafe fn usable(s: *const Span) -> usize {
    // SAFETY: caller contract.
    unsafe { (*s).npages - HEADER }
}

/// Unmaps a huge object.
///
/// # Safety
/// `s` is a live huge span; nothing uses the object any more.
pub unsafe fn free(s: *mut Span) {
    // SAFETY: caller contract.
    unsafe {
        let len = (*s).npages;
        pagemap::set_span(user(s) >> PAGE_SHIFT, ptr::null_mut());
        counters::HUGE_BYTES.sub(len);
        counters::HUGE_OBJECTS.sub(1);
        os::unmap((*s).base as *mut u8, len);
    }
}

/// Resizes a huge object with mremap (no copy); null when that fails (the
/// object is then unchanged).
///
/// # Safety
/// `s` is a live huge span owned by the caller.
pub unsafe fn resize(s: *mut Span, size: usize) -> *mut u8 {
    let Some(len) = mapping_len(size) else {
        return ptr::null_mut();
    };
    // SAFETY: caller contract; the page map entry moves with the object.
    unsafe {
        let old_len = (*s).npages;
        let old_user = user(s);
        let base = os::remap((*s).base as *mut u8, old_len, len);
        if base.is_null() {
            return base;
        }
        let ns = base as *mut Span;
        let new_user = base as usize + HEADER;
        if !pagemap::ensure(new_user >> PAGE_SHIFT) {
            // The old place is gone and the new one cannot be registered.
            os::fatal("realloc", old_user, "out of memory for the page map");
        }
        if new_user != old_user {
            pagemap::set_span(old_user >> PAGE_SHIFT, ptr::null_mut());
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
