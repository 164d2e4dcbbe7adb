//! The current thread's Python frames, read in-process: the thread state
//! (found in the interpreters' thread lists by `native_thread_id`, since
//! 3.12 and 3.13 keep it in a TLS symbol that stripped builds do not export
//! and the GIL holder is not the current thread; the caller keeps it per
//! thread and checks it with [`current_frame`]), then `previous` from its
//! current `_PyInterpreterFrame`, each frame reduced to its code object's
//! address and instruction offset (and, for gperftools mode, its frame
//! word: named code object and instruction offset, [`names::frame_word`])
//! plus an [`ACTIVATION_END`] marker per evaluation-loop activation. The same
//! reads, checks and markers as the kernel walker
//! (`profiler-ebpf/src/python.rs`).
//!
//! This may run inside malloc or a SIGPROF handler, in the middle of a
//! frame push: every read is fault-safe ([`super::read`]), every pointer is
//! checked, and the walk stops at the first frame that fails a check (the
//! frames before it are kept, the stack is marked cut). No allocation, no
//! lock. A read of a page no earlier walk of the thread kept costs a
//! system call (batched, see [`super::read`] and [`super::mapped`]), so
//! there are as few as the chain allows: one per frame and one per code
//! object, one for the thread state.
use profiler_common::{
    python::{ACTIVATION_END, NO_CODE_CHECK, PyFrameSlot, code_check},
    python_layout::{FrameAnchor, Offsets},
};

use super::{names, read::Reader};

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

/// One walk: `slots[..len]` (code address and instruction offset, or
/// [`ACTIVATION_END`]) and, with `intern`, the frame word of each frame in
/// `words` (0 for a marker).
pub(crate) struct Walk {
    pub slots: [PyFrameSlot; MAX_SLOTS],
    pub words: [u64; MAX_SLOTS],
    pub len: usize,
    pub end: End,
    pub intern: bool,
}

impl Walk {
    pub(crate) fn empty() -> Self {
        Self {
            slots: [PyFrameSlot::default(); MAX_SLOTS],
            words: [0; MAX_SLOTS],
            len: 0,
            end: End::Complete,
            intern: false,
        }
    }

    /// The walk stopped before the outermost frame.
    pub(crate) fn is_cut(&self) -> bool {
        matches!(self.end, End::Broken | End::Truncated)
    }
}

fn field_u32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn field_u64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The thread state of the calling thread (`r.tid`), or None.
pub(crate) fn thread_state(l: &Layout, r: &mut Reader<'_>) -> Option<u64> {
    let o = &l.o;
    let tid = r.tid as u64;
    let mut interp = r.u64_at(l.runtime + o.runtime_interpreters_head)?;
    for _ in 0..MAX_INTERPRETERS {
        if interp == 0 || interp % 8 != 0 {
            return None;
        }
        let mut t = r.u64_at(interp + o.interp_threads_head)?;
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
            r.read(t, head.get_mut(..end as usize)?)?;
            if field_u64(&head, o.tstate_native_thread_id) == tid {
                return (field_u64(&head, o.tstate_interp) == interp).then_some(t);
            }
            t = field_u64(&head, o.tstate_next);
        }
        interp = r.u64_at(interp + o.interp_next)?;
    }
    None
}

/// A value that changes when a thread state joins the first
/// interpreter's thread list, or an interpreter joins the list of
/// interpreters (both go in at the head); 0 when unreadable.
pub(crate) fn list_heads(l: &Layout, r: &mut Reader<'_>) -> u64 {
    let Some(interp) = r.u64_at(l.runtime + l.o.runtime_interpreters_head) else {
        return 0;
    };
    let threads = if interp == 0 {
        0
    } else {
        r.u64_at(interp + l.o.interp_threads_head).unwrap_or(0)
    };
    interp ^ threads.rotate_left(32)
}

/// Why [`current_frame`] gave no frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoFrame {
    /// `tstate` is not (or no longer) the calling thread's state.
    NotOurs,
    /// It is, but its frame pointer could not be read.
    Unreadable,
}

/// The innermost frame (0: none) of the thread state at `tstate`, when it
/// is the calling thread's: its `native_thread_id` and its frame anchor
/// come in one read, so a thread state kept from an earlier walk costs one
/// read (3.11 and 3.12: two, through `cframe`) to check and use. A thread
/// state is freed only by its own thread (or at the thread's end), and the
/// id check catches one reused for another thread.
pub(crate) fn current_frame(l: &Layout, r: &mut Reader<'_>, tstate: u64) -> Result<u64, NoFrame> {
    let o = &l.o;
    let anchor = match o.tstate_frame {
        FrameAnchor::ThroughCFrame { cframe, .. } => cframe,
        FrameAnchor::Direct { current_frame } => current_frame,
    };
    let mut head = [0u8; 256];
    let end = o.tstate_native_thread_id.max(anchor) + 8;
    let head = head.get_mut(..end as usize).ok_or(NoFrame::NotOurs)?;
    r.read(tstate, head).ok_or(NoFrame::NotOurs)?;
    if field_u64(head, o.tstate_native_thread_id) != r.tid as u64 {
        return Err(NoFrame::NotOurs);
    }
    let at_anchor = field_u64(head, anchor);
    match o.tstate_frame {
        FrameAnchor::ThroughCFrame { current_frame, .. } => {
            if at_anchor == 0 {
                return Ok(0);
            }
            r.u64_at(at_anchor + current_frame)
                .ok_or(NoFrame::Unreadable)
        }
        FrameAnchor::Direct { .. } => Ok(at_anchor),
    }
}

/// Walks the frames from `frame` (the innermost, 0: none) outwards.
pub(crate) fn walk(l: &Layout, r: &mut Reader<'_>, mut frame: u64, out: &mut Walk) {
    out.len = 0;
    out.end = End::Complete;
    while frame != 0 {
        if out.len >= MAX_SLOTS {
            out.end = End::Truncated;
            return;
        }
        match step(l, r, frame, out) {
            Some(previous) => frame = previous,
            None => {
                out.end = End::Broken;
                return;
            }
        }
    }
}

fn push(out: &mut Walk, code: u64, instr_offset: u32, check: u32, word: u64) -> bool {
    if out.len >= MAX_SLOTS {
        out.end = End::Truncated;
        return false;
    }
    out.slots[out.len] = PyFrameSlot {
        code,
        instr_offset,
        check,
    };
    out.words[out.len] = word;
    out.len += 1;
    true
}

/// Records the frame at `frame` and
/// returns the previous one; None ends the walk (a failed read or check,
/// or the slots are full).
fn step(l: &Layout, r: &mut Reader<'_>, frame: u64, out: &mut Walk) -> Option<u64> {
    let o = &l.o;
    let mut f = [0u8; 128];
    let end = o.frame_previous.max(o.frame_code).max(o.frame_instr) + 8;
    let end = end
        .max(o.frame_owner + 1)
        .max(o.frame_is_entry.unwrap_or(0) + 1);
    r.read(frame, f.get_mut(..end as usize)?)?;
    let previous = field_u64(&f, o.frame_previous);
    let owner = f[o.frame_owner as usize];
    if Some(owner) == o.owner_cstack {
        // The shim below an activation's outermost frame (3.12+).
        return push(out, ACTIVATION_END, 0, NO_CODE_CHECK, 0).then_some(previous);
    }
    let code = field_u64(&f, o.frame_code);
    // Type, size, first traceable unit and the names' pointers in one read
    // of the header.
    let mut buf = [0u8; 256];
    let header = buf.get_mut(..o.code_adaptive as usize)?;
    r.read(code, header)?;
    let c: &[u8] = header;
    if field_u64(c, o.object_type) != l.code_type {
        return None;
    }
    let units = field_u64(c, o.var_object_size);
    let firsttraceable = field_u32(c, o.code_firsttraceable);
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
    if !incomplete {
        let offset = (instr - first) as u32;
        // Naming copies the code's strings once per code object.
        let word = if out.intern {
            names::frame_word(o, code, c, offset)
        } else {
            0
        };
        // The names' addresses and the first line, read with the header:
        // the reader names the frame only if they still match.
        let check = code_check(
            field_u64(c, o.code_qualname),
            field_u64(c, o.code_filename),
            field_u64(c, o.code_linetable),
            field_u32(c, o.code_firstlineno),
        );
        if !push(out, code, offset, check, word) {
            return None;
        }
    }
    if let Some(is_entry) = o.frame_is_entry {
        // 3.11: the frame was entered from C, the activation ends here.
        if f[is_entry as usize] != 0 && !push(out, ACTIVATION_END, 0, NO_CODE_CHECK, 0) {
            return None;
        }
    }
    Some(previous)
}
