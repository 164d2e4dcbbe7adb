//! Per-sink counters and their Prometheus text exposition.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

/// Live counters of one sink, updated by its delivery task.
#[derive(Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
    queued: AtomicU64,
    queued_bytes: AtomicU64,
}

/// A snapshot of one sink's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkCounters {
    /// Profiles delivered (the backend accepted them).
    pub sent: u64,
    /// Profiles given up: the backend refused them for good (a 4xx other than
    /// 429, a non-retryable gRPC status).
    pub failed: u64,
    /// Delivery attempts that will be tried again (timeouts, resets, 429, 5xx).
    pub retried: u64,
    /// Profiles dropped because the queue was full.
    pub dropped: u64,
    /// Bytes of the delivered profiles' request bodies.
    pub bytes: u64,
    /// Profiles waiting in the queue, and their size.
    pub queued: u64,
    pub queued_bytes: u64,
}

impl Counters {
    pub(crate) fn sent(&self, bytes: usize) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dropped(&self, items: u64) {
        self.dropped.fetch_add(items, Ordering::Relaxed);
    }
    pub(crate) fn set_queue(&self, items: usize, bytes: usize) {
        self.queued.store(items as u64, Ordering::Relaxed);
        self.queued_bytes.store(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn snapshot(&self) -> SinkCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkCounters {
            sent: get(&self.sent),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dropped: get(&self.dropped),
            bytes: get(&self.bytes),
            queued: get(&self.queued),
            queued_bytes: get(&self.queued_bytes),
        }
    }
}

/// One exposed metric.
struct Metric {
    name: &'static str,
    /// `counter` or `gauge`.
    kind: &'static str,
    help: &'static str,
    value: fn(&SinkCounters) -> u64,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "prof_bpf_sink_sent_total",
        kind: "counter",
        help: "Profiles delivered.",
        value: |c| c.sent,
    },
    Metric {
        name: "prof_bpf_sink_failed_total",
        kind: "counter",
        help: "Profiles refused for good by the backend.",
        value: |c| c.failed,
    },
    Metric {
        name: "prof_bpf_sink_retries_total",
        kind: "counter",
        help: "Delivery attempts to be retried.",
        value: |c| c.retried,
    },
    Metric {
        name: "prof_bpf_sink_dropped_total",
        kind: "counter",
        help: "Profiles dropped because the queue was full.",
        value: |c| c.dropped,
    },
    Metric {
        name: "prof_bpf_sink_sent_bytes_total",
        kind: "counter",
        help: "Bytes of delivered request bodies.",
        value: |c| c.bytes,
    },
    Metric {
        name: "prof_bpf_sink_queue_profiles",
        kind: "gauge",
        help: "Profiles waiting in the queue.",
        value: |c| c.queued,
    },
    Metric {
        name: "prof_bpf_sink_queue_bytes",
        kind: "gauge",
        help: "Bytes waiting in the queue.",
        value: |c| c.queued_bytes,
    },
];

/// Prometheus text format (version 0.0.4), one series per sink labelled
/// `sink="NAME"`.
pub(crate) fn prometheus_text(sinks: &[(String, SinkCounters)]) -> String {
    let mut out = String::new();
    for m in METRICS {
        let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
        for (sink, counters) in sinks {
            let value = (m.value)(counters);
            let _ = writeln!(out, "{}{{sink=\"{}\"}} {value}", m.name, escape(sink));
        }
    }
    out
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_one_series_per_sink_and_metric() {
        let counters = Counters::default();
        counters.sent(100);
        counters.sent(23);
        counters.retried();
        counters.dropped(4);
        counters.failed();
        counters.set_queue(2, 4096);
        let sinks = [
            ("pyroscope http://p:4040".to_owned(), counters.snapshot()),
            ("dir \"a\\b\"".to_owned(), SinkCounters::default()),
        ];
        let text = prometheus_text(&sinks);
        let expect = [
            "# HELP prof_bpf_sink_sent_total Profiles delivered.",
            "# TYPE prof_bpf_sink_sent_total counter",
            "prof_bpf_sink_sent_total{sink=\"pyroscope http://p:4040\"} 2",
            "prof_bpf_sink_sent_total{sink=\"dir \\\"a\\\\b\\\"\"} 0",
            "prof_bpf_sink_failed_total{sink=\"pyroscope http://p:4040\"} 1",
            "prof_bpf_sink_retries_total{sink=\"pyroscope http://p:4040\"} 1",
            "prof_bpf_sink_dropped_total{sink=\"pyroscope http://p:4040\"} 4",
            "prof_bpf_sink_sent_bytes_total{sink=\"pyroscope http://p:4040\"} 123",
            "# TYPE prof_bpf_sink_queue_profiles gauge",
            "prof_bpf_sink_queue_profiles{sink=\"pyroscope http://p:4040\"} 2",
            "prof_bpf_sink_queue_bytes{sink=\"pyroscope http://p:4040\"} 4096",
        ];
        for line in expect {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        // 7 metrics × (HELP + TYPE + 2 sinks).
        assert_eq!(text.lines().count(), 7 * 4);
        assert!(text.ends_with('\n'));
    }
}
