//! Rows found by file (issue 13): a pc in code the process's own tables do
//! not know yet is resolved through the file its kernel mapping maps, to
//! rows already in the kernel. Here they are there because the session
//! loaded them from the on-disk cache at its start (`--unwind-preload`).
//!
//! By construction: the target's mappings are read once, before sampling
//! starts, and again only when a walk meets code they do not cover. The
//! library is loaded with dlopen after the preload is over, so the first
//! samples in it can only be unwound by file (the walker then asks for a
//! refresh, which installs it from the rows loaded).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prof_bpf_tests::{Proc, build_workload, require_bpf, run_prof_bpf, start_following};

const NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];
const LIB_NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer", "-shared", "-fPIC"];

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-unwind-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir.join(name)
}

/// The value of `name N` in the line of `text` that contains `title`.
fn counter(text: &str, title: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(title))
        .unwrap_or_else(|| panic!("no `{title}` line in:\n{text}"));
    line.split([':', ',', ';'])
        .map(str::trim)
        .find_map(|f| f.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter `{name}` in {line}"))
}

/// Runs `prof-bpf cpu -p` on the workload while it loads `lib` and calls
/// into it 100 times, with the cache in `cache`. With `preload`, the
/// library is loaded only once the preload is over, and after `before_load`.
/// Writes the profile (pprof) to `out`; returns the session's stderr.
fn session(
    exe: &Path,
    lib: &Path,
    cache: &Path,
    preload: bool,
    out: &Path,
    before_load: impl FnOnce(),
) -> String {
    let mut w = Proc::spawn(Command::new(exe).arg("dlopen").arg(lib).arg("100"));
    w.expect_line("ready");
    w.wait_mapped("libc");
    let pid = w.pid().to_string();
    let out_arg = out.to_str().expect("utf-8 path");
    let mut args = vec![
        "cpu",
        "--pid",
        &pid,
        "-F",
        "999",
        "--unwind-cache-dir",
        cache.to_str().expect("utf-8 path"),
        "-o",
        out_arg,
    ];
    if preload {
        args.extend(["--unwind-preload", "64"]);
    }
    let (mut prof, mut seen, later) =
        start_following(&prof_bpf_tests::prof_bpf(), &args, "prof-bpf: sampling");
    // The preload line may come before or after the sampling line.
    while preload && !seen.iter().any(|l| l.contains("preloaded")) {
        seen.push(
            later
                .recv_timeout(Duration::from_secs(60))
                .expect("prof-bpf says what it preloaded"),
        );
    }
    before_load();
    w.send_line("go");
    w.expect_line("done");
    // Stopped while the workload still runs, so that its frames are
    // symbolized through its mappings.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    let status = prof.wait().expect("wait for prof-bpf");
    drop(w);
    seen.extend(later.try_iter());
    let stderr = seen.join("\n");
    assert!(status.success(), "prof-bpf failed: {stderr}");
    stderr
}

/// `prof-bpf report PROFILE --format FORMAT`.
fn report(profile: &Path, format: &str) -> String {
    let (stdout, stderr, code) = run_prof_bpf(&[
        "report",
        profile.to_str().expect("utf-8 path"),
        "--format",
        format,
    ]);
    assert_eq!(code, 0, "prof-bpf report failed: {stderr}");
    stdout
}

#[test]
fn first_samples_of_a_dlopened_library_unwind_by_file_with_preloaded_rows() {
    require_bpf!();
    let lib = build_workload("unwind_dl_lib", LIB_NO_FP);
    let exe = build_workload("unwind_start", NO_FP);
    let cache = temp_path("cache");
    let _ = std::fs::remove_dir_all(&cache);
    // A first session builds the library's rows and caches them.
    let first = temp_path("first.pb.gz");
    session(&exe, &lib, &cache, false, &first, || {});
    // The second one loads them at its start, before the dlopen.
    let second = temp_path("second.pb.gz");
    let stderr = session(&exe, &lib, &cache, true, &second, || {});
    let preloaded = counter(&stderr, "unwind tables: preloaded", "preloaded");
    assert!(preloaded >= 1, "nothing preloaded:\n{stderr}");

    let notes = report(&second, "text");
    let by_file = counter(&notes, "user stack walks", "frames_by_file");
    eprintln!("{preloaded} objects preloaded; frames_by_file {by_file}");
    assert!(by_file > 0, "no frame resolved by file:\n{notes}");
    let changed = counter(&notes, "user stack walks", "file_changed");
    assert_eq!(changed, 0, "an unchanged file taken for changed:\n{notes}");

    // Every sample in the library is complete, the first ones included.
    let folded = report(&second, "folded");
    let (mut total, mut complete) = (0u64, 0u64);
    let mut bad = Vec::new();
    for line in folded.lines() {
        let Some((stack, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        if !frames.contains(&"dl_spin_leaf") {
            continue;
        }
        let value: u64 = value.parse().expect("folded value");
        total += value;
        let chain = ["call_lib", "dl_spin_level1", "dl_spin_leaf"];
        if frames.get(1) == Some(&"_start")
            && !frames.iter().any(|f| f.starts_with('['))
            && frames.windows(3).any(|w| w == chain)
        {
            complete += value;
        } else if bad.len() < 3 {
            bad.push(stack.to_owned());
        }
    }
    let period = 1_000_000_000 / 999;
    eprintln!(
        "{} of {} samples in the library complete",
        complete / period,
        total / period
    );
    assert!(total / period >= 50, "only {} samples", total / period);
    assert!(
        complete as f64 >= 0.99 * total as f64,
        "only {complete} of {total} ns complete; e.g. {bad:#?}"
    );
    let _ = std::fs::remove_dir_all(cache.parent().expect("temp dir"));
}

/// The same library, its modification time changed in place (same inode)
/// after its rows were loaded and before a process loads it: the walker
/// refuses the old rows for it (`file_changed`).
#[test]
fn rows_are_not_used_for_a_file_modified_since_they_were_built() {
    require_bpf!();
    let built = build_workload("unwind_dl_lib", LIB_NO_FP);
    let exe = build_workload("unwind_start", NO_FP);
    let lib = temp_path("libmodified.so");
    std::fs::copy(&built, &lib).expect("copy the library");
    let cache = temp_path("cache-modified");
    let _ = std::fs::remove_dir_all(&cache);
    let first = temp_path("modified-first.pb.gz");
    session(&exe, &lib, &cache, false, &first, || {});
    let second = temp_path("modified-second.pb.gz");
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&lib).unwrap());
    let before = inode();
    let stderr = session(&exe, &lib, &cache, true, &second, || {
        let f = std::fs::File::options().append(true).open(&lib).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .expect("set the library's modification time");
    });
    assert_eq!(inode(), before, "the library was replaced, not modified");
    assert!(
        counter(&stderr, "unwind tables: preloaded", "preloaded") >= 1,
        "nothing preloaded:\n{stderr}"
    );
    let notes = report(&second, "text");
    // The first sample in the library finds the old rows by its file, with
    // the old time: they are refused (its rows are built afresh after).
    let changed = counter(&notes, "user stack walks", "file_changed");
    eprintln!("file_changed {changed}");
    assert!(changed > 0, "the old rows were not refused:\n{notes}");
    let folded = report(&second, "folded");
    assert!(
        folded.lines().any(|l| l.contains("dl_spin_leaf")),
        "no sample in the library:\n{folded}"
    );
}
