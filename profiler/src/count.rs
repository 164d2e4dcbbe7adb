//! `prof-bpf count --pid N`: malloc and free calls of a running process,
//! counted in the kernel by uprobes on the process's allocator (found as
//! `heap` finds it: the executable's own, a known allocator library, else
//! the C library; or `--lib`).
use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use profiler_common::count::{AllocCounts, COUNTS_MAP};

use crate::{
    ebpf,
    heap::discover::{self, Allocator},
    process,
    runtime::{self, Stop, StopEvent},
};

/// Options of `prof-bpf count`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "EXAMPLES:\n  sudo prof-bpf count --pid 1234\n  sudo prof-bpf count --pid 1234 --duration 10\n  sudo prof-bpf count --pid 1234 --lib /usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
)]
pub struct CountArgs {
    /// Process to count.
    #[arg(long, short)]
    pub pid: u32,
    /// The allocator library to probe instead of the one found in the
    /// process's mappings (a path as the process sees it).
    #[arg(long, value_name = "PATH")]
    pub lib: Option<PathBuf>,
    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM, SIGHUP or the process exits).
    #[arg(long, short, value_name = "SECS", value_parser = runtime::args::seconds)]
    pub duration: Option<Duration>,
}

/// Runs the session: attach, print one line per second, print totals at the end.
pub fn run(args: CountArgs) -> anyhow::Result<()> {
    ebpf::require_root()?;
    let pid = NonZeroU32::new(args.pid).context("no process with pid 0")?;
    process::check_user_process(pid.get())?;
    let allocator = discover::for_process(pid.get(), args.lib.as_deref())?;
    runtime::block_on(async move {
        let mut stop = Stop::new()?;
        let mut ebpf = ebpf::load()?;
        ebpf::spawn_logger(&mut ebpf);
        attach(&mut ebpf, &allocator, pid)?;
        stop.watch(pid.get())
            .with_context(|| format!("pid {pid} exited while attaching"))?;
        let counts: PerCpuHashMap<&MapData, u32, AllocCounts> = PerCpuHashMap::try_from(
            ebpf.map(COUNTS_MAP)
                .context("counter map missing from the eBPF object")?,
        )?;
        eprintln!(
            "prof-bpf: counting malloc/free of pid {pid} ({}) in {}; Ctrl-C to stop",
            process::comm(pid.get()),
            allocator.path
        );
        println!(
            "{:>8} {:>12} {:>12} {:>12}",
            "TIME(s)", "MALLOC/s", "BYTES/s", "FREE/s"
        );
        let started = tokio::time::Instant::now();
        if let Some(d) = args.duration {
            stop.set_deadline(started + d);
        }
        let mut tick =
            tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
        let mut last = (AllocCounts::default(), started);
        loop {
            let done = tokio::select! {
                _ = tick.tick() => false,
                event = stop.next() => matches!(event, StopEvent::Stop(_)),
            };
            let now = tokio::time::Instant::now();
            let total = read_counts(&counts, pid.get())?;
            if let Some(line) = rate_line(
                (now - started).as_secs_f64(),
                &last.0,
                &total,
                (now - last.1).as_secs_f64(),
            ) {
                println!("{line}");
            }
            last = (total, now);
            if done {
                println!("{}", total_line(&total, (now - started).as_secs_f64()));
                return Ok(());
            }
        }
    })
}

/// Probes `free` then `malloc` (a free must never be missed for an
/// allocation counted) of `allocator` in `pid`.
fn attach(ebpf: &mut Ebpf, allocator: &Allocator, pid: NonZeroU32) -> anyhow::Result<()> {
    for (program, symbol) in [("count_free", "free"), ("count_malloc", "malloc")] {
        let point = allocator
            .points
            .iter()
            .find(|p| p.symbol == symbol)
            .with_context(|| format!("{} defines no `{symbol}`", allocator.path))?;
        let probe: &mut UProbe = ebpf::program(ebpf, program)?;
        probe
            .attach(
                UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(point.probe_offset),
                    cookie: None,
                },
                &allocator.open_path,
                UProbeScope::OneProcess(pid),
            )
            .with_context(|| format!("attaching a uprobe to {symbol} in {}", allocator.path))
            .map_err(|err| {
                crate::probe_conflict::explain(err, &allocator.open_path, point.probe_offset)
            })?;
    }
    Ok(())
}

/// One line of rates between `before` and `now` over `secs` seconds, at
/// `elapsed` seconds; none over too short a time to mean anything.
fn rate_line(elapsed: f64, before: &AllocCounts, now: &AllocCounts, secs: f64) -> Option<String> {
    (secs >= 0.05).then(|| {
        format!(
            "{:>8.1} {:>12.0} {:>12.0} {:>12.0}",
            elapsed,
            (now.malloc_calls - before.malloc_calls) as f64 / secs,
            (now.malloc_bytes - before.malloc_bytes) as f64 / secs,
            (now.free_calls - before.free_calls) as f64 / secs,
        )
    })
}

/// The closing line (parsed by scripts: keep its `name=value` form).
fn total_line(total: &AllocCounts, elapsed: f64) -> String {
    format!(
        "total: malloc_calls={} malloc_bytes={} free_calls={} elapsed={elapsed:.1}s",
        total.malloc_calls, total.malloc_bytes, total.free_calls,
    )
}

/// The process's counters summed over all CPUs (zero before its first call).
fn read_counts(
    map: &PerCpuHashMap<&MapData, u32, AllocCounts>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_rates_over_the_interval_and_exact_totals() {
        let before = AllocCounts {
            malloc_calls: 100,
            malloc_bytes: 1000,
            free_calls: 50,
        };
        let now = AllocCounts {
            malloc_calls: 300,
            malloc_bytes: 5000,
            free_calls: 250,
        };
        assert_eq!(
            rate_line(3.0, &before, &now, 0.5).unwrap(),
            "     3.0          400         8000          400"
        );
        assert_eq!(rate_line(3.0, &before, &now, 0.01), None);
        assert_eq!(
            total_line(&now, 2.34),
            "total: malloc_calls=300 malloc_bytes=5000 free_calls=250 elapsed=2.3s"
        );
    }
}
