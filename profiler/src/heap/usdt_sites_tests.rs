use profiler_common::usdt::USDT_ARG_NONE;

use super::*;

fn probe(name: &str, args: &str, file_offset: u64) -> Probe {
    let (args_parsed, args_error) = match usdt::parse_args(args) {
        Ok(a) => (a, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    Probe {
        provider: PROVIDER.to_owned(),
        name: name.to_owned(),
        pc: file_offset,
        semaphore: 0,
        args_text: args.to_owned(),
        args: args_parsed,
        args_error,
        symbols: vec![("counter".to_owned(), 0x4010)],
        return_address_at_sp: false,
        file_offset,
    }
}

fn reg(r: Reg) -> u16 {
    r.pt_regs_offset() as u16
}

#[test]
fn registers_of_any_width_and_sign_are_read() {
    let spec = spec(&probe(ALLOC, "8@%r12 -4@%r13d 1@%sil", 0x10), 3).unwrap();
    let [a, b, c] = spec.args;
    assert_eq!(
        (a.kind, a.base, a.size, a.signed),
        (USDT_ARG_REGISTER, reg(Reg::R12), 8, 0)
    );
    assert_eq!(
        (b.kind, b.base, b.size, b.signed),
        (USDT_ARG_REGISTER, reg(Reg::R13), 4, 1)
    );
    assert_eq!(
        (c.kind, c.base, c.size, c.signed),
        (USDT_ARG_REGISTER, reg(Reg::Rsi), 1, 0)
    );
    assert_eq!(spec.from_entry, 0);
}

#[test]
fn memory_operands_and_constants_are_read() {
    let spec = spec(&probe(ALLOC, "8@-16(%rbp) -4@$5 8@8(%rax,%rbx,4)", 0x10), 3).unwrap();
    let [a, b, c] = spec.args;
    assert_eq!(
        (a.kind, a.base, a.offset, a.index),
        (USDT_ARG_MEMORY, reg(Reg::Rbp), -16, USDT_NO_REGISTER)
    );
    assert_eq!(
        (b.kind, b.offset, b.size, b.signed),
        (USDT_ARG_CONSTANT, 5, 4, 1)
    );
    assert_eq!(
        (c.kind, c.base, c.offset, c.index, c.scale),
        (USDT_ARG_MEMORY, reg(Reg::Rax), 8, reg(Reg::Rbx), 4)
    );
    // free has one argument: the other slots stay empty.
    let free = spec_of(FREE, "-8@%r12", 1);
    assert_eq!(free.args[1].kind, USDT_ARG_NONE);
}

fn spec_of(name: &str, args: &str, n: usize) -> UsdtSpec {
    spec(&probe(name, args, 0x20), n).unwrap()
}

#[test]
fn a_symbol_is_read_relative_to_the_probe_address() {
    // counter is at 0x4010, the probe at 0x1000: rip + 0x3018.
    let spec = spec(&probe(FREE, "8@counter+8(%rip)", 0x1000), 1).unwrap();
    let a = spec.args[0];
    assert_eq!(
        (a.kind, a.base, a.offset),
        (USDT_ARG_MEMORY, reg(Reg::Rip), 0x3018)
    );
}

#[test]
fn unreadable_arguments_are_refused_naming_them() {
    for (args, needle) in [
        ("8@missing(%rip)", "8@missing(%rip)"),
        ("8@16(%rip)", "8@16(%rip)"),
        ("1@%ah", "1@%ah"),
        ("16@%xmm0", "16@%xmm0"),
        ("8@%fs:16", "8@%fs:16"),
        ("8@%rdi 8@%rsi", "2 arguments"),
    ] {
        let err = spec(&probe(FREE, args, 0x13fb), 1).unwrap_err().to_string();
        assert!(
            err.contains(needle) && err.contains("otel_memory:free at file offset 0x13fb"),
            "{args}: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn sites_are_listed_once_with_their_specs() {
    let probes = [
        probe(ALLOC, "8@%r12 8@%r13 8@%r14", 0x10),
        probe(ALLOC, "8@%rdi 8@%rsi 8@%rdx", 0x20),
        probe(FREE, "8@%rdi", 0x30),
        probe(FREE, "8@%rdi", 0x30),
    ];
    let (alloc, free) = sites(&probes).unwrap().unwrap();
    assert_eq!(
        alloc.iter().map(|s| s.offset).collect::<Vec<_>>(),
        [0x10, 0x20]
    );
    assert_eq!(free.len(), 1);
    assert_eq!(alloc[0].spec.args[2].base, reg(Reg::R14));
}

#[test]
fn an_object_needs_both_probes() {
    assert_eq!(sites(&[probe(FREE, "8@%rdi", 0x30)]).unwrap(), None);
    let other = Probe {
        provider: "other".to_owned(),
        ..probe(ALLOC, "8@%rdi 8@%rsi 8@%rdx", 0x10)
    };
    assert_eq!(sites(&[other, probe(FREE, "8@%rdi", 0x30)]).unwrap(), None);
}
