//! Every way a [`Profile`] is shown or saved, chosen by `--format` or the
//! `-o` extension: a `pprof -top`-like text table, folded stacks, an SVG
//! flamegraph, a Graphviz call graph, and gzip-compressed pprof protobuf.
//!
//! All writers name frames the same way ([`Profile::frame_names`]) and see
//! the same stacks ([`stacks`]): filtered by `--focus`/`--ignore`, for one
//! sample type, with process or thread root frames from `--group-by`.
mod callgraph;
mod flamegraph;
pub mod pprof;
mod text;

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use regex::Regex;

use crate::profile::{Profile, Sample};

/// Output options shared by every command that produces a profile.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format [default: from the -o extension (.txt, .folded, .svg,
    /// .pb.gz/.pb, .dot), else text]. `callgraph` with `-o x.svg|.png|.gif`
    /// renders the call graph through Graphviz `dot`.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Which value to show (e.g. inuse_space, alloc_objects, cpu, samples)
    /// [default: the profile's default sample type].
    #[arg(long, value_name = "TYPE")]
    pub sample_type: Option<String>,
    /// Root frames for text, folded, svg and callgraph: `comm-PID` per
    /// process, `comm-PID/TID` per thread, or none.
    #[arg(long, value_enum, default_value_t = GroupBy::Process)]
    pub group_by: GroupBy,
    /// Show at most this many functions (text) or nodes (callgraph).
    #[arg(long, value_name = "N")]
    pub nodecount: Option<usize>,
    /// Keep only stacks with a frame matching this regex.
    #[arg(long, value_name = "REGEX")]
    pub focus: Option<String>,
    /// Drop stacks with a frame matching this regex.
    #[arg(long, value_name = "REGEX")]
    pub ignore: Option<String>,
}

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Top functions table (flat, flat%, sum%, cum, cum%).
    Text,
    /// One line per stack: frames outermost first joined by `;`, then the value.
    Folded,
    /// Flamegraph (SVG).
    Svg,
    /// Call graph: Graphviz dot, or SVG/PNG/GIF by the -o extension.
    Callgraph,
    /// pprof protobuf, gzip-compressed.
    Pprof,
}

/// Root frames made from process and thread labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    #[default]
    Process,
    Thread,
    None,
}

impl OutputArgs {
    /// The format to write: `--format`, else from the `-o` extension.
    pub fn format(&self) -> anyhow::Result<Format> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        let Some(path) = &self.output else {
            return Ok(Format::Text);
        };
        let name = path.to_string_lossy();
        Ok(match () {
            _ if name.ends_with(".pb.gz") || name.ends_with(".pb") => Format::Pprof,
            _ if name.ends_with(".txt") => Format::Text,
            _ if name.ends_with(".folded") => Format::Folded,
            _ if name.ends_with(".svg") => Format::Svg,
            _ if name.ends_with(".dot") => Format::Callgraph,
            _ => bail!(
                "cannot tell the format from the name {}: use --format \
                 text|folded|svg|callgraph|pprof or an extension .txt, .folded, .svg, .pb.gz, .dot",
                path.display()
            ),
        })
    }
}

/// Writes `profile` as `args` ask.
pub fn write(profile: &Profile, args: &OutputArgs) -> anyhow::Result<()> {
    let format = args.format()?;
    let value = match &args.sample_type {
        Some(kind) => profile.sample_type_index(kind)?,
        None => profile.default_sample_type_index(),
    };
    if profile.sample_types.is_empty() {
        bail!("the profile has no sample types");
    }
    let filter = Filter::new(args)?;
    let bytes = match format {
        Format::Pprof => pprof::encode(&filter.apply(profile))?,
        Format::Text => text::render(
            profile,
            &view(profile, value, args, &filter),
            args.nodecount,
        )
        .into_bytes(),
        Format::Folded => folded(&view(profile, value, args, &filter)).into_bytes(),
        Format::Svg => flamegraph::render(profile, &view(profile, value, args, &filter))?,
        Format::Callgraph => {
            let dot = callgraph::render(
                profile,
                &view(profile, value, args, &filter),
                args.nodecount,
            );
            match graphviz_format(args.output.as_deref()) {
                Some(kind) => callgraph::run_dot(&dot, kind)?,
                None => dot.into_bytes(),
            }
        }
    };
    match &args.output {
        Some(path) => {
            std::fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()?;
            Ok(())
        }
    }
}

/// The image format `dot` must produce for an output file, if any.
fn graphviz_format(path: Option<&Path>) -> Option<&'static str> {
    let ext = path?.extension()?.to_str()?;
    match ext {
        "svg" => Some("svg"),
        "png" => Some("png"),
        "gif" => Some("gif"),
        "pdf" => Some("pdf"),
        _ => None,
    }
}

/// `--focus` / `--ignore`.
pub struct Filter {
    focus: Option<Regex>,
    ignore: Option<Regex>,
}

impl Filter {
    pub fn new(args: &OutputArgs) -> anyhow::Result<Self> {
        let compile = |flag: &str, re: &Option<String>| {
            re.as_deref()
                .map(|re| {
                    // regex's own message spans several lines (pattern, caret,
                    // error); keep the last one.
                    Regex::new(re).map_err(|e| {
                        let e = e.to_string();
                        let why = e.lines().last().unwrap_or("").trim_start_matches("error: ");
                        anyhow::anyhow!("bad {flag} regex `{re}`: {why}")
                    })
                })
                .transpose()
        };
        Ok(Self {
            focus: compile("--focus", &args.focus)?,
            ignore: compile("--ignore", &args.ignore)?,
        })
    }

    pub fn keeps(&self, names: &[String]) -> bool {
        let any = |re: &Regex| names.iter().any(|n| re.is_match(n));
        self.focus.as_ref().is_none_or(any) && !self.ignore.as_ref().is_some_and(any)
    }

    /// The profile without the samples the filter drops.
    pub fn apply(&self, profile: &Profile) -> Profile {
        if self.focus.is_none() && self.ignore.is_none() {
            return profile.clone();
        }
        let mut out = profile.clone();
        out.samples
            .retain(|s| self.keeps(&sample_names(profile, s)));
        out
    }
}

/// A sample's frame names, leaf first (innermost inlined frame first).
pub fn sample_names(profile: &Profile, sample: &Sample) -> Vec<String> {
    sample
        .locations
        .iter()
        .filter_map(|&l| profile.locations.get(l))
        .flat_map(|l| profile.frame_names(l))
        .collect()
}

/// One stack as the writers see it: frame names outermost first (root frame
/// included), and the chosen value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub frames: Vec<String>,
    pub value: i64,
}

/// The stacks the writers show: filtered, with root frames, identical stacks
/// merged, zero values dropped; in first-seen order.
pub fn stacks(profile: &Profile, value: usize, group_by: GroupBy, filter: &Filter) -> Vec<Stack> {
    let mut index: HashMap<Vec<String>, usize> = HashMap::new();
    let mut out: Vec<Stack> = Vec::new();
    for s in &profile.samples {
        let v = s.values.get(value).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        let leaf_first = sample_names(profile, s);
        if !filter.keeps(&leaf_first) {
            continue;
        }
        let mut frames: Vec<String> = Vec::with_capacity(leaf_first.len() + 1);
        if let Some(root) = root_frame(s, group_by) {
            frames.push(root);
        }
        frames.extend(leaf_first.into_iter().rev());
        match index.get(&frames) {
            Some(&i) => out[i].value += v,
            None => {
                index.insert(frames.clone(), out.len());
                out.push(Stack { frames, value: v });
            }
        }
    }
    out.retain(|s| s.value != 0);
    out
}

fn view(profile: &Profile, value: usize, args: &OutputArgs, filter: &Filter) -> View {
    View {
        stacks: stacks(profile, value, args.group_by, filter),
        sample_type: profile.sample_types[value].clone(),
    }
}

/// What the stack-based writers render.
pub struct View {
    pub stacks: Vec<Stack>,
    pub sample_type: crate::profile::SampleType,
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

/// Folded stacks: `root;caller;callee value` per line.
fn folded(view: &View) -> String {
    let mut out = String::new();
    for s in &view.stacks {
        out.push_str(&s.frames.join(";"));
        out.push(' ');
        out.push_str(&s.value.to_string());
        out.push('\n');
    }
    out
}

/// A value with its unit made readable (`1.50MiB`, `2.3s`, `12`).
pub fn format_value(v: i64, unit: &str) -> String {
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
