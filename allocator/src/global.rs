//! [`ProfAlloc`]: the allocator as a Rust `GlobalAlloc`.
use core::alloc::{GlobalAlloc, Layout};

use crate::{alloc, size_class::MIN_ALIGN};

/// Use as `#[global_allocator] static A: ProfAlloc = ProfAlloc;`.
/// Failures return null, which Rust reports through `handle_alloc_error`.
pub struct ProfAlloc;

// SAFETY: every method returns memory of the requested size and alignment
// that stays valid until deallocated, or null.
unsafe impl GlobalAlloc for ProfAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            alloc::malloc(layout.size())
        } else {
            alloc::memalign(layout.align(), layout.size())
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from this allocator (GlobalAlloc contract).
        unsafe { alloc::free(ptr) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            alloc::calloc(1, layout.size())
        } else {
            let p = alloc::memalign(layout.align(), layout.size());
            if !p.is_null() {
                // SAFETY: p holds layout.size() bytes.
                unsafe { p.write_bytes(0, layout.size()) };
            }
            p
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            // SAFETY: ptr came from this allocator; new_size > 0.
            return unsafe { alloc::realloc(ptr, new_size) };
        }
        let q = alloc::memalign(layout.align(), new_size);
        if !q.is_null() {
            // SAFETY: both blocks hold min(old, new) bytes; distinct.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                alloc::free(ptr);
            }
        }
        q
    }
}
