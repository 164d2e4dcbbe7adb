//! Rows for the `.init` and `.fini` sections of glibc's `crti.o` and
//! `crtn.o`, which have no CFI. The loader calls a library's `_init` (the
//! start of `.init`, often the first byte of its code segment) once, at
//! its start: a sample there, such as the page fault of the first
//! instruction fetch, had no row and lost its caller.
//!
//! The rows are given only where the code is exactly glibc's for x86-64
//! (`sysdeps/x86_64/crti.S`, `crtn.S`): an optional `endbr64`,
//! `sub $8,%rsp`, in `.init` the call of `__gmon_start__` when it is
//! linked (`mov GOT(%rip),%rax; test %rax,%rax; je; call *%rax`), then
//! `add $8,%rsp; ret`.
use profiler_common::unwind::{CFA_RSP, RBP_SAME, UnwindRow};

/// `endbr64`.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// `sub $8,%rsp`.
const SUB_8: [u8; 4] = [0x48, 0x83, 0xec, 0x08];
/// `add $8,%rsp; ret`.
const ADD_8_RET: [u8; 5] = [0x48, 0x83, 0xc4, 0x08, 0xc3];
/// `.init`'s call of `__gmon_start__`, around the GOT displacement
/// (`mov disp32(%rip),%rax`) of bytes 3..7.
const GMON_CALL: [u8; 14] = [
    0x48, 0x8b, 0x05, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x74, 0x02, 0xff, 0xd0,
];

/// The rows of the `.init` or `.fini` section at `start` whose bytes are
/// `code`: (address, row) in address order; the rows end at `start +
/// code.len()`. `None` when the code is not glibc's.
pub fn crt_rows(start: u64, code: &[u8]) -> Option<Vec<(u64, UnwindRow)>> {
    let body = code.strip_prefix(&ENDBR64[..]).unwrap_or(code);
    let entry_len = (code.len() - body.len()) as u64;
    let middle = body
        .strip_prefix(&SUB_8[..])?
        .strip_suffix(&ADD_8_RET[..])?;
    let is_gmon_call = middle.len() == GMON_CALL.len()
        && middle
            .iter()
            .zip(GMON_CALL)
            .enumerate()
            .all(|(i, (&b, want))| (3..7).contains(&i) || b == want);
    if !middle.is_empty() && !is_gmon_call {
        return None;
    }
    let rsp = |offset| UnwindRow::new(0, CFA_RSP, offset, RBP_SAME, 0);
    let end = start + code.len() as u64;
    Some(vec![
        (start, rsp(8)?),
        (start + entry_len + SUB_8.len() as u64, rsp(16)?),
        // The `ret`, after the `add`.
        (end - 1, rsp(8)?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(rows: &[(u64, UnwindRow)]) -> Vec<(u64, i64)> {
        rows.iter().map(|(a, r)| (*a, r.cfa_offset())).collect()
    }

    #[test]
    fn glibc_init_and_fini() {
        // libmd.so.0.0.5 (Debian 12): .init at 0x2000, .fini at 0x88e8.
        let init = [
            0x48, 0x83, 0xec, 0x08, 0x48, 0x8b, 0x05, 0xc5, 0x9f, 0x00, 0x00, 0x48, 0x85, 0xc0,
            0x74, 0x02, 0xff, 0xd0, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        let rows = crt_rows(0x2000, &init).expect("glibc's .init");
        assert_eq!(offsets(&rows), [(0x2000, 8), (0x2004, 16), (0x2016, 8)]);
        let fini = [0x48, 0x83, 0xec, 0x08, 0x48, 0x83, 0xc4, 0x08, 0xc3];
        let rows = crt_rows(0x88e8, &fini).expect("glibc's .fini");
        assert_eq!(offsets(&rows), [(0x88e8, 8), (0x88ec, 16), (0x88f0, 8)]);
        // With endbr64 first.
        let mut cet = ENDBR64.to_vec();
        cet.extend(fini);
        let rows = crt_rows(0x1000, &cet).expect("with endbr64");
        assert_eq!(offsets(&rows), [(0x1000, 8), (0x1008, 16), (0x100c, 8)]);
    }

    #[test]
    fn other_code_gets_no_rows() {
        // Something else between the sub and the add.
        let push = [
            0x48, 0x83, 0xec, 0x08, 0x55, 0x5d, 0x48, 0x83, 0xc4, 0x08, 0xc3,
        ];
        assert!(crt_rows(0x1000, &push).is_none());
        // No sub first.
        assert!(crt_rows(0x1000, &[0x48, 0x83, 0xc4, 0x08, 0xc3]).is_none());
        assert!(crt_rows(0x1000, &[]).is_none());
    }
}
