//! Compiles the CFI rows that the regular row kinds cannot hold but whose
//! rules are registers and slots near the CFA into `CFA_REGS` rows: the
//! code that switches stacks by hand (glibc's `__longjmp`, `setcontext`,
//! `vfork`).
use gimli::{CfaRule, Register, RegisterRule, UnwindTableRow, X86_64};
use profiler_common::unwind::{
    REG_RBP, REG_RBX, SRC_AT, SRC_CFA, SRC_REG, SRC_UNDEFINED, UnwindRow, is_tracked, source,
};

/// Where one of the caller's registers comes from, before encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// At CFA + offset (bytes).
    At(i64),
    /// The value of a register of this frame (DWARF number).
    Reg(u8),
    /// The CFA itself.
    Cfa,
    Undefined,
}

/// The `CFA_REGS` row of `row`, if its CFA is a tracked register plus an
/// offset and the caller's pc, rsp, rbp and rbx come from tracked
/// registers or slots the row can hold.
pub fn regs_row(row: &UnwindTableRow<usize>) -> Option<UnwindRow> {
    let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else {
        return None;
    };
    if !is_tracked(register.0) {
        return None;
    }
    let src = |reg: Register, default: Src| match row.register(reg) {
        None => Some(default),
        Some(RegisterRule::SameValue) if reg != X86_64::RA => Some(Src::Reg(reg.0 as u8)),
        Some(RegisterRule::Offset(off)) => Some(Src::At(off)),
        Some(RegisterRule::Register(r)) if is_tracked(r.0) => Some(Src::Reg(r.0 as u8)),
        Some(RegisterRule::ValOffset(0)) => Some(Src::Cfa),
        Some(RegisterRule::Undefined) if reg != X86_64::RA => Some(Src::Undefined),
        _ => None,
    };
    let sources = [
        src(X86_64::RA, Src::At(-8))?,
        src(X86_64::RSP, Src::Cfa)?,
        src(X86_64::RBP, Src::Reg(REG_RBP))?,
        // As in the regular rows, an rbx rule that does not fit leaves rbx
        // unknown.
        src(X86_64::RBX, Src::Reg(REG_RBX)).unwrap_or(Src::Undefined),
    ];
    encode(register.0 as u8, offset, sources)
}

/// Encodes the sources, moving the CFA (when no source is the CFA itself)
/// so that the slots fit the row's 4-bit slot numbers (-8..7).
fn encode(base: u8, cfa_offset: i64, sources: [Src; 4]) -> Option<UnwindRow> {
    let slots = sources.iter().filter_map(|s| match s {
        Src::At(off) => Some(*off),
        _ => None,
    });
    if slots.clone().any(|off| off % 8 != 0) {
        return None;
    }
    let min = slots.clone().min().unwrap_or(0);
    let max = slots.max().unwrap_or(0);
    let fits =
        |shift: i64| (-64..=56).contains(&(min - shift)) && (-64..=56).contains(&(max - shift));
    let shift = if fits(0) || sources.contains(&Src::Cfa) {
        0
    } else {
        // The lowest slot becomes slot -8.
        min + 64
    };
    if !fits(shift) {
        return None;
    }
    let mut encoded = [0u8; 4];
    for (e, s) in encoded.iter_mut().zip(sources) {
        *e = match s {
            Src::At(off) => source(SRC_AT, ((off - shift) / 8) as i8),
            Src::Reg(r) => source(SRC_REG, r as i8),
            Src::Cfa => SRC_CFA,
            Src::Undefined => SRC_UNDEFINED,
        };
    }
    UnwindRow::regs(0, base, cfa_offset.checked_add(shift)?, encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_far_from_the_cfa_move_it() {
        // setcontext: CFA = rdx; pc, rsp, rbp, rbx at +168, +160, +120, +128.
        let row = encode(
            1,
            0,
            [Src::At(168), Src::At(160), Src::At(120), Src::At(128)],
        )
        .unwrap();
        // The CFA moves to rdx + 184: the slots become -2, -3, -8, -7.
        assert_eq!(row.cfa_offset(), 184);
        assert_eq!(row.source(0), source(SRC_AT, -2));
        assert_eq!(row.source(2), source(SRC_AT, -8));
        // The CFA itself as rsp pins it: then far slots do not fit.
        assert_eq!(
            encode(1, 0, [Src::At(168), Src::Cfa, Src::At(120), Src::Undefined]),
            None
        );
        // Slots that are not multiples of 8 do not fit.
        assert_eq!(
            encode(7, 8, [Src::At(-4), Src::Cfa, Src::Reg(6), Src::Reg(3)]),
            None
        );
    }
}
