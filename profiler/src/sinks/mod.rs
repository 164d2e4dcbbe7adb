//! Sinks: where finished profiles go. One [`ProfileMessage`] per (interval,
//! process, kind) is handed to [`Sinks::send`], which never blocks and never
//! waits on the network; each sink ships it on its own:
//! - **Pyroscope** ([`pyroscope`]): Connect unary `push.v1.PusherService/Push`;
//! - **OTLP** ([`otlp`]): `ExportProfilesServiceRequest` over HTTP or gRPC;
//! - **Parca** ([`parca`]): gRPC `ProfileStoreService/WriteRaw`;
//! - **a directory** ([`directory`]): one pprof file each, under a size cap.
//!
//! Failure handling is the same for every sink ([`worker`]): a queue bounded
//! in bytes (full: the oldest profile is dropped and counted), retries with
//! exponential backoff and jitter for answers that may succeed later (429,
//! 5xx, connection errors, timeouts, the matching gRPC codes), no retry for
//! the others (logged once per cause), timeouts on connect and per request.
//! A profile keeps the timestamps of its interval however late it is sent.
//! Counters per sink come out in Prometheus text format ([`Sinks::metrics_text`]).
//!
//! Example (inside a tokio runtime):
//! ```no_run
//! # async fn f(profile: profiler::profile::Profile) -> anyhow::Result<()> {
//! use profiler::sinks::*;
//! let sinks = Sinks::start(
//!     vec![SinkTarget::Pyroscope(PyroscopeTarget::new("http://pyroscope:4040"))],
//!     &Delivery::default(),
//! )?;
//! let source = std::sync::Arc::new(Source::new("checkout", 1234));
//! sinks.send(ProfileMessage {
//!     kind: ProfileKind::Cpu,
//!     profile,
//!     source,
//!     start: std::time::SystemTime::now(),
//!     duration: std::time::Duration::from_secs(15),
//! });
//! sinks.flush(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
mod backoff;
pub mod directory;
mod grpc;
mod metrics;
pub mod otlp;
mod otlp_map;
pub mod parca;
pub mod pyroscope;
mod queue;
mod transport;
mod worker;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;

pub use self::{
    directory::DirectoryTarget,
    metrics::SinkCounters,
    otlp::{OtlpProtocol, OtlpTarget},
    parca::ParcaTarget,
    pyroscope::PyroscopeTarget,
};
use crate::profile::{Label, LabelValue, Profile};

/// What a profile measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProfileKind {
    Cpu,
    Heap,
}

impl ProfileKind {
    /// Short name, used in file names and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Heap => "heap",
        }
    }

    /// The `__name__` series label, as Grafana's agents send it.
    pub fn series_name(self) -> &'static str {
        match self {
            Self::Cpu => "process_cpu",
            Self::Heap => "memory",
        }
    }
}

/// The process a profile is of, and the labels that come with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub service_name: String,
    pub hostname: String,
    pub pid: u32,
    /// Path of the process's executable (empty when unknown).
    pub executable: String,
    pub container_id: Option<String>,
    /// `--label key=value` pairs, keys checked by [`parse_label`].
    pub labels: Vec<(String, String)>,
}

impl Source {
    /// A source with this machine's host name and nothing else known.
    pub fn new(service_name: impl Into<String>, pid: u32) -> Self {
        Self {
            service_name: service_name.into(),
            hostname: hostname(),
            pid,
            ..Self::default()
        }
    }

    /// The series labels shared by Pyroscope and Parca: `__name__`, the
    /// service, host, executable, container and user labels. The pid is not
    /// one of them (one series per process would be unbounded); it travels
    /// as a numeric pprof label.
    pub(crate) fn series_labels(&self, kind: ProfileKind) -> Vec<(String, String)> {
        let mut labels = vec![
            ("__name__".to_owned(), kind.series_name().to_owned()),
            ("service_name".to_owned(), self.service_name.clone()),
        ];
        let mut add = |k: &str, v: &str| {
            if !v.is_empty() {
                labels.push((k.to_owned(), v.to_owned()));
            }
        };
        add("hostname", &self.hostname);
        add("executable", &self.executable);
        add("container_id", self.container_id.as_deref().unwrap_or(""));
        for (k, v) in &self.labels {
            if !labels.iter().any(|(have, _)| have == k) {
                labels.push((k.clone(), v.clone()));
            }
        }
        labels
    }
}

/// This machine's host name (empty when it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Parses a `--label key=value` argument. Keys follow Prometheus' label-name
/// rule (both Pyroscope and Parca enforce it) and must not start with `__`.
pub fn parse_label(arg: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = arg
        .split_once('=')
        .with_context(|| format!("label `{arg}` is not of the form key=value"))?;
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || key.starts_with("__") {
        bail!("label key `{key}` must match [a-zA-Z_][a-zA-Z0-9_]* and not start with `__`");
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// One profile of one process over one interval.
#[derive(Clone, Debug)]
pub struct ProfileMessage {
    pub kind: ProfileKind,
    pub profile: Profile,
    pub source: Arc<Source>,
    /// Start of the interval (wall clock) and its length; they become the
    /// profile's own timestamps, so a late delivery is not misdated.
    pub start: SystemTime,
    pub duration: Duration,
}

/// A message in the form every sink ships: the profile with the interval's
/// timestamps, a numeric `pid` label on every sample and no string sample
/// labels (one profile is one process: its command name adds nothing, and
/// backends index string labels as series), and its gzip'd pprof encoding.
pub(crate) struct Prepared {
    pub kind: ProfileKind,
    pub source: Arc<Source>,
    pub start: SystemTime,
    pub profile: Profile,
    pub pprof: Bytes,
}

impl Prepared {
    pub(crate) fn new(message: ProfileMessage) -> anyhow::Result<Self> {
        let ProfileMessage {
            kind,
            mut profile,
            source,
            start,
            duration,
        } = message;
        profile.time_nanos = unix_nanos(start);
        profile.duration_nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        for sample in &mut profile.samples {
            sample
                .labels
                .retain(|l| matches!(l.value, LabelValue::Num(..)) && l.key != "pid");
            sample
                .labels
                .insert(0, Label::num("pid", i64::from(source.pid), ""));
        }
        let pprof = crate::output::pprof::encode(&profile)
            .context("encoding the profile as pprof")?
            .into();
        Ok(Self {
            kind,
            source,
            start,
            profile,
            pprof,
        })
    }
}

/// Nanoseconds since the Unix epoch (0 before it).
pub(crate) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Where profiles go.
#[derive(Clone, Debug)]
pub enum SinkTarget {
    Pyroscope(PyroscopeTarget),
    Otlp(OtlpTarget),
    Parca(ParcaTarget),
    Directory(DirectoryTarget),
}

/// How hard every sink tries: queue bound, retry schedule, timeouts, TLS.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Bytes of encoded profiles waiting per sink, beyond the one in flight.
    pub queue_bytes: usize,
    /// Retry delays double from `backoff_min` up to `backoff_max` (jittered).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// For one whole request: TLS handshake, upload and answer.
    pub request_timeout: Duration,
    /// PEM CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            queue_bytes: 64 << 20,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

/// The running sinks: one queue and one delivery task each.
pub struct Sinks {
    workers: Vec<worker::Handle>,
}

impl Sinks {
    /// Checks the targets and starts one delivery task per target on the
    /// current tokio runtime. Nothing is contacted yet: a backend that is down
    /// at start is only retried.
    pub fn start(targets: Vec<SinkTarget>, delivery: &Delivery) -> anyhow::Result<Self> {
        let mut transport: Option<Arc<transport::Transport>> = None;
        let mut shared_transport = || -> anyhow::Result<Arc<transport::Transport>> {
            if let Some(t) = &transport {
                return Ok(Arc::clone(t));
            }
            let t = Arc::new(transport::Transport::new(delivery)?);
            transport = Some(Arc::clone(&t));
            Ok(t)
        };
        let destinations = targets
            .into_iter()
            .map(|target| worker::Destination::new(target, &mut shared_transport))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let workers = destinations
            .into_iter()
            .map(|destination| worker::spawn(destination, delivery))
            .collect();
        Ok(Self { workers })
    }

    /// Queues `message` on every sink and returns at once. A profile that
    /// cannot be encoded is logged and dropped.
    pub fn send(&self, message: ProfileMessage) {
        let pid = message.source.pid;
        let kind = message.kind;
        let prepared = match Prepared::new(message) {
            Ok(p) => p,
            Err(e) => {
                log::warn!(
                    "sinks: {} profile of pid {pid} not sent: {e:#}",
                    kind.name()
                );
                return;
            }
        };
        for worker in &self.workers {
            worker.enqueue(&prepared);
        }
    }

    /// Waits until every queue is empty and nothing is in flight, at most
    /// `timeout`; returns whether everything was delivered or given up.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for worker in &self.workers {
            if !worker.idle_by(deadline).await {
                return false;
            }
        }
        true
    }

    /// Each sink's name and counters.
    pub fn counters(&self) -> Vec<(String, SinkCounters)> {
        self.workers
            .iter()
            .map(|w| (w.name().to_owned(), w.counters()))
            .collect()
    }

    /// Every sink's counters in Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        metrics::prometheus_text(&self.counters())
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.stop();
        }
    }
}

#[cfg(test)]
mod tests;
