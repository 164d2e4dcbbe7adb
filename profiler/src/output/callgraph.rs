//! The pprof-style call graph in Graphviz dot: one node per function, sized
//! by its flat value and coloured by its cumulative share; edges from caller
//! to callee weighted by the value flowing through them. Small nodes are
//! pruned (with a note saying how many); where pruned nodes sat between two
//! kept ones, a dotted edge joins them.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{View, format_value};
use crate::profile::Profile;

/// Nodes whose cumulative value is below this share of the total are pruned
/// (pprof's default `nodefraction`), as are edges below `EDGE_FRACTION`.
const NODE_FRACTION: f64 = 0.005;
const EDGE_FRACTION: f64 = 0.001;
const DEFAULT_NODECOUNT: usize = 80;

pub(crate) fn render(profile: &Profile, view: &View, nodecount: Option<usize>) -> String {
    let unit = view.sample_type.unit.as_str();
    let mut flat: HashMap<&str, i64> = HashMap::new();
    let mut cum: HashMap<&str, i64> = HashMap::new();
    let total = view
        .stacks
        .iter()
        .fold(0i64, |t, s| t.saturating_add(s.value.saturating_abs()));
    for s in &view.stacks {
        if let Some(leaf) = s.frames.last() {
            let v = flat.entry(leaf).or_default();
            *v = v.saturating_add(s.value);
        }
        let mut seen = HashSet::new();
        for f in &s.frames {
            if seen.insert(f.as_str()) {
                let v = cum.entry(f).or_default();
                *v = v.saturating_add(s.value);
            }
        }
    }
    let mut nodes: Vec<&str> = cum.keys().copied().collect();
    nodes.sort_by(|a, b| {
        cum[b]
            .saturating_abs()
            .cmp(&cum[a].saturating_abs())
            .then(a.cmp(b))
    });
    let min_cum = (total as f64 * NODE_FRACTION) as i64;
    let limit = nodecount.unwrap_or(DEFAULT_NODECOUNT);
    let kept: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| cum[n].saturating_abs() > min_cum)
        .take(limit)
        .collect();
    let dropped = nodes.len() - kept.len();
    let id: HashMap<&str, usize> = kept.iter().enumerate().map(|(i, &n)| (n, i)).collect();

    // Edges between kept nodes; `direct` when adjacent in the stack.
    let mut edges: HashMap<(usize, usize), (i64, bool)> = HashMap::new();
    for s in &view.stacks {
        let mut seen = HashSet::new();
        let mut prev: Option<(usize, usize)> = None; // (node id, position)
        for (pos, f) in s.frames.iter().enumerate() {
            let Some(&to) = id.get(f.as_str()) else {
                continue;
            };
            if let Some((from, at)) = prev
                && from != to
                && seen.insert((from, to))
            {
                let e = edges.entry((from, to)).or_insert((0, true));
                e.0 = e.0.saturating_add(s.value);
                e.1 &= at + 1 == pos;
            }
            prev = Some((to, pos));
        }
    }
    let min_edge = (total as f64 * EDGE_FRACTION) as i64;
    let max_flat = kept
        .iter()
        .map(|n| flat.get(n).copied().unwrap_or(0).saturating_abs())
        .max()
        .unwrap_or(0);
    let share = |v: i64| {
        if total == 0 {
            0.0
        } else {
            v as f64 / total as f64
        }
    };

    let mut dot = String::new();
    let title = format!(
        "{} ({}): total {}",
        super::flamegraph::what_was_measured(profile),
        view.sample_type.kind,
        format_value(total, unit)
    );
    let _ = writeln!(dot, "digraph \"callgraph\" {{");
    let _ = writeln!(dot, "node [style=filled fillcolor=\"#f8f8f8\"]");
    let mut legend = vec![title];
    legend.extend(profile.comments.iter().cloned());
    if dropped > 0 {
        legend.push(format!(
            "Dropped {dropped} nodes (cum <= {}, or beyond the top {limit})",
            format_value(min_cum, unit)
        ));
    }
    let _ = writeln!(
        dot,
        "subgraph cluster_L {{ \"legend\" [shape=box fontsize=16 label=\"{}\\l\"] }}",
        legend
            .iter()
            .map(|l| escape(l))
            .collect::<Vec<_>>()
            .join("\\l")
    );
    for (i, &n) in kept.iter().enumerate() {
        let f = flat.get(n).copied().unwrap_or(0);
        let c = cum[n];
        let size = if max_flat == 0 {
            8.0
        } else {
            8.0 + 24.0 * (f.saturating_abs() as f64 / max_flat as f64).sqrt()
        };
        let label = if f == 0 {
            format!(
                "{}\\nof {} ({:.2}%)",
                escape(n),
                format_value(c, unit),
                100.0 * share(c)
            )
        } else {
            format!(
                "{}\\n{} ({:.2}%)\\nof {} ({:.2}%)",
                escape(n),
                format_value(f, unit),
                100.0 * share(f),
                format_value(c, unit),
                100.0 * share(c)
            )
        };
        let _ = writeln!(
            dot,
            "N{i} [label=\"{label}\" fontsize={size:.0} shape=box tooltip=\"{} ({})\" color=\"{}\" fillcolor=\"{}\"]",
            escape(n),
            format_value(c, unit),
            color(share(c), 0.5),
            color(share(c), 0.9),
        );
    }
    let mut edge_list: Vec<_> = edges.iter().collect();
    edge_list.sort_by(|a: &(&(usize, usize), &(i64, bool)), b| {
        b.1.0
            .saturating_abs()
            .cmp(&a.1.0.saturating_abs())
            .then(a.0.cmp(b.0))
    });
    for ((from, to), (w, direct)) in edge_list {
        if w.saturating_abs() <= min_edge {
            continue;
        }
        let width = 1.0 + 5.0 * share(w.saturating_abs());
        let _ = writeln!(
            dot,
            "N{from} -> N{to} [label=\" {}\" weight={} penwidth={width:.2} color=\"{}\"{}]",
            format_value(*w, unit),
            (100.0 * share(w.saturating_abs())).ceil() as i64 + 1,
            color(share(*w), 0.5),
            if *direct { "" } else { " style=dotted" },
        );
    }
    let _ = writeln!(dot, "}}");
    dot
}

/// A colour from grey (small share) to red (large share); blue for negative
/// values of a difference. `light` in 0..1 makes fills paler than borders.
fn color(share: f64, light: f64) -> String {
    let s = share.abs().clamp(0.0, 1.0).sqrt();
    let (hue_r, hue_g, hue_b) = if share < 0.0 {
        (0.0, 0.2, 0.8)
    } else {
        (0.8, 0.1, 0.0)
    };
    let grey = 0.5 + 0.5 * light;
    let mix = |hue: f64| ((grey * (1.0 - s) + hue * s) * 255.0).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(hue_r), mix(hue_g), mix(hue_b))
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Renders dot text to `format` (svg, png, gif, pdf) with Graphviz's `dot`.
pub(crate) fn run_dot(dot: &str, format: &str) -> anyhow::Result<Vec<u8>> {
    let mut child = match Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "Graphviz `dot` is not installed (apt-get install graphviz), \
             or write the call graph as dot text with -o FILE.dot"
        ),
        Err(e) => return Err(e).context("running Graphviz `dot`"),
    };
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = dot.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().context("running Graphviz `dot`")?;
    let _ = writer.join();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "Graphviz `dot` failed: {}",
            err.lines().next().unwrap_or("no message")
        );
    }
    Ok(out.stdout)
}
