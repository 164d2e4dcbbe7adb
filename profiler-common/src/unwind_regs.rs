//! [`CFA_REGS`] rows: general register rules, and the registers of the
//! sampled frame they may name.
//!
//! Such a row repurposes the fields of [`UnwindRow`]: `cfa_kind` holds
//! [`CFA_REGS`] and, in its high nibble, the DWARF number of the CFA's
//! base register; `cfa_offset` is the CFA's offset in bytes; the 24 bits
//! of `rbp_offset`, `rbx_offset` and `reg_kinds` (in that order, low bits
//! first) hold four 6-bit sources, for the caller's pc, rsp, rbp and rbx.
use super::{CFA_REGS, Frame, Step, UnwindRow};

/// A source (6 bits): the kind in bits 4..5, a value in bits 0..3.
/// `SRC_AT`: the 8 bytes at CFA + 8 × value (value signed: -8..7).
pub const SRC_AT: u8 = 0x00;
/// The value of register `value` (a DWARF number, see `REG_*`) in the
/// frame being unwound.
pub const SRC_REG: u8 = 0x10;
/// The CFA itself.
pub const SRC_CFA: u8 = 0x20;
/// Unknown: 0.
pub const SRC_UNDEFINED: u8 = 0x30;
const SRC_KIND: u8 = 0x30;

/// Index of the caller's pc among a row's sources.
pub const TO_PC: u32 = 0;
/// Index of the caller's rsp.
pub const TO_SP: u32 = 1;
/// Index of the caller's rbp.
pub const TO_BP: u32 = 2;
/// Index of the caller's rbx.
pub const TO_BX: u32 = 3;

/// DWARF numbers of the x86-64 registers a walker knows: rsp, rbp and rbx
/// in every frame, the others in the sampled frame only.
pub const REG_RDX: u8 = 1;
/// See [`REG_RDX`].
pub const REG_RBX: u8 = 3;
/// See [`REG_RDX`].
pub const REG_RDI: u8 = 5;
/// See [`REG_RDX`].
pub const REG_RBP: u8 = 6;
/// See [`REG_RDX`].
pub const REG_RSP: u8 = 7;
/// See [`REG_RDX`].
pub const REG_R8: u8 = 8;
/// See [`REG_RDX`].
pub const REG_R9: u8 = 9;

/// Whether register `n` (DWARF number) is one a walker knows in some frame.
pub const fn is_tracked(n: u16) -> bool {
    n < 16
        && matches!(
            n as u8,
            REG_RDX | REG_RBX | REG_RDI | REG_RBP | REG_RSP | REG_R8 | REG_R9
        )
}

/// Whether register `n` is known in the sampled frame only.
pub const fn is_leaf_only(n: u16) -> bool {
    is_tracked(n) && !matches!(n as u8, REG_RBX | REG_RBP | REG_RSP)
}

/// The volatile registers of the sampled (innermost) frame that
/// [`CFA_REGS`] rows may name: a caller's values of them are lost across
/// the call, so every other frame has them unknown. Kept apart from
/// [`Frame`], which every step copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafRegs {
    /// 1 when the registers below are the frame's, 0 when unknown.
    pub known: u64,
    pub di: u64,
    pub dx: u64,
    pub r8: u64,
    pub r9: u64,
    /// The base of [`super::CFA_R11`] rows.
    pub r11: u64,
    /// What [`super::CFA_CLONE`] rows test.
    pub ax: u64,
}

const _: () = assert!(core::mem::size_of::<LeafRegs>() == 56);

impl LeafRegs {
    /// The registers of a frame other than the sampled one.
    pub const UNKNOWN: Self = Self {
        known: 0,
        di: 0,
        dx: 0,
        r8: 0,
        r9: 0,
        r11: 0,
        ax: 0,
    };

    /// The registers, if known.
    #[inline(always)]
    pub fn if_known(&self) -> Option<&Self> {
        if self.known != 0 { Some(self) } else { None }
    }
}

crate::impl_pod!(LeafRegs);

/// A source `kind` with `value` (a register number, or a slot for
/// [`SRC_AT`], -8..7).
pub const fn source(kind: u8, value: i8) -> u8 {
    kind | (value as u8 & 0x0f)
}

impl UnwindRow {
    /// A [`CFA_REGS`] row: CFA = register `base` (DWARF number) +
    /// `cfa_offset`, the caller's pc, rsp, rbp and rbx from `sources`
    /// (see [`source`]). `None` when a part does not fit.
    pub const fn regs(pc_low: u16, base: u8, cfa_offset: i64, sources: [u8; 4]) -> Option<Self> {
        if base > 15 || cfa_offset < i16::MIN as i64 || cfa_offset > i16::MAX as i64 {
            return None;
        }
        let mut bits = 0u32;
        let mut i = 0;
        while i < 4 {
            if sources[i] > 0x3f {
                return None;
            }
            bits |= (sources[i] as u32) << (6 * i);
            i += 1;
        }
        Some(Self {
            pc_low,
            cfa_offset: cfa_offset as i16,
            rbp_offset: bits as u8 as i8,
            rbx_offset: (bits >> 8) as u8 as i8,
            cfa_kind: CFA_REGS | (base << 4),
            reg_kinds: (bits >> 16) as u8,
        })
    }

    /// The CFA's base register of a [`CFA_REGS`] row.
    #[inline(always)]
    pub const fn regs_base(&self) -> u8 {
        self.cfa_kind >> 4
    }

    /// Source `which` (`TO_PC`, `TO_SP`, `TO_BP`, `TO_BX`) of a
    /// [`CFA_REGS`] row.
    #[inline(always)]
    pub const fn source(&self, which: u32) -> u8 {
        let bits = self.rbp_offset as u8 as u32
            | (self.rbx_offset as u8 as u32) << 8
            | (self.reg_kinds as u32) << 16;
        ((bits >> (6 * (which & 3))) & 0x3f) as u8
    }

    /// Whether the row names a register known in the sampled frame only.
    pub const fn needs_leaf(&self) -> bool {
        if matches!(self.kind(), super::CFA_R11 | super::CFA_CLONE) {
            return true;
        }
        if self.kind() != CFA_REGS {
            return false;
        }
        if is_leaf_only(self.regs_base() as u16) {
            return true;
        }
        let mut i = 0;
        while i < 4 {
            let s = self.source(i);
            if s & SRC_KIND == SRC_REG && is_leaf_only((s & 0x0f) as u16) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Register `n` (DWARF number) of `frame`, if known there (rbx may be 0:
/// unknown).
#[inline(always)]
fn register(frame: &Frame, leaf: Option<&LeafRegs>, n: u8) -> Option<u64> {
    match (n, leaf) {
        (REG_RSP, _) => Some(frame.sp),
        (REG_RBP, _) => Some(frame.bp),
        (REG_RBX, _) => Some(frame.bx),
        (REG_RDI, Some(l)) => Some(l.di),
        (REG_RDX, Some(l)) => Some(l.dx),
        (REG_R8, Some(l)) => Some(l.r8),
        (REG_R9, Some(l)) => Some(l.r9),
        _ => None,
    }
}

/// The value source `src` gives, or why not: an unknown register is an
/// unsupported rule here, a failed read a failed read.
#[inline(always)]
fn value(
    src: u8,
    cfa: u64,
    frame: &Frame,
    leaf: Option<&LeafRegs>,
    read: &mut impl FnMut(u64) -> Option<u64>,
) -> Result<u64, bool> {
    let v = src & 0x0f;
    match src & SRC_KIND {
        SRC_AT => {
            // Sign-extends the 4-bit slot.
            let slot = ((v << 4) as i8 >> 4) as i64;
            read(cfa.wrapping_add((slot * 8) as u64)).ok_or(false)
        }
        SRC_REG => register(frame, leaf, v).ok_or(true),
        SRC_CFA => Ok(cfa),
        _ => Ok(0),
    }
}

/// [`super::step`] for a [`CFA_REGS`] row. The caller's pc is a return
/// address (DWARF's rule for frames that are not signal frames).
#[inline(always)]
pub(super) fn step_regs(
    row: &UnwindRow,
    frame: &Frame,
    leaf: Option<&LeafRegs>,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> Step {
    let cfa = match register(frame, leaf, row.regs_base()) {
        // A zero base is an unknown rbx (or a register that holds no
        // address): nothing to evaluate.
        Some(base) if base != 0 => base.wrapping_add(row.cfa_offset() as u64),
        _ => return Step::Unsupported,
    };
    let mut out = [0u64; 4];
    let mut i = 0;
    while i < 4 {
        match value(row.source(i as u32), cfa, frame, leaf, &mut read) {
            Ok(v) => out[i] = v,
            Err(true) => return Step::Unsupported,
            Err(false) => return Step::ReadFailed,
        }
        i += 1;
    }
    Step::Caller {
        frame: Frame {
            pc: out[0],
            sp: out[1],
            bp: out[2],
            bx: out[3],
        },
        exact: false,
    }
}

#[cfg(test)]
#[path = "unwind_regs_tests.rs"]
mod tests;
