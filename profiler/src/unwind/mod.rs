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
//! The expensive part (reading an object, then its rows from the on-disk
//! cache or compiled from its CFI) runs on a builder thread of its own
//! ([`background`]), so that a session's loop never waits for it unless it
//! asks to. The loop places finished objects in the kernel's maps
//! ([`requests`]).
//!
//! Your responsibilities: call [`Tables::request`] (queue, do not wait) or
//! [`Tables::add_process`] (wait) for every process whose stacks you want
//! complete, [`Tables::refresh_process`] when it execs or maps new code,
//! [`Tables::remove_process`] when it exits, and periodically
//! [`Tables::poll_queued`] (or [`Tables::poll`]): it refreshes processes
//! whose walks met code outside their known mappings (a `dlopen` since the
//! last refresh), places the objects the builder finished and returns the
//! pids the tables did not know. With a budget ([`Tables::limit_builds`],
//! whole-host sessions), give the builder the busiest processes with
//! [`Tables::prioritize`]. At the end, [`Tables::complete`] builds what the
//! remaining stack copies need, whatever the budget. Where no rows exist,
//! the walker follows frame pointers.
mod background;
mod btf;
pub mod budget;
mod build;
mod cache;
mod cache_format;
pub mod cfi;
mod clone_gap;
pub mod copied;
mod crt;
pub mod debug;
mod expr;
mod files;
pub mod options;
mod plt;
mod preload;
mod regs_row;
mod requests;
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
use background::Queue;
use build::BuildStats;
use log::{debug, warn};
pub use options::{UnwindArgs, UnwindOptions};
use profiler_common::unwind::{
    MAPPINGS_MAP, MappingInfo, MappingKey, PAGES_MAP, PageKey, PageRows, REFRESH_MAP,
    ROW_SHARDS_MAP,
};
use rows::RowStore;
use source::file_identity;
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
    /// The builder thread, and its totals as of its last result.
    queue: Queue,
    build_stats: [BuildStats; 2],
    /// Objects queued or being built.
    requested: HashSet<ObjectKey>,
    /// Per process, the mappings whose objects are being built: installed
    /// when they arrive (even after the process exited, for its copies).
    pending: HashMap<u32, HashSet<Installed>>,
    /// Per process, a count of the times it got more tables.
    generations: HashMap<u32, u64>,
    /// Processes whose walks asked for tables (see [`Tables::poll_queued`]).
    asked: HashSet<u32>,
    pages: BpfHashMap<MapData, PageKey, PageRows>,
    mappings: LpmTrie<MapData, MappingKey, MappingInfo>,
    refresh: BpfHashMap<MapData, u32, u64>,
    objects: HashMap<ObjectKey, Object>,
    /// The loaded objects by file identity, for the walker.
    files: files::Files,
    /// Loaded rows by build id (object id), and how many objects (files)
    /// use each such set of rows.
    by_build_id: HashMap<Vec<u8>, u32>,
    sharers: HashMap<u32, usize>,
    processes: HashMap<u32, HashSet<Installed>>,
    last_refresh: HashMap<u32, Instant>,
    next_id: u32,
    stats: TableStats,
    options: UnwindOptions,
    /// When the preload was asked for, and its budget in bytes.
    preloading: Option<(Instant, u64)>,
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
            queue: Queue::start(options)?,
            build_stats: [BuildStats::default(); 2],
            requested: HashSet::new(),
            pending: HashMap::new(),
            generations: HashMap::new(),
            asked: HashSet::new(),
            pages: BpfHashMap::try_from(take_map(ebpf, PAGES_MAP)?)?,
            mappings: LpmTrie::try_from(take_map(ebpf, MAPPINGS_MAP)?)?,
            refresh: BpfHashMap::try_from(take_map(ebpf, REFRESH_MAP)?)?,
            objects: HashMap::new(),
            files: files::Files::new(ebpf)?,
            by_build_id: HashMap::new(),
            sharers: HashMap::new(),
            processes: HashMap::new(),
            last_refresh: HashMap::new(),
            next_id: 1,
            stats,
            options: options.clone(),
            preloading: None,
        })
    }

    /// Loads the on-disk cache's tables of files still on disk and
    /// unchanged, most recently used first, within
    /// [`UnwindOptions::preload_bytes`], on the cache reader thread: the
    /// caller never waits. A line on stderr says what was loaded.
    pub fn preload(&mut self, whole_host: bool) {
        let bytes = self.options.preload_bytes(whole_host);
        if bytes == 0 {
            return;
        }
        self.preloading = Some((Instant::now(), bytes));
        self.queue.jobs().preload = Some(bytes);
    }

    /// Sizes of what is loaded and the time spent building it.
    pub fn stats(&self) -> TableStats {
        TableStats {
            build: self.build_stats[0].plus(&self.build_stats[1]),
            ..self.stats
        }
    }

    /// Enters mapping `m` of `pid` in the trie; its object is loaded.
    fn install(&mut self, pid: u32, m: &Installed) -> anyhow::Result<()> {
        let object = self.objects.get_mut(&m.key).expect("loaded by the caller");
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
        self.files.withdraw(&key);
        debug!("unwind tables of idle {} freed for room", object.name);
        self.free_object(object);
        true
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
