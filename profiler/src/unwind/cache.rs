//! The on-disk cache of built unwind tables (see [`super::cache_format`] for
//! the entry format and the eviction choice).
//!
//! One file per object, named by its key. Writes go to a temporary file in
//! the same directory, which is synced and then renamed over the entry: a
//! reader sees a whole entry or none, and two sessions storing the same
//! entry both succeed (the last rename wins, with the same content). Every
//! read touches the entry's modification time, which eviction takes as
//! its last use. An entry that fails its checks is removed, counted, and
//! the object is built again.
use std::{
    fs::{self, File},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use log::{debug, warn};

use super::{
    cache_format::{self, CacheKey, ENTRY_SUFFIX, Entry, Origin, PREFIX_BYTES},
    cfi::ObjectRows,
};

/// Total size of the entries above which the least recently used go.
pub const CAP_BYTES: u64 = 2 << 30;

/// Temporary files left by a writer that died are removed after this long.
const STALE_TEMP: Duration = Duration::from_secs(3600);

const TEMP_PREFIX: &str = ".tmp-";

/// What the cache did in a session.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    /// Objects whose rows came from the cache, their rows, and the time
    /// spent reading and checking them.
    pub hits: usize,
    pub hit_rows: usize,
    pub load_time: Duration,
    /// Entries found damaged (checksum, truncated, malformed): removed,
    /// and their objects built again.
    pub corrupt: usize,
    /// Entries of another format or compiler version: replaced.
    pub stale: usize,
    /// Entries written, and entries that could not be written.
    pub stored: usize,
    pub store_failed: usize,
    /// Entries removed to stay under the size cap.
    pub evicted: usize,
}

/// The cache directory.
pub struct DiskCache {
    dir: PathBuf,
    cap_bytes: u64,
    pub stats: CacheStats,
}

impl DiskCache {
    /// Opens `dir`, creating it (mode 0700) if needed. It must belong to
    /// this user and be closed to others: its entries become kernel tables.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating unwind cache directory {}", dir.display()))?;
        let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            bail!(
                "unwind cache directory {} must be a directory owned by uid {me} and writable by no one else (chmod 700)",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
            cap_bytes: CAP_BYTES,
            stats: CacheStats::default(),
        })
    }

    /// The rows stored under `key`, if a sound entry exists.
    pub fn load(&mut self, key: &CacheKey) -> Option<ObjectRows> {
        self.load_named(&key.file_name())
    }

    /// The entries, most recently used first.
    pub fn entries_by_recent_use(&self) -> Vec<String> {
        let mut entries: Vec<(SystemTime, String)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|item| {
                let item = item.ok()?;
                let name = item.file_name().into_string().ok()?;
                let meta = item.metadata().ok()?;
                (name.ends_with(ENTRY_SUFFIX) && meta.is_file())
                    .then(|| (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), name))
            })
            .collect();
        entries.sort_by(|a, b| b.cmp(a));
        entries.into_iter().map(|(_, name)| name).collect()
    }

    /// The origin and row count of entry `name`, from its first bytes
    /// (unchecked: [`Self::load_named`] checks the entry).
    pub fn peek(&self, name: &str) -> Option<(Option<Origin>, u64)> {
        use std::io::Read as _;
        let mut prefix = Vec::with_capacity(PREFIX_BYTES);
        File::open(self.dir.join(name))
            .ok()?
            .take(PREFIX_BYTES as u64)
            .read_to_end(&mut prefix)
            .ok()?;
        cache_format::peek_origin(&prefix).ok()
    }

    /// The rows of entry `name`, if it is sound.
    pub fn load_named(&mut self, name: &str) -> Option<ObjectRows> {
        let started = Instant::now();
        let path = self.dir.join(name);
        let bytes = fs::read(&path).ok()?;
        match cache_format::decode(&bytes) {
            Ok(rows) => {
                // The last use, for eviction; failing only costs accuracy.
                if let Ok(f) = File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                self.stats.hits += 1;
                self.stats.hit_rows += rows.rows.len();
                self.stats.load_time += started.elapsed();
                Some(rows)
            }
            Err(err) => {
                if err.is_corrupt() {
                    self.stats.corrupt += 1;
                    warn!("unwind cache entry {}: {err}; rebuilding", path.display());
                } else {
                    self.stats.stale += 1;
                    debug!("unwind cache entry {}: {err}; rebuilding", path.display());
                }
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `rows` under `key`, built from the file `origin` describes,
    /// then evicts what exceeds the cap.
    pub fn store(&mut self, key: &CacheKey, rows: &ObjectRows, origin: Option<&Origin>) {
        match self.write(&key.file_name(), &cache_format::encode_with(rows, origin)) {
            Ok(()) => self.stats.stored += 1,
            Err(err) => {
                self.stats.store_failed += 1;
                warn!("unwind cache: {err:#}");
            }
        }
        if let Err(err) = self.evict() {
            warn!("unwind cache: {err:#}");
        }
    }

    fn write(&self, name: &str, entry: &[u8]) -> anyhow::Result<()> {
        // Unique per process and call: concurrent writers never share one.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = File::options()
                .write(true)
                .create_new(true)
                .open(&temp)
                .with_context(|| format!("creating {}", temp.display()))?;
            f.write_all(entry)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", temp.display()))?;
            fs::rename(&temp, self.dir.join(name))
                .with_context(|| format!("renaming {} to {name}", temp.display()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Removes the least recently used entries beyond the cap, and
    /// temporary files that a dead writer left.
    fn evict(&mut self) -> anyhow::Result<()> {
        let mut entries = Vec::new();
        let now = SystemTime::now();
        for item in fs::read_dir(&self.dir).context("listing the cache")? {
            let Ok(item) = item else { continue };
            let name = item.file_name().to_string_lossy().into_owned();
            let Ok(meta) = item.metadata() else { continue };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with(TEMP_PREFIX) {
                if now.duration_since(used).is_ok_and(|age| age > STALE_TEMP) {
                    let _ = fs::remove_file(item.path());
                }
            } else if name.ends_with(ENTRY_SUFFIX) && meta.is_file() {
                entries.push(Entry {
                    name,
                    bytes: meta.len(),
                    used,
                });
            }
        }
        for name in cache_format::evictions(entries, self.cap_bytes) {
            if fs::remove_file(self.dir.join(&name)).is_ok() {
                self.stats.evicted += 1;
                debug!("unwind cache: evicted {name}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{CFA_RSP, RBP_SAME, UnwindRow};

    use super::*;

    /// A fresh directory under the system's temporary directory.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "prof-bpf-unwind-cache-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn rows(n: u16) -> ObjectRows {
        let row = |pc| UnwindRow::new(pc, CFA_RSP, 8, RBP_SAME, 0).unwrap();
        ObjectRows {
            rows: (0..n).map(row).collect(),
            pages: vec![(1, 0, u32::from(n))],
            ..ObjectRows::default()
        }
    }

    fn key(id: u8) -> CacheKey {
        CacheKey::BuildId(vec![id; 20])
    }

    #[test]
    fn stored_rows_load_back_and_a_damaged_entry_is_counted_and_removed() {
        let dir = temp_dir("roundtrip");
        let mut cache = DiskCache::open(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(cache.load(&key(1)), None);
        cache.store(&key(1), &rows(100), None);
        // A second writer of the same entry (another session) is fine too.
        cache.store(&key(1), &rows(100), None);
        assert_eq!(cache.stats.stored, 2);
        assert_eq!(cache.load(&key(1)), Some(rows(100)));
        let path = dir.join(key(1).file_name());
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.load(&key(1)), None);
        assert_eq!((cache.stats.hits, cache.stats.corrupt), (1, 1));
        assert!(!path.exists(), "the damaged entry is removed");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "no temporary file left: {leftovers:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_least_recently_read_entry_goes_first_when_over_the_cap() {
        let dir = temp_dir("evict");
        let mut cache = DiskCache::open(&dir).unwrap();
        let entry_bytes = cache_format::encode(&rows(1000)).len() as u64;
        cache.cap_bytes = 2 * entry_bytes;
        let old = SystemTime::now() - Duration::from_secs(100);
        for id in [1, 2] {
            cache.store(&key(id), &rows(1000), None);
            let f = File::options()
                .append(true)
                .open(dir.join(key(id).file_name()))
                .unwrap();
            f.set_modified(old + Duration::from_secs(u64::from(id)))
                .unwrap();
        }
        // Reading 1 makes 2 the least recently used.
        assert!(cache.load(&key(1)).is_some());
        cache.store(&key(3), &rows(1000), None);
        assert_eq!(cache.stats.evicted, 1);
        assert!(cache.load(&key(2)).is_none());
        assert!(cache.load(&key(1)).is_some());
        assert!(cache.load(&key(3)).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("open");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&dir).err().unwrap().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
