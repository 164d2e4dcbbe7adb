//! Call-frame information: finding the FDE that covers a pc through an
//! object's .eh_frame_hdr search table, and running its CIE and FDE
//! instructions up to that pc into the rules in force there. Reads only
//! the CFI of loaded objects (through `Source`); no allocation, no lock.
use super::{
    RBP, RSP,
    dwarf::Reader,
    source::{Source, WINDOW},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Rule {
    /// Same value as in the callee (also the default).
    Same,
    Undefined,
    /// Saved at CFA + n.
    At(i64),
    /// Something this unwinder does not follow.
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Cfa {
    Reg(u64, i64),
    /// A DWARF expression (address, length) in the CFI.
    Expr(usize, usize),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Rules {
    pub(crate) cfa: Cfa,
    pub(crate) rbp: Rule,
    pub(crate) ra: Rule,
}

/// Finds the FDE covering `pc` through the .eh_frame_hdr binary-search
/// table and runs its CFI up to `pc`.
///
/// # Safety
/// `hdr` is a loaded object's .eh_frame_hdr.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(super) unsafe fn find_rules(src: &Source, hdr: usize, pc: usize) -> Option<Rules> {
    // SAFETY: the caller's contract.
    unsafe { run_fde(src, fde_for(src, hdr, pc)?, hdr, pc) }
}

/// The FDE covering `pc`: its range `[start, end)` and the rules at its
/// first address.
///
/// # Safety
/// As [`find_rules`].
pub(crate) unsafe fn fde_covering(hdr: usize, pc: usize) -> Option<(usize, usize, Rules)> {
    // SAFETY: the caller's contract.
    unsafe {
        let src = Source::memory();
        let fde = fde_for(&src, hdr, pc)?;
        let (start, end) = fde_range(&src, fde, hdr)?;
        if !(start..end).contains(&pc) {
            return None;
        }
        Some((start, end, run_fde(&src, fde, hdr, start)?))
    }
}

/// The FDE the .eh_frame_hdr search table gives for `pc` (the last one
/// that starts at or below it; it may end below `pc`).
///
/// # Safety
/// As [`find_rules`].
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn fde_for(src: &Source, hdr: usize, pc: usize) -> Option<usize> {
    // SAFETY: all reads stay inside the object's CFI (lengths from the
    // headers, which the linker wrote).
    unsafe {
        // The object's search index narrows the search to one window of
        // the table without reading it; else the header gives the table.
        let (table, mut lo, mut hi) = match src.index().and_then(|ix| ix.narrow(hdr, pc)) {
            Some(narrowed) => narrowed,
            None => {
                let (table, count) = search_table(src, hdr)?;
                (table, 0, count)
            }
        };
        // Entry i's field (0: start pc, 1: FDE), relative to hdr.
        let field = |i: usize, f: usize| {
            let v = i32::from_le_bytes(src.bytes(table + i * 8 + f * 4));
            hdr.wrapping_add(v as isize as usize)
        };
        while hi - lo > 1 {
            if (hi - lo) * 8 <= WINDOW {
                // The rest of the search in one read.
                src.prefetch(table + lo * 8, (hi - lo) * 8);
            }
            let mid = (lo + hi) / 2;
            if field(mid, 0) <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(field(lo, 1))
    }
}

/// The .eh_frame_hdr search table: its first entry's address and its
/// entry count.
///
/// # Safety
/// As [`find_rules`].
pub(super) unsafe fn search_table(src: &Source, hdr: usize) -> Option<(usize, usize)> {
    // SAFETY: the header lies in the object's CFI.
    unsafe {
        let mut r = Reader { p: hdr, src };
        if r.u8() != 1 {
            return None;
        }
        let ptr_enc = r.u8();
        let count_enc = r.u8();
        let table_enc = r.u8();
        r.pointer(ptr_enc, hdr)?;
        let count = r.pointer(count_enc, hdr)?;
        // Every x86-64 linker writes datarel sdata4 pairs.
        if table_enc != 0x3b || count == 0 {
            return None;
        }
        Some((r.p, count))
    }
}

/// The code range `[start, end)` an FDE covers.
///
/// # Safety
/// `fde` is an FDE of mapped .eh_frame.
unsafe fn fde_range(src: &Source, fde: usize, hdr: usize) -> Option<(usize, usize)> {
    // SAFETY: see find_rules.
    unsafe {
        let mut r = Reader { p: fde, src };
        let len = r.u32();
        if len == 0 || len == u32::MAX {
            return None;
        }
        let cie_field = r.p;
        let cie_off = r.u32() as usize;
        if cie_off == 0 {
            return None;
        }
        let cie = parse_cie(src, cie_field - cie_off, hdr)?;
        let start = r.pointer(cie.fde_enc, hdr)?;
        let range = r.pointer(cie.fde_enc & 0x0f, hdr)?;
        Some((start, start.wrapping_add(range)))
    }
}

struct Cie {
    code_align: u64,
    data_align: i64,
    ra_reg: u64,
    fde_enc: u8,
    has_aug_data: bool,
    insns: usize,
    end: usize,
}

/// # Safety
/// `fde` is an FDE of mapped .eh_frame.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn run_fde(src: &Source, fde: usize, hdr: usize, pc: usize) -> Option<Rules> {
    // SAFETY: see find_rules.
    unsafe {
        let mut r = Reader { p: fde, src };
        let len = r.u32();
        if len == 0 || len == u32::MAX {
            return None;
        }
        let end = r.p + len as usize;
        let cie_field = r.p;
        let cie_off = r.u32() as usize;
        if cie_off == 0 {
            return None; // a CIE, not an FDE
        }
        let cie = parse_cie(src, cie_field - cie_off, hdr)?;
        let start = r.pointer(cie.fde_enc, hdr)?;
        let range = r.pointer(cie.fde_enc & 0x0f, hdr)?;
        if pc < start || pc >= start.wrapping_add(range) {
            return None;
        }
        if cie.has_aug_data {
            let n = r.uleb() as usize;
            r.p += n;
        }
        let mut state = Rules {
            cfa: Cfa::Reg(RSP, 8),
            rbp: Rule::Same,
            ra: Rule::Undefined,
        };
        let mut loc = start;
        execute(
            src,
            &cie,
            cie.insns,
            cie.end,
            &mut state,
            None,
            &mut loc,
            usize::MAX,
        )?;
        let initial = state;
        execute(
            src,
            &cie,
            r.p,
            end,
            &mut state,
            Some(&initial),
            &mut loc,
            pc,
        )?;
        Some(state)
    }
}

/// # Safety
/// `cie` is a CIE of mapped .eh_frame.
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn parse_cie(src: &Source, cie: usize, hdr: usize) -> Option<Cie> {
    // SAFETY: see find_rules.
    unsafe {
        let mut r = Reader { p: cie, src };
        let len = r.u32();
        if len == 0 || len == u32::MAX {
            return None;
        }
        let end = r.p + len as usize;
        if r.u32() != 0 {
            return None;
        }
        let version = r.u8();
        let mut aug_bytes = [0u8; 16];
        let mut aug_len = 0;
        loop {
            let c = r.u8();
            if c == 0 {
                break;
            }
            *aug_bytes.get_mut(aug_len)? = c;
            aug_len += 1;
        }
        let aug = &aug_bytes[..aug_len];
        if aug.starts_with(b"eh") {
            r.p += 8;
        }
        let code_align = r.uleb();
        let data_align = r.sleb();
        let ra_reg = if version == 1 {
            u64::from(r.u8())
        } else {
            r.uleb()
        };
        let mut fde_enc = 0;
        let has_aug_data = aug.first() == Some(&b'z');
        let mut insns = r.p;
        if has_aug_data {
            let n = r.uleb() as usize;
            insns = r.p + n;
            for &c in &aug[1..] {
                match c {
                    b'R' => fde_enc = r.u8(),
                    b'L' => r.p += 1,
                    b'P' => {
                        let enc = r.u8();
                        r.pointer(enc & 0x7f, hdr)?;
                    }
                    b'S' | b'B' => {}
                    _ => break,
                }
            }
        }
        Some(Cie {
            code_align,
            data_align,
            ra_reg,
            fde_enc,
            has_aug_data,
            insns,
            end,
        })
    }
}

/// Runs CFA instructions from `p` to `end`, stopping before the first row
/// past `pc`.
///
/// # Safety
/// `p..end` lies in mapped .eh_frame.
#[allow(clippy::too_many_arguments)]
#[unsafe(link_section = ".text.hot.profalloc")]
unsafe fn execute(
    src: &Source,
    cie: &Cie,
    p: usize,
    end: usize,
    s: &mut Rules,
    initial: Option<&Rules>,
    loc: &mut usize,
    pc: usize,
) -> Option<()> {
    let mut m = Interpreter {
        cie,
        initial,
        pc,
        saved: [*s; STATE_STACK],
        depth: 0,
    };
    let mut r = Reader { p, src };
    while r.p < end {
        // SAFETY: the caller's contract; every read advances inside p..end.
        let flow = unsafe {
            let op = r.u8();
            match op >> 6 {
                0 => m.extended(op, &mut r, s, loc)?,
                _ => m.primary(op, &mut r, s, loc),
            }
        };
        if let Flow::Stop = flow {
            break;
        }
    }
    Some(())
}

/// Remembered rows (DW_CFA_remember_state) an FDE may nest.
const STATE_STACK: usize = 8;

/// Whether the interpreter reached the row in force at `pc`.
enum Flow {
    Go,
    Stop,
}

/// The CFA instruction interpreter's state besides the rules themselves.
struct Interpreter<'a> {
    cie: &'a Cie,
    /// The CIE's rules (what DW_CFA_restore returns to); None while
    /// running the CIE itself.
    initial: Option<&'a Rules>,
    pc: usize,
    saved: [Rules; STATE_STACK],
    depth: usize,
}

impl Interpreter<'_> {
    fn set(&self, s: &mut Rules, reg: u64, rule: Rule) {
        if reg == RBP {
            s.rbp = rule;
        } else if reg == self.cie.ra_reg {
            s.ra = rule;
        }
    }

    fn restore(&self, s: &mut Rules, reg: u64) {
        if let Some(i) = self.initial {
            if reg == RBP {
                s.rbp = i.rbp;
            } else if reg == self.cie.ra_reg {
                s.ra = i.ra;
            }
        }
    }

    /// Moves the location by `delta` code units, unless that passes `pc`.
    fn advance(&self, loc: &mut usize, delta: u64) -> Flow {
        let next = loc.wrapping_add((delta * self.cie.code_align) as usize);
        if next > self.pc {
            return Flow::Stop;
        }
        *loc = next;
        Flow::Go
    }

    /// The instructions with an operand in their low 6 bits.
    ///
    /// # Safety
    /// `r` is inside the instructions being run.
    unsafe fn primary(&mut self, op: u8, r: &mut Reader, s: &mut Rules, loc: &mut usize) -> Flow {
        let low = op & 0x3f;
        match op >> 6 {
            1 => return self.advance(loc, u64::from(low)),
            2 => {
                // SAFETY: the caller's contract.
                let off = unsafe { r.uleb() } as i64 * self.cie.data_align;
                self.set(s, u64::from(low), Rule::At(off));
            }
            _ => self.restore(s, u64::from(low)),
        }
        Flow::Go
    }

    /// The other instructions; None for one this unwinder does not know.
    ///
    /// # Safety
    /// `r` is inside the instructions being run.
    unsafe fn extended(
        &mut self,
        op: u8,
        r: &mut Reader,
        s: &mut Rules,
        loc: &mut usize,
    ) -> Option<Flow> {
        // SAFETY: the caller's contract.
        unsafe {
            match op {
                0x00 => {}
                0x01..=0x04 => return self.location(op, r, loc),
                0x0a => {
                    if self.depth == STATE_STACK {
                        return None;
                    }
                    self.saved[self.depth] = *s;
                    self.depth += 1;
                }
                0x0b => {
                    if self.depth == 0 {
                        return None;
                    }
                    self.depth -= 1;
                    // The whole row, CFA included (what gcc's epilogues
                    // after a `ret` in mid-function rely on).
                    *s = self.saved[self.depth];
                }
                0x0c..=0x0f | 0x12 | 0x13 => self.cfa(op, r, s),
                0x2e => {
                    r.uleb();
                }
                _ => self.register(op, r, s)?,
            }
        }
        Some(Flow::Go)
    }

    /// set_loc and the advance_loc forms.
    ///
    /// # Safety
    /// `r` is inside the instructions being run.
    unsafe fn location(&mut self, op: u8, r: &mut Reader, loc: &mut usize) -> Option<Flow> {
        // SAFETY: the caller's contract.
        let delta = unsafe {
            match op {
                0x01 => {
                    let to = r.pointer(self.cie.fde_enc, 0)?;
                    if to > self.pc {
                        return Some(Flow::Stop);
                    }
                    *loc = to;
                    return Some(Flow::Go);
                }
                0x02 => u64::from(r.u8()),
                0x03 => u64::from(r.u16()),
                _ => u64::from(r.u32()),
            }
        };
        Some(self.advance(loc, delta))
    }

    /// The CFA rules: def_cfa, def_cfa_register, def_cfa_offset,
    /// def_cfa_expression and their signed (_sf) forms.
    ///
    /// # Safety
    /// `r` is inside the instructions being run.
    unsafe fn cfa(&mut self, op: u8, r: &mut Reader, s: &mut Rules) {
        let data_align = self.cie.data_align;
        // SAFETY: the caller's contract.
        unsafe {
            match op {
                0x0c => {
                    let reg = r.uleb();
                    let off = r.uleb() as i64;
                    s.cfa = Cfa::Reg(reg, off);
                }
                0x0d => {
                    let reg = r.uleb();
                    s.cfa = match s.cfa {
                        Cfa::Reg(_, off) => Cfa::Reg(reg, off),
                        Cfa::Expr(..) => Cfa::Reg(reg, 0),
                    };
                }
                0x0e => {
                    let off = r.uleb() as i64;
                    if let Cfa::Reg(reg, _) = s.cfa {
                        s.cfa = Cfa::Reg(reg, off);
                    }
                }
                0x0f => {
                    let len = r.uleb() as usize;
                    s.cfa = Cfa::Expr(r.p, len);
                    r.p += len;
                }
                0x12 => {
                    let reg = r.uleb();
                    let off = r.sleb() * data_align;
                    s.cfa = Cfa::Reg(reg, off);
                }
                _ => {
                    let off = r.sleb() * data_align;
                    if let Cfa::Reg(reg, _) = s.cfa {
                        s.cfa = Cfa::Reg(reg, off);
                    }
                }
            }
        }
    }

    /// The register rules; None for an unknown instruction.
    ///
    /// # Safety
    /// `r` is inside the instructions being run.
    unsafe fn register(&mut self, op: u8, r: &mut Reader, s: &mut Rules) -> Option<()> {
        let data_align = self.cie.data_align;
        // SAFETY: the caller's contract.
        unsafe {
            match op {
                0x05 => {
                    let reg = r.uleb();
                    let off = r.uleb() as i64 * data_align;
                    self.set(s, reg, Rule::At(off));
                }
                0x06 => {
                    let reg = r.uleb();
                    self.restore(s, reg);
                }
                0x07 => {
                    let reg = r.uleb();
                    self.set(s, reg, Rule::Undefined);
                }
                0x08 => {
                    let reg = r.uleb();
                    self.set(s, reg, Rule::Same);
                }
                0x09 => {
                    let reg = r.uleb();
                    r.uleb();
                    self.set(s, reg, Rule::Other);
                }
                0x10 | 0x16 => {
                    let reg = r.uleb();
                    let len = r.uleb() as usize;
                    r.p += len;
                    self.set(s, reg, Rule::Other);
                }
                0x11 => {
                    let reg = r.uleb();
                    let off = r.sleb() * data_align;
                    self.set(s, reg, Rule::At(off));
                }
                0x14 | 0x15 => {
                    let reg = r.uleb();
                    if op == 0x14 {
                        r.uleb();
                    } else {
                        r.sleb();
                    }
                    self.set(s, reg, Rule::Other);
                }
                0x2f => {
                    let reg = r.uleb();
                    let off = -(r.uleb() as i64) * data_align;
                    self.set(s, reg, Rule::At(off));
                }
                _ => return None,
            }
        }
        Some(())
    }
}
