//! The agent's own lines on stderr: what it profiles, and its counters.
use aya::Ebpf;
use profiler_common::{cpu::CpuCounter, heap::HeapCounter};

use crate::{
    agent::{Settings, cpu::CpuCollector, heap::HeapCollector},
    heap,
};

/// The line printed once everything is attached.
pub(super) fn banner(
    settings: &Settings,
    cpu: Option<&CpuCollector>,
    heap: Option<&HeapCollector>,
) -> String {
    let scope = if settings.scope.whole_host() {
        "every process".to_owned()
    } else {
        "the named processes".to_owned()
    };
    let mut kinds = Vec::new();
    if let Some(cpu) = cpu {
        kinds.push(format!(
            "CPU at {} Hz on {} CPUs",
            settings.frequency,
            cpu.cpus()
        ));
    }
    if let Some(heap) = heap {
        kinds.push(format!("heap ({})", heap.summary()));
    }
    format!(
        "profiling {scope}: {}; one profile per process every {} s to {} sinks; SIGTERM or Ctrl-C sends the partial interval and stops",
        kinds.join(", "),
        settings.interval.as_secs_f64(),
        settings.sinks.len()
    )
}

/// The collectors' counters, one line.
pub(super) fn counters_line(ebpf: &Ebpf, heap: Option<&HeapCollector>) -> String {
    let mut parts = Vec::new();
    if let Ok(c) = CpuCollector::counters(ebpf) {
        parts.push(format!(
            "cpu samples {} (lost {}, user stacks not recorded {})",
            c.get(CpuCounter::Samples),
            c.get(CpuCounter::CountsFull),
            c.get(CpuCounter::UserStackFailed)
        ));
    }
    if let Some(h) = heap
        && let Ok(c) = heap::maps::counters(ebpf)
    {
        parts.push(format!(
            "heap samples {} (lost {}, without stack {}); {}",
            c.get(HeapCounter::Tracked),
            c.get(HeapCounter::LiveFull) + c.get(HeapCounter::StacksFull),
            c.get(HeapCounter::StackErrors),
            h.summary()
        ));
    }
    parts.join("; ")
}
