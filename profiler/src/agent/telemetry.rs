//! The agent's own counters in Prometheus text format: the sinks' (sent,
//! failed, retried, dropped, bytes, queue), the collectors' losses, and the
//! agent's CPU time and resident memory. Shared with whatever serves them;
//! the loop refreshes the collectors' part every second.
use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
};

use crate::sinks::Sinks;

/// What the agent reports about itself.
pub struct Telemetry {
    sinks: Mutex<Arc<Sinks>>,
    collectors: Mutex<Vec<(&'static str, &'static str, u64)>>,
}

impl Telemetry {
    pub(crate) fn new(sinks: Arc<Sinks>) -> Self {
        Self {
            sinks: Mutex::new(sinks),
            collectors: Mutex::new(Vec::new()),
        }
    }

    /// The sinks now (they change when SIGHUP brings new ones).
    pub(crate) fn set_sinks(&self, sinks: Arc<Sinks>) {
        *self.sinks.lock().unwrap_or_else(PoisonError::into_inner) = sinks;
    }

    /// The collectors' counters as (collector, counter, value).
    pub(crate) fn set_collectors(&self, counters: Vec<(&'static str, &'static str, u64)>) {
        *self
            .collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counters;
    }

    /// Every counter, in Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        let sinks = Arc::clone(&self.sinks.lock().unwrap_or_else(PoisonError::into_inner));
        let mut text = sinks.metrics_text();
        let collectors = self
            .collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        text.push_str(&collector_text(&collectors));
        let (cpu, rss) = own_usage();
        let _ = writeln!(
            text,
            "# HELP prof_bpf_agent_cpu_seconds_total CPU time of the agent (user + system).\n\
             # TYPE prof_bpf_agent_cpu_seconds_total counter\n\
             prof_bpf_agent_cpu_seconds_total {cpu}\n\
             # HELP prof_bpf_agent_resident_bytes Resident memory of the agent.\n\
             # TYPE prof_bpf_agent_resident_bytes gauge\n\
             prof_bpf_agent_resident_bytes {rss}"
        );
        text
    }
}

/// `prof_bpf_collector_events_total{collector,counter}` lines.
fn collector_text(counters: &[(&'static str, &'static str, u64)]) -> String {
    let mut text = String::from(
        "# HELP prof_bpf_collector_events_total Events and losses counted by each collector.\n\
         # TYPE prof_bpf_collector_events_total counter\n",
    );
    for (collector, counter, value) in counters {
        let _ = writeln!(
            text,
            "prof_bpf_collector_events_total{{collector=\"{collector}\",counter=\"{counter}\"}} {value}"
        );
    }
    text
}

/// This process's CPU seconds and resident bytes (0 when unreadable).
fn own_usage() -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as u64,
        )
    };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15; `rest` starts at field 3.
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / hz)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_are_labelled_series() {
        let text = collector_text(&[("cpu", "samples", 12), ("heap", "live_full", 0)]);
        assert!(text.contains(
            "prof_bpf_collector_events_total{collector=\"cpu\",counter=\"samples\"} 12\n"
        ));
        assert!(text.contains("counter=\"live_full\"} 0"));
    }

    #[test]
    fn own_usage_is_read() {
        let (cpu, rss) = own_usage();
        assert!(cpu >= 0.0);
        assert!(rss > 0);
    }
}
