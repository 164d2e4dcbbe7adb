//! The cold-part finder on the interpreters of this machine. pyenv's
//! builds keep a `.symtab`, whose `_PyEval_EvalFrameDefault.cold` symbol is
//! the oracle; the finder reads `.dynsym`, `.eh_frame`, the code and the
//! data only, never `.symtab`.
use object::{Object as _, ObjectSymbol as _};

use super::*;

const EVAL: &str = "_PyEval_EvalFrameDefault";
const DEBIAN_311: &str = "/usr/bin/python3.11";

fn pyenv(version: &str) -> String {
    let minor = version.rsplit_once('.').map_or(version, |(m, _)| m);
    format!("/root/.pyenv/versions/{version}/lib/libpython{minor}.so.1.0")
}

/// The function's range from `.dynsym`, and what the finder finds.
fn found(elf: &object::File<'_>) -> ((u64, u64), Vec<(u64, u64)>) {
    let hot = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok(EVAL))
        .map(|s| (s.address(), s.address() + s.size()))
        .expect("the evaluation loop is exported");
    (hot, cold_parts(elf, hot.0, hot.1))
}

/// `.symtab`'s `_PyEval_EvalFrameDefault.cold*` ranges.
fn symtab_cold(elf: &object::File<'_>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = elf
        .symbols()
        .filter(|s| {
            s.name()
                .is_ok_and(|n| n.starts_with(&format!("{EVAL}.cold")))
        })
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    out.sort_unstable();
    out
}

fn read(path: &str) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok();
    if data.is_none() {
        eprintln!("skipped: {path} is not installed");
    }
    data
}

#[test]
fn finds_exactly_the_symtab_cold_parts_of_pyenv_builds() {
    for version in ["3.11.7", "3.12.1", "3.13.0"] {
        let path = pyenv(version);
        let Some(data) = read(&path) else { continue };
        let elf = object::File::parse(&*data).unwrap();
        let oracle = symtab_cold(&elf);
        let (hot, cold) = found(&elf);
        eprintln!("{path}: hot {hot:x?}, found {cold:x?}, .symtab {oracle:x?}");
        assert_eq!(cold, oracle, "{path}");
        // 3.11 and 3.12 have a cold part, 3.13 none: both cases are met.
        assert_eq!(
            oracle.is_empty(),
            version == "3.13.0",
            "{path}: {oracle:x?}"
        );
    }
}

/// Debian's stripped build names no cold part; its hot part jumps to one
/// (about 300 direct jumps, error paths) and its opcode table points into
/// it. The finder finds one part, outside the hot one, reached by those
/// jumps that are not tail calls (which land at an FDE's first byte with a
/// fresh frame and stay out).
#[test]
fn finds_the_cold_part_of_a_stripped_build() {
    let Some(data) = read(DEBIAN_311) else { return };
    let elf = object::File::parse(&*data).unwrap();
    assert!(symtab_cold(&elf).is_empty(), "stripped: no .symtab");
    let (hot, cold) = found(&elf);
    eprintln!("{DEBIAN_311}: hot {hot:x?}, found {cold:x?}");
    assert_eq!(cold.len(), 1, "{cold:x?}");
    let (start, end) = cold[0];
    assert!(end <= hot.0 || start >= hot.1, "outside the hot part");
    assert!(end - start > 0x100, "a real part: {cold:x?}");
    let cfi = Cfi::new(&elf).unwrap();
    let targets = branch_targets(&elf, hot.0, hot.1);
    let into_cold = targets
        .iter()
        .filter(|&&t| (start..end).contains(&t))
        .count();
    for t in &targets {
        let inside = (start..end).contains(t);
        let function_entry = cfi
            .covering(*t)
            .is_some_and(|f| f.initial_address() == *t && !inside);
        assert!(inside || function_entry, "jump to {t:x} is in neither");
    }
    assert!(into_cold > 100, "{into_cold} jumps into the cold part");
}

#[test]
fn an_object_without_the_function_finds_nothing() {
    let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    assert!(cold_parts(&elf, 0x10, 0x20).is_empty());
}
