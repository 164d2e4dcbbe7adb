//! What a launched command will run, found from its files before exec:
//! the program (through `PATH` and `#!` interpreters), its dynamic loader,
//! and the allocator it will use.
//!
//! The allocator is the first object defining `malloc` in the linker's
//! order: the executable, `LD_PRELOAD`, then `DT_NEEDED` libraries breadth
//! first through the loader's search path.
use std::{
    ffi::OsString,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use object::read::elf::{Dyn as _, FileHeader as _};

use crate::heap::discover::{self, Allocator};

/// `name` as exec would find it (through PATH when it has no slash).
pub(crate) fn find_program(name: &OsString) -> anyhow::Result<PathBuf> {
    let path = Path::new(name);
    if name.as_encoded_bytes().contains(&b'/') {
        if !path.exists() {
            bail!("cannot run {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(path))
        .find(|p| is_executable(p))
        .with_context(|| format!("cannot run {}: not found in PATH", path.display()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The allocator `program` will use once executed with our environment.
pub(crate) fn allocator_of_program(program: &Path) -> anyhow::Result<Allocator> {
    let elf = follow_interpreters(program)?;
    let mut candidates = vec![elf.clone()];
    if let Some(preload) = std::env::var_os("LD_PRELOAD") {
        for lib in preload
            .to_string_lossy()
            .split([':', ' '])
            .filter(|s| !s.is_empty())
        {
            candidates.push(resolve_library(lib, &[]));
        }
    }
    // DT_NEEDED breadth first, as the loader searches symbols.
    let mut queue = vec![elf];
    let mut seen = candidates.clone();
    while let Some(object) = (!queue.is_empty()).then(|| queue.remove(0)) {
        let Ok(data) = std::fs::read(&object) else {
            continue;
        };
        let (needed, runpath) = dynamic_info(&data, &object);
        for name in needed {
            let lib = resolve_library(&name, &runpath);
            if !seen.contains(&lib) {
                seen.push(lib.clone());
                candidates.push(lib.clone());
                queue.push(lib);
            }
        }
    }
    for candidate in &candidates {
        let shown = candidate.to_string_lossy().into_owned();
        if let Ok(allocator) = Allocator::from_file(&shown, candidate.clone()) {
            return Ok(allocator);
        }
    }
    bail!(
        "{} and the libraries it needs define no malloc; name the allocator with --lib PATH",
        program.display()
    )
}

/// The dynamic loader (PT_INTERP) that will map `program`'s libraries, and
/// the file offset of its `_dl_debug_state`: the function it calls before
/// and after mapping them (for debuggers). None for a static program.
pub(crate) fn loader_of_program(program: &Path) -> Option<(PathBuf, u64)> {
    use object::{Object as _, ObjectSymbol as _, read::elf::ProgramHeader as _};
    let elf = follow_interpreters(program).ok()?;
    let data = std::fs::read(&elf).ok()?;
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).ok()?;
    let endian = file.endian();
    let interp = file
        .elf_program_headers()
        .iter()
        .find_map(|ph| ph.interpreter(endian, &*data).ok().flatten())?;
    let loader = PathBuf::from(String::from_utf8_lossy(interp).into_owned());
    let loader_data = std::fs::read(&loader).ok()?;
    let loader_file = object::File::parse(&*loader_data).ok()?;
    let address = loader_file
        .dynamic_symbols()
        .chain(loader_file.symbols())
        .find(|s| {
            s.name()
                .is_ok_and(|n| n.split('@').next() == Some("_dl_debug_state"))
        })?
        .address();
    let offset = discover::file_offset(&loader_file, address)?;
    Some((loader, offset))
}

/// The ELF file that runs `program`: itself, or its `#!` interpreter's.
fn follow_interpreters(program: &Path) -> anyhow::Result<PathBuf> {
    let mut current = program.to_path_buf();
    for _ in 0..4 {
        let mut head = [0u8; 256];
        let n = std::fs::File::open(&current)
            .and_then(|mut f| f.read(&mut head))
            .with_context(|| format!("reading {}", current.display()))?;
        let head = &head[..n];
        if !head.starts_with(b"#!") {
            return Ok(current);
        }
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let interpreter = words.next().context("empty #! line")?;
        current = if interpreter.ends_with("/env") {
            let name = words
                .find(|w| !w.starts_with('-'))
                .context("`#!/usr/bin/env` without a program")?;
            find_program(&name.into())?
        } else {
            PathBuf::from(interpreter)
        };
    }
    bail!("{}: too many levels of #! interpreters", program.display())
}

/// DT_NEEDED names and the DT_RUNPATH/DT_RPATH directories of an ELF file.
fn dynamic_info(data: &[u8], path: &Path) -> (Vec<String>, Vec<PathBuf>) {
    let mut needed = Vec::new();
    let mut runpath = Vec::new();
    let Ok(file) = object::read::elf::ElfFile64::<object::Endianness>::parse(data) else {
        return (needed, runpath);
    };
    let endian = file.endian();
    let header = file.elf_header();
    let Ok(sections) = header.sections(endian, data) else {
        return (needed, runpath);
    };
    let Ok(Some((entries, link))) = sections.dynamic(endian, data) else {
        return (needed, runpath);
    };
    let Ok(strings) = sections.strings(endian, data, link) else {
        return (needed, runpath);
    };
    let origin = path.parent().map(Path::to_path_buf).unwrap_or_default();
    for entry in entries {
        let tag = entry.d_tag(endian);
        let Ok(value) = entry.string(endian, strings) else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match tag {
            object::elf::DT_NEEDED => needed.push(value),
            object::elf::DT_RUNPATH | object::elf::DT_RPATH => runpath.extend(
                value
                    .split(':')
                    .map(|d| PathBuf::from(d.replace("$ORIGIN", &origin.to_string_lossy()))),
            ),
            _ => {}
        }
    }
    (needed, runpath)
}

/// Where the loader finds library `name` (a path is taken as is).
fn resolve_library(name: &str, runpath: &[PathBuf]) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    let env_dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    const SYSTEM: &[&str] = &[
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ];
    env_dirs
        .iter()
        .chain(runpath)
        .cloned()
        .chain(SYSTEM.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_program_uses_libc() {
        let allocator = allocator_of_program(Path::new("/bin/true")).unwrap();
        assert!(allocator.path.contains("libc.so"), "{}", allocator.path);
    }

    #[test]
    fn script_follows_its_interpreter() {
        let dir = std::env::temp_dir().join(format!("prof-bpf-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/usr/bin/env sh\necho hi\n").unwrap();
        let allocator = allocator_of_program(&script).unwrap();
        assert!(allocator.path.contains("libc.so"), "{}", allocator.path);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
