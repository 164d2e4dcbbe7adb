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
use core::mem::MaybeUninit;

use profiler_common::unwind::{self, Frame, UnwindRow};

use self::{
    cfi::{Cfa, Rule, Rules, find_rules},
    dwarf::eval,
};
use super::objects::{self, Object};

mod cfi;
mod dwarf;
mod row_cache;
mod search_index;
mod source;

// DWARF register numbers of x86-64.
pub(crate) const RSP: u64 = 7;
pub(crate) const RBP: u64 = 6;

pub(crate) use cfi::{Cfa as CfaRule, Rule as RegRule, Rules as FrameRules, fde_covering};
pub(crate) use search_index::{SearchIndex, build as build_search_index};

/// The CFI rules in force at `pc`.
///
/// # Safety
/// `hdr` is a loaded object's .eh_frame_hdr.
pub(crate) unsafe fn rules_at(hdr: usize, pc: usize) -> Option<FrameRules> {
    // SAFETY: the caller's contract.
    unsafe { find_rules(&source::Source::memory(), hdr, pc) }
}
const RIP: u64 = 16;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Regs {
    pub(crate) pc: usize,
    pub(crate) sp: usize,
    pub(crate) bp: usize,
}

/// How a stack walk ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Status {
    /// Reached the outermost frame.
    Complete,
    /// The depth limit, or a frame that could not be unwound.
    Truncated,
}

/// Walks the stack from `regs`, writing return addresses (and the leaf pc
/// first) into `out`. `refresh`: the object table may be refreshed when a
/// pc is unknown (false in signal handlers).
pub(crate) fn walk(regs: Regs, out: &mut [u64], refresh: bool) -> (usize, Status) {
    // SAFETY: MaybeUninit<u64> has u64's layout, and the walk writes only
    // initialised values.
    let out = unsafe { &mut *(core::ptr::from_mut(out) as *mut [MaybeUninit<u64>]) };
    walk_into(regs, out, refresh)
}

/// [`walk`] into a buffer that need not be initialised: the first `n`
/// entries (the count returned) are written, the rest left as they were.
#[unsafe(link_section = ".text.hot.profalloc")]
fn walk_into(mut regs: Regs, out: &mut [MaybeUninit<u64>], refresh: bool) -> (usize, Status) {
    let files = source::WalkFiles::new();
    let mut n = 0;
    let mut leaf = true;
    loop {
        if regs.pc == 0 {
            return (n, Status::Complete);
        }
        if n == out.len() {
            return (n, Status::Truncated);
        }
        out[n].write(regs.pc as u64);
        n += 1;
        // A return address may point just past the end of its caller
        // (a call to a noreturn function): look up the call instruction.
        let lookup = if leaf { regs.pc } else { regs.pc - 1 };
        leaf = false;
        // A cached row was read from a known object, and the object table
        // never forgets one: on a hit, no object lookup.
        let next = match row_cache::get(lookup) {
            Some(row) => apply_row(&row, &regs),
            None => {
                let obj = if refresh {
                    objects::find_or_refresh(lookup)
                } else {
                    objects::find(lookup)
                };
                let Some(obj) = obj else {
                    return (n, Status::Truncated);
                };
                step(obj, lookup, &regs, &files)
            }
        };
        match next {
            Step::Next(next) => regs = next,
            Step::Outermost => return (n, Status::Complete),
            Step::Fail => return (n, Status::Truncated),
        }
    }
}

/// Captures the registers where it is inlined (pc, sp and bp of the same
/// instruction) and walks from there: inlined, the walk starts in the
/// caller's own frame, one step fewer. `out` need not be initialised (see
/// [`walk_into`]).
#[inline(always)]
pub(crate) fn walk_here(out: &mut [MaybeUninit<u64>]) -> (usize, Status) {
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
    walk_into(Regs { pc, sp, bp }, out, true)
}

/// The stack pointer of the first frame, counting from the caller's,
/// whose pc lies outside `lo..hi`: where the code that called into that
/// range has its frame. None when the walk fails first.
#[inline(never)]
pub(crate) fn sp_outside(lo: usize, hi: usize) -> Option<usize> {
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
    let files = source::WalkFiles::new();
    let mut leaf = true;
    for _ in 0..256 {
        if !(lo..hi).contains(&regs.pc) {
            return Some(regs.sp);
        }
        let lookup = if leaf { regs.pc } else { regs.pc - 1 };
        leaf = false;
        let obj = objects::find_or_refresh(lookup)?;
        match step(obj, lookup, &regs, &files) {
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

/// One frame's step; a CFI read from the object's file goes through the
/// walk's `files`.
#[unsafe(link_section = ".text.hot.profalloc")]
fn step(obj: &Object, pc: usize, regs: &Regs, files: &source::WalkFiles) -> Step {
    if let Some(row) = row_cache::get(pc) {
        return apply_row(&row, regs);
    }
    if obj.eh_frame_hdr != 0 {
        let src = source::Source::of(obj, files);
        // SAFETY: the eh_frame_hdr and eh_frame of a loaded object are
        // mapped read-only for its lifetime.
        if let Some(rules) = unsafe { find_rules(&src, obj.eh_frame_hdr, pc) } {
            return match row_at(&rules, regs, &src) {
                Some(row) => {
                    if !matches!(rules.cfa, Cfa::Expr(..)) {
                        row_cache::put(pc, &row);
                    }
                    apply_row(&row, regs)
                }
                None => Step::Fail,
            };
        }
    }
    frame_pointer_step(regs)
}

/// The compact unwind row (the project's one description of how to unwind
/// a frame, `profiler_common::unwind`) for the rules in force at this pc, so
/// that this unwinder and the kernel walker apply the same rules the same way.
fn row_at(r: &Rules, regs: &Regs, src: &source::Source<'_>) -> Option<UnwindRow> {
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
            (unsafe { eval(src, p, len, regs) }? as i64).wrapping_sub(regs.sp as i64),
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
/// between rsp and 256 MiB above it, 8-byte aligned. Inlined into the
/// walk's loop (a cached row is the common step): the step's result then
/// stays in registers.
#[inline(always)]
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
    // The rows built here name no register of the sampled frame.
    next(unwind::step(row, &frame_of(regs), None, read), regs)
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
        // This unwinder does not track rbx (no row it builds is based on it).
        bx: 0,
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
    // SAFETY: any bytes are a valid u64.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), core::mem::size_of_val(out))
    };
    safe_read_bytes(addr, bytes)
}

/// Reads `out.len()` bytes of this process at `addr` without faulting
/// (process_vm_readv): false when any of them is not mapped readable.
pub(crate) fn safe_read_bytes(addr: usize, out: &mut [u8]) -> bool {
    let len = out.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn recurse(n: usize, out: &mut [MaybeUninit<u64>]) -> (usize, Status) {
        // black_box after each call: no tail calls, one frame per level.
        let r = if n == 0 {
            walk_here(out)
        } else {
            recurse(n - 1, out)
        };
        core::hint::black_box(r)
    }

    #[test]
    fn walks_through_recursive_frames_with_cfi() {
        let mut frames = [MaybeUninit::uninit(); 128];
        let (n, status) = recurse(6, &mut frames);
        // SAFETY: the walk wrote the first n entries.
        let frames: &[u64] = unsafe { core::slice::from_raw_parts(frames.as_ptr().cast(), n) };
        // A pc in recurse(0) (walk_here is inlined there), then recurse(0)'s
        // return into recurse(1), which repeats for every level above: the
        // same return address six times in a row.
        assert!(n > 7, "only {n} frames ({status:?})");
        let ra = frames[1];
        assert_eq!(frames[1..7], [ra; 6], "{:x?}", &frames[..n]);
        assert_ne!(frames[7], ra);
    }
}
