//! The top table, like `pprof -top`: per function its flat value (as the
//! leaf) and cumulative value (anywhere on the stack, once per stack).
//! As in pprof, functions whose |cum| is under 0.5% of the total are left
//! out and counted in a `Dropped` line; `--nodecount` limits the rows
//! further.
use std::fmt::Write as _;

use super::{View, format_value, sums::Sums};
use crate::profile::Profile;

pub(crate) fn render(profile: &Profile, view: &View, nodecount: Option<usize>) -> String {
    let unit = view.sample_type.unit.as_str();
    let sums = Sums::new(view);
    let cutoff = sums.cutoff();
    let mut rows: Vec<(&str, i64, i64)> = sums
        .cum
        .iter()
        .map(|(&name, &c)| (name, sums.flat.get(name).copied().unwrap_or(0), c))
        .collect();
    let functions = rows.len();
    rows.retain(|r| r.2.saturating_abs() >= cutoff);
    let dropped = functions - rows.len();
    rows.sort_by(|a, b| {
        b.1.unsigned_abs()
            .cmp(&a.1.unsigned_abs())
            .then(b.2.unsigned_abs().cmp(&a.2.unsigned_abs()))
            .then(a.0.cmp(b.0))
    });
    rows.truncate(nodecount.unwrap_or(usize::MAX));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Type: {} ({})",
        view.sample_type.kind, view.sample_type.unit
    );
    for c in &profile.comments {
        let _ = writeln!(out, "Note: {c}");
    }
    let shown_flat = rows.iter().fold(0i64, |a, r| a.saturating_add(r.1));
    let _ = writeln!(
        out,
        "Showing {} of {functions} functions, accounting for {}, {:.2}% of {} total",
        rows.len(),
        format_value(shown_flat, unit),
        sums.percent(shown_flat),
        format_value(sums.total, unit),
    );
    if dropped > 0 {
        let _ = writeln!(
            out,
            "Dropped {dropped} nodes (cum <= {})",
            format_value(cutoff, unit)
        );
    }
    let _ = writeln!(
        out,
        "{:>12} {:>7} {:>7} {:>12} {:>7}  name",
        "flat", "flat%", "sum%", "cum", "cum%"
    );
    let mut sum = 0i64;
    for &(name, f, c) in &rows {
        sum = sum.saturating_add(f);
        let _ = writeln!(
            out,
            "{:>12} {:>6.2}% {:>6.2}% {:>12} {:>6.2}%  {name}",
            format_value(f, unit),
            sums.percent(f),
            sums.percent(sum),
            format_value(c, unit),
            sums.percent(c),
        );
    }
    out
}
