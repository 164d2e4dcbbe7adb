//! Independent readers of what the receivers got: pprof by field numbers
//! (google/pprof `proto/profile.proto`) and through `go tool pprof`, OTLP
//! through PyPI's opentelemetry-proto.
use std::{io::Read as _, path::Path, process::Command};

use super::wire::Message;

/// A pprof sample as read back: stack (function names, leaf first), values,
/// string labels and numeric labels.
#[derive(Debug, PartialEq)]
pub struct PprofSample {
    pub stack: String,
    pub values: Vec<i64>,
    pub str_labels: Vec<(String, String)>,
    pub num_labels: Vec<(String, i64)>,
}

#[derive(Debug)]
pub struct Pprof {
    pub sample_types: Vec<String>,
    pub samples: Vec<PprofSample>,
    pub time_nanos: i64,
    pub duration_nanos: i64,
}

/// Gunzips (the bytes must be gzip) and reads a pprof profile.
pub fn pprof(gzipped: &[u8]) -> Pprof {
    assert_eq!(&gzipped[..2], &[0x1f, 0x8b], "pprof bytes are not gzip'd");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gzipped)
        .read_to_end(&mut raw)
        .expect("gunzip");
    let p = Message::decode(&raw);
    let strings = p.strings(6);
    let s = |i: u64| strings[i as usize].clone();
    let functions: Vec<(u64, String)> = p
        .messages(5)
        .iter()
        .map(|f| (f.varint(1), s(f.varint(2))))
        .collect();
    let locations: Vec<(u64, Vec<String>)> = p
        .messages(4)
        .iter()
        .map(|l| {
            let names = l
                .messages(4)
                .iter()
                .map(|line| {
                    let id = line.varint(1);
                    functions.iter().find(|(f, _)| *f == id).unwrap().1.clone()
                })
                .collect();
            (l.varint(1), names)
        })
        .collect();
    let samples = p
        .messages(2)
        .iter()
        .map(|sample| {
            let stack: Vec<String> = sample
                .varints(1)
                .iter()
                .flat_map(|id| locations.iter().find(|(l, _)| l == id).unwrap().1.clone())
                .collect();
            let (mut str_labels, mut num_labels) = (Vec::new(), Vec::new());
            for label in sample.messages(3) {
                if label.varint(2) != 0 {
                    str_labels.push((s(label.varint(1)), s(label.varint(2))));
                } else {
                    num_labels.push((s(label.varint(1)), label.varint(3) as i64));
                }
            }
            PprofSample {
                stack: stack.join(";"),
                values: sample.varints(2).iter().map(|&v| v as i64).collect(),
                str_labels,
                num_labels,
            }
        })
        .collect();
    Pprof {
        sample_types: p.messages(1).iter().map(|t| s(t.varint(1))).collect(),
        samples,
        time_nanos: p.varint(9) as i64,
        duration_nanos: p.varint(10) as i64,
    }
}

/// `go tool pprof -raw FILE`: the text it prints (it must accept the file).
pub fn go_pprof_raw(gzipped: &[u8], scratch: &Path) -> String {
    let file = scratch.with_extension("pb.gz");
    std::fs::write(&file, gzipped).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&file)
        .output()
        .expect("run `go tool pprof` (golang-go, installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "go tool pprof refused {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The OTLP request summarized by `otlp_summary.py` (one fact a line) under
/// the project's Python (target/tools/venv, made by `cargo xtask setup`).
pub fn otlp_summary(request: &[u8], scratch: &Path) -> String {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || prof_bpf_tests::workspace_root().join("target"),
        std::path::PathBuf::from,
    );
    let python = target.join("tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it installs PyPI's opentelemetry-proto)",
        python.display()
    );
    let file = scratch.with_extension("otlp.bin");
    std::fs::write(&file, request).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sinks/otlp_summary.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "opentelemetry-proto could not decode the request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
