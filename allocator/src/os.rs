//! Everything the allocator asks of the operating system: address space
//! (mmap, munmap, mremap), returning pages (madvise), and writing messages
//! to stderr. Nothing here allocates or takes a lock, so every function is
//! safe to call from any path, including signal handlers and fork handlers.
//! The memory calls sit behind the [`Os`] trait, the seam the tiers' tests
//! use to count and fake mappings.
use core::ptr;

/// The memory calls the allocator makes, behind a trait so that tests can
/// count and fake mappings; [`System`] makes the real system calls.
pub(crate) trait Os {
    /// Maps `len` bytes of zeroed, private, read-write memory, or returns
    /// null.
    fn map(&self, len: usize) -> *mut u8;

    /// Unmaps a range obtained from [`Os::map`].
    ///
    /// # Safety
    /// Nothing may use the range afterwards.
    unsafe fn unmap(&self, p: *mut u8, len: usize);

    /// Grows or shrinks a mapping, moving it if needed; null on failure
    /// (the old mapping is then unchanged).
    ///
    /// # Safety
    /// `p..p+old` must be a mapping the caller owns.
    unsafe fn remap(&self, p: *mut u8, old: usize, new: usize) -> *mut u8;

    /// Gives the physical pages of a range back; the range stays mapped
    /// and reads as zeros when next touched.
    ///
    /// # Safety
    /// Nothing may hold data in the range.
    unsafe fn release(&self, p: *mut u8, len: usize);

    /// Maps `len` bytes whose start is a multiple of `align` (a power of
    /// two at least the system page), trimming the excess; null on failure.
    fn map_aligned(&self, len: usize, align: usize) -> *mut u8 {
        let Some(total) = len.checked_add(align) else {
            return ptr::null_mut();
        };
        let p = self.map(total);
        if p.is_null() {
            return p;
        }
        let start = p as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let end = start + total;
        // SAFETY: both ranges lie inside the mapping just created and are
        // page-aligned (align and len are multiples of the system page).
        unsafe {
            if aligned > start {
                self.unmap(p, aligned - start);
            }
            if end > aligned + len {
                self.unmap((aligned + len) as *mut u8, end - (aligned + len));
            }
        }
        aligned as *mut u8
    }
}

/// The kernel: mmap, munmap, mremap, madvise.
pub(crate) struct System;

impl Os for System {
    /// `MAP_NORESERVE`: address space reserved ahead of use costs nothing
    /// until touched.
    fn map(&self, len: usize) -> *mut u8 {
        // SAFETY: an anonymous mapping at a kernel-chosen address has no
        // preconditions; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            ptr::null_mut()
        } else {
            p.cast()
        }
    }

    unsafe fn unmap(&self, p: *mut u8, len: usize) {
        // SAFETY: the caller owns the range.
        unsafe { libc::munmap(p.cast(), len) };
    }

    unsafe fn remap(&self, p: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: the caller owns the old mapping; MREMAP_MAYMOVE keeps the
        // contents.
        let q = unsafe { libc::mremap(p.cast(), old, new, libc::MREMAP_MAYMOVE) };
        if q == libc::MAP_FAILED {
            ptr::null_mut()
        } else {
            q.cast()
        }
    }

    unsafe fn release(&self, p: *mut u8, len: usize) {
        // SAFETY: the caller says the range holds no live data.
        unsafe { libc::madvise(p.cast(), len, libc::MADV_DONTNEED) };
    }
}

/// [`Os::map`] of [`System`].
pub(crate) fn map(len: usize) -> *mut u8 {
    System.map(len)
}

/// [`Os::map_aligned`] of [`System`].
pub(crate) fn map_aligned(len: usize, align: usize) -> *mut u8 {
    System.map_aligned(len, align)
}

/// [`Os::unmap`] of [`System`].
///
/// # Safety
/// As [`Os::unmap`].
pub(crate) unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { System.unmap(p, len) }
}

/// [`Os::remap`] of [`System`].
///
/// # Safety
/// As [`Os::remap`].
pub(crate) unsafe fn remap(p: *mut u8, old: usize, new: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { System.remap(p, old, new) }
}

/// [`Os::release`] of [`System`].
///
/// # Safety
/// As [`Os::release`].
pub(crate) unsafe fn release(p: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { System.release(p, len) }
}

/// Sets errno to ENOMEM (the C API's out-of-memory report).
pub fn set_enomem() {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = libc::ENOMEM };
}

/// A fixed-size message buffer written with one write(2); formatting
/// without allocating.
pub(crate) struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    pub(crate) const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    pub(crate) fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            let d = [digits[n]];
            // SAFETY: an ASCII digit is valid UTF-8.
            self.str(unsafe { core::str::from_utf8_unchecked(&d) });
        }
        self
    }

    pub(crate) fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                started = true;
                let c = [b"0123456789abcdef"[d]];
                // SAFETY: an ASCII hex digit is valid UTF-8.
                self.str(unsafe { core::str::from_utf8_unchecked(&c) });
            }
        }
        self
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Writes the message to stderr (fd 2).
    pub(crate) fn write_stderr(&self) {
        let mut done = 0;
        while done < self.len {
            // SAFETY: the buffer range is initialised and in bounds.
            let n = unsafe { libc::write(2, self.buf[done..].as_ptr().cast(), self.len - done) };
            if n <= 0 {
                break;
            }
            done += n as usize;
        }
    }
}

impl Default for Message {
    fn default() -> Self {
        Self::new()
    }
}

/// Reports heap misuse and aborts: `profalloc: <what> <ptr>: <why>`.
#[cold]
#[inline(never)]
pub fn fatal(what: &str, ptr: usize, why: &str) -> ! {
    let mut m = Message::new();
    m.str("profalloc: ")
        .str(what)
        .str(" ")
        .hex(ptr as u64)
        .str(": ")
        .str(why)
        .str("\n");
    m.write_stderr();
    // SAFETY: abort has no preconditions and does not allocate.
    unsafe { libc::abort() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_formats_numbers() {
        let mut m = Message::new();
        m.str("a ")
            .dec(0)
            .str(" ")
            .dec(1234567890)
            .str(" ")
            .hex(0xdead00)
            .str(" ")
            .hex(0);
        assert_eq!(m.as_bytes(), b"a 0 1234567890 0xdead00 0x0");
    }

    #[test]
    fn aligned_mapping_is_aligned() {
        let p = map_aligned(1 << 20, 1 << 21);
        assert!(!p.is_null());
        assert_eq!(p as usize % (1 << 21), 0);
        // SAFETY: the mapping was just created and is unused.
        unsafe {
            p.write_bytes(7, 1 << 20);
            unmap(p, 1 << 20);
        }
    }
}
