//! The output options as the command line gives them ([`OutputArgs`]), and
//! their validation into an [`OutputPlan`] before any profiling starts: a
//! bad option fails in a second, not after the run it would have lost.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{
    Filter,
    plan::{Destination, ImageFormat, OutputPlan, Rendering},
};

/// Output options shared by every command that produces a profile.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format [default: from the -o extension: .txt, .folded,
    /// .svg (flamegraph), .pb.gz/.pb, .dot, .png/.gif/.pdf (call graph
    /// through Graphviz); else text]. `callgraph -o x.svg` renders the call
    /// graph as SVG.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write to this file instead of stdout (through a temporary file in the
    /// same directory, renamed when complete).
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
    /// Show at most this many functions (text) or nodes (callgraph)
    /// [default: those above 0.5% of the total, at most 80 in a call graph].
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
    /// Call graph: Graphviz dot, or SVG/PNG/GIF/PDF by the -o extension.
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

/// The extensions the call graph can be written to, for error messages.
const CALLGRAPH_EXTENSIONS: &str = ".dot, .svg, .png, .gif, .pdf";
const EXTENSIONS: &str = ".txt, .folded, .svg, .pb.gz, .pb, .dot, .png, .gif, .pdf";

impl OutputArgs {
    /// Validates everything that can be checked before a run: format and -o
    /// extension, --focus/--ignore regexes, --sample-type against
    /// `sample_types` (the types the command's profiles will have, e.g.
    /// `["alloc_objects", "alloc_space", "inuse_objects", "inuse_space"]`;
    /// an empty slice means "unknown until the profile exists", as for
    /// `report`), Graphviz `dot` present when the format needs it, the
    /// output directory writable. Creates no file.
    pub fn check(&self, sample_types: &[&str]) -> anyhow::Result<OutputPlan> {
        let rendering = rendering(self.format, self.output.as_deref())?;
        let filter = Filter::new(self.focus.as_deref(), self.ignore.as_deref())?;
        if let Some(kind) = &self.sample_type
            && !sample_types.is_empty()
            && !sample_types.contains(&kind.as_str())
        {
            bail!(
                "--sample-type {kind}: no such sample type here; there are: {}",
                sample_types.join(", ")
            );
        }
        if self.nodecount == Some(0) {
            bail!("--nodecount must be at least 1");
        }
        if let Rendering::CallgraphImage(image) = rendering {
            let path = std::env::var_os("PATH").unwrap_or_default();
            if find_program("dot", &path).is_none() {
                bail!(
                    "writing the call graph as {} needs Graphviz `dot`, which is not in PATH \
                     (apt-get install graphviz), or write dot text with -o FILE.dot",
                    image.extension()
                );
            }
        }
        let destination = match &self.output {
            None => Destination::Stdout,
            Some(path) => {
                check_writable(path)?;
                Destination::File(path.clone())
            }
        };
        Ok(OutputPlan {
            rendering,
            destination,
            sample_type: self.sample_type.clone(),
            group_by: self.group_by,
            nodecount: self.nodecount,
            filter,
        })
    }
}

/// The lower-case extension of `path` (`pb.gz` counts as one), if any.
fn extension(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".pb.gz") {
        return Some("pb.gz".to_owned());
    }
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty()).then(|| ext.to_owned())
}

/// Whether `path` is written in place rather than through a temporary file:
/// the process's own descriptors (`/dev/stdout`, `/dev/fd/N`,
/// `/proc/self/fd/N`, which may name a redirected regular file), FIFOs,
/// devices and sockets.
pub(super) fn is_special(path: &Path) -> bool {
    let descriptor = path.starts_with("/proc")
        || path.starts_with("/dev/fd")
        || ["/dev/stdout", "/dev/stderr"].contains(&path.to_string_lossy().as_ref());
    descriptor || std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// What to produce for `--format` and `-o`. Without `--format`, the
/// extension decides, and an unknown or missing one is an error; with it,
/// any name holds that format, except that an image (`.png`, `.gif`,
/// `.pdf`) is only ever the call graph, and the call graph only ever dot
/// text or an image Graphviz writes. `-o` to a FIFO or descriptor without
/// an extension gets stdout's default.
fn rendering(format: Option<Format>, output: Option<&Path>) -> anyhow::Result<Rendering> {
    // Where no file name can carry the format, stdout's defaults apply.
    let ext = output.and_then(extension);
    let unnamed = output.is_none_or(|p| ext.is_none() && is_special(p));
    let image = ext.as_deref().and_then(ImageFormat::from_extension);
    let shown = || output.map_or_else(String::new, |p| p.display().to_string());
    let format = match format {
        Some(f) => f,
        None if unnamed => Format::Text,
        None => match ext.as_deref() {
            Some("txt") => Format::Text,
            Some("folded") => Format::Folded,
            Some("svg") => Format::Svg,
            Some("pb.gz" | "pb") => Format::Pprof,
            Some("dot" | "gv") => Format::Callgraph,
            _ if image.is_some() => Format::Callgraph,
            Some(ext) => bail!(
                "-o {}: unknown extension .{ext}; use one of {EXTENSIONS}, or --format",
                shown()
            ),
            None => bail!(
                "-o {}: no extension to tell the format; use one of {EXTENSIONS}, or --format",
                shown()
            ),
        },
    };
    Ok(match format {
        Format::Callgraph => match (ext.as_deref(), image) {
            (_, Some(image)) => Rendering::CallgraphImage(image),
            (None | Some("dot" | "gv"), None) => Rendering::CallgraphDot,
            (Some(ext), None) => bail!(
                "-o {}: the call graph cannot be written as .{ext}; use one of \
                 {CALLGRAPH_EXTENSIONS}",
                shown()
            ),
        },
        // An image extension with another format would hold text.
        _ if image.is_some() && ext.as_deref() != Some("svg") => bail!(
            "-o {}: an image of the call graph needs --format callgraph, not --format {}",
            shown(),
            format_name(format)
        ),
        Format::Text => Rendering::Text,
        Format::Folded => Rendering::Folded,
        Format::Svg => Rendering::Flamegraph,
        Format::Pprof => Rendering::Pprof,
    })
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Text => "text",
        Format::Folded => "folded",
        Format::Svg => "svg",
        Format::Callgraph => "callgraph",
        Format::Pprof => "pprof",
    }
}

/// The first executable `name` in the `PATH`-style list `path`.
pub(super) fn find_program(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails when `path` cannot be written later: its directory is missing or
/// not writable, or it is a directory. Opens and creates nothing.
fn check_writable(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        bail!("cannot write {shown}: it is a directory");
    }
    if is_special(path) {
        return access_writable(path).with_context(|| format!("cannot write {shown}"));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("cannot write {shown}: no directory {}", dir.display());
    }
    access_writable(dir).with_context(|| format!("cannot write {shown} (in {})", dir.display()))
}

/// `access(2)` for writing (and searching, for a directory).
fn access_writable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .context("the path contains a NUL byte")?;
    let mode = if path.is_dir() {
        libc::W_OK | libc::X_OK
    } else {
        libc::W_OK
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}
