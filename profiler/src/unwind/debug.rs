//! `prof-bpf debug-unwind` (hidden): runs the stack walker alone on one
//! process, from a uprobe at a function's entry or from a CPU-clock perf
//! event, and prints every distinct user stack with its count. Used by the
//! unwinder's tests and benchmark, and to inspect a process's stacks.
//!
//! Output: one line per stack on stdout, `COUNT STATUS root;...;leaf`, with
//! STATUS `complete`, `truncated` or `missing`, then `# `-prefixed lines:
//! the walker's counters and the program's run-time statistics (when
//! `kernel.bpf_stats_enabled` is on). The table sizes go to stderr when
//! attached.
use std::{num::NonZeroU32, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    maps::HashMap as BpfHashMap,
    programs::{
        PerfEvent, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::UProbeScope,
    },
};
use blazesym::symbolize::{Input, Symbolized, Symbolizer, source};
use profiler_common::{
    counters::CounterSet as _,
    stack::{StackStatus, UNWIND_STATS_MAP, USER_STACKS_MAP, UnwindCounter, UserStack},
    unwind_test::{TEST_COUNTS_MAP, TEST_STACK_FAILED},
};

use super::Tables;
use crate::{
    ebpf, process,
    runtime::{self, StopEvent, counters::Counts},
};

/// How often the walker's requests for fresh tables are served. Until a
/// library loaded by `dlopen` is in the tables, its frames are walked by
/// frame pointers (and usually truncated), so this bounds that window.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Options of `prof-bpf debug-unwind`.
#[derive(Debug, clap::Args)]
pub struct DebugArgs {
    /// Process whose stacks are walked.
    #[arg(long, short, required_unless_present = "cfi")]
    pub pid: Option<u32>,
    /// Only compile the CFI of these objects and print their row counts,
    /// build rate and unsupported rules (no process, no BPF).
    #[arg(long, num_args = 1.., conflicts_with = "pid")]
    pub cfi: Vec<std::path::PathBuf>,
    /// Walk from a uprobe at the entry of this function (default: malloc).
    #[arg(long, default_value = "malloc", conflicts_with = "perf")]
    pub uprobe: String,
    /// Object that defines the function (default: the process's libc).
    #[arg(long)]
    pub lib: Option<String>,
    /// Walk from CPU-clock samples of the process instead of a uprobe.
    #[arg(long)]
    pub perf: bool,
    /// Sampling frequency with --perf.
    #[arg(long, short = 'F', default_value_t = 999)]
    pub freq: u64,
    /// Seconds to run (default: until the process exits).
    #[arg(long, short, value_parser = runtime::args::seconds)]
    pub duration: Option<Duration>,
    /// Load no CFI tables: follow frame pointers only.
    #[arg(long)]
    pub fp_only: bool,
    /// Print addresses, not symbols.
    #[arg(long)]
    pub raw: bool,
    /// With --cfi, the cache is used only when --unwind-cache-dir names it.
    #[command(flatten)]
    pub unwind: super::UnwindArgs,
}

/// Runs the session.
pub fn run(args: DebugArgs) -> anyhow::Result<()> {
    if !args.cfi.is_empty() {
        return cfi_report(&args.cfi, args.unwind.unwind_cache_dir.as_deref());
    }
    ebpf::require_root()?;
    let pid = NonZeroU32::new(args.pid.unwrap_or(0)).context("no process with pid 0")?;
    process::check_user_process(pid.get())?;
    runtime::block_on(session(args, pid))
}

async fn session(args: DebugArgs, pid: NonZeroU32) -> anyhow::Result<()> {
    let mut stop = runtime::Stop::new()?;
    stop.watch(pid.get())?;
    let mut ebpf = ebpf::load()?;
    ebpf::spawn_logger(&mut ebpf);
    let mut tables = Tables::with_options(&mut ebpf, &args.unwind.options())?;
    if !args.fp_only {
        tables.add_process(pid.get())?;
    }
    print_table_stats(&tables);
    attach_walker(&mut ebpf, &args, pid)?;
    eprintln!("debug-unwind: attached to pid {pid}");

    if let Some(d) = args.duration {
        stop.set_deadline(tokio::time::Instant::now() + d);
    }
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    let mut exited = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !args.fp_only {
                    tables.poll(true);
                }
            }
            event = stop.next() => match event {
                StopEvent::Exited(_) => exited = true,
                StopEvent::Stop(_) => break,
            },
        }
    }

    let counts: BpfHashMap<_, u64, u64> = BpfHashMap::try_from(
        ebpf.map(TEST_COUNTS_MAP)
            .context("test count map missing")?,
    )?;
    let stacks: BpfHashMap<_, u64, UserStack> = BpfHashMap::try_from(
        ebpf.map(USER_STACKS_MAP)
            .context("user stack map missing")?,
    )?;
    let symbolizer = Symbolizer::new();
    let src = source::Source::Process(source::Process::new(pid.get().into()));
    let mut lines = Vec::new();
    let mut failed = 0;
    for entry in counts.iter() {
        let (id, n) = entry.context("reading the count map")?;
        if id == TEST_STACK_FAILED {
            failed = n;
            continue;
        }
        let stack = stacks.get(&id, 0).context("a counted stack is missing")?;
        let status = match StackStatus::try_from(stack.status) {
            Ok(StackStatus::Complete) => "complete".to_owned(),
            Ok(StackStatus::Truncated) => "truncated".to_owned(),
            Ok(StackStatus::Missing) => "missing".to_owned(),
            Err(value) => format!("unknown-status-{value}"),
        };
        // Return addresses are looked up one byte back (inside the call);
        // a perf sample's first frame is the pc itself.
        let addrs: Vec<u64> = stack
            .frames()
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                if i == 0 && args.perf {
                    a
                } else {
                    a.saturating_sub(1)
                }
            })
            .collect();
        let names: Vec<String> = if args.raw || exited {
            addrs.iter().map(|a| format!("{a:#x}")).collect()
        } else {
            symbolizer
                .symbolize(&src, Input::AbsAddr(&addrs))
                .context("symbolizing")?
                .into_iter()
                .zip(&addrs)
                .map(|(s, a)| match s {
                    Symbolized::Sym(sym) => sym.name.into_owned(),
                    Symbolized::Unknown(_) => format!("{a:#x}"),
                })
                .collect()
        };
        let folded: Vec<&str> = names.iter().rev().map(String::as_str).collect();
        lines.push((n, format!("{n} {status} {}", folded.join(";"))));
    }
    lines.sort_by_key(|l| std::cmp::Reverse(l.0));
    for (_, line) in lines {
        println!("{line}");
    }
    let stats = Counts::<UnwindCounter>::read(&ebpf, UNWIND_STATS_MAP)?;
    let mut text = format!("# stats failed_to_store={failed}");
    for &counter in UnwindCounter::ALL {
        text.push_str(&format!(" {}={}", counter.name(), stats.get(counter)));
    }
    println!("{text}");
    let name = if args.perf {
        "unwind_test_perf"
    } else {
        "unwind_test_uprobe"
    };
    if let Some(info) = ebpf.program(name).and_then(|p| p.info().ok()) {
        println!(
            "# program run_count={} run_time_ns={}",
            info.run_count(),
            info.run_time().as_nanos()
        );
    }
    if exited && !args.raw {
        bail!("pid {pid} exited before its stacks could be symbolized (use --duration)");
    }
    Ok(())
}

/// Compiles each object's CFI and prints, per object, `cfi PATH rows=N
/// pages=N unsupported=N (P%) leaf_only=N ms=T rows_per_s=R
/// source=built|cache`, then one `  unsupported COUNT RULE` line per rule
/// the walker cannot evaluate. `leaf_only` rows name registers known in
/// the sampled frame only (`CFA_REGS`): followed there, unsupported at
/// any other frame.
/// With a cache directory, the rows come from it when it has them (ms is
/// then the time to find, read and check the entry), else are built and
/// stored.
fn cfi_report(paths: &[std::path::PathBuf], cache: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut builder = match cache {
        Some(dir) => {
            super::cache::DiskCache::open(dir)?;
            Some(super::build::Builder::new(&super::UnwindOptions {
                cache_dir: Some(dir.to_owned()),
                ..Default::default()
            }))
        }
        None => None,
    };
    for path in paths {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only mapping of a file that is only parsed.
        let data = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        let started = std::time::Instant::now();
        let hits = |b: &Option<super::build::Builder>| {
            b.as_ref()
                .and_then(|b| b.stats().cache)
                .map_or(0, |c| c.hits)
        };
        let hits_before = hits(&builder);
        let rows = match &mut builder {
            Some(b) => b.rows(
                &data,
                super::cfi::build_id(&data).filter(|id| !id.is_empty()),
                Some(super::build::FileId::of(&file.metadata()?)),
                &std::fs::canonicalize(path)?.to_string_lossy(),
            ),
            None => super::cfi::compile(&data),
        }
        .with_context(|| format!("reading the CFI of {}", path.display()))?;
        let secs = started.elapsed().as_secs_f64();
        let source = if hits(&builder) > hits_before {
            "cache"
        } else {
            "built"
        };
        println!(
            "cfi {} rows={} pages={} unsupported={} ({:.4}%) leaf_only={} ms={:.1} rows_per_s={:.0} source={source}",
            path.display(),
            rows.rows.len(),
            rows.pages.len(),
            rows.unsupported,
            100.0 * rows.unsupported as f64 / rows.rows.len().max(1) as f64,
            rows.rows.iter().filter(|r| r.needs_leaf()).count(),
            secs * 1e3,
            rows.rows.len() as f64 / secs.max(1e-9)
        );
        for (rule, n) in rows.unsupported_rules.iter().filter(|r| r.1 > 0) {
            println!("  unsupported {n} {rule}");
        }
    }
    Ok(())
}

/// The tables' size and build time, on stderr (the tests and the benchmark read it).
fn print_table_stats(tables: &Tables) {
    let stats = tables.stats();
    eprintln!(
        "debug-unwind: tables objects={} rows={} pages={} prefixes={} unsupported_rows={} bytes={} row_cap={} build_ms={:.1}",
        stats.objects,
        stats.rows,
        stats.pages,
        stats.prefixes,
        stats.unsupported_rows,
        stats.bytes(),
        stats.cap_bytes,
        stats.build_time.as_secs_f64() * 1e3
    );
}

/// Attaches the walker's test program: a CPU-clock perf event with
/// `--perf`, else a uprobe at the entry of `--uprobe` in `--lib`.
fn attach_walker(ebpf: &mut aya::Ebpf, args: &DebugArgs, pid: NonZeroU32) -> anyhow::Result<()> {
    if args.perf {
        let program: &mut PerfEvent = ebpf::program(ebpf, "unwind_test_perf")?;
        program
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::OneProcess {
                    pid: pid.get(),
                    cpu: None,
                },
                SamplePolicy::Frequency(args.freq),
                true,
            )
            .context("attaching the cpu-clock perf event")?;
    } else {
        let lib = match &args.lib {
            Some(lib) => lib.clone(),
            None => {
                let maps = process::maps(pid.get())?;
                process::find_libc(&maps)
                    .with_context(|| format!("pid {pid} maps no libc.so.6; pass --lib"))?
                    .path
                    .clone()
            }
        };
        let target = process::path_in_root(pid.get(), &lib);
        let program: &mut UProbe = ebpf::program(ebpf, "unwind_test_uprobe")?;
        program
            .attach(args.uprobe.as_str(), &target, UProbeScope::OneProcess(pid))
            .with_context(|| format!("attaching a uprobe to {} in {lib}", args.uprobe))?;
    }
    Ok(())
}
