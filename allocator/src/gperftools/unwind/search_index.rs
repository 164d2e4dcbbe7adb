//! Every [`STRIDE`]-th start address of an object's .eh_frame_hdr search
//! table, read from its file once, when the object is learned.
//!
//! Without it, each lookup that misses the row cache binary-searches the
//! table through pread: the header, then one read per halving until the
//! rest fits one window (seven reads in libpython's 5,400 entries, and the
//! first few the same for every lookup). With it, the search through the
//! keys is in memory and the table is read once, one window of `STRIDE`
//! entries; with the step's two windows (FDE and CIE), a lookup reads the
//! file three times. An object costs one read per four keys, once, when
//! learned. `python3 -c pass` made a third of the reads it made before, and
//! the bench's python3 (`PYTHONMALLOC=malloc`) 770 instead of about 2,800.
//!
//! Memory: 4 bytes per `STRIDE` entries (libpython: 340 bytes), in one
//! mapping reserved for all objects and touched as used. An object whose
//! keys do not fit is searched as before.
//!
//! Written only under the object table's lock, before the object that
//! points to its keys is published; read without a lock (keys never change).
use core::cell::UnsafeCell;

use super::{
    cfi::search_table,
    source::{Source, WINDOW, WalkFiles},
};
use crate::gperftools::{arena::Table, objects::Object};

/// Table entries (8 bytes each) between two keys: one window's worth.
pub(super) const STRIDE: usize = WINDOW / 8;

/// Keys of all objects: room for 64 M table entries.
const CAPACITY: usize = 1 << 20;

struct Keys(UnsafeCell<Table<i32>>);

// SAFETY: written only under the object table's lock; a key is written
// before the index pointing to it is published, and never changed.
unsafe impl Sync for Keys {}

static KEYS: Keys = Keys(UnsafeCell::new(Table::empty()));

#[derive(Clone, Copy)]
pub struct SearchIndex {
    /// The .eh_frame_hdr the table belongs to.
    hdr: usize,
    /// Address of the table's first entry, and its entry count.
    table: usize,
    count: usize,
    /// The start addresses of entries 0, STRIDE, 2 STRIDE, ..., as the
    /// table holds them (relative to `hdr`), in [`KEYS`].
    keys: *const i32,
}

impl SearchIndex {
    /// The table of `hdr`, and the entries `[lo, hi)` among which the last
    /// one that starts at or below `pc` lies (0 when none does, as the
    /// full search finds). None when this is another object's table.
    pub(super) fn narrow(&self, hdr: usize, pc: usize) -> Option<(usize, usize, usize)> {
        if hdr != self.hdr {
            return None;
        }
        let n = self.count.div_ceil(STRIDE);
        // SAFETY: n keys were written at `keys` before this index was
        // published, and are never changed.
        let keys = unsafe { core::slice::from_raw_parts(self.keys, n) };
        let above = keys.partition_point(|&k| hdr.wrapping_add(k as isize as usize) <= pc);
        let lo = above.saturating_sub(1) * STRIDE;
        Some((self.table, lo, (lo + STRIDE).min(self.count)))
    }
}

/// Reads the keys of `obj`'s search table from its file. None when it has
/// no file to read, no usable table, or the keys do not fit.
///
/// # Safety
/// The caller holds the object table's lock; `obj.eh_frame_hdr` is the
/// object's mapped .eh_frame_hdr (reads the file cannot serve go through
/// the mapping).
pub(crate) unsafe fn build(obj: &Object) -> Option<SearchIndex> {
    obj.cfi_file?;
    let files = WalkFiles::new();
    let src = Source::of(obj, &files);
    let hdr = obj.eh_frame_hdr;
    // SAFETY: the caller's contract.
    let (table, count) = unsafe { search_table(&src, hdr)? };
    let n = count.div_ceil(STRIDE);
    // SAFETY: the caller holds the lock that guards KEYS.
    let t = unsafe { &mut *KEYS.0.get() };
    if !t.reserve(CAPACITY) || t.len() + n > t.capacity() {
        return None;
    }
    let first = t.len();
    // Keys a read brings: one chunk of the table.
    const PER_READ: usize = 4;
    let mut chunk = [0u8; PER_READ * STRIDE * 8];
    for k0 in (0..n).step_by(PER_READ) {
        let at = table + k0 * STRIDE * 8;
        let got = src.read_file(at, &mut chunk);
        for k in k0..n.min(k0 + PER_READ) {
            let off = (k - k0) * STRIDE * 8;
            let key = if off + 4 <= got {
                [chunk[off], chunk[off + 1], chunk[off + 2], chunk[off + 3]]
            } else {
                // SAFETY: entry k * STRIDE < count lies in the mapped
                // table (read through the mapping when the file cannot).
                unsafe { src.bytes::<4>(table + k * STRIDE * 8) }
            };
            t.push(i32::from_le_bytes(key));
        }
    }
    Some(SearchIndex {
        hdr,
        table,
        count,
        keys: t.as_slice()[first..].as_ptr(),
    })
}
