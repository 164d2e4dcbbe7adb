//! Mappings kept after a process is gone.
//!
//! A short-lived program can exit before anyone asks for its mappings: the
//! task-event thread reads them at its exec (and shortly after, once the
//! loader has mapped the libraries) and keeps the last good read here. The
//! symbolizer falls back to it when `/proc/PID/maps` is gone.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::Mapping;

/// Processes kept at most: a build host execs hundreds a second.
const KEPT_MAX: usize = 4096;
/// How long a read is kept: well beyond a session's drain interval.
const KEPT_FOR: Duration = Duration::from_secs(120);

/// Per process: when its mappings were read, and the mappings.
type Kept = HashMap<u32, (Instant, Vec<Mapping>)>;

static REMEMBERED: Mutex<Option<Kept>> = Mutex::new(None);

/// Reads `pid`'s mappings now and keeps them, replacing an older read.
/// A process already gone (or showing no mappings) keeps its last read.
pub fn remember_maps(pid: u32) {
    // Read as it is: called for every exec of the host, often once the
    // process is gone, where the checks of `super::maps` (two more files,
    // an error built) would cost more than the read.
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return;
    };
    let maps = super::parse_maps(&text);
    if maps.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut guard = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
    let kept = guard.get_or_insert_with(HashMap::new);
    if kept.len() >= KEPT_MAX && !kept.contains_key(&pid) {
        kept.retain(|_, (at, _)| now.duration_since(*at) < KEPT_FOR);
        if kept.len() >= KEPT_MAX
            && let Some(oldest) = kept.iter().min_by_key(|(_, (at, _))| *at).map(|(p, _)| *p)
        {
            kept.remove(&oldest);
        }
    }
    kept.insert(pid, (now, maps));
}

/// The last mappings kept for `pid`, if any.
pub fn remembered_maps(pid: u32) -> Option<Vec<Mapping>> {
    let guard = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
    guard.as_ref()?.get(&pid).map(|(_, maps)| maps.clone())
}

/// [`super::maps`] while the process lives, then its last kept read.
pub fn maps_or_remembered(pid: u32) -> anyhow::Result<Vec<Mapping>> {
    match super::maps(pid) {
        Ok(maps) if !maps.is_empty() => Ok(maps),
        Ok(maps) => Ok(remembered_maps(pid).unwrap_or(maps)),
        Err(err) => remembered_maps(pid).ok_or(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_read_and_kept_after_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Until sleep runs, the child may still show the test's own maps;
        // either read names some executable mapping.
        remember_maps(pid);
        let kept = remembered_maps(pid).expect("kept");
        assert!(kept.iter().any(|m| m.is_executable()));
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(super::super::maps(pid).is_err());
        let after = maps_or_remembered(pid).expect("remembered after exit");
        assert_eq!(after.len(), kept.len());
        // A read of a process that is gone keeps the last good one.
        remember_maps(pid);
        assert_eq!(remembered_maps(pid).map(|m| m.len()), Some(kept.len()));
    }

    #[test]
    fn an_unknown_process_has_nothing_kept() {
        assert!(remembered_maps(u32::MAX).is_none());
        assert!(maps_or_remembered(u32::MAX).is_err());
    }
}
