//! Anonymous private writable mappings as roots: memory that programs map
//! for their own allocators, which never passes through malloc, holds
//! pointers to malloc'd objects. CPython's pymalloc keeps every object of
//! 512 bytes or less (lists, dicts, class instances) in mmap'd arenas, so
//! without these roots a leak-free Python program reports false leaks.
//! The checker scans them only in a CPython process: they include glibc's
//! cached stacks of joined threads, whose dead frames would hide leaks.
//!
//! The allocator's own memory (heap, tables, this checker's lists) is all
//! mapped `MAP_NORESERVE`, which `/proc/self/smaps` shows as the `nr`
//! VmFlag: those mappings are not roots (the heap holds the objects under
//! test; the tables hold every object's address).
use super::{Marker, read_file};
use crate::gperftools::arena::Buf;

/// Scans every anonymous private writable mapping not mapped
/// `MAP_NORESERVE` (thread stacks are scanned by the caller, from their
/// stack pointer, and skipped here). Returns the bytes scanned.
pub(super) fn scan(marker: &mut Marker<'_>, stacks: &[(usize, usize)]) -> usize {
    let mut text = Buf::new();
    read_file(c"/proc/self/smaps", &mut text);
    let mut scanned = 0;
    let mut current: Option<(usize, usize)> = None;
    for line in text.as_slice().split(|&b| b == b'\n') {
        if let Some(flags) = line.strip_prefix(b"VmFlags:") {
            let noreserve = flags.split(|&b| b == b' ').any(|f| f == b"nr");
            if let Some((a, b)) = current.take()
                && !noreserve
                && !stacks.iter().any(|&(s, e)| s < b && a < e)
            {
                // SAFETY: a readable mapping of this process (rw-p).
                unsafe { marker.scan(a, b) };
                marker.drain();
                scanned += b - a;
            }
            continue;
        }
        if let Some(range) = anonymous_rw(line) {
            current = Some(range);
        } else if is_header(line) {
            current = None;
        }
    }
    scanned
}

/// The range of a mapping header line (`a-b rw-p 0 00:00 0`) of an
/// anonymous private writable mapping (no path, or `[heap]`).
fn anonymous_rw(line: &[u8]) -> Option<(usize, usize)> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let (_offset, _dev, inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or(b"");
    if perms != b"rw-p" || inode != b"0" || !(path.is_empty() || path == b"[heap]") {
        return None;
    }
    let mut ends = range.split(|&b| b == b'-');
    Some((hex(ends.next()?)?, hex(ends.next()?)?))
}

/// Whether `line` opens a mapping (its first field is `a-b` in hex).
fn is_header(line: &[u8]) -> bool {
    let first = line.split(|&b| b == b' ').next().unwrap_or(b"");
    let mut ends = first.split(|&b| b == b'-');
    matches!(
        (ends.next().and_then(hex), ends.next().and_then(hex)),
        (Some(_), Some(_))
    )
}

fn hex(s: &[u8]) -> Option<usize> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0usize, |v, &c| {
        Some(v.checked_mul(16)? + (c as char).to_digit(16)? as usize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_private_writable_mappings_are_recognized() {
        assert_eq!(
            anonymous_rw(b"7f00-7f10 rw-p 00000000 00:00 0 "),
            Some((0x7f00, 0x7f10))
        );
        assert_eq!(
            anonymous_rw(b"5500-5600 rw-p 00000000 00:00 0      [heap]"),
            Some((0x5500, 0x5600))
        );
        assert_eq!(anonymous_rw(b"7f00-7f10 r--p 00000000 00:00 0 "), None);
        assert_eq!(
            anonymous_rw(b"7f00-7f10 rw-p 00000000 08:01 12 /lib/x.so"),
            None
        );
        assert_eq!(
            anonymous_rw(b"7f00-7f10 rw-p 00000000 00:00 0 [stack]"),
            None
        );
        assert!(is_header(b"7f00-7f10 rw-p 00000000 00:00 0 "));
        assert!(!is_header(b"Size:                  4 kB"));
    }
}
