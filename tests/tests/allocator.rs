//! libprofalloc.so under LD_PRELOAD: stress with content checks, the
//! glibc API's corner cases, statistics against known live sets, misuse
//! detection, and real programs giving the same results as without it.
//! The library is `$PROFALLOC_LIB` (set by `cargo xtask test`), else the
//! debug build in the target directory.
use std::{
    os::unix::process::ExitStatusExt as _,
    process::{Command, Output},
};

use prof_bpf_tests::{build_workload, profalloc_lib, workspace_root};

const FLAGS: &[&str] = &["-O1", "-g", "-fno-builtin"];

/// Runs `cmd` with the library preloaded (and `extra` environment).
fn preloaded(cmd: &mut Command, extra: &[(&str, &str)]) -> Output {
    cmd.env("LD_PRELOAD", profalloc_lib());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}); stdout: {}; stderr: {}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn api(mode: &str, env: &[(&str, &str)]) -> Output {
    preloaded(
        Command::new(build_workload("alloc_api", FLAGS)).arg(mode),
        env,
    )
}

/// A `key N` field of a line of `out`.
fn field(out: &str, key: &str) -> u64 {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad `{key}` in {out}"));
        }
    }
    panic!("no `{key}` in {out}")
}

#[test]
fn exports_the_malloc_family_and_imports_none_of_it() {
    let out = Command::new("nm")
        .args(["-D", "--undefined-only"])
        .arg(profalloc_lib())
        .output()
        .expect("run nm");
    assert_ok(&out, "nm");
    let undefined = stdout(&out);
    let family = [
        "malloc",
        "free",
        "calloc",
        "realloc",
        "reallocarray",
        "memalign",
        "posix_memalign",
        "aligned_alloc",
        "valloc",
        "pvalloc",
        "malloc_usable_size",
        "_Znwm",
        "_ZdlPv",
    ];
    for line in undefined.lines() {
        let name = line.split_whitespace().last().unwrap_or("");
        let name = name.split('@').next().unwrap_or(name);
        assert!(!family.contains(&name), "libprofalloc.so imports {name}");
    }
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(profalloc_lib())
        .output()
        .expect("nm");
    let defined = stdout(&out);
    for name in family.iter().chain(&[
        "mallopt",
        "mallinfo",
        "mallinfo2",
        "malloc_trim",
        "cfree",
        "_Znam",
        "_ZnwmSt11align_val_t",
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        "_ZdlPvmSt11align_val_t",
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
        "profalloc_stats",
        "profalloc_sample_alloc",
        "profalloc_sample_free",
        "profalloc_sample_bytes",
    ]) {
        assert!(
            defined
                .lines()
                .any(|l| l.split_whitespace().last() == Some(name)),
            "libprofalloc.so does not export {name}"
        );
    }
}

#[test]
fn dladdr_names_libprofalloc_for_malloc_free_and_new() {
    let out = api("dladdr", &[]);
    assert_ok(&out, "alloc_api dladdr");
    let text = stdout(&out);
    for sym in ["malloc", "free"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(sym))
            .expect("dladdr line");
        assert!(line.ends_with("libprofalloc.so"), "{line}");
    }
}

#[test]
fn glibc_api_corner_cases() {
    let out = api("api", &[]);
    assert_ok(&out, "alloc_api api");
    assert_eq!(stdout(&out).trim(), "ok");
}

#[test]
fn stress_random_operations_across_threads_and_forks() {
    let stress = build_workload("alloc_stress", &["-O2", "-fno-builtin"]);
    // 4 threads x 400,000 random operations, cross-thread frees, forks.
    let out = preloaded(Command::new(&stress).args(["4", "400000", "fork"]), &[]);
    assert_ok(&out, "alloc_stress");
    assert_eq!(stdout(&out).trim(), "ok 1600000");
    // Again with every allocation sampled, so sampled spans are exercised.
    let out = preloaded(
        Command::new(&stress).args(["2", "200000"]),
        &[("PROFALLOC_SAMPLE_BYTES", "1")],
    );
    assert_ok(&out, "alloc_stress, everything sampled");
}

#[test]
fn stats_in_use_matches_the_live_set() {
    // Without the idle-release thread: the frees would start it, and glibc
    // allocates that thread's own structures (a few hundred bytes in use).
    let out = api(
        "stats",
        &[
            ("PROFALLOC_SAMPLE_BYTES", "0"),
            ("PROFALLOC_BACKGROUND_RELEASE", "0"),
        ],
    );
    assert_ok(&out, "alloc_api stats");
    let text = stdout(&out);
    assert_eq!(field(&text, "live"), field(&text, "expected"), "{text}");
    assert!(
        text.contains("after 0"),
        "freeing the set leaves in-use unchanged: {text}"
    );
}

#[test]
fn exiting_threads_return_their_caches() {
    let out = api("threads", &[]);
    assert_ok(&out, "alloc_api threads");
    let text = stdout(&out);
    // Four threads each freed 2000 objects of 112 bytes and keep a full
    // list cached (64 KiB worth: 585 objects, less at most a batch of 32,
    // so more than 500); once they exited, only the main thread's remain.
    assert!(field(&text, "running") >= 4 * 500 * 112, "{text}");
    assert!(field(&text, "exited") < 1000 * 112, "{text}");
}

#[test]
fn the_sampler_samples_at_its_rate() {
    // 64 MiB in 64-byte objects at a 512 KiB mean: 128 samples expected
    // (Poisson, standard deviation ~11).
    let out = api("sampled", &[]);
    assert_ok(&out, "alloc_api sampled");
    let n = field(&stdout(&out), "sampled");
    assert!((80..=180).contains(&n), "{n} samples");
    let out = api("sampled", &[("PROFALLOC_SAMPLE_BYTES", "0")]);
    assert_eq!(field(&stdout(&out), "sampled"), 0);
}

#[test]
fn allocating_signal_handlers_do_not_deadlock() {
    let out = api("signal", &[]);
    assert_ok(&out, "alloc_api signal");
    assert_eq!(stdout(&out).trim(), "ok 1");
}

/// 256 threads fill their caches with objects of 16-1024 bytes and stay
/// alive: the bytes cached in all of them stay within the budget plus one
/// batch per class (at most 64 classes up to 1 KiB, a batch at most 32
/// objects of at most 1 KiB), where without a budget each would keep
/// about a batch per class (hundreds of MiB in all).
#[test]
fn thread_caches_stay_within_their_total_budget() {
    const BUDGET: u64 = 8 << 20;
    const SLACK: u64 = 64 * 32 * 1024;
    let out = preloaded(
        Command::new(build_workload("alloc_budget", FLAGS)).arg("256"),
        &[(
            "PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES",
            &BUDGET.to_string(),
        )],
    );
    assert_ok(&out, "alloc_budget 256");
    let text = stdout(&out);
    assert_eq!(field(&text, "threads"), 256);
    let cached = field(&text, "cached_bytes");
    assert!(
        cached <= BUDGET + SLACK,
        "cached {cached} > budget {BUDGET} + {SLACK}: {text}"
    );
    // The caches are used at all: the budget fills up.
    assert!(cached >= BUDGET / 2, "cached only {cached}: {text}");
}

/// 16 threads allocate and keep 3000 objects each, spending the 2 MiB
/// budget, and go idle; a 17th that allocates and frees 3000 can cache only
/// what it steals from the idle ones' headroom (without stealing it caches
/// nothing: the budget is spent). The total stays within the budget plus
/// one batch per class.
#[test]
fn a_thread_steals_budget_from_idle_ones() {
    const BUDGET: u64 = 2 << 20;
    const SLACK: u64 = 64 * 32 * 1024;
    let out = preloaded(
        Command::new(build_workload("alloc_budget", FLAGS)).args(["steal", "16"]),
        &[(
            "PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES",
            &BUDGET.to_string(),
        )],
    );
    assert_ok(&out, "alloc_budget steal 16");
    let text = stdout(&out);
    let (idle, cached) = (
        field(&text, "idle_cached_bytes"),
        field(&text, "cached_bytes"),
    );
    assert!(
        cached >= idle + (16 << 10),
        "the late thread cached {} bytes: {text}",
        cached.saturating_sub(idle)
    );
    assert!(cached <= BUDGET + SLACK, "{text}");
}

/// After 90% of an 800 MiB heap of 4 KiB objects was freed, malloc_trim
/// brings the resident memory the heap adds to the process (RSS less the
/// RSS before the first allocation) within 1.2x of the live bytes.
#[test]
fn malloc_trim_returns_freed_memory_at_once() {
    let out = preloaded(
        &mut Command::new(build_workload("alloc_release", FLAGS)),
        &[],
    );
    assert_ok(&out, "alloc_release");
    let text = stdout(&out);
    let (base, live) = (field(&text, "base_kib"), field(&text, "live_kib"));
    assert_eq!(live, 80 * 1024, "{text}");
    let heap = field(&text, "after_kib").saturating_sub(base);
    assert!(
        heap * 10 <= live * 12,
        "heap {heap} KiB after trim, live {live} KiB: {text}"
    );
}

/// Without a trim, after the same 90% free, while the program keeps calling
/// the allocator: at once, the free pages the heap keeps resident stay
/// within the size bound of `decay` (the pages in use, here 80 MiB: the
/// last release leaves half of them, and the frees after it add up to as
/// many again, how many depending on when the age rule released spans
/// meanwhile; 6 MiB of slack for span records, caches and the sampler);
/// the age rule
/// then brings the heap (resident KiB above the start) within 1.2x of the
/// live bytes within 10 s.
#[test]
fn freed_memory_leaves_the_resident_set_without_a_trim() {
    let out = preloaded(
        Command::new(build_workload("alloc_release", FLAGS)).arg("active"),
        &[],
    );
    assert_ok(&out, "alloc_release active");
    let text = stdout(&out);
    let (base, live) = (field(&text, "base_kib"), field(&text, "live_kib"));
    assert_eq!(live, 80 * 1024, "{text}");
    let at_once = field(&text, "before_kib").saturating_sub(base);
    assert!(
        at_once <= 2 * live + 6 * 1024,
        "heap {at_once} KiB just after the frees, live {live} KiB: {text}"
    );
    let heap = field(&text, "final_kib").saturating_sub(base);
    assert!(
        heap * 10 <= live * 12,
        "heap {heap} KiB at the end, live {live} KiB: {text}"
    );
    assert!(field(&text, "ms") < 10_000, "{text}");
}

/// 3 MiB of large blocks freed (below the size bound) while the program
/// keeps allocating one block now and then: the free spans leave the
/// resident set after two epochs (1-2 s, or sooner by the release rate),
/// well within 10 s. With automatic release off they stay: the control.
#[test]
fn free_spans_go_back_after_a_time_without_use() {
    let bin = build_workload("alloc_release", FLAGS);
    let out = preloaded(Command::new(&bin).arg("decay"), &[]);
    assert_ok(&out, "alloc_release decay");
    let text = stdout(&out);
    let (freed, held, final_kib) = (
        field(&text, "freed_kib"),
        field(&text, "held_kib"),
        field(&text, "final_kib"),
    );
    assert!(
        held * 10 >= freed * 9,
        "the frees kept nothing resident: {text}"
    );
    assert!(final_kib * 4 < freed, "still resident: {text}");
    assert!(field(&text, "ms") < 10_000, "{text}");
    let out = preloaded(
        Command::new(&bin).arg("decay"),
        &[("PROFALLOC_RELEASE_BYTES", "0")],
    );
    assert_ok(&out, "alloc_release decay, release off");
    let text = stdout(&out);
    assert!(field(&text, "final_kib") * 10 >= freed * 9, "{text}");
}

/// Idle: 90% of an 80 MiB heap of 1 MiB blocks freed, then no allocator
/// call while the program sleeps. The idle-release thread ages the free
/// spans: the heap (resident KiB above the start) falls within 1.2x of the
/// live bytes within 10 s, in the program and in a forked child (which
/// starts its own thread). The control, with the thread off, keeps what the
/// size bound of `decay` leaves (here 2 MiB more).
#[test]
fn freed_memory_leaves_the_resident_set_while_the_program_sleeps() {
    let bin = build_workload("alloc_release", FLAGS);
    let out = preloaded(Command::new(&bin).args(["idle", "10"]), &[]);
    assert_ok(&out, "alloc_release idle");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].starts_with("child "), "{text}");
    for line in &lines {
        let (live, held, final_kib) = (
            field(line, "live_kib"),
            field(line, "held_kib"),
            field(line, "final_kib"),
        );
        assert_eq!(live, 8192, "{text}");
        assert!(held * 100 > live * 125, "released at once: {text}");
        assert!(final_kib * 10 <= live * 12, "still resident: {text}");
        assert!(field(line, "ms") < 10_000, "{text}");
    }

    let out = preloaded(
        Command::new(&bin).args(["idle", "4"]),
        &[("PROFALLOC_BACKGROUND_RELEASE", "0")],
    );
    assert_ok(&out, "alloc_release idle, thread off");
    let off = stdout(&out);
    assert!(
        field(&off, "final_kib") >= field(lines[0], "final_kib") + 1024,
        "released as much without the thread: {off} against {text}"
    );
}

fn assert_aborts(mode: &str, message: &str) {
    let out = api(mode, &[]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{mode}: {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(message), "{mode}: stderr {stderr}");
    assert!(!stdout(&out).contains("survived"));
}

#[test]
fn double_free_aborts_with_a_message() {
    assert_aborts("double-free", "profalloc: free 0x");
    assert_aborts("double-free", "double free");
}

#[test]
fn freeing_a_foreign_pointer_aborts_with_a_message() {
    assert_aborts("foreign", "invalid pointer (not allocated by profalloc");
}

/// Runs `cmd` with and without the library; both must succeed with the
/// same stdout.
fn same_output(make: impl Fn() -> Command, what: &str) -> String {
    let plain = make().output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_ok(&plain, what);
    let with = preloaded(&mut make(), &[("PROFALLOC_STATS", "1")]);
    assert_ok(&with, &format!("{what} under LD_PRELOAD"));
    assert_eq!(
        stdout(&plain),
        stdout(&with),
        "{what}: output differs under libprofalloc.so"
    );
    // The exit report proves the program really ran on the allocator.
    let stderr = String::from_utf8_lossy(&with.stderr);
    assert!(
        stderr.contains("profalloc: stats at exit"),
        "{what}: {stderr}"
    );
    stdout(&with)
}

#[test]
fn cxx_program_runs_identically() {
    let bin = build_workload("alloc_cxx", &["-O2"]);
    let out = same_output(|| Command::new(&bin), "alloc_cxx");
    assert!(out.contains("bad_alloc 1 nothrow-null 1"), "{out}");
}

const PYTHON_WORKLOAD: &str = r#"
import collections, hashlib, json, re, threading
d = {}
for i in range(200000):
    d[str(i)] = [i] * (i % 7)
words = collections.Counter(re.findall(r"\w+", json.dumps(d)[:2000000]))
def worker(n, out):
    out.append(sum(len(str(x)) for x in range(n)))
out = []
ts = [threading.Thread(target=worker, args=(100000 + k, out)) for k in range(4)]
for t in ts: t.start()
for t in ts: t.join()
print(len(d), sum(len(v) for v in d.values()), words.most_common(3), sorted(out))
print(hashlib.sha256(json.dumps(sorted(d.items())[:5000]).encode()).hexdigest())
"#;

#[test]
fn python_runs_identically() {
    let python = "/usr/bin/python3.11";
    if !std::path::Path::new(python).exists() {
        panic!("{python} is missing (cargo xtask setup installs it)");
    }
    same_output(
        || {
            let mut c = Command::new(python);
            c.args(["-c", PYTHON_WORKLOAD]);
            c
        },
        "python3.11 workload",
    );
}

#[test]
fn sqlite3_runs_identically() {
    let sql = "\
        create table t(id integer primary key, name text, v real);\n\
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 200000)\n\
        insert into t select x, hex(x * 7919), x * 0.5 from c;\n\
        create index t_name on t(name);\n\
        select count(*), sum(v), min(name), max(name) from t;\n\
        select name, count(*) from t group by substr(name, 1, 2) order by 2 desc limit 5;\n";
    same_output(
        || {
            let mut c = Command::new("sqlite3");
            c.args([":memory:", sql]);
            c
        },
        "sqlite3",
    );
}

#[test]
fn git_runs_identically() {
    let root = workspace_root();
    same_output(
        || {
            let mut c = Command::new("git");
            c.arg("-C")
                .arg(&root)
                .args(["log", "--stat", "--format=%H %s", "-n", "50"]);
            c
        },
        "git log --stat",
    );
    same_output(
        || {
            let mut c = Command::new("git");
            c.arg("-C")
                .arg(&root)
                .args(["grep", "-c", "fn ", "HEAD", "--"]);
            c
        },
        "git grep",
    );
}

#[test]
fn python_regression_tests_pass() {
    // A slice of CPython's own tests (Debian's libpython3.11-testsuite)
    // that allocate heavily: containers, strings, regexes, gc, weakrefs.
    let tests = [
        "test_list",
        "test_dict",
        "test_set",
        "test_bytes",
        "test_re",
        "test_json",
        "test_collections",
        "test_gc",
        "test_weakref",
        "test_deque",
    ];
    assert!(
        std::path::Path::new("/usr/lib/python3.11/test/test_dict.py").exists(),
        "CPython's tests are missing (cargo xtask setup installs libpython3.11-testsuite)"
    );
    // No PROFALLOC_STATS here: some tests require their subprocesses'
    // stderr to be empty.
    let out = preloaded(
        Command::new("/usr/bin/python3.11")
            .args(["-m", "test", "-q"])
            .args(tests),
        &[],
    );
    assert_ok(&out, "python3.11 -m test");
    assert!(
        stdout(&out).contains("Tests result: SUCCESS"),
        "{}",
        stdout(&out)
    );
}
