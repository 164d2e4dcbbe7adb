//! One `cpu` session: attach the sampler, drain its counts every interval
//! into the profile collectors, keep task names and unwind tables up to
//! date, show a live status line, and write the report when it stops.
use std::{
    collections::HashSet, ffi::OsString, io::IsTerminal as _, process::ExitCode, time::Duration,
};

use anyhow::Context as _;
use log::debug;
use profiler_common::{
    cpu::{KEY_PYTHON_STACK, KEY_USER_STACK, STATS_MAP, SampleCounts, SampleKey},
    python::{PyCounter, STATS_MAP as PY_STATS_MAP},
    stack::{UNWIND_STATS_MAP, UnwindCounter},
    stack_copy::{COPY_ID_BIT, COPY_STATS_MAP, CopyCounter},
};

use super::{
    Settings, Targets,
    report::{self, Stacks},
    sampler::{self, Sampler},
    stats::{self, Counters, Sampling, Status},
    task_watch::TaskWatch,
    tasks::{Change, LiveProc, Tasks},
};
use crate::{
    ebpf, launch,
    output::OutputPlan,
    process,
    profile::Collector,
    python::tracker::Tracker as PythonTracker,
    runtime::{self, Stop, StopEvent, StopReason, counters::Counts},
    unwind::{Tables, copied::CopiedStacks},
};

/// How often counts are drained when `--interval` is not given: keeps the
/// count maps small whatever the run length.
const DRAIN_EVERY: Duration = Duration::from_secs(1);
/// How often processes that met unknown code get the objects already
/// loaded (and the others queued), and finished objects are placed: a
/// compiler started by a build lives well under a second.
const INSTALL_EVERY: Duration = Duration::from_millis(50);
/// After an exec, the dynamic loader maps the libraries; the mappings are
/// read again after these delays so that they are known if the program is
/// gone before its samples are drained.
const EXEC_RESNAPSHOTS: [Duration; 2] = [Duration::from_millis(15), Duration::from_millis(100)];
/// Drains a sample whose stack was copied waits for the copy to arrive
/// (every copy id has a record; one dropped over the memory cap leaves the
/// kernel's stack after this long, and the session's end reads them all).
const COPY_ARRIVAL_DRAINS: u32 = 3;
/// How often an interpreter that has no thread state yet is looked at.
const PYTHON_STARTING_POLL: Duration = Duration::from_millis(20);
/// Rows of an interval's top table (unless --nodecount says otherwise).
const INTERVAL_ROWS: usize = 15;
/// Status lines on stderr when it is not a terminal: one per this many
/// status ticks of a second.
const STATUS_EVERY_LINES: u64 = 10;

/// Runs a session to its end and writes the report; in launch mode,
/// returns the program's status.
pub(crate) fn run(settings: Settings, mut output: OutputPlan) -> anyhow::Result<ExitCode> {
    if matches!(settings.targets, Targets::Launch(_)) {
        // The program owns stdout.
        output.stdout_to_stderr();
    }
    runtime::block_on(async move {
        // First: a signal from now on ends the session with a report.
        let mut stop = Stop::new()?;
        if let Targets::Launch(command) = &settings.targets {
            return record_launched(&settings, &output, &mut stop, command).await;
        }
        let mut session = Session::start(&settings)?;
        for &pid in settings.pids() {
            stop.watch(pid)?;
        }
        session.record(&mut stop, &output).await?;
        session.finish(&output).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `cpu -- CMD`: samples the command and every process it starts until it
/// exits; its status is prof-bpf's.
async fn record_launched(
    settings: &Settings,
    output: &OutputPlan,
    stop: &mut Stop,
    command: &[OsString],
) -> anyhow::Result<ExitCode> {
    let suspended = launch::spawn_suspended(command)?;
    // On an error before the exec, `suspended` is dropped: the child exits
    // without running the program.
    let mut session = Session::start(settings)?;
    session.sampler.add_pid(suspended.pid)?;
    let mut launched = suspended.resume()?;
    launched.attached();
    let recorded = async {
        stop.watch(launched.pid())?;
        session.record(stop, output).await
    }
    .await;
    let result = match recorded {
        Ok(reason) => {
            let written = session.finish(output).await;
            launched.pass_on(reason);
            written
        }
        Err(err) => Err(err),
    };
    Ok(launched.finish(result))
}

/// The sampler and everything known besides its counts.
struct Session {
    ebpf: aya::Ebpf,
    sampler: Sampler,
    state: State,
    events: TaskWatch,
    settings: Settings,
    started: tokio::time::Instant,
    /// The interval table being printed (`--interval`).
    printing: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// What the drains feed.
struct State {
    total: Collector,
    /// The current interval's profile (with `--interval`).
    interval: Option<Collector>,
    tasks: Tasks,
    stacks: Stacks,
    /// Processes whose mappings were read at least once.
    noted: HashSet<u32>,
    /// Mapping reads scheduled after an exec.
    resnapshots: Vec<(tokio::time::Instant, u32)>,
    /// The unwinder's tables of the sampled processes.
    tables: Tables,
    /// Stacks copied by the kernel where tables were missing, and the
    /// samples that wait for them to be unwound.
    copies: CopiedStacks,
    /// (with the drains they waited through: see [`COPY_ARRIVAL_DRAINS`]).
    waiting: Vec<(SampleKey, SampleCounts, u32)>,
    /// Sampling every process (no `--pid`, no command).
    whole_host: bool,
    /// Samples per process in the last drain.
    interval_samples: std::collections::HashMap<u32, u64>,
    /// The Python frame walker's processes, threads and names.
    python: PythonTracker,
}

impl Session {
    /// Loads the programs, builds the targets' unwind tables (so that their
    /// first samples get complete stacks) and attaches the sampler.
    fn start(settings: &Settings) -> anyhow::Result<Self> {
        sampler::check_event(settings.event)?;
        let mut ebpf = ebpf::load()?;
        ebpf::spawn_logger(&mut ebpf);
        let mut tables = Tables::with_options(&mut ebpf, &settings.unwind)?;
        tables.preload(settings.targets == Targets::All);
        for &pid in settings.pids() {
            tables
                .add_process(pid)
                .with_context(|| format!("building the unwind tables of pid {pid}"))?;
        }
        if settings.targets == Targets::All {
            // Every running process's tables, built in the background
            // within the budget, busiest first (their stacks are copied
            // until then).
            tables.limit_builds();
            let running = tables.request_running();
            debug!(
                "unwind tables requested for {} running processes",
                running.len()
            );
        }
        let mut python = PythonTracker::new(&mut ebpf, false)?;
        python.set_view(settings.python_frames, settings.python_lines);
        python.set_gil_only(settings.python_gil);
        for &pid in settings.pids() {
            python.add_process(pid);
        }
        if settings.targets == Targets::All {
            python.add_running();
        }
        let copies = CopiedStacks::new(&mut ebpf)?;
        let mut sampler = Sampler::new(&mut ebpf, settings)?;
        let ring = sampler
            .task_events
            .take()
            .context("task event ring buffer")?;
        let events = TaskWatch::start(ring).context("starting the task event thread")?;
        let new_collector = || report::collector(settings.event, settings.frequency);
        let mut state = State {
            total: new_collector(),
            interval: settings.interval.map(|_| new_collector()),
            tasks: Tasks::default(),
            stacks: Stacks::default(),
            noted: HashSet::new(),
            resnapshots: Vec::new(),
            tables,
            copies,
            waiting: Vec::new(),
            whole_host: settings.targets == Targets::All,
            interval_samples: std::collections::HashMap::new(),
            python,
        };
        // The targets' mappings are read now: one that exits before the
        // first drain is still placed (it ran its program before the start,
        // so no exec event brings them).
        for &pid in settings.pids() {
            state.note_process(pid);
        }
        eprintln!("prof-bpf: {}", settings.unwind.start_line());
        eprintln!(
            "prof-bpf: sampling {} at {} Hz on {} CPUs ({}); Ctrl-C to stop",
            scope(&settings.targets),
            settings.frequency,
            sampler.cpus,
            settings.event.name()
        );
        Ok(Self {
            ebpf,
            sampler,
            state,
            events,
            settings: settings.clone(),
            started: tokio::time::Instant::now(),
            printing: None,
        })
    }

    /// Records until `stop` says why to stop.
    async fn record(&mut self, stop: &mut Stop, output: &OutputPlan) -> anyhow::Result<StopReason> {
        self.started = tokio::time::Instant::now();
        if let Some(duration) = self.settings.duration {
            stop.set_deadline(self.started + duration);
            self.sampler.stop_after(duration)?;
        }
        let period = self.settings.interval.unwrap_or(DRAIN_EVERY);
        let mut tick = tokio::time::interval_at(self.started + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Status lines come every second whatever --interval is.
        let mut status_tick = tokio::time::interval_at(self.started + DRAIN_EVERY, DRAIN_EVERY);
        let mut install_tick = tokio::time::interval(INSTALL_EVERY);
        install_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tty = std::io::stderr().is_terminal();
        let mut status = Status::default();
        let mut lines = 0u64;
        let reason = loop {
            let next_resnapshot = self.state.resnapshots.iter().map(|(at, _)| *at).min();
            tokio::select! {
                _ = tick.tick() => {
                    self.drain()?;
                    self.state.python.refresh();
                    self.state.update_tables();
                    self.state.resolve_copies(false);
                    self.print_interval(output, tty).await?;
                }
                _ = install_tick.tick() => self.state.serve_tables(),
                _ = status_tick.tick() => {
                    lines += 1;
                    let counters = Counters::read(&self.ebpf, STATS_MAP)?;
                    let line = status.line(&counters, self.started.elapsed(), self.state.noted.len());
                    if tty {
                        // Not over an interval table being printed.
                        if !self.printing() {
                            eprint!("\r\x1b[K{line}");
                        }
                    } else if lines.is_multiple_of(STATUS_EVERY_LINES) {
                        eprintln!("{line}");
                    }
                }
                events = self.events.next() => self.state.apply_task_events(&events),
                () = runtime::sleep_until(next_resnapshot) => self.state.resnapshot_due(),
                // An interpreter found while starting has its threads
                // listed as soon as they exist.
                () = runtime::sleep_until(self.state.python.has_starting().then(|| {
                    tokio::time::Instant::now() + PYTHON_STARTING_POLL
                })) => self.state.python.refresh_starting(),
                event = stop.next() => match event {
                    StopEvent::Exited(pid) => debug!("pid {pid} exited"),
                    StopEvent::Stop(reason) => break reason,
                },
            }
        };
        if tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("prof-bpf: stopping: {reason}");
        Ok(reason)
    }

    /// Starts printing the table of the interval that just ended, on a
    /// thread of its own: symbolizing a busy host takes seconds, and the
    /// session must keep sampling and stop on time meanwhile. While a table
    /// is still being printed, the next interval goes on collecting and
    /// its table covers both.
    async fn print_interval(&mut self, output: &OutputPlan, tty: bool) -> anyhow::Result<()> {
        if self.state.interval.is_none() || self.printing() {
            return Ok(());
        }
        self.finish_printing().await?;
        if tty {
            // Clear the status line.
            eprint!("\r\x1b[K");
        }
        let fresh = self.new_collector();
        let Some(collector) = self.state.interval.replace(fresh) else {
            return Ok(());
        };
        let table = output.top_table(INTERVAL_ROWS);
        let to_stderr = matches!(self.settings.targets, Targets::Launch(_));
        let elapsed = self.started.elapsed();
        self.printing = Some(tokio::task::spawn_blocking(move || {
            print_interval(collector, table, to_stderr, elapsed)
        }));
        Ok(())
    }

    /// Whether an interval table is being printed.
    fn printing(&self) -> bool {
        self.printing.as_ref().is_some_and(|p| !p.is_finished())
    }

    /// Waits for the interval table being printed, if any.
    async fn finish_printing(&mut self) -> anyhow::Result<()> {
        match self.printing.take() {
            Some(printing) => printing.await.context("printing an interval table")?,
            None => Ok(()),
        }
    }

    fn new_collector(&self) -> Collector {
        report::collector(self.settings.event, self.settings.frequency)
    }

    /// Feeds every count of the sampler's previous map to the collectors.
    fn drain(&mut self) -> anyhow::Result<()> {
        self.state.drain(&mut self.sampler)
    }

    /// Detaches the sampler, drains what it counted, and writes the report
    /// (after the interval table being printed, if any).
    async fn finish(self, output: &OutputPlan) -> anyhow::Result<()> {
        let unwind = Counts::<UnwindCounter>::read(&self.ebpf, UNWIND_STATS_MAP)?;
        let python_walks = Counts::<PyCounter>::read(&self.ebpf, PY_STATS_MAP)?;
        let copied = Counts::<CopyCounter>::read(&self.ebpf, COPY_STATS_MAP)?;
        // Read before detaching: the map goes with the programs.
        let counters = Counters::read(&self.ebpf, STATS_MAP)?;
        // The kernel stopped counting at --duration.
        let elapsed = self
            .settings
            .duration
            .map_or(self.started.elapsed(), |d| d.min(self.started.elapsed()));
        let Self {
            ebpf,
            mut sampler,
            mut state,
            mut events,
            settings,
            printing,
            ..
        } = self;
        // Detach (the maps stay open), then drain everything counted.
        drop(ebpf);
        if let Some(printing) = printing {
            printing.await.context("printing an interval table")??;
        }
        // Events already queued (exits of the last moments) name the last samples.
        state.apply_task_events(&events.finish());
        state.drain(&mut sampler)?;
        state.drain(&mut sampler)?;
        // The copies still waiting get their tables now, whatever the budget.
        let started = state.copies.prepare_end(&mut state.tables);
        state.copies.unwind_ready(&state.tables, true);
        state.resolve_copies(true);
        state.copies.finish_end(started);
        let sampling = Sampling {
            event: settings.event.name(),
            frequency: settings.frequency,
            cpus: sampler.cpus,
            elapsed,
        };
        let mut collector = state.total;
        for comment in stats::comments(&counters, &sampling) {
            collector.add_comment(comment);
        }
        collector.add_comment(unwind.comment("user stack walks"));
        for comment in state.python.comments(&python_walks) {
            collector.add_comment(comment);
        }
        let copies = state.copies.comment(&copied);
        eprintln!("prof-bpf: {copies}");
        collector.add_comment(copies);
        let tables = state.tables.stats().summary();
        eprintln!("prof-bpf: {tables}");
        collector.add_comment(tables);
        eprintln!("prof-bpf: {}", stats::summary(&counters, &sampling));
        let profile = collector.finish()?;
        output.write(&profile)
    }
}

/// What `targets` means, for the start line.
fn scope(targets: &Targets) -> String {
    match targets {
        Targets::All => "all processes".to_owned(),
        Targets::Pids(pids) => {
            let list: Vec<String> = pids
                .iter()
                .map(|p| format!("{p} ({})", process::comm(*p)))
                .collect();
            format!("pid {}", list.join(", "))
        }
        Targets::Launch(command) => format!(
            "`{}` and its children",
            command
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

/// Prints the top table of one interval: on stdout, or on stderr in
/// launch mode (the program owns stdout).
fn print_interval(
    collector: Collector,
    mut table: OutputPlan,
    to_stderr: bool,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let profile = collector.finish()?;
    let header = format!("--- {:.1} s", elapsed.as_secs_f64());
    if to_stderr {
        table.stdout_to_stderr();
        eprintln!("{header}");
    } else {
        println!("{header}");
    }
    table.write(&profile)
}

impl State {
    /// Feeds every count of the sampler's previous map to the collectors.
    fn drain(&mut self, sampler: &mut Sampler) -> anyhow::Result<()> {
        for (key, counts) in sampler.drain(&mut self.stacks)? {
            // Named and counted now, whenever its stack is ready.
            self.note_sample(key.pid, counts.samples);
            if key.flags & KEY_USER_STACK != 0 && key.user_stack & COPY_ID_BIT != 0 {
                if key.flags & KEY_PYTHON_STACK != 0 {
                    self.python.name_early(key.pid, key.python_stack);
                }
                self.waiting.push((key, counts, 0));
            } else {
                self.add(&key, &counts);
            }
        }
        Ok(())
    }

    /// Unwinds the stack copies the tables now cover and adds the samples
    /// that waited for them. With `force` (the session's end), every
    /// sample is added: one whose copy could not be unwound with tables
    /// keeps the stack the kernel walked by frame pointers.
    fn resolve_copies(&mut self, force: bool) {
        if force {
            self.copies.unwind_ready(&self.tables, true);
        } else {
            self.copies.settle(&mut self.tables);
        }
        for (key, counts, drains) in std::mem::take(&mut self.waiting) {
            let id = key.user_stack;
            let prefix = self.stacks.user.get(&id).map(|(f, _)| f.as_slice());
            if let Some((frames, status)) = self.copies.take(id, prefix.unwrap_or_default()) {
                self.stacks.user.insert(id, (frames, status as u32));
            } else if self.copies.was_taken(id) {
                // Another sample's stack from the same copy, stored above.
            } else if !force && (self.copies.is_pending(id) || drains < COPY_ARRIVAL_DRAINS) {
                // Waiting for its tables, or for the copy itself: the
                // reader thread may not have read it from the ring yet on
                // a loaded machine.
                self.waiting.push((key, counts, drains + 1));
                continue;
            }
            self.add(&key, &counts);
        }
    }

    fn note_process(&mut self, pid: u32) {
        self.total.note_process(pid);
        if let Some(c) = &mut self.interval {
            c.note_process(pid);
        }
        self.noted.insert(pid);
        self.python.add_process(pid);
    }

    fn add(
        &mut self,
        key: &profiler_common::cpu::SampleKey,
        counts: &profiler_common::cpu::SampleCounts,
    ) {
        let pid = key.pid;
        let mut sample = report::sample(key, counts, &self.stacks, &mut self.tasks, &LiveProc);
        if key.flags & KEY_PYTHON_STACK != 0 {
            self.python.merge(pid, key.python_stack, &mut sample);
        }
        if let Some(c) = &mut self.interval {
            c.add(sample.clone());
        }
        self.total.add(sample);
    }

    /// Counts `samples` of process `pid` for the table budget and reads its
    /// mappings if not done yet.
    fn note_sample(&mut self, pid: u32, samples: u64) {
        *self.interval_samples.entry(pid).or_default() += samples;
        if pid != 0 && !self.noted.contains(&pid) && !self.tasks.has_exited(pid) {
            self.note_process(pid);
        }
    }

    fn apply_task_events(&mut self, events: &[profiler_common::cpu::TaskEvent]) {
        for event in events {
            match self.tasks.apply(event) {
                Change::Exec(pid) => self.exec(pid),
                Change::ProcessExit(pid) => {
                    // Its tables stay until its copies are unwound.
                    self.copies.process_exited(pid, &mut self.tables);
                    self.python.exited(pid);
                }
                Change::None => {}
            }
        }
    }

    /// Process `pid` runs a new program.
    fn exec(&mut self, pid: u32) {
        debug!("exec pid {pid}");
        self.python.forget(pid);
        self.note_process(pid);
        // The old program's tables are useless now. A target's new ones
        // are built before any other; on the whole host, the process waits
        // its turn within the budget like any other. Meanwhile its stacks
        // are copied.
        if self.whole_host {
            self.tables.remove_process(pid);
        } else if let Err(err) = self.tables.request(pid, true) {
            debug!("unwind tables of pid {pid} after exec: {err:#}");
        }
        let now = tokio::time::Instant::now();
        for delay in EXEC_RESNAPSHOTS {
            self.resnapshots.push((now + delay, pid));
        }
    }

    /// After a drain: the builder's queue is ordered by the samples of
    /// the interval that ended (busiest first, see `unwind::budget`).
    fn update_tables(&mut self) {
        self.serve_tables();
        self.tables.prioritize(&self.interval_samples);
        self.interval_samples.clear();
    }

    /// Between drains: processes whose walks met unknown code get the
    /// objects already loaded at once and the others queued, and the
    /// objects the builder finished are placed. Nothing here waits for a
    /// build.
    fn serve_tables(&mut self) {
        self.copies.request_tables(&mut self.tables);
        for pid in self.tables.poll_queued() {
            debug!("unwind tables requested for pid {pid}");
        }
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
            if !self.tasks.has_exited(pid) && process::maps(pid).is_ok_and(|m| !m.is_empty()) {
                self.note_process(pid);
            }
        }
    }
}
