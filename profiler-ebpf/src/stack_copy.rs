//! The stack-copy fallback of the user-stack walk
//! (`profiler_common::stack_copy` describes it): when the walker meets a pc
//! its process's tables do not cover yet, the stack above that frame is
//! copied to user space, which unwinds it once the tables exist.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_user},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use profiler_common::{
    counters::CounterSet as _,
    stack_copy::{
        COPIES_PER_WINDOW, COPIES_PER_WINDOW_ALL, COPY_BYTES, COPY_ID_BIT, COPY_PAGES,
        COPY_WINDOW_NS, CopyCounter, STACK_COPIES_BYTES, StackCopy,
    },
    unwind::{Frame, LeafRegs},
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

/// `STACK_COPY_RATE`: pid -> [start of its current window (ns), copies
/// in it], so that no process pays for more than `COPIES_PER_WINDOW`
/// copies per window (a process that allocates millions of times before
/// its tables arrive, under `heap --all`), nor the host for more than
/// `COPIES_PER_WINDOW_ALL` (key `ALL_PROCESSES`).
#[map(name = "STACK_COPY_RATE")]
static STACK_COPY_RATE: LruHashMap<u32, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

const PAGE: u64 = 4096;

/// The key of [`STACK_COPY_RATE`] that counts every process's copies.
const ALL_PROCESSES: u32 = u32::MAX;

/// Whether process `pid` may have one more copy in this window, and the
/// host as well.
#[inline(always)]
fn within_rate(pid: u32) -> bool {
    within(pid, COPIES_PER_WINDOW) && within(ALL_PROCESSES, COPIES_PER_WINDOW_ALL)
}

/// Whether `key` may have one more copy in this window, of `limit`.
#[inline(always)]
fn within(key: u32, limit: u64) -> bool {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(w) = STACK_COPY_RATE.get_ptr_mut(&key) {
        // SAFETY: a pointer from a successful lookup; a lost update between
        // two threads only lets one copy more through.
        unsafe {
            if now.wrapping_sub((*w)[0]) >= COPY_WINDOW_NS {
                (*w)[0] = now;
                (*w)[1] = 1;
                return true;
            }
            if (*w)[1] >= limit {
                return false;
            }
            (*w)[1] += 1;
        }
        return true;
    }
    let _ = STACK_COPY_RATE.insert(&key, &[now, 1], 0);
    true
}

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

/// Copies the stack of thread `tid` (process `pid`) above `frame` (with
/// `leaf`, its volatile registers when it is the sampled frame) into the
/// ring buffer; returns the stack id the event gets, or `None` when the
/// ring buffer is full (counted).
#[inline(always)]
pub(crate) fn copy(
    pid: u32,
    tid: u64,
    frame: &Frame,
    leaf: &LeafRegs,
    exact: bool,
    bp_chained: bool,
    prefix: u32,
) -> Option<u64> {
    if !within_rate(pid) {
        crate::counters::count(&STACK_COPY_STATS, CopyCounter::RateLimited);
        return None;
    }
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
        (*record).bx = frame.bx;
        (*record).leaf = *leaf;
        (*record).exact = exact as u32;
        (*record).bp_chained = bp_chained as u32;
        (*record).start = (frame.sp & (PAGE - 1)) as u32;
        (*record).prefix = prefix;
        (*record)._pad = 0;
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
