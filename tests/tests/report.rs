//! `prof-bpf report`: gperftools heap and CPU profiles made by Debian's
//! libtcmalloc/libprofiler, pprof files (ours, read by `go tool pprof`, and
//! go's own), `--base`, `--focus`/`--ignore`, every writer, bad input.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use prof_bpf_tests::{assert_one_line_error, build_workload, run_prof_bpf};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer"];
const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-report-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs the workload with `mode` under gperftools; returns the profile file.
fn gperftools_profile(dir: &Path, mode: &str) -> PathBuf {
    let program = build_workload("report_gperf", FLAGS);
    let mut cmd = Command::new(&program);
    cmd.arg(mode).current_dir(dir);
    let out = if mode == "cpu" {
        let out = dir.join("cpu.prof");
        cmd.env("LD_PRELOAD", format!("{LIBDIR}/libprofiler.so.0"))
            .env("CPUPROFILE", &out);
        out
    } else {
        cmd.env("LD_PRELOAD", format!("{LIBDIR}/libtcmalloc.so.4"))
            .env("HEAPPROFILE", dir.join(mode));
        dir.join(format!("{mode}.0001.heap"))
    };
    let status = cmd.status().expect("run report_gperf");
    assert!(status.success());
    assert!(out.exists(), "gperftools wrote no {}", out.display());
    out
}

fn report(args: &[&str]) -> String {
    let (stdout, stderr, code) = run_prof_bpf(&[&["report"], args].concat());
    assert_eq!(code, 0, "prof-bpf report {args:?} failed: {stderr}");
    stdout
}

/// Folded output as stack -> value.
fn folded(args: &[&str]) -> BTreeMap<String, i64> {
    report(&[args, &["--format", "folded"]].concat())
        .lines()
        .map(|l| {
            let (stack, v) = l.rsplit_once(' ').expect("folded line");
            (stack.to_owned(), v.parse().expect("folded value"))
        })
        .collect()
}

/// The value of the one folded stack ending in `leaf`.
fn leaf_value(stacks: &BTreeMap<String, i64>, leaf: &str) -> i64 {
    let hits: Vec<i64> = stacks
        .iter()
        .filter(|(s, _)| s.ends_with(&format!(";{leaf}")))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(hits.len(), 1, "stacks ending in {leaf}: {stacks:#?}");
    hits[0]
}

const MAIN_TO: &str = "_start;__libc_start_main_impl;__libc_start_call_main;main";

#[test]
fn gperftools_heap_profile_values() {
    let dir = scratch("heap");
    let heap = gperftools_profile(&dir, "heap");
    let heap = heap.to_str().unwrap();
    let value = |ty: &str, leaf: &str| {
        let stacks = folded(&[heap, "--sample-type", ty]);
        assert!(
            stacks.contains_key(&format!("{MAIN_TO};{leaf}")),
            "full stack of {leaf}: {stacks:#?}"
        );
        leaf_value(&stacks, leaf)
    };
    assert_eq!(value("inuse_space", "keep_blocks"), 1_000_000);
    assert_eq!(value("inuse_objects", "keep_blocks"), 10);
    assert_eq!(value("alloc_space", "churn_blocks"), 100_000);
    assert_eq!(value("alloc_objects", "churn_blocks"), 1000);
    assert!(!folded(&[heap]).keys().any(|s| s.contains("churn_blocks")));
    // The default sample type is inuse_space.
    let text = report(&[heap, "--group-by", "none"]);
    assert!(text.starts_with("Type: inuse_space (bytes)"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rows of a `-top`-like table: name -> (flat, cum), for count units.
fn top_rows(text: &str) -> BTreeMap<String, (i64, i64)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 {
                return None;
            }
            let flat = f[0].parse().ok()?;
            let cum = f[3].parse().ok()?;
            f[1].ends_with('%').then_some(())?;
            Some((f[5..].join(" "), (flat, cum)))
        })
        .collect()
}

#[test]
fn gperftools_cpu_profile_matches_google_pprof() {
    let dir = scratch("cpu");
    let cpu = gperftools_profile(&dir, "cpu");
    let program = build_workload("report_gperf", FLAGS);
    let ours = report(&[
        cpu.to_str().unwrap(),
        "--sample-type",
        "samples",
        "--group-by",
        "none",
    ]);
    let theirs = Command::new("google-pprof")
        .arg("--text")
        .arg(&program)
        .arg(&cpu)
        .output()
        .expect("run google-pprof");
    let theirs = String::from_utf8_lossy(&theirs.stdout);
    let ours_rows = top_rows(&ours);
    let theirs_rows = top_rows(&theirs);
    // Named functions agree exactly (google-pprof names unresolved
    // addresses differently).
    for (name, values) in theirs_rows.iter().filter(|(n, _)| !n.starts_with("0x")) {
        assert_eq!(
            ours_rows.get(name),
            Some(values),
            "{name}\nours:\n{ours}\ntheirs:\n{theirs}"
        );
    }
    let cum = |f: &str| ours_rows[f].1;
    // A sample in a prologue may lose its caller, never gain one.
    assert!(cum("spin") > 0 && cum("spin") >= cum("burn_long") + cum("burn_short"));
    assert!(cum("burn_long") > cum("burn_short"), "{ours}");
    // cpu = samples x period (10 ms at the default 100 Hz).
    let stacks = folded(&[cpu.to_str().unwrap(), "--group-by", "none"]);
    let samples = folded(&[
        cpu.to_str().unwrap(),
        "--group-by",
        "none",
        "--sample-type",
        "samples",
    ]);
    for (stack, n) in &samples {
        assert_eq!(stacks[stack], n * 10_000_000, "{stack}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `go tool pprof` with its caches in `dir` and no symbolization attempts.
fn go_pprof(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none"])
        .args(args)
        .env("HOME", dir)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("PPROF_BINARY_PATH", dir.join("nothing"))
        .env("PPROF_TMPDIR", dir)
        .output()
        .expect("run go tool pprof");
    assert!(
        out.status.success(),
        "go tool pprof {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn go_pprof_reads_our_pprof_and_agrees() {
    let dir = scratch("go");
    let heap = gperftools_profile(&dir, "heap");
    let pb = dir.join("heap.pb.gz");
    report(&[heap.to_str().unwrap(), "-o", pb.to_str().unwrap()]);
    for ty in ["alloc_objects", "inuse_objects"] {
        let ours = top_rows(&report(&[
            pb.to_str().unwrap(),
            "--sample-type",
            ty,
            "--group-by",
            "none",
        ]));
        let theirs = top_rows(&go_pprof(
            &dir,
            &["-top", &format!("-sample_index={ty}"), pb.to_str().unwrap()],
        ));
        assert_eq!(ours, theirs, "{ty}");
        assert!(ours.contains_key("keep_blocks"));
    }
    // Bytes, exactly.
    let theirs = go_pprof(
        &dir,
        &[
            "-top",
            "-unit=B",
            "-sample_index=alloc_space",
            pb.to_str().unwrap(),
        ],
    );
    assert!(
        theirs
            .lines()
            .any(|l| l.trim_start().starts_with("100000B") && l.ends_with(" churn_blocks")),
        "{theirs}"
    );
    // The default sample type is ours.
    let theirs = go_pprof(&dir, &["-top", pb.to_str().unwrap()]);
    assert!(theirs.contains("Type: inuse_space"), "{theirs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reads_pprof_written_by_go_pprof() {
    let dir = scratch("gowritten");
    let heap = gperftools_profile(&dir, "heap");
    let program = build_workload("report_gperf", FLAGS);
    // go tool pprof converts the legacy profile and symbolizes what it can.
    let out = Command::new("go")
        .args(["tool", "pprof", "-proto"])
        .arg(&program)
        .arg(&heap)
        .env("HOME", &dir)
        .env("GOCACHE", dir.join("gocache"))
        .env("PPROF_TMPDIR", &dir)
        .output()
        .expect("go tool pprof -proto");
    assert!(out.status.success());
    let pb = dir.join("go.pb.gz");
    std::fs::write(&pb, &out.stdout).unwrap();
    let stacks = folded(&[pb.to_str().unwrap(), "--group-by", "none"]);
    assert_eq!(
        stacks.get(&format!("{MAIN_TO};keep_blocks")),
        Some(&1_000_000),
        "{stacks:#?}"
    );
    let stacks = folded(&[pb.to_str().unwrap(), "--sample-type", "alloc_objects"]);
    assert_eq!(leaf_value(&stacks, "churn_blocks"), 1000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn base_profile_difference() {
    let dir = scratch("base");
    let base = gperftools_profile(&dir, "heap");
    let new = gperftools_profile(&dir, "heap2");
    let stacks = folded(&[new.to_str().unwrap(), "--base", base.to_str().unwrap()]);
    // Only what grew: keep_more's 5 x 200000 bytes; keep_blocks cancels out.
    assert_eq!(stacks.len(), 1, "{stacks:#?}");
    assert_eq!(leaf_value(&stacks, "keep_more"), 1_000_000);
    // The other way round, a decrease.
    let stacks = folded(&[base.to_str().unwrap(), "--base", new.to_str().unwrap()]);
    assert_eq!(leaf_value(&stacks, "keep_more"), -1_000_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn focus_and_ignore() {
    let dir = scratch("focus");
    let heap = gperftools_profile(&dir, "heap");
    let heap = heap.to_str().unwrap();
    let focus = folded(&[heap, "--sample-type", "alloc_space", "--focus", "^churn"]);
    assert_eq!(focus.len(), 1);
    assert_eq!(leaf_value(&focus, "churn_blocks"), 100_000);
    let ignore = folded(&[heap, "--sample-type", "alloc_space", "--ignore", "churn"]);
    assert_eq!(ignore.len(), 1);
    assert_eq!(leaf_value(&ignore, "keep_blocks"), 1_000_000);
    let (_, stderr, code) = run_prof_bpf(&["report", heap, "--focus", "("]);
    assert_one_line_error(&stderr, code, "--focus");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn svg_and_callgraph_writers() {
    let dir = scratch("writers");
    let heap = gperftools_profile(&dir, "heap");
    let heap = heap.to_str().unwrap();
    let svg = dir.join("flame.svg");
    report(&[
        heap,
        "--sample-type",
        "alloc_space",
        "-o",
        svg.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<?xml"), "{}", &text[..100]);
    assert!(text.contains("Heap profile (alloc_space)"));
    // inferno's tooltip: name (value unit, percent).
    assert!(
        text.contains("keep_blocks (1,000,000 bytes, 90.91%)"),
        "flamegraph lacks keep_blocks"
    );
    assert!(text.contains("churn_blocks (100,000 bytes, 9.09%)"));

    let dot = dir.join("graph.dot");
    report(&[
        heap,
        "--sample-type",
        "alloc_space",
        "-o",
        dot.to_str().unwrap(),
    ]);
    let dot_text = std::fs::read_to_string(&dot).unwrap();
    assert!(dot_text.starts_with("digraph"));
    assert!(
        dot_text.contains("keep_blocks\\n976.56KiB (90.91%)"),
        "{dot_text}"
    );
    let check = Command::new("dot")
        .arg("-Tcanon")
        .arg(&dot)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "dot rejects: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    for ext in ["svg", "png"] {
        let out = dir.join(format!("graph.{ext}"));
        report(&[heap, "--format", "callgraph", "-o", out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        if ext == "png" {
            assert!(bytes.starts_with(b"\x89PNG"));
        } else {
            assert!(String::from_utf8_lossy(&bytes).contains("keep_blocks"));
        }
    }
    // The pprof writer round-trips through our reader.
    let pb = dir.join("p.pb.gz");
    report(&[heap, "-o", pb.to_str().unwrap()]);
    assert_eq!(folded(&[heap]), folded(&[pb.to_str().unwrap()]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_input_is_one_line_error_naming_the_file() {
    let dir = scratch("bad");
    let heap = gperftools_profile(&dir, "heap");
    let pb = dir.join("good.pb.gz");
    report(&[heap.to_str().unwrap(), "-o", pb.to_str().unwrap()]);
    let data = std::fs::read(&pb).unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated.pb.gz", data[..data.len() / 2].to_vec(), "gzip"),
        ("hello.txt", b"hello, world\n".to_vec(), "not a profile"),
        ("empty.pb.gz", Vec::new(), "empty file"),
        (
            "badheap.heap",
            b"heap profile: 1: 2 [ 3: 4] @ heapprofile\n 1: x [ 1: 1] @ 0x1\n".to_vec(),
            "bad gperftools heap profile",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let (_, stderr, code) = run_prof_bpf(&["report", path.to_str().unwrap()]);
        assert_one_line_error(&stderr, code, needle);
        assert!(stderr.contains(name), "{stderr}");
    }
    let (_, stderr, code) = run_prof_bpf(&["report", pb.to_str().unwrap(), "--sample-type", "cpu"]);
    assert_one_line_error(&stderr, code, "no sample type `cpu`");
    assert!(stderr.contains("good.pb.gz"), "{stderr}");
    let (_, stderr, code) = run_prof_bpf(&["report", dir.join("missing.pb.gz").to_str().unwrap()]);
    assert_one_line_error(&stderr, code, "missing.pb.gz");
    let (_, stderr, code) =
        run_prof_bpf(&["report", pb.to_str().unwrap(), "-o", "/nonexistent/x.txt"]);
    assert_one_line_error(&stderr, code, "/nonexistent/x.txt");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs prof-bpf with `args`; returns stderr, the exit code and the peak
/// RSS in bytes.
fn run_measured(args: &[&str]) -> (String, i32, u64) {
    use std::io::Read as _;
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also gives the peak RSS"
    )]
    let mut child = Command::new(prof_bpf_tests::prof_bpf())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run prof-bpf");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both out-pointers are valid.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (stderr, code, usage.ru_maxrss as u64 * 1024)
}

#[test]
fn input_is_bounded() {
    let dir = scratch("bounded");
    // /dev/zero never ends: reading stops at the cap.
    let (stderr, code, rss) = run_measured(&["report", "/dev/zero", "--max-input", "256M"]);
    assert_one_line_error(
        &stderr,
        code,
        "/dev/zero: larger than 256MiB (raise the cap with --max-input)",
    );
    assert!(rss < 512 << 20, "peak RSS {rss} for a 256 MiB cap");
    // 9 MB of gzip members of zeros: about 9 GB decompressed. The default
    // cap (1 GiB) stops it.
    let member = Command::new("sh")
        .args(["-c", "head -c 64M /dev/zero | gzip -9"])
        .output()
        .expect("gzip");
    assert!(member.status.success());
    let members = (9 << 20) / member.stdout.len() + 1;
    let bomb = dir.join("zeros.pb.gz");
    std::fs::write(&bomb, member.stdout.repeat(members)).unwrap();
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size >= 9 << 20, "{size}");
    let (stderr, code, rss) = run_measured(&["report", bomb.to_str().unwrap()]);
    assert_one_line_error(
        &stderr,
        code,
        "zeros.pb.gz: decompresses to larger than 1GiB (raise the cap with --max-input)",
    );
    assert!(rss < 2 << 30, "peak RSS {rss} for the default 1 GiB cap");
    // A small cap refuses a real profile, a bad size is a usage error.
    let heap = gperftools_profile(&dir, "heap");
    let (_, stderr, code) = run_prof_bpf(&["report", heap.to_str().unwrap(), "--max-input", "100"]);
    assert_one_line_error(&stderr, code, "larger than 100B");
    let (_, stderr, code) = run_prof_bpf(&["report", heap.to_str().unwrap(), "--max-input", "1X"]);
    assert_one_line_error(&stderr, code, "--max-input");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn rejected_options_leave_no_file() {
    let dir = scratch("rejected");
    let heap = gperftools_profile(&dir, "heap");
    let heap = heap.to_str().unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let at = |name: &str| out.join(name).to_str().unwrap().to_owned();
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec![
                "--format".into(),
                "callgraph".into(),
                "-o".into(),
                at("g.jpg"),
            ],
            "the call graph cannot be written as .jpg; use one of .dot, .svg, .png, .gif, .pdf",
        ),
        (vec!["-o".into(), at("g.jpg")], "unknown extension .jpg"),
        (vec!["-o".into(), at("profile")], "no extension"),
        (
            vec!["--focus".into(), "(".into(), "-o".into(), at("x.txt")],
            "bad --focus regex",
        ),
        (
            vec![
                "--sample-type".into(),
                "cpu".into(),
                "-o".into(),
                at("x.txt"),
            ],
            "no sample type `cpu`",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, stderr, code) = run_prof_bpf(&[&["report", heap], &args[..]].concat());
        assert_one_line_error(&stderr, code, needle);
        assert!(
            entries(&out).is_empty(),
            "{args:?} left {:?}",
            entries(&out)
        );
    }
    // A good run writes exactly the file asked for.
    report(&[heap, "-o", &at("g.png")]);
    assert_eq!(entries(&out), ["g.png"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_utf8_names_are_read_lossily_like_go_pprof() {
    let dir = scratch("utf8");
    let heap = gperftools_profile(&dir, "heap");
    let pb = dir.join("p.pb.gz");
    report(&[heap.to_str().unwrap(), "-o", pb.to_str().unwrap()]);
    // Uncompressed, with one byte of `keep_blocks` made invalid UTF-8 (the
    // same length keeps the message valid).
    let raw = Command::new("gzip")
        .arg("-dc")
        .arg(&pb)
        .output()
        .expect("gzip -dc");
    let mut bytes = raw.stdout;
    let at = bytes
        .windows(11)
        .position(|w| w == b"keep_blocks")
        .expect("keep_blocks in the string table");
    bytes[at + 4] = 0xff;
    let bad = dir.join("bad.pb");
    std::fs::write(&bad, &bytes).unwrap();
    let theirs = go_pprof(
        &dir,
        &["-top", "-sample_index=inuse_space", bad.to_str().unwrap()],
    );
    assert!(theirs.contains("Type: inuse_space"), "{theirs}");
    let stacks = folded(&[bad.to_str().unwrap(), "--group-by", "none"]);
    assert_eq!(
        leaf_value(&stacks, "keep\u{fffd}blocks"),
        1_000_000,
        "{stacks:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
