//! The live status line printed while recording: event rate, what is
//! live, what was lost.
use profiler_common::heap::{HeapCounters, StackKey, StackStats};

use super::report::{human_bytes, objects};

/// Keeps the last event count, for the rate.
#[derive(Debug, Default)]
pub(crate) struct Status {
    /// Seconds since attach and events seen at the last line.
    last: Option<(f64, u64)>,
}

impl Status {
    /// The line at `elapsed` seconds since attach.
    pub fn line(
        &mut self,
        elapsed: f64,
        counters: &HeapCounters,
        stats: &[(StackKey, StackStats)],
        mmap: bool,
    ) -> String {
        let events = counters.allocs + counters.frees + counters.mmaps;
        let (since, before) = self.last.unwrap_or((0.0, 0));
        let rate = events.saturating_sub(before) as f64 / (elapsed - since).max(1e-3);
        self.last = Some((elapsed, events));
        let (mut bytes, mut objs) = (0i64, 0i64);
        for (_, s) in stats {
            bytes += s.alloc_bytes as i64 - s.free_bytes as i64;
            objs += objects(s.alloc_objects) - objects(s.free_objects);
        }
        let lost = counters.live_full + counters.stacks_full + counters.threads_full;
        let mappings = if mmap {
            format!(
                ", {} mappings ({} front unmaps)",
                counters.mmaps, counters.unmaps_partial
            )
        } else {
            String::new()
        };
        format!(
            "prof-bpf: heap {elapsed:.0} s: {rate:.0} events/s, live {} in {objs} objects{mappings}, lost {lost}",
            human_bytes(bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::heap::WEIGHT_ONE;

    use super::*;

    #[test]
    fn rate_is_over_the_last_interval() {
        let mut status = Status::default();
        let mut counters = HeapCounters {
            allocs: 300,
            frees: 100,
            live_full: 1,
            stacks_full: 2,
            ..HeapCounters::default()
        };
        let stats = [(
            StackKey::default(),
            StackStats {
                alloc_objects: 3 * WEIGHT_ONE,
                alloc_bytes: 3 * 1024 * 1024,
                free_objects: WEIGHT_ONE,
                free_bytes: 1024 * 1024,
            },
        )];
        assert_eq!(
            status.line(2.0, &counters, &stats, false),
            "prof-bpf: heap 2 s: 200 events/s, live 2.0 MiB in 2 objects, lost 3"
        );
        counters.allocs += 50;
        counters.mmaps = 10;
        assert_eq!(
            status.line(3.0, &counters, &[], true),
            "prof-bpf: heap 3 s: 60 events/s, live 0 B in 0 objects, 10 mappings (0 front unmaps), lost 3"
        );
    }
}
