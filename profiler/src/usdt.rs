//! USDT probes of an ELF file: the `.note.stapsdt` notes (SystemTap SDT,
//! note type 3), their x86-64 argument strings decoded into typed
//! locations, and the file offset a uprobe attaches at.
//!
//! A note's descriptor holds three addresses (the probe's pc, the
//! link-time address of `.stapsdt.base`, the semaphore's address or 0)
//! and three NUL-terminated strings: provider, name, arguments. When the
//! file was moved after linking (prelink), `.stapsdt.base`'s address
//! differs from the recorded one by the same amount as the pc and the
//! semaphore. Arguments are space-separated `[-]SIZE@OPERAND` in AT&T
//! syntax: `8@%rdi`, `-4@-4(%rbp)`, `8@$5`, `4@8(%rax,%rbx,4)`,
//! `8@sym+16(%rip)`; a leading `-` means signed.
use std::path::Path;

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// The SDT note's ELF name and type.
const NOTE_NAME: &[u8] = b"stapsdt";
const NOTE_TYPE: u32 = 3;

/// An x86-64 register an argument may name (the 64-bit register its
/// subregister belongs to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
}

impl Reg {
    /// The register of an AT&T name without `%` (`rdi`, `edi`, `di`,
    /// `dil`, `r8d`, ...).
    fn parse(name: &str) -> Option<Self> {
        use Reg::*;
        let legacy: [(Reg, [&str; 5]); 8] = [
            // The high bytes (ah, bh, ch, dh) are not the register's low
            // bits: they are not offered, so such an argument is refused.
            (Rax, ["rax", "eax", "ax", "al", "rax"]),
            (Rbx, ["rbx", "ebx", "bx", "bl", "rbx"]),
            (Rcx, ["rcx", "ecx", "cx", "cl", "rcx"]),
            (Rdx, ["rdx", "edx", "dx", "dl", "rdx"]),
            (Rsi, ["rsi", "esi", "si", "sil", "rsi"]),
            (Rdi, ["rdi", "edi", "di", "dil", "rdi"]),
            (Rbp, ["rbp", "ebp", "bp", "bpl", "rbp"]),
            (Rsp, ["rsp", "esp", "sp", "spl", "rsp"]),
        ];
        if let Some((r, _)) = legacy.iter().find(|(_, names)| names.contains(&name)) {
            return Some(*r);
        }
        if name == "rip" {
            return Some(Rip);
        }
        let n = name.strip_prefix('r')?;
        let digits = n.trim_end_matches(['d', 'w', 'b']);
        if n.len() - digits.len() > 1 {
            return None;
        }
        Some(match digits.parse::<u8>().ok()? {
            8 => R8,
            9 => R9,
            10 => R10,
            11 => R11,
            12 => R12,
            13 => R13,
            14 => R14,
            15 => R15,
            _ => return None,
        })
    }

    /// Byte offset of the register in the kernel's x86-64 `struct
    /// pt_regs` (what a uprobe program reads).
    pub fn pt_regs_offset(self) -> usize {
        use Reg::*;
        8 * match self {
            R15 => 0,
            R14 => 1,
            R13 => 2,
            R12 => 3,
            Rbp => 4,
            Rbx => 5,
            R11 => 6,
            R10 => 7,
            R9 => 8,
            R8 => 9,
            Rax => 10,
            Rcx => 11,
            Rdx => 12,
            Rsi => 13,
            Rdi => 14,
            Rip => 16,
            Rsp => 19,
        }
    }
}

/// Where an argument's value is when the probe fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In a register.
    Register(Reg),
    /// In memory at `base + index * scale + offset`; for `Rip` as base,
    /// `symbol` names what the offset is relative to (resolved by the
    /// reader of the file).
    Memory {
        base: Reg,
        index: Option<(Reg, u8)>,
        offset: i64,
        symbol: Option<String>,
    },
    /// A constant.
    Constant(i64),
}

/// One decoded argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub signed: bool,
    pub location: Location,
}

/// One probe of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub provider: String,
    pub name: String,
    /// The probe site's virtual address in the file (adjusted by
    /// `.stapsdt.base`).
    pub pc: u64,
    /// The semaphore's virtual address (adjusted), 0 if none.
    pub semaphore: u64,
    /// The argument string as written.
    pub args_text: String,
    /// The decoded arguments (empty when `args_error` says why not).
    pub args: Vec<Arg>,
    /// Why the argument string could not be decoded, if it could not.
    pub args_error: Option<String>,
    /// The link-time addresses of the symbols the arguments name
    /// (`counter(%rip)`), those the file defines.
    pub symbols: Vec<(String, u64)>,
    /// At the site, `[rsp]` holds the return address of the function the
    /// site is in: it is a function's first instruction, or its nop is
    /// followed by a `ret`.
    pub return_address_at_sp: bool,
    /// The file offset of the site: where a uprobe attaches.
    pub file_offset: u64,
}

/// Decodes an argument string (`8@%rdi -4@-4(%rbp) 8@$5`).
pub fn parse_args(text: &str) -> anyhow::Result<Vec<Arg>> {
    text.split_whitespace().map(parse_arg).collect()
}

fn parse_arg(text: &str) -> anyhow::Result<Arg> {
    let (size, operand) = text
        .split_once('@')
        .with_context(|| format!("USDT argument `{text}`: no SIZE@ prefix"))?;
    let signed = size.starts_with('-');
    let size: u8 = size
        .trim_start_matches('-')
        .parse()
        .ok()
        .filter(|s| matches!(s, 1 | 2 | 4 | 8))
        .with_context(|| format!("USDT argument `{text}`: size must be 1, 2, 4 or 8"))?;
    let location = parse_operand(operand)
        .with_context(|| format!("USDT argument `{text}`: cannot decode the operand"))?;
    Ok(Arg {
        size,
        signed,
        location,
    })
}

fn register(text: &str) -> Option<Reg> {
    Reg::parse(text.trim().strip_prefix('%')?)
}

fn number(text: &str) -> Option<i64> {
    let (neg, t) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => t.parse::<i64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

fn parse_operand(op: &str) -> Option<Location> {
    if let Some(c) = op.strip_prefix('$') {
        return number(c).map(Location::Constant);
    }
    if op.starts_with('%') {
        return register(op).map(Location::Register);
    }
    let open = op.find('(')?;
    let inner = op[open..].strip_prefix('(')?.strip_suffix(')')?;
    let mut parts = inner.split(',');
    let base = register(parts.next()?)?;
    let index = match (parts.next(), parts.next()) {
        (None, _) => None,
        (Some(i), scale) => {
            let scale = scale.map_or(Some(1), |s| s.trim().parse::<u8>().ok())?;
            matches!(scale, 1 | 2 | 4 | 8).then_some(())?;
            Some((register(i)?, scale))
        }
    };
    if parts.next().is_some() {
        return None;
    }
    let disp = &op[..open];
    let (symbol, offset) = if disp.is_empty() {
        (None, 0)
    } else if let Some(n) = number(disp) {
        (None, n)
    } else {
        // `sym`, `sym+16` or `sym-8`: only meaningful relative to rip.
        let split = disp.rfind(['+', '-']).filter(|&i| i > 0);
        let (sym, off) = match split {
            Some(i) => (&disp[..i], number(&disp[i..])?),
            None => (disp, 0),
        };
        let valid = !sym.is_empty()
            && sym
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$'));
        if !valid {
            return None;
        }
        (Some(sym.to_owned()), off)
    };
    Some(Location::Memory {
        base,
        index,
        offset,
        symbol,
    })
}

/// The probes of the ELF file at `path`.
pub fn probes_in_file(path: &Path) -> anyhow::Result<Vec<Probe>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    probes(&data).with_context(|| format!("{}: reading its USDT notes", path.display()))
}

/// The probes of an ELF file's bytes (none when it has no SDT notes).
pub fn probes(data: &[u8]) -> anyhow::Result<Vec<Probe>> {
    let file = object::File::parse(data).context("not an ELF file object can read")?;
    if file.architecture() != object::Architecture::X86_64 {
        bail!("only x86-64 files are supported");
    }
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let base = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let notes = notes.data().context("reading .note.stapsdt")?;
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .filter_map(|s| {
            let (offset, size) = s.file_range();
            (size > 0).then_some((s.address(), size, offset))
        })
        .collect();
    let mut out = Vec::new();
    for raw in parse_notes(notes, file.is_little_endian())? {
        let adjust = |addr: u64| match base {
            Some(b) if raw.base != 0 && addr != 0 => addr.wrapping_add(b).wrapping_sub(raw.base),
            _ => addr,
        };
        let pc = adjust(raw.pc);
        let file_offset = file_offset(&segments, pc).with_context(|| {
            format!(
                "probe {}:{} at {pc:#x} lies in no loadable segment",
                raw.provider, raw.name
            )
        })?;
        let (args, args_error) = match parse_args(&raw.args) {
            Ok(args) => (args, None),
            Err(err) => (Vec::new(), Some(format!("{err:#}"))),
        };
        let symbols = args
            .iter()
            .filter_map(|a| match &a.location {
                Location::Memory {
                    symbol: Some(name), ..
                } => Some(name.as_str()),
                _ => None,
            })
            .filter_map(|name| Some((name.to_owned(), symbol_address(&file, name)?)))
            .collect();
        out.push(Probe {
            args,
            args_error,
            symbols,
            return_address_at_sp: return_address_at_sp(&file, data, pc, file_offset),
            provider: raw.provider,
            name: raw.name,
            pc,
            semaphore: adjust(raw.semaphore),
            args_text: raw.args,
            file_offset,
        });
    }
    Ok(out)
}

/// The address of the symbol `name` defined in the file.
fn symbol_address(file: &object::File<'_>, name: &str) -> Option<u64> {
    use object::ObjectSymbol as _;
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.is_definition() && s.name() == Ok(name))
        .map(|s| s.address())
}

/// Whether `[rsp]` holds the return address at the site at `pc`: it starts
/// a function, or the nop there (1 or 5 bytes) is followed by `ret`.
fn return_address_at_sp(file: &object::File<'_>, data: &[u8], pc: u64, offset: u64) -> bool {
    use object::ObjectSymbol as _;
    const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    const RET: u8 = 0xc3;
    let at = |o: u64| data.get(usize::try_from(o).ok()?).copied();
    let nop_len = match at(offset) {
        Some(0x90) => Some(1),
        _ => usize::try_from(offset)
            .ok()
            .and_then(|o| data.get(o..o + 5))
            .is_some_and(|b| b == NOP5)
            .then_some(5),
    };
    let ret_follows = nop_len.is_some_and(|n| at(offset + n) == Some(RET));
    ret_follows
        || file
            .symbols()
            .chain(file.dynamic_symbols())
            .any(|s| s.kind() == object::SymbolKind::Text && s.address() == pc && s.size() > 0)
}

/// The file offset of virtual address `addr`, through the loadable
/// segments (address, file size, file offset).
pub fn file_offset(segments: &[(u64, u64, u64)], addr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|&&(start, size, _)| start <= addr && addr < start + size)
        .map(|&(start, _, offset)| addr - start + offset)
}

/// A note as written: addresses not yet adjusted.
#[derive(Debug, PartialEq, Eq)]
struct RawNote {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

/// The SDT notes of a `.note.stapsdt` section's bytes (other notes are
/// skipped).
fn parse_notes(mut data: &[u8], little: bool) -> anyhow::Result<Vec<RawNote>> {
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().expect("4 bytes");
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 12 {
            bail!("truncated note header");
        }
        let (namesz, descsz, kind) = (
            word(&data[0..4]) as usize,
            word(&data[4..8]) as usize,
            word(&data[8..12]),
        );
        let name_end = 12 + namesz.next_multiple_of(4);
        let end = name_end + descsz.next_multiple_of(4);
        if end > data.len() || name_end + descsz > data.len() {
            bail!("a note runs past the end of the section");
        }
        let name = &data[12..12 + namesz];
        if kind == NOTE_TYPE && name.strip_suffix(b"\0").unwrap_or(name) == NOTE_NAME {
            out.push(parse_desc(&data[name_end..name_end + descsz], little)?);
        }
        data = &data[end..];
    }
    Ok(out)
}

fn parse_desc(desc: &[u8], little: bool) -> anyhow::Result<RawNote> {
    if desc.len() < 24 {
        bail!("an SDT note shorter than its three addresses");
    }
    let addr = |i: usize| {
        let b: [u8; 8] = desc[i * 8..i * 8 + 8].try_into().expect("8 bytes");
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let mut strings = desc[24..].split(|&b| b == 0);
    let mut next = |what: &str| -> anyhow::Result<String> {
        let s = strings
            .next()
            .with_context(|| format!("an SDT note without its {what}"))?;
        String::from_utf8(s.to_vec()).with_context(|| format!("an SDT note's {what} is not UTF-8"))
    };
    let (provider, name, args) = (next("provider")?, next("name")?, next("arguments")?);
    if provider.is_empty() || name.is_empty() {
        bail!("an SDT note with an empty provider or name");
    }
    Ok(RawNote {
        pc: addr(0),
        base: addr(1),
        semaphore: addr(2),
        provider,
        name,
        args,
    })
}

#[cfg(test)]
#[path = "usdt_tests.rs"]
mod tests;
