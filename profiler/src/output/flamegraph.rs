//! SVG flamegraph through inferno (as a library).
use anyhow::Context as _;

use super::{View, format_value};
use crate::profile::Profile;

/// inferno adds counts up in a `usize` and prints them through `f64`:
/// larger totals are divided down, and its `factor` multiplies the
/// printed numbers back.
const MAX_TOTAL: u128 = 1 << 53;

pub(crate) fn render(profile: &Profile, view: &View) -> anyhow::Result<Vec<u8>> {
    let unit = &view.sample_type.unit;
    // A flamegraph has no negative widths: a difference (--base) shows growth.
    let positive = || view.stacks.iter().filter(|s| s.value > 0);
    let sum: u128 = positive().map(|s| s.value.unsigned_abs() as u128).sum();
    let divisor = sum.div_ceil(MAX_TOTAL).max(1);
    let lines: Vec<String> = positive()
        .filter_map(|s| {
            let value = s.value.unsigned_abs() as u128 / divisor;
            // inferno reads the folded format.
            let mut line = String::new();
            super::folded::push_stack(&mut line, &s.frames);
            (value > 0).then(|| format!("{line} {value}"))
        })
        .collect();
    let total = i64::try_from(sum).unwrap_or(i64::MAX);
    let mut options = inferno::flamegraph::Options::default();
    options.factor = divisor as f64;
    options.title = format!("{} ({})", what_was_measured(profile), view.sample_type.kind);
    options.subtitle = Some(format!(
        "total {}{}",
        format_value(total, unit),
        if view.stacks.iter().any(|s| s.value < 0) {
            "; growth only (stacks that shrank are not shown)"
        } else {
            ""
        }
    ));
    options.count_name = unit.clone();
    options.deterministic = true;
    let mut out = Vec::new();
    if lines.is_empty() {
        // inferno refuses empty input; an empty profile is still a valid answer.
        options.title.push_str(": no samples");
        inferno::flamegraph::from_lines(&mut options, ["no-samples 1"], &mut out)
            .context("rendering the flamegraph")?;
        return Ok(out);
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut out)
        .context("rendering the flamegraph")?;
    let root = format!(
        "{}: {} total",
        view.sample_type.kind,
        format_value(total, unit)
    );
    Ok(label_root(out, &root))
}

/// Writes `label` into the root bar, which inferno leaves without text (it
/// names it `all` in the tooltip only).
fn label_root(svg: Vec<u8>, label: &str) -> Vec<u8> {
    let text = match String::from_utf8(svg) {
        Ok(text) => text,
        Err(e) => return e.into_bytes(),
    };
    let empty_text = text.find("<title>all (").and_then(|title| {
        let end = title + text[title..].find("</text>")?;
        text[..end].ends_with('>').then_some(end)
    });
    let Some(at) = empty_text else {
        return text.into_bytes();
    };
    let escaped = label
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let mut out = String::with_capacity(text.len() + escaped.len());
    out.push_str(&text[..at]);
    out.push_str(&escaped);
    out.push_str(&text[at..]);
    out.into_bytes()
}

/// "Heap profile" / "CPU profile" from the sample types.
pub(crate) fn what_was_measured(profile: &Profile) -> &'static str {
    let has = |k: &str| profile.sample_types.iter().any(|t| t.kind == k);
    if has("inuse_space") || has("alloc_space") {
        "Heap profile"
    } else if has("cpu") || has("samples") || has("cycles") {
        "CPU profile"
    } else {
        "Profile"
    }
}
