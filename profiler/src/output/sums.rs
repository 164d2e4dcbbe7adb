//! Per-function sums over the stacks of a view, shared by the top table and
//! the call graph.
use std::collections::HashMap;

use super::View;

/// pprof's default `nodefraction`.
pub(crate) const NODE_FRACTION: f64 = 0.005;

/// Per function: flat and cum, and the total of |value| over all stacks.
pub(crate) struct Sums<'a> {
    pub(crate) flat: HashMap<&'a str, i64>,
    pub(crate) cum: HashMap<&'a str, i64>,
    pub(crate) total: i64,
}

impl<'a> Sums<'a> {
    pub(crate) fn new(view: &'a View) -> Self {
        let mut flat: HashMap<&str, i64> = HashMap::new();
        let mut cum: HashMap<&str, i64> = HashMap::new();
        let mut total: i64 = 0;
        for s in &view.stacks {
            total = total.saturating_add(s.value.saturating_abs());
            if let Some(leaf) = s.frames.last() {
                let v = flat.entry(leaf).or_default();
                *v = v.saturating_add(s.value);
            }
            let mut seen: Vec<&str> = Vec::with_capacity(s.frames.len());
            for f in &s.frames {
                if !seen.contains(&f.as_str()) {
                    seen.push(f);
                    let v = cum.entry(f).or_default();
                    *v = v.saturating_add(s.value);
                }
            }
        }
        Self { flat, cum, total }
    }

    /// The smallest |cum| a node needs to be shown (pprof's node cutoff).
    pub(crate) fn cutoff(&self) -> i64 {
        (self.total as f64 * NODE_FRACTION) as i64
    }

    /// `v` as a percentage of the total.
    pub(crate) fn percent(&self, v: i64) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * v as f64 / self.total as f64
        }
    }
}
