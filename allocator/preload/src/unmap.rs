//! `munmap`, exported so that every unmap of the process that goes through
//! the PLT (Python's arenas and frame chunks, the allocator's own) passes
//! `profalloc::gperftools::unmapping`: the Python walk reads the pages its
//! earlier walks read without a system call, which is safe only while it
//! knows none of them was unmapped. The unmap itself is the system call,
//! as glibc's munmap makes it (errno set on failure).
use core::ffi::{c_int, c_void};

/// # Safety
/// As munmap(2): the range is the caller's to unmap.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    profalloc::gperftools::unmapping(|| {
        // SAFETY: the caller's contract.
        unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
    })
}

/// Marks the object whose munmap is this one: when the first object that
/// defines munmap also defines this, every call binds to ours.
#[unsafe(no_mangle)]
pub extern "C" fn profalloc_unmap_hook() {}
