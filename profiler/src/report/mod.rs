//! `prof-bpf report`: reads a saved profile (pprof from any tool, symbolized
//! or not; gperftools heap and CPU profiles), optionally subtracts a base
//! profile, and writes it in any output format.
mod gperftools;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{
    output::{OutputArgs, pprof},
    profile::{LocationKind, Profile},
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
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let plan = args.output.check(&[])?;
    let mut profile = read(&args.file)?;
    if let Some(base) = &args.base {
        let base_profile = read(base)?;
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

/// Reads and symbolizes a profile file of any supported format; errors name
/// the file.
pub fn read(path: &Path) -> anyhow::Result<Profile> {
    let name = path.display().to_string();
    let data = std::fs::read(path).with_context(|| format!("cannot read {name}"))?;
    let mut profile = parse(&data).with_context(|| name.clone())?;
    find_local_objects(&mut profile);
    symbolize::symbolize(&mut profile);
    Ok(profile)
}

/// Detects the format from the content.
pub fn parse(data: &[u8]) -> anyhow::Result<Profile> {
    if data.is_empty() {
        bail!("empty file, not a profile");
    }
    let unzipped;
    let bytes = if pprof::is_gzip(data) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .context("bad gzip data (truncated or corrupt)")?;
        unzipped = out;
        &unzipped[..]
    } else {
        data
    };
    if bytes.starts_with(b"heap profile:") {
        return gperftools::parse_heap(bytes);
    }
    if gperftools::is_cpu_profile(bytes) {
        return gperftools::parse_cpu(bytes);
    }
    pprof::decode(bytes).map_err(|e| {
        anyhow::anyhow!("not a profile (pprof, gperftools heap or CPU profile): {e:#}")
    })
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
