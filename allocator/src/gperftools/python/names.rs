//! Names of the Python frames in the profiles. A frame is kept in the
//! native stack as one tagged word ([`frame_word`]: an index into the code
//! table and the instruction offset); the code table holds, per code
//! object, copies of its qualified name, file name and location table,
//! read once when the code object is first seen in a walk. The dumps name
//! frames from the copies, so code objects freed before the dump (all of
//! them, by the exit dump of a finalized interpreter) still have names, and
//! a code object freed and another allocated at the same address is a new
//! entry (the identity compares its strings' addresses and first line).
//!
//! The table is lock-free (walks run in signal handlers and inside malloc):
//! entries and string bytes are reserved with atomic counters, written,
//! then published into an open-addressing index by compare-and-swap. Two
//! threads may add the same code object at once; both entries name it.
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use profiler_common::python_layout::{Offsets, line_of};

use super::super::unwind::safe_read_bytes;
use crate::os;

/// Distinct code objects named.
const CODES: usize = 1 << 14;
const INDEX_SLOTS: usize = 1 << 15;
/// Bytes for names and location tables.
const POOL: usize = 16 << 20;
/// Longest name or file name kept, in bytes of UTF-8.
const MAX_NAME: usize = 512;
/// Largest location table kept (a larger one: the frames of that code have
/// no line).
const MAX_LINETABLE: usize = 64 << 10;

/// Tag of a Python frame word: no user-space address has bit 63 set.
pub(crate) const PY_TAG: u64 = 1 << 63;
/// Index of the words that are not code-table entries.
const SPECIAL: u64 = 0x7fff_ffff;
/// `[python truncated]`: the walk stopped before the outermost frame.
pub(crate) const TRUNCATED_WORD: u64 = PY_TAG | SPECIAL << 32;
/// `[python code unnamed]`: the code table was full or the code object's
/// strings could not be read.
pub(crate) const UNNAMED_WORD: u64 = PY_TAG | SPECIAL << 32 | 1;
/// `[truncated]`: the native stack was cut (by depth or an unwinding
/// failure) before its outermost frame, the marker the eBPF profiler's
/// stacks end with too.
pub(crate) const NATIVE_TRUNCATED_WORD: u64 = PY_TAG | SPECIAL << 32 | 2;

pub(crate) const TRUNCATED_NAME: &str = "[python truncated]";
pub(crate) const UNNAMED_NAME: &str = "[python code unnamed]";
pub(crate) const NATIVE_TRUNCATED_NAME: &str = "[truncated]";

#[derive(Clone, Copy)]
struct Code {
    code: u64,
    identity: u64,
    firstlineno: i32,
    qualname: (u32, u32),
    filename: (u32, u32),
    /// Length u32::MAX: the table was too large to keep.
    linetable: (u32, u32),
}

static ENTRIES: AtomicUsize = AtomicUsize::new(0);
static INDEX: AtomicUsize = AtomicUsize::new(0);
static POOL_BASE: AtomicUsize = AtomicUsize::new(0);
static NEXT_ENTRY: AtomicU32 = AtomicU32::new(0);
static POOL_USED: AtomicUsize = AtomicUsize::new(0);
/// Frames left unnamed (table full, unreadable strings).
pub(crate) static UNNAMED: AtomicUsize = AtomicUsize::new(0);

/// Reserves the table (address space only). False when out of memory.
pub(crate) fn start() -> bool {
    let entries = os::map((CODES * size_of::<Code>()).next_multiple_of(4096));
    let index = os::map(INDEX_SLOTS * 4);
    let pool = os::map(POOL);
    if entries.is_null() || index.is_null() || pool.is_null() {
        return false;
    }
    ENTRIES.store(entries as usize, Ordering::Relaxed);
    INDEX.store(index as usize, Ordering::Relaxed);
    POOL_BASE.store(pool as usize, Ordering::Release);
    true
}

fn index() -> &'static [AtomicU32] {
    // SAFETY: a zeroed mapping of INDEX_SLOTS u32s, never unmapped.
    unsafe { core::slice::from_raw_parts(INDEX.load(Ordering::Relaxed) as *const _, INDEX_SLOTS) }
}

fn entry(i: u32) -> &'static Code {
    // SAFETY: i was published after its entry was written.
    unsafe { &*(ENTRIES.load(Ordering::Relaxed) as *const Code).add(i as usize) }
}

fn pool(range: (u32, u32)) -> &'static [u8] {
    let base = POOL_BASE.load(Ordering::Acquire) as *const u8;
    // SAFETY: a range reserved and written before its entry was published.
    unsafe { core::slice::from_raw_parts(base.add(range.0 as usize), range.1 as usize) }
}

fn u64_in(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The word that stands for the frame of `code` (whose header, up to its
/// first instruction, is `header`) at `instr_offset`.
pub(crate) fn frame_word(o: &Offsets, code: u64, header: &[u8], instr_offset: u32) -> u64 {
    match intern(o, code, header) {
        Some(i) => PY_TAG | u64::from(i) << 32 | u64::from(instr_offset),
        None => {
            UNNAMED.fetch_add(1, Ordering::Relaxed);
            UNNAMED_WORD
        }
    }
}

fn intern(o: &Offsets, code: u64, header: &[u8]) -> Option<u32> {
    if POOL_BASE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let qualname = u64_in(header, o.code_qualname);
    let filename = u64_in(header, o.code_filename);
    let linetable = u64_in(header, o.code_linetable);
    let at = o.code_firstlineno as usize;
    let firstlineno =
        i32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let identity = mix(mix(mix(qualname, filename), linetable), firstlineno as u64);
    let slots = index();
    let mask = INDEX_SLOTS - 1;
    let mut i = mix(code, identity) as usize & mask;
    for _ in 0..INDEX_SLOTS {
        let v = slots[i].load(Ordering::Acquire);
        if v == 0 {
            let new = add(
                o,
                code,
                identity,
                firstlineno,
                qualname,
                filename,
                linetable,
            )?;
            // Publish; a lost race moves on to the next slot.
            loop {
                match slots[i].compare_exchange(0, new + 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(new),
                    Err(_) => i = (i + 1) & mask,
                }
            }
        }
        let e = entry(v - 1);
        if e.code == code && e.identity == identity {
            return Some(v - 1);
        }
        i = (i + 1) & mask;
    }
    None
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (a >> 31)
}

fn add(
    o: &Offsets,
    code: u64,
    identity: u64,
    firstlineno: i32,
    qualname: u64,
    filename: u64,
    linetable: u64,
) -> Option<u32> {
    let i = NEXT_ENTRY.fetch_add(1, Ordering::Relaxed);
    if i as usize >= CODES {
        return None;
    }
    let qualname = copy_string(o, qualname)?;
    let filename = copy_string(o, filename)?;
    let linetable = copy_bytes(o, linetable).unwrap_or((0, u32::MAX));
    // SAFETY: entry i is ours (reserved above) and not yet published.
    unsafe {
        (ENTRIES.load(Ordering::Relaxed) as *mut Code)
            .add(i as usize)
            .write(Code {
                code,
                identity,
                firstlineno,
                qualname,
                filename,
                linetable,
            });
    }
    Some(i)
}

/// Reserves `len` bytes of the pool and fills them with `fill`.
fn reserve(len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> Option<(u32, u32)> {
    let at = POOL_USED.fetch_add(len, Ordering::Relaxed);
    if at + len > POOL {
        return None;
    }
    let base = POOL_BASE.load(Ordering::Acquire) as *mut u8;
    // SAFETY: the range is ours alone (reserved above), inside the pool.
    let buf = unsafe { core::slice::from_raw_parts_mut(base.add(at), len) };
    fill(buf).then_some((at as u32, len as u32))
}

/// Copies a compact `str` (all names of code objects are compact) as UTF-8.
fn copy_string(o: &Offsets, s: u64) -> Option<(u32, u32)> {
    let mut head = [0u8; 96];
    let end = (o.unicode_length.max(o.unicode_state) + 8) as usize;
    if s < 4096 || !safe_read_bytes(s as usize, &mut head[..end]) {
        return None;
    }
    let length = u64_in(&head, o.unicode_length) as usize;
    let state = u64_in(&head, o.unicode_state) as u32;
    let kind = ((state >> 2) & 7) as usize;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
        return None;
    }
    let data = s + if ascii {
        o.unicode_ascii_data
    } else {
        o.unicode_compact_data
    };
    let mut raw = [0u8; MAX_NAME];
    let units = length.min(MAX_NAME / kind);
    if !safe_read_bytes(data as usize, &mut raw[..units * kind]) {
        return None;
    }
    let mut utf8 = [0u8; MAX_NAME * 2];
    let mut n = 0;
    for u in raw[..units * kind].chunks_exact(kind) {
        let mut v = [0u8; 4];
        v[..kind].copy_from_slice(u);
        let c = char::from_u32(u32::from_le_bytes(v)).unwrap_or(char::REPLACEMENT_CHARACTER);
        if n + c.len_utf8() > MAX_NAME {
            break;
        }
        n += c.encode_utf8(&mut utf8[n..]).len();
    }
    reserve(n, |buf| {
        buf.copy_from_slice(&utf8[..n]);
        true
    })
}

/// Copies a `bytes` object (the location table).
fn copy_bytes(o: &Offsets, b: u64) -> Option<(u32, u32)> {
    let mut size = [0u8; 8];
    if b < 4096 || !safe_read_bytes((b + o.var_object_size) as usize, &mut size) {
        return None;
    }
    let len = u64::from_le_bytes(size) as usize;
    if len > MAX_LINETABLE {
        return None;
    }
    reserve(len, |buf| safe_read_bytes((b + o.bytes_data) as usize, buf))
}

/// A named Python frame of a dump.
pub(crate) struct Named {
    pub qualname: &'static str,
    pub filename: &'static str,
    /// 0: no line.
    pub line: u32,
}

/// The name of a frame word (`word & PY_TAG != 0`); a marker's name is its
/// qualname, with no file.
pub(crate) fn name(word: u64) -> Named {
    let special = |qualname| Named {
        qualname,
        filename: "",
        line: 0,
    };
    let i = ((word >> 32) & SPECIAL) as u32;
    if word == TRUNCATED_WORD {
        return special(TRUNCATED_NAME);
    }
    if word == NATIVE_TRUNCATED_WORD {
        return special(NATIVE_TRUNCATED_NAME);
    }
    if i == SPECIAL as u32 || i >= NEXT_ENTRY.load(Ordering::Acquire).min(CODES as u32) {
        return special(UNNAMED_NAME);
    }
    let e = entry(i);
    let text = |r| core::str::from_utf8(pool(r)).unwrap_or("?");
    let line = if e.linetable.1 == u32::MAX {
        0
    } else {
        line_of(pool(e.linetable), e.firstlineno, word as u32).unwrap_or(0)
    };
    Named {
        qualname: text(e.qualname),
        filename: text(e.filename),
        line,
    }
}
