//! Unwind tables for the kernel-side stack walker.
//!
//! The walker (`profiler-ebpf/src/unwind.rs`) finds a frame's caller with the
//! compact rows of `profiler_common::unwind`. This module builds them: for
//! every executable file mapping of a process, the object's CFI is compiled
//! once ([`cfi`]) and loaded into the shared row array, then the process's
//! address ranges are entered in the per-process trie. Objects are shared by
//! every process that maps them (keyed by device and inode). When the last
//! such process goes, their rows stay loaded (idle) for the next process of
//! the same binary, until the memory cap needs their room.
//!
//! Your responsibilities: call [`Tables::add_process`] for every process
//! whose stacks you want complete, [`Tables::refresh_process`] when it execs
//! or maps new code, [`Tables::remove_process`] when it exits, and
//! [`Tables::poll`] periodically: it refreshes processes whose walks met
//! code outside their known mappings (a `dlopen` since the last refresh) and
//! returns the pids the tables do not know yet. Where no rows exist, the
//! walker follows frame pointers.
mod build;
mod cache;
mod cache_format;
pub mod cfi;
pub mod copied;
pub mod debug;
mod expr;
pub mod options;
pub mod rows;
mod source;
mod stats;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{
    HashMap as BpfHashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use build::{Builder, FileId};
use log::{debug, warn};
pub use options::{UnwindArgs, UnwindOptions};
use profiler_common::unwind::{
    MAPPINGS_MAP, MappingInfo, MappingKey, PAGES_MAP, PageKey, PageRows, REFRESH_MAP,
    ROW_SHARDS_MAP,
};
use rows::RowStore;
use source::{file_identity, read_object};
pub use stats::TableStats;

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
    /// Row ranges it owns in the row shards: (first, len).
    ranges: Vec<(u32, u32)>,
    /// Rows it owns.
    len: u32,
    /// Page numbers it owns in the page index.
    pages: Vec<u32>,
    /// (file offset, file size, virtual address) of its load segments.
    segments: Vec<(u64, u64, u64)>,
    /// Installed mappings that use it.
    users: usize,
    /// Since when no process maps it: its rows stay loaded for the next
    /// process of the same binary until their room is needed.
    idle_since: Option<Instant>,
    /// The file's (modification time in ns, size) when loaded: an idle
    /// object is reused only for the same file (an inode can be reused).
    identity: Option<(i64, u64)>,
    /// GNU build id: another file with the same one shares these rows.
    build_id: Option<Vec<u8>>,
    name: String,
}

impl Object {
    /// An object whose code is unwound by frame pointers only.
    fn without_tables(name: String) -> Self {
        Self {
            id: 0,
            ranges: Vec::new(),
            len: 0,
            pages: Vec::new(),
            segments: Vec::new(),
            users: 0,
            idle_since: None,
            identity: None,
            build_id: None,
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

/// The unwind tables of the processes being profiled, kept in the BPF maps.
pub struct Tables {
    rows: RowStore,
    builder: Builder,
    pages: BpfHashMap<MapData, PageKey, PageRows>,
    mappings: LpmTrie<MapData, MappingKey, MappingInfo>,
    refresh: BpfHashMap<MapData, u32, u64>,
    objects: HashMap<ObjectKey, Object>,
    /// Loaded rows by build id (object id), and how many objects (files)
    /// use each such set of rows.
    by_build_id: HashMap<Vec<u8>, u32>,
    sharers: HashMap<u32, usize>,
    processes: HashMap<u32, HashSet<Installed>>,
    last_refresh: HashMap<u32, Instant>,
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
    /// Takes the unwinder's table maps out of `ebpf` (once per object), with
    /// the default options.
    pub fn new(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Self::with_options(ebpf, &UnwindOptions::default())
    }

    /// [`Tables::new`] with at most `options.memory_mib` MiB of rows in the
    /// kernel, and the options' disk cache.
    pub fn with_options(ebpf: &mut aya::Ebpf, options: &UnwindOptions) -> anyhow::Result<Self> {
        let rows = RowStore::new(take_map(ebpf, ROW_SHARDS_MAP)?, options.memory_mib)?;
        let stats = TableStats {
            cap_bytes: rows.cap_bytes(),
            ..TableStats::default()
        };
        Ok(Self {
            rows,
            builder: Builder::new(options),
            pages: BpfHashMap::try_from(take_map(ebpf, PAGES_MAP)?)?,
            mappings: LpmTrie::try_from(take_map(ebpf, MAPPINGS_MAP)?)?,
            refresh: BpfHashMap::try_from(take_map(ebpf, REFRESH_MAP)?)?,
            objects: HashMap::new(),
            by_build_id: HashMap::new(),
            sharers: HashMap::new(),
            processes: HashMap::new(),
            last_refresh: HashMap::new(),
            next_id: 1,
            stats,
        })
    }

    /// Sizes of what is loaded and the time spent building it.
    pub fn stats(&self) -> TableStats {
        TableStats {
            build: self.builder.stats(),
            ..self.stats
        }
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

    /// Gives `pid` the tables of the objects already loaded for other
    /// processes, and builds none: nearly free, so it needs no budget (a new
    /// `rustc` gets `librustc_driver` at once once any `rustc` has it). The
    /// objects left out are installed by a later [`Self::add_process`].
    pub fn install_loaded(&mut self, pid: u32) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh(pid, false)
    }

    /// Brings `pid`'s tables in line with its current mappings (after a
    /// `dlopen`, `munmap` or `exec`).
    pub fn refresh_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.refresh(pid, true)
    }

    /// [`Self::refresh_process`]; without `build`, objects not loaded yet
    /// are left out.
    fn refresh(&mut self, pid: u32, build: bool) -> anyhow::Result<()> {
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
            if !build && !self.objects.contains_key(&new.key) {
                continue;
            }
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
    /// call, and returns those that have no tables yet. Without `build`,
    /// only objects already loaded are installed.
    pub fn poll(&mut self, build: bool) -> Vec<u32> {
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
                if let Err(err) = self.refresh(pid, build) {
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
        if let Some(idle) = self.objects.get(&m.key).filter(|o| o.users == 0)
            && idle.identity != file_identity(pid, mapping)
        {
            // Another file now has this device and inode.
            let stale = self.objects.remove(&m.key).expect("looked up above");
            self.free_object(stale);
        }
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
        object.idle_since = None;
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
            object.idle_since = Some(Instant::now());
        }
    }

    /// Frees the rows of the object that has been idle longest; false when
    /// no object is idle.
    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .objects
            .iter()
            .filter(|(_, o)| o.users == 0 && o.id != 0)
            .min_by_key(|(_, o)| o.idle_since)
            .map(|(k, _)| *k);
        let Some(key) = oldest else {
            return false;
        };
        let object = self.objects.remove(&key).expect("found above");
        debug!("unwind tables of idle {} freed for room", object.name);
        self.free_object(object);
        true
    }

    fn load_object(&mut self, pid: u32, mapping: &Mapping) -> anyhow::Result<Object> {
        let identity = file_identity(pid, mapping);
        let data = read_object(pid, mapping)?;
        let segments = cfi::load_segments(&data)?;
        let build_id = cfi::build_id(&data).filter(|b| !b.is_empty());
        if let Some(shared) = build_id.as_ref().and_then(|b| self.shared_rows(b)) {
            // The same code in another file (a copy, another mount, a
            // container's layer): the rows are already loaded.
            debug!("unwind tables for {} shared by build id", mapping.path);
            return Ok(Object {
                segments,
                identity,
                build_id,
                name: mapping.path.clone(),
                ..shared
            });
        }
        let file = identity.map(|(mtime_ns, size)| FileId {
            dev: mapping.dev,
            inode: mapping.inode,
            mtime_ns,
            size,
        });
        let compiled = self
            .builder
            .rows(&data, build_id.clone(), file)
            .with_context(|| format!("reading the CFI of {}", mapping.path))?;
        let mut object = Object {
            id: 0,
            ranges: Vec::new(),
            len: 0,
            pages: Vec::new(),
            segments,
            users: 0,
            idle_since: None,
            identity,
            build_id,
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
        let placed = loop {
            match self.rows.place(&compiled.pages, &compiled.rows) {
                Ok(placed) => break placed,
                // Under the cap, idle objects make room first.
                Err(_) if self.evict_idle() => {}
                Err(err) => {
                    if err.is::<rows::CapReached>() {
                        self.stats.over_cap += 1;
                    }
                    return Err(err)
                        .with_context(|| format!("loading the unwind rows of {}", mapping.path));
                }
            }
        };
        object.id = self.next_id;
        self.next_id += 1;
        object.ranges = placed.ranges;
        object.len = len;
        for (&(page, _, count), &first) in compiled.pages.iter().zip(&placed.page_firsts) {
            let key = PageKey {
                object: object.id,
                page,
            };
            let value = PageRows { first, count };
            if let Err(err) = self.pages.insert(key, value, 0) {
                self.free_object(object);
                return Err(err).context("unwind page index full");
            }
            object.pages.push(page);
        }
        if let Some(b) = &object.build_id {
            self.by_build_id.insert(b.clone(), object.id);
            self.sharers.insert(object.id, 1);
        }
        self.stats.objects += 1;
        self.stats.rows += len as usize;
        self.stats.pages += object.pages.len();
        self.stats.unsupported_rows += compiled.unsupported;
        self.stats.shard_bytes = self.rows.bytes();
        debug!(
            "unwind tables for {}: {} rows, {} pages, {} unsupported",
            mapping.path,
            len,
            object.pages.len(),
            compiled.unsupported
        );
        Ok(object)
    }

    /// The rows loaded for `build_id`, for one more object to use.
    fn shared_rows(&mut self, build_id: &[u8]) -> Option<Object> {
        let id = *self.by_build_id.get(build_id)?;
        let owner = self.objects.values().find(|o| o.id == id)?;
        let shared = Object {
            id,
            ranges: owner.ranges.clone(),
            len: owner.len,
            pages: owner.pages.clone(),
            ..Object::without_tables(String::new())
        };
        *self.sharers.entry(id).or_insert(1) += 1;
        self.stats.shared += 1;
        Some(shared)
    }

    fn free_object(&mut self, object: Object) {
        if object.id == 0 {
            return;
        }
        // Rows shared by build id are freed with their last user.
        if let Some(n) = self.sharers.get_mut(&object.id) {
            *n -= 1;
            if *n > 0 {
                self.stats.shared -= 1;
                return;
            }
            self.sharers.remove(&object.id);
            if let Some(b) = &object.build_id {
                self.by_build_id.remove(b);
            }
        }
        for &page in &object.pages {
            let _ = self.pages.remove(&PageKey {
                object: object.id,
                page,
            });
        }
        self.rows.release(&object.ranges);
        self.stats.objects -= 1;
        self.stats.rows -= object.len as usize;
        self.stats.pages -= object.pages.len();
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
