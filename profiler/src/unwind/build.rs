//! Where an object's rows come from: the on-disk cache when it holds them,
//! else compiled from the object's CFI (and then stored for the next
//! session, and the next process of the same binary).
use std::time::{Duration, Instant};

use log::warn;

use super::{
    cache::{CacheStats, DiskCache},
    cache_format::{CacheKey, Origin},
    cfi::{self, ObjectRows},
    options::UnwindOptions,
};

/// Objects with fewer rows (none: no CFI) are compiled every time. Small
/// libraries are cached too: compiling them is cheap, but it waits for the
/// table budget of a whole-host session, where a cache hit does not (the
/// dynamic loader, in every new process, is one of them).
const MIN_CACHED_ROWS: usize = 1;

/// A mapped file's identity, for objects without a build id.
#[derive(Clone, Copy, Debug)]
pub struct FileId {
    pub dev: (u32, u32),
    pub inode: u64,
    pub mtime_ns: i64,
    pub size: u64,
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let dev = meta.dev();
        Self {
            dev: (libc::major(dev), libc::minor(dev)),
            inode: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            size: meta.size(),
        }
    }
}

/// Objects compiled in a session, and what the cache did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildStats {
    /// Objects compiled from their CFI, their rows, and the time taken.
    pub built: usize,
    pub built_rows: usize,
    pub compile_time: Duration,
    /// `None` without a cache.
    pub cache: Option<CacheStats>,
}

impl BuildStats {
    /// The totals of two builders.
    pub fn plus(&self, other: &Self) -> Self {
        let cache = match (self.cache, other.cache) {
            (Some(a), Some(b)) => Some(CacheStats {
                hits: a.hits + b.hits,
                hit_rows: a.hit_rows + b.hit_rows,
                load_time: a.load_time + b.load_time,
                corrupt: a.corrupt + b.corrupt,
                stale: a.stale + b.stale,
                stored: a.stored + b.stored,
                store_failed: a.store_failed + b.store_failed,
                evicted: a.evicted + b.evicted,
            }),
            (a, b) => a.or(b),
        };
        Self {
            built: self.built + other.built,
            built_rows: self.built_rows + other.built_rows,
            compile_time: self.compile_time + other.compile_time,
            cache,
        }
    }
}

pub struct Builder {
    cache: Option<DiskCache>,
    built: usize,
    built_rows: usize,
    compile_time: Duration,
}

impl Builder {
    /// A builder with the cache the options name; a cache that cannot be
    /// opened is reported and done without.
    pub fn new(options: &UnwindOptions) -> Self {
        let cache = options
            .cache_dir
            .as_deref()
            .and_then(|dir| match DiskCache::open(dir) {
                Ok(cache) => Some(cache),
                Err(err) => {
                    warn!("{err:#}; unwind tables are built without a cache");
                    None
                }
            });
        Self {
            cache,
            built: 0,
            built_rows: 0,
            compile_time: Duration::ZERO,
        }
    }

    pub fn stats(&self) -> BuildStats {
        BuildStats {
            built: self.built,
            built_rows: self.built_rows,
            compile_time: self.compile_time,
            cache: self.cache.as_ref().map(|c| c.stats),
        }
    }

    /// The rows of the object whose build id is `build_id` (or `file`,
    /// when it has none) from the cache alone: `None` when they are not
    /// there (then [`Self::rows`] compiles them).
    pub fn cached(
        &mut self,
        build_id: Option<Vec<u8>>,
        file: Option<FileId>,
    ) -> Option<ObjectRows> {
        let key = cache_key(build_id, file)?;
        self.cache.as_mut()?.load(&key)
    }

    /// The cache, for loading entries ahead of need.
    pub fn cache_mut(&mut self) -> Option<&mut DiskCache> {
        self.cache.as_mut()
    }

    /// The rows of the ELF object in `data`, whose build id is `build_id`;
    /// `file` identifies it when it has none (`None`: not cached then).
    /// `path` is where the file was found: a new entry records it with
    /// `file`, so that later sessions can load the rows ahead of need.
    pub fn rows(
        &mut self,
        data: &[u8],
        build_id: Option<Vec<u8>>,
        file: Option<FileId>,
        path: &str,
    ) -> anyhow::Result<ObjectRows> {
        let key = cache_key(build_id, file);
        let mut cache = self.cache.as_mut().zip(key.as_ref());
        if let Some((cache, key)) = &mut cache
            && let Some(rows) = cache.load(key)
        {
            return Ok(rows);
        }
        let started = Instant::now();
        let rows = cfi::compile(data)?;
        self.compile_time += started.elapsed();
        self.built += 1;
        self.built_rows += rows.rows.len();
        if let Some((cache, key)) = cache
            && rows.rows.len() >= MIN_CACHED_ROWS
        {
            let origin = file.filter(|_| path.starts_with('/')).map(|f| Origin {
                path: path.to_owned(),
                dev: f.dev,
                inode: f.inode,
                mtime_ns: f.mtime_ns,
                size: f.size,
            });
            cache.store(key, &rows, origin.as_ref());
        }
        Ok(rows)
    }
}

/// The cache entry of an object: its build id, else its file's identity.
pub(super) fn cache_key(build_id: Option<Vec<u8>>, file: Option<FileId>) -> Option<CacheKey> {
    build_id.map(CacheKey::BuildId).or_else(|| {
        file.map(|f| CacheKey::File {
            dev: f.dev,
            inode: f.inode,
            mtime_ns: f.mtime_ns,
            size: f.size,
        })
    })
}
