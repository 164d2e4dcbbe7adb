use std::collections::HashMap;

use profiler_common::{
    stack::{StackStatus, UserStack},
    stack_copy::COPY_ID_BIT,
};

use super::resolve_copied;
use crate::{
    profile::{Frame, Splice},
    python::tracker::NamedStack,
};

/// The evaluation loop's code in the test process.
const EVAL: (u64, u64) = (0x5000, 0x6000);
const ALLOC_SITE: u64 = 0x1010;
const IN_EVAL: u64 = 0x5100;
const MAIN: u64 = 0x2010;

fn user_stack(frames: &[u64], status: StackStatus) -> UserStack {
    let mut stack = UserStack::EMPTY;
    stack.ips[..frames.len()].copy_from_slice(frames);
    stack.len = frames.len() as u32;
    stack.status = status as u32;
    stack
}

/// A heap event whose native stack came from the copy path, recorded with
/// its Python frames under a combined id: the native half is unwound from
/// its copy, and the Python frames then replace the evaluation-loop frame
/// of the unwound stack, as for a stack walked at once. The kernel's own
/// walk (the frame-pointer prefix) stopped before the evaluation loop, so
/// merged into it the Python frames would have nowhere to go.
#[test]
fn the_python_frames_of_a_copied_stack_merge_into_its_unwound_stack() {
    let native = 42 | COPY_ID_BIT;
    let combined = 0x1234_5678;
    let other_combined = 0x8765_4321;
    let walked = user_stack(&[ALLOC_SITE], StackStatus::Truncated);
    let mut stacks = HashMap::from([(combined, walked), (other_combined, walked)]);
    let native_of = HashMap::from([(combined, native), (other_combined, native)]);
    let mut done = HashMap::new();
    let mut unwound = 0;
    resolve_copied(&mut stacks, &native_of, &mut done, |id, kernel| {
        assert_eq!(id, native, "the copy is looked up by the native id");
        assert_eq!(kernel, [ALLOC_SITE]);
        unwound += 1;
        Some((vec![ALLOC_SITE, IN_EVAL, MAIN], StackStatus::Complete))
    });
    assert_eq!(unwound, 1, "one copy, unwound once for both combined ids");
    for id in [combined, other_combined] {
        assert_eq!(stacks[&id].frames(), [ALLOC_SITE, IN_EVAL, MAIN]);
        assert_eq!(stacks[&id].status, StackStatus::Complete as u32);
    }

    let python = NamedStack {
        activations: vec![vec![Frame::named("grow"), Frame::named("main")]],
        cut: false,
        eval_loop: profiler_common::python_splice::EvalCode::new(EVAL.0, EVAL.1),
        only_python: false,
    };
    let (splices, outcome) = python.splices(stacks[&combined].frames(), false);
    assert_eq!(outcome.unmatched, 0);
    assert_eq!(
        splices,
        vec![Splice {
            at: 1,
            frames: vec![Frame::named("grow"), Frame::named("main")],
        }]
    );
    // Merged into the kernel's prefix instead, the activation finds no
    // evaluation-loop frame: what happened before this was resolved.
    let (_, outcome) = python.splices(&[ALLOC_SITE], false);
    assert_eq!(outcome.unmatched, 1);
}

/// Native ids are resolved by their own copy bit, and stacks that were not
/// copied are left alone.
#[test]
fn native_ids_resolve_by_their_own_copy_bit() {
    let copied = 7 | COPY_ID_BIT;
    let walked_at_once = 8;
    let stack = user_stack(&[ALLOC_SITE], StackStatus::Complete);
    let mut stacks = HashMap::from([(copied, stack), (walked_at_once, stack)]);
    resolve_copied(
        &mut stacks,
        &HashMap::new(),
        &mut HashMap::new(),
        |id, _| {
            assert_eq!(id, copied);
            Some((vec![ALLOC_SITE, MAIN], StackStatus::Complete))
        },
    );
    assert_eq!(stacks[&copied].frames(), [ALLOC_SITE, MAIN]);
    assert_eq!(stacks[&walked_at_once].frames(), [ALLOC_SITE]);
}
