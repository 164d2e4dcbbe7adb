//! Where the unwinder reads an object's CFI bytes: from its file, with
//! pread into a small buffer on the stack, rather than through its
//! mapping. A read through the mapping faults the file's pages in, and the
//! kernel maps them in chunks of up to 64 KiB around each fault, so a few
//! stack walks make most of a program's unwind tables resident in the
//! profiled process (about 0.5 MiB of git's peak RSS). pread copies from
//! the page cache and maps nothing.
//!
//! No allocation, no lock, no fault (pread writes only the stack buffer):
//! safe inside malloc and signal handlers. When the file is unusable (the
//! vdso has none; the program may close or reuse the descriptor), or a
//! byte lies outside the file's CFI segment, the read goes through the
//! mapping as before.
use core::cell::{Cell, UnsafeCell};

use super::super::objects::{CfiFile, Object};

/// Bytes one pread brings: an FDE with its CFA program, or the last
/// steps of the search table's binary search.
pub(super) const WINDOW: usize = 512;

pub(crate) struct Source {
    file: Option<CfiFile>,
    buf: UnsafeCell<[u8; WINDOW]>,
    /// The address `buf[0]` holds, and how many bytes it holds.
    base: Cell<usize>,
    len: Cell<usize>,
}

impl Source {
    /// Reads through the mapping only.
    pub(crate) const fn memory() -> Self {
        Self {
            file: None,
            buf: UnsafeCell::new([0; WINDOW]),
            base: Cell::new(0),
            len: Cell::new(0),
        }
    }

    /// Reads `obj`'s CFI from its file when the descriptor opened for it
    /// still names that file.
    pub(crate) fn of(obj: &Object) -> Self {
        let mut s = Self::memory();
        s.file = obj.cfi_file.filter(|f| keeping_errno(|| f.still_open()));
        s
    }

    /// `N` bytes at address `p` of the object's CFI.
    ///
    /// # Safety
    /// `p..p + N` lies in the mapped CFI of the object (read through the
    /// mapping when the file cannot serve it).
    #[inline]
    pub(super) unsafe fn bytes<const N: usize>(&self, p: usize) -> [u8; N] {
        if let Some(at) = self.offset_in_buf(p, N) {
            // SAFETY: at + N <= len <= WINDOW; only this thread's Source.
            return unsafe {
                (&(*self.buf.get()))[at..at + N]
                    .try_into()
                    .unwrap_unchecked()
            };
        }
        // SAFETY: the caller's contract.
        unsafe { (p as *const [u8; N]).read_unaligned() }
    }

    /// Brings `p..p + n` into the buffer ahead of reads there (n at most
    /// [`WINDOW`]), so that they cost one pread.
    pub(super) fn prefetch(&self, p: usize, n: usize) {
        if n <= WINDOW && !self.holds(p, n) {
            self.fill(p);
        }
    }

    fn holds(&self, p: usize, n: usize) -> bool {
        let base = self.base.get();
        p >= base && p.wrapping_add(n) <= base + self.len.get()
    }

    /// Where `p..p + n` is in the buffer, after filling it from the file
    /// if needed; None when the file cannot serve it.
    fn offset_in_buf(&self, p: usize, n: usize) -> Option<usize> {
        if !self.holds(p, n) && !self.fill(p) {
            return None;
        }
        self.holds(p, n).then(|| p - self.base.get())
    }

    /// Fills the buffer from `p` on; false when the file does not hold `p`.
    fn fill(&self, p: usize) -> bool {
        let Some(f) = &self.file else {
            return false;
        };
        if p < f.lo || p >= f.hi {
            return false;
        }
        let want = WINDOW.min(f.hi - p);
        // SAFETY: writes at most WINDOW bytes into this Source's buffer.
        let got = keeping_errno(|| unsafe {
            libc::pread(
                f.fd,
                self.buf.get().cast(),
                want,
                (f.offset + (p - f.lo)) as libc::off_t,
            )
        });
        self.base.set(p);
        self.len.set(got.max(0) as usize);
        got > 0
    }
}

/// Runs `f`, leaving errno as it was: the walk runs inside malloc and in
/// signal handlers, where the program's errno must not change.
fn keeping_errno<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: __errno_location returns this thread's errno slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *slot };
    let v = f();
    // SAFETY: as above.
    unsafe { *slot = saved };
    v
}

#[cfg(test)]
mod tests {
    use super::{super::cfi::find_rules, *};
    use crate::gperftools::objects;

    /// The rules read through the file are the rules read through the
    /// mapping, at pcs all over this test program's code.
    #[test]
    fn file_reads_give_the_mapped_rules() {
        let obj = objects::find_or_refresh(file_reads_give_the_mapped_rules as fn() as usize)
            .expect("this program is a known object");
        assert!(
            obj.cfi_file.is_some(),
            "the test program's file was not opened"
        );
        let (mut found, mut from_file) = (0, 0);
        for pc in (obj.start..obj.end).step_by(997) {
            let file = Source::of(obj);
            // SAFETY: the object's CFI is mapped for the process's life.
            let (a, b) = unsafe {
                (
                    find_rules(&file, obj.eh_frame_hdr, pc),
                    find_rules(&Source::memory(), obj.eh_frame_hdr, pc),
                )
            };
            assert_eq!(a, b, "rules at {pc:#x}");
            found += usize::from(a.is_some());
            from_file += usize::from(file.len.get() > 0);
        }
        assert!(found > 100, "rules found at only {found} pcs");
        assert!(from_file > 100, "the file served only {from_file} lookups");
    }
}
