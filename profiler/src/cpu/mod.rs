//! `prof-bpf cpu`: where the machine (or some processes) spends its CPU.
//!
//! A BPF program runs on a perf event on every online CPU (software
//! `cpu-clock`, or hardware `cycles` where the machine has them) and counts
//! samples in the kernel by (pid, tid, user stack, kernel stack). Once per
//! interval the session flips the sampler to the other count map, drains
//! the one no longer written, and feeds the counts to the profile
//! collectors. Tracepoints on exec, fork and exit report new programs and
//! dying threads at once, so their mappings are read and their names kept
//! while they exist: short-lived processes are still named and symbolized.
//!
//! - [`sampler`]: the BPF side: attach, flip and drain the count maps, read stacks.
//! - [`report`]: counts, stacks and task names to profile samples (pure).
//! - [`tasks`]: names, exits and kernel threads of the sampled tasks.
//! - [`budget`]: which processes get unwind tables, within a CPU budget.
//! - [`stats`]: the sampler's counters in the report and on stderr.
//! - [`task_watch`]: exec and exit events, read on a thread of their own.
//! - [`session`]: the loop that ties them together until the session stops.
use std::{ffi::OsString, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    ebpf,
    output::OutputArgs,
    process,
    python::{PythonArgs, PythonFrames, PythonLines},
    runtime,
};

pub(crate) mod budget;
pub(crate) mod report;
pub(crate) mod sampler;
mod session;
pub(crate) mod stats;
pub(crate) mod task_watch;
pub(crate) mod tasks;

/// The sampling event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Event {
    /// The kernel's CPU clock (software timer; available everywhere).
    #[default]
    CpuClock,
    /// CPU cycles from the hardware performance counters.
    Cycles,
}

impl Event {
    /// The event's name as perf spells it.
    fn name(self) -> &'static str {
        match self {
            Event::CpuClock => "cpu-clock",
            Event::Cycles => "cycles",
        }
    }
}

/// Options of `prof-bpf cpu`.
#[derive(Debug, clap::Args)]
#[command(after_help = "EXAMPLES:\n  \
    sudo prof-bpf cpu --duration 10                     # whole host, text top table\n  \
    sudo prof-bpf cpu -F 999 --pid 1234 -o cpu.pb.gz     # one process, pprof file\n  \
    sudo prof-bpf cpu --interval 2                       # top table every 2 s until Ctrl-C\n  \
    sudo prof-bpf cpu --duration 30 -o flame.svg         # flamegraph\n  \
    sudo prof-bpf cpu -o make.svg -- make -j2            # a command and every process it starts")]
pub struct CpuArgs {
    /// Sample only these processes (repeatable) [default: all processes].
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pub pids: Vec<u32>,
    /// Sample every process (the default).
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,
    /// Samples per second on each CPU.
    #[arg(
        short = 'F',
        long = "frequency",
        value_name = "HZ",
        default_value_t = 99,
        value_parser = runtime::args::frequency
    )]
    pub frequency: u64,
    /// Stop after this many seconds [default: until Ctrl-C, or until every --pid exited].
    #[arg(long, short = 'd', value_name = "SECS", value_parser = runtime::args::seconds)]
    pub duration: Option<Duration>,
    /// Print the top functions of each interval of this many seconds.
    #[arg(long, value_name = "SECS", value_parser = runtime::args::interval)]
    pub interval: Option<Duration>,
    /// Count the idle tasks (pid 0) as well. Threads off CPU (py-spy's
    /// idle Python threads) are never sampled: see `prof-bpf python-dump`.
    #[arg(long)]
    pub idle: bool,
    /// What drives sampling.
    #[arg(long, value_enum, default_value_t = Event::CpuClock)]
    pub event: Event,
    #[command(flatten)]
    pub python: PythonArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub unwind: crate::unwind::UnwindArgs,
    /// Run this command and sample it and every process it starts, until it
    /// exits; prof-bpf then exits with its status.
    #[arg(
        last = true,
        value_name = "CMD",
        conflicts_with_all = ["pids", "all", "idle"]
    )]
    pub command: Vec<OsString>,
}

/// What `cpu` samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Targets {
    /// Every process.
    All,
    /// These processes.
    Pids(Vec<u32>),
    /// A command launched here, and its descendants.
    Launch(Vec<OsString>),
}

/// The validated settings of a session (no clap types).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub targets: Targets,
    pub frequency: u64,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub idle: bool,
    pub event: Event,
    pub python_frames: PythonFrames,
    pub python_lines: PythonLines,
    /// `--gil`.
    pub python_gil: bool,
    pub unwind: crate::unwind::UnwindOptions,
}

impl Settings {
    /// Pids given with `--pid` (none for the other targets).
    pub fn pids(&self) -> &[u32] {
        match &self.targets {
            Targets::Pids(pids) => pids,
            _ => &[],
        }
    }
}

/// Runs the session until Ctrl-C, `--duration`, or the exit of the targets.
/// In launch mode the exit code is the program's.
pub fn run(args: CpuArgs) -> anyhow::Result<ExitCode> {
    // Bad output options fail before anything is attached.
    let output = args.output.check(match args.event {
        Event::CpuClock => &["samples", "cpu"],
        Event::Cycles => &["samples", "cycles"],
    })?;
    let settings = validate(&args)?;
    session::run(settings, output)
}

fn validate(args: &CpuArgs) -> anyhow::Result<Settings> {
    let max = max_sample_rate()?;
    if args.frequency > max {
        bail!(
            "-F {} is above the kernel's limit of {max} samples per second \
             (/proc/sys/kernel/perf_event_max_sample_rate)",
            args.frequency
        );
    }
    runtime::args::check_interval(args.interval, args.duration)?;
    ebpf::require_root()?;
    for &pid in &args.pids {
        process::check_pid(pid)?;
    }
    let targets = if !args.command.is_empty() {
        Targets::Launch(args.command.clone())
    } else if args.pids.is_empty() {
        Targets::All
    } else {
        Targets::Pids(args.pids.clone())
    };
    Ok(Settings {
        targets,
        frequency: args.frequency,
        duration: args.duration,
        interval: args.interval,
        idle: args.idle,
        event: args.event,
        python_frames: args.python.python_frames,
        python_lines: args.python.python_lines,
        python_gil: args.python.gil,
        unwind: args.unwind.options(),
    })
}

/// The kernel's limit on perf sample frequencies.
fn max_sample_rate() -> anyhow::Result<u64> {
    let path = "/proc/sys/kernel/perf_event_max_sample_rate";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing {path}: `{}`", text.trim()))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cpu: CpuArgs,
    }

    fn parse(args: &[&str]) -> Result<CpuArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("cpu").chain(args.iter().copied())).map(|c| c.cpu)
    }

    #[test]
    fn options_are_bounded_by_the_runtime_parsers() {
        let args = parse(&["-F", "999", "--duration", "2.5", "--interval", "0.5"]).unwrap();
        assert_eq!(args.frequency, 999);
        assert_eq!(args.duration, Some(Duration::from_millis(2500)));
        assert_eq!(args.interval, Some(Duration::from_millis(500)));
        for bad in [
            &["-F", "0"][..],
            &["--duration", "0"],
            &["--interval", "0.001"],
            &["--duration", "1e30"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn command_after_dashes_excludes_pids() {
        let args = parse(&["--", "make", "-j2"]).unwrap();
        assert_eq!(args.command, ["make", "-j2"]);
        assert!(parse(&["--pid", "1", "--", "make"]).is_err());
        assert!(parse(&["--all", "--", "make"]).is_err());
    }
}
