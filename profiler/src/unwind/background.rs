//! The builder thread: the expensive part of loading an object's tables
//! (reading the file, then its rows from the on-disk cache or compiled
//! from its CFI) runs here, off the session's loop, so that drains and
//! reads never wait for a build. The loop queues objects ([`Queue`]) and
//! places what comes back ([`Prepared`]) in the kernel's maps, which stay
//! its own.
//!
//! Jobs are taken urgent first (a target's tables, the end of a session),
//! then by priority (the samples of the processes that wait for them).
//! With a budget (whole-host `cpu`), jobs that are not urgent wait for it,
//! and the CPU time this thread spends compiling them is charged to it;
//! meanwhile, the objects the on-disk cache holds are loaded (a read, not
//! a compilation), so that a warm cache gives every process its tables at
//! once.
use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    ObjectKey,
    budget::Budget,
    build::{BuildStats, Builder, FileId},
    cfi::{self, ObjectRows},
    options::UnwindOptions,
    preload::{self, PreloadSummary},
    source::{self, ObjectBytes},
};
use crate::process::{self, Mapping};

/// One object to build.
pub(super) struct Job {
    /// Processes that map it, and how: the first that can still be read
    /// is used (then the path itself, if it is still the same file).
    pub sources: Vec<(u32, Mapping)>,
    /// Samples of the processes that wait for it (more first).
    pub priority: u64,
    /// Built before any other, whatever the budget.
    pub urgent: bool,
    /// The cache was looked up and does not hold it.
    pub probed: bool,
}

/// An object's rows and what placing them needs.
pub(super) struct Compiled {
    /// (file offset, file size, virtual address) of its load segments.
    pub segments: Vec<(u64, u64, u64)>,
    /// (modification time in ns, size) of the file read.
    pub identity: Option<(i64, u64)>,
    pub build_id: Option<Vec<u8>>,
    pub rows: ObjectRows,
}

/// What became of a job.
pub(super) enum Outcome {
    Built(Compiled),
    /// No process maps it any more and its path is another file now.
    Gone,
    Failed(anyhow::Error),
}

/// A finished job, for the loop.
pub(super) struct Prepared {
    pub key: ObjectKey,
    pub name: String,
    pub outcome: Outcome,
    /// The totals of the thread that ran it after this job, and which
    /// thread that is (0: the builder, 1: the cache reader).
    pub stats: BuildStats,
    pub thread: usize,
    /// CPU time this job took.
    pub cpu: Duration,
    /// Loaded ahead of need ([`super::preload`]), not asked for.
    pub preloaded: bool,
}

/// The jobs waiting, shared by the loop and the thread.
#[derive(Default)]
pub(super) struct Jobs {
    pub waiting: HashMap<ObjectKey, Job>,
    /// Charge jobs that are not urgent to this budget.
    pub budget: Option<Budget<Instant>>,
    /// Jobs that are not urgent wait until the loop knows which processes
    /// are busy (its first priorities).
    pub hold: bool,
    /// Load the cache's entries ahead of need, up to this many bytes of
    /// rows (taken by the cache reader before anything else).
    pub preload: Option<u64>,
    /// What the preload did, once it is over: every object it loaded was
    /// sent before.
    pub preloaded: Option<PreloadSummary>,
    stop: bool,
}

/// The loop's handle on the builder thread.
pub(super) struct Queue {
    shared: Arc<(Mutex<Jobs>, Condvar)>,
    pub results: mpsc::Receiver<Prepared>,
    threads: Vec<JoinHandle<()>>,
}

impl Queue {
    /// Starts the threads, with the cache the options name: the builder,
    /// and a cache reader, so that objects the cache holds are not queued
    /// behind a compilation of seconds.
    pub fn start(options: &UnwindOptions) -> anyhow::Result<Self> {
        let shared = Arc::new((Mutex::new(Jobs::default()), Condvar::new()));
        let (sender, results) = mpsc::channel();
        let mut threads = Vec::new();
        for (thread, name) in [(0, "unwind-tables"), (1, "unwind-cache")] {
            let theirs = Arc::clone(&shared);
            let sender = sender.clone();
            let options = options.clone();
            let cache_only = thread == 1;
            if cache_only && options.cache_dir.is_none() {
                continue;
            }
            threads.push(
                std::thread::Builder::new()
                    .name(name.to_owned())
                    .spawn(move || {
                        run(&theirs, &sender, Builder::new(&options), thread, cache_only);
                    })
                    .context("starting the unwind table builder thread")?,
            );
        }
        Ok(Self {
            shared,
            results,
            threads,
        })
    }

    /// The jobs, to add or reorder some; the thread is woken when the
    /// guard goes.
    pub fn jobs(&self) -> JobsGuard<'_> {
        JobsGuard {
            jobs: self.shared.0.lock().unwrap_or_else(|e| e.into_inner()),
            wake: &self.shared.1,
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Not joined: a build in progress (seconds for a large object)
        // must not hold the end of a session; its result goes nowhere.
        self.jobs().stop = true;
        self.threads.clear();
    }
}

/// The locked jobs; wakes the thread when dropped.
pub(super) struct JobsGuard<'a> {
    jobs: MutexGuard<'a, Jobs>,
    wake: &'a Condvar,
}

impl std::ops::Deref for JobsGuard<'_> {
    type Target = Jobs;

    fn deref(&self) -> &Jobs {
        &self.jobs
    }
}

impl std::ops::DerefMut for JobsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Jobs {
        &mut self.jobs
    }
}

impl Drop for JobsGuard<'_> {
    fn drop(&mut self) {
        self.wake.notify_all();
    }
}

/// What the thread does next.
enum Step {
    /// Builds the job (from the cache or compiled).
    Build(ObjectKey, Job),
    /// Only looks the object up in the cache: that costs no budget.
    Probe(ObjectKey, Vec<(u32, Mapping)>),
    /// Nothing may run before this long (`None`: before new jobs).
    Wait(Option<Duration>),
}

/// The next step: urgent jobs first, then by priority, then the object
/// most processes map. When the budget (or the first priorities) keeps the
/// best one waiting, objects not looked up in the cache yet are.
fn choose(jobs: &mut Jobs, cache_only: bool) -> Step {
    if cache_only {
        return match jobs
            .waiting
            .iter()
            .filter(|(_, j)| !j.probed && !j.urgent)
            .max_by_key(|(_, j)| (j.priority, j.sources.len()))
        {
            Some((key, job)) => Step::Probe(*key, job.sources.clone()),
            None => Step::Wait(None),
        };
    }
    let best = jobs
        .waiting
        .iter()
        .max_by_key(|(_, j)| (j.urgent, j.priority, j.sources.len()))
        .map(|(k, j)| (*k, j.urgent));
    let Some((key, urgent)) = best else {
        return Step::Wait(None);
    };
    let hold = jobs.hold;
    let wait = match &mut jobs.budget {
        _ if urgent => None,
        _ if hold => Some(Duration::from_secs(1)),
        Some(budget) => (!budget.available(Instant::now())).then(|| budget.until_available()),
        None => None,
    };
    let Some(wait) = wait else {
        return Step::Build(key, jobs.waiting.remove(&key).expect("found above"));
    };
    match jobs
        .waiting
        .iter()
        .filter(|(_, j)| !j.probed)
        .max_by_key(|(_, j)| (j.priority, j.sources.len()))
    {
        Some((key, job)) => Step::Probe(*key, job.sources.clone()),
        // New urgent jobs and priorities wake the thread before that.
        None => Step::Wait(Some(wait.min(Duration::from_secs(1)))),
    }
}

/// A thread: runs jobs until told to stop (with `cache_only`, only looks
/// objects up in the cache).
fn run(
    shared: &(Mutex<Jobs>, Condvar),
    results: &mpsc::Sender<Prepared>,
    mut builder: Builder,
    thread: usize,
    cache_only: bool,
) {
    let (lock, wake) = shared;
    let lock_jobs = || lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut jobs = lock_jobs();
        if jobs.stop {
            return;
        }
        if cache_only && let Some(budget) = jobs.preload.take() {
            drop(jobs);
            let summary = preload::preload(&mut builder, budget, thread, &mut |p| {
                results.send(p).is_ok()
            });
            lock_jobs().preloaded = Some(summary);
            continue;
        }
        let (key, sources, urgent, cache_only) = match choose(&mut jobs, cache_only) {
            Step::Build(key, job) => (key, job.sources, job.urgent, false),
            Step::Probe(key, sources) => (key, sources, false, true),
            Step::Wait(wait) => {
                match wait {
                    Some(wait) => drop(wake.wait_timeout(jobs, wait)),
                    None => drop(wake.wait(jobs)),
                }
                continue;
            }
        };
        drop(jobs);
        let cpu_before = thread_cpu_time();
        let compiled_before = builder.stats().built;
        let outcome = build(&mut builder, &sources, cache_only);
        let cpu = thread_cpu_time().saturating_sub(cpu_before);
        let mut jobs = lock_jobs();
        if cache_only {
            match outcome {
                Some(_) => {
                    jobs.waiting.remove(&key);
                }
                None => {
                    if let Some(job) = jobs.waiting.get_mut(&key) {
                        job.probed = true;
                    }
                    continue;
                }
            }
        }
        // Only compiling is charged: the cache is what keeps whole-host
        // sessions cheap, and a hit costs a read.
        if !urgent
            && builder.stats().built > compiled_before
            && let Some(budget) = &mut jobs.budget
        {
            budget.spend(cpu);
        }
        drop(jobs);
        let prepared = Prepared {
            key,
            name: sources
                .first()
                .map(|(_, m)| m.path.clone())
                .unwrap_or_default(),
            outcome: outcome.unwrap_or(Outcome::Gone),
            stats: builder.stats(),
            thread,
            cpu,
            preloaded: false,
        };
        if results.send(prepared).is_err() {
            return;
        }
    }
}

/// Reads the object from the first source that still has it, then its
/// rows; with `cache_only`, `None` when the cache does not hold them.
fn build(builder: &mut Builder, sources: &[(u32, Mapping)], cache_only: bool) -> Option<Outcome> {
    let Some((data, identity, mapping)) = read(sources) else {
        return (!cache_only).then_some(Outcome::Gone);
    };
    let compiled = (|| {
        let segments = cfi::load_segments(&data)?;
        let build_id = cfi::build_id(&data).filter(|b| !b.is_empty());
        let file = identity.map(|(mtime_ns, size)| FileId {
            dev: mapping.dev,
            inode: mapping.inode,
            mtime_ns,
            size,
        });
        let rows = if cache_only {
            match builder.cached(build_id.clone(), file) {
                Some(rows) => rows,
                None => return Ok(None),
            }
        } else {
            builder
                .rows(&data, build_id.clone(), file, &mapping.path)
                .with_context(|| format!("reading the CFI of {}", mapping.path))?
        };
        anyhow::Ok(Some(Compiled {
            segments,
            identity,
            build_id,
            rows,
        }))
    })();
    match compiled {
        Ok(Some(c)) => Some(Outcome::Built(c)),
        Ok(None) => None,
        Err(_) if cache_only => None,
        Err(err) => Some(Outcome::Failed(err)),
    }
}

/// The bytes and identity of the object: through a process that maps it,
/// else by its path if that is still the same file (a process that exited
/// before its tables were built still has copies to unwind).
fn read(sources: &[(u32, Mapping)]) -> Option<(ObjectBytes, Option<Identity>, &Mapping)> {
    for (pid, mapping) in sources {
        if let Ok(data) = source::read_object(*pid, mapping) {
            return Some((data, source::file_identity(*pid, mapping), mapping));
        }
    }
    let (_, mapping) = sources.first()?;
    let (data, identity) = source::read_same_file(mapping)?;
    Some((data, Some(identity), mapping))
}

/// A file's (modification time in ns, size).
type Identity = (i64, u64);

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether `pid` still runs (not a zombie).
pub(super) fn alive(pid: u32) -> bool {
    process::state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(inode: u64) -> ObjectKey {
        ObjectKey { dev: (8, 1), inode }
    }

    fn job(priority: u64, urgent: bool, probed: bool) -> Job {
        Job {
            sources: Vec::new(),
            priority,
            urgent,
            probed,
        }
    }

    fn jobs(list: Vec<(u64, Job)>) -> Jobs {
        Jobs {
            waiting: list.into_iter().map(|(i, j)| (key(i), j)).collect(),
            ..Jobs::default()
        }
    }

    #[test]
    fn urgent_first_then_busiest() {
        let mut j = jobs(vec![(1, job(50, false, false)), (2, job(1, true, false))]);
        assert!(matches!(choose(&mut j, false), Step::Build(k, _) if k == key(2)));
        assert!(matches!(choose(&mut j, false), Step::Build(k, _) if k == key(1)));
        assert!(matches!(choose(&mut j, false), Step::Wait(None)));
    }

    #[test]
    fn without_budget_only_the_cache_is_looked_at() {
        let mut j = jobs(vec![(1, job(50, false, true)), (2, job(3, false, false))]);
        j.budget = Some(Budget::new(Instant::now()));
        j.budget.as_mut().unwrap().spend(Duration::from_secs(10));
        // The busiest waits for the budget; the other is looked up.
        assert!(matches!(choose(&mut j, false), Step::Probe(k, _) if k == key(2)));
        j.waiting.get_mut(&key(2)).unwrap().probed = true;
        assert!(matches!(choose(&mut j, false), Step::Wait(Some(_))));
        // An urgent job does not wait.
        j.waiting.get_mut(&key(1)).unwrap().urgent = true;
        assert!(matches!(choose(&mut j, false), Step::Build(k, _) if k == key(1)));
    }

    #[test]
    fn held_until_ranked_and_the_cache_reader_never_builds() {
        let mut j = jobs(vec![(1, job(0, false, false))]);
        j.hold = true;
        assert!(matches!(choose(&mut j, false), Step::Probe(k, _) if k == key(1)));
        assert!(matches!(choose(&mut j, true), Step::Probe(k, _) if k == key(1)));
        j.waiting.get_mut(&key(1)).unwrap().probed = true;
        assert!(matches!(choose(&mut j, true), Step::Wait(None)));
        j.hold = false;
        assert!(matches!(choose(&mut j, false), Step::Build(k, _) if k == key(1)));
    }
}
