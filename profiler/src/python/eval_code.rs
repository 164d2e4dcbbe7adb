//! Where the evaluation loop's code is, from `.dynsym`, `.eh_frame` and the
//! code alone.
//!
//! GCC splits `_PyEval_EvalFrameDefault`: the paths it thinks unlikely
//! (error handling, unknown opcodes) go to a cold part elsewhere in `.text`.
//! Builds with a `.symtab` name it `_PyEval_EvalFrameDefault.cold`; a
//! stripped build (Debian's python3.11) names it nowhere, and the exported
//! symbol's size covers only the hot part. A native frame in the cold part
//! is still an activation of the loop, so the cold parts are found as:
//!
//! 1. candidates: the targets of the hot part's direct jumps that land
//!    outside it, and the entries of its computed-goto table (the opcode
//!    targets, a run of code pointers most of which point into the hot
//!    part) that point outside it;
//! 2. confirmed by `.eh_frame`: the candidate is covered by an FDE whose
//!    first row is a frame already set up (CFA above rsp + 8, callee-saved
//!    registers saved) and equal to a row of the hot part's FDE. A cold part
//!    continues the hot part's frame; an ordinary function begins with only
//!    its return address on the stack (a tail call lands there), so it is
//!    never taken for one.
//!
//! The part is that FDE's range.
use std::collections::HashSet;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, EndianSlice, FrameDescriptionEntry, LittleEndian,
    Register, RegisterRule, UnwindContext, UnwindSection as _, X86_64,
};
use iced_x86::{Decoder, DecoderOptions, FlowControl};
use object::{Object as _, ObjectSection as _, RelocationFlags, SectionKind};

/// `R_X86_64_RELATIVE`: the slot holds the load bias plus the addend.
const R_X86_64_RELATIVE: u32 = 8;

/// Shortest run of code pointers taken for a jump table.
const TABLE_MIN: usize = 8;

type Fde<'a> = FrameDescriptionEntry<EndianSlice<'a, LittleEndian>>;

/// The cold parts of the function at `[start, end)` of `elf`, as
/// `[start, end)` ranges of the object's addresses, in address order.
/// Empty when the function has none, or the object has no `.eh_frame` to
/// confirm one with.
pub fn cold_parts(elf: &object::File<'_>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let Some(cfi) = Cfi::new(elf) else {
        return Vec::new();
    };
    let Some(hot) = cfi.fdes.iter().find(|f| f.initial_address() == start) else {
        return Vec::new();
    };
    let hot_states = cfi.states(hot);
    let mut candidates = branch_targets(elf, start, end);
    candidates.extend(table_entries(elf, start, end));
    let mut parts: Vec<(u64, u64)> = Vec::new();
    for target in candidates {
        if (start..end).contains(&target) || parts.iter().any(|p| (p.0..p.1).contains(&target)) {
            continue;
        }
        let Some(fde) = cfi.covering(target) else {
            continue;
        };
        let first = cfi.state_at(fde, fde.initial_address());
        if first.is_some_and(|s| s.is_set_up() && hot_states.contains(&s)) {
            parts.push((fde.initial_address(), fde.end_address()));
        }
    }
    parts.sort_unstable();
    parts
}

/// The frame a row describes: the CFA as rsp plus an offset, and where the
/// callee-saved registers are (offsets from the CFA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FrameState {
    cfa_offset: i64,
    saved: [Option<i64>; 6],
}

impl FrameState {
    /// The prologue has run: more than the return address on the stack and
    /// registers saved.
    fn is_set_up(&self) -> bool {
        self.cfa_offset > 8 && self.saved.iter().any(Option::is_some)
    }
}

const CALLEE_SAVED: [Register; 6] = [
    X86_64::RBX,
    X86_64::RBP,
    X86_64::R12,
    X86_64::R13,
    X86_64::R14,
    X86_64::R15,
];

fn frame_state(row: &gimli::UnwindTableRow<usize>) -> Option<FrameState> {
    let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else {
        return None;
    };
    if register != X86_64::RSP {
        return None;
    }
    let saved = CALLEE_SAVED.map(|r| match row.register(r) {
        Some(RegisterRule::Offset(o)) => Some(o),
        _ => None,
    });
    Some(FrameState {
        cfa_offset: offset,
        saved,
    })
}

/// An object's `.eh_frame`, its FDEs parsed.
struct Cfi<'a> {
    section: EhFrame<EndianSlice<'a, LittleEndian>>,
    bases: BaseAddresses,
    /// By start address.
    fdes: Vec<Fde<'a>>,
}

impl<'a> Cfi<'a> {
    fn new(elf: &object::File<'a>) -> Option<Self> {
        let (eh, bases) = crate::unwind::cfi::eh_frame(elf)?;
        let mut fdes = Vec::new();
        let mut entries = eh.entries(&bases);
        while let Ok(Some(entry)) = entries.next() {
            if let CieOrFde::Fde(partial) = entry
                && let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o))
                && fde.len() > 0
            {
                fdes.push(fde);
            }
        }
        fdes.sort_by_key(FrameDescriptionEntry::initial_address);
        Some(Self {
            section: eh,
            bases,
            fdes,
        })
    }

    fn covering(&self, address: u64) -> Option<&Fde<'a>> {
        let after = self
            .fdes
            .partition_point(|f| f.initial_address() <= address);
        let fde = self.fdes.get(after.checked_sub(1)?)?;
        fde.contains(address).then_some(fde)
    }

    /// Every frame state the rows of `fde` describe.
    fn states(&self, fde: &Fde<'a>) -> HashSet<FrameState> {
        let mut out = HashSet::new();
        let mut ctx = Box::new(UnwindContext::new());
        let Ok(mut table) = fde.rows(&self.section, &self.bases, &mut ctx) else {
            return out;
        };
        while let Ok(Some(row)) = table.next_row() {
            out.extend(frame_state(row));
        }
        out
    }

    fn state_at(&self, fde: &Fde<'a>, address: u64) -> Option<FrameState> {
        let mut ctx = Box::new(UnwindContext::new());
        let row = fde
            .unwind_info_for_address(&self.section, &self.bases, &mut ctx, address)
            .ok()?;
        frame_state(row)
    }
}

/// The bytes of the code at `[start, end)`, from the section holding them.
fn code<'a>(elf: &object::File<'a>, start: u64, end: u64) -> Option<&'a [u8]> {
    elf.sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .find(|s| s.address() <= start && end <= s.address() + s.size())
        .and_then(|s| {
            let data = s.data().ok()?;
            let from = usize::try_from(start - s.address()).ok()?;
            let to = usize::try_from(end - s.address()).ok()?;
            data.get(from..to)
        })
}

/// Targets of the direct jumps (conditional or not) in `[start, end)` that
/// land outside it.
fn branch_targets(elf: &object::File<'_>, start: u64, end: u64) -> Vec<u64> {
    let Some(bytes) = code(elf, start, end) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    for i in &mut decoder {
        let jump = matches!(
            i.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        );
        if jump && (i.is_jmp_near() || i.is_jcc_near() || i.is_jmp_short() || i.is_jcc_short()) {
            let target = i.near_branch_target();
            if !(start..end).contains(&target) {
                out.push(target);
            }
        }
    }
    out
}

/// Code pointers of the object's data that point outside `[start, end)`
/// from a table whose entries mostly point into it (the computed-goto
/// table of opcode targets). Pointers are the data's 8-byte words (a
/// position-dependent executable) and the targets of `R_X86_64_RELATIVE`
/// relocations (a position-independent object).
fn table_entries(elf: &object::File<'_>, start: u64, end: u64) -> Vec<u64> {
    let text = elf
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .map(|s| (s.address(), s.address() + s.size()))
        .fold((u64::MAX, 0), |(lo, hi), (s, e)| (lo.min(s), hi.max(e)));
    let is_code = |a: u64| (text.0..text.1).contains(&a);
    let mut tables = Tables {
        function: start..end,
        last_slot: None,
        run: Vec::new(),
        out: Vec::new(),
    };
    for section in elf
        .sections()
        .filter(|s| matches!(s.kind(), SectionKind::Data | SectionKind::ReadOnlyData))
    {
        let Ok(data) = section.data() else { continue };
        let base = section.address();
        let skip = usize::try_from(base.next_multiple_of(8) - base).unwrap_or(0);
        let words = data.get(skip..).unwrap_or(&[]).chunks_exact(8);
        for (k, word) in words.enumerate() {
            let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if is_code(value) {
                tables.push(base + skip as u64 + 8 * k as u64, value);
            }
        }
        tables.close();
    }
    let mut relocated: Vec<(u64, u64)> = elf
        .dynamic_relocations()
        .into_iter()
        .flatten()
        .filter(|(_, r)| {
            r.flags()
                == (RelocationFlags::Elf {
                    r_type: R_X86_64_RELATIVE,
                })
        })
        .filter_map(|(slot, r)| Some((slot, u64::try_from(r.addend()).ok()?)))
        .filter(|&(_, value)| is_code(value))
        .collect();
    relocated.sort_unstable();
    for (slot, value) in relocated {
        tables.push(slot, value);
    }
    tables.close();
    tables.out
}

/// Runs of consecutive code pointers, and the entries outside `function`
/// of those that point mostly into it.
struct Tables {
    function: std::ops::Range<u64>,
    last_slot: Option<u64>,
    run: Vec<u64>,
    out: Vec<u64>,
}

impl Tables {
    fn push(&mut self, slot: u64, value: u64) {
        if self.last_slot.is_some_and(|last| last + 8 != slot) {
            self.close();
        }
        self.run.push(value);
        self.last_slot = Some(slot);
    }

    fn close(&mut self) {
        let inside = self
            .run
            .iter()
            .filter(|v| self.function.contains(v))
            .count();
        if self.run.len() >= TABLE_MIN && 2 * inside >= self.run.len() {
            let outside = self.run.iter().filter(|v| !self.function.contains(v));
            self.out.extend(outside);
        }
        self.run.clear();
        self.last_slot = None;
    }
}

#[cfg(test)]
mod tests;
