//! `cargo xtask bench alloc`: the workloads of [`alloc_workloads`] under
//! glibc (nothing preloaded), libprofalloc.so (release, its sampler on at
//! the default rate), gperftools' tcmalloc and tcmalloc_minimal, jemalloc
//! and mimalloc, interleaved run by run. Prints, per workload and
//! allocator, the median time, its spread and the median peak RSS, then
//! profalloc's ratios to tcmalloc and to the best peer against the bars
//! (throughput at least 1.0x tcmalloc, 1.1x on small churn and larson,
//! 0.9x the best peer; peak RSS at most 1.1x tcmalloc, 1.25x the best
//! peer).
//!
//! Single-threaded workloads also get a line of median CPU seconds (user +
//! system, from wait4, the process and its children) and profalloc's CPU
//! time ratios: on a busy machine a single thread's wall time includes the
//! time it waited for a CPU, and its CPU time does not, so it is the
//! steadier measure of the work done. The bars stay on wall-time throughput
//! (what a user waits for); for multi-threaded workloads CPU time would
//! also count spinning and yielding, so only wall time is shown.
//!
//! A real program's run under profalloc counts only if the library served
//! it (its `PROFALLOC_STATS` exit report shows mapped bytes); other runs
//! are reported and left out.
//!
//! `PROFALLOC_BENCH_RUNS` sets the runs per cell (default 9).
//! `PROFALLOC_BENCH_SKIP=NAME,...` leaves out peers by column name (e.g.
//! `glibc` while another process traces libc's malloc system-wide, which
//! makes each of its calls trap into the kernel); the ratios then say
//! which peers they compare with.
//! `PROFALLOC_BENCH_BASELINE=PATH` adds another libprofalloc.so (an older
//! build) as a column `before`, run in the same interleaving but not
//! counted as a peer, and prints profalloc's ratios to it (a before/after
//! comparison under the same conditions).
//! `PROFALLOC_BENCH_BASELINE_ENV=NAME=VALUE,...` sets variables in that
//! column's runs: with the same library and `PROFALLOC_SAMPLE_BYTES=0`, the
//! ratios are what the always-on sampler costs each workload.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;

use super::alloc_workloads::{self, Workload};
use crate::{bench::measure, util};

/// An allocator under test: a name and the library to preload (None: glibc).
struct Allocator {
    name: &'static str,
    lib: Option<PathBuf>,
    ours: bool,
    /// An older profalloc build to compare with (not a peer).
    baseline: bool,
    /// Variables set in this allocator's runs.
    env: Vec<(String, String)>,
}

/// Peers from Debian packages: (column name, package, library file prefix).
const PEERS: &[(&str, &str, &str)] = &[
    ("tcmalloc", "libgoogle-perftools4", "libtcmalloc.so"),
    (
        "tc_minimal",
        "libtcmalloc-minimal4",
        "libtcmalloc_minimal.so",
    ),
    ("jemalloc", "libjemalloc2", "libjemalloc.so"),
    ("mimalloc", "libmimalloc2.0", "libmimalloc.so"),
];

/// The peer the bars compare with first.
const TCMALLOC: &str = "tcmalloc";

/// Workloads where profalloc must beat tcmalloc by 10%.
const LEAD_WORKLOADS: &[&str] = &["small churn", "larson"];

/// One run's measurements.
struct Run {
    seconds: f64,
    cpu_seconds: f64,
    max_rss_kib: u64,
    /// `final_rss_kib` and `live_kib` when the workload prints them.
    final_rss_kib: Option<u64>,
    live_kib: Option<u64>,
}

/// A `key N` field of `text`.
fn field(text: &str, key: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()?.parse().ok()
}

/// Bytes profalloc mapped, from its exit report (None: no report).
fn mapped_bytes(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("profalloc:")?
                .trim()
                .strip_prefix("mapped:")
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// `NAME=VALUE,...` as pairs; empty for an empty string.
fn baseline_env(spec: &str) -> anyhow::Result<Vec<(String, String)>> {
    spec.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("PROFALLOC_BENCH_BASELINE_ENV: {kv:?} is not NAME=VALUE"))
        })
        .collect()
}

/// One run; Ok(None) when a real program did not run on our library.
fn run_once(wl: &Workload, al: &Allocator) -> anyhow::Result<Option<Run>> {
    let mut cmd = Command::new(&wl.argv[0]);
    cmd.args(&wl.argv[1..])
        .envs(wl.env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("LD_PRELOAD");
    if let Some(lib) = &al.lib {
        cmd.env("LD_PRELOAD", lib);
    }
    cmd.envs(al.env.iter().map(|(k, v)| (k, v)));
    let profalloc = al.ours || al.baseline;
    if profalloc && wl.real {
        cmd.env("PROFALLOC_STATS", "1");
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", wl.argv[0]))?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)
        .context("reading benchmark output")?;
    let usage = measure::wait_usage(child.id());
    let wall = start.elapsed().as_secs_f64();
    let err = errs.join().unwrap_or_default();
    let usage = usage.with_context(|| format!("{} under {}: {err}", wl.name, al.name))?;
    if profalloc && wl.real && mapped_bytes(&err).is_none_or(|m| m == 0) {
        eprintln!(
            "xtask: {} did not run on profalloc (no mapped bytes in its exit report); run left out",
            wl.name
        );
        return Ok(None);
    }
    let seconds = if wl.reports_time {
        out.split_whitespace()
            .skip_while(|w| *w != "seconds")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no `seconds` in output of {}: {out}", wl.name))?
    } else {
        wall
    };
    Ok(Some(Run {
        seconds,
        cpu_seconds: usage.cpu_seconds,
        max_rss_kib: usage.max_rss_kib,
        final_rss_kib: field(&out, "final_rss_kib"),
        live_kib: field(&out, "live_kib"),
    }))
}

/// The library file of a Debian package, found with `dpkg -L`.
fn peer_lib(package: &str, prefix: &str) -> anyhow::Result<PathBuf> {
    let files = util::output(Command::new("dpkg").args(["-L", package]), "dpkg -L")?;
    files
        .lines()
        .map(PathBuf::from)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .min_by_key(|p| p.as_os_str().len())
        .with_context(|| {
            format!("no {prefix}* in package {package} (cargo xtask setup installs it)")
        })
}

/// Median, relative spread ((max - min) / median) of `v`; None when empty.
fn summary(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    let med = measure::median(&mut v);
    let spread = (v[v.len() - 1] - v[0]) / med;
    Some((med, spread))
}

/// profalloc's ratios on one workload and whether they meet the bars:
/// (throughput vs tcmalloc, vs best peer, RSS vs tcmalloc, vs best peer).
struct Verdict {
    thr_tc: f64,
    thr_best: f64,
    rss_tc: f64,
    rss_best: f64,
}

impl Verdict {
    /// The bars this workload misses (empty: all met).
    fn misses(&self, workload: &str) -> Vec<String> {
        let lead = if LEAD_WORKLOADS.contains(&workload) {
            1.1
        } else {
            1.0
        };
        let mut m = Vec::new();
        if self.thr_tc < lead {
            m.push(format!("throughput {:.2}x tcmalloc < {lead}x", self.thr_tc));
        }
        if self.thr_best < 0.9 {
            m.push(format!("throughput {:.2}x best peer < 0.9x", self.thr_best));
        }
        if self.rss_tc > 1.1 {
            m.push(format!("peak RSS {:.2}x tcmalloc > 1.1x", self.rss_tc));
        }
        if self.rss_best > 1.25 {
            m.push(format!("peak RSS {:.2}x best peer > 1.25x", self.rss_best));
        }
        m
    }
}

fn allocators() -> anyhow::Result<Vec<Allocator>> {
    util::run(
        util::cargo().args(["build", "--release", "-p", "profalloc-preload"]),
        "building libprofalloc.so (release)",
    )?;
    let mut all = vec![
        Allocator {
            name: "glibc",
            lib: None,
            ours: false,
            baseline: false,
            env: Vec::new(),
        },
        Allocator {
            name: "profalloc",
            lib: Some(util::target_dir().join("release/libprofalloc.so")),
            ours: true,
            baseline: false,
            env: Vec::new(),
        },
    ];
    if let Some(before) = std::env::var_os("PROFALLOC_BENCH_BASELINE") {
        let env = baseline_env(&std::env::var("PROFALLOC_BENCH_BASELINE_ENV").unwrap_or_default())?;
        all.push(Allocator {
            name: "before",
            lib: Some(before.into()),
            ours: false,
            baseline: true,
            env,
        });
    }
    for (name, package, prefix) in PEERS {
        all.push(Allocator {
            name,
            lib: Some(peer_lib(package, prefix)?),
            ours: false,
            baseline: false,
            env: Vec::new(),
        });
    }
    let skip = std::env::var("PROFALLOC_BENCH_SKIP").unwrap_or_default();
    let skip: Vec<&str> = skip.split(',').map(str::trim).collect();
    if let Some(bad) = skip
        .iter()
        .find(|n| !n.is_empty() && !all.iter().any(|a| !a.ours && a.name == **n))
    {
        anyhow::bail!(
            "PROFALLOC_BENCH_SKIP: no peer named {bad} (glibc, tcmalloc, tc_minimal, jemalloc, mimalloc)"
        );
    }
    all.retain(|a| a.ours || !skip.contains(&a.name));
    if !all.iter().any(|a| a.name == TCMALLOC) {
        anyhow::bail!(
            "PROFALLOC_BENCH_SKIP: the bars compare with tcmalloc, which cannot be left out"
        );
    }
    Ok(all)
}

pub fn run() -> anyhow::Result<()> {
    let allocators = allocators()?;
    let bench = prof_bpf_tests::build_workload("alloc_bench", &["-O2", "-fno-builtin"]);
    let scratch = util::target_dir().join("alloc-bench");
    let workloads =
        alloc_workloads::all(&bench.to_string_lossy(), &scratch, Path::new(&util::root()))?;
    let runs: usize = std::env::var("PROFALLOC_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9)
        .max(1);
    eprintln!(
        "xtask: {} workloads x {} allocators x {runs} runs (interleaved)",
        workloads.len(),
        allocators.len()
    );
    // cells[w][a]: the counted runs.
    let mut cells: Vec<Vec<Vec<Run>>> = (0..workloads.len())
        .map(|_| (0..allocators.len()).map(|_| Vec::new()).collect())
        .collect();
    for _ in 0..runs {
        for (w, wl) in workloads.iter().enumerate() {
            for (a, al) in allocators.iter().enumerate() {
                if let Some(r) = run_once(wl, al)? {
                    cells[w][a].push(r);
                }
            }
        }
    }
    print_table(&workloads, &allocators, &cells, runs);
    Ok(())
}

fn print_table(
    workloads: &[Workload],
    allocators: &[Allocator],
    cells: &[Vec<Vec<Run>>],
    runs: usize,
) {
    println!(
        "\nmedian seconds ±spread (max-min over median) / median peak RSS MiB; {runs} interleaved runs"
    );
    print!("{:<20}", "workload");
    for al in allocators {
        print!(" {:>22}", al.name);
    }
    println!();
    let tc = allocators.iter().position(|a| a.name == TCMALLOC);
    let ours = allocators.iter().position(|a| a.ours);
    let before = allocators.iter().position(|a| a.baseline);
    let mut verdicts = Vec::new();
    let mut versus_before = Vec::new();
    // (workload, CPU-time throughput x tcmalloc, x best peer).
    let mut cpu_ratios = Vec::new();
    for (w, wl) in workloads.iter().enumerate() {
        print!("{:<20}", wl.name);
        // (median seconds, median RSS KiB) per allocator.
        let mut med = Vec::new();
        for cell in &cells[w] {
            let t: Vec<f64> = cell.iter().map(|r| r.seconds).collect();
            let r: Vec<f64> = cell.iter().map(|r| r.max_rss_kib as f64).collect();
            match (summary(&t), summary(&r)) {
                (Some((t, spread)), Some((r, _))) => {
                    print!(
                        " {:>7.3}s ±{:>3.0}% {:>6.1}M",
                        t,
                        spread * 100.0,
                        r / 1024.0
                    );
                    med.push(Some((t, r)));
                }
                _ => {
                    print!(" {:>22}", "no counted run");
                    med.push(None);
                }
            }
        }
        println!();
        if cells[w].iter().flatten().any(|r| r.final_rss_kib.is_some()) {
            print!("{:<20}", "  final RSS / live");
            for cell in &cells[w] {
                let f: Vec<f64> = cell
                    .iter()
                    .filter_map(|r| r.final_rss_kib)
                    .map(|v| v as f64)
                    .collect();
                let l: Vec<f64> = cell
                    .iter()
                    .filter_map(|r| r.live_kib)
                    .map(|v| v as f64)
                    .collect();
                match (summary(&f), summary(&l)) {
                    (Some((f, _)), Some((l, _))) => {
                        print!(" {:>13.1}M / {:>5.1}M", f / 1024.0, l / 1024.0)
                    }
                    _ => print!(" {:>22}", "-"),
                }
            }
            println!();
        }
        if wl.single_threaded {
            print!("{:<20}", "  cpu seconds");
            let mut cpu = Vec::new();
            for cell in &cells[w] {
                let c: Vec<f64> = cell.iter().map(|r| r.cpu_seconds).collect();
                match summary(&c) {
                    Some((c, spread)) => {
                        print!(" {:>7.3}s ±{:>3.0}% {:>7}", c, spread * 100.0, "");
                        cpu.push(Some(c));
                    }
                    None => {
                        print!(" {:>22}", "-");
                        cpu.push(None);
                    }
                }
            }
            println!();
            if let (Some(o), Some(t)) = (ours, tc)
                && let (Some(oc), Some(tcpu)) = (cpu[o], cpu[t])
            {
                let best = cpu
                    .iter()
                    .enumerate()
                    .filter(|(a, _)| *a != o && Some(*a) != before)
                    .filter_map(|(_, c)| *c)
                    .fold(f64::INFINITY, f64::min);
                cpu_ratios.push((wl.name, tcpu / oc, best / oc));
            }
        }
        if let (Some(o), Some(t)) = (ours, tc)
            && let (Some((ot, or)), Some((tt, tr))) = (med[o], med[t])
        {
            if let Some((bt, br)) = before.and_then(|b| med[b]) {
                versus_before.push((wl.name, bt / ot, or / br));
            }
            let peers = med
                .iter()
                .enumerate()
                .filter(|(a, _)| *a != o && Some(*a) != before)
                .filter_map(|(_, m)| *m);
            let best_t = peers.clone().map(|m| m.0).fold(f64::INFINITY, f64::min);
            let best_r = peers.map(|m| m.1).fold(f64::INFINITY, f64::min);
            verdicts.push((
                wl.name,
                Verdict {
                    thr_tc: tt / ot,
                    thr_best: best_t / ot,
                    rss_tc: or / tr,
                    rss_best: or / best_r,
                },
            ));
        }
    }
    println!("\nprofalloc: throughput x tcmalloc, x best peer; peak RSS x tcmalloc, x best peer");
    if allocators.len() < 2 + PEERS.len() + usize::from(before.is_some()) {
        let peers: Vec<&str> = allocators
            .iter()
            .filter(|a| !a.ours && !a.baseline)
            .map(|a| a.name)
            .collect();
        println!("(peers in this run: {})", peers.join(", "));
    }
    for (name, v) in &verdicts {
        let misses = v.misses(name);
        println!(
            "{:<20} {:>6.2}x {:>6.2}x {:>6.2}x {:>6.2}x  {}",
            name,
            v.thr_tc,
            v.thr_best,
            v.rss_tc,
            v.rss_best,
            if misses.is_empty() {
                "all bars met".to_owned()
            } else {
                misses.join("; ")
            }
        );
    }
    if !cpu_ratios.is_empty() {
        println!(
            "\nprofalloc, single-threaded workloads: CPU-time throughput x tcmalloc, x best peer (not a bar)"
        );
        for (name, tc, best) in cpu_ratios {
            println!("{name:<20} {tc:>6.2}x {best:>6.2}x");
        }
    }
    if !versus_before.is_empty() {
        println!("\nprofalloc against `before`: throughput x, peak RSS x");
        for (name, thr, rss) in versus_before {
            println!("{name:<20} {thr:>6.2}x {rss:>6.2}x");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_environment_parses() {
        assert_eq!(
            baseline_env("PROFALLOC_SAMPLE_BYTES=0, A=b=c").unwrap(),
            [
                ("PROFALLOC_SAMPLE_BYTES".to_owned(), "0".to_owned()),
                ("A".to_owned(), "b=c".to_owned())
            ]
        );
        assert!(baseline_env("").unwrap().is_empty());
        assert!(baseline_env("NOVALUE").is_err());
    }

    #[test]
    fn the_exit_report_and_fields_parse() {
        let report = "profalloc: stats at exit\nprofalloc:   mapped: 4194304 bytes\n";
        assert_eq!(mapped_bytes(report), Some(4_194_304));
        assert_eq!(mapped_bytes("nothing here"), None);
        assert_eq!(
            field("final_rss_kib 12 live_kib 3 ops 5", "live_kib"),
            Some(3)
        );
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0)));
    }

    #[test]
    fn bars_name_what_they_miss() {
        let v = Verdict {
            thr_tc: 1.05,
            thr_best: 0.95,
            rss_tc: 1.0,
            rss_best: 1.3,
        };
        assert_eq!(v.misses("larson").len(), 2);
        assert_eq!(v.misses("sqlite3"), ["peak RSS 1.30x best peer > 1.25x"]);
    }
}
