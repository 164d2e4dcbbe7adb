//! What the symbolization tests share: workloads that print their own
//! function addresses, and raw samples built from them.
#![allow(dead_code, reason = "each symbolize test file uses a part of it")]
use std::{collections::HashMap, process::Command};

use prof_bpf_tests::Proc;
use profiler::profile::{Frame, Profile, RawSample};

pub const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer"];

/// Runs `program`, collects its `SITE name address` lines until `ready`.
pub fn sites(program: &std::path::Path) -> (Proc, HashMap<String, u64>) {
    let mut proc = Proc::spawn(&mut Command::new(program));
    let mut sites = HashMap::new();
    loop {
        let line = proc.read_line();
        if line == "ready" {
            break;
        }
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("SITE"), "unexpected line {line}");
        let name = parts.next().expect("site name").to_owned();
        let addr = parts.next().expect("site address").trim_start_matches("0x");
        sites.insert(name, u64::from_str_radix(addr, 16).expect("hex address"));
    }
    (proc, sites)
}

pub fn sample(pid: u32, user: Vec<u64>, leaf_is_pc: bool, value: i64) -> RawSample {
    RawSample {
        pid,
        tid: Some(pid),
        comm: "sym_known".to_owned(),
        user,
        leaf_is_pc,
        values: vec![value],
        ..RawSample::default()
    }
}

/// The frames of the single-location sample `i`.
pub fn frames(profile: &Profile, i: usize) -> &[Frame] {
    let s = &profile.samples[i];
    assert_eq!(s.locations.len(), 1, "sample {i}: {s:?}");
    &profile.locations[s.locations[0]].frames
}

pub fn names(frames: &[Frame]) -> Vec<(&str, bool)> {
    frames
        .iter()
        .map(|f| (f.function.as_str(), f.inlined))
        .collect()
}
