use super::*;

fn r(kind: u8, off: i64) -> Rule {
    Rule {
        row: UnwindRow::new(0, kind, off, RBP_SAME, 0).unwrap(),
        reason: 0,
    }
}

#[test]
fn pages_start_with_the_rule_in_force() {
    let mut rules = Entries::default();
    for (addr, priority, rule) in [
        (0x1_fff0, 1, r(CFA_RSP, 8)),
        (0x1_fff4, 1, r(CFA_RSP, 16)),
        (0x2_0010, 1, r(CFA_RSP, 8)),
        (0x4_0000, 0, NO_CFI),
    ] {
        rules.push(addr, priority, rule);
    }
    let out = paginate(rules, &[]);
    // Page 1: two rows, the first carried from nothing (no CFI) at 0.
    assert_eq!(out.pages[0].0, 1);
    assert_eq!(out.rows[out.pages[0].1 as usize].kind(), CFA_NONE);
    // Page 2 starts with the rsp+16 rule carried over.
    let (p, first, count) = out.pages[1];
    assert_eq!((p, count), (2, 2));
    assert_eq!(
        out.rows[first as usize],
        UnwindRow::new(0, CFA_RSP, 16, RBP_SAME, 0).unwrap()
    );
    assert_eq!(out.rows[first as usize + 1].pc_low, 0x10);
    // Page 3 is covered by the rsp+8 rule alone; page 4 has no CFI.
    assert_eq!(out.pages[2], (3, first + 2, 1));
    assert_eq!(out.pages.len(), 3);
}

#[test]
fn compiles_own_libc() {
    let Ok(data) = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6") else {
        return;
    };
    let rows = compile(&data).expect("libc compiles");
    assert!(rows.rows.len() > 1000, "{} rows", rows.rows.len());
    // Every page starts at offset 0 and is sorted.
    for &(_, first, count) in &rows.pages {
        let page = &rows.rows[first as usize..(first + count) as usize];
        assert_eq!(page[0].pc_low, 0);
        assert!(page.windows(2).all(|w| w[0].pc_low < w[1].pc_low));
    }
    // _start-style outermost frames exist (clone3's child marks rip undefined).
    assert!(rows.rows.iter().any(|r| r.kind() == CFA_END));
    assert!(rows.rows.iter().any(|r| r.kind() == CFA_SIGNAL));
    // The return paths of clone's and clone3's syscalls (glibc has no FDE
    // there; readelf shows the gaps).
    let clones = rows
        .rows
        .iter()
        .filter(|r| r.kind() == profiler_common::unwind::CFA_CLONE)
        .count();
    assert_eq!(clones, 2, "clone and clone3");
}

#[test]
fn loader_entry_ends_the_stack() {
    let Ok(data) = std::fs::read("/lib64/ld-linux-x86-64.so.2") else {
        return;
    };
    let entry = object::File::parse(&*data).unwrap().entry();
    let rows = compile(&data).expect("ld.so compiles");
    let page = rows
        .pages
        .iter()
        .find(|p| u64::from(p.0) == entry >> PAGE_SHIFT)
        .expect("the entry's page has rows");
    let page_rows = &rows.rows[page.1 as usize..(page.1 + page.2) as usize];
    let at = profiler_common::unwind::find_row(page_rows, (entry & PAGE_MASK) as u16);
    assert_eq!(page_rows[at].kind(), CFA_END);
}

/// An `.eh_frame` of one CIE (CFA = rsp + 8, return address at CFA - 8)
/// and one FDE per `(start, length, instructions)`, with absolute 4-byte
/// addresses.
fn eh_frame_bytes(fdes: &[(u32, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, body: &[u8]) {
        let mut body = body.to_vec();
        while !(body.len() + 4).is_multiple_of(8) {
            body.push(0); // DW_CFA_nop
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    let mut out = Vec::new();
    // CIE id 0, version 1, "zR", code align 1, data align -8, ra 16,
    // augmentation data: DW_EH_PE_udata4; def_cfa rsp 8; offset ra 1.
    entry(
        &mut out,
        &[
            0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 16, 1, 0x03, 0x0c, 7, 8, 0x90, 1,
        ],
    );
    for &(start, len, code) in fdes {
        let cie_pointer = out.len() as u32 + 4;
        let mut body = cie_pointer.to_le_bytes().to_vec();
        body.extend_from_slice(&start.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.push(0); // augmentation data length
        body.extend_from_slice(code);
        entry(&mut out, &body);
    }
    out
}

fn compile_eh_frame(bytes: &[u8]) -> ObjectRows {
    let mut rules = Entries::default();
    let mut reasons = Reasons::default();
    let eh = EhFrame::new(bytes, LittleEndian);
    collect(&eh, &BaseAddresses::default(), &mut rules, &mut reasons).unwrap();
    paginate(rules, &reasons.names)
}

fn row_at(rows: &ObjectRows, addr: u64) -> UnwindRow {
    let page = rows
        .pages
        .iter()
        .find(|p| u64::from(p.0) == addr >> PAGE_SHIFT)
        .expect("the page has rows");
    let page_rows = &rows.rows[page.1 as usize..(page.1 + page.2) as usize];
    page_rows[profiler_common::unwind::find_row(page_rows, (addr & PAGE_MASK) as u16)]
}

#[test]
fn stack_switches_by_hand_compile_to_register_rows() {
    use profiler_common::unwind::{
        CFA_REGS, REG_R8, REG_R9, REG_RDI, REG_RDX, SRC_AT, SRC_REG, TO_BP, TO_BX, TO_PC, TO_SP,
    };
    // __longjmp: at +0x23, CFA = rdi; rbx at CFA + 0; rsp in r8, rbp in
    // r9, the return address in rdx.
    let longjmp: &[u8] = &[
        0x40 | 0x23,
        0x0c,
        5,
        0, // def_cfa rdi 0
        0x80 | 3,
        0, // offset rbx, 0
        0x09,
        7,
        8, // register rsp, r8
        0x09,
        6,
        9, // register rbp, r9
        0x09,
        16,
        1, // register ra, rdx
    ];
    // setcontext: at +0x35, CFA = rdx; rip, rsp, rbp, rbx at +168, +160,
    // +120, +128 (DW_CFA_offset_extended_sf: data-aligned by -8).
    let setcontext: &[u8] = &[
        0x40 | 0x35,
        0x0c,
        1,
        0, // def_cfa rdx 0
        0x11,
        16,
        0x6b, // offset_extended_sf ra, -21 (*-8 = +168)
        0x11,
        7,
        0x6c, // rsp, -20 (+160)
        0x11,
        6,
        0x71, // rbp, -15 (+120)
        0x11,
        3,
        0x70, // rbx, -16 (+128)
    ];
    // A rule on another register: CFA = rcx.
    let rcx: &[u8] = &[0x40 | 4, 0x0c, 2, 0];
    let rows = compile_eh_frame(&eh_frame_bytes(&[
        (0x1000, 0x40, longjmp),
        (0x2000, 0x50, setcontext),
        (0x3000, 0x10, rcx),
    ]));
    assert_eq!(row_at(&rows, 0x1022).kind(), CFA_RSP);
    let lj = row_at(&rows, 0x1023);
    assert_eq!(
        (lj.kind(), lj.regs_base(), lj.cfa_offset()),
        (CFA_REGS, REG_RDI, 0)
    );
    assert_eq!(
        [
            lj.source(TO_PC),
            lj.source(TO_SP),
            lj.source(TO_BP),
            lj.source(TO_BX)
        ],
        [
            SRC_REG | REG_RDX,
            SRC_REG | REG_R8,
            SRC_REG | REG_R9,
            SRC_AT
        ]
    );
    assert!(lj.needs_leaf());
    // setcontext's slots are read relative to rdx + 184 (slots -2, -3, -8,
    // -7): the same addresses.
    let sc = row_at(&rows, 0x2040);
    assert_eq!(
        (sc.kind(), sc.regs_base(), sc.cfa_offset()),
        (CFA_REGS, REG_RDX, 184)
    );
    let slot = |s: u8| ((s << 4) as i8 >> 4) as i64 * 8 + 184;
    assert_eq!(
        [
            slot(sc.source(TO_PC)),
            slot(sc.source(TO_SP)),
            slot(sc.source(TO_BP)),
            slot(sc.source(TO_BX))
        ],
        [168, 160, 120, 128]
    );
    // The rcx rule stays unsupported, named.
    assert_eq!(row_at(&rows, 0x3004).kind(), CFA_UNSUPPORTED);
    assert_eq!(rows.unsupported, 1);
    assert_eq!(rows.unsupported_rules, vec![("cfa: rcx+0".to_owned(), 1)]);
}

#[test]
fn an_rsp_rule_is_not_taken_for_the_cfa() {
    // CFA = rsp + 8 as usual, but rsp is in r8: the regular rows would take
    // the caller's rsp to be the CFA.
    let code: &[u8] = &[0x40 | 1, 0x09, 7, 8];
    let rows = compile_eh_frame(&eh_frame_bytes(&[(0x1000, 0x10, code)]));
    let row = row_at(&rows, 0x1001);
    assert_eq!(row.kind(), profiler_common::unwind::CFA_REGS);
    assert!(row.needs_leaf());
    assert_eq!(rows.unsupported, 0);
}

/// The system's libraries that every program maps: no row the walker
/// cannot evaluate (`readelf --debug-dump=frames-interp` shows the ones
/// that took register rules: `__longjmp`, `__longjmp_chk`, `setcontext`,
/// `vfork`, ld.so's `__longjmp`).
#[test]
fn system_libraries_have_no_unsupported_rows() {
    let mut checked = 0;
    for path in [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    ] {
        let Ok(data) = std::fs::read(path) else {
            continue;
        };
        let rows = compile(&data).expect("compiles");
        assert_eq!(rows.unsupported, 0, "{path}: {:?}", rows.unsupported_rules);
        if path.contains("libc.so") {
            let leaf = rows.rows.iter().filter(|r| r.needs_leaf()).count();
            assert!(leaf >= 4, "libc's longjmps, setcontext, vfork: {leaf}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "libc and ld.so are always there");
}

/// BOLT ends an FDE with a row at its end address (`DW_CFA_advance_loc`
/// to the end, then `DW_CFA_restore_state`): readelf shows
/// librustc_driver's FDE 0x52001c0..0x520026e with a row `rsp+160` at
/// 0x520026e, where `rust_psm_stack_pointer`'s FDE (CFA = rsp+8) begins.
/// The next function keeps its own first row.
#[test]
fn a_row_at_an_fde_end_does_not_displace_the_next_function() {
    let body: &[u8] = &[
        0x40 | 1,
        0x0e,
        16,   // advance 1; def_cfa_offset 16
        0x0a, // remember_state
        0x40 | 3,
        0x0e,
        160,
        1, // advance 3 (to the end); def_cfa_offset 160 (ULEB)
    ];
    let bytes = eh_frame_bytes(&[(0x1000, 4, body), (0x1004, 6, &[])]);
    let rows = compile_eh_frame(&bytes);
    assert_eq!(row_at(&rows, 0x1001).cfa_offset(), 16);
    let next = row_at(&rows, 0x1004);
    assert_eq!((next.kind(), next.cfa_offset()), (CFA_RSP, 8));
}
