//! `prof-bpf count`: counts malloc and free entries per process.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, uprobe},
    maps::PerCpuHashMap,
    programs::ProbeContext,
};
use profiler_common::count::{AllocCounts, COUNTS_MAX_PROCESSES};

#[map(name = "ALLOC_COUNTS")]
static ALLOC_COUNTS: PerCpuHashMap<u32, AllocCounts> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_PROCESSES, 0);

#[uprobe]
pub fn count_malloc(ctx: ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    update(|c| {
        c.malloc_calls += 1;
        c.malloc_bytes += size;
    });
    0
}

#[uprobe]
pub fn count_free(_ctx: ProbeContext) -> u32 {
    update(|c| c.free_calls += 1);
    0
}

#[inline(always)]
fn update(f: impl FnOnce(&mut AllocCounts)) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(counts) = ALLOC_COUNTS.get_ptr_mut(&tgid) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU
        // map, so this CPU is its only writer while this program runs.
        f(unsafe { &mut *counts });
        return;
    }
    let mut counts = AllocCounts::default();
    f(&mut counts);
    // A full map is visible to user space: it finds a pid that is missing.
    let _ = ALLOC_COUNTS.insert(&tgid, &counts, 0);
}
