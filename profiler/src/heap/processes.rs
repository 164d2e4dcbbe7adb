//! The session's view of its target processes: their last mappings and
//! names (kept after they exit, so that their stacks can still be placed
//! and named), and which exited.
use std::collections::{HashMap, HashSet};

use crate::process::{self, Mapping};

/// What the session knows of each process it saw.
#[derive(Debug, Default)]
pub(crate) struct Processes {
    /// Last mappings read for each process (kept after it exits).
    pub maps: HashMap<u32, Vec<Mapping>>,
    /// Command names.
    pub comms: HashMap<u32, String>,
    /// Targets seen exiting.
    pub exited: HashSet<u32>,
    /// With --all: processes that exited and whose live blocks were dropped
    /// from the kernel's table. They hold nothing any more; what they
    /// allocated stays in the alloc_* totals.
    pub purged: HashSet<u32>,
}

impl Processes {
    /// Rereads the mappings and name of a live process; false when it is gone.
    pub fn refresh(&mut self, pid: u32) -> bool {
        match process::maps(pid) {
            Ok(maps) => {
                self.maps.insert(pid, maps);
                self.comms.insert(pid, process::comm(pid));
                true
            }
            Err(_) => false,
        }
    }

    /// The command name last seen, or `?`.
    pub fn comm(&self, pid: u32) -> String {
        self.comms
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| "?".to_owned())
    }

    /// Whether the process still holds its blocks: not when it exited and
    /// was purged (--all).
    pub fn holds(&self, pid: u32) -> bool {
        !self.purged.contains(&pid)
    }

    /// The mappings of the processes still running among `pids`, read now
    /// (none for those that exited: they are reported as they were).
    pub fn current_maps(&self, pids: impl IntoIterator<Item = u32>) -> HashMap<u32, Vec<Mapping>> {
        pids.into_iter()
            .filter(|pid| !self.exited.contains(pid))
            .filter_map(|pid| {
                let maps = process::maps(pid).ok().filter(|m| !m.is_empty())?;
                Some((pid, maps))
            })
            .collect()
    }
}

/// The processes (but this one) that map a file with one of `inodes`.
pub(crate) fn mapping(inodes: &[u64]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            process::maps(pid).is_ok_and(|maps| maps.iter().any(|m| inodes.contains(&m.inode)))
        })
        .collect()
}
