//! `prof-bpf report`: reads a saved profile (pprof from any tool, symbolized
//! or not; gperftools heap and CPU profiles), optionally subtracts a base
//! profile, and writes it in any output format.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{
    output::OutputArgs,
    profile::{LocationKind, Profile, read},
    symbolize,
};

const EXAMPLES: &str = "\
EXAMPLES:
  prof-bpf report heap.pb.gz                        top table
  prof-bpf report heap.pb.gz -o heap.svg            flamegraph
  prof-bpf report new.pb.gz --base old.pb.gz        growth since old
  prof-bpf report cpu.prof --format callgraph -o cpu.png
  prof-bpf report prog.0003.heap --sample-type alloc_space --focus parse";

/// Show a saved profile: pprof files (ours or other tools', symbolized or
/// not), gperftools heap profiles (`heap profile:` text) and CPU profiles.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct ReportArgs {
    /// The profile to show.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Subtract this profile (same kind) to show the difference.
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// Refuse files larger than this, compressed or decompressed (K, M, G
    /// suffixes; 1024-based) [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = read::parse_size)]
    pub max_input: Option<u64>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let plan = args.output.check(&[])?;
    let max_input = args.max_input.unwrap_or(read::DEFAULT_MAX_INPUT);
    let mut profile = open(&args.file, max_input)?;
    if let Some(base) = &args.base {
        let base_profile = open(base, max_input)?;
        profile
            .merge(&base_profile, -1)
            .with_context(|| format!("{} as base for {}", base.display(), args.file.display()))?;
        profile
            .comments
            .push(format!("difference: minus {}", base.display()));
    }
    if let Some(kind) = &args.output.sample_type {
        profile
            .sample_type_index(kind)
            .with_context(|| args.file.display().to_string())?;
    }
    plan.write(&profile)
}

/// Reads a profile file of any supported format and symbolizes what this
/// machine can, as `report` shows it; errors name the file.
pub fn open(path: &Path, max_input: u64) -> anyhow::Result<Profile> {
    let mut profile = read::from_file(path, max_input)?;
    find_local_objects(&mut profile);
    profile.symbolize();
    Ok(profile)
}

/// Points unsymbolized mappings at the same object on this machine: the
/// file at the mapping's path, when its build-id matches (or the profile has
/// none to compare).
fn find_local_objects(profile: &mut Profile) {
    let mut wanted = vec![false; profile.mappings.len()];
    for l in &profile.locations {
        if l.frames.is_empty()
            && l.kind == LocationKind::User
            && let Some(m) = l.mapping
        {
            wanted[m] = true;
        }
    }
    let mut notes = Vec::new();
    for (m, wanted) in profile.mappings.iter_mut().zip(wanted) {
        // Pseudo files (`[vdso]`, `[jit]`) are not on disk; a relative path
        // (`go tool pprof ./prog`) is taken from the current directory.
        if !wanted || m.local_path.is_some() || m.file.is_empty() || m.file.starts_with('[') {
            continue;
        }
        let path = PathBuf::from(&m.file);
        if !path.exists() {
            notes.push(format!(
                "{} is not on this machine: its addresses are not symbolized",
                m.file
            ));
            continue;
        }
        if !m.build_id.is_empty() {
            let local = blazesym::helper::read_elf_build_id(&path)
                .ok()
                .flatten()
                .map(|id| symbolize::hex(&id))
                .unwrap_or_default();
            if !local.eq_ignore_ascii_case(&m.build_id) {
                notes.push(format!(
                    "{} here has build-id {} but the profile's has {}: not symbolized",
                    m.file,
                    if local.is_empty() { "none" } else { &local },
                    m.build_id
                ));
                continue;
            }
        }
        m.local_path = Some(path);
    }
    profile.comments.extend(notes);
}
