//! `prof-bpf count --pid N`: malloc and free calls of a running process,
//! counted in the kernel by uprobes on the process's own C library.
use std::{num::NonZeroU32, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    maps::PerCpuHashMap,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use profiler_common::count::{AllocCounts, COUNTS_MAP};

use crate::{ebpf, heap::discover::Allocator, process};

/// Options of `prof-bpf count`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "EXAMPLES:\n  sudo prof-bpf count --pid 1234\n  sudo prof-bpf count --pid 1234 --duration 10"
)]
pub struct CountArgs {
    /// Process to count.
    #[arg(long, short)]
    pub pid: u32,
    /// Stop after this many seconds (default: until Ctrl-C or the process exits).
    #[arg(long, short)]
    pub duration: Option<f64>,
}

/// Runs the session: attach, print one line per second, print totals at the end.
pub fn run(args: CountArgs) -> anyhow::Result<()> {
    ebpf::require_root()?;
    let pid = NonZeroU32::new(args.pid).context("no process with pid 0")?;
    if let Some(d) = args.duration
        && !(d > 0.0 && d.is_finite())
    {
        bail!("--duration must be a positive number of seconds, got {d}");
    }
    let maps = process::maps(pid.get())?;
    let libc = process::find_libc(&maps).with_context(|| {
        format!("pid {pid} maps no C library (libc.so.6); is it statically linked?")
    })?;
    let libc_path = process::path_in_root(pid.get(), &libc.path);
    let allocator = Allocator::from_file(&libc.path, libc_path.clone())?;

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(async move {
            let exit = process::ExitWatcher::new(pid.get())?;
            let mut ebpf = ebpf::load()?;
            ebpf::spawn_logger(&mut ebpf);
            // free first: a free must never be missed for an allocation counted.
            for (program, symbol) in [("count_free", "free"), ("count_malloc", "malloc")] {
                let point = allocator
                    .points
                    .iter()
                    .find(|p| p.symbol == symbol)
                    .with_context(|| format!("{} defines no `{symbol}`", libc.path))?;
                let probe: &mut UProbe = ebpf::program(&mut ebpf, program)?;
                probe
                    .attach(
                        UProbeAttachPoint {
                            location: UProbeAttachLocation::AbsoluteOffset(point.probe_offset),
                            cookie: None,
                        },
                        &libc_path,
                        UProbeScope::OneProcess(pid),
                    )
                    .with_context(|| format!("attaching a uprobe to {symbol} in {}", libc.path))?;
            }
            let counts: PerCpuHashMap<_, u32, AllocCounts> = PerCpuHashMap::try_from(
                ebpf.map(COUNTS_MAP)
                    .context("counter map missing from the eBPF object")?,
            )?;
            eprintln!(
                "prof-bpf: counting malloc/free of pid {pid} ({}) in {}; Ctrl-C to stop",
                process::comm(pid.get()),
                libc.path
            );
            println!(
                "{:>8} {:>12} {:>12} {:>12}",
                "TIME(s)", "MALLOC/s", "BYTES/s", "FREE/s"
            );

            let started = tokio::time::Instant::now();
            let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
            let mut tick =
                tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
            let mut last = AllocCounts::default();
            let mut last_at = started;
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            loop {
                let stop = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut ctrl_c => true,
                    () = exit.exited() => true,
                    () = sleep_until(deadline) => true,
                };
                let now = tokio::time::Instant::now();
                let total = read_counts(&counts, pid.get())?;
                let secs = (now - last_at).as_secs_f64();
                if secs >= 0.05 {
                    println!(
                        "{:>8.1} {:>12.0} {:>12.0} {:>12.0}",
                        (now - started).as_secs_f64(),
                        (total.malloc_calls - last.malloc_calls) as f64 / secs,
                        (total.malloc_bytes - last.malloc_bytes) as f64 / secs,
                        (total.free_calls - last.free_calls) as f64 / secs,
                    );
                }
                last = total;
                last_at = now;
                if stop {
                    println!(
                        "total: malloc_calls={} malloc_bytes={} free_calls={} elapsed={:.1}s",
                        total.malloc_calls,
                        total.malloc_bytes,
                        total.free_calls,
                        (now - started).as_secs_f64()
                    );
                    return Ok(());
                }
            }
        })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The process's counters summed over all CPUs (zero before its first call).
fn read_counts(
    map: &PerCpuHashMap<&aya::maps::MapData, u32, AllocCounts>,
    pid: u32,
) -> anyhow::Result<AllocCounts> {
    let per_cpu = match map.get(&pid, 0) {
        Ok(values) => values,
        Err(aya::maps::MapError::KeyNotFound) => return Ok(AllocCounts::default()),
        Err(err) => return Err(err).context("reading the counter map"),
    };
    Ok(per_cpu
        .iter()
        .fold(AllocCounts::default(), |acc, c| AllocCounts {
            malloc_calls: acc.malloc_calls + c.malloc_calls,
            malloc_bytes: acc.malloc_bytes + c.malloc_bytes,
            free_calls: acc.free_calls + c.free_calls,
        }))
}
