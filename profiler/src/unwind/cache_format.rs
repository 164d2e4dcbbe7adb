//! The on-disk cache's pure logic: the entry format, its checksum, entry
//! names (keys) and which entries least-recently-used eviction removes. The
//! file system side is in [`super::cache`].
//!
//! An entry is one file: a fixed header (magic, format version, fingerprint
//! of the row compiler, payload length, payload checksum), then the payload:
//! the file the rows were built from ([`Origin`], so that a session can load
//! them before any process asks, once that file is checked), then counts,
//! the rows, the pages and the unsupported rules of one object
//! ([`ObjectRows`]). All integers are little-endian.
use std::time::SystemTime;

use profiler_common::unwind::UnwindRow;

use super::cfi::ObjectRows;

/// Bumped when the layout below changes.
pub const FORMAT_VERSION: u32 = 2;

const MAGIC: [u8; 8] = *b"PBFUNWND";

/// Header: magic, version (u32), reserved (u32), compiler fingerprint,
/// payload length, payload checksum (u64 each).
pub const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 8;

/// Fingerprint of the code that compiles rows: entries built by another
/// version of it (which may read the same CFI differently) are stale. The
/// sources themselves are hashed, so no one has to remember to bump it.
pub const COMPILER: u64 = {
    let mut h = fnv1a(include_bytes!("cfi.rs"), 0xcbf2_9ce4_8422_2325);
    h = fnv1a(include_bytes!("expr.rs"), h);
    h = fnv1a(include_bytes!("regs_row.rs"), h);
    h = fnv1a(include_bytes!("plt.rs"), h);
    h = fnv1a(include_bytes!("clone_gap.rs"), h);
    h = fnv1a(include_bytes!("crt.rs"), h);
    h = fnv1a(
        include_bytes!("../../../profiler-common/src/unwind_regs.rs"),
        h,
    );
    fnv1a(include_bytes!("../../../profiler-common/src/unwind.rs"), h)
};

const fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// A 64-bit checksum of `bytes`, word by word: each step is a bijection of
/// the state for a given word, so changing any one word (or the length)
/// always changes the result; a few milliseconds for the largest objects.
pub fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("chunks of 8"));
        h = ((h ^ w).wrapping_mul(K)).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = ((h ^ u64::from_le_bytes(tail)).wrapping_mul(K)).rotate_left(29);
    h ^ (h >> 32)
}

/// What identifies an object's rows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// The GNU build id: the same code wherever the file is.
    BuildId(Vec<u8>),
    /// Without a build id: the file's device, inode, modification time
    /// (ns) and size.
    File {
        dev: (u32, u32),
        inode: u64,
        mtime_ns: i64,
        size: u64,
    },
}

/// The file an entry's rows were built from, as it was then: its path (as
/// the process that mapped it saw it) and identity. An entry is loaded
/// ahead of need only for a file that still has this very identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub path: String,
    pub dev: (u32, u32),
    pub inode: u64,
    pub mtime_ns: i64,
    pub size: u64,
}

/// Longest path an origin records (longer ones are not recorded).
const MAX_ORIGIN_PATH: usize = 4096;

/// Bytes of an entry's start that hold its header, origin and row count.
pub const PREFIX_BYTES: usize = HEADER_BYTES + 4 + MAX_ORIGIN_PATH + 32 + 8;

/// Suffix of entry files; anything else in the directory is left alone.
pub const ENTRY_SUFFIX: &str = ".unw";

impl CacheKey {
    /// The entry's file name.
    pub fn file_name(&self) -> String {
        match self {
            Self::BuildId(id) => {
                let hex: String = id.iter().take(64).map(|b| format!("{b:02x}")).collect();
                format!("b-{hex}{ENTRY_SUFFIX}")
            }
            Self::File {
                dev,
                inode,
                mtime_ns,
                size,
            } => format!(
                "f-{}-{}-{inode}-{mtime_ns}-{size}{ENTRY_SUFFIX}",
                dev.0, dev.1
            ),
        }
    }
}

/// Why an entry was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a cache entry")]
    NotAnEntry,
    #[error("entry of format version {0}, not {FORMAT_VERSION}")]
    Version(u32),
    #[error("entry built by another version of the row compiler")]
    Compiler,
    #[error("entry truncated")]
    Truncated,
    #[error("entry checksum mismatch")]
    Checksum,
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
}

impl DecodeError {
    /// Whether the entry is damaged (as opposed to merely written by another
    /// version).
    pub fn is_corrupt(self) -> bool {
        matches!(
            self,
            Self::NotAnEntry | Self::Truncated | Self::Checksum | Self::Malformed(_)
        )
    }
}

/// The entry for `rows`, without an origin.
#[cfg(test)]
pub fn encode(rows: &ObjectRows) -> Vec<u8> {
    encode_with(rows, None)
}

/// The entry for `rows`, built from the file `origin` describes.
pub fn encode_with(rows: &ObjectRows, origin: Option<&Origin>) -> Vec<u8> {
    let rules_bytes: usize = rows
        .unsupported_rules
        .iter()
        .map(|(r, _)| 4 + r.len() + 8)
        .sum();
    let mut p = Vec::with_capacity(
        64 + MAX_ORIGIN_PATH + rows.rows.len() * 8 + rows.pages.len() * 12 + rules_bytes,
    );
    match origin.filter(|o| !o.path.is_empty() && o.path.len() <= MAX_ORIGIN_PATH) {
        Some(o) => {
            p.extend_from_slice(&(o.path.len() as u32).to_le_bytes());
            p.extend_from_slice(o.path.as_bytes());
            p.extend_from_slice(&o.dev.0.to_le_bytes());
            p.extend_from_slice(&o.dev.1.to_le_bytes());
            p.extend_from_slice(&o.inode.to_le_bytes());
            p.extend_from_slice(&o.mtime_ns.to_le_bytes());
            p.extend_from_slice(&o.size.to_le_bytes());
        }
        None => p.extend_from_slice(&0u32.to_le_bytes()),
    }
    for n in [
        rows.rows.len(),
        rows.pages.len(),
        rows.unsupported,
        rows.unsupported_rules.len(),
    ] {
        p.extend_from_slice(&(n as u64).to_le_bytes());
    }
    p.extend_from_slice(row_bytes(&rows.rows));
    for &(page, first, count) in &rows.pages {
        for v in [page, first, count] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    for (rule, n) in &rows.unsupported_rules {
        p.extend_from_slice(&(rule.len() as u32).to_le_bytes());
        p.extend_from_slice(rule.as_bytes());
        p.extend_from_slice(&(*n as u64).to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + p.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&COMPILER.to_le_bytes());
    out.extend_from_slice(&(p.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&p).to_le_bytes());
    out.extend_from_slice(&p);
    out
}

// Rows are stored as they lie in memory: on a little-endian machine that
// is their fields in order, each little-endian (pc_low, cfa_offset,
// rbp_offset, rbx_offset, cfa_kind, reg_kinds; see the layout test). One
// copy each way keeps a warm load of a million rows in milliseconds.
const _: () = assert!(cfg!(target_endian = "little") && size_of::<UnwindRow>() == 8);

fn row_bytes(rows: &[UnwindRow]) -> &[u8] {
    // SAFETY: UnwindRow is repr(C), 8 bytes of integers without padding
    // (asserted above): every byte is initialized.
    unsafe { std::slice::from_raw_parts(rows.as_ptr().cast(), rows.len() * 8) }
}

fn rows_of(bytes: &[u8]) -> Vec<UnwindRow> {
    let n = bytes.len() / 8;
    let mut rows = Vec::<UnwindRow>::with_capacity(n);
    // SAFETY: the vector has room for n rows; any bytes are a valid row
    // (integers only), and they are all written before set_len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), rows.as_mut_ptr().cast::<u8>(), n * 8);
        rows.set_len(n);
    }
    rows
}

/// Reads values off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed("a count runs past the end"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// A count of items of `size` bytes that must fit in what is left.
    fn count(&mut self, size: usize) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError::Malformed("count"))?;
        if n.checked_mul(size).is_none_or(|b| b > self.0.len()) {
            return Err(DecodeError::Malformed("a count runs past the end"));
        }
        Ok(n)
    }
}

/// The origin of an entry (`None`: not recorded) and its row count, from
/// the entry's first [`PREFIX_BYTES`] (or all of it) and without checking
/// the checksum: enough to choose entries, which [`decode`] then checks.
pub fn peek_origin(prefix: &[u8]) -> Result<(Option<Origin>, u64), DecodeError> {
    let payload = check_header(prefix)?.2;
    let mut r = Reader(payload);
    let origin = read_origin(&mut r)?;
    Ok((origin, r.u64()?))
}

fn read_origin(r: &mut Reader<'_>) -> Result<Option<Origin>, DecodeError> {
    let len = r.u32()? as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_ORIGIN_PATH {
        return Err(DecodeError::Malformed("origin path too long"));
    }
    let path = std::str::from_utf8(r.take(len)?)
        .map_err(|_| DecodeError::Malformed("origin path is not UTF-8"))?
        .to_owned();
    Ok(Some(Origin {
        path,
        dev: (r.u32()?, r.u32()?),
        inode: r.u64()?,
        mtime_ns: r.u64()? as i64,
        size: r.u64()?,
    }))
}

/// Checks the fixed header; returns the payload's length and what follows
/// the header.
fn check_header(entry: &[u8]) -> Result<(u64, u64, &[u8]), DecodeError> {
    if entry.len() < 8 || entry[..8] != MAGIC {
        return Err(DecodeError::NotAnEntry);
    }
    if entry.len() < HEADER_BYTES {
        return Err(DecodeError::Truncated);
    }
    let mut h = Reader(&entry[8..HEADER_BYTES]);
    let version = h.u32()?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    h.u32()?;
    if h.u64()? != COMPILER {
        return Err(DecodeError::Compiler);
    }
    let len = h.u64()?;
    let sum = h.u64()?;
    Ok((len, sum, &entry[HEADER_BYTES..]))
}

/// The rows of an entry, checked: header, checksum, and that pages lie one
/// after the other over the rows (as [`super::cfi::compile`] lays them out).
pub fn decode(entry: &[u8]) -> Result<ObjectRows, DecodeError> {
    let (len, sum, payload) = check_header(entry)?;
    if (payload.len() as u64) < len {
        return Err(DecodeError::Truncated);
    }
    if payload.len() as u64 != len {
        return Err(DecodeError::Malformed("bytes after the payload"));
    }
    if checksum(payload) != sum {
        return Err(DecodeError::Checksum);
    }
    let mut r = Reader(payload);
    read_origin(&mut r)?;
    let n_rows = r.count(8)?;
    let n_pages = r.u64()? as usize;
    let unsupported = r.u64()? as usize;
    let n_rules = r.u64()? as usize;
    let rows = rows_of(r.take(n_rows * 8)?);
    if n_pages.checked_mul(12).is_none_or(|b| b > r.0.len()) {
        return Err(DecodeError::Malformed("a count runs past the end"));
    }
    let mut pages = Vec::with_capacity(n_pages);
    let mut next_row = 0u64;
    for _ in 0..n_pages {
        let (page, first, count) = (r.u32()?, r.u32()?, r.u32()?);
        if u64::from(first) != next_row || count == 0 {
            return Err(DecodeError::Malformed("pages do not follow each other"));
        }
        next_row += u64::from(count);
        pages.push((page, first, count));
    }
    if next_row != n_rows as u64 {
        return Err(DecodeError::Malformed("pages do not cover the rows"));
    }
    let mut unsupported_rules = Vec::new();
    for _ in 0..n_rules {
        let len = r.u32()? as usize;
        let text = std::str::from_utf8(r.take(len)?)
            .map_err(|_| DecodeError::Malformed("rule text is not UTF-8"))?;
        unsupported_rules.push((text.to_owned(), r.u64()? as usize));
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed("bytes after the rules"));
    }
    Ok(ObjectRows {
        rows,
        pages,
        unsupported,
        unsupported_rules,
    })
}

/// An entry file as eviction sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub bytes: u64,
    /// Last written or read (the cache touches the modification time on
    /// every read).
    pub used: SystemTime,
}

/// The entries to remove, least recently used first, so that the rest
/// holds at most `cap` bytes.
pub fn evictions(mut entries: Vec<Entry>, cap: u64) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    // Oldest first; the name breaks ties so the choice is deterministic.
    entries.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.name.cmp(&b.name)));
    let mut out = Vec::new();
    for e in entries {
        if total <= cap {
            break;
        }
        total -= e.bytes;
        out.push(e.name);
    }
    out
}

#[cfg(test)]
#[path = "cache_format_tests.rs"]
mod tests;
