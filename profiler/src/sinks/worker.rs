//! One delivery task per sink: it takes the oldest queued profile and tries
//! it until it is delivered or refused, sleeping between attempts by the
//! backoff schedule (or the server's Retry-After, capped by the same
//! maximum). The queue holds encoded request bodies and is bounded in bytes;
//! at most one more body is in flight, so a sink's memory is bounded by the
//! queue size plus one profile whatever the backend does.
//!
//! Logging: a refusal is logged once per distinct cause; a failure streak is
//! logged when it starts and when delivery recovers, its retries only at
//! debug level.
use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{
    Delivery, Prepared, SinkTarget, backoff,
    directory::Directory,
    metrics::{Counters, SinkCounters},
    otlp::Otlp,
    parca::Parca,
    pyroscope::Pyroscope,
    queue::ByteQueue,
    transport::{Outcome, Transport},
};

/// A sink's protocol and what it needs to deliver.
pub(crate) enum Destination {
    Pyroscope(Pyroscope, Arc<Transport>),
    Otlp(Otlp, Arc<Transport>),
    Parca(Parca, Arc<Transport>),
    Directory(Directory),
}

/// An encoded profile waiting for delivery.
struct Item {
    body: Bytes,
    /// The file name (directory sink), else empty.
    file_name: String,
    /// What it is, for logs: `cpu profile of pid 12`.
    what: String,
}

impl Destination {
    /// The destination of `target`; `transport` gives the shared network
    /// client (made on first use, so a directory alone needs none).
    pub(crate) fn new(
        target: SinkTarget,
        mut transport: impl FnMut() -> anyhow::Result<Arc<Transport>>,
    ) -> anyhow::Result<Self> {
        Ok(match target {
            SinkTarget::Pyroscope(t) => Self::Pyroscope(Pyroscope::new(&t)?, transport()?),
            SinkTarget::Otlp(t) => Self::Otlp(Otlp::new(&t)?, transport()?),
            SinkTarget::Parca(t) => Self::Parca(Parca::new(&t)?, transport()?),
            SinkTarget::Directory(t) => Self::Directory(Directory::new(&t)?),
        })
    }

    fn name(&self) -> String {
        match self {
            Self::Pyroscope(p, _) => p.name(),
            Self::Otlp(o, _) => o.name(),
            Self::Parca(p, _) => p.name(),
            Self::Directory(d) => d.name(),
        }
    }

    fn encode(&self, message: &Prepared) -> Item {
        let (body, file_name) = match self {
            Self::Pyroscope(..) => (Pyroscope::encode(message), String::new()),
            Self::Otlp(..) => (Otlp::encode(message), String::new()),
            Self::Parca(..) => (Parca::encode(message), String::new()),
            Self::Directory(_) => (message.pprof.clone(), Directory::file_name(message)),
        };
        Item {
            body,
            file_name,
            what: format!(
                "{} profile of pid {}",
                message.kind.name(),
                message.source.pid
            ),
        }
    }

    async fn deliver(&self, item: &Item) -> Outcome {
        let body = item.body.clone();
        match self {
            Self::Pyroscope(p, t) => p.deliver(t, body).await,
            Self::Otlp(o, t) => o.deliver(t, body).await,
            Self::Parca(p, t) => p.deliver(t, body).await,
            Self::Directory(d) => d.deliver(&item.file_name, body).await,
        }
    }
}

/// What the caller and the delivery task share.
struct Shared {
    queue: Mutex<ByteQueue<Item>>,
    wake: Notify,
    in_flight: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn pop(&self) -> Option<Item> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let item = queue.pop();
        // Set under the lock, so that an observer never sees an empty queue
        // and nothing in flight while an item is being taken.
        self.in_flight.store(item.is_some(), Ordering::SeqCst);
        self.counters.set_queue(queue.len(), queue.bytes());
        item
    }

    fn idle(&self) -> bool {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.len() == 0 && !self.in_flight.load(Ordering::SeqCst)
    }
}

/// The caller's side of a running sink.
pub(crate) struct Handle {
    name: String,
    destination: Arc<Destination>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// Retry schedule and limits of one delivery task.
#[derive(Clone, Copy)]
struct Schedule {
    backoff_min: Duration,
    backoff_max: Duration,
}

/// Starts the delivery task of `destination` on the current runtime.
pub(crate) fn spawn(destination: Destination, delivery: &Delivery) -> Handle {
    let shared = Arc::new(Shared {
        queue: Mutex::new(ByteQueue::new(delivery.queue_bytes)),
        wake: Notify::new(),
        in_flight: AtomicBool::new(false),
        counters: Counters::default(),
    });
    let destination = Arc::new(destination);
    let name = destination.name();
    let schedule = Schedule {
        backoff_min: delivery.backoff_min,
        backoff_max: delivery.backoff_max,
    };
    let task = tokio::spawn(run(
        name.clone(),
        Arc::clone(&destination),
        Arc::clone(&shared),
        schedule,
    ));
    Handle {
        name,
        destination,
        shared,
        task,
    }
}

impl Handle {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn counters(&self) -> SinkCounters {
        self.shared.counters.snapshot()
    }

    /// Encodes `message` for this sink and queues it (never waits).
    pub(crate) fn enqueue(&self, message: &Prepared) {
        let item = self.destination.encode(message);
        let size = item.body.len();
        let what = item.what.clone();
        let dropped = {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let dropped = queue.push(item, size);
            self.shared.counters.set_queue(queue.len(), queue.bytes());
            dropped
        };
        if dropped.items > 0 {
            self.shared.counters.dropped(dropped.items);
            log::debug!(
                "sinks: {}: queue full at {what}: dropped {} profiles ({} bytes)",
                self.name,
                dropped.items,
                dropped.bytes
            );
        }
        self.shared.wake.notify_one();
    }

    /// Whether the queue is empty and nothing in flight, waiting for it at
    /// most until `deadline`.
    pub(crate) async fn idle_by(&self, deadline: Instant) -> bool {
        loop {
            if self.shared.idle() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

/// The delivery task.
async fn run(name: String, destination: Arc<Destination>, shared: Arc<Shared>, schedule: Schedule) {
    let mut refusals_logged = HashSet::new();
    let mut failing = false;
    loop {
        let Some(item) = shared.pop() else {
            shared.wake.notified().await;
            continue;
        };
        let mut attempt = 0u32;
        loop {
            match destination.deliver(&item).await {
                Outcome::Delivered => {
                    shared.counters.sent(item.body.len());
                    if failing {
                        log::info!("sinks: {name}: delivering again");
                        failing = false;
                    }
                    break;
                }
                Outcome::Refused { cause } => {
                    shared.counters.failed();
                    // Bounded: a backend with endless distinct messages
                    // cannot grow the set.
                    if refusals_logged.len() < 256 && refusals_logged.insert(cause.clone()) {
                        log::warn!("sinks: {name}: {} refused, not retried: {cause}", item.what);
                    }
                    break;
                }
                Outcome::Retry { cause, after } => {
                    shared.counters.retried();
                    let delay = after.map_or_else(
                        || backoff::next(attempt, schedule.backoff_min, schedule.backoff_max),
                        |after| after.min(schedule.backoff_max),
                    );
                    if failing {
                        log::debug!("sinks: {name}: {cause}; retrying in {delay:?}");
                    } else {
                        log::warn!(
                            "sinks: {name}: {cause}; retrying (backoff up to {:?})",
                            schedule.backoff_max
                        );
                        failing = true;
                    }
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
        shared.in_flight.store(false, Ordering::SeqCst);
    }
}
