//! The Python frames of one thread, walked from user space: from the
//! thread state's current `_PyInterpreterFrame` through `previous`, each
//! frame reduced to (code object address, instruction offset). This is the
//! reference for the kernel-side walker: same reads, same checks, same
//! bounds.
//!
//! Every pointer is checked before use, a code pointer must point at an
//! object whose type is `PyCode_Type`, and an instruction pointer must lie
//! inside its code: the target keeps running while it is read, so a frame
//! that fails a check ends the walk instead of producing a garbage frame.
use profiler_common::python::NO_CODE_CHECK;

use super::{
    discover::Interpreter,
    memory::{Memory, ReadError, check_pointer},
    offsets::FrameAnchor,
};

/// Frames walked at most.
pub const MAX_DEPTH: usize = 128;

/// One Python frame: what the kernel will record per frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// Address of the `PyCodeObject`.
    pub code: u64,
    /// Byte offset of the current instruction from the code's first one.
    pub instr_offset: u32,
    /// The code object's check when the frame was recorded
    /// (`profiler_common::python::code_check`, or `NO_CODE_CHECK`).
    pub check: u32,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// Reached the outermost frame.
    Complete,
    /// Stopped at [`MAX_DEPTH`] frames.
    DepthLimit,
    /// A read failed (the memory changed or was freed under the reader).
    ReadFailed(ReadError),
    /// A frame's code pointer is not a code object, or its instruction is
    /// outside its code.
    BadFrame { frame: u64 },
}

/// The Python stack of one thread, innermost frame first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub frames: Vec<RawFrame>,
    /// Shim frames that stand for C code calling into Python (3.12+).
    pub cstack_frames: u32,
    /// Frames that have not finished their prologue (no line yet).
    pub incomplete_frames: u32,
    pub end: WalkEnd,
}

/// Walks the frames of the thread whose `PyThreadState` is at `tstate`.
pub fn walk(memory: &impl Memory, py: &Interpreter, tstate: u64) -> RawStack {
    let mut stack = RawStack {
        frames: Vec::new(),
        cstack_frames: 0,
        incomplete_frames: 0,
        end: WalkEnd::Complete,
    };
    let mut frame = match current_frame(memory, py, tstate) {
        Ok(frame) => frame,
        Err(err) => {
            stack.end = WalkEnd::ReadFailed(err);
            return stack;
        }
    };
    let mut visited = 0;
    while frame != 0 {
        if visited == MAX_DEPTH {
            stack.end = WalkEnd::DepthLimit;
            break;
        }
        visited += 1;
        match step(memory, py, frame, &mut stack) {
            Ok(previous) => frame = previous,
            Err(end) => {
                stack.end = end;
                break;
            }
        }
    }
    stack
}

/// The innermost frame of a thread (0: the thread runs no Python code).
fn current_frame(memory: &impl Memory, py: &Interpreter, tstate: u64) -> Result<u64, ReadError> {
    check_pointer(tstate, 8)?;
    match py.offsets.tstate_frame {
        FrameAnchor::ThroughCFrame {
            cframe,
            current_frame,
        } => {
            let cframe = memory.read_u64(tstate + cframe)?;
            if cframe == 0 {
                return Ok(0);
            }
            check_pointer(cframe, 8)?;
            memory.read_u64(cframe + current_frame)
        }
        FrameAnchor::Direct { current_frame } => memory.read_u64(tstate + current_frame),
    }
}

/// Records the frame at `frame` into `stack` and returns the previous one.
fn step(
    memory: &impl Memory,
    py: &Interpreter,
    frame: u64,
    stack: &mut RawStack,
) -> Result<u64, WalkEnd> {
    let o = &py.offsets;
    let read = |address| memory.read_u64(address).map_err(WalkEnd::ReadFailed);
    check_pointer(frame, 8).map_err(WalkEnd::ReadFailed)?;
    let previous = read(frame + o.frame_previous)?;
    let mut owner = [0u8];
    memory
        .read(frame + o.frame_owner, &mut owner)
        .map_err(WalkEnd::ReadFailed)?;
    if Some(owner[0]) == o.owner_cstack {
        stack.cstack_frames += 1;
        return Ok(previous);
    }
    let code = read(frame + o.frame_code)?;
    let bad = WalkEnd::BadFrame { frame };
    if check_pointer(code, 8).is_err() || read(code + o.object_type)? != py.code_type {
        return Err(bad);
    }
    // Size in code units of two bytes.
    let units = read(code + o.var_object_size)?;
    let first = code + o.code_adaptive;
    let instr = read(frame + o.frame_instr)?;
    // 3.11/3.12 point one unit before the first instruction until the
    // frame starts: that frame is incomplete, not garbage.
    let before_start = instr.wrapping_add(2) == first;
    if !before_start && (instr < first || instr >= first.saturating_add(units.saturating_mul(2))) {
        return Err(bad);
    }
    let firsttraceable = memory
        .read_u32(code + o.code_firsttraceable)
        .map_err(WalkEnd::ReadFailed)?;
    let incomplete = owner[0] != o.owner_generator
        && (before_start || instr < first + u64::from(firsttraceable) * 2);
    if incomplete {
        stack.incomplete_frames += 1;
        return Ok(previous);
    }
    stack.frames.push(RawFrame {
        code,
        instr_offset: u32::try_from(instr - first).map_err(|_| bad)?,
        check: NO_CODE_CHECK,
    });
    Ok(previous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{
        memory::fake::FakeMemory,
        offsets::{PY313_FOR_TESTS, PythonVersion},
    };

    const CODE_TYPE: u64 = 0x5000;
    const TSTATE: u64 = 0x10_0000;
    const CODE_A: u64 = 0x20_0000;
    const CODE_B: u64 = 0x21_0000;

    fn interpreter() -> Interpreter {
        Interpreter {
            object: "test".to_owned(),
            version: PythonVersion { hex: 0x030d_00f0 },
            runtime: 0,
            code_type: CODE_TYPE,
            offsets: PY313_FOR_TESTS,
            eval_loop: profiler_common::python_splice::EvalCode::default(),
        }
    }

    /// A code object of 3.13's layout: type at 8, size at 16, first
    /// traceable unit at 184, instructions from 200.
    fn code(m: &mut FakeMemory, at: u64, units: u64, firsttraceable: u32) {
        let mut bytes = vec![0u8; 200 + units as usize * 2];
        bytes[8..16].copy_from_slice(&CODE_TYPE.to_le_bytes());
        bytes[16..24].copy_from_slice(&units.to_le_bytes());
        bytes[184..188].copy_from_slice(&firsttraceable.to_le_bytes());
        m.put(at, &bytes);
    }

    /// A 3.13 frame: executable at 0, previous at 8, instr_ptr at 56,
    /// owner at 70.
    fn frame(m: &mut FakeMemory, at: u64, code: u64, previous: u64, instr: u64, owner: u8) {
        let mut bytes = vec![0u8; 80];
        bytes[0..8].copy_from_slice(&code.to_le_bytes());
        bytes[8..16].copy_from_slice(&previous.to_le_bytes());
        bytes[56..64].copy_from_slice(&instr.to_le_bytes());
        bytes[70] = owner;
        m.put(at, &bytes);
    }

    fn image() -> FakeMemory {
        let mut m = FakeMemory::default();
        code(&mut m, CODE_A, 50, 2);
        code(&mut m, CODE_B, 50, 0);
        m.put_u64s(TSTATE + 72, &[0x30_0000]);
        frame(&mut m, 0x30_0000, CODE_A, 0x30_1000, CODE_A + 200 + 20, 0);
        // Incomplete: before the first traceable unit.
        frame(&mut m, 0x30_1000, CODE_A, 0x30_2000, CODE_A + 200 + 2, 0);
        // C-stack shim: its code is not even looked at.
        frame(&mut m, 0x30_2000, 0, 0x30_3000, 0, 3);
        // A generator frame is complete whatever its position.
        frame(&mut m, 0x30_3000, CODE_B, 0, CODE_B + 200 + 6, 1);
        m
    }

    #[test]
    fn walks_frames_and_counts_the_skipped_ones() {
        let stack = walk(&image(), &interpreter(), TSTATE);
        assert_eq!(
            stack.frames,
            [
                RawFrame {
                    code: CODE_A,
                    instr_offset: 20,
                    check: NO_CODE_CHECK,
                },
                RawFrame {
                    code: CODE_B,
                    instr_offset: 6,
                    check: NO_CODE_CHECK,
                },
            ]
        );
        assert_eq!((stack.cstack_frames, stack.incomplete_frames), (1, 1));
        assert_eq!(stack.end, WalkEnd::Complete);
    }

    #[test]
    fn a_non_code_object_ends_the_walk() {
        let mut m = image();
        frame(&mut m, 0x30_1000, CODE_A + 8, 0, CODE_A + 210, 0);
        let stack = walk(&m, &interpreter(), TSTATE);
        assert_eq!(stack.frames.len(), 1);
        assert_eq!(stack.end, WalkEnd::BadFrame { frame: 0x30_1000 });
    }

    #[test]
    fn an_instruction_outside_the_code_ends_the_walk() {
        let mut m = image();
        frame(&mut m, 0x30_0000, CODE_A, 0, CODE_A + 200 + 100, 0);
        let stack = walk(&m, &interpreter(), TSTATE);
        assert!(stack.frames.is_empty());
        assert_eq!(stack.end, WalkEnd::BadFrame { frame: 0x30_0000 });
    }

    #[test]
    fn an_unreadable_frame_ends_the_walk_and_a_cycle_hits_the_bound() {
        let mut m = image();
        frame(&mut m, 0x30_0000, CODE_A, 0x40_0000, CODE_A + 220, 0);
        let stack = walk(&m, &interpreter(), TSTATE);
        assert_eq!(stack.frames.len(), 1);
        assert!(
            matches!(stack.end, WalkEnd::ReadFailed(_)),
            "{:?}",
            stack.end
        );
        frame(&mut m, 0x30_0000, CODE_A, 0x30_0000, CODE_A + 220, 0);
        let stack = walk(&m, &interpreter(), TSTATE);
        assert_eq!(stack.frames.len(), MAX_DEPTH);
        assert_eq!(stack.end, WalkEnd::DepthLimit);
    }
}
