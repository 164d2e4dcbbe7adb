//! The interpreter's layout as the kernel's Python walker reads it.
use profiler_common::python::{NO_FIELD, PyProcess};

use crate::python::{
    discover::Interpreter,
    offsets::{FrameAnchor, Offsets},
};

/// The kernel's view of an interpreter's layout.
pub fn kernel_layout(py: &Interpreter) -> PyProcess {
    let o: &Offsets = &py.offsets;
    let (tstate_cframe, current_frame) = match o.tstate_frame {
        FrameAnchor::ThroughCFrame {
            cframe,
            current_frame,
        } => (cframe, current_frame),
        FrameAnchor::Direct { current_frame } => (NO_FIELD, current_frame),
    };
    PyProcess {
        tstate_cframe,
        current_frame,
        frame_code: o.frame_code,
        frame_previous: o.frame_previous,
        frame_instr: o.frame_instr,
        frame_owner: o.frame_owner,
        frame_is_entry: o.frame_is_entry.unwrap_or(NO_FIELD),
        owner_cstack: o.owner_cstack.map_or(NO_FIELD, u64::from),
        owner_generator: u64::from(o.owner_generator),
        object_type: o.object_type,
        var_object_size: o.var_object_size,
        code_adaptive: o.code_adaptive,
        code_firsttraceable: o.code_firsttraceable,
        code_type: py.code_type,
        gil_locked: 0,
        gil_holder: 0,
        gil_only: 0,
    }
}
