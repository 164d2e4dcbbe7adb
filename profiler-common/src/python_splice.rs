//! Where a thread's Python frames go in its native stack, as `py-spy
//! --native` shows them: each native frame of the evaluation loop
//! (`_PyEval_EvalFrameDefault`) stands for the Python frames it ran and is
//! replaced by them; every other native frame stays. Allocation-free, for
//! libprofalloc.so's in-process walker (the profiler's `python::merge`
//! follows the same rules on named frames).
//!
//! The Python stack holds one [`ACTIVATION_END`] marker at the outer end of
//! each activation (3.11: after a frame with `is_entry`; 3.12+: at the
//! C-stack shim frame), so it splits into activations, innermost first,
//! which pair with the evaluation-loop frames of the native stack,
//! innermost first.
use crate::python::{ACTIVATION_END, PyFrameSlot};

/// One frame of the merged stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spliced {
    Native(u64),
    Python(PyFrameSlot),
    /// The Python walk did not reach the outermost frame.
    Truncated,
}

/// Calls `emit` with the merged stack, leaf first. `native`: the native
/// frames, leaf first; `is_eval(i)`: whether `native[i]` is an
/// evaluation-loop frame; `slots`: the Python stack with its markers;
/// `cut`: the Python walk stopped early. An activation without frames
/// leaves its native frame; activations left without an evaluation-loop
/// frame (a cut native stack) go to the outer end. Returns how many
/// activations with frames found no evaluation-loop frame.
pub fn splice(
    native: &[u64],
    is_eval: impl Fn(usize) -> bool,
    slots: &[PyFrameSlot],
    cut: bool,
    mut emit: impl FnMut(Spliced),
) -> usize {
    let mut rest = slots;
    let mut last_spliced_at_end = false;
    for (i, &pc) in native.iter().enumerate() {
        if !is_eval(i) || rest.is_empty() {
            emit(Spliced::Native(pc));
            continue;
        }
        let (group, after) = next_activation(rest);
        rest = after;
        if group.is_empty() {
            emit(Spliced::Native(pc));
            continue;
        }
        group.iter().for_each(|&s| emit(Spliced::Python(s)));
        if rest.iter().all(|s| s.code == ACTIVATION_END) && cut {
            // The cut is at the outer end of the last activation, when
            // every activation found its frame.
            emit(Spliced::Truncated);
            last_spliced_at_end = true;
        }
    }
    let mut unmatched = 0;
    while !rest.is_empty() {
        let (group, after) = next_activation(rest);
        rest = after;
        unmatched += usize::from(!group.is_empty());
        group.iter().for_each(|&s| emit(Spliced::Python(s)));
    }
    if cut && !last_spliced_at_end {
        emit(Spliced::Truncated);
    }
    unmatched
}

/// The frames of the first activation and the slots after its marker.
fn next_activation(slots: &[PyFrameSlot]) -> (&[PyFrameSlot], &[PyFrameSlot]) {
    match slots.iter().position(|s| s.code == ACTIVATION_END) {
        Some(end) => (&slots[..end], &slots[end + 1..]),
        None => (slots, &[]),
    }
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
            _pad: 0,
        }
    }

    /// Native frames are 100+, Python frames their code, Truncated 0.
    fn merged(native: &[u64], eval: &[bool], codes: &[u64], cut: bool) -> (Vec<u64>, usize) {
        let slots: Vec<PyFrameSlot> = codes.iter().map(|&c| slot(c)).collect();
        let mut out = Vec::new();
        let unmatched = splice(
            native,
            |i| eval[i],
            &slots,
            cut,
            |s| {
                out.push(match s {
                    Spliced::Native(pc) => pc,
                    Spliced::Python(s) => s.code,
                    Spliced::Truncated => 0,
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
    fn activations_without_eval_frames_go_to_the_outer_end_and_are_counted() {
        let (got, unmatched) = merged(&[100, 101, 102], &[true, false, false], &[1, 0, 2], true);
        assert_eq!(got, [1, 101, 102, 2, 0]);
        assert_eq!(unmatched, 1);
    }
}
