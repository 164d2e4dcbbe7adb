//! The pprof-style call graph in Graphviz dot: one node per function, sized
//! by its flat value and tinted by its cumulative share; edges from caller
//! to callee weighted by the value flowing through them. Small nodes are
//! pruned as pprof does (|cum| under 0.5% of the total, then the top
//! `--nodecount`, 80 by default), with a legend line saying how many;
//! where pruned nodes sat between two kept ones, a dotted edge joins them.
//!
//! Readability: fills stay light (the strongest is a pale red), text is
//! always near-black and at least `MIN_FONT` points, and legend lines are
//! wrapped so that one long note does not widen the whole graph.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{View, format_value, sums::Sums};
use crate::profile::Profile;

/// Edges below this share of the total are not drawn (pprof's
/// `edgefraction`).
const EDGE_FRACTION: f64 = 0.001;
const DEFAULT_NODECOUNT: usize = 80;
/// Font sizes of nodes: the smallest, and what the largest flat adds.
const MIN_FONT: f64 = 12.0;
const FONT_RANGE: f64 = 18.0;
const TEXT_COLOR: &str = "#1a1a1a";
/// Legend lines are wrapped at this many characters.
const LEGEND_WIDTH: usize = 80;

pub(crate) fn render(profile: &Profile, view: &View, nodecount: Option<usize>) -> String {
    let unit = view.sample_type.unit.as_str();
    let sums = Sums::new(view);
    let mut nodes: Vec<&str> = sums.cum.keys().copied().collect();
    nodes.sort_by(|a, b| {
        sums.cum[b]
            .unsigned_abs()
            .cmp(&sums.cum[a].unsigned_abs())
            .then(a.cmp(b))
    });
    let cutoff = sums.cutoff();
    let limit = nodecount.unwrap_or(DEFAULT_NODECOUNT);
    let kept: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| sums.cum[n].saturating_abs() >= cutoff)
        .take(limit)
        .collect();
    let dropped = nodes.len() - kept.len();
    let id: HashMap<&str, usize> = kept.iter().enumerate().map(|(i, &n)| (n, i)).collect();

    let mut dot = String::new();
    let _ = writeln!(dot, "digraph \"callgraph\" {{");
    let _ = writeln!(
        dot,
        "node [style=filled fillcolor=\"#f8f8f8\" fontcolor=\"{TEXT_COLOR}\" fontname=\"Helvetica\"]"
    );
    let _ = writeln!(
        dot,
        "edge [fontcolor=\"{TEXT_COLOR}\" fontname=\"Helvetica\"]"
    );
    let mut legend = vec![format!(
        "{} ({}): total {}",
        super::flamegraph::what_was_measured(profile),
        view.sample_type.kind,
        format_value(sums.total, unit)
    )];
    legend.extend(profile.comments.iter().cloned());
    if dropped > 0 {
        legend.push(format!(
            "Dropped {dropped} nodes (cum <= {}, or beyond the top {limit})",
            format_value(cutoff, unit)
        ));
    }
    let _ = writeln!(
        dot,
        "subgraph cluster_L {{ \"legend\" [shape=box fontsize=16 label=\"{}\"] }}",
        legend_label(&legend)
    );
    write_nodes(&mut dot, &kept, &sums, unit);
    write_edges(&mut dot, view, &id, &sums, unit);
    let _ = writeln!(dot, "}}");
    dot
}

/// The legend's lines, wrapped and left-aligned (`\l`), escaped for dot.
fn legend_label(lines: &[String]) -> String {
    let mut label = String::new();
    for line in lines {
        for part in wrap(line, LEGEND_WIDTH) {
            label.push_str(&escape(&part));
            label.push_str("\\l");
        }
    }
    label
}

/// `text` in lines of at most `width` characters, broken at spaces where
/// there are some (a longer word is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        let used = line.chars().count();
        if used > 0 && used + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        while word.len() > width {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            lines.push(word.drain(..width).collect());
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.extend(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

fn write_nodes(dot: &mut String, kept: &[&str], sums: &Sums<'_>, unit: &str) {
    let max_flat = kept
        .iter()
        .map(|n| sums.flat.get(n).copied().unwrap_or(0).unsigned_abs())
        .max()
        .unwrap_or(0);
    for (i, &n) in kept.iter().enumerate() {
        let f = sums.flat.get(n).copied().unwrap_or(0);
        let c = sums.cum[n];
        let size = if max_flat == 0 {
            MIN_FONT
        } else {
            MIN_FONT + FONT_RANGE * (f.unsigned_abs() as f64 / max_flat as f64).sqrt()
        };
        let label = if f == 0 {
            format!(
                "{}\\nof {} ({:.2}%)",
                escape(n),
                format_value(c, unit),
                sums.percent(c)
            )
        } else {
            format!(
                "{}\\n{} ({:.2}%)\\nof {} ({:.2}%)",
                escape(n),
                format_value(f, unit),
                sums.percent(f),
                format_value(c, unit),
                sums.percent(c)
            )
        };
        let share = sums.percent(c) / 100.0;
        let _ = writeln!(
            dot,
            "N{i} [label=\"{label}\" fontsize={size:.0} shape=box tooltip=\"{} ({})\" color=\"{}\" fillcolor=\"{}\"]",
            escape(n),
            format_value(c, unit),
            border_color(share),
            fill_color(share),
        );
    }
}

/// Edges between kept nodes, `direct` when adjacent in the stack; a
/// dotted edge stands for a path through pruned nodes.
fn write_edges(
    dot: &mut String,
    view: &View,
    id: &HashMap<&str, usize>,
    sums: &Sums<'_>,
    unit: &str,
) {
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
    let min_edge = (sums.total as f64 * EDGE_FRACTION) as i64;
    let mut edge_list: Vec<_> = edges.into_iter().collect();
    edge_list.sort_by(|a, b| {
        b.1.0
            .unsigned_abs()
            .cmp(&a.1.0.unsigned_abs())
            .then(a.0.cmp(&b.0))
    });
    for ((from, to), (w, direct)) in edge_list {
        if w.saturating_abs() < min_edge {
            continue;
        }
        let share = sums.percent(w) / 100.0;
        let _ = writeln!(
            dot,
            "N{from} -> N{to} [label=\" {}\" weight={} penwidth={:.2} color=\"{}\"{}]",
            format_value(w, unit),
            (100.0 * share.abs()).ceil() as i64 + 1,
            1.0 + 5.0 * share.abs(),
            border_color(share),
            if direct { "" } else { " style=dotted" },
        );
    }
}

/// A node's fill: near-white for a small share, up to a pale red (pale
/// blue for a negative share of a difference); dark text stays readable
/// on every one of them.
fn fill_color(share: f64) -> String {
    let hue = if share < 0.0 {
        (0.75, 0.85, 1.0)
    } else {
        (1.0, 0.72, 0.65)
    };
    mix((0.97, 0.97, 0.97), hue, share)
}

/// Borders and edges: grey to a dark red (or blue).
fn border_color(share: f64) -> String {
    let hue = if share < 0.0 {
        (0.1, 0.25, 0.7)
    } else {
        (0.7, 0.1, 0.05)
    };
    mix((0.6, 0.6, 0.6), hue, share)
}

/// `from` moved toward `to` by the square root of |share| (small shares
/// still show).
fn mix(from: (f64, f64, f64), to: (f64, f64, f64), share: f64) -> String {
    let s = share.abs().clamp(0.0, 1.0).sqrt();
    let c = |a: f64, b: f64| ((a * (1.0 - s) + b * s) * 255.0).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        c(from.0, to.0),
        c(from.1, to.1),
        c(from.2, to.2)
    )
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
