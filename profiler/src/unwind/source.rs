//! The bytes and identity of a mapped object, read through the process
//! that maps it.
use std::fs::File;

use anyhow::Context as _;

use super::VDSO;
use crate::process::{self, Mapping};

/// The (modification time in ns, size) of a mapped file; `None` for the
/// vDSO or a file that cannot be read.
pub(super) fn file_identity(pid: u32, mapping: &Mapping) -> Option<(i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let by_map = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    );
    let meta = std::fs::metadata(by_map).ok()?;
    Some((
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.size(),
    ))
}

/// The bytes of a mapped object: the file, or the vDSO from memory.
pub(super) fn read_object(pid: u32, mapping: &Mapping) -> anyhow::Result<ObjectBytes> {
    if mapping.path == VDSO {
        let mut data = vec![0; (mapping.end - mapping.start) as usize];
        let mem = File::open(format!("/proc/{pid}/mem")).context("opening the process's memory")?;
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut data, mapping.start)
            .context("reading the vDSO")?;
        return Ok(ObjectBytes::Memory(data));
    }
    // map_files reaches the very file mapped, even if it was replaced or
    // lives in another mount namespace; the path is the fallback.
    let by_map = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    );
    let file = File::open(&by_map)
        .or_else(|_| File::open(process::path_in_root(pid, &mapping.path)))
        .with_context(|| format!("opening {}", mapping.path))?;
    // SAFETY: the file is mapped read-only and only parsed; a concurrent
    // truncation could fault, which no profiled program does to its own
    // loaded code.
    let data = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", mapping.path))?;
    Ok(ObjectBytes::File(data))
}

/// An object's bytes, mapped from its file or copied from memory.
pub(super) enum ObjectBytes {
    File(memmap2::Mmap),
    Memory(Vec<u8>),
}

impl std::ops::Deref for ObjectBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::File(m) => m,
            Self::Memory(v) => v,
        }
    }
}

/// The object at `mapping`'s path, if that is still the file mapped (same
/// device and inode), and its (modification time in ns, size): for a
/// process that exited before its tables were built.
pub(super) fn read_same_file(mapping: &Mapping) -> Option<(ObjectBytes, (i64, u64))> {
    use std::os::unix::fs::MetadataExt as _;
    if mapping.path == VDSO || !mapping.path.starts_with('/') {
        return None;
    }
    let file = File::open(&mapping.path).ok()?;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    if (libc::major(dev), libc::minor(dev)) != mapping.dev || meta.ino() != mapping.inode {
        return None;
    }
    // SAFETY: as in `read_object`.
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    Some((
        ObjectBytes::File(data),
        (
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            meta.size(),
        ),
    ))
}
