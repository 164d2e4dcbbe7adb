//! Profile files into the [`Profile`] model: pprof from any tool (gzip-
//! compressed or not), gperftools heap profiles (text) and CPU profiles
//! (binary). The format is told from the content, not the name.
//!
//! Input is bounded: the file and its decompressed content may not exceed
//! `max_input` bytes (a `.gz` of zeros can expand a thousandfold). Past the
//! cap, reading stops with a one-line error, so memory stays near the cap.
mod gperftools;
mod pprof;

use std::{
    fs::File,
    io::{BufReader, Read},
    path::Path,
};

use anyhow::{Context as _, bail};

use super::Profile;

/// The default cap on a profile's size, compressed or not (1 GiB).
pub const DEFAULT_MAX_INPUT: u64 = 1 << 30;

/// Reads the profile in `path`; errors name the file.
pub fn from_file(path: &Path, max_input: u64) -> anyhow::Result<Profile> {
    let name = path.display();
    let mut file = File::open(path).with_context(|| format!("cannot read {name}"))?;
    let mut head = Vec::with_capacity(GZIP_MAGIC.len());
    (&mut file)
        .take(GZIP_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {name}"))?;
    let input = std::io::Cursor::new(head.clone()).chain(BufReader::new(file));
    let data = if head == GZIP_MAGIC {
        // Decompressed as it is read: the compressed bytes never sit in
        // memory beside the decompressed ones.
        gunzip(input.take(max_input.saturating_add(1)), max_input)
    } else {
        read_capped(input, max_input)
    }
    .with_context(|| name.to_string())?;
    parse(&data).with_context(|| name.to_string())
}

/// Reads a profile from bytes in any supported format.
pub fn from_bytes(data: &[u8], max_input: u64) -> anyhow::Result<Profile> {
    if data.len() as u64 > max_input {
        bail!("{}", too_big(max_input));
    }
    if data.starts_with(&GZIP_MAGIC) {
        parse(&gunzip(data, max_input)?)
    } else {
        parse(data)
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn too_big(max_input: u64) -> String {
    format!(
        "larger than {} (raise the cap with --max-input)",
        format_size(max_input)
    )
}

/// `1GiB`, `512MiB`, `3000B`: exact, in the largest unit that divides.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024,
/// optionally followed by `iB` or `B`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 1G, 512M, 4096)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{text}`: unknown unit; use K, M, G or T")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}` is out of range"))
}

/// All of `reader`, or an error past `max_input` bytes.
fn read_capped(reader: impl Read, max_input: u64) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    reader
        .take(max_input.saturating_add(1))
        .read_to_end(&mut data)?;
    if data.len() as u64 > max_input {
        bail!("{}", too_big(max_input));
    }
    Ok(data)
}

/// Decompresses (every gzip member, as `gunzip` does) up to `max_input`.
fn gunzip(compressed: impl Read, max_input: u64) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed)
        .take(max_input.saturating_add(1))
        .read_to_end(&mut data)
        .context("bad gzip data (truncated or corrupt)")?;
    if data.len() as u64 > max_input {
        bail!("decompresses to {}", too_big(max_input));
    }
    Ok(data)
}

/// Tells the format from the content of an uncompressed profile.
fn parse(bytes: &[u8]) -> anyhow::Result<Profile> {
    if bytes.is_empty() {
        bail!("empty file, not a profile");
    }
    if bytes.starts_with(b"heap profile:") {
        return gperftools::parse_heap(bytes);
    }
    if gperftools::is_cpu_profile(bytes) {
        return gperftools::parse_cpu(bytes);
    }
    pprof::decode(bytes).map_err(|e| {
        anyhow::anyhow!("not a profile (pprof, gperftools heap or CPU profile): {e:#}")
    })
}

#[cfg(test)]
mod tests;
