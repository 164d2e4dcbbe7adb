//! `prof-bpf heap`: heap profiles and leak reports of running processes,
//! without restarting them, through uprobes on their allocator.
//!
//! - `settings`: the session's plain settings; `--probe` resolved.
//! - [`discover`]: which allocator a process uses and its entry points.
//! - `usdt_sites`: a target's `otel_memory:alloc/free` USDT probes.
//! - `usdt_attach`: attaching at them, each with its argument spec.
//! - `attach`: what to probe, loading and attaching.
//! - `maps`: reading the kernel's maps.
//! - `processes`: the session's view of its targets.
//! - `sampling`: the Poisson sampler's tables and weights.
//! - `leaks`: growth-over-snapshots leak classification.
//! - `report`: the reports, built from what was read (pure);
//!   `coverage`: what they cover, beside the targets' memory;
//!   `live_set`: in-use values from libprofalloc.so's own live heap.
//! - `status`: the live status line.
//! - `session`: the recording loop tying them together.
use std::{ffi::OsString, path::PathBuf, time::Duration};

use anyhow::bail;
use profiler_common::heap::{DEFAULT_MAX_LIVE, DEFAULT_MAX_STACKS};
use settings::{ProbeRequest, Settings, Targets};

use crate::runtime;

pub(crate) mod attach;
pub(crate) mod coverage;
pub(crate) mod discover;
mod leaks;
pub(crate) mod live_set;
pub(crate) mod maps;
pub(crate) mod processes;
pub(crate) mod pymalloc;
pub(crate) mod report;
pub(crate) mod sampling;
mod session;
pub(crate) mod settings;
mod status;
pub(crate) mod usdt_attach;
pub(crate) mod usdt_sites;

const AFTER_HELP: &str = "\
SAMPLING:
  Heap profiles sample on average one allocation per --sample-bytes bytes
  allocated (Poisson, as tcmalloc), weighting each sample of size S by
  S / (1 - exp(-S/N)), so totals are unbiased estimates. --leaks and
  --sample-bytes 0 track every allocation.

LEAKS:
  --leaks snapshots the outstanding bytes of every allocation stack (from
  allocations made while attached) every --interval seconds (default 2).
LEAK_RULE
  The report lists the leaking stacks with their outstanding objects and
  bytes and their growth rate (numeric label `growth`, bytes/s).
  --min-age SECS also lists every stack holding allocations outstanding for at
  least SECS (label `age`: the oldest, in seconds). In launch mode everything
  the program never freed is reported when it exits.

MAPPINGS:
  --mmap also tracks the anonymous private mappings (mmap with MAP_PRIVATE |
  MAP_ANONYMOUS, mremap, munmap) the targets make outside allocator calls,
  through the syscall tracepoints. File and shared mappings are not heap and
  are not tracked; mappings the allocator makes for its own allocations
  (glibc serves big mallocs by mmap) count once, as those allocations.
  Stacks of mappings end in the marker frame `[mmap]` below the function that
  called mmap. Every mapping is tracked (never sampled), with its size in
  whole pages: address space mapped, not memory touched. mremap moves the
  mapping to the stack that called it, as realloc does. An unmap that starts
  at a tracked mapping is followed (all of it, or its front part: the rest
  stays tracked); one that starts inside a mapping is not seen by the probes:
  each report compares the tracked mappings with the maps of the processes
  still running and takes what is no longer mapped out of the in-use values,
  saying how much (a program that exited is reported as it was then). A
  MAP_FIXED mapping placed over tracked ones replaces them there: each range
  counts once, under the newest tracked mapping over it. With --all, the
  processes that map the allocator at the attach are tracked, and later ones
  from their first allocator call.

PYTHON:
  CPython targets get their Python frames merged into the native stacks.
  Python objects of 512 bytes or less come from pymalloc's arenas (1 MiB
  mmaps), not from malloc, and the malloc probes do not see them. --mmap
  counts the arenas, each under the Python code that made pymalloc map it.
  --pymalloc (with --pid) also probes the interpreter's PyObject_Malloc,
  _Calloc, _Realloc and _Free, sampled and weighted like malloc. Every
  object allocation then traps into the kernel twice (entry and return),
  about 10 us per object on a loaded 2-core VM: a loop that only makes
  small objects ran 20 to 30 times slower (pyenv 3.12.1 and 3.13.0; `cargo xtask bench
  python` measures it). It is refused, in one line, for an interpreter whose
  machine code inlines the allocator instead of calling those functions
  (link-time optimized builds such as Debian's python3.11).

EXAMPLES:
  sudo prof-bpf heap --pid 1234 --duration 30 -o heap.pb.gz
  sudo prof-bpf heap --pid 1234 --leaks --duration 20
  sudo prof-bpf heap --leaks --min-age 60 --pid 1234 --pid 5678
  sudo prof-bpf heap --pid 1234 --mmap --format folded
  sudo prof-bpf heap --pid 1234 --pymalloc --leaks
  sudo prof-bpf heap --all --lib /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  sudo prof-bpf heap --leaks -- ./server --port 8080";

/// The help epilogue, with the leak rule wrapped to the text's width.
fn after_help() -> String {
    let mut lines = Vec::new();
    let mut line = String::from(" ");
    for word in leaks::RULE.split_whitespace() {
        if line.len() + word.len() + 1 > 76 {
            lines.push(std::mem::replace(&mut line, String::from(" ")));
        }
        line.push(' ');
        line.push_str(word);
    }
    lines.push(line);
    AFTER_HELP.replace("LEAK_RULE", &lines.join("\n"))
}

/// Largest capacity accepted for the heap's hash maps: the kernel sizes a
/// hash map's buckets as the next power of two and refuses (E2BIG) tables
/// past 2^28 buckets; 2^26 keeps every map well within that.
const MAX_MAP_ENTRIES: u32 = 1 << 26;

/// Options of `prof-bpf heap`.
#[derive(Debug, clap::Args)]
#[command(after_help = after_help())]
pub struct HeapArgs {
    /// Process to profile (repeat for several).
    #[arg(long, short, value_name = "PID", conflicts_with = "all")]
    pub pid: Vec<u32>,
    /// Every process that maps the allocator library (--lib, default: the C library).
    #[arg(long)]
    pub all: bool,
    /// The allocator library to probe instead of the one found in the process's mappings.
    #[arg(long, value_name = "PATH")]
    pub lib: Option<PathBuf>,
    /// Mean bytes allocated between samples; 0 tracks every allocation
    /// [default: 524288, or 0 with --leaks].
    #[arg(long, value_name = "BYTES")]
    pub sample_bytes: Option<u64>,
    /// Report what is leaking: stacks whose outstanding memory keeps growing.
    #[arg(long)]
    pub leaks: bool,
    /// With --leaks: also list stacks holding allocations at least this old.
    #[arg(long, value_name = "SECS", requires = "leaks", value_parser = runtime::args::age)]
    pub min_age: Option<Duration>,
    /// Stop after this many seconds (default: until a signal or the targets exit).
    #[arg(long, short, value_name = "SECS", value_parser = runtime::args::seconds)]
    pub duration: Option<Duration>,
    /// Seconds between reports (heap profiles), or between snapshots (--leaks, default 2).
    #[arg(long, value_name = "SECS", value_parser = runtime::args::interval)]
    pub interval: Option<Duration>,
    /// Also track anonymous private mappings (mmap/mremap/munmap) made
    /// outside allocator calls; see MAPPINGS below.
    #[arg(long)]
    pub mmap: bool,
    /// Also probe the object allocator of CPython targets (PyObject_Malloc
    /// and co.), sampled like malloc; see PYTHON below.
    #[arg(long)]
    pub pymalloc: bool,
    /// What to probe: the `otel_memory:alloc/free` USDT probes of the
    /// target (any allocator that has them), libprofalloc.so's sampling
    /// hooks (cheap: only sampled allocations trap), the malloc family, or
    /// `auto`: the USDT probes, else the hooks, when every target has them
    /// and neither --leaks, --sample-bytes nor --mmap asks for more than
    /// they give.
    #[arg(long, value_enum, default_value_t = Probe::Auto)]
    pub probe: Probe,
    /// Capacity for live allocations tracked at once; more are counted as
    /// lost [at most 67108864: the kernel refuses bigger hash maps].
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_LIVE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAP_ENTRIES)))]
    pub max_live: u32,
    /// Capacity for distinct allocation stacks; more are counted as lost
    /// [at most 67108864].
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STACKS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAP_ENTRIES)))]
    pub max_stacks: u32,
    #[command(flatten)]
    pub python: crate::python::PythonArgs,
    #[command(flatten)]
    pub output: crate::output::OutputArgs,
    #[command(flatten)]
    pub unwind: crate::unwind::UnwindArgs,
    /// Program to launch and profile until it exits (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// `--probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// Hooks when possible, else the malloc family.
    Auto,
    /// libprofalloc.so's sampling hooks.
    Hooks,
    /// The allocator's malloc family.
    Malloc,
    /// The `otel_memory:alloc/free` USDT probes of the target.
    Usdt,
}

impl From<Probe> for ProbeRequest {
    fn from(probe: Probe) -> Self {
        match probe {
            Probe::Auto => Self::Auto,
            Probe::Hooks => Self::Hooks,
            Probe::Malloc => Self::Malloc,
            Probe::Usdt => Self::Usdt,
        }
    }
}

/// Checks the flags and their combinations, and turns them into settings.
fn to_settings(args: &HeapArgs) -> anyhow::Result<Settings> {
    let targets = match (args.pid.is_empty(), args.all, args.command.is_empty()) {
        (false, false, true) => Targets::Pids(args.pid.clone()),
        (true, true, true) => Targets::All,
        (true, false, false) => Targets::Launch(args.command.clone()),
        (true, false, true) => {
            bail!("nothing to profile: give --pid PID, --all, or `-- CMD ARGS`")
        }
        _ => bail!("--pid, --all and `-- CMD` exclude each other: give one"),
    };
    runtime::args::check_interval(args.interval, args.duration)?;
    args.python.check_for_heap()?;
    let sample_bytes = args.sample_bytes.unwrap_or(if args.leaks {
        0
    } else {
        sampling::DEFAULT_SAMPLE_BYTES
    });
    if sample_bytes > sampling::MAX_SAMPLE_BYTES {
        bail!(
            "--sample-bytes must be at most {}, got {sample_bytes}",
            sampling::MAX_SAMPLE_BYTES
        );
    }
    let probe = match args.probe {
        Probe::Hooks if args.leaks || args.sample_bytes.is_some() => bail!(
            "--probe hooks records only what libprofalloc.so samples: it excludes --leaks and --sample-bytes"
        ),
        Probe::Usdt if args.sample_bytes.is_some() || args.mmap => bail!(
            "--probe usdt records only what the allocator samples: it excludes --sample-bytes and --mmap"
        ),
        // The hooks see only sampled blocks, not when the allocator is
        // inside a call, so its own mappings would count twice.
        Probe::Hooks if args.mmap => bail!(
            "--probe hooks cannot tell the allocator's own mappings from the program's: --mmap needs --probe malloc"
        ),
        Probe::Hooks | Probe::Usdt if args.pymalloc => bail!(
            "--pymalloc probes the interpreter's allocator like malloc: it needs --probe malloc"
        ),
        Probe::Auto if args.sample_bytes.is_some() || args.mmap || args.pymalloc => Probe::Malloc,
        // --leaks: the allocator's live heap where every target has one,
        // else every allocation (decided with the targets).
        p => p,
    };
    Ok(Settings {
        targets,
        lib: args.lib.clone(),
        sample_bytes,
        leaks: args.leaks,
        min_age: args.min_age,
        duration: args.duration,
        interval: args
            .interval
            .or(args.leaks.then_some(DEFAULT_LEAK_INTERVAL)),
        probe: probe.into(),
        mmap: args.mmap,
        pymalloc: args.pymalloc,
        max_live: args.max_live,
        max_stacks: args.max_stacks,
        python: args.python,
        unwind: args.unwind.options(),
    })
}

/// Time between leak snapshots unless --interval says otherwise.
const DEFAULT_LEAK_INTERVAL: Duration = Duration::from_secs(2);

/// Runs `prof-bpf heap`; in launch mode the exit code is the program's.
pub fn run(args: HeapArgs) -> anyhow::Result<std::process::ExitCode> {
    crate::ebpf::require_root()?;
    let settings = to_settings(&args)?;
    session::run(settings, args.output)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        heap: HeapArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<Settings> {
        let cli = Cli::try_parse_from(std::iter::once("heap").chain(args.iter().copied()))?;
        to_settings(&cli.heap)
    }

    #[test]
    fn python_options_reach_the_settings_and_gil_is_refused_in_one_line() {
        let s = parse(&[
            "--pid",
            "1",
            "--python-frames",
            "python",
            "--python-lines",
            "off",
        ])
        .unwrap();
        assert_eq!(s.python.python_frames, crate::python::PythonFrames::Python);
        assert_eq!(s.python.python_lines, crate::python::PythonLines::Off);
        let err = parse(&["--pid", "1", "--gil"]).unwrap_err().to_string();
        assert!(
            err.starts_with("--gil applies to `cpu` only") && !err.contains('\n'),
            "{err}"
        );
    }

    #[test]
    fn mmap_rules_out_the_hooks() {
        assert_eq!(parse(&["--pid", "1"]).unwrap().probe, ProbeRequest::Auto);
        let s = parse(&["--pid", "1", "--mmap"]).unwrap();
        assert_eq!(s.probe, ProbeRequest::Malloc);
        assert!(s.mmap);
        let err = parse(&["--pid", "1", "--mmap", "--probe", "hooks"]).unwrap_err();
        assert!(
            err.to_string().contains("--mmap needs --probe malloc"),
            "{err}"
        );
    }

    #[test]
    fn pymalloc_probes_like_malloc() {
        let s = parse(&["--pid", "1", "--pymalloc"]).unwrap();
        assert_eq!(s.probe, ProbeRequest::Malloc);
        assert!(s.pymalloc);
        for probe in ["hooks", "usdt"] {
            let err = parse(&["--pid", "1", "--pymalloc", "--probe", probe]).unwrap_err();
            assert!(err.to_string().contains("needs --probe malloc"), "{err}");
        }
    }

    #[test]
    fn map_capacities_are_bounded_before_anything_is_loaded() {
        assert_eq!(
            parse(&["--pid", "1", "--max-live", "67108864"])
                .unwrap()
                .max_live,
            1 << 26
        );
        for bad in ["0", "67108865", "4000000000"] {
            let err = parse(&["--pid", "1", "--max-live", bad]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(parse(&["--pid", "1", "--max-stacks", "0"]).is_err());
    }

    #[test]
    fn usdt_excludes_what_the_allocators_samples_cannot_give() {
        let s = parse(&["--pid", "1", "--probe", "usdt"]).unwrap();
        assert_eq!(s.probe, ProbeRequest::Usdt);
        let s = parse(&["--pid", "1", "--probe", "usdt", "--leaks"]).unwrap();
        assert_eq!(s.probe, ProbeRequest::Usdt);
        for extra in [&["--sample-bytes", "64"][..], &["--mmap"]] {
            let mut args = vec!["--pid", "1", "--probe", "usdt"];
            args.extend_from_slice(extra);
            let err = parse(&args).unwrap_err().to_string();
            assert!(
                err.contains("--probe usdt records only"),
                "{extra:?}: {err}"
            );
        }
    }
}
