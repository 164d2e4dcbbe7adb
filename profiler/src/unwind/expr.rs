//! The DWARF expressions of x86-64 call-frame information that the kernel
//! walker evaluates, recognised by shape: compilers emit only a few (the
//! lazy-binding PLT's CFA, and gcc's stack realignment), and a general
//! evaluator has no place in a BPF program.

/// A CFA expression the walker evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfaExpr {
    /// `rsp + 8 + ((rip & 15) >= threshold) << 3`: a lazy-binding `.plt`
    /// entry (threshold 10 or 11, after the entry's push).
    Plt { threshold: u8 },
    /// `*(rbp + offset)`: a function that realigned its stack keeps the
    /// address of its CFA in its frame (gcc: `lea 8(%rsp),%r10; and
    /// $-N,%rsp; push -8(%r10); push %rbp; mov %rsp,%rbp; push %r10`).
    DerefRbp { offset: i64 },
}

/// Where a register expression (`DW_CFA_expression`) saves a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedAt {
    /// At rbp + offset (`DW_OP_breg6 offset`).
    Rbp(i64),
}

const DW_OP_DEREF: u8 = 0x06;
const DW_OP_BREG0: u8 = 0x70;
const DW_OP_BREG31: u8 = 0x8f;
const RBP: u8 = 6;

/// Recognises a CFA expression.
pub fn cfa(code: &[u8]) -> Option<CfaExpr> {
    if let Some(threshold) = plt_threshold(code) {
        return Some(CfaExpr::Plt { threshold });
    }
    match breg(code)? {
        (RBP, offset, [DW_OP_DEREF]) => Some(CfaExpr::DerefRbp { offset }),
        _ => None,
    }
}

/// Recognises a register's save-slot expression.
pub fn saved_at(code: &[u8]) -> Option<SavedAt> {
    match breg(code)? {
        (RBP, offset, []) => Some(SavedAt::Rbp(offset)),
        _ => None,
    }
}

/// The standard CFA expression of x86-64 lazy-binding `.plt` entries:
/// `rsp + 8 + ((rip & 15) >= N) << 3`, N being 10 or 11.
fn plt_threshold(code: &[u8]) -> Option<u8> {
    match code {
        // breg7 8; breg16 0; lit15; and; litN; ge; lit3; shl; plus
        [
            0x77,
            0x08,
            0x80,
            0x00,
            0x3f,
            0x1a,
            lit @ 0x30..=0x4f,
            0x2a,
            0x33,
            0x24,
            0x22,
        ] => Some(*lit - 0x30),
        _ => None,
    }
}

/// A leading `DW_OP_bregN offset`: (N, offset, the rest of the code).
fn breg(code: &[u8]) -> Option<(u8, i64, &[u8])> {
    let (&op, rest) = code.split_first()?;
    if !(DW_OP_BREG0..=DW_OP_BREG31).contains(&op) {
        return None;
    }
    let (offset, rest) = sleb128(rest)?;
    Some((op - DW_OP_BREG0, offset, rest))
}

/// A signed LEB128 number and the bytes after it.
fn sleb128(code: &[u8]) -> Option<(i64, &[u8])> {
    let mut value = 0i64;
    let mut shift = 0;
    for (i, &byte) in code.iter().enumerate() {
        if shift >= 64 {
            return None;
        }
        value |= i64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            if shift < 64 && byte & 0x40 != 0 {
                value |= -1 << shift;
            }
            return Some((value, &code[i + 1..]));
        }
    }
    None
}

/// The DWARF name of x86-64 register `n`.
pub fn register_name(n: u16) -> &'static str {
    const NAMES: [&str; 17] = [
        "rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rip",
    ];
    NAMES.get(usize::from(n)).copied().unwrap_or("reg?")
}

/// An expression's bytes in hex, for reports.
pub fn show(code: &[u8]) -> String {
    let hex: Vec<String> = code.iter().take(24).map(|b| format!("{b:02x}")).collect();
    hex.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_plt_expression() {
        let code = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
        ];
        assert_eq!(cfa(&code), Some(CfaExpr::Plt { threshold: 11 }));
        assert_eq!(cfa(&code[1..]), None);
    }

    #[test]
    fn recognises_realignment() {
        // DW_OP_breg6 -8; DW_OP_deref (as glibc's gcc emits it).
        assert_eq!(
            cfa(&[0x76, 0x78, 0x06]),
            Some(CfaExpr::DerefRbp { offset: -8 })
        );
        // DW_OP_breg6 -8 alone is an address, not a CFA we know.
        assert_eq!(cfa(&[0x76, 0x78]), None);
        // rsp-based deref is not this shape.
        assert_eq!(cfa(&[0x77, 0x78, 0x06]), None);
        // DW_CFA_expression rbp: DW_OP_breg6 0; rbx: DW_OP_breg6 -24.
        assert_eq!(saved_at(&[0x76, 0x00]), Some(SavedAt::Rbp(0)));
        assert_eq!(saved_at(&[0x76, 0x68]), Some(SavedAt::Rbp(-24)));
        assert_eq!(saved_at(&[0x76, 0x68, 0x06]), None);
    }

    #[test]
    fn sleb128_reads_multibyte_and_negative() {
        assert_eq!(sleb128(&[0x80, 0x01, 9]), Some((128, &[9u8][..])));
        assert_eq!(sleb128(&[0x80, 0x7f]), Some((-128, &[][..])));
        assert_eq!(sleb128(&[0x80]), None);
    }
}
