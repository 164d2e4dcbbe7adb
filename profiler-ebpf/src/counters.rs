//! The one way the programs count: an atomic add on a counter set's per-CPU
//! array (see `profiler_common::counters`).
use aya_ebpf::maps::PerCpuArray;
use profiler_common::counters::CounterSet;

/// Adds one to `counter` of the set kept in `map`.
#[inline(always)]
pub fn count<S: CounterSet>(map: &PerCpuArray<u64>, counter: S) {
    add(map, counter, 1);
}

/// Adds `n` to `counter` of the set kept in `map`.
#[inline(always)]
pub fn add<S: CounterSet>(map: &PerCpuArray<u64>, counter: S, n: u64) {
    if let Some(c) = map.get_ptr_mut(counter.index()) {
        // SAFETY: a pointer from a successful lookup into an 8-byte value.
        unsafe { crate::atomic::add(c, n) };
    }
}
