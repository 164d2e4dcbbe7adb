//! A Python stack read from the kernel's map with its frames named, and
//! how it is spliced into the native stack it was taken with.
use std::collections::HashMap;

use profiler_common::{python::PyPair, python_splice::EvalCode};

use crate::{
    profile::{Frame, RawSample, Splice},
    python::merge,
};

/// A Python stack with its frames named, ready to be spliced into the
/// native stack it was taken with.
#[derive(Clone, Debug, Default)]
pub struct NamedStack {
    /// Innermost activation first, each innermost frame first.
    pub activations: Vec<Vec<Frame>>,
    /// Frames are missing at the outer end (`[python truncated]`).
    pub cut: bool,
    /// The interpreter's `_PyEval_EvalFrameDefault` (and its cold parts)
    /// in its process.
    pub eval_loop: EvalCode,
    /// `--python-frames python`: the sample keeps its Python frames only.
    pub only_python: bool,
}

impl NamedStack {
    /// Puts these Python frames into `sample` (its native stack already
    /// there), then, with `--python-frames python`, leaves out the native
    /// frames of a sample that has Python frames.
    pub fn merge_into(&self, sample: &mut RawSample) -> merge::MergeOutcome {
        let (splices, outcome) = self.splices(&sample.user, sample.leaf_is_pc);
        sample.splices = splices;
        if self.only_python {
            merge::keep_python_only(sample);
        }
        outcome
    }

    /// The splices into native stack `user` (leaf first; `leaf_is_pc`:
    /// `user[0]` is a pc, not a return address).
    pub fn splices(&self, user: &[u64], leaf_is_pc: bool) -> (Vec<Splice>, merge::MergeOutcome) {
        let is_eval = |i: usize| {
            let lookup = if i == 0 && leaf_is_pc {
                user[i]
            } else {
                user[i].wrapping_sub(1)
            };
            self.eval_loop.contains(lookup)
        };
        merge::splices(user.len(), is_eval, self.activations.clone(), self.cut)
    }
}

/// Heap: per combined stack id, its native and Python stacks, the Python
/// one named.
pub type PairStacks = HashMap<u64, (PyPair, NamedStack)>;
