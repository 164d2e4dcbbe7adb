//! `prof-bpf cpu`: where the machine (or some processes) spends its CPU.
//!
//! A BPF program runs on a perf event on every online CPU (software
//! `cpu-clock`, or hardware `cycles` where the machine has them) and counts
//! samples in the kernel by (pid, tid, user stack, kernel stack). Once per
//! interval this session flips the sampler to the other count map, drains
//! the one no longer written, and feeds the counts to the profile
//! [`Collector`]. Tracepoints on exec and exit report new programs and dying
//! threads at once, so their mappings are read and their names kept while
//! they exist: short-lived processes are still named and symbolized.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap,
    },
    programs::{
        PerfEvent, TracePoint,
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use log::{debug, info, warn};
use profiler_common::{
    cpu::{
        CONFIG_MAP, COUNTS_MAPS, CpuConfig, KEY_KERNEL_STACK, KEY_KERNEL_STACK_FAILED,
        KEY_USER_STACK, KEY_USER_STACK_FAILED, PIDS_MAP, STATS_MAP, SampleCounts, SampleKey, Stat,
        TASK_EVENTS_MAP, TASK_EXEC, TASK_EXIT, TaskEvent,
    },
    stack::{KERNEL_STACKS_MAP, UNWIND_STATS_MAP, USER_STACKS_MAP, UnwindCounter, UserStack},
};

use crate::{
    ebpf,
    output::{OutputArgs, OutputPlan},
    process,
    profile::{Collector, RawSample, SampleType, StackStatus},
    runtime::counters::Counts,
    unwind::Tables,
};

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
    sudo prof-bpf cpu --duration 30 -o flame.svg         # flamegraph")]
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
        default_value_t = 99
    )]
    pub frequency: u64,
    /// Stop after this many seconds [default: until Ctrl-C, or until every --pid exited].
    #[arg(long, short = 'd', value_name = "SECS")]
    pub duration: Option<f64>,
    /// Print the top functions of each interval of this many seconds.
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// Count the idle tasks (pid 0) as well.
    #[arg(long)]
    pub idle: bool,
    /// What drives sampling.
    #[arg(long, value_enum, default_value_t = Event::CpuClock)]
    pub event: Event,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// How often counts are drained when `--interval` is not given: keeps the
/// count maps small whatever the run length.
const DRAIN_EVERY: Duration = Duration::from_secs(1);
/// Time given to samplers still running on other CPUs after the flip.
/// Perf-event programs run with preemption off and take microseconds.
const FLIP_GRACE: Duration = Duration::from_millis(5);
/// After an exec, the dynamic loader maps the libraries; the mappings are
/// read again after these delays so that they are known if the program is
/// gone before its samples are drained.
const EXEC_RESNAPSHOTS: [Duration; 2] = [Duration::from_millis(15), Duration::from_millis(100)];
/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Validated settings.
struct Settings {
    pids: Vec<u32>,
    frequency: u64,
    duration: Option<Duration>,
    interval: Option<Duration>,
    idle: bool,
    event: Event,
    output: OutputPlan,
}

fn validate(args: &CpuArgs) -> anyhow::Result<Settings> {
    let max = max_sample_rate()?;
    if args.frequency == 0 || args.frequency > max {
        bail!(
            "-F {} is out of range: the kernel allows 1 to {max} samples per second \
             (/proc/sys/kernel/perf_event_max_sample_rate)",
            args.frequency
        );
    }
    let seconds = |flag: &str, v: Option<f64>| -> anyhow::Result<Option<Duration>> {
        match v {
            None => Ok(None),
            Some(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => bail!("{flag} must be a positive number of seconds, got {s}"),
        }
    };
    let duration = seconds("--duration", args.duration)?;
    let interval = seconds("--interval", args.interval)?;
    ebpf::require_root()?;
    for &pid in &args.pids {
        process::check_pid(pid)?;
    }
    let output = args.output.check(match args.event {
        Event::CpuClock => &["samples", "cpu"],
        Event::Cycles => &["samples", "cycles"],
    })?;
    Ok(Settings {
        pids: args.pids.clone(),
        frequency: args.frequency,
        duration,
        interval,
        idle: args.idle,
        event: args.event,
        output,
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

/// Runs the session until Ctrl-C, `--duration`, or the exit of every `--pid`.
pub fn run(args: CpuArgs) -> anyhow::Result<()> {
    let settings = validate(&args)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(session(settings))
}

async fn session(settings: Settings) -> anyhow::Result<()> {
    let mut ebpf = ebpf::load()?;
    ebpf::spawn_logger(&mut ebpf);
    // Unwind tables first: the targets' first samples get complete stacks.
    let mut tables = Tables::new(&mut ebpf)?;
    for &pid in &settings.pids {
        tables
            .add_process(pid)
            .with_context(|| format!("building the unwind tables of pid {pid}"))?;
    }
    let mut sampler = Sampler::new(&mut ebpf, &settings)?;
    let (sample_types, default_type, period_type) = match settings.event {
        Event::CpuClock => (
            vec![SampleType::samples(), SampleType::cpu()],
            "cpu",
            SampleType::cpu(),
        ),
        Event::Cycles => (
            vec![SampleType::samples(), SampleType::cycles()],
            "cycles",
            SampleType::cycles(),
        ),
    };
    // cpu-clock samples at a fixed period; cycles at a frequency, where
    // each sample carries its own period.
    let period_ns = match settings.event {
        Event::CpuClock => Some(sample_period_ns(settings.frequency)),
        Event::Cycles => None,
    };
    let new_collector = || {
        let mut c = Collector::new(sample_types.clone(), default_type);
        if let Some(ns) = period_ns {
            c.set_period(period_type.clone(), ns as i64);
        }
        c
    };
    let mut state = State {
        total: new_collector(),
        interval: settings.interval.map(|_| new_collector()),
        names: HashMap::new(),
        noted: HashSet::new(),
        exited: HashSet::new(),
        kthreads: HashMap::new(),
        kernel_stacks: HashMap::new(),
        user_stacks: HashMap::new(),
        user_stacks_read: Vec::new(),
        resnapshots: Vec::new(),
        tables,
        whole_host: settings.pids.is_empty(),
        table_budget: Budget::new(),
        interval_samples: HashMap::new(),
    };

    let scope = if settings.pids.is_empty() {
        "all processes".to_owned()
    } else {
        let list: Vec<String> = settings
            .pids
            .iter()
            .map(|p| format!("{p} ({})", process::comm(*p)))
            .collect();
        format!("pid {}", list.join(", "))
    };
    eprintln!(
        "prof-bpf: sampling {scope} at {} Hz on {} CPUs ({}); Ctrl-C to stop",
        settings.frequency,
        sampler.cpus,
        settings.event.name()
    );

    let mut exits = Vec::new();
    for &pid in &settings.pids {
        exits.push(process::ExitWatcher::new(pid)?);
    }
    let all_exited = async {
        if exits.is_empty() {
            std::future::pending::<()>().await;
        }
        for e in &exits {
            e.exited().await;
        }
    };
    tokio::pin!(all_exited);
    let started = tokio::time::Instant::now();
    let deadline = settings.duration.map(|d| started + d);
    let period = settings.interval.unwrap_or(DRAIN_EVERY);
    let mut tick = tokio::time::interval_at(started + period, period);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // A polite kill (SIGTERM, e.g. from a service manager) also ends the
    // session with a report.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let ring = sampler
        .task_events
        .take()
        .context("task event ring buffer")?;
    // SAFETY: the ring buffer owns its descriptor and keeps it open and
    // unchanged until it is dropped with the AsyncFd.
    let mut events = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
    .context("watching the task event ring buffer")?;

    loop {
        let next_resnapshot = state.resnapshots.iter().map(|(at, _)| *at).min();
        tokio::select! {
            _ = tick.tick() => {
                sampler.drain(&mut state)?;
                state.update_tables();
                if let Some(collector) = state.interval.take() {
                    state.interval = Some(new_collector());
                    print_interval(collector, &settings.output, started.elapsed())?;
                }
            }
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting for task events")?;
                read_task_events(guard.get_inner_mut(), &mut state);
                guard.clear_ready();
            }
            () = sleep_until(next_resnapshot) => state.resnapshot_due(),
            _ = &mut ctrl_c => break,
            _ = terminate.recv() => break,
            () = &mut all_exited => break,
            () = sleep_until(deadline) => break,
        }
    }
    let unwind_stats = Counts::<UnwindCounter>::read(&ebpf, UNWIND_STATS_MAP)?;
    // Detach (the maps stay open), then drain everything that was counted.
    drop(ebpf);
    // Events already queued (exits of the last moments) name the last samples.
    read_task_events(events.get_mut(), &mut state);
    sampler.drain(&mut state)?;
    sampler.drain(&mut state)?;
    let stats = sampler.stats()?;
    let mut collector = state.total;
    let event = settings.event.name();
    for comment in stats.comments(event, started.elapsed()) {
        collector.add_comment(comment);
    }
    collector.add_comment(unwind_stats.comment("user stack walks"));
    eprintln!("prof-bpf: {}", stats.summary(event, started.elapsed()));
    let profile = collector.finish()?;
    settings.output.write(&profile)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Prints the top table of one interval.
fn print_interval(
    collector: Collector,
    output: &OutputPlan,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let profile = collector.finish()?;
    println!("--- {:.1} s", elapsed.as_secs_f64());
    output.top_table(15).write(&profile)
}

/// What the session knows besides the counts.
struct State {
    total: Collector,
    /// The current interval's profile (with `--interval`).
    interval: Option<Collector>,
    /// Last known comm of each task (tid), from exec/exit events or /proc.
    names: HashMap<u32, String>,
    /// Processes whose mappings were read at least once.
    noted: HashSet<u32>,
    /// Processes whose main thread has exited (their /proc entry is going).
    exited: HashSet<u32>,
    /// Whether each process is a kernel thread (no user memory).
    kthreads: HashMap<u32, bool>,
    /// Kernel stacks read so far, by id. The kernel's stack map is never
    /// cleared during a session, so an id always names the same stack.
    kernel_stacks: HashMap<u32, Vec<u64>>,
    /// User stacks read so far: frames and status by id. The id is a hash
    /// of the content, so the entry stays right after the map's copy is
    /// deleted (see [`Sampler::drain`]).
    user_stacks: HashMap<u64, (Vec<u64>, u32)>,
    /// User stacks read from the map during the current drain.
    user_stacks_read: Vec<u64>,
    /// Mapping reads scheduled after an exec.
    resnapshots: Vec<(tokio::time::Instant, u32)>,
    /// The unwinder's tables of the sampled processes.
    tables: Tables,
    /// Sampling every process (no `--pid`).
    whole_host: bool,
    /// CPU time left for building unwind tables.
    table_budget: Budget,
    /// Samples per process in the last drain.
    interval_samples: HashMap<u32, u64>,
}

/// Share of one core that building unwind tables may use on average in a
/// whole-host session.
const TABLE_BUDGET_SHARE: f64 = 0.005;
/// Time that may be spent at once (start-up, or a large object).
const TABLE_BUDGET_BURST: Duration = Duration::from_millis(200);
/// Samples in an interval before a process is worth tables (whole host).
const TABLE_MIN_SAMPLES: u64 = 2;

/// A token bucket of CPU time: refills at a share of wall time, may go
/// into debt by one large piece of work, which later work then waits out.
struct Budget {
    /// Seconds available (negative: debt).
    seconds: f64,
    refilled: Instant,
}

impl Budget {
    fn new() -> Self {
        Self {
            seconds: TABLE_BUDGET_BURST.as_secs_f64(),
            refilled: Instant::now(),
        }
    }

    fn available(&mut self) -> bool {
        let now = Instant::now();
        let earned = (now - self.refilled).as_secs_f64() * TABLE_BUDGET_SHARE;
        self.seconds = (self.seconds + earned).min(TABLE_BUDGET_BURST.as_secs_f64());
        self.refilled = now;
        self.seconds > 0.0
    }

    fn spend(&mut self, used: Duration) {
        self.seconds -= used.as_secs_f64();
    }
}

impl State {
    fn note_process(&mut self, pid: u32) {
        self.total.note_process(pid);
        if let Some(c) = &mut self.interval {
            c.note_process(pid);
        }
        self.noted.insert(pid);
    }

    /// Gives unwind tables to the sampled processes that have none yet
    /// (their walks asked for them) and refreshes those that mapped new
    /// code. With `--pid` every target gets them; a whole-host session
    /// gives them to the busiest processes of the last interval first, and
    /// only within [`TABLE_BUDGET_SHARE`] of one core on average, since
    /// compiling the CFI of large objects costs far more than sampling.
    /// Processes left out keep frame-pointer stacks (cut stacks are shown
    /// as such) and are considered again at the next interval.
    fn update_tables(&mut self) {
        // Whole host: even refreshing known processes (dlopen) compiles
        // new objects, so polling waits for the budget too.
        if self.whole_host && !self.table_budget.available() {
            self.interval_samples.clear();
            return;
        }
        let started = Instant::now();
        let mut unknown = self.tables.poll();
        self.table_budget.spend(started.elapsed());
        unknown.retain(|pid| !self.exited.contains(pid));
        let busy = |pid: &u32| self.interval_samples.get(pid).copied().unwrap_or(0);
        unknown.sort_by_key(|pid| std::cmp::Reverse(busy(pid)));
        for pid in unknown {
            if self.whole_host && (busy(&pid) < TABLE_MIN_SAMPLES || !self.table_budget.available())
            {
                continue;
            }
            let started = Instant::now();
            if let Err(err) = self.tables.add_process(pid) {
                debug!("no unwind tables for pid {pid}: {err:#}");
            }
            self.table_budget.spend(started.elapsed());
        }
        self.interval_samples.clear();
    }

    fn resnapshot_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<u32> = self
            .resnapshots
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, p)| *p)
            .collect();
        self.resnapshots.retain(|(at, _)| *at > now);
        for pid in due {
            // A process that has exited shows empty maps; keep what was read.
            if !self.exited.contains(&pid) && process::maps(pid).is_ok_and(|m| !m.is_empty()) {
                self.note_process(pid);
            }
        }
    }

    fn comm(&mut self, tid: u32, pid: u32) -> String {
        if tid == 0 {
            return "swapper".to_owned();
        }
        if let Some(name) = self.names.get(&tid) {
            return name.clone();
        }
        let path = if tid == pid {
            format!("/proc/{pid}/comm")
        } else {
            format!("/proc/{pid}/task/{tid}/comm")
        };
        match std::fs::read_to_string(path) {
            Ok(s) => {
                let name = s.trim_end().to_owned();
                self.names.insert(tid, name.clone());
                name
            }
            Err(_) => "?".to_owned(),
        }
    }

    fn is_kthread(&mut self, pid: u32) -> bool {
        *self.kthreads.entry(pid).or_insert_with(|| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 9 (flags), counted after the parenthesised comm.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(6))
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_KTHREAD != 0)
        })
    }

    fn add(&mut self, sample: RawSample) {
        if let Some(c) = &mut self.interval {
            c.add(sample.clone());
        }
        self.total.add(sample);
    }
}

/// Handles every queued exec/exit event.
fn read_task_events(ring: &mut RingBuf<MapData>, state: &mut State) {
    while let Some(item) = ring.next() {
        if item.len() < size_of::<TaskEvent>() {
            continue;
        }
        // SAFETY: the buffer holds at least one TaskEvent (checked above),
        // a plain-old-data type; read_unaligned copes with any alignment.
        let event: TaskEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        let comm = comm_string(&event.comm);
        match event.kind {
            TASK_EXEC => {
                debug!("exec pid {} tid {} {comm}", event.pid, event.tid);
                state.names.insert(event.tid, comm.clone());
                state.names.insert(event.pid, comm);
                state.exited.remove(&event.pid);
                state.kthreads.insert(event.pid, false);
                state.note_process(event.pid);
                // The old program's tables are useless now. A target gets
                // the new ones at once; on the whole host, the process waits
                // its turn within the budget like any other.
                if state.whole_host {
                    state.tables.remove_process(event.pid);
                } else if let Err(err) = state.tables.refresh_process(event.pid) {
                    debug!("unwind tables of pid {} after exec: {err:#}", event.pid);
                }
                let now = tokio::time::Instant::now();
                for delay in EXEC_RESNAPSHOTS {
                    state.resnapshots.push((now + delay, event.pid));
                }
            }
            TASK_EXIT => {
                state.names.insert(event.tid, comm);
                if event.tid == event.pid {
                    state.exited.insert(event.pid);
                    state.tables.remove_process(event.pid);
                }
            }
            _ => {}
        }
    }
}

fn comm_string(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

/// The loaded and attached programs and their maps.
struct Sampler {
    config: Array<MapData, CpuConfig>,
    config_value: CpuConfig,
    counts: [PerCpuHashMap<MapData, SampleKey, SampleCounts>; 2],
    kernel_stacks: StackTraceMap<MapData>,
    user_stacks: BpfHashMap<MapData, u64, UserStack>,
    stats: PerCpuArray<MapData, u64>,
    task_events: Option<RingBuf<MapData>>,
    cpus: usize,
    frequency: u64,
}

impl Sampler {
    fn new(ebpf: &mut aya::Ebpf, settings: &Settings) -> anyhow::Result<Self> {
        let take = |ebpf: &mut aya::Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let mut config: Array<MapData, CpuConfig> = take(ebpf, CONFIG_MAP)?.try_into()?;
        let config_value = CpuConfig {
            active_counts: 0,
            include_idle: u32::from(settings.idle),
            filter_pids: u32::from(!settings.pids.is_empty()),
            user_stacks: 1,
        };
        config
            .set(0, config_value, 0)
            .context("writing the sampler configuration")?;
        let mut pids: BpfHashMap<MapData, u32, u32> = take(ebpf, PIDS_MAP)?.try_into()?;
        for &pid in &settings.pids {
            pids.insert(pid, 0, 0).context("writing the pid filter")?;
        }
        let counts = [
            take(ebpf, COUNTS_MAPS[0])?.try_into()?,
            take(ebpf, COUNTS_MAPS[1])?.try_into()?,
        ];
        let kernel_stacks = take(ebpf, KERNEL_STACKS_MAP)?.try_into()?;
        let user_stacks = take(ebpf, USER_STACKS_MAP)?.try_into()?;
        let stats = take(ebpf, STATS_MAP)?.try_into()?;
        let task_events = Some(take(ebpf, TASK_EVENTS_MAP)?.try_into()?);

        // Task events first, so no exec in the first samples goes unseen.
        for (program, name) in [
            ("cpu_task_exec", "sched_process_exec"),
            ("cpu_task_exit", "sched_process_exit"),
        ] {
            let tp: &mut TracePoint = ebpf::program(ebpf, program)?;
            tp.attach("sched", name)
                .with_context(|| format!("attaching to the tracepoint sched:{name}"))?;
        }
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
        let perf: &mut PerfEvent = ebpf::program(ebpf, "cpu_sample")?;
        let (event, policy) = match settings.event {
            // cpu-clock counts nanoseconds: a fixed period gives exactly
            // `frequency` samples per second of CPU time.
            Event::CpuClock => (
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                SamplePolicy::Period(sample_period_ns(settings.frequency)),
            ),
            Event::Cycles => (
                PerfEventConfig::Hardware(HardwareEvent::CpuCycles),
                SamplePolicy::Frequency(settings.frequency),
            ),
        };
        for &cpu in &cpus {
            perf.attach(
                event,
                PerfEventScope::AllProcessesOneCpu { cpu },
                policy,
                false,
            )
            .map_err(|e| attach_error(&e, settings.event, cpu))?;
        }
        info!("sampler attached on {} CPUs", cpus.len());
        Ok(Self {
            config,
            config_value,
            counts,
            kernel_stacks,
            user_stacks,
            stats,
            task_events,
            cpus: cpus.len(),
            frequency: settings.frequency,
        })
    }
}

/// The cpu-clock period of `frequency` samples per second, in nanoseconds.
fn sample_period_ns(frequency: u64) -> u64 {
    1_000_000_000 / frequency.max(1)
}

/// Turns a failed perf-event attach into an actionable message.
fn attach_error(err: &aya::programs::ProgramError, event: Event, cpu: u32) -> anyhow::Error {
    let io = match err {
        aya::programs::ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match (event, io) {
        (Event::Cycles, Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV | libc::EINVAL)) => {
            anyhow::anyhow!(
                "--event cycles is not available: this machine offers no hardware cycle counter \
             (virtual machine without a PMU?); use --event cpu-clock"
            )
        }
        _ => anyhow::anyhow!("attaching the sampler to CPU {cpu}: {err}"),
    }
}

impl Sampler {
    /// Moves the sampler to the other count map and feeds every count of
    /// the previous one to the collectors, then deletes them.
    fn drain(&mut self, state: &mut State) -> anyhow::Result<()> {
        let old = self.config_value.active_counts as usize & 1;
        self.config_value.active_counts = (old as u32) ^ 1;
        self.config
            .set(0, self.config_value, 0)
            .context("switching the sampler's count map")?;
        std::thread::sleep(FLIP_GRACE);
        let map = &mut self.counts[old];
        let mut entries = Vec::new();
        for item in map.iter() {
            match item {
                Ok((key, per_cpu)) => {
                    let sum = per_cpu
                        .iter()
                        .fold(SampleCounts::default(), |acc, c| SampleCounts {
                            samples: acc.samples + c.samples,
                            period: acc.period + c.period,
                        });
                    entries.push((key, sum));
                }
                Err(e) => {
                    // The key was deleted under us or the iteration restarted.
                    debug!("reading a sample count: {e}");
                }
            }
        }
        for (key, _) in &entries {
            let _ = map.remove(key);
        }
        debug!("drained {} keys from {}", entries.len(), COUNTS_MAPS[old]);
        for (key, counts) in entries {
            self.add_sample(state, &key, &counts);
        }
        // The user stacks read are cached here by their content hash, so
        // the map's copies can go: the map then only holds the stacks of
        // the current interval and never fills up on long sessions. A
        // sample already counted under a deleted id finds it in the cache;
        // a new sample with that stack stores it again.
        for id in std::mem::take(&mut state.user_stacks_read) {
            let _ = self.user_stacks.remove(&id);
        }
        Ok(())
    }

    fn add_sample(&self, state: &mut State, key: &SampleKey, counts: &SampleCounts) {
        let pid = key.pid;
        *state.interval_samples.entry(pid).or_default() += counts.samples;
        if pid != 0 && !state.noted.contains(&pid) && !state.exited.contains(&pid) {
            state.note_process(pid);
        }
        let kernel = if key.flags & KEY_KERNEL_STACK != 0 {
            self.kernel_stack(state, key.kernel_stack)
        } else {
            Vec::new()
        };
        let (user, user_status) = if key.flags & KEY_USER_STACK != 0 {
            match self.user_stack(state, key.user_stack) {
                Some((frames, status))
                    if StackStatus::from_kernel(status) == StackStatus::Missing
                        && frames.is_empty()
                        && state.is_kthread(pid) =>
                {
                    (Vec::new(), StackStatus::Complete)
                }
                Some((frames, status)) => (frames, StackStatus::from_kernel(status)),
                None => (Vec::new(), StackStatus::Missing),
            }
        } else if key.flags & KEY_USER_STACK_FAILED != 0 {
            (Vec::new(), StackStatus::Missing)
        } else {
            // The idle tasks: no user side at all.
            (Vec::new(), StackStatus::Complete)
        };
        let in_kernel = key.flags & (KEY_KERNEL_STACK | KEY_KERNEL_STACK_FAILED) != 0;
        let comm = state.comm(pid, pid);
        let thread_comm = state.comm(key.tid, pid);
        let sample = RawSample {
            pid,
            tid: Some(key.tid),
            thread_comm: (thread_comm != comm).then_some(thread_comm),
            comm,
            user,
            // In the kernel, the user stack starts where the task entered it
            // (a return address); otherwise at the sampled pc.
            leaf_is_pc: !in_kernel,
            user_status,
            kernel,
            values: vec![counts.samples as i64, counts.period as i64],
            numeric_labels: Vec::new(),
            leaf_marker: None,
        };
        state.add(sample);
    }

    fn kernel_stack(&self, state: &mut State, id: u32) -> Vec<u64> {
        if let Some(frames) = state.kernel_stacks.get(&id) {
            return frames.clone();
        }
        match self.kernel_stacks.get(&id, 0) {
            Ok(trace) => {
                let frames: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
                state.kernel_stacks.insert(id, frames.clone());
                frames
            }
            Err(e) => {
                warn!("kernel stack {id} unreadable: {e}");
                Vec::new()
            }
        }
    }

    fn user_stack(&self, state: &mut State, id: u64) -> Option<(Vec<u64>, u32)> {
        if let Some(stack) = state.user_stacks.get(&id) {
            return Some(stack.clone());
        }
        let stack = self.user_stacks.get(&id, 0).ok()?;
        let entry = (stack.frames().to_vec(), stack.status);
        state.user_stacks.insert(id, entry.clone());
        state.user_stacks_read.push(id);
        Some(entry)
    }

    fn stats(&self) -> anyhow::Result<Stats> {
        let mut values = [0u64; profiler_common::cpu::STATS_LEN as usize];
        for (i, v) in values.iter_mut().enumerate() {
            let per_cpu = self
                .stats
                .get(&(i as u32), 0)
                .context("reading the sampler statistics")?;
            *v = per_cpu.iter().sum();
        }
        Ok(Stats {
            values,
            cpus: self.cpus,
            frequency: self.frequency,
        })
    }
}

/// The sampler's counters at the end of a session.
struct Stats {
    values: [u64; profiler_common::cpu::STATS_LEN as usize],
    cpus: usize,
    frequency: u64,
}

impl Stats {
    fn get(&self, stat: Stat) -> u64 {
        self.values[stat as usize]
    }

    /// Samples of the selected tasks (counted in the profile or lost).
    fn selected(&self) -> u64 {
        self.get(Stat::Samples) - self.get(Stat::Idle) - self.get(Stat::Filtered)
    }

    /// One line for stderr: what was sampled and everything lost.
    fn summary(&self, event: &str, elapsed: Duration) -> String {
        format!(
            "{} samples of {} taken ({event} at {} Hz on {} CPUs for {:.1} s); \
             lost: {} (count map full); stacks not recorded: {} kernel, {} user; \
             task events lost: {}",
            self.selected(),
            self.get(Stat::Samples),
            self.frequency,
            self.cpus,
            elapsed.as_secs_f64(),
            self.get(Stat::CountsFull),
            self.get(Stat::KernelStackFailed),
            self.get(Stat::UserStackFailed),
            self.get(Stat::TaskEventsLost),
        )
    }

    /// The profile's comments: how it was taken and everything lost.
    fn comments(&self, event: &str, elapsed: Duration) -> Vec<String> {
        vec![
            format!(
                "prof-bpf cpu: {event} at {} Hz on {} CPUs for {:.1} s",
                self.frequency,
                self.cpus,
                elapsed.as_secs_f64()
            ),
            format!(
                "samples: {} taken, {} of idle tasks not counted, {} of other processes",
                self.get(Stat::Samples),
                self.get(Stat::Idle),
                self.get(Stat::Filtered)
            ),
            format!(
                "lost samples (count map full): {}",
                self.get(Stat::CountsFull)
            ),
            format!(
                "kernel stacks not recorded: {}",
                self.get(Stat::KernelStackFailed)
            ),
            format!(
                "user stacks not recorded: {}",
                self.get(Stat::UserStackFailed)
            ),
            format!(
                "task events lost (ring buffer full): {}",
                self.get(Stat::TaskEventsLost)
            ),
        ]
    }
}
