//! `prof-bpf count`: counts malloc and free entries per process.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, uprobe},
    maps::PerCpuHashMap,
    programs::ProbeContext,
};
use profiler_common::count::{AllocCounts, COUNTS_MAX_PROCESSES};

use crate::atomic::add;

#[map(name = "ALLOC_COUNTS")]
static ALLOC_COUNTS: PerCpuHashMap<u32, AllocCounts> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_PROCESSES, 0);

#[uprobe]
pub fn count_malloc(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    // SAFETY: pointers into a live map value.
    update(|c| unsafe {
        add(&raw mut (*c).malloc_calls, 1);
        add(&raw mut (*c).malloc_bytes, size);
    });
    0
}

#[uprobe]
pub fn count_free(_ctx: ProbeContext) -> u32 {
    // SAFETY: a pointer into a live map value.
    update(|c| unsafe { add(&raw mut (*c).free_calls, 1) });
    0
}

/// Applies `f` to this process's counters on this CPU, created zeroed on
/// first use. `f` must update them with atomic adds: uprobe programs are
/// preemptible, so two threads can update one per-CPU value at once.
#[inline(always)]
fn update(f: impl FnOnce(*mut AllocCounts)) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if ALLOC_COUNTS.get_ptr_mut(&tgid).is_none() {
        // BPF_NOEXIST: a thread that created it meanwhile keeps its counts.
        // A full map is visible to user space: it finds a pid missing.
        let _ = ALLOC_COUNTS.insert(&tgid, &AllocCounts::default(), BPF_NOEXIST as u64);
    }
    if let Some(counts) = ALLOC_COUNTS.get_ptr_mut(&tgid) {
        f(counts);
    }
}
