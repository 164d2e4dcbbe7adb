//! Where the evaluation loop's code is in this process: the exported
//! symbol's range (the hot part) and the cold parts GCC split off it (the
//! paths it thinks unlikely, elsewhere in `.text`). A stripped build
//! (Debian's python3.11) names the cold part nowhere, and a native frame
//! there is still an activation of the loop, so the splice needs it.
//!
//! The profiler's finder (`profiler/src/python/eval_code.rs`) reads the
//! file; this one reads the loaded object once, at start-up, with no
//! allocation (the allocator is initialising), by the same rules:
//!
//! 1. candidates: targets outside the hot part of its near jumps (`jmp
//!    rel32`, `jcc rel32`, found by their opcode bytes: a byte pattern that
//!    is no instruction only adds a candidate that step 2 rejects), and the
//!    entries outside it of its computed-goto table (runs of at least
//!    [`TABLE_MIN`] code pointers in the writable data, most of them into the hot
//!    part; the loaded data is relocated, so a position-independent
//!    object's table holds addresses as an executable's does);
//! 2. confirmed by `.eh_frame`: the FDE covering the candidate starts with
//!    a frame already set up (CFA above rsp + 8, rbp saved), and its frame
//!    at the candidate is the hot part's where it leaves for it (at the
//!    jump, or at the table's entries into the hot part). A cold part continues the hot part's
//!    frame; an ordinary function begins with only its return address on
//!    the stack, so it is never taken for one.
//!
//! The part is that FDE's range.
use super::super::unwind::{CfaRule, FrameRules, RSP, RegRule, fde_covering, rules_at};

/// Cold parts kept at most (GCC makes one per function).
pub(crate) const MAX_COLD: usize = 4;
/// Candidates in set-up frames looked at, at most.
const MAX_SET_UP: usize = 64;
/// Shortest run of code pointers taken for a jump table.
const TABLE_MIN: usize = 8;
/// Code segments an object has, at most (one in practice).
const MAX_CODE_SEGMENTS: usize = 4;

/// `[start, end)` of each code segment, and how many there are.
#[derive(Default)]
struct CodeRanges([(usize, usize); MAX_CODE_SEGMENTS], usize);

impl CodeRanges {
    fn contains(&self, a: usize) -> bool {
        self.0[..self.1].iter().any(|&(lo, hi)| lo <= a && a < hi)
    }
}

/// The evaluation loop's code: `[start, end)` ranges of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EvalCode {
    pub hot: (usize, usize),
    pub cold: [(usize, usize); MAX_COLD],
    pub n_cold: usize,
    /// The object's load bias (its addresses are these minus the bias).
    pub bias: usize,
}

impl EvalCode {
    pub(crate) fn contains(&self, pc: usize) -> bool {
        (self.hot.0..self.hot.1).contains(&pc)
            || self.cold[..self.n_cold]
                .iter()
                .any(|&(lo, hi)| (lo..hi).contains(&pc))
    }

    pub(crate) fn cold_parts(&self) -> &[(usize, usize)] {
        &self.cold[..self.n_cold]
    }

    fn add_cold(&mut self, part: (usize, usize)) {
        if self.n_cold < MAX_COLD && !self.cold_parts().contains(&part) {
            self.cold[self.n_cold] = part;
            self.n_cold += 1;
            self.cold[..self.n_cold].sort_unstable();
        }
    }
}

/// The loaded object that holds the loop: its load bias and program
/// headers.
pub(crate) struct Object<'a> {
    pub bias: usize,
    pub phdrs: &'a [libc::Elf64_Phdr],
}

impl Object<'_> {
    /// The code segments (`PF_X`), or the writable data segments: the
    /// computed-goto table (`opcode_targets`) is a non-const array in every
    /// CPython, and relocated data (RELRO included) lies in a writable
    /// segment too, so the read-only ones (symbols, strings, a few MiB) are
    /// never scanned.
    fn segments(&self, exec: bool) -> impl Iterator<Item = (usize, usize)> + '_ {
        let wanted = if exec { libc::PF_X } else { libc::PF_W };
        self.phdrs
            .iter()
            .filter(move |p| {
                p.p_type == libc::PT_LOAD && p.p_flags & (libc::PF_X | libc::PF_W) == wanted
            })
            .map(move |p| {
                let start = self.bias + p.p_vaddr as usize;
                // Data: the file's bytes only (the rest is zeroed .bss).
                let len = if exec { p.p_memsz } else { p.p_filesz };
                (start, start + len as usize)
            })
    }

    /// The code segments, at most [`MAX_CODE_SEGMENTS`], read once: the
    /// table scan tests every word of the data against them.
    fn code_ranges(&self) -> CodeRanges {
        let mut ranges = CodeRanges::default();
        for seg in self.segments(true).take(MAX_CODE_SEGMENTS) {
            ranges.0[ranges.1] = seg;
            ranges.1 += 1;
        }
        ranges
    }

    fn eh_frame_hdr(&self) -> Option<usize> {
        self.phdrs
            .iter()
            .find(|p| p.p_type == libc::PT_GNU_EH_FRAME)
            .map(|p| self.bias + p.p_vaddr as usize)
    }
}

fn is_set_up(r: &FrameRules) -> bool {
    matches!(r.cfa, CfaRule::Reg(RSP, off) if off > 8) && matches!(r.rbp, RegRule::At(_))
}

/// A candidate cold-part address, and an address in the hot part whose
/// frame state the cold part must continue: the jump's source, or another
/// entry of the same table.
struct Candidate {
    target: usize,
    hot: usize,
}

/// Finds the cold parts of the loop whose hot part is `[lo, hi)` in `obj`.
///
/// # Safety
/// `obj` is a loaded object (its segments and CFI mapped) and `[lo, hi)`
/// lies in one of its executable segments.
pub(crate) unsafe fn find(obj: &Object<'_>, lo: usize, hi: usize) -> EvalCode {
    let mut found = EvalCode {
        hot: (lo, hi),
        bias: obj.bias,
        ..EvalCode::default()
    };
    let Some(hdr) = obj.eh_frame_hdr() else {
        return found;
    };
    // Candidates in FDEs that start with a set-up frame, then the hot
    // part's frame states where it leaves for them (each runs the loop's
    // long CFI, so only for these), then the check.
    let mut set_up = [(0usize, 0usize, None); MAX_SET_UP];
    let mut n = 0;
    let mut states = [None; MAX_SET_UP];
    // SAFETY: the caller's contract; hdr is the object's mapped CFI.
    unsafe {
        scan(obj, lo, hi, |c| {
            let Some((start, end, first)) = fde_covering(hdr, c.target) else {
                return;
            };
            if (start, end) == (lo, hi) || !is_set_up(&first) || n == MAX_SET_UP {
                return;
            }
            let state = rules_at(hdr, c.hot);
            if !set_up[..n].contains(&(start, end, Some(first))) || !states[..n].contains(&state) {
                set_up[n] = (start, end, Some(first));
                states[n] = state;
                n += 1;
            }
        });
    }
    for &(start, end, first) in &set_up[..n] {
        if states[..n].contains(&first) {
            found.add_cold((start, end));
        }
    }
    found
}

/// Calls `f` with the near jumps out of the hot part and the entries
/// outside it of its computed-goto tables.
///
/// # Safety
/// As [`find`].
unsafe fn scan(obj: &Object<'_>, lo: usize, hi: usize, mut f: impl FnMut(Candidate)) {
    // SAFETY: the caller's contract: the hot part is mapped code.
    let code = unsafe { core::slice::from_raw_parts(lo as *const u8, hi - lo) };
    let code_ranges = obj.code_ranges();
    for (i, target) in jump_targets(code, lo) {
        if !(lo..hi).contains(&target) && code_ranges.contains(target) {
            f(Candidate {
                target,
                hot: lo + i,
            });
        }
    }
    // SAFETY: the caller's contract.
    unsafe { table_entries(obj, (lo, hi), &mut f) };
}

/// The near jumps of `code` (at `base`): offset of the opcode and target.
fn jump_targets(code: &[u8], base: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let rel = |at: usize| {
        code.get(at..at + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as isize)
    };
    (0..code.len()).filter_map(move |i| {
        let (len, disp) = match code[i] {
            0xe9 => (5, rel(i + 1)?),
            0x0f if matches!(code.get(i + 1), Some(&(0x80..=0x8f))) => (6, rel(i + 2)?),
            _ => return None,
        };
        Some((i, (base + i + len).wrapping_add_signed(disp)))
    })
}

/// The entries outside `hot` of the data's code-pointer runs that point
/// mostly into it.
///
/// # Safety
/// As [`find`].
unsafe fn table_entries(obj: &Object<'_>, hot: (usize, usize), f: &mut impl FnMut(Candidate)) {
    let inside = |v: usize| (hot.0..hot.1).contains(&v);
    let code = obj.code_ranges();
    for (start, end) in obj.segments(false) {
        let first = start.next_multiple_of(8);
        let words = end.saturating_sub(first) / 8;
        // SAFETY: the caller's contract: a mapped data segment.
        let data = unsafe { core::slice::from_raw_parts(first as *const usize, words) };
        // Runs of code pointers; most words are none, and cost one test.
        let mut k = 0;
        while k < data.len() {
            if !code.contains(data[k]) {
                k += 1;
                continue;
            }
            let run_start = k;
            while k < data.len() && code.contains(data[k]) {
                k += 1;
            }
            let run = &data[run_start..k];
            let n_inside = run.iter().filter(|&&v| inside(v)).count();
            if run.len() < TABLE_MIN || 2 * n_inside < run.len() {
                continue;
            }
            let Some(&in_hot) = run.iter().find(|&&v| inside(v)) else {
                continue;
            };
            for &target in run.iter().filter(|&&v| !inside(v)) {
                f(Candidate {
                    target,
                    hot: in_hot,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_jumps_give_their_targets() {
        // jmp +0x10; nop; je -0x20; mov eax, 1 (no jump); jne at the end,
        // cut short (no target).
        let code = [
            0xe9, 0x10, 0, 0, 0, 0x90, 0x0f, 0x84, 0xe0, 0xff, 0xff, 0xff, 0xb8, 1, 0, 0, 0, 0x0f,
            0x85, 0,
        ];
        let base = 0x1000;
        let found: Vec<(usize, usize)> = jump_targets(&code, base).collect();
        assert_eq!(found, [(0, 0x1000 + 5 + 0x10), (6, 0x1000 + 12 - 0x20)]);
    }

    #[test]
    fn cold_parts_count_in_the_loop_code() {
        let mut e = EvalCode {
            hot: (0x2000, 0x3000),
            ..EvalCode::default()
        };
        e.add_cold((0x500, 0x600));
        e.add_cold((0x100, 0x200));
        e.add_cold((0x500, 0x600));
        assert_eq!(e.cold_parts(), [(0x100, 0x200), (0x500, 0x600)]);
        assert!(e.contains(0x2000) && e.contains(0x150) && e.contains(0x5ff));
        assert!(!e.contains(0x3000) && !e.contains(0x600) && !e.contains(0x1000));
    }
}
