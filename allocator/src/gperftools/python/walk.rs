//! The current thread's Python frames, read in-process: the thread state
//! (found in the interpreters' thread lists by `native_thread_id`, since
//! 3.12 and 3.13 keep it in a TLS symbol that stripped builds do not export
//! and the GIL holder is not the current thread), then `previous` from its
//! current `_PyInterpreterFrame`, each frame reduced to (code object,
//! instruction offset) plus an [`ACTIVATION_END`] marker per evaluation-loop
//! activation. The same reads, checks and markers as the kernel walker
//! (`profiler-ebpf/src/python.rs`).
//!
//! This may run inside malloc or a SIGPROF handler, in the middle of a
//! frame push: every read goes through the unwinder's fault-safe read,
//! every pointer is checked, and the walk stops at the first frame that
//! fails a check (the frames before it are kept, the stack is marked cut).
//! No allocation, no lock.
use profiler_common::{
    python::{ACTIVATION_END, PyFrameSlot},
    python_layout::{FrameAnchor, Offsets},
};

use super::super::unwind::safe_read_bytes;

/// Slots (frames and markers) of one walk.
pub(crate) const MAX_SLOTS: usize = 96;
/// Interpreters and threads per interpreter looked at, at most.
const MAX_INTERPRETERS: usize = 16;
const MAX_THREADS: usize = 4096;

/// What the walker needs of the interpreter.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub runtime: u64,
    pub code_type: u64,
    pub o: Offsets,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Reached the outermost frame (or the thread runs no Python code).
    Complete,
    /// Cut at [`MAX_SLOTS`].
    Truncated,
    /// A read failed or a frame failed a check: outer frames are missing.
    Broken,
}

pub(crate) struct Walk {
    pub slots: [PyFrameSlot; MAX_SLOTS],
    pub len: usize,
    pub end: End,
}

/// Reads `buf.len()` bytes at `addr`.
fn read_into(addr: u64, buf: &mut [u8]) -> Option<()> {
    (plausible(addr) && safe_read_bytes(addr as usize, buf)).then_some(())
}

fn u64_at(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_into(addr, &mut b)?;
    Some(u64::from_le_bytes(b))
}

/// A user-space address.
fn plausible(addr: u64) -> bool {
    (4096..1 << 47).contains(&addr)
}

fn field_u64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The thread state of kernel thread `tid`, or None.
pub(crate) fn thread_state(l: &Layout, tid: u64) -> Option<u64> {
    let o = &l.o;
    let mut interp = u64_at(l.runtime + o.runtime_interpreters_head)?;
    for _ in 0..MAX_INTERPRETERS {
        if interp == 0 || interp % 8 != 0 {
            return None;
        }
        let mut t = u64_at(interp + o.interp_threads_head)?;
        for _ in 0..MAX_THREADS {
            if t == 0 || t % 8 != 0 {
                break;
            }
            // next, interp and native_thread_id in one read.
            let mut head = [0u8; 256];
            let end = o
                .tstate_native_thread_id
                .max(o.tstate_next)
                .max(o.tstate_interp)
                + 8;
            read_into(t, head.get_mut(..end as usize)?)?;
            if field_u64(&head, o.tstate_native_thread_id) == tid {
                return (field_u64(&head, o.tstate_interp) == interp).then_some(t);
            }
            t = field_u64(&head, o.tstate_next);
        }
        interp = u64_at(interp + o.interp_next)?;
    }
    None
}

/// Walks the frames of the thread whose state is at `tstate`.
pub(crate) fn walk(l: &Layout, tstate: u64, out: &mut Walk) {
    out.len = 0;
    out.end = End::Complete;
    let mut frame = match current_frame(l, tstate) {
        Some(f) => f,
        None => {
            out.end = End::Broken;
            return;
        }
    };
    while frame != 0 {
        if out.len >= MAX_SLOTS {
            out.end = End::Truncated;
            return;
        }
        match step(l, frame, out) {
            Some(previous) => frame = previous,
            None => {
                out.end = End::Broken;
                return;
            }
        }
    }
}

fn current_frame(l: &Layout, tstate: u64) -> Option<u64> {
    match l.o.tstate_frame {
        FrameAnchor::ThroughCFrame {
            cframe,
            current_frame,
        } => {
            let cframe = u64_at(tstate + cframe)?;
            if cframe == 0 {
                return Some(0);
            }
            u64_at(cframe + current_frame)
        }
        FrameAnchor::Direct { current_frame } => u64_at(tstate + current_frame),
    }
}

fn push(out: &mut Walk, code: u64, instr_offset: u32) -> bool {
    if out.len >= MAX_SLOTS {
        out.end = End::Truncated;
        return false;
    }
    out.slots[out.len] = PyFrameSlot {
        code,
        instr_offset,
        _pad: 0,
    };
    out.len += 1;
    true
}

/// Records the frame at `frame` and returns the previous one; None ends
/// the walk (a failed read or check, or the slots are full).
fn step(l: &Layout, frame: u64, out: &mut Walk) -> Option<u64> {
    let o = &l.o;
    let mut f = [0u8; 128];
    let end = o.frame_previous.max(o.frame_code).max(o.frame_instr) + 8;
    let end = end
        .max(o.frame_owner + 1)
        .max(o.frame_is_entry.unwrap_or(0) + 1);
    read_into(frame, f.get_mut(..end as usize)?)?;
    let previous = field_u64(&f, o.frame_previous);
    let owner = f[o.frame_owner as usize];
    if Some(owner) == o.owner_cstack {
        // The shim below an activation's outermost frame (3.12+).
        return push(out, ACTIVATION_END, 0).then_some(previous);
    }
    let code = field_u64(&f, o.frame_code);
    // Type, size and first traceable unit in one read of the header.
    let mut c = [0u8; 256];
    read_into(code, c.get_mut(..o.code_adaptive as usize)?)?;
    if field_u64(&c, o.object_type) != l.code_type {
        return None;
    }
    let units = field_u64(&c, o.var_object_size);
    let at = o.code_firsttraceable as usize;
    let firsttraceable = u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
    let instr = field_u64(&f, o.frame_instr);
    let first = code + o.code_adaptive;
    // 3.11/3.12 point one unit before the first instruction until the
    // frame starts.
    let before_start = instr.wrapping_add(2) == first;
    if !before_start && (instr < first || instr >= first.saturating_add(units.saturating_mul(2))) {
        return None;
    }
    let incomplete = owner != o.owner_generator
        && (before_start || instr < first + u64::from(firsttraceable) * 2);
    if !incomplete && !push(out, code, (instr - first) as u32) {
        return None;
    }
    if let Some(is_entry) = o.frame_is_entry {
        // 3.11: the frame was entered from C, the activation ends here.
        if f[is_entry as usize] != 0 && !push(out, ACTIVATION_END, 0) {
            return None;
        }
    }
    Some(previous)
}
