//! Symbolizing the agent's profiles and handing them to the sinks, on a
//! thread of its own: symbolizing a busy host takes seconds, and the
//! collectors must go on meanwhile. One symbol cache serves every profile,
//! so each object is parsed once, not once per process and interval; it
//! keeps at most [`MAPPED_BOUND`] bytes of object files mapped, dropping
//! the least recently used (which frees the objects of processes long
//! gone), and reads the kernel's symbols once.
use std::{
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

use crate::{
    profile::Collector,
    sinks::{ProfileKind, ProfileMessage, Sinks, Source},
    symbolize::{DEFAULT_MAPPED_BOUND, SymbolCache},
};

/// Bytes of object files the symbol cache keeps mapped. A host's largest
/// objects (libLLVM at 200 MB, librustc_driver at 150 MB on a Rust build
/// host) do not fit beside the others and are parsed again when they come
/// back; the cache's frames by address spare most of those parses, and a
/// larger bound would cost resident pages (the agent keeps within 250 MB).
const MAPPED_BOUND: u64 = DEFAULT_MAPPED_BOUND;

/// One profile to finish and send.
pub(crate) struct Job {
    pub kind: ProfileKind,
    pub collector: Collector,
    pub source: Arc<Source>,
    pub start: SystemTime,
    pub duration: Duration,
}

/// The symbolizing thread.
pub(crate) struct Emitter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Emitter {
    pub fn start(sinks: Arc<Sinks>) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("symbolize".to_owned())
            .spawn(move || serve(&queue, &sinks))
            .context("starting the symbolizing thread")?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs
            && jobs.send(job).is_err()
        {
            log::warn!("agent: the symbolizing thread is gone; profile dropped");
        }
    }

    /// Finishes every profile queued and stops the thread.
    pub async fn finish(mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn serve(queue: &mpsc::Receiver<Job>, sinks: &Sinks) {
    let cache = SymbolCache::with_mapped_bound(MAPPED_BOUND);
    for job in queue {
        let pid = job.source.pid;
        match job.collector.finish_with(&cache) {
            Ok(profile) => sinks.send(ProfileMessage {
                kind: job.kind,
                profile,
                source: job.source,
                start: job.start,
                duration: job.duration,
            }),
            Err(err) => log::warn!(
                "agent: {} profile of pid {pid} not built: {err:#}",
                job.kind.name()
            ),
        }
    }
}
