//! Which objects each process needs, and how they get there: a process's
//! mappings are read, the objects already loaded are installed at once,
//! and the others are queued for the builder thread ([`super::background`]).
//! Finished objects are placed in the kernel's maps by the caller's thread
//! (the session loop) and installed in every process that waits for them,
//! even one that exited meanwhile, whose stack copies still need them.
use std::time::Instant;

use super::{
    background::{self, Outcome, Prepared},
    budget::Budget,
    *,
};

/// How a refresh gets the objects that are not loaded yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    /// Not at all: only objects already loaded are installed.
    LoadedOnly,
    /// Queued for the builder thread; the caller goes on. `sampled`: the
    /// process was seen running (its objects go before those of processes
    /// merely listed at the start, until priorities say more).
    Queue { urgent: bool, sampled: bool },
    /// Queued as urgent, and waited for.
    Wait,
}

/// The longest a caller waits for a process's tables.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

impl Tables {
    /// Whether `pid` has tables (some may still be being built).
    pub fn has_process(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    /// Whether every object `pid` mapped when last read is installed (or
    /// known to have no tables): nothing of it is being built.
    pub fn is_complete(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid) && self.pending.get(&pid).is_none_or(HashSet::is_empty)
    }

    /// A number that changes whenever `pid` gets more tables.
    pub fn generation(&self, pid: u32) -> u64 {
        self.generations.get(&pid).copied().unwrap_or(0)
    }

    /// Whether `pc` is in a mapping of `pid` whose object is being built.
    pub fn is_pending_at(&self, pid: u32, pc: u64) -> bool {
        self.pending
            .get(&pid)
            .is_some_and(|p| p.iter().any(|m| m.start <= pc && pc < m.end))
    }

    /// Loads tables for every executable mapping of `pid` (objects already
    /// loaded for other processes are shared), and waits for them.
    pub fn add_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh(pid, Build::Wait)
    }

    /// Gives `pid` the tables of the objects already loaded for other
    /// processes, and builds none: nearly free (a new `rustc` gets
    /// `librustc_driver` at once once any `rustc` has it).
    pub fn install_loaded(&mut self, pid: u32) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh(pid, Build::LoadedOnly)
    }

    /// Brings `pid`'s tables in line with its current mappings (after a
    /// `dlopen`, `munmap` or `exec`), and waits for them.
    pub fn refresh_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.refresh(pid, Build::Wait)
    }

    /// [`Self::add_process`] or [`Self::refresh_process`] without waiting:
    /// the loaded objects are installed now, the others queued for the
    /// builder thread (`urgent`: before any other, whatever the budget)
    /// and installed by [`Self::install_built`].
    pub fn request(&mut self, pid: u32, urgent: bool) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh(
            pid,
            Build::Queue {
                urgent,
                sampled: true,
            },
        )
    }

    /// [`Self::request`] with `maps`, the process's mappings read earlier
    /// (it may have exited since: its stack copies still need tables).
    pub fn request_mapped(&mut self, pid: u32, maps: &[Mapping]) -> anyhow::Result<()> {
        self.processes.entry(pid).or_default();
        self.refresh_with(
            pid,
            maps,
            Build::Queue {
                urgent: false,
                sampled: true,
            },
        );
        Ok(())
    }

    /// [`Self::request`] for every process running now; returns them.
    pub fn request_running(&mut self) -> Vec<u32> {
        let pids: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&pid| pid != std::process::id())
            .collect();
        // Kernel threads and processes gone meanwhile have no tables.
        let listed = Build::Queue {
            urgent: false,
            sampled: false,
        };
        pids.into_iter()
            .filter(|&pid| {
                self.processes.entry(pid).or_default();
                self.refresh(pid, listed).is_ok()
            })
            .collect()
    }

    /// Builds that are not urgent wait for a CPU budget from now on (see
    /// [`super::budget`]), and none starts before the first
    /// [`Self::prioritize`] says which processes are busy.
    pub fn limit_builds(&mut self) {
        let mut jobs = self.queue.jobs();
        jobs.budget = Some(Budget::new(Instant::now()));
        jobs.hold = true;
    }

    /// Orders the queued objects by the samples of the processes that
    /// wait for them (`samples`: per process, of the last interval).
    pub fn prioritize(&mut self, samples: &HashMap<u32, u64>) {
        let mut per_object: HashMap<ObjectKey, u64> = HashMap::new();
        for (pid, pending) in &self.pending {
            let n = samples.get(pid).copied().unwrap_or(0);
            for m in pending {
                *per_object.entry(m.key).or_default() += n;
            }
        }
        let mut jobs = self.queue.jobs();
        jobs.hold = false;
        for (key, job) in &mut jobs.waiting {
            // Those of processes seen running stay before the others.
            job.priority = per_object.get(key).map_or(job.priority.min(1), |n| n + 1);
        }
    }

    /// Places the objects the builder finished since the last call and
    /// installs them where they are waited for; returns how many.
    pub fn install_built(&mut self) -> usize {
        // Taken before the results: every object of a preload that is over
        // is in the channel already.
        let preloaded = match self.preloading {
            Some(_) => self.queue.jobs().preloaded.take(),
            None => None,
        };
        let mut n = 0;
        while let Ok(prepared) = self.queue.results.try_recv() {
            self.place(prepared);
            n += 1;
        }
        if let Some(summary) = preloaded {
            self.preload_done(&summary);
        }
        n
    }

    /// Says what the preload loaded.
    fn preload_done(&mut self, summary: &preload::PreloadSummary) {
        let Some((asked, budget)) = self.preloading.take() else {
            return;
        };
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        eprintln!(
            "prof-bpf: unwind tables: preloaded {} objects ({:.1} MiB of rows, at most {:.0} MiB: --unwind-preload) from the cache in {:.2} s; {} entries read, {} left out for a changed or missing file, {} recording no file, {} over the budget",
            self.stats.preloaded,
            mib(self.stats.preloaded_bytes as u64),
            mib(budget),
            asked.elapsed().as_secs_f64(),
            summary.objects,
            summary.changed,
            summary.no_origin,
            summary.over_budget,
        );
    }

    /// Builds what `pids` still wait for before anything else, whatever the
    /// budget, and waits for it until `deadline` (the end of a session:
    /// their stack copies need them). Processes still running are read
    /// again first; those that exited get what they mapped then.
    pub fn complete(&mut self, pids: &[u32], deadline: Instant) {
        for &pid in pids {
            if background::alive(pid) {
                let _ = self.request(pid, true);
            }
            self.urge(pid);
        }
        for &pid in pids {
            self.wait_for(pid, deadline);
        }
    }

    /// Drops `pid`'s tables (objects no other process uses become idle).
    pub fn remove_process(&mut self, pid: u32) {
        self.last_refresh.remove(&pid);
        self.generations.remove(&pid);
        self.asked.remove(&pid);
        if let Some(installed) = self.processes.remove(&pid) {
            for m in &installed {
                self.uninstall(pid, m);
            }
        }
        // Objects nobody waits for any more are not built.
        if let Some(pending) = self.pending.remove(&pid) {
            let mut jobs = self.queue.jobs();
            for m in pending {
                let wanted = self
                    .pending
                    .values()
                    .any(|p| p.iter().any(|o| o.key == m.key));
                if !wanted && jobs.waiting.remove(&m.key).is_some() {
                    self.requested.remove(&m.key);
                }
            }
        }
    }

    /// Refreshes the processes whose walks met unknown code since the last
    /// call (waiting for their builds with `build`, else installing only
    /// objects already loaded), and returns those that have no tables yet.
    pub fn poll(&mut self, build: bool) -> Vec<u32> {
        self.install_built();
        let mode = if build {
            Build::Wait
        } else {
            Build::LoadedOnly
        };
        let mut unknown = Vec::new();
        for pid in self.take_refresh_requests() {
            if self.processes.contains_key(&pid) {
                if let Err(err) = self.refresh(pid, mode) {
                    debug!("refreshing unwind tables of pid {pid}: {err:#}");
                }
            } else {
                unknown.push(pid);
            }
        }
        unknown
    }

    /// [`Self::poll`] that waits for nothing: every process that asked is
    /// [`Self::request`]ed. Returns those that asked for the first time
    /// (whether or not [`Self::request_running`] knew them).
    pub fn poll_queued(&mut self) -> Vec<u32> {
        self.install_built();
        let mut new = Vec::new();
        for pid in self.take_refresh_requests() {
            match self.request(pid, false) {
                Ok(()) if self.asked.insert(pid) => new.push(pid),
                Ok(()) => {}
                Err(err) => debug!("unwind tables of pid {pid}: {err:#}"),
            }
        }
        new
    }

    /// The processes whose walks met unknown code, but those refreshed
    /// within [`REFRESH_INTERVAL`].
    fn take_refresh_requests(&mut self) -> Vec<u32> {
        let requested: Vec<u32> = self.refresh.keys().filter_map(Result::ok).collect();
        let mut due = Vec::new();
        for pid in requested {
            if self
                .last_refresh
                .get(&pid)
                .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL)
            {
                continue;
            }
            let _ = self.refresh.remove(&pid);
            due.push(pid);
        }
        due
    }

    fn refresh(&mut self, pid: u32, build: Build) -> anyhow::Result<()> {
        match process::maps(pid) {
            Ok(maps) => {
                self.refresh_with(pid, &maps, build);
                Ok(())
            }
            Err(err) => {
                self.remove_process(pid);
                Err(err)
            }
        }
    }

    /// Brings `pid`'s tables in line with `maps`.
    fn refresh_with(&mut self, pid: u32, maps: &[Mapping], build: Build) {
        self.install_built();
        let started = Instant::now();
        self.last_refresh.insert(pid, started);
        let wanted: HashSet<Installed> = maps
            .iter()
            .filter(|m| m.is_executable() && (m.is_file() || m.path == VDSO))
            .map(|m| Installed {
                start: m.start,
                end: m.end,
                offset: m.offset,
                key: ObjectKey {
                    dev: m.dev,
                    inode: m.inode,
                },
            })
            .collect();
        let current = self.processes.remove(&pid).unwrap_or_default();
        for gone in current.difference(&wanted) {
            self.uninstall(pid, gone);
        }
        let mut installed: HashSet<Installed> = current.intersection(&wanted).cloned().collect();
        let mut pending = self.pending.remove(&pid).unwrap_or_default();
        pending.retain(|m| wanted.contains(m));
        let urgent = matches!(build, Build::Wait | Build::Queue { urgent: true, .. });
        let sampled = !matches!(build, Build::Queue { sampled: false, .. });
        for new in wanted.difference(&current) {
            if pending.contains(new) {
                continue;
            }
            let mapping = maps
                .iter()
                .find(|m| m.start == new.start && m.end == new.end)
                .expect("wanted mappings come from maps");
            if let Some(idle) = self.objects.get(&new.key).filter(|o| o.users == 0)
                && let Some(identity) = file_identity(pid, mapping)
                && idle.identity != Some(identity)
            {
                // Another file now has this device and inode.
                let stale = self.objects.remove(&new.key).expect("looked up above");
                self.files.withdraw(&new.key);
                self.free_object(stale);
            }
            if self.objects.contains_key(&new.key) {
                match self.install(pid, new) {
                    Ok(()) => {
                        installed.insert(new.clone());
                    }
                    Err(err) => self.install_failed(pid, &mapping.path, &err),
                }
            } else if build != Build::LoadedOnly {
                self.queue_object(pid, mapping, new.key, urgent, u64::from(sampled));
                pending.insert(new.clone());
            }
        }
        if installed.len() > current.len() {
            *self.generations.entry(pid).or_default() += 1;
        }
        self.processes.insert(pid, installed);
        if !pending.is_empty() {
            self.pending.insert(pid, pending);
        }
        self.stats.build_time += started.elapsed();
        if build == Build::Wait {
            self.urge(pid);
            self.wait_for(pid, Instant::now() + WAIT_LIMIT);
        }
    }

    /// Queues the object of `mapping` (read through `pid`), or adds `pid`
    /// as another way to read it.
    fn queue_object(
        &mut self,
        pid: u32,
        mapping: &Mapping,
        key: ObjectKey,
        urgent: bool,
        priority: u64,
    ) {
        let mut jobs = self.queue.jobs();
        if let Some(job) = jobs.waiting.get_mut(&key) {
            job.urgent |= urgent;
            job.priority = job.priority.max(priority);
            if job.sources.len() < MAX_SOURCES {
                job.sources.push((pid, mapping.clone()));
            }
            return;
        }
        if self.requested.insert(key) {
            jobs.waiting.insert(
                key,
                background::Job {
                    sources: vec![(pid, mapping.clone())],
                    priority,
                    urgent,
                    probed: false,
                },
            );
        }
    }

    /// Makes every object `pid` waits for urgent.
    fn urge(&mut self, pid: u32) {
        let Some(pending) = self.pending.get(&pid) else {
            return;
        };
        let mut jobs = self.queue.jobs();
        for m in pending {
            if let Some(job) = jobs.waiting.get_mut(&m.key) {
                job.urgent = true;
            }
        }
    }

    /// Places finished objects until `pid` waits for none, or `deadline`.
    fn wait_for(&mut self, pid: u32, deadline: Instant) {
        while self.pending.get(&pid).is_some_and(|p| !p.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.queue.results.recv_timeout(left) {
                Ok(prepared) => self.place(prepared),
                Err(_) => break,
            }
        }
    }

    /// Loads a finished object and installs it in the processes that
    /// wait for it.
    fn place(&mut self, prepared: Prepared) {
        let Prepared {
            key,
            name,
            outcome,
            stats,
            thread,
            cpu,
            preloaded,
        } = prepared;
        self.requested.remove(&key);
        debug!("{name} built ({:.3} s of CPU)", cpu.as_secs_f64());
        self.build_stats[thread] = stats;
        self.stats.builder_cpu += cpu;
        let mut waiting = Vec::new();
        for (&pid, pending) in &mut self.pending {
            pending.retain(|m| {
                let this = m.key == key;
                if this {
                    waiting.push((pid, m.clone()));
                }
                !this
            });
        }
        self.pending.retain(|_, p| !p.is_empty());
        if !self.objects.contains_key(&key) {
            let object = match outcome {
                Outcome::Built(compiled) => {
                    let started = Instant::now();
                    let loaded = self.load(&name, compiled);
                    self.stats.build_time += started.elapsed();
                    loaded.unwrap_or_else(|err| {
                        warn!(
                            "no unwind tables for {name}: {err:#}; following frame pointers there"
                        );
                        Object::without_tables(name.clone())
                    })
                }
                Outcome::Failed(err) => {
                    // Remembered as an object without tables, so that every
                    // other process mapping it does not rebuild and fail
                    // again; frame pointers are followed in its code.
                    warn!("no unwind tables for {name}: {err:#}; following frame pointers there");
                    Object::without_tables(name.clone())
                }
                Outcome::Gone => {
                    debug!("{name} is gone before its unwind tables were built");
                    return;
                }
            };
            let own_rows = self.sharers.get(&object.id).is_none_or(|&n| n <= 1);
            if preloaded && object.id != 0 && own_rows {
                self.stats.preloaded += 1;
                self.stats.preloaded_bytes += preload::row_bytes(u64::from(object.len)) as usize;
            }
            // New processes of this file find the rows at once.
            let mtime_ns = object.identity.map(|(mtime_ns, _)| mtime_ns);
            self.files
                .publish(&key, object.id, &object.segments, mtime_ns);
            self.objects.insert(key, object);
            // A job for it queued meanwhile (a preloaded object) is done.
            if self.queue.jobs().waiting.remove(&key).is_some() {
                self.requested.remove(&key);
            }
        }
        for (pid, m) in waiting {
            match self.install(pid, &m) {
                Ok(()) => {
                    self.processes.entry(pid).or_default().insert(m);
                    *self.generations.entry(pid).or_default() += 1;
                }
                Err(err) => self.install_failed(pid, &name, &err),
            }
        }
        if let Some(object) = self.objects.get_mut(&key)
            && object.users == 0
        {
            object.idle_since = Some(Instant::now());
        }
    }

    fn install_failed(&self, pid: u32, name: &str, err: &anyhow::Error) {
        if process::state(pid).is_none() {
            debug!("{err:#}");
        } else {
            warn!("pid {pid}: no unwind tables for {name}: {err:#}");
        }
    }

    /// Puts an object's rows in the row shards and its pages in the index.
    fn load(&mut self, name: &str, compiled: background::Compiled) -> anyhow::Result<Object> {
        let background::Compiled {
            segments,
            identity,
            build_id,
            rows: compiled,
        } = compiled;
        if let Some(shared) = build_id.as_ref().and_then(|b| self.shared_rows(b)) {
            // The same code in another file (a copy, another mount, a
            // container's layer): the rows are already loaded.
            debug!("unwind tables for {name} shared by build id");
            return Ok(Object {
                segments,
                identity,
                build_id,
                name: name.to_owned(),
                ..shared
            });
        }
        let mut object = Object {
            segments,
            identity,
            build_id,
            ..Object::without_tables(name.to_owned())
        };
        if compiled.rows.is_empty() {
            debug!("{name} has no CFI: frame pointers are followed there");
            return Ok(object);
        }
        let len = compiled.rows.len() as u32;
        let placed = loop {
            match self.rows.place(&compiled.pages, &compiled.rows) {
                Ok(placed) => break placed,
                // Under the cap, idle objects make room first.
                Err(_) if self.evict_idle() => {}
                Err(err) => {
                    if err.is::<rows::CapReached>() {
                        self.stats.over_cap += 1;
                    }
                    return Err(err).with_context(|| format!("loading the unwind rows of {name}"));
                }
            }
        };
        object.id = self.next_id;
        self.next_id += 1;
        object.ranges = placed.ranges;
        object.len = len;
        for (&(page, _, count), &first) in compiled.pages.iter().zip(&placed.page_firsts) {
            let key = PageKey {
                object: object.id,
                page,
            };
            let value = PageRows { first, count };
            if let Err(err) = self.pages.insert(key, value, 0) {
                self.free_object(object);
                return Err(err).context("unwind page index full");
            }
            object.pages.push(page);
        }
        if let Some(b) = &object.build_id {
            self.by_build_id.insert(b.clone(), object.id);
            self.sharers.insert(object.id, 1);
        }
        self.stats.objects += 1;
        self.stats.rows += len as usize;
        self.stats.pages += object.pages.len();
        self.stats.unsupported_rows += compiled.unsupported;
        self.stats.shard_bytes = self.rows.bytes();
        debug!(
            "unwind tables for {name}: {len} rows, {} pages, {} unsupported",
            object.pages.len(),
            compiled.unsupported
        );
        Ok(object)
    }
}

/// Processes a queued object keeps as ways to read it.
const MAX_SOURCES: usize = 8;
