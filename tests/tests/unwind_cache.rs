//! The unwind tables' kernel memory cap (`--unwind-memory`) and their
//! on-disk cache (`--unwind-cache-dir`), through `prof-bpf cpu` on real
//! big objects: objects over the cap are counted in the report, and a
//! second session loads the tables the first one built.
use std::{path::PathBuf, process::Command};

use prof_bpf_tests::{Proc, assert_one_line_error, prof_bpf, require_bpf, run_prof_bpf};

/// A fresh directory for this test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-unwind-cache-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The report's line on the unwind tables.
fn tables_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("unwind tables:") && l.contains("did not fit"))
        .unwrap_or_else(|| panic!("no unwind table summary in:\n{stderr}"))
}

/// The number just before `what` in `line` ("3 from cache").
fn count_before(line: &str, what: &str) -> u64 {
    let at = line
        .find(what)
        .unwrap_or_else(|| panic!("no `{what}` in `{line}`"));
    line[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before `{what}` in `{line}`"))
}

/// `rustc -` reads its program from stdin, so until stdin closes it waits
/// with librustc_driver mapped: about 1.15 million rows, more than one
/// 8 MiB shard holds.
fn waiting_rustc() -> Proc {
    let rustc = Proc::spawn(Command::new("rustc").args(["-", "-o", "/dev/null"]));
    rustc.wait_mapped("librustc_driver");
    rustc
}

#[test]
fn objects_over_the_memory_cap_are_counted_in_the_report() {
    require_bpf!();
    let rustc = waiting_rustc();
    let pid = rustc.pid().to_string();
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--pid",
        &pid,
        "--duration",
        "1",
        "--unwind-memory",
        "8",
        "--no-unwind-cache",
    ]);
    assert_eq!(code, 0, "prof-bpf cpu failed:\n{stderr}");
    assert!(
        stderr.contains("at most 8 MiB of kernel memory (--unwind-memory), no cache"),
        "no start line with the cap:\n{stderr}"
    );
    let line = tables_line(&stderr);
    assert!(line.contains("of 8 MiB kernel memory"), "{line}");
    assert!(
        count_before(line, "objects did not fit") >= 1,
        "librustc_driver fits in 8 MiB? {line}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("librustc_driver") && l.contains("memory cap reached")),
        "the object left out is not named:\n{stderr}"
    );
}

#[test]
fn bad_unwind_memory_is_a_one_line_error() {
    for bad in ["0", "4", "lots", "100000"] {
        for command in ["cpu", "heap", "agent"] {
            let (_, stderr, code) = run_prof_bpf(&[command, "--unwind-memory", bad]);
            assert_one_line_error(
                &stderr,
                code,
                &format!("MiB from 8 (one row shard) to 65536, got {bad}"),
            );
        }
    }
}

/// Share of the samples (by value) whose stack reaches `_start` untruncated.
fn complete_share(folded: &str) -> (f64, u64) {
    complete_share_of(folded, "")
}

/// [`complete_share`] of the process whose root frame ends with `suffix`.
fn complete_share_of(folded: &str, suffix: &str) -> (f64, u64) {
    let (mut complete, mut total) = (0u64, 0u64);
    for line in folded.lines() {
        let Some((stack, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        if !frames[0].ends_with(suffix) {
            continue;
        }
        let value: u64 = value.parse().expect("folded value");
        total += value;
        if frames.contains(&"_start") && !frames.contains(&"[truncated]") {
            complete += value;
        }
    }
    (complete as f64 / total.max(1) as f64, total)
}

/// Samples `pid` for 3 s with the cache in `cache`; (stderr, folded stacks).
fn sample(pid: &str, cache: &std::path::Path, out: &std::path::Path) -> (String, String) {
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--pid",
        pid,
        "--duration",
        "3",
        "-F",
        "499",
        "--unwind-cache-dir",
        cache.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "prof-bpf cpu failed:\n{stderr}");
    let folded = std::fs::read_to_string(out).expect("read folded output");
    (stderr, folded)
}

/// prof-bpf itself compiling its own CFI again and again (a busy target
/// with big tables: a debug build has about 230k rows), run from `exe`.
/// Its report goes to /dev/null: a full pipe would stop it.
fn busy_prof_bpf(exe: &str) -> Proc {
    let me = prof_bpf().to_str().expect("UTF-8 path").to_owned();
    let files = vec![me.as_str(); 500].join(" ");
    let target = Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec {exe} debug-unwind --cfi {files} >/dev/null")),
    );
    target.wait_mapped(exe);
    target.wait_mapped("libc.so");
    target
}

#[test]
fn copies_of_one_binary_share_rows_by_build_id() {
    require_bpf!();
    let dir = temp_dir("shared");
    let copy = dir.join("prof-bpf-copy");
    std::fs::copy(prof_bpf(), &copy).expect("copy prof-bpf");
    let original = busy_prof_bpf(prof_bpf().to_str().unwrap());
    let copied = busy_prof_bpf(copy.to_str().unwrap());
    let (a, b) = (original.pid().to_string(), copied.pid().to_string());
    let out = dir.join("both.folded");
    let (_, stderr, code) = run_prof_bpf(&[
        "cpu",
        "--pid",
        &a,
        "--pid",
        &b,
        "--duration",
        "3",
        "-F",
        "499",
        "--no-unwind-cache",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "prof-bpf cpu failed:\n{stderr}");
    let line = tables_line(&stderr);
    assert_eq!(count_before(line, "sharing their rows"), 1, "{line}");
    let folded = std::fs::read_to_string(&out).expect("read folded output");
    for pid in [&a, &b] {
        let (share, n) = complete_share_of(&folded, &format!("-{pid}"));
        eprintln!("pid {pid}: {:.1}% of {n} ns complete", share * 100.0);
        assert!(
            n > 0 && share >= 0.95,
            "pid {pid}: {share:.3} of {n} ns complete"
        );
    }
    drop((original, copied));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_session_loads_the_tables_from_the_cache() {
    require_bpf!();
    let dir = temp_dir("sessions");
    let cache = dir.join("cache");
    let target = busy_prof_bpf(prof_bpf().to_str().unwrap());
    let pid = target.pid().to_string();

    let (cold, cold_stacks) = sample(&pid, &cache, &dir.join("cold.folded"));
    assert!(
        cold.contains("at most 512 MiB of kernel memory"),
        "no start line with the default cap:\n{cold}"
    );
    let line = tables_line(&cold);
    let stored = count_before(line, "stored");
    assert_eq!(count_before(line, "from cache"), 0, "{line}");
    assert!(stored >= 2, "prof-bpf and libc are not stored: {line}");
    assert_eq!(count_before(line, "objects did not fit"), 0, "{line}");

    let (warm, warm_stacks) = sample(&pid, &cache, &dir.join("warm.folded"));
    let line = tables_line(&warm);
    assert_eq!(count_before(line, "from cache"), stored, "{line}");
    assert_eq!(count_before(line, "stored"), 0, "{line}");
    assert_eq!(count_before(line, "corrupt"), 0, "{line}");
    let ((cold_share, cold_n), (warm_share, warm_n)) =
        (complete_share(&cold_stacks), complete_share(&warm_stacks));
    eprintln!(
        "complete stacks: cold {:.1}% of {cold_n} ns, warm {:.1}% of {warm_n} ns",
        cold_share * 100.0,
        warm_share * 100.0
    );
    assert!(cold_n > 0 && warm_n > 0, "no samples");
    assert!(cold_share >= 0.95, "cold tables: {cold_share:.3} complete");
    assert!(
        warm_share >= cold_share - 0.01,
        "cached tables give fewer complete stacks: {warm_share:.3} < {cold_share:.3}"
    );

    // A damaged entry is counted, ignored and rebuilt.
    let biggest = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&biggest, &bytes).unwrap();
    let (again, _) = sample(&pid, &cache, &dir.join("again.folded"));
    let line = tables_line(&again);
    assert_eq!(count_before(line, "corrupt"), 1, "{line}");
    assert_eq!(count_before(line, "stored"), 1, "{line}");
    assert_eq!(count_before(line, "from cache"), stored - 1, "{line}");
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}
