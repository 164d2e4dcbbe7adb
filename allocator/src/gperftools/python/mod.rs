//! Python frames in gperftools mode: when the process is CPython 3.11 to
//! 3.13 (its executable or a loaded libpython exports `_PyRuntime` and
//! `Py_Version`), every stack HEAPPROFILE, HEAPCHECK and CPUPROFILE take
//! also walks the current thread's Python frames ([`walk`]) and splices
//! them into the native stack in place of the evaluation-loop frames that
//! ran them (`profiler_common::python_splice`, the profiler's rules). The
//! frames are named from copies of their code objects ([`names`]) in the
//! dumps. The layout is `profiler_common::python_layout`'s, as for the
//! profiler: tables for 3.11 and 3.12, `_Py_DebugOffsets` for 3.13; any
//! other version is named in one line and gets native frames only.
use core::{
    cell::UnsafeCell,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use profiler_common::{
    python::PyFrameSlot,
    python_layout::{self, DEBUG_OFFSETS_LEN, PythonVersion},
    python_splice::{Spliced, splice},
};

use crate::os::Message;

pub(crate) mod names;
mod symbols;
mod walk;

use walk::{End, Layout, MAX_SLOTS, Walk};

struct Found(UnsafeCell<Option<(Layout, usize, usize)>>);
// SAFETY: written once by `start` before ON is published, then only read.
unsafe impl Sync for Found {}
static FOUND: Found = Found(UnsafeCell::new(None));
static ON: AtomicBool = AtomicBool::new(false);

/// Walks attempted, and those that ended early (a failed read or check,
/// or the slot limit), for the dumps' comments.
pub(crate) static WALKS: AtomicU64 = AtomicU64::new(0);
pub(crate) static CUT: AtomicU64 = AtomicU64::new(0);
/// Activations whose evaluation-loop frame the native stack did not hold
/// (their frames went to the outer end).
pub(crate) static UNMATCHED: AtomicU64 = AtomicU64::new(0);

/// Finds the interpreter. Called once, from the allocator's
/// initialisation, when gperftools mode takes stacks.
pub(crate) fn start() {
    let mut l = symbols::Lookup {
        names: &[
            b"_PyRuntime",
            b"Py_Version",
            b"PyCode_Type",
            b"_PyEval_EvalFrameDefault",
        ],
        found: [None; 8],
    };
    symbols::find(&mut l);
    let Some(runtime) = l.found[0] else {
        return; // not CPython
    };
    let Some(version) = l.found[1] else {
        say_unsupported("older than 3.11 (no Py_Version)");
        return;
    };
    let version = PythonVersion {
        // SAFETY: Py_Version is a const u32 of the interpreter's image.
        hex: unsafe { (version.address as *const u32).read() },
    };
    let offsets = if let Some(t) = python_layout::table(version) {
        t
    } else if python_layout::has_debug_offsets(version) {
        // SAFETY: _PyRuntime starts with _Py_DebugOffsets (3.13), static data.
        let bytes =
            unsafe { core::slice::from_raw_parts(runtime.address as *const u8, DEBUG_OFFSETS_LEN) };
        match python_layout::from_debug_offsets(bytes, version) {
            Ok(o) => o,
            Err(_) => {
                return say_version(version, "its _Py_DebugOffsets are not the expected ones");
            }
        }
    } else {
        return say_version(version, "only 3.11 to 3.13 are supported");
    };
    let (Some(code_type), Some(eval)) = (l.found[2], l.found[3]) else {
        return say_version(
            version,
            "PyCode_Type or _PyEval_EvalFrameDefault is not exported",
        );
    };
    if !names::start() {
        return;
    }
    let layout = Layout {
        runtime: runtime.address as u64,
        code_type: code_type.address as u64,
        o: offsets,
    };
    // SAFETY: written once, before ON publishes it.
    unsafe { *FOUND.0.get() = Some((layout, eval.address, eval.address + eval.size)) };
    ON.store(true, Ordering::Release);
}

fn say_version(v: PythonVersion, why: &str) {
    let mut m = Message::new();
    m.dec(u64::from(v.major()))
        .str(".")
        .dec(u64::from(v.minor()))
        .str(".")
        .dec(u64::from(v.micro()));
    say_unsupported_with(core::str::from_utf8(m.as_bytes()).unwrap_or("?"), why);
}

fn say_unsupported(version: &str) {
    say_unsupported_with(version, "only 3.11 to 3.13 are supported");
}

fn say_unsupported_with(version: &str, why: &str) {
    Message::new()
        .str("profalloc: Python ")
        .str(version)
        .str(" is not supported (")
        .str(why)
        .str("): only native frames are shown\n")
        .write_stderr();
}

/// Whether stacks get Python frames.
#[inline]
pub(crate) fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Writes `native` (leaf first, return addresses after `native[0]`) into
/// `out` with the current thread's Python frames spliced in. Returns the
/// frames written and whether frames were lost (`out` full, or the Python
/// walk cut).
pub(crate) fn merge(native: &[u64], leaf_is_pc: bool, out: &mut [u64]) -> (usize, bool) {
    // SAFETY: published by ON (checked by the caller through is_on).
    let Some((layout, eval_lo, eval_hi)) = (unsafe { *FOUND.0.get() }) else {
        return copy(native, out);
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u64;
    let Some(tstate) = walk::thread_state(&layout, tid) else {
        return copy(native, out);
    };
    WALKS.fetch_add(1, Ordering::Relaxed);
    let mut w = Walk {
        slots: [PyFrameSlot::default(); MAX_SLOTS],
        len: 0,
        end: End::Complete,
    };
    walk::walk(&layout, tstate, &mut w);
    let cut = matches!(w.end, End::Broken | End::Truncated);
    CUT.fetch_add(u64::from(cut), Ordering::Relaxed);
    let is_eval = |i: usize| {
        let pc = native[i] as usize;
        let pc = if i == 0 && leaf_is_pc {
            pc
        } else {
            pc.wrapping_sub(1)
        };
        (eval_lo..eval_hi).contains(&pc)
    };
    let (mut n, mut full) = (0, false);
    let unmatched = splice(native, is_eval, &w.slots[..w.len], cut, |s| {
        let word = match s {
            Spliced::Native(pc) => pc,
            Spliced::Python(slot) => name_slot(&layout, slot),
            Spliced::Truncated => names::TRUNCATED_WORD,
        };
        if n < out.len() {
            out[n] = word;
            n += 1;
        } else {
            full = true;
        }
    });
    UNMATCHED.fetch_add(unmatched as u64, Ordering::Relaxed);
    (n, full)
}

fn copy(native: &[u64], out: &mut [u64]) -> (usize, bool) {
    let n = native.len().min(out.len());
    out[..n].copy_from_slice(&native[..n]);
    (n, n < native.len())
}

/// The frame word of a slot: its code object's header read again (the
/// walk checked it a moment ago; a failure now leaves the frame unnamed).
fn name_slot(l: &Layout, slot: PyFrameSlot) -> u64 {
    let mut header = [0u8; 256];
    let len = l.o.code_adaptive as usize;
    if len > header.len() || !super::unwind::safe_read_bytes(slot.code as usize, &mut header[..len])
    {
        names::UNNAMED.fetch_add(1, Ordering::Relaxed);
        return names::UNNAMED_WORD;
    }
    names::frame_word(&l.o, slot.code, &header[..len], slot.instr_offset)
}
