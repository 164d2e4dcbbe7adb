//! Memory for gperftools mode's own data, straight from mmap: the
//! profiler never allocates on the heap it profiles, and its tables are
//! never seen by the heap checker's scan (they are not roots).
use crate::os;

/// A growable array of `T` in its own mapping. The whole capacity is
/// reserved up front (`MAP_NORESERVE`), so pages cost memory only once
/// touched and elements never move.
pub(crate) struct Table<T> {
    base: *mut T,
    len: usize,
    cap: usize,
}

impl<T: Copy> Table<T> {
    pub(crate) const fn empty() -> Self {
        Self {
            base: core::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }

    /// Reserves room for `cap` elements (zeroed); false when out of memory.
    pub(crate) fn reserve(&mut self, cap: usize) -> bool {
        if !self.base.is_null() {
            return true;
        }
        let p = os::map((cap * core::mem::size_of::<T>()).next_multiple_of(4096));
        if p.is_null() {
            return false;
        }
        self.base = p.cast();
        self.cap = cap;
        true
    }

    /// Gives the memory back; the table is empty afterwards.
    pub(crate) fn release(&mut self) {
        if !self.base.is_null() {
            let bytes = (self.cap * core::mem::size_of::<T>()).next_multiple_of(4096);
            // SAFETY: our own mapping of that length, no longer used.
            unsafe { os::unmap(self.base.cast(), bytes) };
        }
        *self = Self::empty();
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `v`; false when full.
    pub(crate) fn push(&mut self, v: T) -> bool {
        if self.len >= self.cap {
            return false;
        }
        // SAFETY: len < cap, inside the mapping.
        unsafe { self.base.add(self.len).write(v) };
        self.len += 1;
        true
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: the element at len was written.
        Some(unsafe { self.base.add(self.len).read() })
    }

    /// The whole reserved capacity as a slice (for hash tables: zeroed
    /// until written).
    pub(crate) fn slots(&mut self) -> &mut [T] {
        if self.base.is_null() {
            return &mut [];
        }
        // SAFETY: the mapping holds `cap` zero-initialised elements; T is
        // plain data for which all-zero bytes are a valid value.
        unsafe { core::slice::from_raw_parts_mut(self.base, self.cap) }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        if self.base.is_null() {
            return &[];
        }
        // SAFETY: the first len elements were written.
        unsafe { core::slice::from_raw_parts(self.base, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        if self.base.is_null() {
            return &mut [];
        }
        // SAFETY: the first len elements were written.
        unsafe { core::slice::from_raw_parts_mut(self.base, self.len) }
    }
}

/// A byte buffer in its own mapping that grows with mremap: the pprof
/// encoder's output and scratch space.
pub(crate) struct Buf {
    base: *mut u8,
    len: usize,
    cap: usize,
    /// A write did not fit (out of memory): the contents are incomplete.
    pub(crate) failed: bool,
}

impl Buf {
    pub(crate) const fn new() -> Self {
        Self {
            base: core::ptr::null_mut(),
            len: 0,
            cap: 0,
            failed: false,
        }
    }

    fn grow(&mut self, need: usize) -> bool {
        let want = (self.len + need)
            .max(self.cap * 2)
            .max(1 << 16)
            .next_multiple_of(4096);
        let p = if self.base.is_null() {
            os::map(want)
        } else {
            // SAFETY: base..base+cap is our mapping.
            unsafe { os::remap(self.base, self.cap, want) }
        };
        if p.is_null() {
            self.failed = true;
            return false;
        }
        self.base = p;
        self.cap = want;
        true
    }

    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.cap && !self.grow(bytes.len()) {
            return;
        }
        // SAFETY: the mapping has room for the bytes after len.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(self.len), bytes.len());
        }
        self.len += bytes.len();
    }

    pub(crate) fn push(&mut self, b: u8) {
        self.extend(&[b]);
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.failed = false;
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.base.is_null() {
            return &[];
        }
        // SAFETY: the first len bytes were written.
        unsafe { core::slice::from_raw_parts(self.base, self.len) }
    }
}

impl Default for Buf {
    fn default() -> Self {
        Self::new()
    }
}
