//! Sizes and costs of the loaded tables, and their line in the report.
use std::time::Duration;

use profiler_common::unwind::{MappingInfo, MappingKey, PageKey, PageRows};

use super::build::BuildStats;

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
    /// Kernel memory of the row shards created (rows and free room).
    pub shard_bytes: usize,
    /// The cap on `shard_bytes`.
    pub cap_bytes: usize,
    /// Objects whose rows did not fit under the cap (even after idle
    /// objects made room): their code is unwound by frame pointers.
    pub over_cap: usize,
    /// Objects using the rows of another file with the same build id.
    pub shared: usize,
    /// Objects loaded from the cache ahead of need, and their rows' bytes.
    pub preloaded: usize,
    pub preloaded_bytes: usize,
    /// Time the caller's thread spent reading mappings and placing rows
    /// in the kernel's maps (the builder thread does the rest).
    pub build_time: Duration,
    /// CPU time of the builder thread (reading objects, the cache,
    /// compiling CFI).
    pub builder_cpu: Duration,
    /// Objects compiled, and what the on-disk cache gave.
    pub build: BuildStats,
}

impl TableStats {
    /// Kernel memory the tables use, in bytes: row shards, page index
    /// entries and trie entries (key + value, without the maps' own
    /// overhead).
    pub fn bytes(&self) -> usize {
        self.shard_bytes
            + self.pages * (size_of::<PageKey>() + size_of::<PageRows>())
            + self.prefixes * (4 + size_of::<MappingKey>() + size_of::<MappingInfo>())
    }

    /// One line for the report: memory used and its cap, objects that did
    /// not fit, and how many objects were built or came from the cache.
    pub fn summary(&self) -> String {
        let mib = |b: usize| b as f64 / f64::from(1 << 20);
        let b = &self.build;
        let mut text = format!(
            "unwind tables: {} objects (and {} sharing their rows by build id; {} preloaded, {:.1} MiB), {} rows, {:.1} MiB of {:.0} MiB kernel memory (--unwind-memory), {} objects did not fit; built {} objects ({} rows) in {:.2} s",
            self.objects,
            self.shared,
            self.preloaded,
            mib(self.preloaded_bytes),
            self.rows,
            mib(self.shard_bytes),
            mib(self.cap_bytes),
            self.over_cap,
            b.built,
            b.built_rows,
            b.compile_time.as_secs_f64(),
        );
        match &b.cache {
            Some(c) => text.push_str(&format!(
                ", {} from cache ({} rows) in {:.3} s; cache: {} stored, {} corrupt, {} stale, {} evicted, {} not written",
                c.hits,
                c.hit_rows,
                c.load_time.as_secs_f64(),
                c.stored,
                c.corrupt,
                c.stale,
                c.evicted,
                c.store_failed
            )),
            None => text.push_str(", no cache"),
        }
        text.push_str(&format!(
            "; builder thread {:.2} s of CPU; placing tables took {:.2} s",
            self.builder_cpu.as_secs_f64(),
            self.build_time.as_secs_f64()
        ));
        text
    }
}
