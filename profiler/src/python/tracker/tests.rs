use super::*;
use profiler_common::python::NO_FIELD;

use crate::python::offsets::{Offsets, PY311, PY313_FOR_TESTS, PythonVersion};

fn interpreter(hex: u32, offsets: Offsets) -> Interpreter {
    Interpreter {
        object: "test".to_owned(),
        version: PythonVersion { hex },
        runtime: 0,
        code_type: 0x5000,
        offsets,
        eval_loop: EvalCode::new(0x1000, 0x2000),
    }
}

#[test]
fn kernel_layout_marks_the_fields_a_version_lacks() {
    let k = kernel_layout(&interpreter(0x030b_07f0, PY311));
    assert_eq!((k.tstate_cframe, k.current_frame), (56, 8));
    assert_eq!(k.frame_is_entry, 68);
    assert_eq!(k.owner_cstack, NO_FIELD);
    assert_eq!(k.code_type, 0x5000);
    let k = kernel_layout(&interpreter(0x030d_00f0, PY313_FOR_TESTS));
    assert_eq!((k.tstate_cframe, k.current_frame), (NO_FIELD, 72));
    assert_eq!(k.frame_is_entry, NO_FIELD);
    assert_eq!(k.owner_cstack, 3);
    assert_eq!(k.code_adaptive, 200);
}

/// Return addresses are looked up one byte back (the call), the
/// sampled pc as it is: a call at the eval loop's last byte is in it,
/// a return address right after its end too, a pc there is not.
#[test]
fn eval_frames_are_found_by_address() {
    let named = NamedStack {
        activations: vec![vec![Frame::named("f")]],
        cut: false,
        eval_loop: EvalCode::new(0x1000, 0x2000),
        only_python: false,
    };
    let (splices, _) = named.splices(&[0x2000, 0x3000], true);
    assert_eq!(splices[0].at, 2, "a pc past the end is not the eval loop");
    let (splices, outcome) = named.splices(&[0x3000, 0x2000], true);
    assert_eq!((splices[0].at, outcome.unmatched), (1, 0));
}
