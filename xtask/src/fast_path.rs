//! `cargo xtask check-fast-path [--bless]`: counts the instructions on the
//! fast paths of `malloc` and `free` in the release libprofalloc.so, by
//! class, and compares them with the committed golden file
//! (allocator/fast_path.golden), so the fast path cannot grow unnoticed.
//! `--bless` rewrites the golden file (only on purpose).
//! It also checks that the code every process runs (`.text.hot`, see
//! allocator/preload/layout.ld) still fits in the 64 KiB group of the
//! text that start-up (`.init`) faults in.
//!
//! The fast path is the instruction sequence from the entry to the first
//! `ret`, following the fall-through of every conditional branch (the
//! slow paths are out-of-line tail calls reached by taken branches).
use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use anyhow::{Context as _, bail};

use crate::util;

const FUNCTIONS: &[&str] = &["malloc", "free"];
const GOLDEN: &str = "allocator/fast_path.golden";

struct Insn {
    addr: u64,
    mnemonic: String,
    operands: String,
}

/// Disassembles one function of the library (Intel syntax).
fn disassemble(lib: &std::path::Path, func: &str) -> anyhow::Result<Vec<Insn>> {
    let text = util::output(
        Command::new("objdump")
            .args(["-d", "--no-show-raw-insn", "-M", "intel"])
            .arg(format!("--disassemble={func}"))
            .arg(lib),
        "objdump",
    )?;
    let mut insns = Vec::new();
    for line in text.lines() {
        let Some((addr, rest)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let rest = rest.split('#').next().unwrap_or("").trim();
        let (mnemonic, operands) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        insns.push(Insn {
            addr,
            mnemonic: mnemonic.to_owned(),
            operands: operands.trim().to_owned(),
        });
    }
    if insns.is_empty() {
        bail!("objdump found no function `{func}` in {}", lib.display());
    }
    Ok(insns)
}

/// Address and size of each section of the library, by name.
fn sections(lib: &std::path::Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let text = util::output(Command::new("readelf").arg("-SW").arg(lib), "readelf")?;
    let mut found = BTreeMap::new();
    for line in text.lines() {
        // `  [14] .init  PROGBITS  00000000000207cc 01f7cc 000017 ...`
        let Some((_, rest)) = line.split_once(']') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let [name, _, addr, _, size, ..] = fields[..]
            && let (Ok(addr), Ok(size)) =
                (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16))
        {
            found.insert(name.to_owned(), (addr, size));
        }
    }
    Ok(found)
}

/// The kernel maps a file's pages around a fault in aligned groups of this
/// many bytes (fault-around).
const FAULT_GROUP: u64 = 64 << 10;

/// Fails when `.text.hot` has outgrown the 64 KiB group that `.init` is in
/// (every process would then have a second group of the text resident).
fn check_hot_group(lib: &std::path::Path) -> anyhow::Result<()> {
    let found = sections(lib)?;
    let (Some(&(init, _)), Some(&(hot, size))) = (found.get(".init"), found.get(".text.hot"))
    else {
        bail!(
            "{} has no .init or .text.hot section (see allocator/preload/layout.ld)",
            lib.display()
        );
    };
    let end = hot + size;
    println!(
        "hot code: .text.hot {size} bytes, ends {} bytes into its 64 KiB group",
        end - init / FAULT_GROUP * FAULT_GROUP
    );
    if (end - 1) / FAULT_GROUP != init / FAULT_GROUP {
        bail!(
            ".text.hot ({size} bytes at {hot:#x}) no longer ends in the 64 KiB group of .init \
             ({init:#x}): move rarely run functions out of it"
        );
    }
    Ok(())
}

/// The fast path: entry to first `ret`, through fall-throughs and local
/// unconditional jumps.
fn fast_path(insns: &[Insn]) -> anyhow::Result<Vec<&Insn>> {
    let mut path = Vec::new();
    let mut i = 0;
    while path.len() < 200 {
        let insn = insns.get(i).context("fell off the end of the function")?;
        path.push(insn);
        match insn.mnemonic.as_str() {
            "ret" => return Ok(path),
            "jmp" => {
                let target = insn
                    .operands
                    .split_whitespace()
                    .next()
                    .and_then(|t| u64::from_str_radix(t, 16).ok());
                match target.and_then(|t| insns.iter().position(|x| x.addr == t)) {
                    Some(j) => i = j,
                    None => bail!(
                        "the fast path ends in a jump out of the function: {}",
                        insn.operands
                    ),
                }
            }
            _ => i += 1,
        }
    }
    bail!("no `ret` within 200 instructions")
}

/// Counts by class: total, loads, stores, conditional branches, others.
fn classify(path: &[&Insn]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for class in ["total", "load", "store", "branch", "prefetch", "call"] {
        counts.insert(class, 0);
    }
    for insn in path {
        *counts.get_mut("total").expect("key") += 1;
        let m = insn.mnemonic.as_str();
        if m.starts_with("prefetch") {
            *counts.get_mut("prefetch").expect("key") += 1;
            continue;
        }
        if m.starts_with('j') && m != "jmp" {
            *counts.get_mut("branch").expect("key") += 1;
        }
        if m == "call" {
            *counts.get_mut("call").expect("key") += 1;
        }
        if m == "lea" || m.starts_with("nop") {
            continue;
        }
        let (dst, src) = insn
            .operands
            .split_once(',')
            .unwrap_or((&insn.operands, ""));
        let read_modify_write = matches!(m, "add" | "sub" | "inc" | "dec" | "and" | "or" | "xor");
        if dst.contains("PTR") {
            if m != "cmp" && m != "test" {
                *counts.get_mut("store").expect("key") += 1;
            }
            if read_modify_write || m == "cmp" || m == "test" {
                *counts.get_mut("load").expect("key") += 1;
            }
        }
        if src.contains("PTR") {
            *counts.get_mut("load").expect("key") += 1;
        }
    }
    counts
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let bless = args.iter().any(|a| a == "--bless");
    util::run(
        util::cargo().args(["build", "--release", "-p", "profalloc-preload"]),
        "building libprofalloc.so (release)",
    )?;
    let lib = util::target_dir().join("release/libprofalloc.so");
    check_hot_group(&lib)?;
    let mut report = String::from(
        "# Fast-path instruction counts of libprofalloc.so (release, x86-64), from\n\
         # `cargo xtask check-fast-path`; rewrite with `--bless` only on purpose.\n",
    );
    for func in FUNCTIONS {
        let insns = disassemble(&lib, func)?;
        let path = fast_path(&insns)?;
        eprintln!("{func} fast path:");
        for insn in &path {
            eprintln!("  {:x}: {:<10} {}", insn.addr, insn.mnemonic, insn.operands);
        }
        let counts = classify(&path);
        let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(report, "{func} {}", line.join(" ")).expect("write to String");
    }
    let golden_path = util::root().join(GOLDEN);
    if bless {
        std::fs::write(&golden_path, &report)
            .with_context(|| format!("writing {}", golden_path.display()))?;
        print!("{report}");
        println!("xtask: wrote {GOLDEN}");
        return Ok(());
    }
    let golden = std::fs::read_to_string(&golden_path)
        .with_context(|| format!("reading {} (create it with --bless)", golden_path.display()))?;
    print!("{report}");
    if golden != report {
        bail!(
            "the fast path changed; expected ({GOLDEN}):\n{golden}\
             If the change is intended, run `cargo xtask check-fast-path --bless`."
        );
    }
    println!("xtask: fast paths match {GOLDEN}");
    Ok(())
}
