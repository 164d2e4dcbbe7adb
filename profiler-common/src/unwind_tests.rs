use super::*;

#[test]
fn keys_are_big_endian() {
    let k = MappingKey::new(0x01020304, 0x1122334455667788);
    // SAFETY: MappingKey is repr(C) of three u32, 12 bytes, no padding.
    let bytes: [u8; 12] = unsafe { core::mem::transmute(k) };
    assert_eq!(
        bytes,
        [1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
    );
}

#[test]
fn step_rsp_and_saved_rbp() {
    let row = UnwindRow::new(0, CFA_RSP, 24, RBP_OFFSET, -24).unwrap();
    let frame = Frame {
        pc: 0x1000,
        sp: 0x7000,
        bp: 1,
        bx: 0,
    };
    let step = step(&row, &frame, None, |a| match a {
        0x7010 => Some(0x4242),
        0x7000 => Some(0x7100),
        _ => None,
    });
    assert_eq!(
        step,
        Step::Caller {
            frame: Frame {
                pc: 0x4242,
                sp: 0x7018,
                bp: 0x7100,
                bx: 0,
            },
            exact: false
        }
    );
}

#[test]
fn plt_rule_adds_push() {
    let row = UnwindRow::new(0, CFA_PLT, 8, RBP_SAME, 11).unwrap();
    let read = |a: u64| Some(a);
    let Step::Caller { frame, .. } = step(
        &row,
        &Frame {
            pc: 0x100a,
            sp: 0x7000,
            bp: 0,
            bx: 0,
        },
        None,
        read,
    ) else {
        panic!()
    };
    assert_eq!(frame.sp, 0x7008);
    let Step::Caller { frame, .. } = step(
        &row,
        &Frame {
            pc: 0x100b,
            sp: 0x7000,
            bp: 0,
            bx: 0,
        },
        None,
        read,
    ) else {
        panic!()
    };
    assert_eq!(frame.sp, 0x7010);
}

#[test]
fn stack_switch_through_rbx() {
    // rust_psm_on_stack: push rbx; mov rbx, rsp; mov rsp, NEW; call.
    // CFA = rbx + 16, the caller's rbx at CFA - 16.
    let row = UnwindRow::new(0, CFA_RBX, 16, RBP_SAME, 0)
        .and_then(|r| r.with_rbx(RBX_OFFSET, -16))
        .unwrap();
    assert_eq!(
        (row.kind(), row.rbx_kind(), row.rbx_offset()),
        (CFA_RBX, RBX_OFFSET, -16)
    );
    let frame = Frame {
        pc: 0x1000,
        sp: 0x10_0000, // the new stack, above the old one
        bp: 7,
        bx: 0x7000,
    };
    let step = step(&row, &frame, None, |a| match a {
        0x7008 => Some(0x4242),
        0x7000 => Some(0x99),
        _ => None,
    });
    assert_eq!(
        step,
        Step::Caller {
            frame: Frame {
                pc: 0x4242,
                sp: 0x7010,
                bp: 7,
                bx: 0x99,
            },
            exact: false
        }
    );
    // An unknown rbx cannot give a CFA.
    let unknown = Frame { bx: 0, ..frame };
    assert_eq!(
        super::step(&row, &unknown, None, |_| Some(1)),
        Step::Unsupported
    );
}

#[test]
fn realigned_frame_through_rbp() {
    // gcc's stack realignment: CFA = [rbp - 8], the caller's rbp at [rbp].
    let row = UnwindRow::new(0, CFA_DEREF_RBP, -8, RBP_AT_RBP, 0).unwrap();
    let frame = Frame {
        pc: 0x1000,
        sp: 0x6f00,
        bp: 0x6f80,
        bx: 3,
    };
    let step = step(&row, &frame, None, |a| match a {
        0x6f78 => Some(0x7010),
        0x6f80 => Some(0x7100),
        0x7008 => Some(0x4242),
        _ => None,
    });
    assert_eq!(
        step,
        Step::Caller {
            frame: Frame {
                pc: 0x4242,
                sp: 0x7010,
                bp: 0x7100,
                bx: 3,
            },
            exact: false
        }
    );
}

#[test]
fn register_slots_are_8_byte_units() {
    assert!(UnwindRow::new(0, CFA_RSP, 16, RBP_OFFSET, -1024).is_some());
    assert!(UnwindRow::new(0, CFA_RSP, 16, RBP_OFFSET, -1032).is_none());
    assert!(UnwindRow::new(0, CFA_RSP, 16, RBP_OFFSET, -12).is_none());
    let row = UnwindRow::new(0, CFA_RSP, 16, RBP_OFFSET, -16).unwrap();
    assert!(row.with_rbx(RBX_OFFSET, 1016).is_some());
    assert!(row.with_rbx(RBX_OFFSET, 1024).is_none());
    assert_eq!(row.rbp_offset(), -16);
}

#[test]
fn large_offsets_are_scaled() {
    let row = UnwindRow::new(0, CFA_RSP, 8 * 30_000, RBP_SAME, 0).unwrap();
    assert_eq!((row.kind(), row.cfa_offset()), (CFA_RSP, 240_000));
    // rustc's biggest frames: over 512 KiB.
    for off in [262_144, 540_080, 8 * ((1 << 19) - 1)] {
        let row = UnwindRow::new(0, CFA_RBP, off, RBP_OFFSET, -16).unwrap();
        assert_eq!((row.kind(), row.cfa_offset()), (CFA_RBP, off));
        assert_eq!(row.rbp_offset(), -16);
    }
    assert_eq!(UnwindRow::new(0, CFA_RSP, 8 << 19, RBP_SAME, 0), None);
    assert_eq!(UnwindRow::new(0, CFA_RSP, -40_000, RBP_SAME, 0), None);
    assert_eq!(
        UnwindRow::new(0, CFA_RSP, 8 * 30_000 + 4, RBP_SAME, 0),
        None
    );
}

#[test]
fn find_row_takes_last_row_at_or_before() {
    let rows = [0u16, 4, 9].map(|pc| UnwindRow::new(pc, CFA_RSP, 8, RBP_SAME, 0).unwrap());
    assert_eq!(find_row(&rows, 0), 0);
    assert_eq!(find_row(&rows, 3), 0);
    assert_eq!(find_row(&rows, 4), 1);
    assert_eq!(find_row(&rows, 65535), 2);
}
