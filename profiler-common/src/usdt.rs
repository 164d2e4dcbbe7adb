//! USDT argument specs: where a probe site's arguments are when it fires,
//! as its `.note.stapsdt` note says, in a form a uprobe program reads.
//!
//! Map [`USDT_SPECS_MAP`]: `Array<UsdtSpec>` of [`MAX_USDT_SPECS`] entries,
//! written by the agent before it attaches a site. Each attached site's BPF
//! cookie is the index of its spec (sites with equal specs share one).
//!
//! An argument's value is, by [`UsdtArgSpec::kind`]:
//! - [`USDT_ARG_REGISTER`]: the register at byte `base` of `struct pt_regs`;
//! - [`USDT_ARG_MEMORY`]: `size` bytes of user memory at
//!   `reg(base) + reg(index) * scale + offset` (no index when `index` is
//!   [`USDT_NO_REGISTER`]); a `symbol(%rip)` operand has `rip` as base, whose
//!   value in a uprobe program is the probe's own address, and `offset` =
//!   the symbol's address minus the probe's (both link-time addresses);
//! - [`USDT_ARG_CONSTANT`]: `offset` itself.
//!
//! then cut to its low `size` bytes and zero- or sign-extended (`signed`).

/// Name of the spec map.
pub const USDT_SPECS_MAP: &str = "HEAP_USDT_SPECS";
/// Capacity of the spec map: distinct argument layouts among the attached
/// sites (compilers produce a handful per library).
pub const MAX_USDT_SPECS: u32 = 1024;
/// Arguments a spec holds (`otel_memory:alloc` has three).
pub const USDT_MAX_ARGS: usize = 3;

/// No argument in this slot.
pub const USDT_ARG_NONE: u8 = 0;
pub const USDT_ARG_REGISTER: u8 = 1;
pub const USDT_ARG_MEMORY: u8 = 2;
pub const USDT_ARG_CONSTANT: u8 = 3;
/// `index` of a memory operand without an index register.
pub const USDT_NO_REGISTER: u16 = u16::MAX;

/// One argument's location.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsdtArgSpec {
    /// Memory displacement, or the constant.
    pub offset: i64,
    /// Byte offset in `struct pt_regs` of the register (or memory base).
    pub base: u16,
    /// Byte offset in `struct pt_regs` of the index register, or
    /// [`USDT_NO_REGISTER`].
    pub index: u16,
    /// One of the `USDT_ARG_*` kinds.
    pub kind: u8,
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// 1 when the value is sign-extended from `size` bytes.
    pub signed: u8,
    /// The index's scale: 1, 2, 4 or 8.
    pub scale: u8,
}

const _: () = assert!(core::mem::size_of::<UsdtArgSpec>() == 16);

/// Value of [`USDT_SPECS_MAP`]: the arguments of one kind of site.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsdtSpec {
    pub args: [UsdtArgSpec; USDT_MAX_ARGS],
    /// 1 when `[rsp]` holds the return address of the function the site is
    /// in (the site is that function's first instruction, or is followed by
    /// its `ret`): the stack then starts at the caller. Else it starts at
    /// the site itself, and is walked from there by the unwind tables.
    pub from_entry: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<UsdtSpec>() == 56);

impl UsdtArgSpec {
    /// `raw` cut to `size` bytes and extended as the spec says.
    #[inline(always)]
    pub const fn extend(&self, raw: u64) -> u64 {
        let bits = 64 - 8 * (self.size as u32 & 15);
        if bits == 0 || bits >= 64 {
            return raw;
        }
        if self.signed != 0 {
            (((raw << bits) as i64) >> bits) as u64
        } else {
            (raw << bits) >> bits
        }
    }
}

crate::impl_pod!(UsdtSpec);

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(size: u8, signed: bool) -> UsdtArgSpec {
        UsdtArgSpec {
            size,
            signed: u8::from(signed),
            ..Default::default()
        }
    }

    #[test]
    fn values_are_cut_to_their_size_and_extended() {
        assert_eq!(arg(8, false).extend(u64::MAX), u64::MAX);
        assert_eq!(arg(4, false).extend(0x1_ffff_fffe), 0xffff_fffe);
        assert_eq!(arg(4, true).extend(0x1_ffff_fffe), (-2i64) as u64);
        assert_eq!(arg(1, true).extend(0x7f), 0x7f);
        assert_eq!(arg(1, true).extend(0x80), (-128i64) as u64);
        assert_eq!(arg(2, false).extend(0xabcd_1234), 0x1234);
    }
}
