use std::time::{Duration, SystemTime};

use profiler_common::unwind::{CFA_RSP, RBP_OFFSET, UnwindRow};

use super::*;

/// Two pages of rows and one unsupported rule.
fn sample() -> ObjectRows {
    let row = |pc: u16, off: i64| UnwindRow::new(pc, CFA_RSP, off, RBP_OFFSET, -16).unwrap();
    ObjectRows {
        rows: vec![row(0, 8), row(4, 16), row(0x10, 24), row(0, 8)],
        pages: vec![(7, 0, 3), (9, 3, 1)],
        unsupported: 1,
        unsupported_rules: vec![("cfa expression DW_OP_foo".to_owned(), 1)],
    }
}

#[test]
fn an_entry_decodes_to_what_was_encoded() {
    let rows = sample();
    assert_eq!(decode(&encode(&rows)), Ok(rows));
    let empty = ObjectRows::default();
    assert_eq!(decode(&encode(&empty)), Ok(empty));
}

#[test]
fn the_origin_is_read_from_the_entry_start_and_checked_with_the_rest() {
    let origin = Origin {
        path: "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1".to_owned(),
        dev: (254, 1),
        inode: 1234,
        mtime_ns: 1_700_000_000_123_456_789,
        size: 110 << 20,
    };
    let entry = encode_with(&sample(), Some(&origin));
    assert_eq!(decode(&entry), Ok(sample()));
    let prefix = &entry[..entry.len().min(PREFIX_BYTES)];
    assert_eq!(peek_origin(prefix), Ok((Some(origin.clone()), 4)));
    // A prefix cut inside the origin is no origin.
    assert!(peek_origin(&entry[..HEADER_BYTES + 10]).is_err());
    assert_eq!(peek_origin(&encode(&sample())), Ok((None, 4)));
    // A relative path is not recorded: it names nothing for another process.
    let relative = Origin {
        path: String::new(),
        ..origin
    };
    assert_eq!(
        peek_origin(&encode_with(&sample(), Some(&relative))),
        Ok((None, 4))
    );
    // The origin is under the checksum.
    let mut bad = entry.clone();
    bad[HEADER_BYTES + 6] ^= 1;
    assert_eq!(decode(&bad), Err(DecodeError::Checksum));
}

#[test]
fn a_flipped_payload_byte_fails_the_checksum() {
    let entry = encode(&sample());
    for at in [HEADER_BYTES, HEADER_BYTES + 33, entry.len() - 1] {
        let mut bad = entry.clone();
        bad[at] ^= 0x40;
        assert_eq!(decode(&bad), Err(DecodeError::Checksum), "byte {at}");
    }
}

#[test]
fn a_truncated_entry_is_refused_at_any_length() {
    let entry = encode(&sample());
    for len in 0..entry.len() {
        let err = decode(&entry[..len]).unwrap_err();
        assert!(err.is_corrupt(), "length {len}: {err:?}");
    }
    assert_eq!(decode(&entry[..8]), Err(DecodeError::Truncated));
    assert_eq!(
        decode(&entry[..entry.len() - 1]),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn another_version_or_compiler_is_stale_not_corrupt() {
    let mut entry = encode(&sample());
    entry[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = decode(&entry).unwrap_err();
    assert_eq!(err, DecodeError::Version(FORMAT_VERSION + 1));
    assert!(!err.is_corrupt());
    let mut entry = encode(&sample());
    entry[16] ^= 1;
    assert_eq!(decode(&entry), Err(DecodeError::Compiler));
    assert_eq!(decode(b"#!/bin/sh\n..."), Err(DecodeError::NotAnEntry));
}

#[test]
fn a_consistent_checksum_over_inconsistent_pages_is_malformed() {
    let mut rows = sample();
    rows.pages[1].1 = 2; // overlaps the first page
    assert!(matches!(
        decode(&encode(&rows)),
        Err(DecodeError::Malformed(_))
    ));
    let mut rows = sample();
    rows.pages.pop(); // the last row belongs to no page
    assert!(matches!(
        decode(&encode(&rows)),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn the_checksum_sees_any_single_word_and_the_length() {
    let data: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
    let base = checksum(&data);
    for at in (0..data.len()).step_by(97) {
        let mut d = data.clone();
        d[at] = d[at].wrapping_add(1);
        assert_ne!(checksum(&d), base, "byte {at}");
    }
    assert_ne!(checksum(&data[..999]), checksum(&data[..1000]));
    assert_ne!(checksum(&[0]), checksum(&[0, 0]));
}

#[test]
fn keys_name_files_by_build_id_or_file_identity() {
    assert_eq!(
        CacheKey::BuildId(vec![0xab, 0x01]).file_name(),
        "b-ab01.unw"
    );
    let key = CacheKey::File {
        dev: (259, 2),
        inode: 1234,
        mtime_ns: 1_700_000_000_123_456_789,
        size: 4096,
    };
    assert_eq!(key.file_name(), "f-259-2-1234-1700000000123456789-4096.unw");
}

#[test]
fn eviction_removes_least_recently_used_until_under_the_cap() {
    let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let entry = |name: &str, bytes: u64, used: u64| Entry {
        name: name.to_owned(),
        bytes,
        used: t(used),
    };
    let entries = vec![
        entry("new", 40, 300),
        entry("old", 30, 100),
        entry("mid", 20, 200),
        entry("read-lately", 50, 400),
    ];
    assert_eq!(evictions(entries.clone(), 140), Vec::<String>::new());
    assert_eq!(evictions(entries.clone(), 139), ["old"]);
    assert_eq!(evictions(entries.clone(), 90), ["old", "mid"]);
    assert_eq!(evictions(entries.clone(), 50), ["old", "mid", "new"]);
    assert_eq!(evictions(entries, 0).len(), 4);
}

#[test]
fn rows_are_stored_as_their_fields_in_order_little_endian() {
    let row = UnwindRow {
        pc_low: 0x0201,
        cfa_offset: 0x0403,
        rbp_offset: 0x05,
        rbx_offset: 0x06,
        cfa_kind: 0x07,
        reg_kinds: 0x08,
    };
    assert_eq!(row_bytes(&[row]), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(rows_of(&[1, 2, 3, 4, 5, 6, 7, 8]), [row]);
}
