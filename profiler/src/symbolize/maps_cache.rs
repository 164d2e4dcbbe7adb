//! Mappings of processes read once and shared by every normalizer of a
//! long-running profiler (the agent cuts one profile per process and kind
//! every interval, each with a normalizer of its own).
//!
//! A read is used again until it is [`MAX_AGE`] old, or until its process
//! runs a new program ([`MapsCache::forget`] on the exec event). Between,
//! an address outside every known mapping (a library mapped since, or a
//! garbage frame of a broken walk) reads the maps again, at most once per
//! wait; the wait doubles, up to [`MISS_WAIT_MAX`], while those re-reads
//! place nothing new, and starts over when one does: a process whose
//! stacks keep ending in garbage is not read on every sample.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::process::{self, Mapping};

/// How long a read serves before the maps are read again.
const MAX_AGE: Duration = Duration::from_secs(60);
/// The first wait between two re-reads after addresses missed.
const MISS_WAIT_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two re-reads after addresses missed.
const MISS_WAIT_MAX: Duration = Duration::from_secs(8);

/// One process's last read.
#[derive(Clone, Debug)]
pub(crate) struct Read {
    pub(crate) maps: Arc<Vec<Mapping>>,
    pub(crate) at: Instant,
}

#[derive(Debug)]
struct Entry {
    read: Read,
    /// Wait before the next re-read on a miss.
    miss_wait: Duration,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct MapsCache {
    entries: Mutex<HashMap<u32, Entry>>,
}

impl MapsCache {
    /// `pid`'s mappings: the last read while it is young enough, else read
    /// now (the mappings kept since its exec when it is gone). None: no
    /// mappings known.
    pub(crate) fn maps(&self, pid: u32) -> Option<Read> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(&pid)
            && e.read.at.elapsed() < MAX_AGE
        {
            return Some(e.read.clone());
        }
        let read = read(pid)?;
        entries.insert(
            pid,
            Entry {
                read: read.clone(),
                miss_wait: MISS_WAIT_MIN,
            },
        );
        Some(read)
    }

    /// An address of `pid` fell outside the mappings of the read taken at
    /// `seen`: a newer read, if there is one or the wait allows one now.
    pub(crate) fn after_miss(&self, pid: u32, seen: Instant) -> Option<Read> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get_mut(&pid) {
            if e.read.at > seen {
                return Some(e.read.clone());
            }
            if e.read.at.elapsed() < e.miss_wait {
                return None;
            }
            let wait = (e.miss_wait * 2).min(MISS_WAIT_MAX);
            let read = read(pid)?;
            e.read = read.clone();
            e.miss_wait = wait;
            return Some(read);
        }
        drop(entries);
        self.maps(pid)
    }

    /// A re-read placed an address that had missed: the next miss may
    /// read again soon.
    pub(crate) fn placed(&self, pid: u32) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get_mut(&pid) {
            e.miss_wait = MISS_WAIT_MIN;
        }
    }

    /// `pid` runs a new program, or exited.
    pub(crate) fn forget(&self, pid: u32) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.remove(&pid);
    }

    /// Drops the reads too old to serve (processes whose exit was missed).
    pub(crate) fn prune(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|_, e| e.read.at.elapsed() < MAX_AGE);
    }

    /// Processes whose mappings are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// `/proc/PID/maps` read as it is (without [`process::maps`]'s checks of
/// the pid, which read two more files), else the mappings kept since the
/// process's exec (a zombie shows none).
fn read(pid: u32) -> Option<Read> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .map(|text| process::parse_maps(&text))
        .filter(|maps| !maps.is_empty())
        .or_else(|| process::remembered_maps(pid))?;
    Some(Read {
        maps: Arc::new(maps),
        at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_serves_until_forgotten_and_misses_back_off() {
        let cache = MapsCache::default();
        let me = std::process::id();
        let first = cache.maps(me).expect("own maps");
        let again = cache.maps(me).expect("own maps");
        assert_eq!(first.at, again.at, "served from the cache");
        // Right after a read, a miss does not read again.
        assert!(cache.after_miss(me, first.at).is_none());
        std::thread::sleep(MISS_WAIT_MIN);
        let reread = cache
            .after_miss(me, first.at)
            .expect("re-read after the wait");
        assert!(reread.at > first.at);
        // A caller still on the first read gets the newer one at once.
        assert_eq!(cache.after_miss(me, first.at).unwrap().at, reread.at);
        // The wait doubled: not yet.
        std::thread::sleep(MISS_WAIT_MIN);
        assert!(cache.after_miss(me, reread.at).is_none());
        cache.placed(me);
        assert!(cache.after_miss(me, reread.at).is_some());
        assert_eq!(cache.len(), 1);
        cache.forget(me);
        assert_eq!(cache.len(), 0);
        assert!(cache.maps(u32::MAX).is_none());
    }
}
