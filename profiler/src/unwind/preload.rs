//! Tables loaded ahead of need: at the start of a whole-host session, the
//! on-disk cache's entries are loaded, most recently used first, for the
//! files that are still the ones they were built from, under a part of the
//! kernel memory cap. Each is entered under its file's identity for the
//! walker (see [`super::files`]), so the first `rustc` of a session, or a
//! library a process loads later, unwinds from its first sample.
//!
//! An entry records the file it was built from (path, device, inode,
//! modification time, size; [`super::cache_format::Origin`]). It is used
//! only if that path opens a file with that very identity now, and, for an
//! entry keyed by build id, that file has that build id: rows of a file
//! replaced since are never loaded.
use std::{
    fs::File,
    time::{Duration, Instant},
};

use super::{
    ObjectKey,
    background::{Compiled, Outcome, Prepared},
    build::{self, Builder, FileId},
    cache_format::Origin,
    cfi,
};

/// What a preload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreloadSummary {
    /// Entries sent to be placed, and their rows.
    pub objects: usize,
    pub rows: u64,
    /// Entries left out: their file is gone or changed, or they record
    /// none (the vDSO, or written by a tool that did not say).
    pub changed: usize,
    pub no_origin: usize,
    /// Entries left out because they did not fit in the budget.
    pub over_budget: usize,
    pub elapsed: Duration,
}

/// Kernel bytes of `rows` rows.
pub fn row_bytes(rows: u64) -> u64 {
    rows * size_of::<profiler_common::unwind::UnwindRow>() as u64
}

/// Sends, most recently used first, the cached rows of every file that is
/// unchanged, while their rows fit in `budget` bytes; stops if `send`
/// says the session is gone.
pub(super) fn preload(
    builder: &mut Builder,
    budget: u64,
    thread: usize,
    send: &mut dyn FnMut(Prepared) -> bool,
) -> PreloadSummary {
    let started = Instant::now();
    let mut summary = PreloadSummary::default();
    let Some(names) = builder.cache_mut().map(|c| c.entries_by_recent_use()) else {
        return summary;
    };
    let mut left = budget;
    for name in names {
        let Some(cache) = builder.cache_mut() else {
            break;
        };
        let Some((origin, rows)) = cache.peek(&name) else {
            continue;
        };
        let Some(origin) = origin else {
            summary.no_origin += 1;
            continue;
        };
        if rows == 0 {
            continue;
        }
        if row_bytes(rows) > left {
            summary.over_budget += 1;
            continue;
        }
        let Some((data, build_id)) = unchanged(&origin, &name) else {
            summary.changed += 1;
            continue;
        };
        let Ok(segments) = cfi::load_segments(&data) else {
            summary.changed += 1;
            continue;
        };
        let Some(rows) = cache.load_named(&name) else {
            continue;
        };
        left -= row_bytes(rows.rows.len() as u64).min(left);
        summary.objects += 1;
        summary.rows += rows.rows.len() as u64;
        let prepared = Prepared {
            key: ObjectKey {
                dev: origin.dev,
                inode: origin.inode,
            },
            name: origin.path,
            outcome: Outcome::Built(Compiled {
                segments,
                identity: Some((origin.mtime_ns, origin.size)),
                build_id,
                rows,
            }),
            stats: builder.stats(),
            thread,
            cpu: Duration::ZERO,
            preloaded: true,
        };
        if !send(prepared) {
            break;
        }
    }
    summary.elapsed = started.elapsed();
    summary
}

/// The file `origin` names, mapped, and its build id, if it still has the
/// identity `origin` records and is the one entry `name` is keyed by.
fn unchanged(origin: &Origin, name: &str) -> Option<(memmap2::Mmap, Option<Vec<u8>>)> {
    let file = File::open(&origin.path).ok()?;
    let now = FileId::of(&file.metadata().ok()?);
    if (now.dev, now.inode, now.mtime_ns, now.size)
        != (origin.dev, origin.inode, origin.mtime_ns, origin.size)
    {
        return None;
    }
    // SAFETY: read-only mapping of a file that is only parsed (as
    // `source::read_object`).
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let build_id = cfi::build_id(&data).filter(|b| !b.is_empty());
    let key = build::cache_key(build_id.clone(), Some(now))?;
    (key.file_name() == name).then_some((data, build_id))
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf, time::SystemTime};

    use profiler_common::unwind::{CFA_RSP, RBP_SAME, UnwindRow};

    use super::{
        super::{cache_format::CacheKey, cfi::ObjectRows},
        *,
    };
    use crate::unwind::UnwindOptions;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "prof-bpf-unwind-preload-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rows(n: u16) -> ObjectRows {
        let row = |pc| UnwindRow::new(pc, CFA_RSP, 8, RBP_SAME, 0).unwrap();
        ObjectRows {
            rows: (0..n).map(row).collect(),
            pages: vec![(1, 0, u32::from(n))],
            ..ObjectRows::default()
        }
    }

    fn run(builder: &mut Builder, budget: u64) -> (PreloadSummary, Vec<Prepared>) {
        let mut sent = Vec::new();
        let summary = preload(builder, budget, 1, &mut |p| {
            sent.push(p);
            true
        });
        (summary, sent)
    }

    /// An entry is loaded for its file while that file is unchanged, never
    /// after it changed in place (same inode), and only within the budget.
    #[test]
    fn only_unchanged_files_within_the_budget() {
        let dir = temp_dir("files");
        let file = dir.join("true");
        fs::copy("/bin/true", &file).unwrap();
        let data = fs::read(&file).unwrap();
        let build_id = cfi::build_id(&data).filter(|b| !b.is_empty());
        let id = FileId::of(&fs::metadata(&file).unwrap());
        let mut builder = Builder::new(&UnwindOptions {
            cache_dir: Some(dir.join("cache")),
            ..UnwindOptions::default()
        });
        let path = file.to_str().unwrap();
        // Rows stored as a session stores them: keyed as the file is, with
        // its origin.
        let stored = rows(100);
        let key = match &build_id {
            Some(b) => CacheKey::BuildId(b.clone()),
            None => CacheKey::File {
                dev: id.dev,
                inode: id.inode,
                mtime_ns: id.mtime_ns,
                size: id.size,
            },
        };
        let origin = Origin {
            path: path.to_owned(),
            dev: id.dev,
            inode: id.inode,
            mtime_ns: id.mtime_ns,
            size: id.size,
        };
        let cache = builder.cache_mut().unwrap();
        cache.store(&key, &stored, Some(&origin));
        // An entry without an origin is never loaded ahead of need.
        cache.store(&CacheKey::BuildId(vec![9; 20]), &stored, None);

        let (summary, sent) = run(&mut builder, row_bytes(100));
        assert_eq!(
            (summary.objects, summary.rows, summary.no_origin),
            (1, 100, 1)
        );
        let p = &sent[0];
        assert!(p.preloaded);
        assert_eq!(
            p.key,
            ObjectKey {
                dev: id.dev,
                inode: id.inode
            }
        );
        assert!(
            matches!(&p.outcome, Outcome::Built(c) if c.rows == stored && !c.segments.is_empty())
        );

        let (summary, sent) = run(&mut builder, row_bytes(99));
        assert_eq!(
            (summary.objects, summary.over_budget, sent.len()),
            (0, 1, 0)
        );

        // Written in place: same inode, another modification time.
        let f = File::options().append(true).open(&file).unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
        let (summary, sent) = run(&mut builder, row_bytes(1000));
        assert_eq!((summary.objects, summary.changed, sent.len()), (0, 1, 0));
        fs::remove_dir_all(&dir).unwrap();
    }
}
