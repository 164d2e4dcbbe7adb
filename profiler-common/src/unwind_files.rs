//! Finding an object's rows by the file a pc's mapping maps, for a process
//! whose own mappings user space has not entered yet.
//!
//! [`crate::unwind::MAPPINGS_MAP`] is filled per process by user space, so a
//! new process (every `rustc` of a build) has no entries there until its
//! maps are read. When that lookup misses, the walker asks the kernel for
//! the pc's mapping (`bpf_find_vma`), reads the mapped file's identity and
//! looks it up in [`FILES_MAP`], which user space fills for every object
//! whose rows are in the kernel, whichever process they were loaded for.
//! The pc's address in the object then follows from the mapping's start
//! and file offset and the object's load segments, exactly as user space
//! computes a mapping's bias.
//!
//! The kernel structures are read at offsets found in the running kernel's
//! BTF by user space ([`VmaOffsets`], in [`VMA_CONFIG_MAP`]); without them
//! the lookup is off.
//!
//! Maps:
//! - [`FILES_MAP`]: `HashMap<FileKey, FileObject>`.
//! - [`VMA_CONFIG_MAP`]: `Array<VmaOffsets>` of one entry.

/// Name of the file-identity index.
pub const FILES_MAP: &str = "UNWIND_FILES";
/// Capacity of [`FILES_MAP`] (files whose rows are loaded).
pub const FILES_MAX: u32 = 16384;
/// Name of the kernel-structure offsets the lookup reads with.
pub const VMA_CONFIG_MAP: &str = "UNWIND_VMA_CONFIG";
/// Load segments kept per file (an object with more has no entry).
pub const FILE_SEGMENTS: usize = 8;

/// Key of [`FILES_MAP`]: a file as the kernel names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// The file system's device (`super_block.s_dev`): major << 20 | minor.
    pub dev: u32,
    /// Zero.
    pub _pad: u32,
    /// Inode number.
    pub inode: u64,
}

const _: () = assert!(core::mem::size_of::<FileKey>() == 16);

impl FileKey {
    /// The key of the file on device `major:minor` (as `/proc/PID/maps`
    /// shows it) with inode `inode`. The vDSO is device 0, inode 0.
    pub const fn new(major: u32, minor: u32, inode: u64) -> Self {
        Self {
            dev: (major << 20) | (minor & 0xf_ffff),
            _pad: 0,
            inode,
        }
    }
}

/// One load segment of a file: bytes `offset..end` of the file are loaded
/// at virtual address `vaddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileSegment {
    pub offset: u64,
    pub end: u64,
    pub vaddr: u64,
}

const _: () = assert!(core::mem::size_of::<FileSegment>() == 24);

/// Value of [`FILES_MAP`]: the object whose rows cover the file, and its
/// load segments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileObject {
    /// Object id in [`crate::unwind::PAGES_MAP`] (never 0).
    pub object: u32,
    /// Segments used in `segments`.
    pub count: u32,
    pub segments: [FileSegment; FILE_SEGMENTS],
    /// The file's modification time when its rows were built (seconds,
    /// nanoseconds): the walker uses the entry only for an inode with this
    /// very time, so a file rewritten in place (same inode) never gets
    /// the old rows. Checked when `mtime_known` is 1 (the vDSO has none).
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub mtime_known: u32,
}

const _: () = assert!(core::mem::size_of::<FileObject>() == 8 + 24 * FILE_SEGMENTS + 16);

impl FileObject {
    /// Whether the entry is for an inode last modified at `sec`.`nsec`.
    #[inline(always)]
    pub fn same_mtime(&self, sec: i64, nsec: u32) -> bool {
        self.mtime_known == 0 || (self.mtime_sec == sec && self.mtime_nsec == nsec)
    }

    /// The load bias (address - bias = the object's virtual address) of a
    /// mapping at `start` of the file from offset `map_offset`. The kernel
    /// maps each segment from its offset rounded down to a page, and
    /// segments can share a page (lld), so a segment that starts in the
    /// mapping's first page wins over one that merely contains it.
    #[inline(always)]
    pub fn bias(&self, start: u64, map_offset: u64) -> Option<u64> {
        let mut found = None;
        for (i, s) in self.segments.iter().enumerate() {
            if i as u32 >= self.count {
                break;
            }
            if s.offset & !0xfff == map_offset {
                found = Some(*s);
                break;
            }
            if found.is_none() && s.offset <= map_offset && map_offset < s.end {
                found = Some(*s);
            }
        }
        let s = found?;
        Some(
            start
                .wrapping_sub(map_offset)
                .wrapping_add(s.offset)
                .wrapping_sub(s.vaddr),
        )
    }
}

/// Value of [`VMA_CONFIG_MAP`]: byte offsets of the fields the lookup reads,
/// from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmaOffsets {
    /// 1 when every offset below was found.
    pub enabled: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `vm_area_struct.vm_start`.
    pub vm_start: u32,
    /// `vm_area_struct.vm_end`.
    pub vm_end: u32,
    /// `vm_area_struct.vm_pgoff`.
    pub vm_pgoff: u32,
    /// `vm_area_struct.vm_file`.
    pub vm_file: u32,
    /// `vm_area_struct.vm_mm`.
    pub vm_mm: u32,
    /// `mm_struct.context.vdso` (the vDSO's address).
    pub mm_vdso: u32,
    /// `file.f_inode`.
    pub f_inode: u32,
    /// `inode.i_ino`.
    pub i_ino: u32,
    /// `inode.i_sb`.
    pub i_sb: u32,
    /// `super_block.s_dev`.
    pub s_dev: u32,
    /// `inode.i_mtime_sec` (a 64-bit count of seconds).
    pub i_mtime_sec: u32,
    /// `inode.i_mtime_nsec` (32 bits).
    pub i_mtime_nsec: u32,
}

const _: () = assert!(core::mem::size_of::<VmaOffsets>() == 56);

crate::impl_pod!(FileKey, FileObject, VmaOffsets);

#[cfg(test)]
mod tests {
    use super::*;

    fn object(segments: &[(u64, u64, u64)]) -> FileObject {
        let mut o = FileObject {
            object: 1,
            count: segments.len() as u32,
            ..FileObject::default()
        };
        for (slot, &(offset, size, vaddr)) in o.segments.iter_mut().zip(segments) {
            *slot = FileSegment {
                offset,
                end: offset + size,
                vaddr,
            };
        }
        o
    }

    #[test]
    fn bias_of_a_gnu_ld_text_mapping() {
        // R at 0, RX at 0x1000 loaded at 0x1000: a PIE's bias is its base.
        let o = object(&[(0, 0x800, 0), (0x1000, 0x5000, 0x1000)]);
        assert_eq!(o.bias(0x5555_0000_1000, 0x1000), Some(0x5555_0000_0000));
    }

    #[test]
    fn lld_segments_sharing_a_page_pick_the_one_starting_there() {
        // lld: R covers 0..0x1234, RX starts at 0x1234 at vaddr 0x2234; the
        // RX mapping's offset is 0x1000, which R does not reach but a
        // containment-only match would take if R were longer.
        let o = object(&[(0, 0x1300, 0), (0x1234, 0x4000, 0x2234)]);
        let bias = o.bias(0x7f00_0000_2000, 0x1000).unwrap();
        // The pc at file offset 0x1234 is vaddr 0x2234.
        assert_eq!(0x7f00_0000_2234u64 - bias, 0x2234);
    }

    #[test]
    fn no_segment_no_bias() {
        let o = object(&[(0, 0x800, 0)]);
        assert_eq!(o.bias(0x1000, 0x9000), None);
    }

    #[test]
    fn device_numbers_as_the_kernel_encodes_them() {
        assert_eq!(FileKey::new(0xfe, 0, 7).dev, 0xfe0_0000);
        assert_eq!(FileKey::new(8, 1, 7).dev, 0x80_0001);
    }
}
