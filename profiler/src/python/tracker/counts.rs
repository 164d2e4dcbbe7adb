//! What the tracker counts, and the report's lines on Python frames.
use profiler_common::python::PyCounter;

use super::Tracker;
use crate::runtime::counters::Counts;

/// What user space counted besides the kernel's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerCounts {
    /// CPython processes whose frames were walked.
    pub processes: u64,
    /// Python frames named.
    pub frames: u64,
    /// Frames whose code object could not be read.
    pub unreadable: u64,
    /// Frames whose code object was freed ([`FREED_CODE`]).
    pub freed: u64,
    /// Activations with no evaluation-loop frame in the native stack
    /// (placed at the outer end).
    pub unmatched: u64,
    /// Samples whose Python stack was no longer in the map.
    pub stacks_lost: u64,
    /// Stacks dropped from the cache of those read (see `stack_cache`).
    pub stacks_evicted: u64,
}

impl Tracker {
    /// The report's lines on Python frames: the kernel walker's counters
    /// (`walks`, read from its map), what was named and missed here, and
    /// the unsupported interpreters met. None when no CPython was seen.
    pub fn comments(&self, walks: &Counts<PyCounter>) -> Vec<String> {
        if self.counts.processes == 0 && self.notes.is_empty() {
            return Vec::new();
        }
        let c = &self.counts;
        let mut out = vec![
            walks.comment("python stack walks (kernel)"),
            format!(
                "python frames: processes {}, frames named {}, code unreadable {}, code freed {}, \
                 activations without an eval-loop frame {}, stacks lost {}, stacks evicted from \
                 the cache {}",
                c.processes,
                c.frames,
                c.unreadable,
                c.freed,
                c.unmatched,
                c.stacks_lost,
                c.stacks_evicted
            ),
        ];
        out.extend(self.notes.iter().cloned());
        out
    }
}
