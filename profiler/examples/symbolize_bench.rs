//! Symbolization throughput, run by `cargo xtask bench symbolize`.
//!
//! Usage: symbolize_bench BINARY OFFSETS_FILE (one hex file offset a line).
//! Symbolizes the offsets through the profiler's own path (a profile whose
//! locations point into BINARY) twice with one cache: cold (the object is
//! parsed on first use) and warm (parsed data cached), and prints
//! `cold_seconds`, `warm_seconds`, `addresses`, `resolved`, `frames`.
use std::time::Instant;

use profiler::{
    profile::{Location, Mapping, Profile, SampleType},
    symbolize::SymbolCache,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [binary, offsets] = &args[..] else {
        anyhow::bail!("usage: symbolize_bench BINARY OFFSETS_FILE");
    };
    let offsets: Vec<u64> = std::fs::read_to_string(offsets)?
        .lines()
        .map(|l| u64::from_str_radix(l.trim().trim_start_matches("0x"), 16))
        .collect::<Result<_, _>>()?;
    let profile = || Profile {
        sample_types: vec![SampleType::samples()],
        mappings: vec![Mapping {
            start: 0,
            limit: u64::MAX,
            offset: 0,
            file: binary.clone(),
            local_path: Some(binary.into()),
            ..Mapping::default()
        }],
        locations: offsets
            .iter()
            .map(|&o| Location {
                mapping: Some(0),
                address: o,
                ..Location::default()
            })
            .collect(),
        ..Profile::default()
    };
    let cache = SymbolCache::new();
    let mut cold = profile();
    let t = Instant::now();
    cold.symbolize_with(&cache);
    let cold_seconds = t.elapsed().as_secs_f64();
    let mut warm = profile();
    let t = Instant::now();
    warm.symbolize_with(&cache);
    let warm_seconds = t.elapsed().as_secs_f64();
    let resolved = warm
        .locations
        .iter()
        .filter(|l| !l.frames.is_empty())
        .count();
    let frames: usize = warm.locations.iter().map(|l| l.frames.len()).sum();
    println!("cold_seconds {cold_seconds}");
    println!("warm_seconds {warm_seconds}");
    println!("addresses {}", offsets.len());
    println!("resolved {resolved}");
    println!("frames {frames}");
    Ok(())
}
