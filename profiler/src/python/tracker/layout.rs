//! The interpreter's layout as the kernel's Python walker reads it.
use profiler_common::python::{CHECK_BLOCK_WORDS, NO_FIELD, PyProcess};

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
    // The three name pointers in one read when they share a block.
    let names = [o.code_qualname, o.code_filename, o.code_linetable];
    let first = names.iter().copied().min().unwrap_or(0);
    let last = names.iter().copied().max().unwrap_or(0);
    let fits = names.iter().all(|n| n % 8 == first % 8)
        && last + 8 - first <= 8 * CHECK_BLOCK_WORDS as u64;
    let code_check_block = if fits { first } else { NO_FIELD };
    let word = |offset: u64| if fits { (offset - first) / 8 } else { 0 };
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
        code_check_block,
        check_qualname: word(o.code_qualname),
        check_filename: word(o.code_filename),
        check_linetable: word(o.code_linetable),
        code_firstlineno: o.code_firstlineno,
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::python::code_check;

    use super::*;
    use crate::python::offsets::{PY311, PY312, PY313_FOR_TESTS, PythonVersion};

    /// The kernel's block read gives the same check as reading the three
    /// pointers one by one, for each version's table.
    #[test]
    fn the_names_block_holds_the_three_pointers() {
        for offsets in [PY311, PY312, PY313_FOR_TESTS] {
            let py = Interpreter {
                object: "test".to_owned(),
                version: PythonVersion { hex: 0x030c_01f0 },
                runtime: 0,
                code_type: 0,
                offsets,
                eval_loop: profiler_common::python_splice::EvalCode::default(),
            };
            let p = kernel_layout(&py);
            assert_ne!(p.code_check_block, NO_FIELD);
            let at = |field: u64| p.code_check_block + 8 * field;
            assert_eq!(at(p.check_qualname), offsets.code_qualname);
            assert_eq!(at(p.check_filename), offsets.code_filename);
            assert_eq!(at(p.check_linetable), offsets.code_linetable);
            assert_eq!(p.code_firstlineno, offsets.code_firstlineno);
            assert_ne!(code_check(1, 2, 3, 4), code_check(1, 2, 3, 5));
        }
    }
}
