//! The live status line printed while recording: event rate, what is
//! live, what was lost.
use profiler_common::heap::{HeapCounter, StackKey, StackStats};

use super::report::{human_bytes, objects};
use crate::runtime::counters::Counts;

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
        counters: &Counts<HeapCounter>,
        stats: &[(StackKey, StackStats)],
        mmap: bool,
    ) -> String {
        let events = [HeapCounter::Allocs, HeapCounter::Frees, HeapCounter::Mmaps]
            .map(|c| counters.get(c))
            .iter()
            .sum::<u64>();
        let (since, before) = self.last.unwrap_or((0.0, 0));
        let rate = events.saturating_sub(before) as f64 / (elapsed - since).max(1e-3);
        self.last = Some((elapsed, events));
        let (mut bytes, mut objs) = (0i64, 0i64);
        for (_, s) in stats {
            bytes += s.alloc_bytes as i64 - s.free_bytes as i64;
            objs += objects(s.alloc_objects) - objects(s.free_objects);
        }
        let lost: u64 = [
            HeapCounter::LiveFull,
            HeapCounter::StacksFull,
            HeapCounter::ThreadsFull,
        ]
        .map(|c| counters.get(c))
        .iter()
        .sum();
        let mappings = if mmap {
            format!(
                ", {} mappings ({} front unmaps)",
                counters.get(HeapCounter::Mmaps),
                counters.get(HeapCounter::UnmapsPartial)
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
    use profiler_common::{counters::CounterSet as _, heap::WEIGHT_ONE};

    use super::*;

    #[test]
    fn rate_is_over_the_last_interval() {
        let mut status = Status::default();
        let counts = |pairs: &[(HeapCounter, u64)]| {
            let mut values = vec![0; HeapCounter::LEN as usize];
            for &(c, v) in pairs {
                values[c.index() as usize] = v;
            }
            Counts::<HeapCounter>::from_values(values)
        };
        let counters = counts(&[
            (HeapCounter::Allocs, 300),
            (HeapCounter::Frees, 100),
            (HeapCounter::LiveFull, 1),
            (HeapCounter::StacksFull, 2),
        ]);
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
        let counters = counts(&[
            (HeapCounter::Allocs, 350),
            (HeapCounter::Frees, 100),
            (HeapCounter::Mmaps, 10),
            (HeapCounter::LiveFull, 1),
            (HeapCounter::StacksFull, 2),
        ]);
        assert_eq!(
            status.line(3.0, &counters, &[], true),
            "prof-bpf: heap 3 s: 60 events/s, live 0 B in 0 objects, 10 mappings (0 front unmaps), lost 3"
        );
    }
}
