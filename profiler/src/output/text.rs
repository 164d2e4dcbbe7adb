//! The top table, like `pprof -top`: per function its flat value (as the
//! leaf) and cumulative value (anywhere on the stack, once per stack).
use std::collections::HashMap;

use super::{View, format_value};
use crate::profile::Profile;

pub(crate) fn render(profile: &Profile, view: &View, nodecount: Option<usize>) -> String {
    let unit = view.sample_type.unit.as_str();
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
    let mut rows: Vec<(&str, i64, i64)> = cum
        .iter()
        .map(|(&name, &c)| (name, flat.get(name).copied().unwrap_or(0), c))
        .collect();
    rows.sort_by(|a, b| {
        b.1.unsigned_abs()
            .cmp(&a.1.unsigned_abs())
            .then(b.2.unsigned_abs().cmp(&a.2.unsigned_abs()))
            .then(a.0.cmp(b.0))
    });
    let shown = nodecount.unwrap_or(rows.len()).min(rows.len());
    let pct = |v: i64| {
        if total == 0 {
            0.0
        } else {
            100.0 * v as f64 / total as f64
        }
    };
    let mut out = String::new();
    out.push_str(&format!(
        "Type: {} ({})\n",
        view.sample_type.kind, view.sample_type.unit
    ));
    for c in &profile.comments {
        out.push_str(&format!("Note: {c}\n"));
    }
    let shown_flat = rows[..shown]
        .iter()
        .fold(0i64, |a, r| a.saturating_add(r.1));
    out.push_str(&format!(
        "Showing {shown} of {} functions, accounting for {}, {:.2}% of {} total\n",
        rows.len(),
        format_value(shown_flat, unit),
        pct(shown_flat),
        format_value(total, unit),
    ));
    out.push_str(&format!(
        "{:>12} {:>7} {:>7} {:>12} {:>7}  name\n",
        "flat", "flat%", "sum%", "cum", "cum%"
    ));
    let mut sum = 0i64;
    for &(name, f, c) in &rows[..shown] {
        sum = sum.saturating_add(f);
        out.push_str(&format!(
            "{:>12} {:>6.2}% {:>6.2}% {:>12} {:>6.2}%  {name}\n",
            format_value(f, unit),
            pct(f),
            pct(sum),
            format_value(c, unit),
            pct(c),
        ));
    }
    out
}
