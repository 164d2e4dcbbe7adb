//! The readers' bounds and leniency: what a file may hold and how big it
//! may get.
use std::io::Write as _;

use prost::Message as _;

use super::*;
use crate::profile::{Frame, Location, Mapping, Sample, SampleType};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn small_profile() -> Profile {
    Profile {
        sample_types: vec![SampleType::samples()],
        mappings: vec![Mapping {
            start: 0x1000,
            limit: 0x2000,
            file: "/bin/app".into(),
            ..Mapping::default()
        }],
        locations: vec![Location {
            mapping: Some(0),
            address: 0x1100,
            frames: vec![Frame::named("main")],
            ..Location::default()
        }],
        samples: vec![Sample {
            locations: vec![0],
            values: vec![7],
            labels: vec![],
        }],
        ..Profile::default()
    }
}

#[test]
fn invalid_utf8_strings_are_read_lossily() {
    let mut message = crate::output::pprof::to_proto(&small_profile());
    let main = message
        .string_table
        .iter()
        .position(|s| s == b"main")
        .unwrap();
    message.string_table[main] = b"ma\xffin".to_vec();
    let p = from_bytes(&message.encode_to_vec(), 1 << 20).unwrap();
    assert_eq!(p.locations[0].frames[0].function, "ma\u{fffd}in");
    assert_eq!(p.samples[0].values, [7]);
}

#[test]
fn decompression_stops_at_the_cap() {
    // 64 MiB of zeros compress to about 64 KiB.
    let zeros = gzip(&vec![0; 64 << 20]);
    assert!(zeros.len() < 1 << 20);
    let err = format!("{:#}", from_bytes(&zeros, 1 << 20).unwrap_err());
    assert_eq!(
        err,
        "decompresses to larger than 1MiB (raise the cap with --max-input)"
    );
    // Under the cap, the same path reads the profile.
    let bytes = crate::output::pprof::encode(&small_profile()).unwrap();
    assert_eq!(from_bytes(&bytes, 1 << 20).unwrap().samples[0].values, [7]);
    let err = format!("{:#}", from_bytes(&bytes, 8).unwrap_err());
    assert!(err.starts_with("larger than 8B"), "{err}");
}

#[test]
fn file_reads_stop_at_the_cap() {
    let err = format!(
        "{:#}",
        from_file(Path::new("/dev/zero"), 1 << 20).unwrap_err()
    );
    assert_eq!(
        err,
        "/dev/zero: larger than 1MiB (raise the cap with --max-input)"
    );
    let dir = std::env::temp_dir().join(format!("prof-bpf-read-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zeros.gz");
    std::fs::write(&path, gzip(&vec![0; 8 << 20])).unwrap();
    let err = format!("{:#}", from_file(&path, 1 << 20).unwrap_err());
    assert!(
        err.ends_with(
            "zeros.gz: decompresses to larger than 1MiB (raise the cap with --max-input)"
        ),
        "{err}"
    );
    let good = dir.join("good.pb.gz");
    std::fs::write(
        &good,
        crate::output::pprof::encode(&small_profile()).unwrap(),
    )
    .unwrap();
    assert_eq!(from_file(&good, 1 << 20).unwrap().samples.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("4k"), Ok(4096));
    assert_eq!(parse_size("100"), Ok(100));
    assert!(parse_size("0").is_err());
    assert!(parse_size("1X").unwrap_err().contains("unknown unit"));
    assert!(parse_size("G").is_err());
    assert!(
        parse_size("99999999999T")
            .unwrap_err()
            .contains("out of range")
    );
    assert_eq!(format_size(1 << 30), "1GiB");
    assert_eq!(format_size(3 << 20), "3MiB");
    assert_eq!(format_size(1000), "1000B");
}
