//! `agent --metrics ADDR`: the agent's own counters over HTTP, in
//! Prometheus text format (0.0.4) at `/metrics`:
//! - per sink: profiles sent, failed, retried and dropped, bytes, queue
//!   depth ([`crate::sinks::Sinks::metrics_text`]);
//! - per collector: lost events and truncated stacks;
//! - the agent process: CPU seconds and resident memory (now and peak),
//!   under the names Prometheus' client libraries use.
//!
//! The caller provides what only it knows as a closure returning
//! [`Readings`]; it is called once per scrape, on the server's own thread.
use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::oneshot};

/// One collector's losses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectorCounters {
    /// `cpu`, `heap`, or `unwinder` (the user stack walker both share).
    pub collector: String,
    /// Samples, events or stacks the kernel side could not keep (a map or
    /// ring buffer full).
    pub lost_events: u64,
    /// Stacks cut short (depth limit, unwinding stopped) or not recorded.
    pub truncated_stacks: u64,
}

/// What a scrape shows besides the agent process's own figures.
#[derive(Clone, Debug, Default)]
pub struct Readings {
    /// The sinks' exposition, as [`crate::sinks::Sinks::metrics_text`] makes it.
    pub sinks_text: String,
    pub collectors: Vec<CollectorCounters>,
}

pub type ReadingsFn = Arc<dyn Fn() -> Readings + Send + Sync>;

/// The running endpoint; dropping it stops serving.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl MetricsServer {
    /// Binds `addr` (`HOST:PORT`, or `:PORT` for every interface) and serves
    /// on a thread of its own, so that a scrape is answered at once however
    /// busy the agent's loop is (building unwind tables takes seconds).
    pub fn start(addr: &str, readings: ReadingsFn) -> anyhow::Result<Self> {
        let bind = match addr.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => addr.to_owned(),
        };
        let listener = std::net::TcpListener::bind(&bind)
            .with_context(|| format!("--metrics {addr}: cannot listen"))?;
        listener
            .set_nonblocking(true)
            .context("--metrics: non-blocking socket")?;
        let local = listener.local_addr().context("--metrics: local address")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("--metrics: starting its runtime")?;
        let (stop, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return log::warn!("metrics: {e}"),
                    };
                    tokio::select! {
                        () = accept_loop(listener, readings) => {}
                        _ = stopped => {}
                    }
                });
            })
            .context("--metrics: starting its thread")?;
        Ok(Self {
            addr: local,
            stop: Some(stop),
        })
    }

    /// The address it listens on (the port chosen when given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, readings: ReadingsFn) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let readings = Arc::clone(&readings);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let readings = Arc::clone(&readings);
                async move { Ok::<_, Infallible>(answer(&req, &readings)) }
            });
            // A scraper that goes away mid-answer is no concern of the agent.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, readings: &ReadingsFn) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the metrics are at /metrics\n".to_owned(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_owned(),
        );
    }
    let body = exposition(&readings(), &ProcessStats::read_self());
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        body,
    )
}

/// The whole text of one scrape.
pub fn exposition(readings: &Readings, process: &ProcessStats) -> String {
    let mut out = readings.sinks_text.clone();
    type Value = fn(&CollectorCounters) -> u64;
    let collector_metrics: [(&str, &str, Value); 2] = [
        (
            "prof_bpf_collector_lost_events_total",
            "Samples, events or stacks lost in full kernel maps or buffers.",
            |c| c.lost_events,
        ),
        (
            "prof_bpf_collector_truncated_stacks_total",
            "Stacks cut short or not recorded.",
            |c| c.truncated_stacks,
        ),
    ];
    for (name, help, value) in collector_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for c in &readings.collectors {
            let _ = writeln!(out, "{name}{{collector=\"{}\"}} {}", c.collector, value(c));
        }
    }
    let process_metrics = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the agent, in seconds.",
            process.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the agent, in bytes.",
            process.rss_bytes as f64,
        ),
        (
            "prof_bpf_agent_resident_memory_peak_bytes",
            "gauge",
            "Highest resident memory of the agent so far, in bytes.",
            process.peak_rss_bytes as f64,
        ),
    ];
    for (name, kind, help, value) in process_metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}

/// The agent process's own figures, from `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl ProcessStats {
    /// Unreadable files give zeros (they do not exist outside Linux).
    pub fn read_self() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            cpu_seconds: cpu_ticks(&stat).unwrap_or(0) as f64 / ticks.max(1) as f64,
            rss_bytes: status_kib(&status, "VmRSS").unwrap_or(0) * 1024,
            peak_rss_bytes: status_kib(&status, "VmHWM").unwrap_or(0) * 1024,
        }
    }
}

/// utime + stime of a `/proc/PID/stat` line, in clock ticks. The command
/// name (field 2) may hold spaces and parentheses: fields are counted from
/// the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Name:   123 kB` line of `/proc/PID/status`.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
#[path = "metrics_http_tests.rs"]
mod tests;
