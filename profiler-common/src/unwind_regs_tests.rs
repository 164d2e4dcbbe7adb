use super::*;
use crate::unwind::step;

const LEAF: LeafRegs = LeafRegs {
    known: 1,
    di: 0x5000,
    dx: 0x40_1234,
    r8: 0x7f00,
    r9: 0x7f40,
    r11: 0x6000,
    ax: 0x1234,
};

/// glibc's `__longjmp` after the registers were loaded: CFA = rdi, pc in
/// rdx, rsp in r8, rbp in r9, rbx at CFA + 0 (the jmp_buf).
fn longjmp_row() -> UnwindRow {
    UnwindRow::regs(
        0x63,
        REG_RDI,
        0,
        [
            source(SRC_REG, REG_RDX as i8),
            source(SRC_REG, REG_R8 as i8),
            source(SRC_REG, REG_R9 as i8),
            source(SRC_AT, 0),
        ],
    )
    .unwrap()
}

#[test]
fn fields_round_trip() {
    let row = longjmp_row();
    assert_eq!(row.kind(), CFA_REGS);
    assert_eq!(row.regs_base(), REG_RDI);
    assert_eq!(row.cfa_offset(), 0);
    assert_eq!(row.pc_low, 0x63);
    assert_eq!(row.source(TO_PC), SRC_REG | REG_RDX);
    assert_eq!(row.source(TO_SP), SRC_REG | REG_R8);
    assert_eq!(row.source(TO_BP), SRC_REG | REG_R9);
    assert_eq!(row.source(TO_BX), SRC_AT);
    assert!(row.needs_leaf());
    assert!(row.may_switch_stacks());
    // Base r9 sets the bit that means "scaled offset" in other rows.
    let r9 = UnwindRow::regs(0, REG_R9, -16, [SRC_CFA; 4]).unwrap();
    assert_eq!((r9.regs_base(), r9.cfa_offset()), (REG_R9, -16));
    // Only rsp, rbp and rbx: evaluable at any frame.
    let plain = UnwindRow::regs(
        0,
        REG_RSP,
        8,
        [
            source(SRC_AT, -1),
            SRC_CFA,
            SRC_REG | REG_RBP,
            SRC_REG | REG_RBX,
        ],
    )
    .unwrap();
    assert!(!plain.needs_leaf());
    assert_eq!(UnwindRow::regs(0, 16, 0, [SRC_CFA; 4]), None);
    assert_eq!(UnwindRow::regs(0, REG_RSP, 1 << 15, [SRC_CFA; 4]), None);
}

#[test]
fn longjmp_at_the_sampled_frame_goes_to_the_setjmp_caller() {
    let frame = Frame {
        pc: 0x3be63,
        sp: 0x6000,
        bp: 1,
        bx: 2,
    };
    let step = step(&longjmp_row(), &frame, Some(&LEAF), |a| {
        (a == 0x5000).then_some(0x77)
    });
    assert_eq!(
        step,
        Step::Caller {
            frame: Frame {
                pc: 0x40_1234,
                sp: 0x7f00,
                bp: 0x7f40,
                bx: 0x77,
            },
            exact: false,
        }
    );
}

#[test]
fn leaf_registers_elsewhere_are_unsupported_not_guessed() {
    let frame = Frame {
        pc: 0x3be63,
        sp: 0x6000,
        bp: 1,
        bx: 2,
    };
    assert_eq!(step(&longjmp_row(), &frame, None, Some), Step::Unsupported);
    // Registers marked unknown are not used either.
    assert_eq!(LeafRegs::UNKNOWN.if_known(), None);
    // vfork's rows: CFA = rsp + 8, pc in rdi.
    let vfork = UnwindRow::regs(
        0,
        REG_RSP,
        8,
        [
            source(SRC_REG, REG_RDI as i8),
            SRC_CFA,
            SRC_REG | REG_RBP,
            SRC_REG | REG_RBX,
        ],
    )
    .unwrap();
    assert_eq!(step(&vfork, &frame, None, Some), Step::Unsupported);
    let Step::Caller { frame: caller, .. } = step(&vfork, &frame, LEAF.if_known(), Some) else {
        panic!("vfork at the sampled frame unwinds")
    };
    assert_eq!(
        (caller.pc, caller.sp, caller.bp, caller.bx),
        (0x5000, 0x6008, 1, 2)
    );
}

#[test]
fn setcontext_reads_the_context_and_reports_failed_reads() {
    // CFA = rdx + 184; pc, rsp, rbp, rbx at slots -2, -3, -8, -7 (the
    // ucontext_t's rip, rsp, rbp, rbx at +168, +160, +120, +128).
    let row = UnwindRow::regs(
        0,
        REG_RDX,
        184,
        [
            source(SRC_AT, -2),
            source(SRC_AT, -3),
            source(SRC_AT, -8),
            source(SRC_AT, -7),
        ],
    )
    .unwrap();
    let ctx = LEAF.dx;
    let frame = Frame {
        pc: 0x41015,
        sp: 0x6000,
        bp: 0,
        bx: 0,
    };
    let read = |a: u64| Some(a - ctx);
    let Step::Caller { frame: caller, .. } = step(&row, &frame, Some(&LEAF), read) else {
        panic!("setcontext unwinds")
    };
    assert_eq!(
        (caller.pc, caller.sp, caller.bp, caller.bx),
        (168, 160, 120, 128)
    );
    assert_eq!(step(&row, &frame, Some(&LEAF), |_| None), Step::ReadFailed);
}

/// rustc's inlined stack probe (`mov %rsp,%r11; sub $0x83000,%r11`, then
/// one page at a time down to r11): CFA = r11 + 536632, beyond the i16
/// offsets, with six registers pushed and none of them saved yet.
#[test]
fn stack_probe_rows_take_the_cfa_from_r11() {
    use crate::unwind::{CFA_R11, RBP_SAME};
    let row = UnwindRow::new(0, CFA_R11, 536_632, RBP_SAME, 0).expect("fits");
    assert!(row.needs_leaf());
    assert_eq!(row.cfa_offset(), 536_632);
    let r11 = 0x7000_0000u64;
    let cfa = r11 + 536_632;
    let frame = Frame {
        pc: 0x1000,
        sp: r11 + 0x1000,
        bp: 0x77,
        bx: 0x88,
    };
    let leaf = LeafRegs { r11, ..LEAF };
    let read = |addr: u64| (addr == cfa - 8).then_some(0x4242);
    match step(&row, &frame, Some(&leaf), read) {
        Step::Caller { frame: caller, .. } => {
            assert_eq!(
                (caller.pc, caller.sp, caller.bp, caller.bx),
                (0x4242, cfa, 0x77, 0x88)
            );
        }
        other => panic!("{other:?}"),
    }
    // Beyond the sampled frame, r11 is unknown.
    assert_eq!(step(&row, &frame, None, read), Step::Unsupported);
}
