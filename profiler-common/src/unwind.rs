//! The compact unwind-row format: the project's one description of how to
//! unwind an x86-64 user stack frame.
//!
//! User space compiles each object's call-frame information (`.eh_frame`,
//! `.debug_frame`) into rows: from a row's pc up to the next row's pc, the
//! caller's frame is found by the row's rules. The kernel walker (and any
//! other unwinder, such as an in-process one) finds the row of a pc and
//! applies [`step`].
//!
//! Rows are grouped by 64 KiB page of the object's virtual addresses, so a
//! row stores only the low 16 bits of its pc and a binary search within a
//! page takes at most 16 steps. Each page's rows start with a row at offset
//! 0 (the rule in force where the page begins), so a search always finds a
//! row.
//!
//! Maps:
//! - [`ROW_SHARDS_MAP`]: `ArrayOfMaps` of row shards, each an
//!   `Array<UnwindRow>` of [`SHARD_ROWS`] (`BPF_F_MMAPABLE`) that user space
//!   creates when the rows loaded so far fill the others, up to a memory cap.
//!   A page's rows lie in one shard, so a search stays in one array: one
//!   outer lookup per frame, then the inlined array lookups of the search.
//! - [`PAGES_MAP`]: `HashMap<PageKey, PageRows>`: where a page's rows are.
//! - [`MAPPINGS_MAP`]: `LpmTrie<MappingKey, MappingInfo>`: per process,
//!   which object (and load bias) an address belongs to.
//! - [`REFRESH_MAP`]: processes whose walk met a pc outside their mappings.

/// log2 of the page size that groups rows.
pub const PAGE_SHIFT: u32 = 16;
/// Mask of a pc's offset within its page.
pub const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;
/// Binary-search steps that cover any page (2^16 possible offsets + 1).
pub const SEARCH_STEPS: u32 = 17;

/// No call-frame information covers the pc: fall back to the frame pointer.
pub const CFA_NONE: u8 = 0;
/// CFA = rsp + `cfa_offset`.
pub const CFA_RSP: u8 = 1;
/// CFA = rbp + `cfa_offset`.
pub const CFA_RBP: u8 = 2;
/// A lazy-binding PLT stub: CFA = rsp + `cfa_offset`, plus 8 when
/// `(pc & 15) >= rbp_offset` (after the stub's push); the standard
/// expression of x86-64 `.plt` sections.
pub const CFA_PLT: u8 = 3;
/// The signal trampoline (`__restore_rt`): rsp points at a `ucontext_t`
/// whose saved registers give the interrupted frame.
pub const CFA_SIGNAL: u8 = 4;
/// The return address is undefined: the outermost frame (`_start`, thread
/// start). The stack is complete.
pub const CFA_END: u8 = 5;
/// A rule the walker cannot evaluate (another base register, a general
/// DWARF expression, an offset that does not fit): the stack is truncated.
pub const CFA_UNSUPPORTED: u8 = 6;
/// CFA = rbx + `cfa_offset`: code that switches stacks keeps the old rsp
/// in rbx (`psm`'s `rust_psm_on_stack`, which rustc runs the compiler on).
pub const CFA_RBX: u8 = 7;
/// CFA = the 8 bytes at rbp + `cfa_offset`: the frame of a function that
/// realigns its stack (gcc's `DW_OP_breg6 N; DW_OP_deref`), whose rbp
/// frame holds the address of the unaligned CFA.
pub const CFA_DEREF_RBP: u8 = 8;

/// General register rules ([`UnwindRow::regs`]): CFA = one of the tracked
/// registers + `cfa_offset`, and the caller's pc, rsp, rbp and rbx each from
/// a register, a slot near the CFA or the CFA itself. Code that switches
/// stacks by hand describes itself so (glibc's `__longjmp`: CFA = rdi,
/// return address in rdx, rsp in r8, rbp in r9; `setcontext`: everything
/// in the `ucontext_t` rdx points to; `vfork`: return address in rdi).
/// Registers other than rsp, rbp and rbx are known in the sampled frame
/// only ([`LeafRegs`]): elsewhere such a row is unsupported.
pub const CFA_REGS: u8 = 9;

/// CFA = r11 + `cfa_offset` (large offsets as in [`CFA_RSP`] rows), in the
/// sampled frame only: the stack probes that LLVM inlines in functions
/// with a large frame copy rsp to r11, lower r11 by the frame's size and
/// touch each page down to it, and their CFI says so (`cfa: r11+536632`
/// in rustc). A sample lands in such a loop whenever it faults in the
/// next stack page.
pub const CFA_R11: u8 = 10;

/// The code after the `syscall` of glibc's `clone` and `clone3`, which no
/// FDE covers (the FDE ends before the syscall, as the new thread's
/// frame differs from the caller's): that code tests rax, and so does
/// the row, in the sampled frame. rax 0 is the new thread, whose stack is
/// empty: its outermost frame. Otherwise it is the caller's frame: CFA =
/// rsp + `cfa_offset` (8: nothing pushed).
pub const CFA_CLONE: u8 = 11;

/// The caller's rbp is the same as the callee's.
pub const RBP_SAME: u8 = 0;
/// The caller's rbp is saved at CFA + `rbp_offset`.
pub const RBP_OFFSET: u8 = 1;
/// The caller's rbp is unknown (set to 0, so nothing uses it unnoticed).
pub const RBP_UNDEFINED: u8 = 2;
/// The caller's rbp is saved at rbp + `rbp_offset` (`DW_CFA_expression
/// rbp: DW_OP_breg6 N`, in functions that realign their stack).
pub const RBP_AT_RBP: u8 = 3;

/// The caller's rbx is the same as the callee's.
pub const RBX_SAME: u8 = 0;
/// The caller's rbx is saved at CFA + `rbx_offset`.
pub const RBX_OFFSET: u8 = 1;
/// The caller's rbx is unknown (0: a CFA based on it is not evaluated).
pub const RBX_UNDEFINED: u8 = 2;
/// The caller's rbx is saved at rbp + `rbx_offset` (realigned frames).
pub const RBX_AT_RBP: u8 = 3;

/// `cfa_kind` flag: `cfa_offset` (unsigned) counts 8-byte units, with bits
/// 16..19 of the count in [`CFA_OFFSET_HIGH`] (large frames, up to 4 MiB).
pub const CFA_OFFSET_X8: u8 = 0x80;
/// `cfa_kind` bits 4..7: bits 16..19 of a [`CFA_OFFSET_X8`] count.
pub const CFA_OFFSET_HIGH: u8 = 0x70;

/// One unwind rule, in force from `pc_low` (within its page) to the next
/// row. 8 bytes, the element size of the BPF array that holds them.
///
/// Saved registers sit in 8-byte slots near the CFA, so their offsets are
/// stored in 8-byte units in one byte each (±1 KiB): that keeps rbx, which
/// a stack switch needs, within the 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// Low 16 bits of the first pc the row covers.
    pub pc_low: u16,
    /// Offset of the CFA from its base register (see `cfa_kind`), in bytes
    /// or, with [`CFA_OFFSET_X8`], the low 16 bits of a count of 8-byte
    /// units.
    pub cfa_offset: i16,
    /// Where the caller's rbp is saved, in 8-byte units, relative to the
    /// CFA (`RBP_OFFSET`) or to rbp (`RBP_AT_RBP`); or the PLT threshold in
    /// bytes (`CFA_PLT`).
    pub rbp_offset: i8,
    /// Where the caller's rbx is saved, in 8-byte units, relative to the CFA
    /// (`RBX_OFFSET`) or to rbp (`RBX_AT_RBP`).
    pub rbx_offset: i8,
    /// One of the `CFA_*` constants (low 4 bits), possibly with
    /// [`CFA_OFFSET_X8`] and [`CFA_OFFSET_HIGH`] bits.
    pub cfa_kind: u8,
    /// One of the `RBP_*` constants (low nibble) and one of the `RBX_*`
    /// constants (high nibble).
    pub reg_kinds: u8,
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);

/// A saved register's offset in 8-byte units, if it is a multiple of 8
/// within ±1 KiB.
const fn slot(offset: i64) -> Option<i8> {
    if offset % 8 != 0 || offset / 8 < i8::MIN as i64 || offset / 8 > i8::MAX as i64 {
        None
    } else {
        Some((offset / 8) as i8)
    }
}

impl UnwindRow {
    /// A row at `pc_low` (rbx the same as the callee's); `None` when
    /// `cfa_offset` or `rbp_offset` cannot be represented.
    pub const fn new(
        pc_low: u16,
        cfa_kind: u8,
        cfa_offset: i64,
        rbp_kind: u8,
        rbp_offset: i64,
    ) -> Option<Self> {
        let rbp_offset = if cfa_kind == CFA_PLT {
            if rbp_offset < 0 || rbp_offset > 16 {
                return None;
            }
            rbp_offset as i8
        } else if rbp_kind == RBP_OFFSET || rbp_kind == RBP_AT_RBP {
            match slot(rbp_offset) {
                Some(s) => s,
                None => return None,
            }
        } else {
            0
        };
        let (cfa_kind, cfa_offset) =
            if cfa_offset >= i16::MIN as i64 && cfa_offset <= i16::MAX as i64 {
                (cfa_kind, cfa_offset)
            } else if cfa_offset % 8 == 0 && cfa_offset >= 0 && cfa_offset / 8 < 1 << 19 {
                // Large frames (rustc's biggest are over 512 KiB): 19 bits of
                // 8-byte units, the top 3 in `cfa_kind`.
                let units = cfa_offset / 8;
                (
                    cfa_kind | CFA_OFFSET_X8 | (((units >> 16) as u8) << 4),
                    units & 0xffff,
                )
            } else {
                return None;
            };
        Some(Self {
            pc_low,
            cfa_offset: cfa_offset as u16 as i16,
            rbp_offset,
            rbx_offset: 0,
            cfa_kind,
            reg_kinds: rbp_kind & 0xf,
        })
    }

    /// The same row with rbx's rule; `None` when the offset cannot be
    /// represented.
    pub const fn with_rbx(self, rbx_kind: u8, rbx_offset: i64) -> Option<Self> {
        let rbx_offset = if rbx_kind == RBX_OFFSET || rbx_kind == RBX_AT_RBP {
            match slot(rbx_offset) {
                Some(s) => s,
                None => return None,
            }
        } else {
            0
        };
        Some(Self {
            rbx_offset,
            reg_kinds: (self.reg_kinds & 0xf) | (rbx_kind << 4),
            ..self
        })
    }

    /// The rule kind without flags (one of the `CFA_*` constants).
    #[inline(always)]
    pub const fn kind(&self) -> u8 {
        self.cfa_kind & 0x0f
    }

    /// The CFA offset in bytes.
    #[inline(always)]
    pub const fn cfa_offset(&self) -> i64 {
        // A CFA_REGS row keeps its base register in the flag bits.
        if self.cfa_kind & CFA_OFFSET_X8 != 0 && self.kind() != CFA_REGS {
            let high = ((self.cfa_kind & CFA_OFFSET_HIGH) as i64) << 12;
            (high | self.cfa_offset as u16 as i64) * 8
        } else {
            self.cfa_offset as i64
        }
    }

    /// Whether the caller's rsp may lie anywhere, below this frame's too:
    /// the row takes it from registers tracked from the sampled frame (a
    /// stack switch), so walkers do not require it above this frame's.
    #[inline(always)]
    pub const fn may_switch_stacks(&self) -> bool {
        matches!(self.kind(), CFA_RBP | CFA_RBX | CFA_REGS)
    }

    /// One of the `RBP_*` constants.
    #[inline(always)]
    pub const fn rbp_kind(&self) -> u8 {
        self.reg_kinds & 0xf
    }

    /// One of the `RBX_*` constants.
    #[inline(always)]
    pub const fn rbx_kind(&self) -> u8 {
        self.reg_kinds >> 4
    }

    /// The rbp slot's offset in bytes (`RBP_OFFSET`, `RBP_AT_RBP`).
    #[inline(always)]
    pub const fn rbp_offset(&self) -> i64 {
        self.rbp_offset as i64 * 8
    }

    /// The rbx slot's offset in bytes (`RBX_OFFSET`, `RBX_AT_RBP`).
    #[inline(always)]
    pub const fn rbx_offset(&self) -> i64 {
        self.rbx_offset as i64 * 8
    }
}

/// Key of [`PAGES_MAP`]: one 64 KiB page of one object's virtual addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// Object id assigned by user space (never 0).
    pub object: u32,
    /// Virtual address >> [`PAGE_SHIFT`].
    pub page: u32,
}

const _: () = assert!(core::mem::size_of::<PageKey>() == 8);

/// Value of [`PAGES_MAP`]: the page's rows are rows `index..index + count`
/// of shard `first >> SHARD_SHIFT` (`index = first & SHARD_MASK`), sorted
/// by `pc_low`, the first one at `pc_low` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRows {
    /// Shard (high bits) and index in it (low [`SHARD_SHIFT`] bits) of the
    /// first row.
    pub first: u32,
    /// Number of rows (at least 1, at most 65536).
    pub count: u32,
}

const _: () = assert!(core::mem::size_of::<PageRows>() == 8);

/// Data of a [`MAPPINGS_MAP`] key, all big-endian so that the trie's
/// longest-prefix match runs over (pid, address): prefix length 32 + the
/// number of significant address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingKey {
    /// Process id (tgid), big-endian.
    pub pid_be: u32,
    /// Address bits 63..32, big-endian.
    pub addr_high_be: u32,
    /// Address bits 31..0, big-endian.
    pub addr_low_be: u32,
}

const _: () = assert!(core::mem::size_of::<MappingKey>() == 12);

impl MappingKey {
    /// The key of `addr` in process `pid`.
    pub const fn new(pid: u32, addr: u64) -> Self {
        Self {
            pid_be: pid.to_be(),
            addr_high_be: ((addr >> 32) as u32).to_be(),
            addr_low_be: (addr as u32).to_be(),
        }
    }
}

/// Value of [`MAPPINGS_MAP`]: the object an address range belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingInfo {
    /// Address minus bias = the object's virtual address (as in its ELF
    /// headers and CFI).
    pub bias: u64,
    /// Object id whose pages are in [`PAGES_MAP`]; 0 when the object has no
    /// call-frame information (frame pointers are followed there).
    pub object: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<MappingInfo>() == 16);

crate::impl_pod!(UnwindRow, PageKey, PageRows, MappingKey, MappingInfo);

/// Name of the array of row shards.
pub const ROW_SHARDS_MAP: &str = "UNWIND_ROW_SHARDS";
/// log2 of the rows in one shard.
pub const SHARD_SHIFT: u32 = 20;
/// Rows in one shard (8 bytes each: 8 MiB).
pub const SHARD_ROWS: u32 = 1 << SHARD_SHIFT;
/// Mask of a row's index within its shard in [`PageRows::first`].
pub const SHARD_MASK: u32 = SHARD_ROWS - 1;
/// Capacity of [`ROW_SHARDS_MAP`] (8 GiB of rows; the memory cap decides
/// how many are created).
pub const MAX_SHARDS: u32 = 1024;
/// Name of the page index.
pub const PAGES_MAP: &str = "UNWIND_PAGES";
/// Capacity of [`PAGES_MAP`].
pub const PAGES_MAX: u32 = 1 << 16;
/// Name of the per-process address trie.
pub const MAPPINGS_MAP: &str = "UNWIND_MAPPINGS";
/// Capacity of [`MAPPINGS_MAP`] (prefixes; a mapping takes up to ~60).
pub const MAPPINGS_MAX: u32 = 1 << 18;

/// Name of the map where the walker asks for a process's tables to be
/// refreshed: `HashMap<u32 (pid), u64 (a pc outside its known mappings)>`.
pub const REFRESH_MAP: &str = "UNWIND_REFRESH";
/// Capacity of [`REFRESH_MAP`].
pub const REFRESH_MAX: u32 = 4096;

/// Registers that matter for unwinding one frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Instruction pointer (a return address for every frame but the first).
    pub pc: u64,
    /// Stack pointer.
    pub sp: u64,
    /// Frame pointer.
    pub bp: u64,
    /// rbx (callee-saved; the base of a stack switch's CFA); 0 when unknown.
    pub bx: u64,
}

/// What one unwinding step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The caller's frame; `pc` is a return address unless the frame was
    /// interrupted by a signal (`exact`).
    Caller { frame: Frame, exact: bool },
    /// The outermost frame: the stack is complete.
    End,
    /// The row's rule cannot be evaluated.
    Unsupported,
    /// Reading the stack failed.
    ReadFailed,
}

/// Offsets in the `ucontext_t` that rsp points to in `__restore_rt`
/// (`uc_mcontext` starts at 40; `struct sigcontext` order r8..r15, rdi, rsi,
/// rbp, rbx, rdx, rax, rcx, rsp, rip).
pub const SIGNAL_RBP: u64 = 40 + 10 * 8;
/// See [`SIGNAL_RBP`].
pub const SIGNAL_RBX: u64 = 40 + 11 * 8;
/// See [`SIGNAL_RBP`].
pub const SIGNAL_RSP: u64 = 40 + 15 * 8;
/// See [`SIGNAL_RBP`].
pub const SIGNAL_RIP: u64 = 40 + 16 * 8;

/// Unwinds one frame with `row`, the row in force at `frame.pc` (or at
/// `frame.pc - 1` for a return address). `leaf`: the frame's volatile
/// registers, known in the sampled frame only (`None` elsewhere). `read`
/// reads 8 bytes of the stack.
#[inline(always)]
pub fn step(
    row: &UnwindRow,
    frame: &Frame,
    leaf: Option<&LeafRegs>,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> Step {
    let cfa = match row.kind() {
        CFA_RSP => frame.sp.wrapping_add(row.cfa_offset() as u64),
        CFA_RBP => frame.bp.wrapping_add(row.cfa_offset() as u64),
        CFA_RBX if frame.bx != 0 => frame.bx.wrapping_add(row.cfa_offset() as u64),
        CFA_DEREF_RBP => match read(frame.bp.wrapping_add(row.cfa_offset() as u64)) {
            Some(cfa) => cfa,
            None => return Step::ReadFailed,
        },
        CFA_PLT => {
            let extra = if (frame.pc & 15) >= row.rbp_offset as u64 {
                8
            } else {
                0
            };
            frame
                .sp
                .wrapping_add(row.cfa_offset() as u64)
                .wrapping_add(extra)
        }
        CFA_SIGNAL => {
            let (Some(bp), Some(bx), Some(sp), Some(pc)) = (
                read(frame.sp.wrapping_add(SIGNAL_RBP)),
                read(frame.sp.wrapping_add(SIGNAL_RBX)),
                read(frame.sp.wrapping_add(SIGNAL_RSP)),
                read(frame.sp.wrapping_add(SIGNAL_RIP)),
            ) else {
                return Step::ReadFailed;
            };
            return Step::Caller {
                frame: Frame { pc, sp, bp, bx },
                exact: true,
            };
        }
        CFA_REGS => return step_regs(row, frame, leaf, read),
        CFA_CLONE => match leaf {
            Some(l) if l.ax == 0 => return Step::End,
            Some(_) => frame.sp.wrapping_add(row.cfa_offset() as u64),
            _ => return Step::Unsupported,
        },
        CFA_R11 => match leaf {
            Some(l) if l.r11 != 0 => l.r11.wrapping_add(row.cfa_offset() as u64),
            // r11 is known in the sampled frame only.
            _ => return Step::Unsupported,
        },
        CFA_END => return Step::End,
        _ => return Step::Unsupported,
    };
    let Some(pc) = read(cfa.wrapping_sub(8)) else {
        return Step::ReadFailed;
    };
    let bp = match row.rbp_kind() {
        RBP_SAME => frame.bp,
        RBP_OFFSET => match read(cfa.wrapping_add(row.rbp_offset() as u64)) {
            Some(bp) => bp,
            None => return Step::ReadFailed,
        },
        RBP_AT_RBP => match read(frame.bp.wrapping_add(row.rbp_offset() as u64)) {
            Some(bp) => bp,
            None => return Step::ReadFailed,
        },
        _ => 0,
    };
    let bx = match row.rbx_kind() {
        RBX_SAME => frame.bx,
        RBX_OFFSET => match read(cfa.wrapping_add(row.rbx_offset() as u64)) {
            Some(bx) => bx,
            None => return Step::ReadFailed,
        },
        RBX_AT_RBP => match read(frame.bp.wrapping_add(row.rbx_offset() as u64)) {
            Some(bx) => bx,
            None => return Step::ReadFailed,
        },
        _ => 0,
    };
    Step::Caller {
        frame: Frame {
            pc,
            sp: cfa,
            bp,
            bx,
        },
        exact: false,
    }
}

/// Unwinds one frame by the frame-pointer convention (`push rbp; mov rbp,
/// rsp`): the caller's rbp is at [rbp], the return address at [rbp + 8].
#[inline(always)]
pub fn step_frame_pointer(frame: &Frame, mut read: impl FnMut(u64) -> Option<u64>) -> Step {
    if frame.bp == 0 {
        // The outermost frame clears rbp (x86-64 ABI).
        return Step::End;
    }
    let (Some(bp), Some(pc)) = (read(frame.bp), read(frame.bp.wrapping_add(8))) else {
        return Step::ReadFailed;
    };
    Step::Caller {
        frame: Frame {
            pc,
            sp: frame.bp.wrapping_add(16),
            bp,
            // Code without CFI does not say where it saved rbx: unknown.
            bx: 0,
        },
        exact: false,
    }
}

/// Index of the row in force at page offset `pc_low` among a page's rows
/// (sorted, the first at offset 0).
pub fn find_row(rows: &[UnwindRow], pc_low: u16) -> usize {
    // The last row whose pc_low <= the target.
    rows.partition_point(|r| r.pc_low <= pc_low)
        .saturating_sub(1)
}

#[path = "unwind_regs.rs"]
mod regs;
pub use regs::*;

#[cfg(test)]
#[path = "unwind_tests.rs"]
mod tests;
