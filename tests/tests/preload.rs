//! gperftools mode of libprofalloc.so (LD_PRELOAD): HEAPPROFILE, HEAPCHECK and CPUPROFILE
//! on workloads whose heap and CPU split are known by construction
//! (tests/workloads/preload_*.c, built without frame pointers). The
//! profiles are read with Debian's `go tool pprof`, which is also the
//! check that they follow profile.proto.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use prof_bpf_tests::{build_workload, profalloc_lib};

const FLAGS: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];

/// A fresh scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("preload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_preloaded(program: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.env("LD_PRELOAD", profalloc_lib());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `go tool pprof ARGS FILE` (its caches in a scratch directory).
fn pprof(args: &[&str], file: &Path) -> String {
    let home = scratch("gohome");
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-nodefraction=0",
            "-edgefraction=0",
            "-nodecount=1000",
        ])
        .args(args)
        .arg(file)
        .env("HOME", &home)
        .env("GOCACHE", home.join("cache"))
        .env("PPROF_TMPDIR", &home)
        .output()
        .expect("go tool pprof (Debian's golang-go) must be installed");
    assert!(
        out.status.success(),
        "go tool pprof {args:?} {} failed: {}",
        file.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The flat value of `function` in `pprof -top` output (0 when absent).
fn flat(top: &str, function: &str) -> f64 {
    top.lines()
        .find(|l| l.split_whitespace().last() == Some(function))
        .map_or(0.0, |l| number(l.split_whitespace().next().unwrap()))
}

/// The cumulative value of `function` in `pprof -top` output.
fn cum(top: &str, function: &str) -> f64 {
    top.lines()
        .find(|l| l.split_whitespace().last() == Some(function))
        .map_or(0.0, |l| number(l.split_whitespace().nth(3).unwrap()))
}

/// "123B", "45ms", "0" -> the number.
fn number(s: &str) -> f64 {
    s.trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {s}"))
}

fn assert_near(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance * want,
        "{what}: got {got}, want {want} within {:.0}%",
        tolerance * 100.0
    );
}

#[test]
fn heap_profile_finds_the_known_sites_and_sizes() {
    let program = build_workload("preload_heap", FLAGS);
    let dir = scratch("heapprofile");
    let prefix = dir.join("w");
    // 16 KiB mean: alloc_page's 80 MB gets ~5000 samples (1.4% standard
    // error), keep_global's 20 MB ~1250 (2.8%); tolerances are 4 sigma.
    let out = run_preloaded(
        &program,
        &[
            ("HEAPPROFILE", prefix.to_str().unwrap()),
            ("PROFALLOC_SAMPLE_BYTES", "16384"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dumps.sort();
    let names: Vec<String> = dumps
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // In use crosses 100 MiB once (HEAP_PROFILE_INUSE_INTERVAL default),
    // then the dump at exit.
    assert_eq!(
        names,
        ["w.0001.heap", "w.0002.heap"],
        "stderr: {}",
        text(&out.stderr)
    );

    let at_exit = &dumps[1];
    let inuse = pprof(&["-top", "-unit=B", "-sample_index=inuse_space"], at_exit);
    assert_near(
        "alloc_page in use",
        flat(&inuse, "alloc_page"),
        20000.0 * 4096.0,
        0.06,
    );
    assert_near(
        "leak_big in use",
        flat(&inuse, "leak_big"),
        30.0 * 1048576.0,
        0.02,
    );
    assert_near(
        "keep_global in use",
        flat(&inuse, "keep_global"),
        10000.0 * 2048.0,
        0.12,
    );
    // Everything churn allocated was freed, and every sampled free is seen.
    assert_eq!(flat(&inuse, "churn"), 0.0, "{inuse}");
    // The call chain through the caller of the allocating function.
    assert_eq!(
        cum(&inuse, "leak_pages"),
        flat(&inuse, "alloc_page"),
        "{inuse}"
    );

    let alloc = pprof(&["-top", "-unit=B", "-sample_index=alloc_space"], at_exit);
    assert_near(
        "churn allocated",
        flat(&alloc, "churn"),
        100000.0 * 1000.0,
        0.06,
    );
    let objects = pprof(&["-top", "-sample_index=inuse_objects"], at_exit);
    assert_near(
        "alloc_page objects",
        flat(&objects, "alloc_page"),
        20000.0,
        0.06,
    );

    // The stack reaches the program's entry: alloc_page, leak_pages, main,
    // __libc_start_call_main, __libc_start_main, _start.
    let traces = pprof(&["-traces", "-sample_index=inuse_space"], at_exit);
    let trace = traces
        .split("-----------+")
        .find(|t| t.contains("alloc_page"))
        .unwrap_or_else(|| panic!("no alloc_page trace in {traces}"));
    // The frames start at the line with the value (labels come before).
    let frames: Vec<&str> = trace
        .lines()
        .skip_while(|l| !l.contains("alloc_page"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        frames.len() >= 6 && frames[1].trim() == "leak_pages",
        "{trace}"
    );

    // The first dump happened when about 100 MiB were in use.
    let first = pprof(&["-top", "-unit=B", "-sample_index=inuse_space"], &dumps[0]);
    let total: f64 = first
        .lines()
        .find_map(|l| l.strip_prefix("Showing nodes accounting for "))
        .map(|l| number(l.split(',').next().unwrap()))
        .unwrap();
    assert!(
        (100.0 * 1048576.0 * 0.94..120.0 * 1048576.0).contains(&total),
        "{first}"
    );
}

#[test]
fn heap_profile_in_an_unusable_directory_warns_once_and_runs_on() {
    let program = build_workload("preload_heap", FLAGS);
    for prefix in ["/nonexistent-dir/sub/x", "/etc/hostname/x"] {
        let out = run_preloaded(&program, &[("HEAPPROFILE", prefix)]);
        assert!(out.status.success(), "{prefix}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ready\n");
        let err = text(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{prefix}: {err}");
        assert!(
            lines[0].starts_with("profalloc: warning: HEAPPROFILE=") && lines[0].contains(prefix),
            "{err}"
        );
    }
}

#[test]
fn heap_check_reports_exactly_the_unreachable_objects() {
    let program = build_workload("preload_heap", FLAGS);
    let dir = scratch("heapcheck");
    // PROFBPF_PATH=/bin/false: the raw report (the symbolized one is
    // checked through the leak profile below).
    let out = run_preloaded(
        &program,
        &[
            ("HEAPCHECK", "normal"),
            ("TMPDIR", dir.to_str().unwrap()),
            ("PROFBPF_PATH", "/bin/false"),
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(text(&out.stdout), "ready\n");
    // Leaked: 20000 x 4096 + 30 x 1 MiB + 500 x 48 (a whole lost list).
    // A conservative scan may keep a leaked object alive when some word
    // of the roots happens to equal its address (about 1 run in 100 here,
    // one alloc_page object, as in gperftools' checker): allow that one.
    let pages = leaked_objects(&err, "Leak of ", 4096);
    assert!((19_999..=20_000).contains(&pages), "{err}");
    let bytes = pages * 4096 + 30 * 1048576 + 500 * 48;
    assert!(
        err.contains(&format!(
            "found {} leaked objects ({bytes} bytes) from 3 allocation stacks",
            pages + 530
        )),
        "{err}"
    );
    for leak in [
        "Leak of 31457280 bytes in 30 objects",
        "Leak of 24000 bytes in 500 objects",
    ] {
        assert!(err.contains(leak), "{leak}: {err}");
    }
    assert_eq!(err.matches("Leak of").count(), 3, "{err}");

    // The leak profile holds exactly those sites, with their stacks; the
    // reachable ones (globals, a list from a global, a running thread's
    // stack) are absent.
    let profile = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".leaks.heap"))
        .unwrap_or_else(|| panic!("no leak profile in {}: {err}", dir.display()));
    assert!(
        err.contains(&format!("prof-bpf report {}", profile.display())),
        "{err}"
    );
    let top = pprof(&["-top", "-unit=B", "-sample_index=inuse_space"], &profile);
    assert_eq!(flat(&top, "alloc_page"), pages as f64 * 4096.0, "{top}");
    assert_eq!(cum(&top, "leak_pages"), pages as f64 * 4096.0, "{top}");
    assert_eq!(flat(&top, "leak_big"), 31457280.0, "{top}");
    assert_eq!(flat(&top, "lose_list"), 24000.0, "{top}");
    for reachable in ["keep_global", "keep_list", "keep_in_thread"] {
        assert!(!top.contains(reachable), "{reachable} is reachable: {top}");
    }
}

/// The object count of the `Leak of N bytes in M objects` line whose
/// objects are `size` bytes each.
fn leaked_objects(report: &str, prefix: &str, size: u64) -> u64 {
    report
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (bytes, objects) = (w[0].parse::<u64>().ok()?, w[3].parse::<u64>().ok()?);
            (bytes == objects * size).then_some(objects)
        })
        .next()
        .unwrap_or(0)
}

#[test]
fn cpu_profile_finds_the_known_split_per_thread() {
    let program = build_workload("preload_cpu", FLAGS);
    let dir = scratch("cpuprofile");
    let file = dir.join("cpu.prof");
    let out = run_preloaded(&program, &[("CPUPROFILE", file.to_str().unwrap())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let tids: Vec<&str> = stdout
        .trim()
        .strip_prefix("tids ")
        .unwrap()
        .split(' ')
        .collect();

    // By construction: main burn_a 300 ms + burn_b 700 ms, thread 1
    // burn_t1 400 ms, thread 2 burn_t2 800 ms: 2200 ms of CPU.
    let top = pprof(&["-top", "-unit=ms"], &file);
    let total = ["burn_a", "burn_b", "burn_t1", "burn_t2"]
        .iter()
        .map(|f| cum(&top, f))
        .sum::<f64>();
    assert_near("total CPU", total, 2200.0, 0.1);
    for (f, ms) in [
        ("burn_a", 300.0),
        ("burn_b", 700.0),
        ("burn_t1", 400.0),
        ("burn_t2", 800.0),
    ] {
        let share = 100.0 * cum(&top, f) / total;
        let want = 100.0 * ms / 2200.0;
        assert!(
            (share - want).abs() <= 3.0,
            "{f}: {share:.1}% of the CPU, want {want:.1}%: {top}"
        );
    }
    // Per thread: each thread's own split.
    for (tid, parts) in [
        (tids[0], &[("burn_a", 300.0), ("burn_b", 700.0)][..]),
        (tids[1], &[("burn_t1", 400.0)][..]),
        (tids[2], &[("burn_t2", 800.0)][..]),
    ] {
        let top = pprof(
            &["-top", "-unit=ms", &format!("-tagfocus=tid={tid}")],
            &file,
        );
        let thread_total: f64 = parts.iter().map(|(_, ms)| ms).sum();
        let thread_share = 100.0 * parts.iter().map(|(f, _)| cum(&top, f)).sum::<f64>() / total;
        assert!(
            (thread_share - 100.0 * thread_total / 2200.0).abs() <= 3.0,
            "thread {tid}: {thread_share:.1}% of the CPU: {top}"
        );
        for (f, ms) in parts {
            let share = 100.0 * cum(&top, f) / parts.iter().map(|(f, _)| cum(&top, f)).sum::<f64>();
            assert!(
                (share - 100.0 * ms / thread_total).abs() <= 3.0,
                "thread {tid} {f}: {share:.1}%: {top}"
            );
        }
    }
}

/// Programs started by a profiled program inherit HEAPPROFILE and
/// CPUPROFILE; as with gperftools, each appends its pid to the name, so
/// that no process overwrites another's profiles.
#[test]
fn child_processes_write_their_own_profiles() {
    let program = build_workload("preload_heap", FLAGS);
    let dir = scratch("children");
    let prefix = dir.join("p");
    let cpu = dir.join("cpu.prof");
    let program = program.to_str().unwrap();
    // The shell is the first process; it runs the workload twice.
    let out = Command::new("/bin/sh")
        .args(["-c", &format!("{program} && {program} && echo done")])
        .env("LD_PRELOAD", profalloc_lib())
        .env("HEAPPROFILE", &prefix)
        .env("CPUPROFILE", &cpu)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let own = |stem: &str, rest: &str| {
        names
            .iter()
            .filter(|n| {
                n.strip_prefix(stem)
                    .and_then(|n| n.strip_suffix(rest))
                    .is_some_and(|pid| pid.is_empty() || pid.parse::<u32>().is_ok())
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    // The two children's, each with its pid (the plain names belong to
    // the shell, which ends without running exit handlers).
    assert_eq!(own("p_", ".0001.heap").len(), 2, "{names:?}");
    assert_eq!(own("cpu.prof_", "").len(), 2, "{names:?}");
    assert!(
        !names.contains(&"p.0001.heap".to_owned()) && !names.contains(&"cpu.prof".to_owned()),
        "{names:?}"
    );
}

/// The heap checker records every allocation where it is (no page of its
/// own per object): 200,000 live 32-byte objects, all reachable from a
/// global, are no leak and cost tens of MiB, not a page each (800 MiB).
#[test]
fn heap_check_of_many_small_objects_is_exact_and_compact() {
    let program = build_workload("preload_many", FLAGS);
    let dir = scratch("many");
    let out = run_preloaded(
        &program,
        &[
            ("HEAPCHECK", "normal"),
            ("TMPDIR", dir.to_str().unwrap()),
            ("PROFBPF_PATH", "/bin/false"),
        ],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("no leaks found (200001 objects"),
        "every object reachable (and stdio's buffer): {err}"
    );
    let hwm: u64 = text(&out.stdout)
        .strip_prefix("hwm_kb ")
        .and_then(|v| v.trim().parse().ok())
        .expect("hwm_kb line");
    // 6.4 MB of objects, their records (32 B each, table at most 3/4
    // full), the program and libraries: far below 100 MiB.
    assert!(hwm < 100 * 1024, "peak RSS {hwm} KiB");
}

/// Joined, detached and still-running threads leave nothing the heap
/// checker calls a leak (the dynamic loader's per-thread data is not one):
/// it reports exactly the deliberate leaks, in threads and in main.
#[test]
fn heap_check_of_threads_reports_only_the_deliberate_leaks() {
    let program = build_workload("preload_threads", FLAGS);
    let dir = scratch("threads");
    let out = run_preloaded(
        &program,
        &[
            ("HEAPCHECK", "normal"),
            ("TMPDIR", dir.to_str().unwrap()),
            ("PROFBPF_PATH", "/bin/false"),
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // 4 x 777 in the joined threads, 2 x 1234 in main.
    assert!(
        err.contains("found 6 leaked objects (5576 bytes) from 2 allocation stacks"),
        "{err}"
    );
    for leak in [
        "Leak of 3108 bytes in 4 objects",
        "Leak of 2468 bytes in 2 objects",
    ] {
        assert!(err.contains(leak), "{leak}: {err}");
    }
    assert_eq!(err.matches("Leak of").count(), 2, "{err}");
}

#[test]
fn heap_profile_marks_stacks_cut_by_depth() {
    let program = build_workload("preload_deep", FLAGS);
    let dir = scratch("deep");
    let prefix = dir.join("w");
    // 4 KiB mean: every 1 MiB object is sampled, with its size as weight.
    let out = run_preloaded(
        &program,
        &[
            ("HEAPPROFILE", prefix.to_str().unwrap()),
            ("PROFALLOC_SAMPLE_BYTES", "4096"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dump = dir.join("w.0001.heap");
    let top = pprof(&["-top", "-unit=B", "-sample_index=inuse_space"], &dump);
    let mib = f64::from(1 << 20);
    // deep_alloc's stacks (200 calls deep) end with the marker; shallow_alloc's
    // reach main and do not.
    assert_near(
        "deep_alloc in use",
        cum(&top, "deep_alloc"),
        16.0 * mib,
        0.02,
    );
    assert_near(
        "shallow_alloc in use",
        cum(&top, "shallow_alloc"),
        16.0 * mib,
        0.02,
    );
    assert_near(
        "[truncated] in use",
        cum(&top, "[truncated]"),
        16.0 * mib,
        0.02,
    );
    let comments = pprof(&["-comments"], &dump);
    assert!(
        comments.contains("truncated stacks: "),
        "no truncated count in the comments: {comments}"
    );
}
