//! Python's small objects. CPython serves objects of 512 bytes or less from
//! pymalloc's arenas (1 MiB mmaps in 3.10 and later, 256 KiB before),
//! never from malloc, so the malloc probes do not see them:
//!
//! - `--mmap` sees the arenas themselves, each under the Python stack that
//!   made pymalloc map it (the mapping's stack gets its Python frames like
//!   any allocation's);
//! - `--pymalloc` also probes the interpreter's exported object allocator,
//!   `PyObject_Malloc`, `_Calloc`, `_Realloc` and `_Free`, with the malloc
//!   probes' programs (same signatures, same in-kernel sampling, weights and
//!   nesting: a big object's malloc inside `PyObject_Malloc` counts once).
//!
//! Probes on the entry points see the objects only if the interpreter
//! calls them. Link-time optimized builds inline the allocator instead:
//! Debian's python3.11 reads the allocator pointer itself in about a
//! hundred functions. [`check_calls`] decides from the machine code, and
//! [`for_process`] refuses such an interpreter in one line.
use std::{collections::HashSet, os::unix::fs::MetadataExt as _};

use anyhow::{Context as _, bail};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};
use object::{
    Object as _, ObjectSection as _, ObjectSymbol as _, ObjectSymbolTable as _, SectionKind,
};
use profiler_common::heap::EntryKind;

use super::discover::{Allocator, AttachPoint, Role, file_offset, probe_skip_for_args};
use crate::{process, python};

/// pymalloc's exported entry points, frees first (the attach order), with
/// their number of arguments (the later argument registers are scratch at
/// entry: the probe may go past instructions that write them).
pub const ENTRY_POINTS: [(&str, Role, usize); 4] = [
    ("PyObject_Free", Role::Free, 1),
    ("PyObject_Malloc", Role::Alloc(EntryKind::Malloc), 1),
    ("PyObject_Calloc", Role::Alloc(EntryKind::Calloc), 2),
    ("PyObject_Realloc", Role::Alloc(EntryKind::Realloc), 2),
];

/// The function whose calls and inlined copies are counted.
const MALLOC: &str = "PyObject_Malloc";

/// How the interpreter's code reaches its object allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallCheck {
    /// Calls and jumps to `PyObject_Malloc`, direct or through its PLT stub.
    pub calls: usize,
    /// Instructions outside the entry points that read the allocator
    /// pointer `PyObject_Malloc` reads (a static slot, RIP-relative): the
    /// allocator inlined where they are.
    pub inlined: usize,
}

impl CallCheck {
    /// Whether probes on the entry points see most objects: the entry
    /// point is called from more places than the allocator is inlined in.
    pub fn entry_points_suffice(&self) -> bool {
        self.calls > 0 && self.inlined < self.calls
    }
}

/// Counts, in the ELF image `data`, the calls to `PyObject_Malloc` and the
/// inlined reads of its allocator pointer.
pub fn check_calls(data: &[u8]) -> anyhow::Result<CallCheck> {
    let file = object::File::parse(data).context("not an ELF object")?;
    let symbol = |name: &str| {
        file.dynamic_symbols()
            .find(|s| s.is_definition() && s.name() == Ok(name))
            .map(|s| (s.address(), s.size()))
    };
    let (entry, size) = symbol(MALLOC).with_context(|| format!("no `{MALLOC}` exported"))?;
    let entries: Vec<(u64, u64)> = ENTRY_POINTS
        .iter()
        .filter_map(|(name, _, _)| symbol(name))
        .collect();
    let in_entry_points = |ip: u64| entries.iter().any(|&(a, s)| ip >= a && ip < a + s);
    let got = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".got")))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect::<Vec<_>>();
    let in_got = |a: u64| got.iter().any(|&(start, end)| a >= start && a < end);

    // The static slots the entry point reads (Debian: `_PyObject.malloc`
    // and `.ctx`); a shared library reaches its allocator through the GOT,
    // which no other code can have inlined.
    let body = code_at(data, &file, entry, size.clamp(1, 64))?;
    let slots: HashSet<u64> = instructions(body, entry)
        .take_while(|i| !matches!(i.flow_control(), FlowControl::Return))
        .filter(|i| i.is_ip_rel_memory_operand())
        .map(|i| i.ip_rel_memory_address())
        .filter(|&a| !in_got(a))
        .collect();
    let stubs = plt_stubs(&file, MALLOC);

    let mut check = CallCheck {
        calls: 0,
        inlined: 0,
    };
    for section in file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text && !s.name().is_ok_and(|n| n.starts_with(".plt")))
    {
        let Ok(code) = section.data() else { continue };
        for i in instructions(code, section.address()) {
            if i.is_call_near() || i.is_jmp_near() {
                let target = i.near_branch_target();
                if target == entry || stubs.contains(&target) {
                    check.calls += 1;
                }
            } else if i.is_ip_rel_memory_operand()
                && slots.contains(&i.ip_rel_memory_address())
                && !in_entry_points(i.ip())
            {
                check.inlined += 1;
            }
        }
    }
    Ok(check)
}

/// The `len` bytes of code at virtual `address`.
fn code_at<'a>(
    data: &'a [u8],
    file: &object::File<'_>,
    address: u64,
    len: u64,
) -> anyhow::Result<&'a [u8]> {
    let start = file_offset(file, address)
        .and_then(|o| usize::try_from(o).ok())
        .with_context(|| format!("{address:#x} lies in no loadable segment"))?;
    let end = (start + len as usize).min(data.len());
    data.get(start..end).context("code outside the file")
}

fn instructions(code: &[u8], address: u64) -> impl Iterator<Item = Instruction> + '_ {
    Decoder::with_ip(64, code, address, DecoderOptions::NONE).into_iter()
}

/// Addresses of the PLT stubs that jump to `name` (through the GOT slot
/// its dynamic relocation fills). Stubs are 16 bytes, 16-aligned, in
/// `.plt` and `.plt.sec`.
fn plt_stubs(file: &object::File<'_>, name: &str) -> HashSet<u64> {
    let Some(relocations) = file.dynamic_relocations() else {
        return HashSet::new();
    };
    let symbols = file.dynamic_symbol_table();
    let slots: HashSet<u64> = relocations
        .filter_map(|(offset, r)| match r.target() {
            object::RelocationTarget::Symbol(index) => {
                let symbol = symbols.as_ref()?.symbol_by_index(index).ok()?;
                (symbol.name() == Ok(name)).then_some(offset)
            }
            _ => None,
        })
        .collect();
    let mut stubs = HashSet::new();
    for section in file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
    {
        let (Ok(code), address) = (section.data(), section.address()) else {
            continue;
        };
        for i in instructions(code, address) {
            if i.is_jmp_near_indirect()
                && i.is_ip_rel_memory_operand()
                && slots.contains(&i.ip_rel_memory_address())
            {
                stubs.insert(i.ip() & !15);
            }
        }
    }
    stubs
}

/// The interpreter object of CPython process `pid`, as an allocator whose
/// entry points are pymalloc's, once [`check_calls`] says probes there see
/// its objects; else one line that says why not.
pub fn for_process(pid: u32) -> anyhow::Result<Allocator> {
    let memory = python::memory::ProcessMemory::new(pid);
    let py = python::discover::find(pid, &memory)
        .with_context(|| format!("--pymalloc: pid {pid} runs no CPython this can read"))?;
    let open_path = process::path_in_root(pid, &py.object);
    let data = std::fs::read(&open_path).with_context(|| format!("reading {}", py.object))?;
    let check = check_calls(&data).with_context(|| format!("--pymalloc: {}", py.object))?;
    log::debug!("{}: {check:?}", py.object);
    if !check.entry_points_suffice() {
        bail!(
            "--pymalloc: {} inlines its object allocator ({} instructions outside {MALLOC} read its allocator pointer, {} calls reach {MALLOC}), so probes there would miss most objects; use --mmap to see pymalloc's arenas",
            py.object,
            check.inlined,
            check.calls
        );
    }
    let file = object::File::parse(&*data).context("not an ELF object")?;
    let mut points = Vec::new();
    for (symbol, role, args) in ENTRY_POINTS {
        let (address, size) = file
            .dynamic_symbols()
            .find(|s| s.is_definition() && s.name() == Ok(symbol))
            .map(|s| (s.address(), s.size()))
            .with_context(|| format!("--pymalloc: {} exports no `{symbol}`", py.object))?;
        let offset = file_offset(&file, address)
            .with_context(|| format!("`{symbol}` at {address:#x} lies in no loadable segment"))?;
        points.push(AttachPoint {
            symbol,
            offset,
            probe_offset: offset + probe_skip_for_args(&data, offset, address, size, args),
            role,
        });
    }
    let inode = std::fs::metadata(&open_path)
        .with_context(|| format!("reading {}", py.object))?
        .ino();
    Ok(Allocator {
        path: py.object,
        open_path,
        inode,
        points,
        hooks: None,
        usdt: Vec::new(),
    })
}

/// What a heap report of a CPython process covers of its small objects.
pub fn coverage_line(mmap: bool, pymalloc: bool) -> String {
    match (pymalloc, mmap) {
        (true, true) => "python objects: pymalloc's PyObject_Malloc/Calloc/Realloc/Free probed and sampled like malloc; its arena mappings, made inside those calls, are not counted again".to_owned(),
        (true, false) => "python objects: pymalloc's PyObject_Malloc/Calloc/Realloc/Free probed and sampled like malloc (objects of any size, big ones counted once)".to_owned(),
        (false, true) => "python objects: those of 512 bytes or less are counted as the pymalloc arenas (mmap) that hold them, under the Python code that made pymalloc map each arena".to_owned(),
        (false, false) => "python objects: those of 512 bytes or less come from pymalloc arenas, not malloc, and are not in this report (--mmap shows the arenas, --pymalloc the objects)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_311: &str = "/usr/bin/python3.11";
    const PYENV_312: &str = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";
    const PYENV_313: &str = "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0";

    fn check(path: &str) -> Option<CallCheck> {
        let data = std::fs::read(path).ok()?;
        Some(check_calls(&data).unwrap())
    }

    /// Debian's LTO build reads `_PyObject.malloc` inline in many more
    /// places than it calls PyObject_Malloc (objdump counts 169 reads of
    /// that slot and 56 direct calls); pyenv's shared builds call it
    /// through the PLT from dozens of places (objdump: 58 calls to
    /// `PyObject_Malloc@plt` in 3.12.1) and cannot inline it.
    #[test]
    fn the_check_tells_inlined_allocators_from_called_ones() {
        let Some(debian) = check(DEBIAN_311) else {
            eprintln!("skipped: {DEBIAN_311} is not installed");
            return;
        };
        eprintln!("{DEBIAN_311}: {debian:?}");
        assert!(!debian.entry_points_suffice(), "{debian:?}");
        assert!(debian.inlined > 100, "{debian:?}");
        for path in [PYENV_312, PYENV_313] {
            let Some(pyenv) = check(path) else {
                eprintln!("skipped: {path} is not installed");
                continue;
            };
            eprintln!("{path}: {pyenv:?}");
            assert!(pyenv.entry_points_suffice(), "{path}: {pyenv:?}");
            assert!(pyenv.calls >= 30, "{path}: {pyenv:?}");
        }
    }

    #[test]
    fn a_file_without_the_allocator_is_an_error() {
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_calls(&data).unwrap_err();
        assert!(err.to_string().contains("PyObject_Malloc"), "{err}");
    }
}
