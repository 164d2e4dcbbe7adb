//! A directory of pprof files, one per (interval, process, kind), named
//! `YYYYMMDDTHHMMSS.mmmZ-SERVICE-PID-KIND.pb.gz` after the interval's start
//! (UTC), so that names sort by time. The files this sink names count
//! towards a size cap; past it the oldest are removed.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use bytes::Bytes;

use super::{Prepared, transport::Outcome};

/// Where files go and how much they may take.
#[derive(Clone, Debug)]
pub struct DirectoryTarget {
    pub path: PathBuf,
    /// Total size of this sink's files; the oldest are removed beyond it.
    pub max_bytes: u64,
}

impl DirectoryTarget {
    /// A directory capped at 1 GiB.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: 1 << 30,
        }
    }
}

pub(crate) struct Directory {
    path: PathBuf,
    max_bytes: u64,
    /// This sink's files (name, size), oldest first; read from the
    /// directory at start so a restart keeps honouring the cap.
    files: Arc<Mutex<Vec<(String, u64)>>>,
}

impl Directory {
    pub(crate) fn new(target: &DirectoryTarget) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&target.path)
            .with_context(|| format!("creating directory {}", target.path.display()))?;
        let mut files: Vec<(String, u64)> = std::fs::read_dir(&target.path)
            .with_context(|| format!("reading directory {}", target.path.display()))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let size = e.metadata().ok()?.len();
                is_ours(&name).then_some((name, size))
            })
            .collect();
        files.sort();
        Ok(Self {
            path: target.path.clone(),
            max_bytes: target.max_bytes,
            files: Arc::new(Mutex::new(files)),
        })
    }

    pub(crate) fn name(&self) -> String {
        format!("directory {}", self.path.display())
    }

    pub(crate) fn file_name(message: &Prepared) -> String {
        let service: String = message
            .source
            .service_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!(
            "{}-{}-{}-{}.pb.gz",
            utc_stamp(message.start),
            if service.is_empty() {
                "unknown"
            } else {
                &service
            },
            message.source.pid,
            message.kind.name()
        )
    }

    /// Writes the file (through a temporary name, so readers never see a
    /// partial profile), then enforces the cap.
    pub(crate) async fn deliver(&self, name: &str, body: Bytes) -> Outcome {
        let dir = self.path.clone();
        let files = Arc::clone(&self.files);
        let max = self.max_bytes;
        let name = name.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            let mut files = files.lock().unwrap_or_else(PoisonError::into_inner);
            write_capped(&dir, &mut files, max, &name, &body)
        })
        .await;
        match result {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Retry {
                cause: format!("writing {}: {e}", self.path.join("…").display()),
                after: None,
            },
            Err(e) => Outcome::Retry {
                cause: format!("file writer: {e}"),
                after: None,
            },
        }
    }
}

fn write_capped(
    dir: &Path,
    files: &mut Vec<(String, u64)>,
    max: u64,
    name: &str,
    body: &[u8],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, body)?;
    std::fs::rename(&temporary, dir.join(name))?;
    files.retain(|(n, _)| n != name);
    let at = files.partition_point(|(n, _)| n.as_str() < name);
    files.insert(at, (name.to_owned(), body.len() as u64));
    let mut total: u64 = files.iter().map(|(_, s)| s).sum();
    while total > max && !files.is_empty() {
        let (oldest, size) = files.remove(0);
        match std::fs::remove_file(dir.join(&oldest)) {
            Ok(()) => log::debug!("sinks: removed {oldest} (directory over its size cap)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("sinks: cannot remove {oldest}: {e}"),
        }
        total -= size;
    }
    Ok(())
}

/// Whether `name` is a file this sink wrote (`YYYYMMDDTHHMMSS.mmmZ-…pb.gz`).
fn is_ours(name: &str) -> bool {
    let b = name.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    digits(0..8)
        && b.get(8) == Some(&b'T')
        && digits(9..15)
        && b.get(15) == Some(&b'.')
        && digits(16..19)
        && b.get(19..21) == Some(b"Z-")
        && name.ends_with(".pb.gz")
}

/// `YYYYMMDDTHHMMSS.mmmZ` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the
/// algorithm that shifts the year to start in March, so February is last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn stamps_are_utc_dates() {
        let at = |s: u64, ms: u64| {
            utc_stamp(SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms))
        };
        assert_eq!(at(0, 0), "19700101T000000.000Z");
        // date -u -d @951782400 → 2000-02-29 00:00:00 (a leap day).
        assert_eq!(at(951_782_400, 5), "20000229T000000.005Z");
        // date -u -d @1798529881 → 2026-12-29 07:38:01.
        assert_eq!(at(1_798_529_881, 999), "20261229T073801.999Z");
        // 2100 is not a leap year: date -u -d @4107542399 → 2100-02-28 23:59:59.
        assert_eq!(at(4_107_542_399, 0), "21000228T235959.000Z");
        assert!(is_ours(&format!("{}-svc-1-cpu.pb.gz", at(1, 0))));
        assert!(!is_ours("notes.pb.gz"));
        assert!(!is_ours("20000229T000000.005Z-x.txt"));
    }

    #[test]
    fn the_cap_removes_the_oldest_files() {
        let dir = std::env::temp_dir().join(format!("prof-bpf-dir-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("unrelated.pb.gz"), [0u8; 500]).unwrap();
        let mut files = Vec::new();
        let names: Vec<String> = (0..4)
            .map(|i| format!("2026010{i}T000000.000Z-s-1-cpu.pb.gz"))
            .collect();
        // Written out of order: the third is the oldest interval.
        for &i in &[1, 2, 0, 3] {
            write_capped(&dir, &mut files, 250, &names[i], &[i as u8; 100]).unwrap();
        }
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [names[2].clone(), names[3].clone(), "unrelated.pb.gz".into()]
        );
        assert_eq!(std::fs::read(dir.join(&names[3])).unwrap(), [3u8; 100]);
        // A restart finds its own files and keeps the cap.
        let sink = Directory::new(&DirectoryTarget {
            path: dir.clone(),
            max_bytes: 250,
        })
        .unwrap();
        let known = sink.files.lock().unwrap().clone();
        assert_eq!(known, [(names[2].clone(), 100), (names[3].clone(), 100)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
