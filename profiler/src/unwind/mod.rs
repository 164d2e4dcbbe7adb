//! Unwind tables for the kernel-side stack walker.
//!
//! The walker (`profiler-ebpf/src/unwind.rs`) finds a frame's caller with the
//! compact rows of `profiler_common::unwind`. This module builds them: for
//! every executable file mapping of a process, the object's CFI is compiled
//! once ([`cfi`]) and loaded into the shared row array, then the process's
//! address ranges are entered in the per-process trie. Objects are shared by
//! every process that maps them (keyed by device and inode), and their rows
//! are freed when the last such process goes.
//!
//! Your responsibilities: call [`Tables::add_process`] for every process
//! whose stacks you want complete, [`Tables::refresh_process`] when it execs
//! or maps new code, [`Tables::remove_process`] when it exits, and
//! [`Tables::poll`] periodically: it refreshes processes whose walks met
//! code outside their known mappings (a `dlopen` since the last refresh) and
//! returns the pids the tables do not know yet. Where no rows exist, the
//! walker follows frame pointers.
pub mod cfi;
pub mod copied;
pub mod debug;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{
    HashMap as BpfHashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use log::{debug, warn};
use profiler_common::unwind::{
    MAPPINGS_MAP, MappingInfo, MappingKey, PAGES_MAP, PageKey, PageRows, REFRESH_MAP, ROWS_MAP,
    ROWS_MAX, UnwindRow,
};

use crate::process::{self, Mapping};

/// Name of the kernel's vDSO mapping (`clock_gettime` and friends), which
/// has CFI like any shared object but no file: it is read from memory. Its
/// key is device 0, inode 0: every process of this kernel maps the same
/// image.
const VDSO: &str = "[vdso]";

/// Identity of a mapped file: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    dev: (u32, u32),
    inode: u64,
}

/// An object whose rows are loaded.
struct Object {
    /// Id in the page index; 0 when the object has no usable CFI.
    id: u32,
    /// Rows it owns in the row array: `first..first + len`.
    first: u32,
    len: u32,
    /// Page numbers it owns in the page index.
    pages: Vec<u32>,
    /// (file offset, file size, virtual address) of its load segments.
    segments: Vec<(u64, u64, u64)>,
    /// Installed mappings that use it.
    users: usize,
    name: String,
}

impl Object {
    /// An object whose code is unwound by frame pointers only.
    fn without_tables(name: String) -> Self {
        Self {
            id: 0,
            first: 0,
            len: 0,
            pages: Vec::new(),
            segments: Vec::new(),
            users: 0,
            name,
        }
    }
}

/// A mapping entered in the trie for one process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Installed {
    start: u64,
    end: u64,
    offset: u64,
    key: ObjectKey,
}

/// Sizes and costs of the loaded tables.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableStats {
    /// Objects with rows loaded.
    pub objects: usize,
    /// Rows in the row array.
    pub rows: usize,
    /// 64 KiB pages in the page index.
    pub pages: usize,
    /// Address prefixes in the per-process trie.
    pub prefixes: usize,
    /// Rows whose rule the walker cannot evaluate.
    pub unsupported_rows: usize,
    /// Time spent reading and compiling CFI and loading it.
    pub build_time: Duration,
}

impl TableStats {
    /// Kernel memory the tables use, in bytes: rows, page index entries and
    /// trie entries (key + value, without the maps' own overhead).
    pub fn bytes(&self) -> usize {
        self.rows * size_of::<UnwindRow>()
            + self.pages * (size_of::<PageKey>() + size_of::<PageRows>())
            + self.prefixes * (4 + size_of::<MappingKey>() + size_of::<MappingInfo>())
    }
}

/// The row array, mapped into this process (`BPF_F_MMAPABLE`) so that an
/// object's rows are written with one copy instead of a syscall per row.
/// BPF arrays round elements up to 8 bytes; rows are exactly 8, so the
/// mapping is a plain `[UnwindRow]`.
struct RowArray {
    ptr: *mut UnwindRow,
    len: usize,
    _map: MapData,
}

impl RowArray {
    fn new(map: MapData) -> anyhow::Result<Self> {
        let len = ROWS_MAX as usize;
        let bytes = (len * size_of::<UnwindRow>()).next_multiple_of(4096);
        // SAFETY: maps a BPF array created with BPF_F_MMAPABLE; the length
        // is its value area rounded up to pages, as the kernel requires.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the unwind row array");
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            _map: map,
        })
    }

    fn write(&mut self, at: u32, rows: &[UnwindRow]) {
        let at = at as usize;
        assert!(at + rows.len() <= self.len, "row range out of bounds");
        // SAFETY: the range is inside the mapping (checked above), and the
        // mapping is plain memory shared with the kernel; the walker reads
        // these rows only once a page entry points at them, which happens
        // after this copy.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), self.ptr.add(at), rows.len()) };
    }
}

impl Drop for RowArray {
    fn drop(&mut self) {
        let bytes = (self.len * size_of::<UnwindRow>()).next_multiple_of(4096);
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
    }
}

/// The unwind tables of the processes being profiled, kept in the BPF maps.
pub struct Tables {
    rows: RowArray,
    pages: BpfHashMap<MapData, PageKey, PageRows>,
    mappings: LpmTrie<MapData, MappingKey, MappingInfo>,
    refresh: BpfHashMap<MapData, u32, u64>,
    objects: HashMap<ObjectKey, Object>,
    processes: HashMap<u32, HashSet<Installed>>,
    last_refresh: HashMap<u32, Instant>,
    /// Free row ranges (first, len), sorted by first.
    free: Vec<(u32, u32)>,
    next_id: u32,
    stats: TableStats,
}

/// Minimum time between two refreshes of one process asked for by the walker.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

fn take_map(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object (or already taken)"))
}

impl Tables {
    /// Takes the unwinder's table maps out of `ebpf` (once per object).
    pub fn new(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let Map::Array(rows) = take_map(ebpf, ROWS_MAP)? else {
            bail!("map {ROWS_MAP} is not an array");
        };
        Ok(Self {
            rows: RowArray::new(rows)?,
            pages: BpfHashMap::try_from(take_map(ebpf, PAGES_MAP)?)?,
            mappings: LpmTrie::try_from(take_map(ebpf, MAPPINGS_MAP)?)?,
            refresh: BpfHashMap::try_from(take_map(ebpf, REFRESH_MAP)?)?,
            objects: HashMap::new(),
            processes: HashMap::new(),
            last_refresh: HashMap::new(),
            free: vec![(0, ROWS_MAX)],
            next_id: 1,
            stats: TableStats::default(),
        })
    }

    /// Sizes of what is loaded and the time spent building it.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Whether `pid` has tables.
    pub fn has_process(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    /// Loads tables for every executable mapping of `pid` (objects already
    /// loaded for other processes are shared).
    pub fn add_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh_process(pid)
    }

    /// Brings `pid`'s tables in line with its current mappings (after a
    /// `dlopen`, `munmap` or `exec`).
    pub fn refresh_process(&mut self, pid: u32) -> anyhow::Result<()> {
        let started = Instant::now();
        self.last_refresh.insert(pid, started);
        let maps = match process::maps(pid) {
            Ok(maps) => maps,
            Err(err) => {
                self.remove_process(pid);
                return Err(err);
            }
        };
        let wanted: HashSet<Installed> = maps
            .iter()
            .filter(|m| m.is_executable() && (m.is_file() || m.path == VDSO))
            .map(|m| Installed {
                start: m.start,
                end: m.end,
                offset: m.offset,
                key: ObjectKey {
                    dev: m.dev,
                    inode: m.inode,
                },
            })
            .collect();
        let current = self.processes.remove(&pid).unwrap_or_default();
        for gone in current.difference(&wanted) {
            self.uninstall(pid, gone);
        }
        let mut installed: HashSet<Installed> = current.intersection(&wanted).cloned().collect();
        for new in wanted.difference(&current) {
            let mapping = maps
                .iter()
                .find(|m| m.start == new.start && m.end == new.end)
                .expect("wanted mappings come from maps");
            match self.install(pid, mapping, new) {
                Ok(()) => {
                    installed.insert(new.clone());
                }
                // One unreadable object only costs its own frames.
                Err(err) if process::state(pid).is_none() => debug!("{err:#}"),
                Err(err) => warn!("pid {pid}: no unwind tables for {}: {err:#}", mapping.path),
            }
        }
        self.processes.insert(pid, installed);
        self.stats.build_time += started.elapsed();
        Ok(())
    }

    /// Drops `pid`'s tables (objects no other process uses are freed).
    pub fn remove_process(&mut self, pid: u32) {
        self.last_refresh.remove(&pid);
        if let Some(installed) = self.processes.remove(&pid) {
            for m in &installed {
                self.uninstall(pid, m);
            }
        }
    }

    /// Refreshes the processes whose walks met unknown code since the last
    /// call, and returns those that have no tables yet.
    pub fn poll(&mut self) -> Vec<u32> {
        let requested: Vec<u32> = self.refresh.keys().filter_map(Result::ok).collect();
        let mut unknown = Vec::new();
        for pid in requested {
            if self.processes.contains_key(&pid) {
                if self
                    .last_refresh
                    .get(&pid)
                    .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL)
                {
                    continue;
                }
                if let Err(err) = self.refresh_process(pid) {
                    debug!("refreshing unwind tables of pid {pid}: {err:#}");
                }
            } else {
                unknown.push(pid);
            }
            let _ = self.refresh.remove(&pid);
        }
        unknown
    }

    fn install(&mut self, pid: u32, mapping: &Mapping, m: &Installed) -> anyhow::Result<()> {
        if !self.objects.contains_key(&m.key) {
            let object = match self.load_object(pid, mapping) {
                Ok(object) => object,
                // A process that exited meanwhile took its view of the file
                // with it: that says nothing about the object, which the
                // next process to map it loads as usual.
                Err(_) if process::state(pid).is_none_or(|s| s == 'Z' || s == 'X') => {
                    bail!(
                        "pid {pid} exited before the tables of {} were built",
                        mapping.path
                    )
                }
                Err(err) => {
                    // Remembered as an object without tables, so that every
                    // other process mapping it does not rebuild and fail again
                    // (whole-host sessions meet the same large objects in many
                    // processes); frame pointers are followed in its code.
                    warn!(
                        "no unwind tables for {}: {err:#}; following frame pointers there",
                        mapping.path
                    );
                    Object::without_tables(mapping.path.clone())
                }
            };
            self.objects.insert(m.key, object);
        }
        let object = self.objects.get_mut(&m.key).expect("inserted above");
        object.users += 1;
        if object.id == 0 {
            return Ok(());
        }
        // The kernel maps each load segment from its offset rounded down to
        // a page; segments can share a page (lld), so match that exactly
        // before falling back to containment.
        let Some(&(seg_off, _, seg_vaddr)) = object
            .segments
            .iter()
            .find(|&&(off, _, _)| off & !0xfff == m.offset)
            .or_else(|| {
                object
                    .segments
                    .iter()
                    .find(|&&(off, size, _)| off <= m.offset && m.offset < off + size)
            })
        else {
            bail!(
                "offset {:#x} is in no load segment of {}",
                m.offset,
                object.name
            );
        };
        // address - bias = virtual address in the object.
        let bias = m
            .start
            .wrapping_sub(m.offset)
            .wrapping_add(seg_off)
            .wrapping_sub(seg_vaddr);
        let info = MappingInfo {
            bias,
            object: object.id,
            _pad: 0,
        };
        for (prefix_len, addr) in prefixes(m.start, m.end) {
            self.mappings
                .insert(&Key::new(prefix_len, MappingKey::new(pid, addr)), info, 0)
                .context("adding to the unwind mapping trie (full?)")?;
            self.stats.prefixes += 1;
        }
        Ok(())
    }

    fn uninstall(&mut self, pid: u32, m: &Installed) {
        let Some(object) = self.objects.get_mut(&m.key) else {
            return;
        };
        if object.id != 0 {
            for (prefix_len, addr) in prefixes(m.start, m.end) {
                if self
                    .mappings
                    .remove(&Key::new(prefix_len, MappingKey::new(pid, addr)))
                    .is_ok()
                {
                    self.stats.prefixes -= 1;
                }
            }
        }
        object.users -= 1;
        if object.users == 0 {
            let object = self.objects.remove(&m.key).expect("looked up above");
            self.free_object(object);
        }
    }

    fn load_object(&mut self, pid: u32, mapping: &Mapping) -> anyhow::Result<Object> {
        let data = read_object(pid, mapping)?;
        let segments = cfi::load_segments(&data)?;
        let compiled =
            cfi::compile(&data).with_context(|| format!("reading the CFI of {}", mapping.path))?;
        let mut object = Object {
            id: 0,
            first: 0,
            len: 0,
            pages: Vec::new(),
            segments,
            users: 0,
            name: mapping.path.clone(),
        };
        if compiled.rows.is_empty() {
            debug!(
                "{} has no CFI: frame pointers are followed there",
                mapping.path
            );
            return Ok(object);
        }
        let len = compiled.rows.len() as u32;
        let first = self.alloc_rows(len).with_context(|| {
            format!(
                "unwind row array full ({ROWS_MAX} rows) loading {}",
                mapping.path
            )
        })?;
        self.rows.write(first, &compiled.rows);
        object.id = self.next_id;
        self.next_id += 1;
        object.first = first;
        object.len = len;
        for &(page, start, count) in &compiled.pages {
            let key = PageKey {
                object: object.id,
                page,
            };
            let value = PageRows {
                first: first + start,
                count,
            };
            if let Err(err) = self.pages.insert(key, value, 0) {
                self.free_object(object);
                return Err(err).context("unwind page index full");
            }
            object.pages.push(page);
        }
        self.stats.objects += 1;
        self.stats.rows += len as usize;
        self.stats.pages += object.pages.len();
        self.stats.unsupported_rows += compiled.unsupported;
        debug!(
            "unwind tables for {}: {} rows, {} pages, {} unsupported",
            mapping.path,
            len,
            object.pages.len(),
            compiled.unsupported
        );
        Ok(object)
    }

    fn free_object(&mut self, object: Object) {
        if object.id == 0 {
            return;
        }
        for &page in &object.pages {
            let _ = self.pages.remove(&PageKey {
                object: object.id,
                page,
            });
        }
        self.free_rows(object.first, object.len);
        self.stats.objects -= 1;
        self.stats.rows -= object.len as usize;
        self.stats.pages -= object.pages.len();
    }

    /// First fit in the free list.
    fn alloc_rows(&mut self, len: u32) -> Option<u32> {
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (first, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (first + len, l - len);
        }
        Some(first)
    }

    fn free_rows(&mut self, first: u32, len: u32) {
        let i = self.free.partition_point(|&(f, _)| f < first);
        self.free.insert(i, (first, len));
        // Merge with the neighbours.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// The bytes of a mapped object: the file, or the vDSO from memory.
fn read_object(pid: u32, mapping: &Mapping) -> anyhow::Result<ObjectBytes> {
    if mapping.path == VDSO {
        let mut data = vec![0; (mapping.end - mapping.start) as usize];
        let mem = File::open(format!("/proc/{pid}/mem")).context("opening the process's memory")?;
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut data, mapping.start)
            .context("reading the vDSO")?;
        return Ok(ObjectBytes::Memory(data));
    }
    // map_files reaches the very file mapped, even if it was replaced or
    // lives in another mount namespace; the path is the fallback.
    let by_map = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    );
    let file = File::open(&by_map)
        .or_else(|_| File::open(process::path_in_root(pid, &mapping.path)))
        .with_context(|| format!("opening {}", mapping.path))?;
    // SAFETY: the file is mapped read-only and only parsed; a concurrent
    // truncation could fault, which no profiled program does to its own
    // loaded code.
    let data = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", mapping.path))?;
    Ok(ObjectBytes::File(data))
}

/// An object's bytes, mapped from its file or copied from memory.
enum ObjectBytes {
    File(memmap2::Mmap),
    Memory(Vec<u8>),
}

impl std::ops::Deref for ObjectBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::File(m) => m,
            Self::Memory(v) => v,
        }
    }
}

/// Splits [start, end) into aligned power-of-two blocks, as trie prefixes:
/// (prefix length over pid + address, block start).
fn prefixes(mut start: u64, end: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    while start < end {
        let align = if start == 0 {
            63
        } else {
            start.trailing_zeros()
        };
        let fit = 63 - (end - start).leading_zeros();
        let bits = align.min(fit);
        out.push((32 + 64 - bits, start));
        start += 1 << bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_range_exactly() {
        let (start, end) = (0x7f00_1234_5000, 0x7f00_1240_3000);
        let mut at = start;
        for (len, addr) in prefixes(start, end) {
            assert_eq!(addr, at);
            let size = 1u64 << (96 - len);
            assert_eq!(addr % size, 0);
            at += size;
        }
        assert_eq!(at, end);
    }
}
