//! Where the rows live: shards of [`SHARD_ROWS`] rows (BPF arrays created on
//! demand and entered in the walker's array of shards) under a kernel
//! memory cap. Each shard is mapped into this process (`BPF_F_MMAPABLE`), so
//! rows are written with one copy, not a syscall per row. A page's rows are
//! kept inside one shard (the walker's binary search runs in one array);
//! an object's pages may spread over several.
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Context as _, bail};
use aya::maps::{Array, ArrayOfMaps, Map, MapData};
use profiler_common::unwind::{MAX_SHARDS, SHARD_MASK, SHARD_ROWS, SHARD_SHIFT, UnwindRow};

/// Default cap on the kernel memory of rows, in MiB.
pub const DEFAULT_CAP_MIB: u64 = 512;

/// `BPF_F_MMAPABLE`: the array can be mapped into user space.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Bytes of one shard.
const SHARD_BYTES: usize = SHARD_ROWS as usize * size_of::<UnwindRow>();

/// One shard, mapped into this process.
struct MappedShard {
    ptr: *mut UnwindRow,
    _map: MapData,
}

impl Drop for MappedShard {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `RowStore::add_shard` mapped.
        unsafe { libc::munmap(self.ptr.cast(), SHARD_BYTES) };
    }
}

/// The rows of an object do not fit under the memory cap.
#[derive(Debug, thiserror::Error)]
#[error("unwind row memory cap reached ({cap_mib} MiB; raise --unwind-memory)")]
pub struct CapReached {
    pub cap_mib: usize,
}

/// The rows of every loaded object.
pub struct RowStore {
    /// `UNWIND_ROW_SHARDS`, an array of maps.
    outer: Map,
    shards: Vec<MappedShard>,
    max_shards: u32,
    free: FreeList,
}

/// Rows placed for one object: the ranges it owns, and where each page's
/// rows start (shard and index, as `PageRows::first`).
pub struct Placed {
    pub ranges: Vec<(u32, u32)>,
    pub page_firsts: Vec<u32>,
}

impl RowStore {
    /// Takes the array of shards; at most `cap_mib` MiB of shards are created.
    pub fn new(outer: Map, cap_mib: u64) -> anyhow::Result<Self> {
        if !matches!(outer, Map::ArrayOfMaps(_)) {
            bail!("the unwind row shard map is not an array of maps");
        }
        let max_shards = (cap_mib << 20) / SHARD_BYTES as u64;
        if max_shards == 0 {
            bail!(
                "an unwind memory cap of {cap_mib} MiB holds no row shard ({} MiB each)",
                SHARD_BYTES >> 20
            );
        }
        Ok(Self {
            outer,
            shards: Vec::new(),
            max_shards: max_shards.min(u64::from(MAX_SHARDS)) as u32,
            free: FreeList::default(),
        })
    }

    /// Kernel memory of the shards created so far.
    pub fn bytes(&self) -> usize {
        self.shards.len() * SHARD_BYTES
    }

    /// The cap, in bytes.
    pub fn cap_bytes(&self) -> usize {
        self.max_shards as usize * SHARD_BYTES
    }

    /// Stores `rows`, made of pages of `(page, first row, row count)` laid
    /// out one after the other, and returns where they went.
    pub fn place(
        &mut self,
        pages: &[(u32, u32, u32)],
        rows: &[UnwindRow],
    ) -> anyhow::Result<Placed> {
        let mut placed = Placed {
            ranges: Vec::new(),
            page_firsts: Vec::with_capacity(pages.len()),
        };
        let mut i = 0;
        while i < pages.len() {
            let (at, avail) = match self.free.find(pages[i].2) {
                Some(range) => range,
                None => {
                    if let Err(err) = self.add_shard() {
                        self.release(&placed.ranges);
                        return Err(err);
                    }
                    continue;
                }
            };
            // As many of the following pages as fit in this free range.
            let start = pages[i].1;
            let mut used = 0;
            while i < pages.len() && used + pages[i].2 <= avail {
                placed.page_firsts.push(at + (pages[i].1 - start));
                used += pages[i].2;
                i += 1;
            }
            self.free.claim(at, used);
            self.write(at, &rows[start as usize..(start + used) as usize]);
            placed.ranges.push((at, used));
        }
        Ok(placed)
    }

    /// The `count` rows from `first` (shard << SHARD_SHIFT | index), as the
    /// walker sees them; none when the range is not inside one shard.
    pub fn rows(&self, first: u32, count: u32) -> Option<&[UnwindRow]> {
        let shard = self.shards.get((first >> SHARD_SHIFT) as usize)?;
        let index = (first & SHARD_MASK) as usize;
        if count == 0 || index + count as usize > SHARD_ROWS as usize {
            return None;
        }
        // SAFETY: the range is inside the shard's mapping (checked above);
        // rows are plain data, written before their page entry.
        Some(unsafe { std::slice::from_raw_parts(shard.ptr.add(index), count as usize) })
    }

    /// Gives back the ranges of an object.
    pub fn release(&mut self, ranges: &[(u32, u32)]) {
        for &(first, len) in ranges {
            self.free.give(first, len);
        }
    }

    fn write(&mut self, at: u32, rows: &[UnwindRow]) {
        let shard = &self.shards[(at >> SHARD_SHIFT) as usize];
        let index = (at & SHARD_MASK) as usize;
        assert!(
            index + rows.len() <= SHARD_ROWS as usize,
            "rows cross a shard"
        );
        // SAFETY: the range is inside the shard's mapping (checked above),
        // plain memory shared with the kernel; the walker reads these rows
        // only once a page entry points at them, which happens after this
        // copy.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), shard.ptr.add(index), rows.len()) };
    }

    fn add_shard(&mut self) -> anyhow::Result<()> {
        let index = self.shards.len() as u32;
        if index >= self.max_shards {
            return Err(CapReached {
                cap_mib: self.cap_bytes() >> 20,
            }
            .into());
        }
        let shard = Array::<MapData, UnwindRow>::create(SHARD_ROWS, BPF_F_MMAPABLE)
            .context("creating an unwind row shard")?;
        ArrayOfMaps::<&mut MapData, Array<MapData, UnwindRow>>::try_from(&mut self.outer)?
            .set(index, &shard, 0)
            .context("adding an unwind row shard")?;
        // The same map again, as plain map data whose descriptor can be
        // mapped.
        let data: MapData = ArrayOfMaps::<&MapData, MapData>::try_from(&self.outer)?
            .get(&index, 0)
            .context("reading back an unwind row shard")?;
        // SAFETY: maps a BPF array created with BPF_F_MMAPABLE; its value
        // area is exactly SHARD_BYTES, a multiple of the page size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SHARD_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping an unwind row shard");
        }
        self.shards.push(MappedShard {
            ptr: ptr.cast(),
            _map: data,
        });
        self.free.give(index << SHARD_SHIFT, SHARD_ROWS);
        Ok(())
    }
}

/// Free row ranges `(first, len)` (first = shard << SHARD_SHIFT | index),
/// sorted; a range never crosses a shard's end.
#[derive(Debug, Default)]
struct FreeList(Vec<(u32, u32)>);

impl FreeList {
    /// The first free range of at least `len` rows.
    fn find(&self, len: u32) -> Option<(u32, u32)> {
        self.0.iter().copied().find(|&(_, l)| l >= len)
    }

    /// Takes `len` rows at the start of the free range that starts at `at`.
    fn claim(&mut self, at: u32, len: u32) {
        let i = self
            .0
            .iter()
            .position(|&(f, _)| f == at)
            .expect("claims start a free range");
        let (first, l) = self.0[i];
        if l == len {
            self.0.remove(i);
        } else {
            self.0[i] = (first + len, l - len);
        }
    }

    /// Returns a range, merged with its neighbours in the same shard.
    fn give(&mut self, first: u32, len: u32) {
        if len == 0 {
            return;
        }
        let same_shard = |a: u32, b: u32| a >> SHARD_SHIFT == b >> SHARD_SHIFT;
        let v = &mut self.0;
        let i = v.partition_point(|&(f, _)| f < first);
        v.insert(i, (first, len));
        if i + 1 < v.len() && v[i].0 + v[i].1 == v[i + 1].0 && same_shard(v[i].0, v[i + 1].0) {
            v[i].1 += v[i + 1].1;
            v.remove(i + 1);
        }
        if i > 0 && v[i - 1].0 + v[i - 1].1 == v[i].0 && same_shard(v[i - 1].0, v[i].0) {
            v[i - 1].1 += v[i].1;
            v.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ranges_merge_within_a_shard_only() {
        let mut free = FreeList::default();
        free.give(0, SHARD_ROWS);
        free.give(SHARD_ROWS, SHARD_ROWS);
        assert_eq!(free.0.len(), 2, "shards stay apart");
        free.claim(0, 10);
        free.claim(10, 5);
        assert_eq!(free.find(SHARD_ROWS - 15), Some((15, SHARD_ROWS - 15)));
        free.give(0, 10);
        free.give(10, 5);
        assert_eq!(free.0, vec![(0, SHARD_ROWS), (SHARD_ROWS, SHARD_ROWS)]);
        // A range too long for the first shard's rest comes from the next.
        free.claim(0, SHARD_ROWS - 3);
        assert_eq!(free.find(4), Some((SHARD_ROWS, SHARD_ROWS)));
    }
}
