//! The stack-copy fallback of the user-stack walk
//! (`profiler_common::stack_copy` describes it): when the walker meets a pc
//! its process's tables do not cover yet, the stack above that frame is
//! copied to user space, which unwinds it once the tables exist.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_user},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use profiler_common::{
    counters::CounterSet as _,
    stack_copy::{COPY_BYTES, COPY_ID_BIT, COPY_PAGES, CopyCounter, STACK_COPIES_BYTES, StackCopy},
    unwind::Frame,
};

/// `STACK_COPIES`: the copies, for user space.
#[map(name = "STACK_COPIES")]
static STACK_COPIES: RingBuf = RingBuf::with_byte_size(STACK_COPIES_BYTES, 0);

/// `STACK_COPY_CONFIG`: non-zero while user space reads the copies.
#[map(name = "STACK_COPY_CONFIG")]
static STACK_COPY_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// `STACK_COPY_STATS`: the `CopyCounter` set.
#[map(name = "STACK_COPY_STATS")]
static STACK_COPY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CopyCounter::LEN, 0);

const PAGE: u64 = 4096;

/// Whether walks copy stacks where tables are missing.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    STACK_COPY_CONFIG.get(0).is_some_and(|on| *on != 0)
}

/// An id no other stack of this session has: the copy's time and thread.
#[inline(always)]
fn copy_id(tid: u64) -> u64 {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    h = (h ^ now).wrapping_mul(0x0000_0100_0000_01b3);
    h = (h ^ tid).wrapping_mul(0x0000_0100_0000_01b3);
    h | COPY_ID_BIT
}

/// Copies the stack of thread `tid` (process `pid`) above `frame` into the
/// ring buffer; returns the stack id the event gets, or `None` when the
/// ring buffer is full (counted).
#[inline(always)]
pub(crate) fn copy(
    pid: u32,
    tid: u64,
    frame: &Frame,
    exact: bool,
    bp_chained: bool,
) -> Option<u64> {
    let Some(mut entry) = STACK_COPIES.reserve::<StackCopy>(0) else {
        crate::counters::count(&STACK_COPY_STATS, CopyCounter::Lost);
        return None;
    };
    let record = entry.as_mut_ptr();
    let id = copy_id(tid);
    // SAFETY: `record` points at the reserved, writable record; every
    // header field is written before it is submitted, and the bytes are
    // written only by the helper within their bounds (below).
    unsafe {
        (*record).id = id;
        (*record).pid = pid;
        (*record).tid = tid as u32;
        (*record).pc = frame.pc;
        (*record).sp = frame.sp;
        (*record).bp = frame.bp;
        (*record).exact = exact as u32;
        (*record).bp_chained = bp_chained as u32;
        (*record).start = (frame.sp & (PAGE - 1)) as u32;
        (*record).len = read_stack(frame.sp, (&raw mut (*record).bytes).cast());
        crate::counters::count(&STACK_COPY_STATS, CopyCounter::Copies);
        crate::counters::add(&STACK_COPY_STATS, CopyCounter::Bytes, (*record).len as u64);
    }
    entry.submit(0);
    Some(id)
}

/// Reads the user stack from `sp` into `dst` (`COPY_BYTES` long, laid out
/// by page: `sp` at offset `sp % PAGE`): the rest of `sp`'s page, then
/// whole pages until one cannot be read (the top of the stack) or the copy
/// is full. Returns the bytes read from `sp`.
///
/// # Safety
/// `dst` must be valid for `COPY_BYTES` bytes of writes.
#[inline(always)]
unsafe fn read_stack(sp: u64, dst: *mut u8) -> u32 {
    let start = (sp & (PAGE - 1)) as usize;
    let first = PAGE as usize - start;
    // SAFETY: start + first == PAGE <= COPY_BYTES.
    if unsafe {
        bpf_probe_read_user(
            dst.add(start).cast::<c_void>(),
            first as u32,
            sp as *const c_void,
        )
    } != 0
    {
        return 0;
    }
    let page = sp - start as u64;
    let mut len = first as u32;
    for k in 1..COPY_PAGES {
        // SAFETY: (k + 1) pages <= COPY_BYTES.
        let read = unsafe {
            bpf_probe_read_user(
                dst.add(k * PAGE as usize).cast::<c_void>(),
                PAGE as u32,
                (page + k as u64 * PAGE) as *const c_void,
            )
        };
        if read != 0 {
            break;
        }
        len += PAGE as u32;
    }
    len
}
