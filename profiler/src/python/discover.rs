//! Finding the CPython interpreter in a process: the executable or a mapped
//! libpython that exports `_PyRuntime`, its version and its layout.
use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    fs::File,
    os::unix::fs::MetadataExt as _,
    sync::{Mutex, PoisonError},
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use profiler_common::python_splice::EvalCode;

use super::{
    Unsupported, eval_code,
    memory::Memory,
    offsets::{self, Offsets, PythonVersion},
};
use crate::process::{self, Mapping};

/// The interpreter of one process, with everything the walkers need.
#[derive(Clone, Debug)]
pub struct Interpreter {
    /// The object that holds the interpreter, as the target sees it.
    pub object: String,
    pub version: PythonVersion,
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Address of `PyCode_Type`: a frame's code pointer must point at an
    /// object of this type.
    pub code_type: u64,
    pub offsets: Offsets,
    /// The code of `_PyEval_EvalFrameDefault` (its `.dynsym` entry and
    /// size), and of its cold parts once [`add_cold_parts`] found them: the
    /// native frames that ran Python frames. Empty when it is not exported.
    pub eval_loop: EvalCode,
}

/// Addresses of the interpreter's symbols in one object (before relocation).
struct Exports {
    runtime: u64,
    code_type: Option<u64>,
    version: Option<u64>,
    /// `_PyEval_EvalFrameDefault` and its cold parts.
    eval_loop: EvalCode,
}

/// Finds the interpreter of `pid`. Fails with [`Unsupported`] (downcastable)
/// for a CPython that is not 3.11 to 3.13 or whose layout is not the
/// expected one, and with a plain error when the process has no CPython.
pub fn find(pid: u32, memory: &impl Memory) -> anyhow::Result<Interpreter> {
    let maps = process::maps(pid)?;
    let mut seen = HashSet::new();
    for mapping in maps.iter().filter(|m| m.is_file() && m.is_executable()) {
        if !seen.insert(mapping.path.as_str()) {
            continue;
        }
        let path = process::path_in_root(pid, &mapping.path);
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // SAFETY: the file is only read; a concurrent truncation could
        // fault, as for every tool that maps binaries.
        let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
            continue;
        };
        let Ok(elf) = object::File::parse(&*data) else {
            continue;
        };
        let Some(exports) = exports(&elf) else {
            continue;
        };
        let bias = load_bias(&elf, &maps, mapping)
            .with_context(|| format!("locating {} in pid {pid}", mapping.path))?;
        return interpreter(memory, &mapping.path, &exports, bias);
    }
    bail!("pid {pid} runs no CPython (no mapped object exports _PyRuntime)")
}

fn exports(elf: &object::File<'_>) -> Option<Exports> {
    let mut runtime = None;
    let mut code_type = None;
    let mut version = None;
    let mut eval_loop = None;
    for symbol in elf.dynamic_symbols() {
        match symbol.name() {
            Ok("_PyEval_EvalFrameDefault") if symbol.size() > 0 => {
                eval_loop = Some((symbol.address(), symbol.size()));
            }
            Ok("_PyRuntime") => runtime = Some(symbol.address()),
            Ok("PyCode_Type") => code_type = Some(symbol.address()),
            Ok("Py_Version") => version = Some(symbol.address()),
            _ => {}
        }
    }
    let runtime = runtime.filter(|&a| a != 0)?;
    Some(Exports {
        runtime,
        code_type,
        version,
        eval_loop: eval_loop.map_or_else(EvalCode::default, |(start, size)| {
            EvalCode::new(start, start + size)
        }),
    })
}

/// Cold parts found, by object file (device, inode, modification time):
/// the start of the evaluation loop and its cold parts, object addresses.
type ColdCache = HashMap<(u64, u64, i64), (u64, Vec<(u64, u64)>)>;
static COLD_PARTS: Mutex<Option<ColdCache>> = Mutex::new(None);

/// Adds the cold parts of the evaluation loop ([`eval_code`]) to
/// `py.eval_loop` (once). A search of the object's code, data and CFI,
/// kept per object file; [`find`] leaves it out so that the kernel can walk
/// the process's frames sooner (only the merge of the frames needs it).
pub fn add_cold_parts(pid: u32, py: &mut Interpreter) {
    let Some(&(start, _)) = py.eval_loop.parts().first() else {
        return;
    };
    let path = process::path_in_root(pid, &py.object);
    let Ok(meta) = std::fs::metadata(&path) else {
        return;
    };
    let key = (meta.dev(), meta.ino(), meta.mtime());
    let mut cache = COLD_PARTS.lock().unwrap_or_else(PoisonError::into_inner);
    let cache = cache.get_or_insert_with(HashMap::new);
    let (object_start, parts) = match cache.entry(key) {
        Entry::Occupied(found) => found.into_mut(),
        Entry::Vacant(slot) => match search_cold_parts(&path) {
            Some(found) => slot.insert(found),
            None => return,
        },
    };
    let bias = start.wrapping_sub(*object_start);
    for &(cold_start, cold_end) in parts.iter() {
        py.eval_loop
            .add(cold_start.wrapping_add(bias), cold_end.wrapping_add(bias));
    }
}

/// The evaluation loop's start and cold parts in the object at `path`.
fn search_cold_parts(path: &std::path::Path) -> Option<(u64, Vec<(u64, u64)>)> {
    let file = File::open(path).ok()?;
    // SAFETY: as in `find`.
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let (start, size) = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("_PyEval_EvalFrameDefault") && s.size() > 0)
        .map(|s| (s.address(), s.size()))?;
    Some((start, eval_code::cold_parts(&elf, start, start + size)))
}

/// What to add to a virtual address of the object to get its address in
/// the process: from the mapping of the object's first load segment.
fn load_bias(elf: &object::File<'_>, maps: &[Mapping], any: &Mapping) -> anyhow::Result<u64> {
    let first = elf
        .segments()
        .find(|s| s.file_range().0 == 0)
        .context("no load segment starts at file offset 0")?;
    let base = maps
        .iter()
        .find(|m| m.inode == any.inode && m.dev == any.dev && m.offset == 0)
        .context("the object's first page is not mapped")?;
    Ok(base.start.wrapping_sub(first.address() & !0xfff))
}

fn interpreter(
    memory: &impl Memory,
    object: &str,
    exports: &Exports,
    bias: u64,
) -> anyhow::Result<Interpreter> {
    let Some(version_address) = exports.version else {
        // 3.10 and older have no Py_Version: name the version from the
        // object's name (libpython3.10.so.1.0, python3.10) and stop.
        return Err(Unsupported {
            version: version_from_name(object).unwrap_or_else(|| "older than 3.11".to_owned()),
            object: object.to_owned(),
            why: "only 3.11 to 3.13 are supported".to_owned(),
        }
        .into());
    };
    let hex = memory
        .read_u32(version_address.wrapping_add(bias))
        .with_context(|| format!("reading Py_Version in {object}"))?;
    let version = PythonVersion { hex };
    let unsupported = |why: String| Unsupported {
        version: version.to_string(),
        object: object.to_owned(),
        why,
    };
    let runtime = exports.runtime.wrapping_add(bias);
    let offsets = if let Some(table) = offsets::table(version) {
        table
    } else if offsets::has_debug_offsets(version) {
        let mut bytes = vec![0; offsets::DEBUG_OFFSETS_LEN];
        memory
            .read(runtime, &mut bytes)
            .with_context(|| format!("reading _Py_DebugOffsets in {object}"))?;
        offsets::from_debug_offsets(&bytes, version).map_err(|e| unsupported(format!("{e:#}")))?
    } else {
        return Err(unsupported("only 3.11 to 3.13 are supported".to_owned()).into());
    };
    let code_type = exports
        .code_type
        .ok_or_else(|| unsupported("PyCode_Type is not exported".to_owned()))?
        .wrapping_add(bias);
    Ok(Interpreter {
        object: object.to_owned(),
        version,
        runtime,
        code_type,
        offsets,
        eval_loop: exports.eval_loop.moved(bias),
    })
}

/// Whether `pid` maps an executable object whose name says Python (the
/// cheap test before reading symbols).
pub fn maps_python(pid: u32) -> bool {
    crate::process::maps(pid).is_ok_and(|maps| {
        maps.iter().any(|m| {
            m.is_file()
                && m.is_executable()
                && m.path
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.contains("python"))
        })
    })
}

/// `3.10` from `/x/libpython3.10.so.1.0` or `/x/python3.10`.
fn version_from_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let rest = &name[name.find("python")? + "python".len()..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!major.is_empty() && major.chars().all(|c| c.is_ascii_digit()) && !minor.is_empty())
        .then(|| format!("{major}.{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_object_names() {
        let cases = [
            (
                "/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0",
                Some("3.10"),
            ),
            ("/usr/bin/python3.9", Some("3.9")),
            ("/usr/lib/libpython3.so", None),
            ("/usr/bin/python", None),
        ];
        for (path, want) in cases {
            assert_eq!(version_from_name(path).as_deref(), want, "{path}");
        }
    }
}
