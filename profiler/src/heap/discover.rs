//! Which allocator a process really uses, and where to probe it.
//!
//! The allocator is the first object in the dynamic linker's search order
//! that defines `malloc`: the executable itself (a static binary, or one with
//! its own malloc), then preloaded and needed libraries. For a running process
//! the candidates are the objects in `/proc/PID/maps`; for a program about to
//! be launched they come from its ELF file (see `launch`). Every path is opened
//! through `/proc/PID/root`, so processes in containers resolve their own files.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use profiler_common::heap::EntryKind;

use super::usdt_sites::UsdtSites;
use crate::process::{self, Mapping};

/// What a probed function does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An allocation function (entry and return probes).
    Alloc(EntryKind),
    /// A function that frees its first argument (entry probe only).
    Free,
}

/// Allocator entry points by symbol name. When several names share one
/// address (glibc's `free`/`cfree`, `memalign`/`aligned_alloc`), the first
/// listed gives the role and the function is probed once.
pub const ENTRY_POINTS: &[(&str, Role)] = &[
    ("free", Role::Free),
    ("cfree", Role::Free),
    ("malloc", Role::Alloc(EntryKind::Malloc)),
    ("calloc", Role::Alloc(EntryKind::Calloc)),
    ("realloc", Role::Alloc(EntryKind::Realloc)),
    ("reallocarray", Role::Alloc(EntryKind::ReallocArray)),
    ("posix_memalign", Role::Alloc(EntryKind::PosixMemalign)),
    ("aligned_alloc", Role::Alloc(EntryKind::Memalign)),
    ("memalign", Role::Alloc(EntryKind::Memalign)),
    ("valloc", Role::Alloc(EntryKind::Malloc)),
    ("pvalloc", Role::Alloc(EntryKind::Malloc)),
    // jemalloc's non-standard API.
    ("mallocx", Role::Alloc(EntryKind::Malloc)),
    ("rallocx", Role::Alloc(EntryKind::Realloc)),
    ("dallocx", Role::Free),
    ("sdallocx", Role::Free),
    // C++ operators, probed where the allocator defines its own (tcmalloc,
    // jemalloc); libstdc++'s call malloc and are covered by it.
    ("_Znwm", Role::Alloc(EntryKind::Malloc)),
    ("_Znam", Role::Alloc(EntryKind::Malloc)),
    ("_ZnwmRKSt9nothrow_t", Role::Alloc(EntryKind::Malloc)),
    ("_ZnamRKSt9nothrow_t", Role::Alloc(EntryKind::Malloc)),
    ("_ZnwmSt11align_val_t", Role::Alloc(EntryKind::Malloc)),
    ("_ZnamSt11align_val_t", Role::Alloc(EntryKind::Malloc)),
    (
        "_ZnwmSt11align_val_tRKSt9nothrow_t",
        Role::Alloc(EntryKind::Malloc),
    ),
    (
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        Role::Alloc(EntryKind::Malloc),
    ),
    ("_ZdlPv", Role::Free),
    ("_ZdaPv", Role::Free),
    ("_ZdlPvm", Role::Free),
    ("_ZdaPvm", Role::Free),
    ("_ZdlPvRKSt9nothrow_t", Role::Free),
    ("_ZdaPvRKSt9nothrow_t", Role::Free),
    ("_ZdlPvSt11align_val_t", Role::Free),
    ("_ZdaPvSt11align_val_t", Role::Free),
    ("_ZdlPvmSt11align_val_t", Role::Free),
    ("_ZdaPvmSt11align_val_t", Role::Free),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", Role::Free),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", Role::Free),
];

/// One function to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    /// Symbol it was found by (the first of its aliases).
    pub symbol: &'static str,
    /// Offset of its first instruction in the file (what identifies it).
    pub offset: u64,
    /// Offset of the instruction to probe: the first one, or a later one
    /// with the same state that is cheaper to hit (see `probe_point`).
    pub probe_offset: u64,
    /// What it does.
    pub role: Role,
}

/// The allocator of a process: one object file and its entry points.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// Path as the target sees it (for messages).
    pub path: String,
    /// Path this process opens (through `/proc/PID/root` for a target).
    pub open_path: PathBuf,
    /// Inode of the file, identifying it across processes.
    pub inode: u64,
    /// Entry points, one per distinct offset, frees first.
    pub points: Vec<AttachPoint>,
    /// libprofalloc.so's sampling hooks, when the object has them.
    pub hooks: Option<Hooks>,
    /// The target's `otel_memory` USDT probe sites (in any of its objects),
    /// filled in when they are what is probed.
    pub usdt: Vec<UsdtSites>,
}

/// The sampling hooks of libprofalloc.so (`profiler_common::hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hooks {
    /// File offset of the instruction probed in `profalloc_sample_alloc`.
    pub alloc_offset: u64,
    /// File offset of the instruction probed in `profalloc_sample_free`.
    pub free_offset: u64,
    /// Virtual address (in the object) of `profalloc_sample_bytes`.
    pub rate_address: u64,
}

impl Allocator {
    /// Reads the entry points of the object at `open_path`; fails when it
    /// defines no `malloc` or no `free`.
    pub fn from_file(path: &str, open_path: PathBuf) -> anyhow::Result<Self> {
        let data = std::fs::read(&open_path).with_context(|| format!("reading {path}"))?;
        let inode = std::fs::metadata(&open_path)
            .with_context(|| format!("reading {path}"))?
            .ino();
        let points =
            entry_points(&data).with_context(|| format!("reading the ELF symbols of {path}"))?;
        let hooks = hooks(&data);
        for needed in ["malloc", "free"] {
            if !points.iter().any(|p| p.symbol == needed) {
                bail!(
                    "{path} defines no `{needed}` function: not an allocator (use --lib with the library that provides malloc)"
                );
            }
        }
        Ok(Self {
            path: path.to_owned(),
            open_path,
            inode,
            points,
            hooks,
            usdt: Vec::new(),
        })
    }
}

/// The allocator entry points defined in the ELF image `data`, deduplicated
/// by file offset and ordered frees first (attach order matters: a free must
/// never be missed for a block whose allocation was recorded).
pub fn entry_points(data: &[u8]) -> anyhow::Result<Vec<AttachPoint>> {
    let file = object::File::parse(data).context("not an ELF object")?;
    // Name -> (address, size).
    let mut addresses: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition()
            || symbol.kind() != object::SymbolKind::Text
            || symbol.address() == 0
        {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        // Versioned names (`malloc@@GLIBC_2.2.5`) in .symtab of some builds.
        let name = name.split('@').next().unwrap_or(name);
        if ENTRY_POINTS.iter().any(|(n, _)| *n == name) {
            addresses
                .entry(name)
                .or_insert((symbol.address(), symbol.size()));
        }
    }
    let mut points: Vec<AttachPoint> = Vec::new();
    for &(symbol, role) in ENTRY_POINTS {
        let Some(&(address, size)) = addresses.get(symbol) else {
            continue;
        };
        let offset = file_offset(&file, address)
            .with_context(|| format!("`{symbol}` at {address:#x} lies in no loadable segment"))?;
        if points.iter().any(|p| p.offset == offset) {
            continue;
        }
        points.push(AttachPoint {
            symbol,
            offset,
            probe_offset: offset + probe_skip(data, offset, address, size),
            role,
        });
    }
    points.sort_by_key(|p| !matches!(p.role, Role::Free));
    Ok(points)
}

/// How far into the function at file `offset` (virtual `address`, `size`
/// bytes) its uprobe goes: see `probe_point`. 0 when its extent is unknown.
pub(crate) fn probe_skip(data: &[u8], offset: u64, address: u64, size: u64) -> u64 {
    probe_skip_for_args(data, offset, address, size, 6)
}

/// [`probe_skip`] for a function that takes `args` register arguments.
pub(crate) fn probe_skip_for_args(
    data: &[u8],
    offset: u64,
    address: u64,
    size: u64,
    args: usize,
) -> u64 {
    let code = usize::try_from(offset)
        .ok()
        .and_then(|start| data.get(start..start.checked_add(usize::try_from(size).ok()?)?));
    match code {
        Some(code) if size > 0 => crate::probe_point::cheap_offset_for_args(code, address, args),
        _ => 0,
    }
}

/// The sampling hooks defined in the ELF image `data`, if all are there.
pub(crate) fn hooks(data: &[u8]) -> Option<Hooks> {
    use profiler_common::hooks::{SAMPLE_ALLOC_SYMBOL, SAMPLE_BYTES_SYMBOL, SAMPLE_FREE_SYMBOL};
    let file = object::File::parse(data).ok()?;
    let symbol = |name: &str| {
        file.dynamic_symbols()
            .find(|s| s.is_definition() && s.name() == Ok(name))
            .map(|s| (s.address(), s.size()))
    };
    // Where to probe each hook: its cheapest instruction (see `probe_point`).
    let probe_offset = |name: &str| {
        let (address, size) = symbol(name)?;
        let offset = file_offset(&file, address)?;
        Some(offset + probe_skip(data, offset, address, size))
    };
    Some(Hooks {
        alloc_offset: probe_offset(SAMPLE_ALLOC_SYMBOL)?,
        free_offset: probe_offset(SAMPLE_FREE_SYMBOL)?,
        rate_address: symbol(SAMPLE_BYTES_SYMBOL)?.0,
    })
}

/// The sampling rate libprofalloc.so runs with in `pid` (0: sampler off),
/// read from its exported variable through `/proc/PID/mem`.
pub fn hook_rate(pid: u32, allocator: &Allocator, hooks: &Hooks) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let maps = process::maps(pid)?;
    let base = maps
        .iter()
        .find(|m| m.inode == allocator.inode && m.offset == 0)
        .with_context(|| format!("pid {pid} does not map {}", allocator.path))?
        .start;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut value = [0u8; 8];
    mem.read_exact_at(&mut value, base + hooks.rate_address)
        .with_context(|| format!("reading the sampling rate of pid {pid}"))?;
    Ok(u64::from_ne_bytes(value))
}

/// The file offset of virtual address `address` (through the segment that maps it).
pub(crate) fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (start, size) = (segment.address(), segment.size());
        let (file_start, file_size) = segment.file_range();
        (address >= start && address < start + size.min(file_size))
            .then(|| address - start + file_start)
    })
}

/// Names of allocator libraries that replace the C library's malloc.
const ALLOCATOR_LIBRARIES: &[&str] = &["libprofalloc", "libjemalloc", "libtcmalloc", "libmimalloc"];

/// The allocator of running process `pid`: `lib` if given (a path as the
/// target sees it), else found from its mappings.
pub fn for_process(pid: u32, lib: Option<&Path>) -> anyhow::Result<Allocator> {
    if let Some(lib) = lib {
        return library(pid, lib);
    }
    let maps = process::maps(pid)?;
    let objects = mapped_objects(&maps);
    // The executable (first file mapping) when it has its own malloc:
    // statically linked, or linked with an allocator.
    if let Some(exe) = objects.first()
        && let Ok(allocator) =
            Allocator::from_file(&exe.path, process::path_in_root(pid, &exe.path))
    {
        return Ok(allocator);
    }
    for name in ALLOCATOR_LIBRARIES {
        if let Some(m) = objects.iter().find(|m| m.file_name().starts_with(name)) {
            return Allocator::from_file(&m.path, process::path_in_root(pid, &m.path));
        }
    }
    let libc = process::find_libc(&maps).with_context(|| {
        format!("pid {pid} maps no known allocator (libc.so.6, jemalloc, tcmalloc, mimalloc, libprofalloc.so) and its executable has no malloc; name it with --lib PATH")
    })?;
    Allocator::from_file(&libc.path, process::path_in_root(pid, &libc.path))
}

/// `--lib PATH` for a process: its own view of the path first.
fn library(pid: u32, lib: &Path) -> anyhow::Result<Allocator> {
    let shown = lib.to_string_lossy().into_owned();
    let in_root = process::path_in_root(pid, &shown);
    let open = if lib.is_absolute() && in_root.exists() {
        in_root
    } else {
        lib.to_path_buf()
    };
    if !open.exists() {
        bail!("--lib {shown}: no such file");
    }
    Allocator::from_file(&shown, open)
}

/// The distinct executable file mappings, in address order (the main
/// executable is mapped first in practice).
pub(crate) fn mapped_objects(maps: &[Mapping]) -> Vec<&Mapping> {
    let mut seen = Vec::new();
    let mut objects = Vec::new();
    for m in maps.iter().filter(|m| m.is_file() && m.is_executable()) {
        if !seen.contains(&m.inode) {
            seen.push(m.inode);
            objects.push(m);
        }
    }
    objects
}

/// The allocator the prof-bpf process itself maps (its C library): the
/// default library for `--all`.
pub fn own_libc() -> anyhow::Result<Allocator> {
    let maps = process::maps(std::process::id())?;
    let libc = process::find_libc(&maps)
        .context("prof-bpf maps no libc.so.6; name the library with --lib PATH")?;
    Allocator::from_file(&libc.path, PathBuf::from(&libc.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_aliases_are_probed_once() {
        let maps = process::maps(std::process::id()).unwrap();
        let libc = process::find_libc(&maps).expect("the test binary maps libc");
        let allocator = Allocator::from_file(&libc.path, PathBuf::from(&libc.path)).unwrap();
        let offsets: Vec<u64> = allocator.points.iter().map(|p| p.offset).collect();
        let mut unique = offsets.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            offsets.len(),
            unique.len(),
            "duplicate offsets: {:?}",
            allocator.points
        );
        let symbols: Vec<&str> = allocator.points.iter().map(|p| p.symbol).collect();
        assert_eq!(symbols[0], "free", "frees come first: {symbols:?}");
        for s in [
            "malloc",
            "calloc",
            "realloc",
            "posix_memalign",
            "aligned_alloc",
        ] {
            assert!(symbols.contains(&s), "{s} missing: {symbols:?}");
        }
        // glibc 2.36: cfree is free, memalign is aligned_alloc.
        assert!(!symbols.contains(&"cfree"), "{symbols:?}");
        assert!(!symbols.contains(&"memalign"), "{symbols:?}");
    }

    #[test]
    fn library_without_malloc_is_rejected() {
        let err = Allocator::from_file("/bin/true", PathBuf::from("/bin/true")).unwrap_err();
        assert!(
            format!("{err:#}").contains("defines no `malloc`"),
            "{err:#}"
        );
    }
}
