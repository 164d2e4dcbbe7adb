//! `cargo xtask bench symbolize`: addresses per second symbolized by
//! prof-bpf's symbolizer (blazesym through the profile model), cold and warm
//! cache, against binutils' `addr2line -f -i -C` on the same addresses of the
//! same large binary with DWARF (the debug build of prof-bpf itself).
use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::util;

/// How many addresses to look up.
const ADDRESSES: usize = 20_000;

pub fn run() -> anyhow::Result<()> {
    let root = util::root();
    let binary = root.join("target/debug/prof-bpf");
    // Built as `cargo xtask test` builds them (with the eBPF object), so the
    // benchmark never leaves a different prof-bpf behind.
    util::run(
        util::cargo().args(["build", "-p", "profiler"]),
        "building the debug prof-bpf (the binary to symbolize)",
    )?;
    util::run(
        util::cargo().args([
            "build",
            "--release",
            "-p",
            "profiler",
            "--example",
            "symbolize_bench",
        ]),
        "building the symbolize benchmark",
    )?;
    let bench = root.join("target/release/examples/symbolize_bench");

    // Functions with a size, from the symbol table.
    let nm = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(&binary)
        .output()
        .context("running nm")?;
    let functions: Vec<(u64, u64)> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || !f[2].eq_ignore_ascii_case("t") {
                return None;
            }
            let size = u64::from_str_radix(f[1], 16).ok()?;
            (size > 0).then_some((u64::from_str_radix(f[0], 16).ok()?, size))
        })
        .collect();
    if functions.is_empty() {
        bail!("no sized functions in {}", binary.display());
    }
    // The executable segment, to turn addresses into file offsets.
    let readelf = Command::new("readelf").arg("-lW").arg(&binary).output()?;
    let (seg_offset, seg_vaddr) = String::from_utf8_lossy(&readelf.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD") && l.contains(" R E "))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            Some((hex(f.get(1)?)?, hex(f.get(2)?)?))
        })
        .context("no executable LOAD segment")?;
    // Deterministic pseudo-random addresses inside functions.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        state >> 33
    };
    let vaddrs: Vec<u64> = (0..ADDRESSES)
        .map(|_| {
            let (start, size) = functions[next() as usize % functions.len()];
            start + next() % size
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("prof-bpf-bench-symbolize-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let offsets_file = dir.join("offsets");
    let offsets: String = vaddrs
        .iter()
        .map(|v| format!("{:x}\n", v - seg_vaddr + seg_offset))
        .collect();
    std::fs::write(&offsets_file, offsets)?;

    let out = Command::new(&bench)
        .arg(&binary)
        .arg(&offsets_file)
        .output()
        .context("running symbolize_bench")?;
    if !out.status.success() {
        bail!(
            "symbolize_bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("no {name} in symbolize_bench output: {text}"))
    };
    let (cold, warm) = (field("cold_seconds")?, field("warm_seconds")?);
    let (resolved, frames) = (field("resolved")?, field("frames")?);

    // Peer: binutils addr2line with inlined frames and demangling.
    let input: String = vaddrs.iter().map(|v| format!("{v:#x}\n")).collect();
    let t = Instant::now();
    let mut child = Command::new("addr2line")
        .args(["-f", "-i", "-C", "-e"])
        .arg(&binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running addr2line (binutils)")?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let a2l = child.wait_with_output()?;
    let _ = writer.join();
    let a2l_seconds = t.elapsed().as_secs_f64();
    if !a2l.status.success() {
        bail!("addr2line failed");
    }
    // addr2line prints a function line and a file line per frame.
    let a2l_frames = String::from_utf8_lossy(&a2l.stdout).lines().count() / 2;

    let size_mib = std::fs::metadata(&binary)?.len() as f64 / (1024.0 * 1024.0);
    let n = ADDRESSES as f64;
    println!(
        "symbolize: {ADDRESSES} addresses inside functions of {} ({size_mib:.0} MiB, with DWARF)",
        binary.display()
    );
    println!(
        "{:<38} {:>12} {:>14} {:>10}",
        "", "seconds", "addresses/s", "frames"
    );
    println!(
        "{:<38} {cold:>12.3} {:>14.0} {frames:>10}",
        "prof-bpf (blazesym), cold cache",
        n / cold
    );
    println!(
        "{:<38} {warm:>12.3} {:>14.0} {frames:>10}",
        "prof-bpf (blazesym), warm cache",
        n / warm
    );
    println!(
        "{:<38} {a2l_seconds:>12.3} {:>14.0} {a2l_frames:>10}",
        "addr2line -f -i -C (binutils)",
        n / a2l_seconds
    );
    println!(
        "resolved {resolved}/{ADDRESSES}; speed vs addr2line: cold {:.1}x, warm {:.1}x",
        a2l_seconds / cold,
        a2l_seconds / warm
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
