//! `cargo xtask bench alloc`: the same allocation benchmarks under
//! LD_PRELOAD of glibc (nothing preloaded), libprofalloc.so (release, its
//! sampler on at the default rate), gperftools tcmalloc, jemalloc and
//! mimalloc, interleaved run by run; prints the median throughput and peak
//! RSS of each as ratios to glibc.
//!
//! `PROFALLOC_BENCH_RUNS` sets the runs per cell (default 5).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;

use crate::{bench::measure, util};

/// An allocator under test: a name and the library to preload (None: glibc).
struct Allocator {
    name: &'static str,
    lib: Option<PathBuf>,
}

/// Peers from Debian packages: (column name, package, library file prefix).
const PEERS: &[(&str, &str, &str)] = &[
    ("tcmalloc", "libtcmalloc-minimal4", "libtcmalloc_minimal.so"),
    ("jemalloc", "libjemalloc2", "libjemalloc.so"),
    ("mimalloc", "libmimalloc2.0", "libmimalloc.so"),
];

struct Workload {
    name: &'static str,
    /// Program and arguments; `{bench}` is the benchmark binary.
    argv: Vec<String>,
    /// Whether the program prints `ops N seconds S` (else wall time counts).
    reports_time: bool,
}

const PYTHON_WORKLOAD: &str = r#"
import collections, json, re
d = {}
for i in range(300000):
    d[str(i)] = [i] * (i % 7)
words = collections.Counter(re.findall(r"\w+", json.dumps(d)[:3000000]))
s = sorted(d.items(), key=lambda kv: (len(kv[1]), kv[0]))
print(len(d), len(words), s[0][0])
"#;

const SQLITE_WORKLOAD: &str = "\
create table t(id integer primary key, name text, v real);
with recursive c(x) as (select 1 union all select x + 1 from c where x < 300000)
insert into t select x, hex(x * 7919), x * 0.5 from c;
create index t_name on t(name);
select count(*), sum(v), min(name), max(name) from t;
select substr(name, 1, 2), count(*) from t group by 1 order by 2 desc limit 3;";

/// (seconds, peak RSS in KiB) of one run.
fn run_once(argv: &[String], lib: Option<&Path>, reports_time: bool) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd.env_remove("LD_PRELOAD");
    if let Some(lib) = lib {
        cmd.env("LD_PRELOAD", lib);
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).context("reading benchmark output")?;
    let usage = measure::wait_usage(child.id())
        .with_context(|| format!("{} failed with {lib:?}", argv.join(" ")))?;
    let wall = start.elapsed().as_secs_f64();
    let seconds = if reports_time {
        out.split_whitespace()
            .skip_while(|w| *w != "seconds")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no `seconds` in output of {}: {out}", argv.join(" ")))?
    } else {
        wall
    };
    Ok((seconds, usage.max_rss_kib))
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

pub fn run() -> anyhow::Result<()> {
    util::run(
        util::cargo().args(["build", "--release", "-p", "profalloc-preload"]),
        "building libprofalloc.so (release)",
    )?;
    let ours = util::target_dir().join("release/libprofalloc.so");
    let bench = prof_bpf_tests::build_workload("alloc_bench", &["-O2", "-fno-builtin"]);
    let bench = bench.to_string_lossy().into_owned();
    let mut allocators = vec![
        Allocator {
            name: "glibc",
            lib: None,
        },
        Allocator {
            name: "profalloc",
            lib: Some(ours),
        },
    ];
    for (name, package, prefix) in PEERS {
        allocators.push(Allocator {
            name,
            lib: Some(peer_lib(package, prefix)?),
        });
    }
    let c = |args: &[&str]| -> Vec<String> {
        std::iter::once(bench.clone())
            .chain(args.iter().map(|s| s.to_string()))
            .collect()
    };
    let workloads = [
        Workload {
            name: "churn 1 thread",
            argv: c(&["churn", "1", "4000000"]),
            reports_time: true,
        },
        Workload {
            name: "churn 2 threads",
            argv: c(&["churn", "2", "4000000"]),
            reports_time: true,
        },
        Workload {
            name: "producer/consumer",
            argv: c(&["prodcons", "3000000"]),
            reports_time: true,
        },
        Workload {
            name: "larson-like",
            argv: c(&["larson", "20", "200000"]),
            reports_time: true,
        },
        Workload {
            name: "realloc growth",
            argv: c(&["realloc", "1"]),
            reports_time: true,
        },
        Workload {
            name: "python3.11",
            argv: vec![
                "/usr/bin/python3.11".into(),
                "-c".into(),
                PYTHON_WORKLOAD.into(),
            ],
            reports_time: false,
        },
        Workload {
            name: "sqlite3",
            argv: vec!["sqlite3".into(), ":memory:".into(), SQLITE_WORKLOAD.into()],
            reports_time: false,
        },
    ];
    let runs: usize = std::env::var("PROFALLOC_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    eprintln!(
        "xtask: {} workloads x {} allocators x {runs} runs (interleaved)",
        workloads.len(),
        allocators.len()
    );
    // times[w][a], rss[w][a]: one entry per run.
    let mut times = vec![vec![Vec::new(); allocators.len()]; workloads.len()];
    let mut rss = vec![vec![Vec::new(); allocators.len()]; workloads.len()];
    for _ in 0..runs {
        for (w, wl) in workloads.iter().enumerate() {
            for (a, al) in allocators.iter().enumerate() {
                let (t, r) = run_once(&wl.argv, al.lib.as_deref(), wl.reports_time)?;
                times[w][a].push(t);
                rss[w][a].push(r as f64);
            }
        }
    }
    println!(
        "\nthroughput (x glibc, higher is better) / peak RSS (x glibc, lower is better); median of {runs}"
    );
    print!("{:<20} {:>14}", "workload", "glibc");
    for al in &allocators[1..] {
        print!(" {:>16}", al.name);
    }
    println!();
    for (w, wl) in workloads.iter().enumerate() {
        let base_t = measure::median(&mut times[w][0]);
        let base_r = measure::median(&mut rss[w][0]);
        print!("{:<20} {:>7.3}s {:>4.0}M", wl.name, base_t, base_r / 1024.0);
        for a in 1..allocators.len() {
            let t = measure::median(&mut times[w][a]);
            let r = measure::median(&mut rss[w][a]);
            print!(" {:>7.2}x /{:>5.2}x", base_t / t, r / base_r);
        }
        println!();
    }
    Ok(())
}
