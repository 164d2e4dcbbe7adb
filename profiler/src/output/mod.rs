//! Every way a [`Profile`] is shown or saved, chosen by `--format` or the
//! `-o` extension: a `pprof -top`-like text table, folded stacks, an SVG
//! flamegraph, a Graphviz call graph, and gzip-compressed pprof protobuf.
//!
//! All writers name frames the same way ([`Profile::frame_names`]) and see
//! the same stacks ([`stacks`]): filtered by `--focus`/`--ignore`, for one
//! sample type, with process or thread root frames from `--group-by`.
//!
//! Commands check their options first ([`OutputArgs::check`] gives an
//! [`OutputPlan`]), run, then write with the plan ([`OutputPlan::write`]).
mod args;
mod callgraph;
mod file;
mod filter;
mod flamegraph;
mod folded;
mod plan;
pub mod pprof;
mod sums;
mod text;

use std::collections::HashMap;

pub use args::{Format, GroupBy, OutputArgs};
pub(crate) use filter::Filter;
pub use plan::OutputPlan;

use crate::profile::{Profile, Sample};

/// One stack as the writers see it: frame names outermost first (root frame
/// included), and the chosen value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stack {
    pub(crate) frames: Vec<String>,
    pub(crate) value: i64,
}

/// The stacks the writers show: filtered, with root frames, identical stacks
/// merged, zero values dropped; in first-seen order.
pub(crate) fn stacks(
    profile: &Profile,
    value: usize,
    group_by: GroupBy,
    filter: &Filter,
) -> Vec<Stack> {
    let mut index: HashMap<Vec<String>, usize> = HashMap::new();
    let mut out: Vec<Stack> = Vec::new();
    for s in &profile.samples {
        let v = s.values.get(value).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        let leaf_first = filter::sample_names(profile, s);
        if !filter.keeps(&leaf_first) {
            continue;
        }
        let mut frames: Vec<String> = Vec::with_capacity(leaf_first.len() + 1);
        if let Some(root) = root_frame(s, group_by) {
            frames.push(root);
        }
        frames.extend(leaf_first.into_iter().rev());
        if frames.is_empty() {
            // A sample without locations or labels still counts; writers
            // need a frame to draw it.
            frames.push(crate::profile::NO_STACK.to_owned());
        }
        match index.get(&frames) {
            Some(&i) => out[i].value = out[i].value.saturating_add(v),
            None => {
                index.insert(frames.clone(), out.len());
                out.push(Stack { frames, value: v });
            }
        }
    }
    out.retain(|s| s.value != 0);
    out
}

/// What the stack-based writers render.
pub(crate) struct View {
    pub(crate) stacks: Vec<Stack>,
    pub(crate) sample_type: crate::profile::SampleType,
}

/// `comm-PID` or `comm-PID/TID` from a sample's labels.
fn root_frame(s: &Sample, group_by: GroupBy) -> Option<String> {
    if group_by == GroupBy::None {
        return None;
    }
    let pid = s.num_label("pid")?;
    let comm = s.str_label("comm").unwrap_or("?");
    match (group_by, s.num_label("tid")) {
        (GroupBy::Thread, Some(tid)) => Some(format!("{comm}-{pid}/{tid}")),
        _ => Some(format!("{comm}-{pid}")),
    }
}

/// A value with its unit made readable (`1.50MiB`, `2.3s`, `12`).
pub(crate) fn format_value(v: i64, unit: &str) -> String {
    let a = v.unsigned_abs() as f64;
    let sign = if v < 0 { "-" } else { "" };
    match unit {
        "bytes" => {
            const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut x = a;
            let mut u = 0;
            while x >= 1024.0 && u + 1 < UNITS.len() {
                x /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{v}B")
            } else {
                format!("{sign}{x:.2}{}", UNITS[u])
            }
        }
        "nanoseconds" => {
            if a >= 1e9 {
                format!("{sign}{:.2}s", a / 1e9)
            } else if a >= 1e6 {
                format!("{sign}{:.2}ms", a / 1e6)
            } else if a >= 1e3 {
                format!("{sign}{:.2}us", a / 1e3)
            } else {
                format!("{v}ns")
            }
        }
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests;
