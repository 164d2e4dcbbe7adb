//! The Python frame walker: at an event of a thread of a CPython process,
//! records the thread's Python frames as (code object, instruction offset)
//! pairs, with a marker at the outer end of each activation of the
//! evaluation loop, so user space can splice them into the native stack.
//!
//! Same reads, checks and bounds as the user-space reference walker
//! (`profiler::python::stack`): every pointer comes from the target's
//! memory, which changes under the reader, so a frame that fails a check
//! ends the walk (counted) rather than producing a garbage frame. Map
//! layout: `profiler_common::python`.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_probe_read_user, generated::bpf_loop},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use profiler_common::{
    counters::CounterSet as _,
    python::{
        ACTIVATION_END, CHECK_BLOCK_WORDS, MAX_PY_SLOTS, NO_CODE_CHECK, NO_FIELD, PAIRS_MAX,
        PROCESSES_MAX, PY_STACK_BROKEN, PY_STACK_COMPLETE, PY_STACK_TRUNCATED, PyCounter,
        PyFrameSlot, PyPair, PyProcess, PyStack, STACKS_MAX, THREADS_MAX, code_check,
    },
};

#[map(name = "PY_PROCESSES")]
static PROCESSES: HashMap<u32, PyProcess> = HashMap::with_max_entries(PROCESSES_MAX, 0);

#[map(name = "PY_THREADS")]
static THREADS: HashMap<u32, u64> = HashMap::with_max_entries(THREADS_MAX, 0);

#[map(name = "PY_STACKS")]
static STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(STACKS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "PY_PAIRS")]
static PAIRS: HashMap<u64, PyPair> = HashMap::with_max_entries(PAIRS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "PY_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PyCounter::LEN, 0);

/// A walk in progress: too large for the BPF stack. Per CPU, with a busy
/// flag: a uprobe program may be preempted by another thread's on the same
/// CPU (never migrated), and a perf event may interrupt either; the later
/// walk then finds the record busy and gives up (counted).
#[repr(C)]
struct Walk {
    stack: PyStack,
    process: PyProcess,
    /// Next frame to visit (0: the outermost was visited).
    frame: u64,
    busy: u32,
    _pad: u32,
}

#[map(name = "PY_WALK")]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// What the `bpf_loop` callback gets.
#[repr(C)]
struct LoopCtx {
    walk: *mut Walk,
}

/// Frames visited at most (slots plus skipped frames).
const MAX_VISITS: u32 = MAX_PY_SLOTS as u32 + 64;

#[inline(always)]
fn count(counter: PyCounter) {
    crate::counters::count(&STATS, counter);
}

#[inline(always)]
fn read<T>(address: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address and fails cleanly.
    unsafe { bpf_probe_read_user(address as *const T) }.ok()
}

/// Whether `--gil` leaves out a CPU sample of thread `tid`: its process is
/// a CPython profiled with `--gil`, and the thread is not the one holding
/// the GIL (`locked` set and `last_holder` its thread state). A thread
/// whose state is not known yet, or a GIL not located yet, keeps its
/// sample: only what is known not to hold the GIL is dropped (counted).
#[inline(always)]
pub fn not_gil_holder(pid: u32, tid: u32) -> bool {
    // SAFETY: the value is copied at once.
    let Some(process) = (unsafe { PROCESSES.get(pid) }).copied() else {
        return false;
    };
    if process.gil_only == 0 || process.gil_locked == 0 {
        return false;
    }
    // SAFETY: as above.
    let Some(&tstate) = (unsafe { THREADS.get(tid) }) else {
        return false;
    };
    let (Some(locked), Some(holder)) = (
        read::<i32>(process.gil_locked),
        read::<u64>(process.gil_holder),
    ) else {
        return false;
    };
    if locked != 0 && holder == tstate {
        return false;
    }
    count(PyCounter::NotGilHolder);
    true
}

/// The id in `PY_STACKS` of the current thread's Python stack, or None when
/// the process is not a known CPython or the thread runs no Python code.
#[inline(always)]
pub fn stack_id(pid: u32, tid: u32) -> Option<u64> {
    // SAFETY: the value is copied at once.
    let process = *unsafe { PROCESSES.get(pid) }?;
    count(PyCounter::Walks);
    // SAFETY: as above.
    let Some(&tstate) = (unsafe { THREADS.get(tid) }) else {
        count(PyCounter::ThreadUnknown);
        return None;
    };
    let frame = match current_frame(&process, tstate) {
        Some(frame) if frame != 0 => frame,
        Some(_) => {
            count(PyCounter::NoFrames);
            return None;
        }
        None => {
            count(PyCounter::ReadFailed);
            return None;
        }
    };
    let walk_ptr = WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's record, valid while the program runs; the busy
    // flag keeps a nested walk off it.
    let walk = unsafe { &mut *walk_ptr };
    if walk.busy != 0 {
        count(PyCounter::Busy);
        return None;
    }
    walk.busy = 1;
    walk.process = process;
    walk.frame = frame;
    walk.stack.len = 0;
    walk.stack.status = PY_STACK_TRUNCATED;
    // bpf_loop's context must be on the BPF stack: it holds the record.
    let mut ctx = LoopCtx { walk: walk_ptr };
    // SAFETY: `walk_frame` has the callback signature bpf_loop expects and
    // `ctx` and the record outlive the loop.
    unsafe {
        bpf_loop(
            MAX_VISITS,
            walk_frame as *const () as *mut c_void,
            (&raw mut ctx).cast(),
            0,
        );
    }
    let result = store(&walk.stack);
    walk.busy = 0;
    result
}

/// For records that hold one stack id (heap): `native` alone when the
/// thread has no Python frames, else an id that stands for `native` and the
/// thread's Python stack together (`PY_PAIRS`).
#[inline(always)]
pub fn with_python(native: u64) -> u64 {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let Some(python) = stack_id(pid, pid_tgid as u32) else {
        return native;
    };
    let mut combined = (native ^ python.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Never the heap's missing-stack id.
    if combined == u64::MAX {
        combined = 1;
    }
    if PAIRS.get_ptr(combined).is_none() {
        let pair = PyPair {
            native,
            python,
            pid,
            _pad: 0,
        };
        match PAIRS.insert(combined, &pair, BPF_NOEXIST as u64) {
            Ok(()) | Err(-17) => {}
            Err(_) => {
                count(PyCounter::PairsFull);
                return native;
            }
        }
    }
    combined
}

/// The thread's innermost frame (0: no Python code running).
#[inline(always)]
fn current_frame(p: &PyProcess, tstate: u64) -> Option<u64> {
    if p.tstate_cframe == NO_FIELD {
        return read(tstate + p.current_frame);
    }
    let cframe: u64 = read(tstate + p.tstate_cframe)?;
    if cframe == 0 {
        return Some(0);
    }
    read(cframe + p.current_frame)
}

/// Counts the walk's end and stores its stack; None when it has nothing.
#[inline(always)]
fn store(stack: &PyStack) -> Option<u64> {
    match stack.status {
        PY_STACK_COMPLETE => count(PyCounter::Complete),
        PY_STACK_TRUNCATED => count(PyCounter::Truncated),
        _ => {}
    }
    if stack.len == 0 && stack.status == PY_STACK_COMPLETE {
        count(PyCounter::NoFrames);
        return None;
    }
    let id = hash(stack);
    if STACKS.get_ptr(id).is_none() {
        match STACKS.insert(id, stack, BPF_NOEXIST as u64) {
            Ok(()) | Err(-17) => {}
            Err(_) => {
                count(PyCounter::MapFull);
                return None;
            }
        }
    }
    Some(id)
}

/// Appends a slot; false (and the stack truncated) when full.
#[inline(always)]
fn push(stack: &mut PyStack, code: u64, instr_offset: u32, check: u32) -> bool {
    let len = stack.len as usize;
    let Some(slot) = stack.slots.get_mut(len) else {
        stack.status = PY_STACK_TRUNCATED;
        return false;
    };
    *slot = PyFrameSlot {
        code,
        instr_offset,
        check,
    };
    stack.len += 1;
    true
}

/// Ends the walk on a frame that could not be read or is not valid.
#[inline(always)]
fn broken(walk: &mut Walk, counter: PyCounter) -> i64 {
    count(counter);
    walk.stack.status = PY_STACK_BROKEN;
    1
}

/// One frame (a `bpf_loop` callback). Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the LoopCtx given by `stack_id`, whose
    // record is valid for the whole program run.
    let walk = unsafe { &mut *(*ctx.cast::<LoopCtx>()).walk };
    let frame = walk.frame;
    if frame == 0 {
        walk.stack.status = PY_STACK_COMPLETE;
        return 1;
    }
    if walk.stack.len as usize >= MAX_PY_SLOTS {
        walk.stack.status = PY_STACK_TRUNCATED;
        return 1;
    }
    let p = walk.process;
    let Some(previous) = read::<u64>(frame + p.frame_previous) else {
        return broken(walk, PyCounter::ReadFailed);
    };
    let Some(owner) = read::<u8>(frame + p.frame_owner) else {
        return broken(walk, PyCounter::ReadFailed);
    };
    if u64::from(owner) == p.owner_cstack {
        // The shim below an activation's outermost frame (3.12+).
        count(PyCounter::CstackFrames);
        walk.frame = previous;
        return if push(&mut walk.stack, ACTIVATION_END, 0, NO_CODE_CHECK) {
            0
        } else {
            1
        };
    }
    let Some(code) = read::<u64>(frame + p.frame_code) else {
        return broken(walk, PyCounter::ReadFailed);
    };
    match read::<u64>(code + p.object_type) {
        Some(t) if t == p.code_type => {}
        Some(_) => return broken(walk, PyCounter::BadFrame),
        None => return broken(walk, PyCounter::ReadFailed),
    }
    let (Some(units), Some(instr), Some(firsttraceable)) = (
        read::<u64>(code + p.var_object_size),
        read::<u64>(frame + p.frame_instr),
        read::<u32>(code + p.code_firsttraceable),
    ) else {
        return broken(walk, PyCounter::ReadFailed);
    };
    let first = code + p.code_adaptive;
    // 3.11/3.12 point one unit before the first instruction until the
    // frame starts.
    let before_start = instr.wrapping_add(2) == first;
    if !before_start && (instr < first || instr >= first.saturating_add(units.saturating_mul(2))) {
        return broken(walk, PyCounter::BadFrame);
    }
    let incomplete = u64::from(owner) != p.owner_generator
        && (before_start || instr < first + u64::from(firsttraceable) * 2);
    if incomplete {
        count(PyCounter::IncompleteFrames);
    } else if !push(
        &mut walk.stack,
        code,
        (instr - first) as u32,
        check(&p, code),
    ) {
        return 1;
    }
    if p.frame_is_entry != NO_FIELD {
        // 3.11: the frame was entered from C, the activation ends here.
        match read::<u8>(frame + p.frame_is_entry) {
            Some(0) => {}
            Some(_) => {
                if !push(&mut walk.stack, ACTIVATION_END, 0, NO_CODE_CHECK) {
                    return 1;
                }
            }
            None => return broken(walk, PyCounter::ReadFailed),
        }
    }
    walk.frame = previous;
    0
}

/// The code object's [`code_check`] (its names' addresses and first
/// line: the reader names the frame only if they still match), or
/// [`NO_CODE_CHECK`] when the layout or a read does not allow it.
#[inline(always)]
fn check(p: &PyProcess, code: u64) -> u32 {
    if p.code_check_block == NO_FIELD {
        return NO_CODE_CHECK;
    }
    let (Some(block), Some(firstlineno)) = (
        read::<[u64; CHECK_BLOCK_WORDS]>(code + p.code_check_block),
        read::<u32>(code + p.code_firstlineno),
    ) else {
        return NO_CODE_CHECK;
    };
    let word = |i: u64| block[(i as usize) % CHECK_BLOCK_WORDS];
    code_check(
        word(p.check_qualname),
        word(p.check_filename),
        word(p.check_linetable),
        firstlineno,
    )
}

/// FNV-1a over the slots, the length and the status.
#[inline(always)]
fn hash(stack: &PyStack) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ ((stack.len as u64) << 8 | stack.status as u64);
    for i in 0..MAX_PY_SLOTS {
        if i >= stack.len as usize {
            break;
        }
        let s = &stack.slots[i];
        h = (h ^ s.code).wrapping_mul(0x0000_0100_0000_01b3);
        h = (h ^ u64::from(s.instr_offset)).wrapping_mul(0x0000_0100_0000_01b3);
        h = (h ^ u64::from(s.check)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
