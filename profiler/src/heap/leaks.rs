//! Leak classification by growth over snapshots.
//!
//! Age alone does not make a leak: a cache with a lifetime or a queue holds
//! old objects yet reaches a steady state. So the agent snapshots the
//! outstanding bytes of every stack (from allocations made while attached)
//! every `--interval`, the attach itself counting as a snapshot of zero, and
//! calls a stack leaking when [`RULE`] holds.

/// The rule, as `--help` states it.
pub const RULE: &str = "a stack is leaking when its outstanding bytes rose in more than half of the intervals AND every snapshot in the later half of the run is above every snapshot in the earlier half (a steady state or a cache that stopped growing fails the second test); it needs at least 3 snapshots (the attach counts as one)";

/// Minimum number of snapshots for [`classify`] to decide.
pub const MIN_SNAPSHOTS: usize = 3;

/// Growth verdict for one stack.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    /// Whether [`RULE`] holds.
    pub leaking: bool,
    /// (last - first) / elapsed, bytes per second.
    pub bytes_per_sec: f64,
}

/// Applies [`RULE`] to a stack's outstanding bytes `series` taken at
/// `times` (seconds since attach, same length). `None` when there are too
/// few snapshots to decide.
pub fn classify(series: &[i64], times: &[f64]) -> Option<Growth> {
    let n = series.len();
    if n < MIN_SNAPSHOTS || times.len() != n {
        return None;
    }
    let rises = series.windows(2).filter(|w| w[1] > w[0]).count();
    let intervals = n - 1;
    let half = n / 2;
    let earlier_max = series[..half].iter().max().copied().unwrap_or(0);
    let later_min = series[n - half..].iter().min().copied().unwrap_or(0);
    let elapsed = times[n - 1] - times[0];
    let bytes_per_sec = if elapsed > 0.0 {
        (series[n - 1] - series[0]) as f64 / elapsed
    } else {
        0.0
    };
    Some(Growth {
        leaking: 2 * rises > intervals && later_min > earlier_max,
        bytes_per_sec,
    })
}

/// Outstanding-bytes history of every stack, one column per snapshot.
#[derive(Debug, Default)]
pub struct History<K> {
    times: Vec<f64>,
    series: std::collections::HashMap<K, Vec<i64>>,
}

impl<K: std::hash::Hash + Eq + Clone> History<K> {
    /// An empty history whose first snapshot (the attach, everything zero)
    /// is at time 0.
    pub fn new() -> Self {
        Self {
            times: vec![0.0],
            series: std::collections::HashMap::new(),
        }
    }

    /// A history whose first snapshot, at time 0, is `outstanding`: what
    /// was already there at the attach (a heap known since the process
    /// started).
    pub fn starting_with(outstanding: impl IntoIterator<Item = (K, i64)>) -> Self {
        Self {
            times: vec![0.0],
            series: outstanding.into_iter().map(|(k, v)| (k, vec![v])).collect(),
        }
    }

    /// Records a snapshot at `time`; stacks absent from it are at zero.
    pub fn push(&mut self, time: f64, outstanding: impl IntoIterator<Item = (K, i64)>) {
        let column = self.times.len();
        self.times.push(time);
        for (key, bytes) in outstanding {
            let series = self.series.entry(key).or_insert_with(|| vec![0; column]);
            series.resize(column, 0);
            series.push(bytes);
        }
        for series in self.series.values_mut() {
            series.resize(column + 1, 0);
        }
    }

    /// Number of snapshots, the attach included.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// The verdict for `key` (a stack never seen has no growth).
    pub fn classify(&self, key: &K) -> Option<Growth> {
        match self.series.get(key) {
            Some(series) => classify(series, &self.times),
            None => classify(&vec![0; self.times.len()], &self.times),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(n: usize) -> Vec<f64> {
        (0..n).map(|i| i as f64 * 2.0).collect()
    }

    #[test]
    fn steady_growth_is_a_leak() {
        let s = [0, 100, 200, 300, 400, 500];
        let g = classify(&s, &times(6)).unwrap();
        assert!(g.leaking);
        assert!((g.bytes_per_sec - 50.0).abs() < 1e-9);
    }

    #[test]
    fn cache_that_stopped_growing_is_not() {
        let s = [0, 1000, 1000, 1000, 1000, 1000];
        assert!(!classify(&s, &times(6)).unwrap().leaking);
        let s = [0, 500, 1000, 1000, 1000, 1000];
        assert!(!classify(&s, &times(6)).unwrap().leaking);
    }

    #[test]
    fn churn_around_a_steady_state_is_not() {
        let s = [0, 300, 250, 310, 280, 320, 290, 330];
        assert!(!classify(&s, &times(8)).unwrap().leaking);
        let s = [0, 0, 0, 0, 0];
        assert!(!classify(&s, &times(5)).unwrap().leaking);
    }

    #[test]
    fn too_few_snapshots_decide_nothing() {
        assert_eq!(classify(&[0, 100], &times(2)), None);
    }

    #[test]
    fn history_fills_missing_stacks_with_zero() {
        let mut h = History::new();
        h.push(2.0, [("a", 10)]);
        h.push(4.0, [("a", 20), ("b", 5)]);
        h.push(6.0, [("a", 30), ("b", 5)]);
        assert_eq!(h.len(), 4);
        assert!(h.classify(&"a").unwrap().leaking);
        // b: 0, 0, 5, 5 -> rose once in three intervals.
        assert!(!h.classify(&"b").unwrap().leaking);
    }

    #[test]
    fn a_history_can_start_from_what_was_there() {
        let mut h = History::starting_with([("cache", 500), ("leak", 100)]);
        h.push(2.0, [("cache", 500), ("leak", 200)]);
        h.push(4.0, [("cache", 500), ("leak", 300)]);
        assert!(h.classify(&"leak").unwrap().leaking);
        assert!(!h.classify(&"cache").unwrap().leaking);
    }
}
