//! Rows for a lazy-binding `.plt` that no FDE describes. LLD never emits
//! unwind information for the PLT (the Rust toolchain's `libLLVM` and
//! `librustc_driver` are linked by it), so a sample in a stub such as
//! `free@plt` had no row and its frame-pointer guess lost the caller.
//!
//! The rows are those ld.bfd writes for its own `.plt` (`PLT0`: CFA =
//! rsp+16, rsp+24 after its push; the entries: the `CFA_PLT` expression,
//! whose threshold is the end of the entry's push). They are given only
//! when the code has the layout they describe, read from the section's
//! bytes: `PLT0` pushes `GOT+8`, and every 16-byte entry has its `push`
//! at the same offset (6 after `jmp *GOT(%rip)`, or 4 after `endbr64`).
use profiler_common::unwind::{CFA_PLT, CFA_RSP, RBP_SAME, UnwindRow};

/// Bytes of `PLT0` and of each entry.
const ENTRY: usize = 16;
/// `push imm32`.
const PUSH_IMM: u8 = 0x68;
/// Length of `push imm32`.
const PUSH_LEN: usize = 5;
/// `PLT0`'s `push disp32(%rip)` and its length.
const PUSH_GOT: [u8; 2] = [0xff, 0x35];
const PUSH_GOT_LEN: u64 = 6;

/// The rows of the lazy-binding `.plt` at `start` whose bytes are `code`:
/// (address, row) in address order; the rows end at `start + code.len()`.
/// `None` when the code does not have the standard layout.
pub fn lazy_plt_rows(start: u64, code: &[u8]) -> Option<Vec<(u64, UnwindRow)>> {
    if !start.is_multiple_of(ENTRY as u64)
        || !code.len().is_multiple_of(ENTRY)
        || code.len() < 2 * ENTRY
        || code[..2] != PUSH_GOT
    {
        return None;
    }
    let entries = code[ENTRY..].chunks_exact(ENTRY);
    let push_at = push_offset(&code[ENTRY..2 * ENTRY])?;
    if entries.clone().any(|e| push_offset(e) != Some(push_at)) {
        return None;
    }
    let rsp = |offset| UnwindRow::new(0, CFA_RSP, offset, RBP_SAME, 0);
    // The CFA grows by 8 from the instruction after the entry's push.
    let threshold = (push_at + PUSH_LEN) as i64;
    Some(vec![
        (start, rsp(16)?),
        (start + PUSH_GOT_LEN, rsp(24)?),
        (
            start + ENTRY as u64,
            UnwindRow::new(0, CFA_PLT, 8, RBP_SAME, threshold)?,
        ),
    ])
}

/// Where an entry pushes its relocation index: after `jmp *disp32(%rip)`
/// (`ff 25`, 6 bytes) or after `endbr64` (`f3 0f 1e fa`, 4 bytes).
fn push_offset(entry: &[u8]) -> Option<usize> {
    match entry {
        [0xff, 0x25, _, _, _, _, PUSH_IMM, ..] => Some(6),
        [0xf3, 0x0f, 0x1e, 0xfa, PUSH_IMM, ..] => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{Frame, Step, step};

    use super::*;

    /// LLD's `.plt`: PLT0, then `jmp *GOT(%rip); push $i; jmp PLT0`.
    fn lld_plt(entries: u8) -> Vec<u8> {
        let mut code = vec![
            0xff, 0x35, 1, 2, 3, 4, 0xff, 0x25, 5, 6, 7, 8, 0x0f, 0x1f, 0x40, 0,
        ];
        for i in 0..entries {
            code.extend([
                0xff, 0x25, 9, 9, 9, 0, 0x68, i, 0, 0, 0, 0xe9, 0xe0, 0xff, 0xff, 0xff,
            ]);
        }
        code
    }

    /// The caller found from `pc` with rsp at `sp`, reading a stack on which
    /// `[sp + k]` holds `k` for the slots a stub may have pushed.
    fn caller(rows: &[(u64, UnwindRow)], pc: u64, sp: u64) -> u64 {
        let row = rows.iter().rev().find(|(a, _)| *a <= pc).unwrap().1;
        let frame = Frame {
            pc,
            sp,
            bp: 0,
            bx: 0,
        };
        match step(&row, &frame, None, |addr| Some(addr - sp)) {
            Step::Caller { frame, .. } => frame.pc,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lld_stubs_find_their_return_address() {
        let start = 0x837d910;
        let rows = lazy_plt_rows(start, &lld_plt(3)).expect("standard layout");
        // An entry's jmp and push: the return address is at [rsp].
        assert_eq!(caller(&rows, start + 0x30, 0x1000), 0);
        assert_eq!(caller(&rows, start + 0x36, 0x1000), 0);
        // After its push, at [rsp + 8].
        assert_eq!(caller(&rows, start + 0x3b, 0x1000), 8);
        // PLT0 after the entry's push, then after its own.
        assert_eq!(caller(&rows, start, 0x1000), 8);
        assert_eq!(caller(&rows, start + 6, 0x1000), 16);
    }

    #[test]
    fn ibt_entries_push_after_endbr64() {
        let mut code = lld_plt(0);
        code.extend([
            0xf3, 0x0f, 0x1e, 0xfa, 0x68, 0, 0, 0, 0, 0xf2, 0xe9, 0xe1, 0xff, 0xff, 0xff, 0x90,
        ]);
        let rows = lazy_plt_rows(0x1000, &code).unwrap();
        assert_eq!(caller(&rows, 0x1018, 0x2000), 0);
        assert_eq!(caller(&rows, 0x1019, 0x2000), 8);
    }

    #[test]
    fn other_layouts_get_no_rows() {
        // Misaligned, a foreign entry, a PLT0 that does not push.
        assert_eq!(lazy_plt_rows(0x1008, &lld_plt(2)), None);
        let mut code = lld_plt(2);
        code[0x26] = 0x90;
        assert_eq!(lazy_plt_rows(0x1000, &code), None);
        let mut code = lld_plt(2);
        code[0] = 0x90;
        assert_eq!(lazy_plt_rows(0x1000, &code), None);
    }
}
