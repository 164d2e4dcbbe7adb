//! The walker's second way to an object's rows: by the identity of the file
//! a pc's mapping maps (`profiler_common::unwind_files`). Every object whose
//! rows are in the kernel is entered here under its (device, inode), so a
//! process whose own mappings are not entered yet (a new `rustc`) unwinds
//! with them from its first sample, with no round trip through user space.
//! The kernel-structure offsets the walker needs come from the running
//! kernel's BTF; without them the lookup is off, and said so once.
//!
//! A file is entered by (device, inode) with the modification time it had
//! when its rows were built (the file read, or a cached entry's recorded
//! identity, see [`super::preload`]); the walker uses an entry only for an
//! inode with that very time, so a file rewritten in place (same inode,
//! `cp` over it) never gets the old rows: its pcs are unknown until its
//! own rows are built. User space also withdraws the entry when a process
//! maps that inode with another modification time or size (the refresh
//! frees the idle object). What remains: a rewrite that keeps the
//! modification time (set back on purpose), which no check short of
//! reading the whole file would catch.
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use profiler_common::unwind_files::{
    FILE_SEGMENTS, FILES_MAP, FileKey, FileObject, FileSegment, VMA_CONFIG_MAP, VmaOffsets,
};

use super::{ObjectKey, btf::Btf, take_map};

/// Where the running kernel's BTF is.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The fields the walker reads: (struct, path, slot in [`VmaOffsets`]).
type Slot = fn(&mut VmaOffsets) -> &mut u32;
const FIELDS: [(&str, &[&str], Slot); 13] = [
    ("task_struct", &["mm"], |o| &mut o.task_mm),
    ("vm_area_struct", &["vm_start"], |o| &mut o.vm_start),
    ("vm_area_struct", &["vm_end"], |o| &mut o.vm_end),
    ("vm_area_struct", &["vm_pgoff"], |o| &mut o.vm_pgoff),
    ("vm_area_struct", &["vm_file"], |o| &mut o.vm_file),
    ("vm_area_struct", &["vm_mm"], |o| &mut o.vm_mm),
    ("mm_struct", &["context", "vdso"], |o| &mut o.mm_vdso),
    ("file", &["f_inode"], |o| &mut o.f_inode),
    ("inode", &["i_ino"], |o| &mut o.i_ino),
    ("inode", &["i_sb"], |o| &mut o.i_sb),
    ("super_block", &["s_dev"], |o| &mut o.s_dev),
    // Since Linux 6.11 (before: `i_mtime`, a timespec64, not read).
    ("inode", &["i_mtime_sec"], |o| &mut o.i_mtime_sec),
    ("inode", &["i_mtime_nsec"], |o| &mut o.i_mtime_nsec),
];

/// The offsets of every field the walker reads, or the first one missing.
pub fn vma_offsets(btf: &Btf) -> Result<VmaOffsets, String> {
    let mut offsets = VmaOffsets::default();
    for (name, path, slot) in FIELDS {
        *slot(&mut offsets) = btf
            .offset_of(name, path)
            .ok_or_else(|| format!("{name}.{} not in the kernel's BTF", path.join(".")))?;
    }
    offsets.enabled = 1;
    Ok(offsets)
}

/// The kernel's key of an object's file.
pub fn file_key(key: &ObjectKey) -> FileKey {
    FileKey::new(key.dev.0, key.dev.1, key.inode)
}

/// The entry of object `id` with load segments `segments` (file offset,
/// size, virtual address), for the file modified at `mtime_ns` (`None`: not
/// checked); `None` when it has more segments than the entry holds.
pub fn file_object(
    id: u32,
    segments: &[(u64, u64, u64)],
    mtime_ns: Option<i64>,
) -> Option<FileObject> {
    if id == 0 || segments.len() > FILE_SEGMENTS {
        return None;
    }
    let mut entry = FileObject {
        object: id,
        count: segments.len() as u32,
        ..FileObject::default()
    };
    if let Some(ns) = mtime_ns {
        entry.mtime_sec = ns.div_euclid(1_000_000_000);
        entry.mtime_nsec = ns.rem_euclid(1_000_000_000) as u32;
        entry.mtime_known = 1;
    }
    for (slot, &(offset, size, vaddr)) in entry.segments.iter_mut().zip(segments) {
        *slot = FileSegment {
            offset,
            end: offset + size,
            vaddr,
        };
    }
    Some(entry)
}

/// The file-identity index in the kernel.
pub struct Files {
    map: BpfHashMap<MapData, FileKey, FileObject>,
    /// Held so that the map lives as long as the programs that read it.
    _config: Array<MapData, VmaOffsets>,
}

impl Files {
    /// Takes the maps and gives the walker the kernel's offsets; prints why
    /// the lookup is off if they cannot be found.
    pub fn new(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let map = BpfHashMap::try_from(take_map(ebpf, FILES_MAP)?)?;
        let mut config: Array<MapData, VmaOffsets> =
            Array::try_from(take_map(ebpf, VMA_CONFIG_MAP)?)?;
        let offsets = std::fs::read(VMLINUX_BTF)
            .map_err(|e| format!("reading {VMLINUX_BTF}: {e}"))
            .and_then(|data| Btf::parse(&data).map_err(|e| format!("{VMLINUX_BTF}: {e}")))
            .and_then(|btf| vma_offsets(&btf));
        match offsets {
            Ok(offsets) => config.set(0, offsets, 0)?,
            Err(why) => eprintln!(
                "prof-bpf: new processes wait for their own unwind tables ({why}): \
                 their first stacks are copied"
            ),
        }
        Ok(Self {
            map,
            _config: config,
        })
    }

    /// Enters the file `key`, modified at `mtime_ns`, as covered by object
    /// `id`.
    pub fn publish(
        &mut self,
        key: &ObjectKey,
        id: u32,
        segments: &[(u64, u64, u64)],
        mtime_ns: Option<i64>,
    ) {
        if let Some(entry) = file_object(id, segments, mtime_ns)
            && let Err(err) = self.map.insert(file_key(key), entry, 0)
        {
            log::debug!("unwind file index: {err}");
        }
    }

    /// Removes the file `key` (its rows are freed).
    pub fn withdraw(&mut self, key: &ObjectKey) {
        let _ = self.map.remove(&file_key(key));
    }
}

#[cfg(test)]
mod tests {
    use super::{super::btf::tests::Builder, *};

    #[test]
    fn every_offset_or_the_missing_field() {
        let mut b = Builder::new();
        let long = b.int("long unsigned int", 8);
        let p = b.ptr(long);
        let dev = b.int("unsigned int", 4);
        b.record("task_struct", false, &[("mm", p, 2000)]);
        b.record(
            "vm_area_struct",
            false,
            &[
                ("vm_start", long, 0),
                ("vm_end", long, 8),
                ("vm_mm", p, 16),
                ("vm_pgoff", long, 120),
                ("vm_file", p, 136),
            ],
        );
        let ctx = b.record("", false, &[("vdso", p, 24)]);
        b.record("mm_struct", false, &[("context", ctx, 1000)]);
        b.record("file", false, &[("f_inode", p, 32)]);
        b.record(
            "inode",
            false,
            &[
                ("i_sb", p, 40),
                ("i_ino", long, 64),
                ("i_mtime_sec", long, 88),
                ("i_mtime_nsec", dev, 96),
            ],
        );
        let partial = Btf::parse(&b.finish()).unwrap();
        assert_eq!(
            vma_offsets(&partial),
            Err("super_block.s_dev not in the kernel's BTF".to_owned())
        );
        b.record("super_block", false, &[("s_dev", dev, 16)]);
        let offsets = vma_offsets(&Btf::parse(&b.finish()).unwrap()).unwrap();
        assert_eq!(
            offsets,
            VmaOffsets {
                enabled: 1,
                task_mm: 2000,
                vm_start: 0,
                vm_end: 8,
                vm_pgoff: 120,
                vm_file: 136,
                vm_mm: 16,
                mm_vdso: 1024,
                f_inode: 32,
                i_ino: 64,
                i_sb: 40,
                s_dev: 16,
                i_mtime_sec: 88,
                i_mtime_nsec: 96,
            }
        );
    }

    #[test]
    fn entries_match_the_bias_the_trie_gets() {
        let segments = [(0, 0x2000, 0), (0x2000, 0x8000, 0x3000)];
        let entry = file_object(7, &segments, Some(1_700_000_000_250_000_000)).unwrap();
        assert_eq!(
            (entry.mtime_sec, entry.mtime_nsec),
            (1_700_000_000, 250_000_000)
        );
        assert!(entry.same_mtime(1_700_000_000, 250_000_000));
        assert!(!entry.same_mtime(1_700_000_000, 250_000_001));
        assert!(file_object(7, &segments, None).unwrap().same_mtime(1, 2));
        assert_eq!(entry.object, 7);
        // Mapping of offset 0x2000 at 0x7f00_0000_0000: vaddr 0x3000 there.
        let bias = entry.bias(0x7f00_0000_0000, 0x2000).unwrap();
        assert_eq!(0x7f00_0000_0000u64 - bias, 0x3000);
        assert_eq!(file_object(0, &segments, None), None);
        assert_eq!(file_object(7, &[(0, 1, 0); FILE_SEGMENTS + 1], None), None);
    }

    #[test]
    fn device_of_proc_maps_as_the_kernel_has_it() {
        let key = ObjectKey {
            dev: (0xfe, 1),
            inode: 42,
        };
        assert_eq!(file_key(&key), FileKey::new(0xfe, 1, 42));
        assert_eq!(file_key(&key).dev, 0xfe0_0001);
    }
}
