//! The unwind table options shared by `cpu`, `heap` and `agent`: the cap on
//! the rows' kernel memory and the on-disk cache of built tables.
use std::path::PathBuf;

use super::rows::DEFAULT_CAP_MIB;

/// Where built tables are cached unless `--unwind-cache-dir` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/prof-bpf";

/// Largest `--unwind-memory`: 64 GiB, far above any real need, so that a
/// typo (`--unwind-memory 5120000`) is refused rather than honoured.
const MAX_MEMORY_MIB: u64 = 64 << 10;

/// The flags, flattened into each subcommand's options.
#[derive(Clone, Debug, clap::Args)]
pub struct UnwindArgs {
    /// Kernel memory for the unwind tables' rows, in MiB (8 MiB shards are
    /// created as needed); objects that do not fit are counted in the
    /// report and unwound by frame pointers.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_CAP_MIB,
          value_parser = memory_mib)]
    pub unwind_memory: u64,
    /// Build every object's unwind tables afresh: neither read nor write
    /// the on-disk cache.
    #[arg(long)]
    pub no_unwind_cache: bool,
    /// Directory of the on-disk cache of unwind tables (created root-only,
    /// mode 0700) [default: /var/cache/prof-bpf].
    #[arg(long, value_name = "DIR", conflicts_with = "no_unwind_cache")]
    pub unwind_cache_dir: Option<PathBuf>,
    /// Load the cached unwind tables of files still on disk and unchanged
    /// at the start, most recently used first, up to MIB of rows (so new
    /// processes and libraries unwind from their first sample)
    /// [default: half of --unwind-memory on the whole host, 0 otherwise].
    #[arg(long, value_name = "MIB", conflicts_with = "no_unwind_cache",
          value_parser = clap::value_parser!(u64).range(0..=MAX_MEMORY_MIB))]
    pub unwind_preload: Option<u64>,
}

impl Default for UnwindArgs {
    fn default() -> Self {
        Self {
            unwind_memory: DEFAULT_CAP_MIB,
            no_unwind_cache: false,
            unwind_cache_dir: None,
            unwind_preload: None,
        }
    }
}

/// The validated options (no clap types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindOptions {
    /// Cap on the rows' kernel memory, in MiB.
    pub memory_mib: u64,
    /// The cache directory; `None` without a cache.
    pub cache_dir: Option<PathBuf>,
    /// MiB of cached rows loaded at the start; `None`: the session's
    /// default ([`UnwindOptions::preload_bytes`]).
    pub preload_mib: Option<u64>,
}

impl Default for UnwindOptions {
    fn default() -> Self {
        UnwindArgs::default().options()
    }
}

impl UnwindArgs {
    pub fn options(&self) -> UnwindOptions {
        UnwindOptions {
            memory_mib: self.unwind_memory,
            cache_dir: (!self.no_unwind_cache).then(|| {
                self.unwind_cache_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
            }),
            preload_mib: self.unwind_preload,
        }
    }
}

impl UnwindOptions {
    /// Bytes of cached rows loaded at the start: as asked, else half of the
    /// memory cap for a whole-host session (the other half is for what is
    /// built during it) and none for named targets (whose own tables are
    /// built before sampling); never more than the cap, none without a
    /// cache.
    pub fn preload_bytes(&self, whole_host: bool) -> u64 {
        let default = if whole_host { self.memory_mib / 2 } else { 0 };
        let mib = self.preload_mib.unwrap_or(default).min(self.memory_mib);
        if self.cache_dir.is_some() {
            mib << 20
        } else {
            0
        }
    }

    /// The line printed when a session starts.
    pub fn start_line(&self) -> String {
        let cache = match &self.cache_dir {
            Some(dir) => format!("cache {}", dir.display()),
            None => "no cache".to_owned(),
        };
        format!(
            "unwind tables: at most {} MiB of kernel memory (--unwind-memory), {cache}",
            self.memory_mib
        )
    }
}

/// `--unwind-memory`: whole MiB, from one shard (8) to [`MAX_MEMORY_MIB`].
fn memory_mib(s: &str) -> Result<u64, String> {
    let min = (profiler_common::unwind::SHARD_ROWS as u64 * 8) >> 20;
    match s.trim().parse::<u64>() {
        Ok(v) if (min..=MAX_MEMORY_MIB).contains(&v) => Ok(v),
        _ => Err(format!(
            "must be a whole number of MiB from {min} (one row shard) to {MAX_MEMORY_MIB}, got {s}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        unwind: UnwindArgs,
    }

    fn parse(args: &[&str]) -> Result<UnwindOptions, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map(|c| c.unwind.options())
    }

    #[test]
    fn defaults_are_512_mib_and_the_system_cache() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.memory_mib, 512);
        assert_eq!(o.cache_dir, Some(PathBuf::from(DEFAULT_CACHE_DIR)));
        assert_eq!(o, UnwindOptions::default());
        assert!(o.start_line().contains("at most 512 MiB"));
    }

    #[test]
    fn memory_is_bounded_and_the_cache_can_be_moved_or_disabled() {
        assert_eq!(parse(&["--unwind-memory", "8"]).unwrap().memory_mib, 8);
        for bad in ["0", "7", "-1", "1.5", "lots", "65537"] {
            assert!(parse(&["--unwind-memory", bad]).is_err(), "{bad}");
        }
        let moved = parse(&["--unwind-cache-dir", "/tmp/c"]).unwrap();
        assert_eq!(moved.cache_dir, Some(PathBuf::from("/tmp/c")));
        assert_eq!(parse(&["--no-unwind-cache"]).unwrap().cache_dir, None);
        assert!(parse(&["--no-unwind-cache", "--unwind-cache-dir", "/x"]).is_err());
    }

    #[test]
    fn preload_is_half_the_cap_on_the_whole_host_and_as_asked_otherwise() {
        let o = parse(&["--unwind-memory", "100"]).unwrap();
        assert_eq!(o.preload_bytes(true), 50 << 20);
        assert_eq!(o.preload_bytes(false), 0);
        let asked = parse(&["--unwind-memory", "100", "--unwind-preload", "64"]).unwrap();
        assert_eq!(asked.preload_bytes(false), 64 << 20);
        let over = parse(&["--unwind-memory", "100", "--unwind-preload", "400"]).unwrap();
        assert_eq!(over.preload_bytes(true), 100 << 20);
        assert_eq!(
            parse(&["--no-unwind-cache"]).unwrap().preload_bytes(true),
            0
        );
        assert!(parse(&["--no-unwind-cache", "--unwind-preload", "8"]).is_err());
    }
}
