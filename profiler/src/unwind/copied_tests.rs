use std::mem::offset_of;

use profiler_common::{
    stack_copy::{COPY_HEADER, COPY_ID_BIT, StackCopy},
    unwind::{
        CFA_END, CFA_RSP, LeafRegs, RBP_SAME, REG_R8, REG_R9, REG_RDI, REG_RDX, SRC_AT, SRC_REG,
        UnwindRow, source,
    },
};

use super::*;

/// A stack at 0x7000 of three frames without frame pointers: leaf (pc
/// 0x1000, frame of 16 bytes), middle (0x2000, 32 bytes), outermost
/// (0x3000, whose row ends the stack).
fn three_frames() -> (Copy, impl Fn(u64) -> Lookup) {
    let mut bytes = vec![0u8; 64];
    // leaf: CFA = sp + 16; return address at CFA - 8 = 0x7008.
    bytes[8..16].copy_from_slice(&0x2005u64.to_le_bytes());
    // middle: CFA = 0x7010 + 32 = 0x7030; return address at 0x7028.
    bytes[40..48].copy_from_slice(&0x3005u64.to_le_bytes());
    let copy = Copy {
        pid: 1,
        frame: Frame {
            pc: 0x1000,
            sp: 0x7000,
            bp: 0,
            bx: 0,
        },
        leaf: LeafRegs::UNKNOWN,
        exact: true,
        bp_chained: false,
        prefix: 0,
        bytes,
    };
    let lookup = |pc: u64| match pc >> 12 {
        1 => Lookup::Row(UnwindRow::new(0, CFA_RSP, 16, RBP_SAME, 0).unwrap()),
        2 => Lookup::Row(UnwindRow::new(0, CFA_RSP, 32, RBP_SAME, 0).unwrap()),
        3 => Lookup::Row(UnwindRow::new(0, CFA_END, 0, RBP_SAME, 0).unwrap()),
        _ => Lookup::Unmapped,
    };
    (copy, lookup)
}

#[test]
fn a_copy_unwinds_to_the_outermost_frame() {
    let (copy, lookup) = three_frames();
    let walked = walk(&copy, 100, lookup);
    assert_eq!(walked.frames, vec![0x2005, 0x3005]);
    assert_eq!(walked.ending, Ending::Complete);
    assert_eq!(walked.used, 48);
}

#[test]
fn the_depth_limit_stops_the_walk() {
    let (copy, lookup) = three_frames();
    let walked = walk(&copy, 1, lookup);
    assert_eq!(walked.frames, vec![0x2005]);
    assert_eq!(walked.ending, Ending::Stopped);
}

#[test]
fn a_full_copy_that_ends_too_soon_is_too_short() {
    let (mut copy, lookup) = three_frames();
    // The middle frame's return address is just above a full copy.
    copy.bytes.truncate(40);
    copy.bytes.resize(COPY_BYTES, 0);
    let mut short = copy.clone();
    short.bytes.truncate(40);
    // Move the middle frame's CFA past the copy's end.
    let far = |pc: u64| match pc >> 12 {
        2 => Lookup::Row(UnwindRow::new(0, CFA_RSP, COPY_BYTES as i64, RBP_SAME, 0).unwrap()),
        _ => lookup(pc),
    };
    let walked = walk(&copy, 100, far);
    assert_eq!(walked.frames, vec![0x2005]);
    assert_eq!(walked.ending, Ending::LeftCopy);
    // A copy that is not full ended at the stack's end: a plain stop.
    let walked = walk(&short, 100, far);
    assert_eq!(walked.ending, Ending::Stopped);
}

#[test]
fn code_without_rows_follows_frame_pointers_and_trusts_only_chained_ends() {
    // rbp = 0x7010: [rbp] = 0 (saved rbp), [rbp + 8] = return address 0x2005.
    let mut bytes = vec![0u8; 64];
    bytes[24..32].copy_from_slice(&0x2005u64.to_le_bytes());
    let copy = Copy {
        pid: 1,
        frame: Frame {
            pc: 0x9000,
            sp: 0x7000,
            bp: 0x7010,
            bx: 0,
        },
        leaf: LeafRegs::UNKNOWN,
        exact: true,
        bp_chained: false,
        prefix: 0,
        bytes,
    };
    let lookup = |pc: u64| match pc >> 12 {
        2 => Lookup::NoRows,
        _ => Lookup::Unmapped,
    };
    let walked = walk(&copy, 100, lookup);
    assert_eq!(walked.frames, vec![0x2005]);
    // The caller's rbp (0) came from the chain: its end is trusted.
    assert_eq!(walked.ending, Ending::Complete);
    // A zero rbp in the first frame's register proves nothing.
    let mut unchained = copy.clone();
    unchained.frame.bp = 0;
    assert_eq!(walk(&unchained, 100, lookup).ending, Ending::Stopped);
}

#[test]
fn records_parse_by_field() {
    let mut item = vec![0u8; COPY_HEADER + 16];
    let mut put = |at: usize, bytes: &[u8]| item[at..at + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(StackCopy, prefix), &3u32.to_le_bytes());
    put(offset_of!(StackCopy, id), &(COPY_ID_BIT | 5).to_le_bytes());
    put(offset_of!(StackCopy, pid), &42u32.to_le_bytes());
    put(offset_of!(StackCopy, pc), &0x1234u64.to_le_bytes());
    put(offset_of!(StackCopy, sp), &0x7000u64.to_le_bytes());
    put(offset_of!(StackCopy, bx), &0x99u64.to_le_bytes());
    put(offset_of!(StackCopy, exact), &1u32.to_le_bytes());
    let leaf = offset_of!(StackCopy, leaf);
    put(leaf + offset_of!(LeafRegs, known), &1u64.to_le_bytes());
    put(leaf + offset_of!(LeafRegs, dx), &0x4444u64.to_le_bytes());
    put(leaf + offset_of!(LeafRegs, r9), &0x9999u64.to_le_bytes());
    // len says 64 from offset 4, but the record holds only 12 bytes there.
    put(offset_of!(StackCopy, len), &64u32.to_le_bytes());
    put(offset_of!(StackCopy, start), &4u32.to_le_bytes());
    item[COPY_HEADER + 4] = 0xaa;
    let (id, copy) = parse(&item).unwrap();
    assert_eq!(id, COPY_ID_BIT | 5);
    assert_eq!(
        (copy.pid, copy.frame.pc, copy.frame.sp),
        (42, 0x1234, 0x7000)
    );
    assert_eq!(copy.frame.bx, 0x99);
    assert_eq!(
        (copy.leaf.known, copy.leaf.dx, copy.leaf.r9),
        (1, 0x4444, 0x9999)
    );
    assert!(copy.exact && !copy.bp_chained);
    assert_eq!(copy.prefix, 3);
    assert_eq!(copy.bytes.len(), 12);
    assert_eq!(copy.bytes[0], 0xaa);
}

/// A copy taken at a sample in glibc's `__longjmp` after its register
/// switch (CFA = rdi, pc in rdx, rsp in r8, rbp in r9, rbx at [rdi]): the
/// copy's registers continue the walk at the setjmp's caller, as the
/// kernel walker's would; without them the walk stops there.
#[test]
fn a_copy_at_a_longjmp_follows_the_sampled_registers() {
    let (three, lookup) = three_frames();
    let longjmp = UnwindRow::regs(
        0,
        REG_RDI,
        0,
        [
            source(SRC_REG, REG_RDX as i8),
            source(SRC_REG, REG_R8 as i8),
            source(SRC_REG, REG_R9 as i8),
            source(SRC_AT, 0),
        ],
    )
    .unwrap();
    // The jmp_buf at 0x7038 (in the copy); the setjmp's caller is the
    // middle frame (pc 0x2005, rsp 0x7010), whose rsp is above the
    // sampled one here.
    let mut bytes = three.bytes.clone();
    bytes[0x38..0x40].copy_from_slice(&0xb0b0u64.to_le_bytes());
    let copy = Copy {
        frame: Frame {
            pc: 0x8000,
            sp: 0x7000,
            bp: 0,
            bx: 0,
        },
        leaf: LeafRegs {
            known: 1,
            di: 0x7038,
            dx: 0x2005,
            r8: 0x7010,
            r9: 0x7777,
            r11: 0,
            ax: 0,
        },
        bytes,
        ..three
    };
    let lookup = |pc: u64| match pc >> 12 {
        8 => Lookup::Row(longjmp),
        _ => lookup(pc),
    };
    let walked = walk(&copy, 100, lookup);
    assert_eq!(walked.frames, vec![0x2005, 0x3005]);
    assert_eq!(walked.ending, Ending::Complete);
    // A copy taken at a caller has no sampled registers: the row is not
    // followed.
    let mut later = copy.clone();
    later.leaf = LeafRegs::UNKNOWN;
    let walked = walk(&later, 100, lookup);
    assert!(walked.frames.is_empty());
    assert_eq!(walked.ending, Ending::Stopped);
}
