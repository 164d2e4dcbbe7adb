//! The code after the `syscall` of glibc's `clone` and `clone3`, which no
//! FDE covers: glibc ends the function's FDE before the syscall, because
//! the new thread returns there on a stack of its own, and starts another
//! FDE (return address undefined) where the new thread goes on. Between
//! the two, a few instructions test rax: the caller returns, the new
//! thread jumps on. A sample there (the caller waits in the syscall while
//! the kernel creates the thread; the new thread's first instant) got no
//! row, and frame pointers lost the caller. `CFA_CLONE` rows decide as
//! that code does (see `profiler_common::unwind::CFA_CLONE`).
use profiler_common::unwind::{CFA_CLONE, CFA_END, CFA_RSP, RBP_SAME, UnwindRow};

/// The longest gap taken for one: `syscall; test; jl; jz; ret` is 10
/// bytes.
const GAP_MAX: u64 = 16;
/// `syscall`.
const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// Whether the code without CFI from `start` (its bytes: `code`) to `next`
/// is the return path of a clone syscall: the FDE that ends at `start`
/// (whose last row is `last`) ends with nothing pushed, the code begins
/// with `syscall`, and the FDE at `next` (first row `next_row`) is the new
/// thread's outermost frame.
pub fn is_clone_return(
    start: u64,
    code: &[u8],
    last: &UnwindRow,
    next: u64,
    next_row: &UnwindRow,
) -> bool {
    code.starts_with(&SYSCALL)
        && next > start
        && next - start <= GAP_MAX
        && last.kind() == CFA_RSP
        && last.cfa_offset() == 8
        && next_row.kind() == CFA_END
}

/// The row of such code.
pub fn clone_row() -> UnwindRow {
    UnwindRow::new(0, CFA_CLONE, 8, RBP_SAME, 0).expect("fits")
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{Frame, LeafRegs, Step, step};

    use super::*;

    #[test]
    fn glibc_clone3_return_path() {
        // libc 2.36: the FDE 0x1098c0..0x1098d7 (CFA rsp+8), syscall at
        // 0x1098d7, the new thread's FDE (ra undefined) from 0x1098e1.
        let code = [0x0f, 0x05, 0x48, 0x85, 0xc0, 0x7c, 0x18, 0x74, 0x01, 0xc3];
        let last = UnwindRow::new(0, CFA_RSP, 8, RBP_SAME, 0).unwrap();
        let end = UnwindRow {
            cfa_kind: CFA_END,
            ..UnwindRow::default()
        };
        assert!(is_clone_return(0x1098d7, &code, &last, 0x1098e1, &end));
        // Anything else is left without rows.
        let pushed = UnwindRow::new(0, CFA_RSP, 16, RBP_SAME, 0).unwrap();
        assert!(!is_clone_return(0x1098d7, &code, &pushed, 0x1098e1, &end));
        assert!(!is_clone_return(
            0x1098d7,
            &code[2..],
            &last,
            0x1098e1,
            &end
        ));
        assert!(!is_clone_return(0x1098d7, &code, &last, 0x109900, &end));
        assert!(!is_clone_return(0x1098d7, &code, &last, 0x1098e1, &last));
    }

    #[test]
    fn rax_tells_the_caller_from_the_new_thread() {
        let row = clone_row();
        let frame = Frame {
            pc: 0x1098d9,
            sp: 0x7000,
            bp: 0,
            bx: 0,
        };
        let leaf = |ax| LeafRegs {
            known: 1,
            ax,
            ..LeafRegs::UNKNOWN
        };
        let read = |addr: u64| (addr == 0x7000).then_some(0x4444);
        // The caller (in the syscall: -ENOSYS; after it: the new tid).
        match step(&row, &frame, Some(&leaf(-38i64 as u64)), read) {
            Step::Caller { frame, .. } => assert_eq!((frame.pc, frame.sp), (0x4444, 0x7008)),
            other => panic!("{other:?}"),
        }
        // The new thread.
        assert_eq!(step(&row, &frame, Some(&leaf(0)), read), Step::End);
        // Not the sampled frame: rax is unknown.
        assert_eq!(step(&row, &frame, None, read), Step::Unsupported);
    }
}
