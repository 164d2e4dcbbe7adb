//! The in-process unwinder: x86-64 call-frame information (.eh_frame,
//! found through each object's .eh_frame_hdr search table), with a
//! checked frame-pointer walk for code that has none.
//!
//! It allocates nothing, takes no lock (the object table is read without
//! one; a refresh after dlopen happens only outside signal handlers), and
//! reads only memory the CFI says holds saved registers, so it may run
//! inside malloc and inside a SIGPROF handler.
//!
//! The CFI in force at a pc is turned into the project's compact unwind row
//! (`profiler_common::unwind`) and applied by the same step function the
//! kernel walker follows, so there is one description of how to unwind.
//!
//! Rules understood (all that gcc, clang and rustc emit for x86-64 code):
//! CFA = rsp/rbp + offset, or the PLT's expression (breg/lit/and/ge/shl/
//! plus); rbp and the return address saved at CFA + n, unchanged, or
//! undefined (the outermost frame: `_start`, `clone3`). A frame any other
//! rule describes ends the stack as truncated.
use profiler_common::unwind::{self, Frame, UnwindRow};

use super::objects::{self, Object};

const RSP: u64 = 7;
const RBP: u64 = 6;
const RIP: u64 = 16;

#[derive(Clone, Copy, Debug)]
pub struct Regs {
    pub pc: usize,
    pub sp: usize,
    pub bp: usize,
}

/// How a stack walk ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    /// Reached the outermost frame.
    Complete,
    /// The depth limit, or a frame that could not be unwound.
    Truncated,
}

/// Walks the stack from `regs`, writing return addresses (and the leaf pc
/// first) into `out`. `refresh`: the object table may be refreshed when a
/// pc is unknown (false in signal handlers).
pub fn walk(mut regs: Regs, out: &mut [u64], refresh: bool) -> (usize, Status) {
    let mut n = 0;
    let mut leaf = true;
    loop {
        if regs.pc == 0 {
            return (n, Status::Complete);
        }
        if n == out.len() {
            return (n, Status::Truncated);
        }
        out[n] = regs.pc as u64;
        n += 1;
        // A return address may point just past the end of its caller
        // (a call to a noreturn function): look up the call instruction.
        let lookup = if leaf { regs.pc } else { regs.pc - 1 };
        leaf = false;
        let obj = if refresh {
            objects::find_or_refresh(lookup)
        } else {
            objects::find(lookup)
        };
        let Some(obj) = obj else {
            return (n, Status::Truncated);
        };
        match step(obj, lookup, &regs) {
            Step::Next(next) => regs = next,
            Step::Outermost => return (n, Status::Complete),
            Step::Fail => return (n, Status::Truncated),
        }
    }
}

/// Captures the caller's registers and walks from there.
#[inline(never)]
pub fn walk_here(out: &mut [u64]) -> (usize, Status) {
    let (pc, sp, bp): (usize, usize, usize);
    // SAFETY: reads rip, rsp and rbp; writes nothing.
    unsafe {
        core::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc, sp = out(reg) sp, bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    walk(Regs { pc, sp, bp }, out, true)
}

/// The stack pointer of the first frame, counting from the caller's,
/// whose pc lies outside `lo..hi`: where the code that called into that
/// range has its frame. None when the walk fails first.
#[inline(never)]
pub fn sp_outside(lo: usize, hi: usize) -> Option<usize> {
    let (pc, sp, bp): (usize, usize, usize);
    // SAFETY: reads rip, rsp and rbp; writes nothing.
    unsafe {
        core::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc, sp = out(reg) sp, bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    let mut regs = Regs { pc, sp, bp };
    let mut leaf = true;
    for _ in 0..256 {
        if !(lo..hi).contains(&regs.pc) {
            return Some(regs.sp);
        }
        let lookup = if leaf { regs.pc } else { regs.pc - 1 };
        leaf = false;
        let obj = objects::find_or_refresh(lookup)?;
        match step(obj, lookup, &regs) {
            Step::Next(next) => regs = next,
            _ => return None,
        }
    }
    None
}

enum Step {
    Next(Regs),
    Outermost,
    Fail,
}

fn step(obj: &Object, pc: usize, regs: &Regs) -> Step {
    if obj.eh_frame_hdr != 0 {
        // SAFETY: the eh_frame_hdr and eh_frame of a loaded object are
        // mapped read-only for its lifetime.
        if let Some(rules) = unsafe { find_rules(obj.eh_frame_hdr, pc) } {
            return match row_at(&rules, regs) {
                Some(row) => apply_row(&row, regs),
                None => Step::Fail,
            };
        }
    }
    frame_pointer_step(regs)
}

/// The compact unwind row (the project's one description of how to unwind
/// a frame, `profiler_common::unwind`) for the rules in force at this pc, so
/// that this unwinder and the kernel walker apply the same rules the same way.
fn row_at(r: &Rules, regs: &Regs) -> Option<UnwindRow> {
    if r.ra == Rule::Undefined {
        return UnwindRow::new(0, unwind::CFA_END, 0, unwind::RBP_SAME, 0);
    }
    // x86-64 code always saves the return address just below the CFA.
    if r.ra != Rule::At(-8) {
        return None;
    }
    let (cfa_kind, cfa_offset) = match r.cfa {
        Cfa::Reg(RSP, off) => (unwind::CFA_RSP, off),
        Cfa::Reg(RBP, off) => (unwind::CFA_RBP, off),
        Cfa::Reg(..) => return None,
        // A DWARF expression (the PLT's): evaluated at this very pc it is
        // rsp plus a constant, which is what the row records.
        // SAFETY: the expression lies in mapped CFI.
        Cfa::Expr(p, len) => (
            unwind::CFA_RSP,
            (unsafe { eval(p, len, regs) }? as i64).wrapping_sub(regs.sp as i64),
        ),
    };
    let (rbp_kind, rbp_offset) = match r.rbp {
        Rule::At(off) => (unwind::RBP_OFFSET, off),
        Rule::Undefined => (unwind::RBP_UNDEFINED, 0),
        // rbp is callee-saved: a rule this unwinder does not follow leaves
        // the caller's value where it was.
        Rule::Same | Rule::Other => (unwind::RBP_SAME, 0),
    };
    UnwindRow::new(0, cfa_kind, cfa_offset, rbp_kind, rbp_offset)
}

/// Applies `row` with the shared step, reading only slots of this frame:
/// between rsp and 256 MiB above it, 8-byte aligned.
fn apply_row(row: &UnwindRow, regs: &Regs) -> Step {
    let sp = regs.sp as u64;
    let read = |addr: u64| -> Option<u64> {
        if addr < sp || addr - sp > 256 << 20 || !addr.is_multiple_of(8) {
            return None;
        }
        // SAFETY: the CFI says a register is saved there, in this thread's
        // stack between rsp and the caller's frame (checked above).
        Some(unsafe { *(addr as *const u64) })
    };
    next(unwind::step(row, &frame_of(regs), read), regs)
}

/// A frame-pointer step, for code without CFI: rbp points to the saved
/// rbp, the return address above it. Every read goes through
/// process_vm_readv, so a bad rbp cannot fault.
fn frame_pointer_step(regs: &Regs) -> Step {
    let bp = regs.bp;
    if !bp.is_multiple_of(8) || bp <= regs.sp || bp - regs.sp > 64 << 20 {
        return Step::Fail;
    }
    let read = |addr: u64| -> Option<u64> {
        let mut word = [0u64; 1];
        safe_read(addr as usize, &mut word).then_some(word[0])
    };
    next(unwind::step_frame_pointer(&frame_of(regs), read), regs)
}

fn frame_of(regs: &Regs) -> Frame {
    Frame {
        pc: regs.pc as u64,
        sp: regs.sp as u64,
        bp: regs.bp as u64,
    }
}

/// This walker's view of a shared step: the caller's frame must lie above
/// ours on the same stack.
fn next(step: unwind::Step, regs: &Regs) -> Step {
    match step {
        unwind::Step::Caller { frame, .. } if frame.pc == 0 => Step::Outermost,
        unwind::Step::Caller { frame, .. }
            if frame.sp > regs.sp as u64 && frame.sp.is_multiple_of(8) =>
        {
            Step::Next(Regs {
                pc: frame.pc as usize,
                sp: frame.sp as usize,
                bp: frame.bp as usize,
            })
        }
        unwind::Step::End => Step::Outermost,
        _ => Step::Fail,
    }
}

fn safe_read(addr: usize, out: &mut [u64]) -> bool {
    let len = core::mem::size_of_val(out);
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads our own memory into `out`; the kernel checks the range.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == len as isize
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rule {
    /// Same value as in the callee (also the default).
    Same,
    Undefined,
    /// Saved at CFA + n.
    At(i64),
    /// Something this unwinder does not follow.
    Other,
}

#[derive(Clone, Copy, Debug)]
enum Cfa {
    Reg(u64, i64),
    /// A DWARF expression (address, length) in the CFI.
    Expr(usize, usize),
}

#[derive(Clone, Copy, Debug)]
struct Rules {
    cfa: Cfa,
    rbp: Rule,
    ra: Rule,
}

/// A cursor over CFI bytes.
struct Reader {
    p: usize,
}

impl Reader {
    unsafe fn u8(&mut self) -> u8 {
        // SAFETY: caller keeps the cursor inside mapped CFI.
        let v = unsafe { *(self.p as *const u8) };
        self.p += 1;
        v
    }
    unsafe fn u16(&mut self) -> u16 {
        // SAFETY: as above.
        let v = unsafe { (self.p as *const u16).read_unaligned() };
        self.p += 2;
        v
    }
    unsafe fn u32(&mut self) -> u32 {
        // SAFETY: as above.
        let v = unsafe { (self.p as *const u32).read_unaligned() };
        self.p += 4;
        v
    }
    unsafe fn u64(&mut self) -> u64 {
        // SAFETY: as above.
        let v = unsafe { (self.p as *const u64).read_unaligned() };
        self.p += 8;
        v
    }
    unsafe fn uleb(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            // SAFETY: as above.
            let b = unsafe { self.u8() };
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                return v;
            }
        }
    }
    unsafe fn sleb(&mut self) -> i64 {
        let mut v = 0i64;
        let mut shift = 0;
        loop {
            // SAFETY: as above.
            let b = unsafe { self.u8() };
            if shift < 64 {
                v |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return v;
            }
        }
    }
    /// A pointer in DW_EH_PE encoding `enc`; `data` is the base of
    /// datarel pointers (the .eh_frame_hdr). None for unsupported forms.
    unsafe fn pointer(&mut self, enc: u8, data: usize) -> Option<usize> {
        let at = self.p;
        // SAFETY: as above.
        let v = unsafe {
            match enc & 0x0f {
                0x00 => self.u64() as usize,
                0x01 => self.uleb() as usize,
                0x02 => self.u16() as usize,
                0x03 => self.u32() as usize,
                0x04 => self.u64() as usize,
                0x09 => self.sleb() as usize,
                0x0a => self.u16() as i16 as isize as usize,
                0x0b => self.u32() as i32 as isize as usize,
                0x0c => self.u64() as usize,
                _ => return None,
            }
        };
        let base = match enc & 0x70 {
            0x00 => 0,
            0x10 => at,
            0x30 => data,
            _ => return None,
        };
        if enc & 0x80 != 0 {
            return None; // indirect: only used for personality routines
        }
        Some(base.wrapping_add(v))
    }
}

/// Finds the FDE covering `pc` through the .eh_frame_hdr binary-search
/// table and runs its CFI up to `pc`.
///
/// # Safety
/// `hdr` is a loaded object's .eh_frame_hdr.
unsafe fn find_rules(hdr: usize, pc: usize) -> Option<Rules> {
    // SAFETY: all reads stay inside the object's CFI (lengths from the
    // headers, which the linker wrote).
    unsafe {
        let mut r = Reader { p: hdr };
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
        let table = r.p as *const [i32; 2];
        let (mut lo, mut hi) = (0usize, count);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if hdr.wrapping_add((*table.add(mid))[0] as isize as usize) <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let fde = hdr.wrapping_add((*table.add(lo))[1] as isize as usize);
        run_fde(fde, hdr, pc)
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
unsafe fn run_fde(fde: usize, hdr: usize, pc: usize) -> Option<Rules> {
    // SAFETY: see find_rules.
    unsafe {
        let mut r = Reader { p: fde };
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
        let cie = parse_cie(cie_field - cie_off, hdr)?;
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
            &cie,
            cie.insns,
            cie.end,
            &mut state,
            None,
            &mut loc,
            usize::MAX,
        )?;
        let initial = state;
        execute(&cie, r.p, end, &mut state, Some(&initial), &mut loc, pc)?;
        Some(state)
    }
}

/// # Safety
/// `cie` is a CIE of mapped .eh_frame.
unsafe fn parse_cie(cie: usize, hdr: usize) -> Option<Cie> {
    // SAFETY: see find_rules.
    unsafe {
        let mut r = Reader { p: cie };
        let len = r.u32();
        if len == 0 || len == u32::MAX {
            return None;
        }
        let end = r.p + len as usize;
        if r.u32() != 0 {
            return None;
        }
        let version = r.u8();
        let aug = r.p;
        while r.u8() != 0 {}
        let aug = core::slice::from_raw_parts(aug as *const u8, r.p - aug - 1);
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
unsafe fn execute(
    cie: &Cie,
    p: usize,
    end: usize,
    s: &mut Rules,
    initial: Option<&Rules>,
    loc: &mut usize,
    pc: usize,
) -> Option<()> {
    const STACK: usize = 8;
    let mut saved = [*s; STACK];
    let mut depth = 0;
    let ra = cie.ra_reg;
    let set = |s: &mut Rules, reg: u64, rule: Rule| {
        if reg == RBP {
            s.rbp = rule;
        } else if reg == ra {
            s.ra = rule;
        }
    };
    let restore = |s: &mut Rules, reg: u64| {
        if let Some(i) = initial {
            if reg == RBP {
                s.rbp = i.rbp;
            } else if reg == ra {
                s.ra = i.ra;
            }
        }
    };
    // SAFETY: the caller's contract; every read advances inside p..end.
    unsafe {
        let mut r = Reader { p };
        while r.p < end {
            let op = r.u8();
            let advance = |loc: &mut usize, delta: u64| -> bool {
                let next = loc.wrapping_add((delta * cie.code_align) as usize);
                if next > pc {
                    return false;
                }
                *loc = next;
                true
            };
            match op >> 6 {
                1 => {
                    if !advance(loc, u64::from(op & 0x3f)) {
                        return Some(());
                    }
                    continue;
                }
                2 => {
                    let off = r.uleb() as i64 * cie.data_align;
                    set(s, u64::from(op & 0x3f), Rule::At(off));
                    continue;
                }
                3 => {
                    restore(s, u64::from(op & 0x3f));
                    continue;
                }
                _ => {}
            }
            match op {
                0x00 => {}
                0x01 => {
                    let to = r.pointer(cie.fde_enc, 0)?;
                    if to > pc {
                        return Some(());
                    }
                    *loc = to;
                }
                0x02 => {
                    let d = u64::from(r.u8());
                    if !advance(loc, d) {
                        return Some(());
                    }
                }
                0x03 => {
                    let d = u64::from(r.u16());
                    if !advance(loc, d) {
                        return Some(());
                    }
                }
                0x04 => {
                    let d = u64::from(r.u32());
                    if !advance(loc, d) {
                        return Some(());
                    }
                }
                0x05 => {
                    let reg = r.uleb();
                    let off = r.uleb() as i64 * cie.data_align;
                    set(s, reg, Rule::At(off));
                }
                0x06 => {
                    let reg = r.uleb();
                    restore(s, reg);
                }
                0x07 => {
                    let reg = r.uleb();
                    set(s, reg, Rule::Undefined);
                }
                0x08 => {
                    let reg = r.uleb();
                    set(s, reg, Rule::Same);
                }
                0x09 => {
                    let reg = r.uleb();
                    r.uleb();
                    set(s, reg, Rule::Other);
                }
                0x0a => {
                    if depth == STACK {
                        return None;
                    }
                    saved[depth] = *s;
                    depth += 1;
                }
                0x0b => {
                    if depth == 0 {
                        return None;
                    }
                    depth -= 1;
                    // The whole row, CFA included (what gcc's epilogues
                    // after a `ret` in mid-function rely on).
                    *s = saved[depth];
                }
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
                0x10 | 0x16 => {
                    let reg = r.uleb();
                    let len = r.uleb() as usize;
                    r.p += len;
                    set(s, reg, Rule::Other);
                }
                0x11 => {
                    let reg = r.uleb();
                    let off = r.sleb() * cie.data_align;
                    set(s, reg, Rule::At(off));
                }
                0x12 => {
                    let reg = r.uleb();
                    let off = r.sleb() * cie.data_align;
                    s.cfa = Cfa::Reg(reg, off);
                }
                0x13 => {
                    let off = r.sleb() * cie.data_align;
                    if let Cfa::Reg(reg, _) = s.cfa {
                        s.cfa = Cfa::Reg(reg, off);
                    }
                }
                0x14 | 0x15 => {
                    let reg = r.uleb();
                    if op == 0x14 {
                        r.uleb();
                    } else {
                        r.sleb();
                    }
                    set(s, reg, Rule::Other);
                }
                0x2e => {
                    r.uleb();
                }
                0x2f => {
                    let reg = r.uleb();
                    let off = -(r.uleb() as i64) * cie.data_align;
                    set(s, reg, Rule::At(off));
                }
                _ => return None,
            }
        }
        Some(())
    }
}

/// Evaluates a CFA expression of the forms the PLT uses.
///
/// # Safety
/// `p..p+len` lies in mapped .eh_frame.
unsafe fn eval(p: usize, len: usize, regs: &Regs) -> Option<usize> {
    let mut stack = [0usize; 8];
    let mut n = 0usize;
    let mut r = Reader { p };
    let end = p + len;
    // SAFETY: reads stay inside the expression.
    unsafe {
        while r.p < end {
            let op = r.u8();
            let v = match op {
                0x30..=0x4f => Some(usize::from(op - 0x30)),
                0x70..=0x8f => {
                    let off = r.sleb();
                    let base = match u64::from(op - 0x70) {
                        RSP => regs.sp,
                        RBP => regs.bp,
                        RIP => regs.pc,
                        _ => return None,
                    };
                    Some(base.wrapping_add(off as usize))
                }
                0x08 => Some(usize::from(r.u8())),
                0x23 => {
                    let c = r.uleb() as usize;
                    let top = stack.get_mut(n.checked_sub(1)?)?;
                    *top = top.wrapping_add(c);
                    None
                }
                0x1a | 0x2a | 0x24 | 0x22 | 0x1c => {
                    if n < 2 {
                        return None;
                    }
                    let (a, b) = (stack[n - 2], stack[n - 1]);
                    n -= 2;
                    Some(match op {
                        0x1a => a & b,
                        0x2a => usize::from(a as isize >= b as isize),
                        0x24 => a.wrapping_shl(b as u32),
                        0x22 => a.wrapping_add(b),
                        _ => a.wrapping_sub(b),
                    })
                }
                _ => return None,
            };
            if let Some(v) = v {
                *stack.get_mut(n)? = v;
                n += 1;
            }
        }
    }
    if n == 0 { None } else { Some(stack[n - 1]) }
}
