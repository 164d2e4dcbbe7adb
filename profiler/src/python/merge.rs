//! Splicing Python frames into a native stack, as `py-spy --native` shows
//! them: each native frame of the evaluation loop (`_PyEval_EvalFrameDefault`)
//! stands for the Python frames it ran, and is replaced by them; every other
//! native frame stays (C extensions and the allocator above, `main` and
//! `Py_RunMain` below, C between two activations: `list.sort` calling a
//! `key=` function).
//!
//! The rules are [`profiler_common::python_splice`]'s, shared with
//! libprofalloc.so's in-process walker; this names the frames first.
use profiler_common::{
    python::{ACTIVATION_END, PY_STACK_BROKEN, PY_STACK_COMPLETE, PY_STACK_TRUNCATED, PyFrameSlot},
    python_splice::{Spliced, splice},
};

use super::stack::RawFrame;
use crate::profile::{Frame, RawSample, Splice, StackStatus};

/// Marker of a Python stack cut at the walker's limit or by a frame that
/// could not be read.
pub const PYTHON_TRUNCATED: &str = "[python truncated]";

/// The frames of each activation, innermost activation first. Frames after
/// the last marker (a walk that did not reach an activation's end) form a
/// last group.
pub fn activations(slots: &[PyFrameSlot]) -> Vec<Vec<RawFrame>> {
    let mut groups = vec![Vec::new()];
    for slot in slots {
        if slot.code == ACTIVATION_END {
            groups.push(Vec::new());
        } else if let Some(group) = groups.last_mut() {
            group.push(RawFrame {
                code: slot.code,
                instr_offset: slot.instr_offset,
                check: slot.check,
            });
        }
    }
    if groups.last().is_some_and(Vec::is_empty) {
        groups.pop();
    }
    groups
}

/// Whether a walk status means frames are missing at the outer end.
pub fn is_cut(status: u32) -> bool {
    matches!(status, PY_STACK_TRUNCATED | PY_STACK_BROKEN) || status > PY_STACK_BROKEN
}

/// How a merge went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Activations without an evaluation-loop frame to replace (the native
    /// stack was cut, or its walk missed them): their frames go to the
    /// outer end.
    pub unmatched: usize,
}

/// The splices that put `activations` (named, innermost first) into
/// `native` (leaf first; `is_eval(i)` says whether `native[i]` is an
/// evaluation-loop frame), by the rules of
/// [`profiler_common::python_splice`]. `cut`: the Python walk did not
/// reach the outermost frame, so the last frames are followed by
/// [`PYTHON_TRUNCATED`]. An empty activation leaves its native frame.
pub fn splices(
    native_len: usize,
    is_eval: impl Fn(usize) -> bool,
    activations: Vec<Vec<Frame>>,
    cut: bool,
) -> (Vec<Splice>, MergeOutcome) {
    // The activations as one stack, each closed by an end (None).
    let frames: Vec<Option<&Frame>> = activations
        .iter()
        .flat_map(|group| group.iter().map(Some).chain([None]))
        .collect();
    let truncated = Frame::named(PYTHON_TRUNCATED);
    let mut out: Vec<Splice> = Vec::new();
    let mut put = |at: usize, frame: &Frame| match out.last_mut() {
        Some(last) if last.at == at => last.frames.push(frame.clone()),
        _ => out.push(Splice {
            at,
            frames: vec![frame.clone()],
        }),
    };
    let unmatched = splice(
        native_len,
        is_eval,
        &frames,
        Option::is_none,
        cut,
        |s| match s {
            Spliced::Native(_) => {}
            Spliced::Python { at, frame } => put(at, frame.expect("ends are not emitted")),
            Spliced::Truncated { at } => put(at, &truncated),
        },
    );
    (out, MergeOutcome { unmatched })
}

/// `--python-frames python`: a sample that has Python frames keeps those
/// only, in order (py-spy's view without `--native`); its native and
/// kernel frames go, and with them the native walk's status (a Python
/// stack cut short says so itself, `[python truncated]`). A sample without
/// Python frames (a thread that ran no Python code, another program) keeps
/// its native stack: nothing is dropped unseen.
pub fn keep_python_only(sample: &mut RawSample) {
    if sample.splices.iter().all(|s| s.frames.is_empty()) {
        return;
    }
    sample.user.clear();
    sample.kernel.clear();
    sample.leaf_is_pc = false;
    sample.user_status = StackStatus::Complete;
    let frames = sample.splices.drain(..).flat_map(|s| s.frames).collect();
    sample.splices = vec![Splice { at: 0, frames }];
}

/// True when the status is one the walker writes.
pub fn known_status(status: u32) -> bool {
    matches!(
        status,
        PY_STACK_COMPLETE | PY_STACK_TRUNCATED | PY_STACK_BROKEN
    )
}

#[cfg(test)]
mod tests {
    use profiler_common::python::NO_CODE_CHECK;

    use super::*;

    fn slot(code: u64) -> PyFrameSlot {
        PyFrameSlot {
            code,
            instr_offset: code as u32 * 2,
            check: NO_CODE_CHECK,
        }
    }

    fn named(names: &[&str]) -> Vec<Frame> {
        names.iter().map(|n| Frame::named(*n)).collect()
    }

    #[test]
    fn markers_split_the_stack_into_activations() {
        let slots = [slot(1), slot(2), slot(0), slot(3), slot(0), slot(0)];
        let got = activations(&slots);
        let codes: Vec<Vec<u64>> = got
            .iter()
            .map(|g| g.iter().map(|f| f.code).collect())
            .collect();
        assert_eq!(codes, vec![vec![1, 2], vec![3], vec![]]);
        assert_eq!(got[0][1].instr_offset, 4);
        // A walk cut inside an activation keeps its frames as a last group.
        let codes: Vec<usize> = activations(&[slot(1), slot(0), slot(2)])
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(codes, vec![1, 1]);
    }

    /// malloc <- bytearray <- EVAL <- call <- sorted <- EVAL <- main.
    #[test]
    fn each_activation_replaces_its_eval_frame_in_order() {
        let eval = [false, false, true, false, false, true, false];
        let (got, outcome) = splices(
            eval.len(),
            |i| eval[i],
            vec![named(&["key", "sort_them"]), named(&["main", "<module>"])],
            false,
        );
        assert_eq!(outcome.unmatched, 0);
        assert_eq!(
            got,
            vec![
                Splice {
                    at: 2,
                    frames: named(&["key", "sort_them"])
                },
                Splice {
                    at: 5,
                    frames: named(&["main", "<module>"])
                },
            ]
        );
    }

    #[test]
    fn empty_activations_keep_their_frame_and_a_cut_is_marked() {
        let eval = [true, true];
        let (got, _) = splices(2, |i| eval[i], vec![vec![], named(&["f"])], true);
        assert_eq!(
            got,
            vec![Splice {
                at: 1,
                frames: named(&["f", PYTHON_TRUNCATED])
            }]
        );
    }

    #[test]
    fn python_only_keeps_the_python_frames_in_order() {
        let mut sample = RawSample {
            user: vec![1, 2, 3, 4],
            kernel: vec![9],
            leaf_is_pc: true,
            user_status: StackStatus::Truncated,
            splices: vec![
                Splice {
                    at: 1,
                    frames: named(&["key", "sort_them"]),
                },
                Splice {
                    at: 3,
                    frames: named(&["main", PYTHON_TRUNCATED]),
                },
            ],
            ..RawSample::default()
        };
        keep_python_only(&mut sample);
        assert!(sample.user.is_empty() && sample.kernel.is_empty());
        assert_eq!(sample.user_status, StackStatus::Complete);
        assert_eq!(
            sample.splices,
            [Splice {
                at: 0,
                frames: named(&["key", "sort_them", "main", PYTHON_TRUNCATED])
            }]
        );
        // No Python frames: the native stack stays as it was.
        let mut native = RawSample {
            user: vec![1, 2],
            kernel: vec![9],
            user_status: StackStatus::Truncated,
            ..RawSample::default()
        };
        keep_python_only(&mut native);
        assert_eq!(
            (native.user.len(), native.kernel.len(), native.user_status),
            (2, 1, StackStatus::Truncated)
        );
    }

    #[test]
    fn activations_without_eval_frames_go_to_the_outer_end_and_are_counted() {
        let (got, outcome) = splices(3, |i| i == 0, vec![named(&["a"]), named(&["b"])], false);
        assert_eq!(outcome.unmatched, 1);
        assert_eq!(
            got,
            vec![
                Splice {
                    at: 0,
                    frames: named(&["a"])
                },
                Splice {
                    at: 3,
                    frames: named(&["b"])
                },
            ]
        );
    }
}
