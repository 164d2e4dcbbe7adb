//! Where a thread's Python frames go in its native stack, as `py-spy
//! --native` shows them: each native frame of the evaluation loop
//! (`_PyEval_EvalFrameDefault`) stands for the Python frames it ran and is
//! replaced by them; every other native frame stays. The one place for
//! these rules: the profiler splices named frames with it, libprofalloc.so's
//! in-process walker raw slots (allocation-free).
//!
//! The Python stack holds one marker at the outer end of each activation
//! (3.11: after a frame with `is_entry`; 3.12+: at the C-stack shim frame;
//! [`ACTIVATION_END`] in the walkers' slots), so it splits into
//! activations, innermost first, which pair with the evaluation-loop frames
//! of the native stack, innermost first.
#[cfg(test)]
use crate::python::NO_CODE_CHECK;
use crate::python::{ACTIVATION_END, PyFrameSlot};

/// Most parts [`EvalCode`] holds: the function and the parts the compiler
/// moved out of it (GCC makes one `.cold` part per function).
pub const EVAL_CODE_PARTS: usize = 4;

/// The machine code of the evaluation loop, `[start, end)` ranges in the
/// process: `_PyEval_EvalFrameDefault` from its symbol, and its cold parts,
/// which GCC places elsewhere in `.text` and which a stripped build names
/// nowhere. A native frame whose pc is in any of them is an activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalCode {
    parts: [(u64, u64); EVAL_CODE_PARTS],
    len: usize,
}

impl EvalCode {
    /// The code of `[start, end)` alone.
    pub fn new(start: u64, end: u64) -> Self {
        let mut code = Self::default();
        code.add(start, end);
        code
    }

    /// Adds part `[start, end)`; false (not added) when full.
    pub fn add(&mut self, start: u64, end: u64) -> bool {
        if self.len == EVAL_CODE_PARTS {
            return false;
        }
        self.parts[self.len] = (start, end);
        self.len += 1;
        true
    }

    /// The parts, the function's own first.
    pub fn parts(&self) -> &[(u64, u64)] {
        &self.parts[..self.len]
    }

    /// Whether `pc` is in one of the parts.
    pub fn contains(&self, pc: u64) -> bool {
        self.parts()
            .iter()
            .any(|&(start, end)| (start..end).contains(&pc))
    }

    /// The same code `bias` bytes further (from the object's addresses to
    /// the process's).
    pub fn moved(&self, bias: u64) -> Self {
        let mut out = *self;
        for part in &mut out.parts[..out.len] {
            *part = (part.0.wrapping_add(bias), part.1.wrapping_add(bias));
        }
        out
    }
}

/// One frame of the merged stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spliced<T> {
    /// Native frame `i`, kept.
    Native(usize),
    /// A Python frame, in place of native frame `at` (the native stack's
    /// length: after every native frame).
    Python { at: usize, frame: T },
    /// The Python walk did not reach the outermost frame: the marker goes
    /// at `at`, as for a Python frame.
    Truncated { at: usize },
}

/// Whether a walker's slot is an activation's end.
pub fn is_activation_end(slot: &PyFrameSlot) -> bool {
    slot.code == ACTIVATION_END
}

/// Calls `emit` with the merged stack, leaf first. `native_len` native
/// frames, leaf first; `is_eval(i)`: whether native frame `i` is an
/// evaluation-loop frame; `frames`: the Python stack, with the ends of its
/// activations (`is_end`); `cut`: the Python walk stopped early. An
/// activation without frames leaves its native frame; activations left
/// without an evaluation-loop frame (a cut native stack) go to the outer
/// end. Returns how many activations with frames found no evaluation-loop
/// frame.
pub fn splice<T: Copy>(
    native_len: usize,
    is_eval: impl Fn(usize) -> bool,
    frames: &[T],
    is_end: impl Fn(&T) -> bool,
    cut: bool,
    mut emit: impl FnMut(Spliced<T>),
) -> usize {
    let next_activation = |rest: &[T]| -> (usize, usize) {
        match rest.iter().position(&is_end) {
            Some(end) => (end, end + 1),
            None => (rest.len(), rest.len()),
        }
    };
    let mut rest = frames;
    let mut last_spliced_at_end = false;
    for i in 0..native_len {
        if !is_eval(i) || rest.is_empty() {
            emit(Spliced::Native(i));
            continue;
        }
        let (len, skip) = next_activation(rest);
        let group = &rest[..len];
        rest = &rest[skip..];
        if group.is_empty() {
            emit(Spliced::Native(i));
            continue;
        }
        group
            .iter()
            .for_each(|&frame| emit(Spliced::Python { at: i, frame }));
        if cut && rest.iter().all(&is_end) {
            // The cut is at the outer end of the last activation, when
            // every activation found its frame.
            emit(Spliced::Truncated { at: i });
            last_spliced_at_end = true;
        }
    }
    let mut unmatched = 0;
    while !rest.is_empty() {
        let (len, skip) = next_activation(rest);
        let group = &rest[..len];
        rest = &rest[skip..];
        unmatched += usize::from(!group.is_empty());
        group.iter().for_each(|&frame| {
            emit(Spliced::Python {
                at: native_len,
                frame,
            })
        });
    }
    if cut && !last_spliced_at_end {
        emit(Spliced::Truncated { at: native_len });
    }
    unmatched
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn slot(code: u64) -> PyFrameSlot {
        PyFrameSlot {
            code,
            instr_offset: 0,
            check: NO_CODE_CHECK,
        }
    }

    /// Native frames are 100+, Python frames their code, Truncated 0.
    fn merged(native: &[u64], eval: &[bool], codes: &[u64], cut: bool) -> (Vec<u64>, usize) {
        let slots: Vec<PyFrameSlot> = codes.iter().map(|&c| slot(c)).collect();
        let mut out = Vec::new();
        let unmatched = splice(
            native.len(),
            |i| eval[i],
            &slots,
            is_activation_end,
            cut,
            |s| {
                out.push(match s {
                    Spliced::Native(i) => native[i],
                    Spliced::Python { frame, .. } => frame.code,
                    Spliced::Truncated { .. } => 0,
                })
            },
        );
        (out, unmatched)
    }

    /// malloc <- bytearray <- EVAL <- call <- sorted <- EVAL <- main.
    #[test]
    fn each_activation_replaces_its_eval_frame_in_order() {
        let native = [100, 101, 102, 103, 104, 105, 106];
        let eval = [false, false, true, false, false, true, false];
        let (got, unmatched) = merged(&native, &eval, &[1, 2, 0, 3, 4, 0], false);
        assert_eq!(got, [100, 101, 1, 2, 103, 104, 3, 4, 106]);
        assert_eq!(unmatched, 0);
    }

    #[test]
    fn empty_activations_keep_their_frame_and_a_cut_is_marked() {
        let (got, _) = merged(&[100, 101, 102], &[true, true, false], &[0, 5], true);
        assert_eq!(got, [100, 5, 0, 102]);
    }

    #[test]
    fn eval_code_holds_its_parts_up_to_the_limit() {
        let mut code = EvalCode::new(0x1000, 0x2000);
        assert!(code.add(0x500, 0x510));
        assert!(code.contains(0x1fff) && code.contains(0x50f));
        assert!(!code.contains(0x2000) && !code.contains(0x510) && !code.contains(0x4ff));
        let moved = code.moved(0x10_0000);
        assert_eq!(
            moved.parts(),
            [(0x10_1000, 0x10_2000), (0x10_0500, 0x10_0510)]
        );
        while code.parts().len() < EVAL_CODE_PARTS {
            assert!(code.add(0, 1));
        }
        assert!(!code.add(0x9000, 0x9001));
        assert!(!code.contains(0x9000));
    }

    #[test]
    fn activations_without_eval_frames_go_to_the_outer_end_and_are_counted() {
        let (got, unmatched) = merged(&[100, 101, 102], &[true, false, false], &[1, 0, 2], true);
        assert_eq!(got, [1, 101, 102, 2, 0]);
        assert_eq!(unmatched, 1);
    }
}
