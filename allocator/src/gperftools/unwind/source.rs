//! Where the unwinder reads an object's CFI bytes: from its file, with
//! pread into a small buffer on the stack, rather than through its
//! mapping. A read through the mapping faults the file's pages in, and the
//! kernel maps them in chunks of up to 64 KiB around each fault, so a few
//! stack walks make most of a program's unwind tables resident in the
//! profiled process (about 0.5 MiB of git's peak RSS). pread copies from
//! the page cache and maps nothing.
//!
//! The file is opened when a walk first reads it, through [`WalkFiles`],
//! shared by the walk's steps and closed when the walk ends: no descriptor
//! of ours outlives a walk, and a walk whose rows are all cached opens
//! nothing. Each open checks that the file is still the one the object
//! table learned (device, inode, the bytes at .eh_frame_hdr).
//!
//! No allocation, no lock, no fault (pread writes only the stack buffer),
//! errno kept: safe inside malloc and signal handlers. When the file is
//! unusable (the vdso has none; it may have been replaced), or a byte lies
//! outside the file's CFI segment, the read goes through the mapping as
//! before.
use core::cell::{Cell, UnsafeCell};

use super::{super::objects::Object, search_index::SearchIndex};

/// Bytes one pread brings: an FDE with its CFA program, or the last
/// steps of the search table's binary search.
pub(super) const WINDOW: usize = 512;

/// Objects whose files one walk keeps open at a time: a stack alternates
/// among few (the program, libc, a library or two).
const WALK_FILES: usize = 4;
/// A slot's descriptor when the file was tried and is unusable.
const UNUSABLE: i32 = -1;

/// The files one stack walk opened, by object (its code's start); closed
/// when the walk ends (dropped).
pub(crate) struct WalkFiles {
    open: [Cell<(usize, i32)>; WALK_FILES],
    used: Cell<usize>,
}

impl WalkFiles {
    pub(crate) const fn new() -> Self {
        Self {
            open: [const { Cell::new((0, UNUSABLE)) }; WALK_FILES],
            used: Cell::new(0),
        }
    }

    /// A descriptor of `obj`'s file, opened at the first call of the walk;
    /// None when it cannot be used.
    fn fd(&self, obj: &Object) -> Option<i32> {
        let used = self.used.get();
        let slot = match self.open[..used.min(WALK_FILES)]
            .iter()
            .find(|s| s.get().0 == obj.start)
        {
            Some(s) => s.get().1,
            None => {
                let f = obj.cfi_file?;
                // SAFETY: eh_frame_hdr is the object's mapped header, inside
                // its CFI segment (objects.rs checked it).
                let fd = keeping_errno(|| unsafe {
                    f.open(&obj.name[..obj.name_len], obj.eh_frame_hdr)
                })
                .unwrap_or(UNUSABLE);
                // The oldest slot goes when all are taken: the steps that
                // used it are over (a Source lives for one step).
                let s = &self.open[used % WALK_FILES];
                close(s.get().1);
                s.set((obj.start, fd));
                self.used.set(used + 1);
                fd
            }
        };
        (slot >= 0).then_some(slot)
    }
}

impl Drop for WalkFiles {
    #[unsafe(link_section = ".text.hot.profalloc")]
    fn drop(&mut self) {
        for s in &self.open {
            close(s.get().1);
        }
    }
}

fn close(fd: i32) {
    if fd >= 0 {
        // SAFETY: a descriptor this walk opened and still owns.
        keeping_errno(|| unsafe { libc::close(fd) });
    }
}

/// Windows one step keeps: an FDE and its CIE lie apart (often the CIE at
/// the start of .eh_frame), and a step reads each several times in turn.
const WINDOWS: usize = 2;

pub(crate) struct Source<'a> {
    /// The object read, and the walk's files; None: the mapping only.
    file: Option<(&'a Object, &'a WalkFiles)>,
    buf: UnsafeCell<[[u8; WINDOW]; WINDOWS]>,
    /// The address each window's first byte holds, and how many bytes it
    /// holds.
    base: [Cell<usize>; WINDOWS],
    len: [Cell<usize>; WINDOWS],
    /// The window the next read replaces: not the one used last.
    next: Cell<usize>,
    /// Reads from the file so far.
    #[cfg(test)]
    reads: Cell<usize>,
}

impl<'a> Source<'a> {
    /// Reads through the mapping only.
    pub(crate) const fn memory() -> Self {
        Self {
            file: None,
            buf: UnsafeCell::new([[0; WINDOW]; WINDOWS]),
            base: [const { Cell::new(0) }; WINDOWS],
            len: [const { Cell::new(0) }; WINDOWS],
            next: Cell::new(0),
            #[cfg(test)]
            reads: Cell::new(0),
        }
    }

    /// The search index of the object read from its file, if it has one.
    pub(super) fn index(&self) -> Option<&'a SearchIndex> {
        self.file?.0.cfi_file.as_ref()?.index.as_ref()
    }

    /// Reads `obj`'s CFI from its file, opened in `files` at the first read.
    pub(crate) fn of(obj: &'a Object, files: &'a WalkFiles) -> Self {
        let mut s = Self::memory();
        s.file = Some((obj, files));
        s
    }

    /// `N` bytes at address `p` of the object's CFI.
    ///
    /// # Safety
    /// `p..p + N` lies in the mapped CFI of the object (read through the
    /// mapping when the file cannot serve it).
    #[inline]
    pub(super) unsafe fn bytes<const N: usize>(&self, p: usize) -> [u8; N] {
        if let Some((w, at)) = self.offset_in_buf(p, N) {
            // SAFETY: at + N <= len <= WINDOW; only this thread's Source.
            return unsafe {
                (&(*self.buf.get())[w])[at..at + N]
                    .try_into()
                    .unwrap_unchecked()
            };
        }
        // SAFETY: the caller's contract.
        unsafe { (p as *const [u8; N]).read_unaligned() }
    }

    /// Brings `p..p + n` into the buffer ahead of reads there (n at most
    /// [`WINDOW`]), so that they cost one pread.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(super) fn prefetch(&self, p: usize, n: usize) {
        if n <= WINDOW && self.holds(p, n).is_none() {
            self.fill(p);
        }
    }

    /// The window holding `p..p + n`, if one does.
    fn holds(&self, p: usize, n: usize) -> Option<usize> {
        (0..WINDOWS).find(|&w| {
            let base = self.base[w].get();
            p >= base && p.wrapping_add(n) <= base + self.len[w].get()
        })
    }

    /// Whether a read went to the file.
    #[cfg(test)]
    fn used_file(&self) -> bool {
        self.len.iter().any(|l| l.get() > 0)
    }

    /// The window and offset where `p..p + n` is, after reading it from
    /// the file if needed; None when the file cannot serve it.
    #[unsafe(link_section = ".text.hot.profalloc")]
    fn offset_in_buf(&self, p: usize, n: usize) -> Option<(usize, usize)> {
        let w = match self.holds(p, n) {
            Some(w) => w,
            None if self.fill(p) => self.holds(p, n)?,
            None => return None,
        };
        // The other window goes first (two windows: least recently used).
        self.next.set((w + 1) % WINDOWS);
        Some((w, p - self.base[w].get()))
    }

    /// Fills a window from `p` on (the one not used last); false when the
    /// file does not hold `p`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    fn fill(&self, p: usize) -> bool {
        let w = self.next.get();
        // SAFETY: only this thread's Source; the window is not borrowed.
        let got = self.read_file(p, unsafe { &mut (*self.buf.get())[w] });
        self.base[w].set(p);
        self.len[w].set(got);
        got > 0
    }

    /// Reads the file's bytes from address `p` on into `buf` (as many as
    /// the CFI segment holds); how many it read, 0 when the file cannot
    /// serve `p`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(super) fn read_file(&self, p: usize, buf: &mut [u8]) -> usize {
        let Some((obj, files)) = self.file else {
            return 0;
        };
        let Some(f) = obj.cfi_file else {
            return 0;
        };
        if p < f.lo || p >= f.hi {
            return 0;
        }
        let Some(fd) = files.fd(obj) else {
            return 0;
        };
        let want = buf.len().min(f.hi - p);
        #[cfg(test)]
        self.reads.set(self.reads.get() + 1);
        // SAFETY: writes at most buf.len() bytes into buf.
        let got = keeping_errno(|| unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().cast(),
                want,
                (f.offset + (p - f.lo)) as libc::off_t,
            )
        });
        got.max(0) as usize
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

    fn this_program() -> &'static Object {
        let obj = objects::find_or_refresh(this_program as fn() -> &'static Object as usize)
            .expect("this program is a known object");
        assert!(
            obj.cfi_file.is_some(),
            "the test program's CFI file is unknown"
        );
        obj
    }

    /// Looks up the rules at pcs all over `obj`'s code through its file and
    /// through the mapping, checks they agree; how many the file served.
    fn compare_rules(obj: &Object, files: &WalkFiles) -> usize {
        let (mut found, mut from_file) = (0, 0);
        for pc in (obj.start..obj.end).step_by(997) {
            let file = Source::of(obj, files);
            // SAFETY: the object's CFI is mapped for the process's life.
            let (a, b) = unsafe {
                (
                    find_rules(&file, obj.eh_frame_hdr, pc),
                    find_rules(&Source::memory(), obj.eh_frame_hdr, pc),
                )
            };
            assert_eq!(a, b, "rules at {pc:#x}");
            found += usize::from(a.is_some());
            from_file += usize::from(file.used_file());
        }
        assert!(found > 100, "rules found at only {found} pcs");
        from_file
    }

    /// With the object's search index, a lookup reads the file three times
    /// (the table's window, the FDE, its CIE) and finds the rules it finds
    /// without, when the header and one read per halving of the table come
    /// first (three times as many reads in the test program).
    #[test]
    fn the_search_index_spares_the_table_search() {
        let indexed = *this_program();
        assert!(
            indexed.cfi_file.is_some_and(|f| f.index.is_some()),
            "the test program has no search index"
        );
        let mut plain = indexed;
        if let Some(f) = plain.cfi_file.as_mut() {
            f.index = None;
        }
        let files = WalkFiles::new();
        let (mut with, mut without, mut lookups, mut more) = (0, 0, 0, 0);
        for pc in (indexed.start..indexed.end).step_by(997) {
            let (a, b) = (Source::of(&indexed, &files), Source::of(&plain, &files));
            // SAFETY: the object's CFI is mapped for the process's life.
            let (ra, rb) = unsafe {
                (
                    find_rules(&a, indexed.eh_frame_hdr, pc),
                    find_rules(&b, indexed.eh_frame_hdr, pc),
                )
            };
            assert_eq!(ra, rb, "rules at {pc:#x}");
            lookups += 1;
            more += usize::from(a.reads.get() > 3);
            with += a.reads.get();
            without += b.reads.get();
        }
        // An FDE or CIE that crosses its window takes a read more.
        assert!(
            more * 100 <= lookups,
            "{more} of {lookups} lookups took over 3 reads"
        );
        assert!(
            with * 2 < without,
            "{with} reads with the index, {without} without"
        );
    }

    /// The rules read through the file are the rules read through the
    /// mapping; the file is opened once for all the walk's reads.
    #[test]
    fn file_reads_give_the_mapped_rules() {
        let obj = this_program();
        let files = WalkFiles::new();
        let from_file = compare_rules(obj, &files);
        assert!(from_file > 100, "the file served only {from_file} lookups");
        assert_eq!(files.used.get(), 1, "the file was opened more than once");
    }

    /// The walk's descriptor is close-on-exec while it lives, closed when
    /// the walk ends, and errno is as the program left it.
    #[test]
    fn no_descriptor_outlives_the_walk() {
        let obj = this_program();
        let files = WalkFiles::new();
        let errno = || {
            // SAFETY: this thread's errno slot.
            unsafe { libc::__errno_location() }
        };
        // SAFETY: as above.
        unsafe { *errno() = 4242 };
        assert!(compare_rules(obj, &files) > 100);
        // SAFETY: as above.
        assert_eq!(unsafe { *errno() }, 4242, "the walk changed errno");
        let (start, fd) = files.open[0].get();
        assert_eq!(start, obj.start);
        assert!(fd >= 0, "the file was not opened");
        // SAFETY: F_GETFD reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "flags {flags}");
        drop(files);
        // SAFETY: as above.
        assert_eq!(unsafe { *errno() }, 4242, "closing changed errno");
        // SAFETY: F_GETFD only reads flags, or fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            // Another test's thread may have reused the number at once; it
            // would not name this program's file.
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
            let exe = std::fs::read_link("/proc/self/exe").unwrap();
            assert!(!link.is_ok_and(|l| l == exe), "fd {fd} still open");
        } else {
            // SAFETY: as above.
            assert_eq!(unsafe { *errno() }, libc::EBADF);
        }
    }

    /// A file that is not the one the object was loaded from (another
    /// inode) is not read: the walk falls back to the mapping.
    #[test]
    fn another_file_is_not_read() {
        let mut obj = *this_program();
        let other = b"/bin/sh";
        obj.name[..other.len()].copy_from_slice(other);
        obj.name_len = other.len();
        let files = WalkFiles::new();
        assert_eq!(compare_rules(&obj, &files), 0);
        assert_eq!(files.open[0].get(), (obj.start, UNUSABLE));
    }
}
