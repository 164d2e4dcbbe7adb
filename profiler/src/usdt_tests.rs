use super::*;

fn reg(size: u8, signed: bool, r: Reg) -> Arg {
    Arg {
        size,
        signed,
        location: Location::Register(r),
    }
}

fn mem(size: u8, signed: bool, base: Reg, index: Option<(Reg, u8)>, offset: i64) -> Arg {
    Arg {
        size,
        signed,
        location: Location::Memory {
            base,
            index,
            offset,
            symbol: None,
        },
    }
}

#[test]
fn argument_strings_decode_into_locations() {
    let args = parse_args("8@%rdi -4@-4(%rbp) 8@%rax 8@$5 -2@$-0x10 1@%sil 4@%r9d").unwrap();
    assert_eq!(
        args,
        [
            reg(8, false, Reg::Rdi),
            mem(4, true, Reg::Rbp, None, -4),
            reg(8, false, Reg::Rax),
            Arg {
                size: 8,
                signed: false,
                location: Location::Constant(5)
            },
            Arg {
                size: 2,
                signed: true,
                location: Location::Constant(-16)
            },
            reg(1, false, Reg::Rsi),
            reg(4, false, Reg::R9),
        ]
    );
    assert_eq!(
        parse_args("8@(%rsp) 4@0x18(%rax,%rbx,4) 8@16(%r12,%r13)").unwrap(),
        [
            mem(8, false, Reg::Rsp, None, 0),
            mem(4, false, Reg::Rax, Some((Reg::Rbx, 4)), 24),
            mem(8, false, Reg::R12, Some((Reg::R13, 1)), 16),
        ]
    );
    assert_eq!(
        parse_args("-8@counter+16(%rip)").unwrap()[0].location,
        Location::Memory {
            base: Reg::Rip,
            index: None,
            offset: 16,
            symbol: Some("counter".into())
        }
    );
    assert!(parse_args("").unwrap().is_empty());
}

#[test]
fn bad_arguments_are_one_line_errors() {
    for bad in [
        "%rdi",
        "3@%rdi",
        "8@%xyz",
        "8@%r16",
        "8@4(%rax",
        "8@4(%rax,%rbx,3)",
        "8@$abc",
        "8@a b(%rip)",
    ] {
        let e = parse_args(bad).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains(bad.split_whitespace().next().unwrap()),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
}

#[test]
fn registers_sit_where_pt_regs_has_them() {
    // struct pt_regs (arch/x86/include/asm/ptrace.h): r15 first, then
    // r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp.
    assert_eq!(Reg::Rdi.pt_regs_offset(), 112);
    assert_eq!(Reg::Rsi.pt_regs_offset(), 104);
    assert_eq!(Reg::Rdx.pt_regs_offset(), 96);
    assert_eq!(Reg::Rip.pt_regs_offset(), 128);
    assert_eq!(Reg::Rsp.pt_regs_offset(), 152);
    assert_eq!(Reg::R15.pt_regs_offset(), 0);
}

/// One ELF note, little-endian, padded as the format says.
fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((name.len() as u32).to_le_bytes());
    v.extend((desc.len() as u32).to_le_bytes());
    v.extend(kind.to_le_bytes());
    v.extend(name);
    v.resize(v.len().next_multiple_of(4), 0);
    v.extend(desc);
    v.resize(v.len().next_multiple_of(4), 0);
    v
}

fn sdt_desc(pc: u64, base: u64, sem: u64, strings: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    for a in [pc, base, sem] {
        d.extend(a.to_le_bytes());
    }
    for s in strings {
        d.extend(s.as_bytes());
        d.push(0);
    }
    d
}

#[test]
fn sdt_notes_are_read_and_other_notes_skipped() {
    let mut section = note(b"GNU\0", 3, &[1, 2, 3, 4]);
    section.extend(note(
        b"stapsdt\0",
        3,
        &sdt_desc(
            0x1234,
            0x500,
            0,
            &["otel_memory", "alloc", "8@%rdi 8@%rsi 8@%rdx"],
        ),
    ));
    section.extend(note(b"stapsdt\0", 1, &[0; 8]));
    section.extend(note(
        b"stapsdt\0",
        3,
        &sdt_desc(0x2000, 0x500, 0x9000, &["p", "free", ""]),
    ));
    let notes = parse_notes(&section, true).unwrap();
    assert_eq!(
        notes,
        [
            RawNote {
                pc: 0x1234,
                base: 0x500,
                semaphore: 0,
                provider: "otel_memory".into(),
                name: "alloc".into(),
                args: "8@%rdi 8@%rsi 8@%rdx".into(),
            },
            RawNote {
                pc: 0x2000,
                base: 0x500,
                semaphore: 0x9000,
                provider: "p".into(),
                name: "free".into(),
                args: String::new(),
            }
        ]
    );
}

#[test]
fn broken_notes_are_errors() {
    let good = note(b"stapsdt\0", 3, &sdt_desc(1, 2, 3, &["p", "n", ""]));
    assert!(parse_notes(&good[..good.len() - 8], true).is_err());
    assert!(parse_notes(&good[..6], true).is_err());
    let short = note(b"stapsdt\0", 3, &[0; 16]);
    assert!(parse_notes(&short, true).is_err());
    let unnamed = note(b"stapsdt\0", 3, &sdt_desc(1, 2, 3, &["", "n", ""]));
    assert!(parse_notes(&unnamed, true).is_err());
}

#[test]
fn addresses_map_to_file_offsets_through_segments() {
    let segments = [(0x0, 0x1000, 0x0), (0x2000, 0x3000, 0x1000)];
    assert_eq!(file_offset(&segments, 0x10), Some(0x10));
    assert_eq!(file_offset(&segments, 0x2345), Some(0x1345));
    assert_eq!(file_offset(&segments, 0x1800), None);
    assert_eq!(file_offset(&segments, 0x5000), None);
}

#[test]
fn files_that_are_not_elf_are_refused() {
    assert!(probes(b"not an elf file").is_err());
}
