//! Writing an output file so that readers never see half of it: a
//! temporary file in the same directory, renamed over the target once
//! complete. Special files (`/dev/stdout`, FIFOs, devices) cannot be
//! renamed over and are written in place.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Writes `contents` to `path` (see the module docs).
pub(crate) fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_with(path, |f| f.write_all(contents))
}

/// Writes what `fill` writes to `path`; when `fill` or the rename fails,
/// no file is left behind.
pub(crate) fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let shown = path.display();
    if super::args::is_special(path) {
        // Appending keeps what a `>>` redirection of stdout already holds.
        let mut file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {shown}"))?;
        return fill(&mut file).with_context(|| format!("cannot write {shown}"));
    }
    // Through a symlink, the file it names is replaced, not the link.
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).unwrap_or(path.into()),
        _ => path.to_path_buf(),
    };
    let (tmp, mut file) = temporary(&target).with_context(|| format!("cannot write {shown}"))?;
    let result = (|| {
        if let Ok(m) = std::fs::metadata(&target) {
            file.set_permissions(m.permissions())?;
        }
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &target)
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write {shown}"));
    }
    Ok(())
}

/// A new file `.NAME.PID.N.tmp` beside `target`.
fn temporary(target: &Path) -> std::io::Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy());
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut attempt = 0;
    loop {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
