//! [`OutputPlan`]: validated output options (no clap types), and writing a
//! profile with them.
use std::io::Write as _;

use anyhow::bail;

use super::{Filter, GroupBy, View, callgraph, file, flamegraph, folded, pprof, stacks, text};
use crate::profile::Profile;

/// What to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rendering {
    Text,
    Folded,
    Flamegraph,
    /// The call graph as Graphviz dot text.
    CallgraphDot,
    /// The call graph rendered by Graphviz `dot`.
    CallgraphImage(ImageFormat),
    Pprof,
}

/// An image format Graphviz writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImageFormat {
    Svg,
    Png,
    Gif,
    Pdf,
}

impl ImageFormat {
    pub(crate) fn from_extension(ext: &str) -> Option<Self> {
        Some(match ext {
            "svg" => Self::Svg,
            "png" => Self::Png,
            "gif" => Self::Gif,
            "pdf" => Self::Pdf,
            _ => return None,
        })
    }

    /// The extension, which is also `dot -T`'s name for it.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Self::Svg => "svg",
            Self::Png => "png",
            Self::Gif => "gif",
            Self::Pdf => "pdf",
        }
    }
}

/// Where the output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Destination {
    Stdout,
    Stderr,
    File(std::path::PathBuf),
}

/// Output options checked before a run (see [`super::OutputArgs::check`]).
#[derive(Clone, Debug)]
pub struct OutputPlan {
    pub(crate) rendering: Rendering,
    pub(crate) destination: Destination,
    pub(crate) sample_type: Option<String>,
    pub(crate) group_by: GroupBy,
    pub(crate) nodecount: Option<usize>,
    pub(crate) filter: Filter,
}

impl OutputPlan {
    /// Writes the profile: to a temporary file in the same directory, then
    /// rename; -o /dev/stdout, FIFOs and other non-regular files are
    /// written directly; no -o: stdout.
    pub fn write(&self, profile: &Profile) -> anyhow::Result<()> {
        let bytes = self.render(profile)?;
        match &self.destination {
            Destination::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
                Ok(())
            }
            Destination::Stderr => {
                let mut out = std::io::stderr().lock();
                out.write_all(&bytes)?;
                Ok(())
            }
            Destination::File(path) => file::write(path, &bytes),
        }
    }

    /// True when the report goes to stdout (launch mode sends it to stderr
    /// instead).
    pub fn to_stdout(&self) -> bool {
        self.destination == Destination::Stdout
    }

    /// Redirects a stdout report to stderr (launch mode: never into the
    /// program's stdout).
    pub fn stdout_to_stderr(&mut self) {
        if self.destination == Destination::Stdout {
            self.destination = Destination::Stderr;
        }
    }

    /// The same filters and sample type as a top table of at most
    /// `nodecount` rows (unless --nodecount says otherwise) on stdout, for
    /// reports printed while a session runs.
    pub fn top_table(&self, nodecount: usize) -> OutputPlan {
        OutputPlan {
            rendering: Rendering::Text,
            destination: Destination::Stdout,
            nodecount: Some(self.nodecount.unwrap_or(nodecount)),
            ..self.clone()
        }
    }

    /// The bytes of the output.
    pub(crate) fn render(&self, profile: &Profile) -> anyhow::Result<Vec<u8>> {
        if profile.sample_types.is_empty() {
            bail!("the profile has no sample types");
        }
        let value = match &self.sample_type {
            Some(kind) => profile.sample_type_index(kind)?,
            None => profile.default_sample_type_index(),
        };
        let view = || View {
            stacks: stacks(profile, value, self.group_by, &self.filter),
            sample_type: profile.sample_types[value].clone(),
        };
        Ok(match self.rendering {
            Rendering::Pprof => pprof::encode(&self.filter.apply(profile))?,
            Rendering::Text => text::render(profile, &view(), self.nodecount).into_bytes(),
            Rendering::Folded => folded::render(&view()).into_bytes(),
            Rendering::Flamegraph => flamegraph::render(profile, &view())?,
            Rendering::CallgraphDot => {
                callgraph::render(profile, &view(), self.nodecount).into_bytes()
            }
            Rendering::CallgraphImage(image) => callgraph::run_dot(
                &callgraph::render(profile, &view(), self.nodecount),
                image.extension(),
            )?,
        })
    }
}
