//! `cargo xtask bench preload`: the cost of libprofalloc.so's preload
//! mode, in one run with its peers, interleaved run by run (medians):
//! - the always-on sampler per malloc/free pair with nothing attached
//!   (default mean 512 KiB against the sampler off), and the sampled live
//!   heap's share of it (against `PROFALLOC_LIVE_HEAP_BYTES=0`);
//! - on a workload allocating about 100 MiB/s: libprofalloc.so alone, with
//!   its live heap off, with HEAPPROFILE (slowdown and cost per sampled
//!   event), with `prof-bpf heap`
//!   attached through the sampling hooks (as root), through the
//!   `otel_memory` USDT probes, the same through malloc/free uprobes for
//!   comparison, with HEAPCHECK, and glibc for
//!   reference;
//! - the two kinds of USDT sites on the same workload: libprofalloc.so's
//!   (a 5-byte nop, first instruction of its own function: a uprobe there
//!   is a call on 6.18) against the C stand-in allocator's `<sys/sdt.h>`
//!   sites (`tests/workloads/usdt_alloc.c`: a 1-byte nop, a uprobe traps),
//!   each alone and with `prof-bpf heap --probe usdt` attached, at the same
//!   mean sampling distances: cost per sampled allocation (its alloc and
//!   free probes) and slowdown, with their ratios.
//!
//! Times are the processes' CPU time (user + system, from wait4); a uprobe
//! runs its BPF program in the traced thread, so that time includes the
//! probes' cost. The agent's own CPU time is printed beside it.
//! `PROFALLOC_BENCH_RUNS` sets the runs per cell (default 5).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{bench::measure, util};

struct Run {
    seconds: f64,
    ops: f64,
    bytes: f64,
    sampled: f64,
    /// CPU seconds of the attached agent, if any.
    agent_seconds: f64,
}

/// `prof-bpf ARGS` attached to the workload by pid (`{pid}` in ARGS) before
/// it starts its loop.
struct Agent<'a> {
    prof: &'a Path,
    args: &'a [&'a str],
}

fn field(text: &str, key: &str) -> Option<f64> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

fn run_once(
    bench: &str,
    args: &[&str],
    lib: Option<&Path>,
    env: &[(&str, &str)],
    agent: Option<&Agent>,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new(bench);
    cmd.args(args)
        .env_remove("LD_PRELOAD")
        .env("PROFALLOC_STATS", "1");
    if let Some(lib) = lib {
        cmd.env("LD_PRELOAD", lib);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if agent.is_some() {
        cmd.env("PRELOAD_BENCH_WAIT", "1");
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {bench}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut attached = None;
    if let Some(agent) = agent {
        out.read_line(&mut stdout)?;
        if stdout.trim() != "ready" {
            bail!("{bench} {args:?}: expected `ready`, got `{stdout}`");
        }
        stdout.clear();
        let pid = child.id().to_string();
        let agent_args: Vec<String> = agent
            .args
            .iter()
            .map(|a| a.replace("{pid}", &pid))
            .collect();
        let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
        let (agent_child, _) = prof_bpf_tests::start_until(agent.prof, &agent_args, "attached");
        attached = Some(agent_child);
        stdin.write_all(b"go\n")?;
    }
    drop(stdin);
    out.read_to_string(&mut stdout)?;
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    // CPU time (user + system) of the whole process: steadier than wall
    // time on a shared machine, and it includes the exit-time dumps.
    let cpu = measure::wait_usage(child.id())
        .with_context(|| format!("{bench} {args:?} {env:?} failed: {stderr}"))?
        .cpu_seconds;
    // The agent ends with its target; its CPU time from wait4 too.
    let agent_seconds = match attached {
        Some(agent) => {
            measure::wait_usage(agent.id())
                .with_context(|| format!("prof-bpf heap attached to {bench} failed"))?
                .cpu_seconds
        }
        None => 0.0,
    };
    let sampled = stderr
        .lines()
        .find_map(|l| l.split("sampled allocations:").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok(Run {
        seconds: cpu,
        ops: field(&stdout, "ops").context("no `ops` in the output")?,
        bytes: field(&stdout, "bytes").unwrap_or(0.0),
        sampled,
        agent_seconds,
    })
}

struct Cell {
    name: &'static str,
    /// Another program and its arguments than the bench's.
    program: Option<(String, Vec<String>)>,
    lib: bool,
    env: Vec<(&'static str, String)>,
    /// `prof-bpf` arguments when the agent is attached.
    agent: Option<&'static [&'static str]>,
    runs: Vec<Run>,
}

impl Cell {
    fn new(name: &'static str, lib: bool, env: &[(&'static str, &str)]) -> Self {
        Self {
            name,
            program: None,
            lib,
            env: env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            agent: None,
            runs: Vec::new(),
        }
    }
    fn running(mut self, program: &str, args: &[&str]) -> Self {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        self.program = Some((program.to_owned(), args));
        self
    }
    fn attached(mut self, args: &'static [&'static str]) -> Self {
        self.agent = Some(args);
        self
    }
    fn median(&self, f: impl Fn(&Run) -> f64) -> f64 {
        measure::median(&mut self.runs.iter().map(f).collect::<Vec<f64>>())
    }
    fn seconds(&self) -> f64 {
        self.median(|r| r.seconds)
    }
    fn sampled(&self) -> f64 {
        self.median(|r| r.sampled)
    }
}

fn measure(
    bench: &str,
    args: &[&str],
    lib: &Path,
    prof: &Path,
    cells: &mut [Cell],
    runs: usize,
) -> anyhow::Result<()> {
    for _ in 0..runs {
        for c in cells.iter_mut() {
            let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let agent = c.agent.map(|args| Agent { prof, args });
            let (program, program_args): (&str, Vec<&str>) = match &c.program {
                Some((p, a)) => (p, a.iter().map(String::as_str).collect()),
                None => (bench, args.to_vec()),
            };
            let r = run_once(
                program,
                &program_args,
                c.lib.then_some(lib),
                &env,
                agent.as_ref(),
            )?;
            c.runs.push(r);
        }
    }
    Ok(())
}

/// `prof-bpf heap` through libprofalloc.so's sampling hooks.
const HEAP_HOOKS: &[&str] = &[
    "heap",
    "--pid",
    "{pid}",
    "--probe",
    "hooks",
    "--format",
    "folded",
    "-o",
    "/dev/null",
];
/// `prof-bpf heap` through libprofalloc.so's `otel_memory` USDT probes.
const HEAP_USDT: &[&str] = &[
    "heap",
    "--pid",
    "{pid}",
    "--probe",
    "usdt",
    "--format",
    "folded",
    "-o",
    "/dev/null",
];
/// `prof-bpf heap` through malloc/free uprobes, sampling at the same rate.
const HEAP_UPROBES: &[&str] = &[
    "heap",
    "--pid",
    "{pid}",
    "--probe",
    "malloc",
    "--sample-bytes",
    "524288",
    "--format",
    "folded",
    "-o",
    "/dev/null",
];

pub fn run() -> anyhow::Result<()> {
    let root = util::is_root();
    if root {
        util::build_release()?;
    } else {
        util::run(
            util::cargo().args(["build", "--release", "-p", "profalloc-preload"]),
            "building libprofalloc.so (release)",
        )?;
    }
    let lib = util::target_dir().join("release/libprofalloc.so");
    let prof = util::release_artifact("prof-bpf");
    let bench = prof_bpf_tests::build_workload("preload_bench", &["-O2", "-fno-builtin"]);
    let bench = bench.to_string_lossy().into_owned();
    let runs: usize = std::env::var("PROFALLOC_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("bench-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prefix = dir.join("bench").to_string_lossy().into_owned();

    println!(
        "== always-on sampler, nothing attached: malloc/free pairs of 16..1024 B ({runs} runs, medians)"
    );
    let pairs = "30000000";
    let mut cells = vec![
        Cell::new(
            "sampler off (PROFALLOC_SAMPLE_BYTES=0)",
            true,
            &[("PROFALLOC_SAMPLE_BYTES", "0")],
        ),
        Cell::new("sampler on (default 512 KiB)", true, &[]),
        Cell::new(
            "sampler on, live heap off",
            true,
            &[("PROFALLOC_LIVE_HEAP_BYTES", "0")],
        ),
    ];
    measure(&bench, &["churn", pairs], &lib, &prof, &mut cells, runs)?;
    let n: f64 = pairs.parse()?;
    let off = cells[0].seconds() / n * 1e9;
    let on = cells[1].seconds() / n * 1e9;
    let no_live = cells[2].seconds() / n * 1e9;
    for (c, ns) in cells.iter().zip([off, on, no_live]) {
        println!(
            "  {:<44} {ns:8.2} ns per pair  ({:.0} samples)",
            c.name,
            c.sampled()
        );
    }
    println!(
        "  sampler cost: {:+.2} ns per malloc/free pair{} (goal: at most 1 ns)",
        on - off,
        if on <= off {
            ", below the run-to-run noise"
        } else {
            ""
        }
    );

    println!(
        "  live heap cost: {:+.2}% ({:+.2} ns per pair; goal: at most 1%)",
        100.0 * (on - no_live) / no_live,
        on - no_live
    );

    println!("\n== a workload allocating about 100 MiB/s ({runs} runs, medians)");
    let mut cells = vec![
        Cell::new("glibc (reference)", false, &[]),
        Cell::new("profalloc, nothing attached", true, &[]),
        Cell::new(
            "profalloc, live heap off",
            true,
            &[("PROFALLOC_LIVE_HEAP_BYTES", "0")],
        ),
        Cell::new(
            "profalloc + HEAPPROFILE",
            true,
            &[("HEAPPROFILE", prefix.as_str())],
        ),
        // Many more events, so that their cost stands out of the noise.
        Cell::new(
            "profalloc + HEAPPROFILE, 4 KiB mean",
            true,
            &[
                ("HEAPPROFILE", prefix.as_str()),
                ("PROFALLOC_SAMPLE_BYTES", "4096"),
            ],
        ),
    ];
    if root {
        cells.extend([
            Cell::new("profalloc + prof-bpf heap (hooks)", true, &[]).attached(HEAP_HOOKS),
            Cell::new(
                "profalloc + prof-bpf heap (hooks), 4 KiB",
                true,
                &[("PROFALLOC_SAMPLE_BYTES", "4096")],
            )
            .attached(HEAP_HOOKS),
            Cell::new("profalloc + prof-bpf heap (otel_memory USDT)", true, &[])
                .attached(HEAP_USDT),
            Cell::new(
                "profalloc + prof-bpf heap (otel_memory USDT), 4 KiB",
                true,
                &[("PROFALLOC_SAMPLE_BYTES", "4096")],
            )
            .attached(HEAP_USDT),
            Cell::new("profalloc + prof-bpf heap (malloc uprobes)", true, &[])
                .attached(HEAP_UPROBES),
            Cell::new("glibc + prof-bpf heap (malloc uprobes)", false, &[]).attached(HEAP_UPROBES),
        ]);
    }
    cells.push(Cell::new(
        "profalloc + HEAPCHECK=normal",
        true,
        &[("HEAPCHECK", "normal")],
    ));
    measure(&bench, &["rate", "200000"], &lib, &prof, &mut cells, runs)?;
    let base = cells[1].seconds();
    let glibc = cells[0].seconds();
    let first = &cells[1].runs[0];
    println!(
        "  allocation rate: {:.0} MiB/s of CPU time ({:.0} allocations)",
        first.bytes / base / 1048576.0,
        first.ops
    );
    for c in &cells {
        let s = c.seconds();
        // Each configuration against its own allocator alone.
        let alone = if c.lib { base } else { glibc };
        let extra = s - alone;
        let sampled = c.sampled();
        let cost = if c.name.contains('+') && extra <= 0.0 {
            // Slower runs of the reference: the cost is below the noise.
            "  cost below the run-to-run noise".to_owned()
        } else if c.agent == Some(HEAP_UPROBES) {
            // Every malloc and free traps, sampled or not.
            let calls = 2.0 * first.ops;
            format!(
                "  {:.2} us per traced call ({calls:.0} calls)",
                extra / calls * 1e6
            )
        } else if c.name.contains('+') && sampled > 0.0 {
            format!(
                "  {:.2} us per sampled event ({sampled:.0} events)",
                extra / sampled * 1e6
            )
        } else {
            String::new()
        };
        let agent = if c.agent.is_some() {
            format!("  agent {:.3} s CPU", c.median(|r| r.agent_seconds))
        } else {
            String::new()
        };
        let versus = if c.lib { "profalloc" } else { "glibc" };
        println!(
            "  {:<44} {s:7.3} s CPU  {:+6.2}% vs {versus} alone{cost}{agent}",
            c.name,
            100.0 * extra / alone
        );
    }
    let no_live = cells[2].seconds();
    println!(
        "  live heap cost: {:+.2}% (profalloc against profalloc with PROFALLOC_LIVE_HEAP_BYTES=0; goal: at most 1%)",
        100.0 * (base - no_live) / no_live
    );
    println!(
        "  goal: HEAPPROFILE and prof-bpf through the hooks each under 2% slowdown; HEAPCHECK: reported only"
    );
    if !root {
        println!(
            "  not measured: `prof-bpf heap` attached (needs root: sudo -E cargo xtask bench preload)"
        );
    }
    if root {
        sites(&bench, &lib, &prof, runs)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Our 5-byte-nop USDT sites against `<sys/sdt.h>`'s 1-byte-nop (trap)
/// sites, on the same workload (`rate`), at two mean distances.
fn sites(bench: &str, lib: &Path, prof: &Path, runs: usize) -> anyhow::Result<()> {
    let standin = prof_bpf_tests::build_workload("usdt_alloc", &["-O2", "-fno-builtin"]);
    let standin = standin.to_string_lossy().into_owned();
    let n = "200000";
    println!(
        "\n== USDT sites: libprofalloc.so's 5-byte nop against <sys/sdt.h>'s 1-byte nop (C stand-in allocator), `rate {n}` ({runs} runs, medians)"
    );
    for (label, mean) in [("4 KiB", "4096"), ("512 KiB", "524288")] {
        let mut cells = vec![
            Cell::new("profalloc", true, &[("PROFALLOC_SAMPLE_BYTES", mean)]),
            Cell::new(
                "profalloc + heap (5-byte nop sites)",
                true,
                &[("PROFALLOC_SAMPLE_BYTES", mean)],
            )
            .attached(HEAP_USDT),
            Cell::new("stand-in", false, &[]).running(&standin, &["rate", n, mean]),
            Cell::new("stand-in + heap (1-byte nop, trap sites)", false, &[])
                .running(&standin, &["rate", n, mean])
                .attached(HEAP_USDT),
        ];
        measure(bench, &["rate", n], lib, prof, &mut cells, runs)?;
        println!("  mean distance {label}:");
        let mut per_event = [0.0; 2];
        let mut slowdown = [0.0; 2];
        for (k, pair) in cells.chunks(2).enumerate() {
            let (alone, with) = (pair[0].seconds(), pair[1].seconds());
            let events = pair[1].sampled();
            per_event[k] = (with - alone) / events.max(1.0) * 1e6;
            slowdown[k] = 100.0 * (with - alone) / alone;
            println!(
                "    {:<44} {alone:7.3} s CPU alone, {with:7.3} s attached: {:+6.2}%, {:.2} us per sampled allocation ({events:.0}), agent {:.3} s CPU",
                pair[1].name,
                slowdown[k],
                per_event[k],
                pair[1].median(|r| r.agent_seconds)
            );
        }
        println!(
            "    trap sites / 5-byte-nop sites: {:.2}x the cost per sampled allocation, {:.2}x the slowdown",
            per_event[1] / per_event[0],
            slowdown[1] / slowdown[0]
        );
    }
    Ok(())
}
