//! Programs that exercise the stack walker alone (`prof-bpf debug-unwind`,
//! the unwinder's tests and benchmark): count how often each user stack is
//! seen, from a uprobe at a function's entry or from a perf event.
use aya_ebpf::{
    bindings::pt_regs,
    macros::{map, perf_event, uprobe},
    maps::HashMap,
    programs::{PerfEventContext, ProbeContext},
};
use profiler_common::unwind_test::{TEST_COUNTS_MAX, TEST_STACK_FAILED};

use crate::stack::user_stack_id;

/// `UNWIND_TEST_COUNTS`: user stack id -> times seen.
#[map(name = "UNWIND_TEST_COUNTS")]
static COUNTS: HashMap<u64, u64> = HashMap::with_max_entries(TEST_COUNTS_MAX, 0);

#[uprobe]
pub fn unwind_test_uprobe(ctx: ProbeContext) -> u32 {
    record(user_stack_id(ctx.regs, true).unwrap_or(TEST_STACK_FAILED));
    0
}

#[perf_event]
pub fn unwind_test_perf(ctx: PerfEventContext) -> u32 {
    // bpf_perf_event_data starts with the interrupted registers.
    record(user_stack_id(ctx.ctx as *const pt_regs, false).unwrap_or(TEST_STACK_FAILED));
    0
}

#[inline(always)]
fn record(id: u64) {
    if let Some(n) = COUNTS.get_ptr_mut(id) {
        // SAFETY: a pointer from a successful lookup into an 8-byte value.
        unsafe { crate::atomic::add(n, 1) };
        return;
    }
    // A full map shows up as missing samples in the totals user space reads.
    let _ = COUNTS.insert(id, 1u64, 0);
}
