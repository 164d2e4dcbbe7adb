//! DWARF encodings the unwinder reads: a cursor over CFI bytes (fixed,
//! LEB128 and DW_EH_PE pointer forms) and the CFA expressions the PLT
//! uses. Reads only the CFI of loaded objects (through `Source`); no
//! allocation, no lock.
use super::{RBP, RIP, RSP, Regs, source::Source};

/// A cursor over CFI bytes.
pub(super) struct Reader<'a> {
    pub(super) p: usize,
    pub(super) src: &'a Source<'a>,
}

impl Reader<'_> {
    pub(super) unsafe fn u8(&mut self) -> u8 {
        // SAFETY: caller keeps the cursor inside mapped CFI.
        let v = unsafe { self.src.bytes::<1>(self.p) }[0];
        self.p += 1;
        v
    }
    pub(super) unsafe fn u16(&mut self) -> u16 {
        // SAFETY: as above.
        let v = u16::from_le_bytes(unsafe { self.src.bytes(self.p) });
        self.p += 2;
        v
    }
    pub(super) unsafe fn u32(&mut self) -> u32 {
        // SAFETY: as above.
        let v = u32::from_le_bytes(unsafe { self.src.bytes(self.p) });
        self.p += 4;
        v
    }
    pub(super) unsafe fn u64(&mut self) -> u64 {
        // SAFETY: as above.
        let v = u64::from_le_bytes(unsafe { self.src.bytes(self.p) });
        self.p += 8;
        v
    }
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(super) unsafe fn uleb(&mut self) -> u64 {
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
    pub(super) unsafe fn sleb(&mut self) -> i64 {
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
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub(super) unsafe fn pointer(&mut self, enc: u8, data: usize) -> Option<usize> {
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

/// Evaluates a CFA expression of the forms the PLT uses.
///
/// # Safety
/// `p..p+len` lies in mapped .eh_frame.
pub(super) unsafe fn eval(src: &Source, p: usize, len: usize, regs: &Regs) -> Option<usize> {
    let mut stack = [0usize; 8];
    let mut n = 0usize;
    let mut r = Reader { p, src };
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
