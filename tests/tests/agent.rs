//! `prof-bpf agent` against real workloads: what the sinks receive, read
//! back by field numbers from the published .proto files and by PyPI's
//! opentelemetry-proto, compared with what the workloads did by
//! construction (a CPU split, heap blocks leaked in rounds).
#[path = "sinks/check.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod check;
#[path = "sinks/receiver.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod receiver;
#[path = "agent_support/run.rs"]
#[allow(dead_code, reason = "shared by the agent tests")]
mod run;
#[path = "sinks/wire.rs"]
#[allow(dead_code, reason = "shared with the sinks test")]
mod wire;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use check::Pprof;
use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, prof_bpf, profalloc_lib, require_bpf,
    run_prof_bpf, start_following,
};
use receiver::Receiver;
use run::{READY, profiles, scratch, start_agent, stop_agent, value, wait_profile};
use wire::Message;

const FLAGS: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer"];
/// Bytes of one block of the heap workload.
const BLOCK: i64 = 64 * 1024;
/// Sampling distance of the heap tests: 1/16 of a block, so every block
/// is sampled (probability 1 - e^-16) with a weight of its own size.
const SAMPLE_BYTES: &str = "4096";

/// Within 2% (the heap values are estimates, a hair above the bytes).
fn assert_close(got: i64, want: i64, what: &str) {
    let slack = (want as f64 * 0.02).max(1.0);
    assert!(
        (got - want).abs() as f64 <= slack,
        "{what}: got {got}, want {want}"
    );
}

/// The heap workload, under libprofalloc.so or glibc, with `before`
/// blocks leaked before any profiler is there.
fn heap_workload(preload: bool, before: i64) -> Proc {
    let mut cmd = Command::new(build_workload("agent_heap", FLAGS));
    cmd.arg(before.to_string());
    if preload {
        cmd.env("LD_PRELOAD", profalloc_lib())
            .env("PROFALLOC_SAMPLE_BYTES", SAMPLE_BYTES);
    }
    let mut w = Proc::spawn(&mut cmd);
    w.expect_line("ready");
    w
}

/// Leaks `n` more blocks (and churns `n`), returns once done.
fn leak(w: &mut Proc, n: i64, total: i64) {
    w.send_line(&n.to_string());
    w.expect_line(&format!("leaked {total}"));
}

/// Leaks in two rounds and checks, interval by interval, what the agent
/// reports: alloc_* per interval (a round's blocks, leaked and churned,
/// then nothing), inuse_* as a snapshot (`inuse_before` blocks held
/// before the rounds count when the profile covers the heap since the
/// process started).
fn check_rounds(dir: &Path, w: &mut Proc, before: i64, inuse_before: i64) {
    let pid = w.pid();
    let leaked = |p: &Pprof| value(p, "alloc_space", "leak_block");
    let held = |p: &Pprof| value(p, "inuse_space", "leak_block");
    let mut total = before;
    let mut seen = 0;
    for round in [8, 24] {
        // A quiet interval first: nothing allocated, the heap as it was
        // (no profile at all while the process holds nothing seen).
        if inuse_before + total - before > 0 {
            let all = wait_profile(dir, pid, "heap", seen, |p| {
                leaked(p) == 0 && held(p) == (inuse_before + total - before) * BLOCK
            });
            seen = all.len();
        }
        total += round;
        leak(w, round, total);
        let all = wait_profile(dir, pid, "heap", seen, |p| leaked(p) > 0);
        // The round's allocations, in the interval(s) after the quiet one.
        let new = &all[seen..];
        let alloc: i64 = new.iter().map(leaked).sum();
        assert_close(
            alloc,
            round * BLOCK,
            "leak_block alloc_space over the round",
        );
        let churned: i64 = new
            .iter()
            .map(|p| value(p, "alloc_space", "churn_block"))
            .sum();
        assert_close(churned, round * BLOCK, "churn_block alloc_space");
        let last = new.last().unwrap();
        assert_close(
            held(last),
            (inuse_before + total - before) * BLOCK,
            "leak_block inuse_space",
        );
        assert_eq!(
            value(last, "inuse_space", "churn_block"),
            0,
            "churn is freed"
        );
        seen = all.len();
    }
}

#[test]
fn heap_by_default_from_libprofalloc_with_the_heap_since_start() {
    require_bpf!();
    let mut w = heap_workload(true, 16);
    let dir = scratch("profalloc");
    let (agent, _) = start_agent(&[
        "--no-cpu",
        "--interval",
        "1",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    // In-use values count the 16 blocks leaked before the agent started.
    check_rounds(&dir, &mut w, 16, 16);
    stop_agent(agent);
    assert!(profiles(&dir, w.pid(), "cpu").is_empty(), "--no-cpu");
}

#[test]
fn heap_of_a_glibc_process_named_with_pid_through_uprobes() {
    require_bpf!();
    let mut w = heap_workload(false, 16);
    w.wait_mapped("libc.so");
    let dir = scratch("uprobes");
    let pid = w.pid().to_string();
    let (agent, lines) = start_agent(&[
        "--pid",
        &pid,
        "--no-cpu",
        "--sample-bytes",
        SAMPLE_BYTES,
        "--interval",
        "1",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let warning = format!("malloc uprobes on pid {pid}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&warning) && l.contains("1.5 us")),
        "no cost warning: {lines:#?}"
    );
    // Uprobes see what is allocated since they went in: none of the 16.
    check_rounds(&dir, &mut w, 16, 0);
    stop_agent(agent);
}

#[test]
fn malloc_uprobes_are_detached_above_the_call_rate_ceiling() {
    require_bpf!();
    // Millions of malloc/free calls per second, far above a ceiling of 1000.
    let mut w = Proc::spawn(
        Command::new(build_workload("preload_bench", FLAGS))
            .args(["churn", "40000000"])
            .env("PRELOAD_BENCH_WAIT", "1"),
    );
    w.expect_line("ready");
    w.wait_mapped("libc.so");
    let dir = scratch("ceiling");
    let log = dir.join("agent.log");
    let pid = w.pid().to_string();
    let mut agent = Command::new(prof_bpf_tests::prof_bpf())
        .args([
            "agent",
            "--pid",
            &pid,
            "--no-cpu",
            "--max-uprobe-rate",
            "1000",
        ])
        .args(["--interval", "1", "--dir", dir.to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logged = |needle: &str| std::fs::read_to_string(&log).unwrap().contains(needle);
    let wait_log = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !logged(needle) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in the agent's log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_log(READY);
    w.send_line("go");
    wait_log(&format!("detached the malloc uprobes of pid {pid}"));
    // The process runs on unharmed to its end.
    let line = w.read_line();
    assert!(line.starts_with("ops 40000000 "), "{line}");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("1 detached over the ceiling"),
        "the detach is counted: {text}"
    );
}

/// cpu_split under the agent at 499 Hz for about 3 s.
fn split_under_agent(extra: &[&str]) -> (Proc, PathBuf, Child) {
    let mut w = Proc::spawn(Command::new(build_workload("cpu_split", FLAGS)).args(["3", "2"]));
    w.expect_line("ready");
    let dir = scratch(&format!("split-{}", w.pid()));
    let pid = w.pid().to_string();
    let mut args = vec!["--pid", &pid, "-F", "499", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (agent, _) = start_agent(&args);
    w.send_line("go");
    w.expect_line("done");
    (w, dir, agent)
}

#[test]
fn cpu_split_by_construction_over_intervals() {
    require_bpf!();
    let (w, dir, agent) = split_under_agent(&["--no-heap", "--interval", "1"]);
    stop_agent(agent);
    let all = profiles(&dir, w.pid(), "cpu");
    assert!(all.len() >= 2, "one profile per interval: {}", all.len());
    let share = |f| all.iter().map(|p| value(p, "cpu", f)).sum::<i64>() as f64;
    let (a, b, c) = (share("func_a"), share("func_b"), share("func_c"));
    let total = a + b + c;
    for (got, want, f) in [(a, 0.5, "func_a"), (b, 0.3, "func_b"), (c, 0.2, "func_c")] {
        assert!(
            (got / total - want).abs() < 0.07,
            "{f}: {:.3} of the CPU, want {want}",
            got / total
        );
    }
    // Each profile is its own interval: increasing starts, about 1 s each
    // (the last one cut short by the stop).
    for pair in all.windows(2) {
        assert!(pair[1].time_nanos > pair[0].time_nanos);
        let d = pair[0].duration_nanos as f64 / 1e9;
        assert!((0.5..3.0).contains(&d), "interval of {d} s");
    }
    assert!(profiles(&dir, w.pid(), "heap").is_empty(), "--no-heap");
}

#[test]
fn sigterm_mid_interval_delivers_the_partial_interval() {
    require_bpf!();
    let (w, dir, agent) = split_under_agent(&["--no-heap", "--interval", "600"]);
    let started = Instant::now();
    stop_agent(agent);
    let stopped_in = started.elapsed();
    let all = profiles(&dir, w.pid(), "cpu");
    assert_eq!(all.len(), 1, "the partial interval, once");
    let covered = all[0].duration_nanos as f64 / 1e9;
    assert!(
        (2.0..60.0).contains(&covered),
        "the partial interval covers {covered} s"
    );
    assert!(value(&all[0], "samples", "burn") > 100);
    assert!(stopped_in < Duration::from_secs(15), "{stopped_in:?}");
}

/// The pprof of a Connect Push request, with its series labels.
fn pyroscope_push(body: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
    let push = Message::decode(body);
    let series = push.messages(1);
    assert_eq!(series.len(), 1);
    let labels = series[0]
        .messages(1)
        .iter()
        .map(|l| (l.string(1), l.string(2)))
        .collect();
    (labels, series[0].messages(2)[0].bytes(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_at_once() {
    require_bpf!();
    let pyroscope = Receiver::http();
    let otlp = Receiver::http();
    let parca = Receiver::grpc();
    let dir = scratch("every-sink");
    let heap = heap_workload(true, 16);
    let (pyroscope_url, otlp_url, parca_url) = (pyroscope.url(), otlp.url(), parca.url());
    let heap_pid = heap.pid();
    let dir_arg = dir.clone();
    let (cpu, _) = tokio::task::spawn_blocking(move || {
        let pid = heap_pid.to_string();
        let (w, _, agent) = split_under_agent(&[
            "--pid",
            &pid,
            "--interval",
            "2",
            "--label",
            "env=test",
            "--pyroscope",
            &pyroscope_url,
            "--otlp",
            &otlp_url,
            "--parca",
            &parca_url,
            "--dir",
            dir_arg.to_str().unwrap(),
        ]);
        stop_agent(agent);
        (w, ())
    })
    .await
    .unwrap();
    let cpu_pid = cpu.pid();
    // Services are named after the executables' file names.
    let service_of = |workload: &str| {
        build_workload(workload, FLAGS)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let (cpu_service, heap_service) = (service_of("cpu_split"), service_of("agent_heap"));
    // The directory: both kinds, each of its own process.
    assert!(!profiles(&dir, cpu_pid, "cpu").is_empty());
    assert!(!profiles(&dir, heap_pid, "heap").is_empty());
    // Pyroscope: one series per profile, named as Grafana's agents name them.
    let mut kinds = Vec::new();
    for request in pyroscope.requests() {
        assert_eq!(request.path, "/push.v1.PusherService/Push");
        assert_eq!(request.headers["content-type"], "application/proto");
        let (labels, pprof) = pyroscope_push(&request.body);
        let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let p = check::pprof(&pprof);
        let pid = p.samples[0].num_labels[0].1 as u32;
        let (name, service) = if pid == cpu_pid {
            ("process_cpu", &cpu_service)
        } else {
            ("memory", &heap_service)
        };
        if get("__name__").as_deref() != Some(name) {
            // A process the agent also profiles (a heap workload sampling on
            // its own profiles its CPU too): only ours are checked.
            continue;
        }
        assert_eq!(get("service_name").as_ref(), Some(service), "{labels:?}");
        assert_eq!(get("env").as_deref(), Some("test"));
        assert!(p.samples.iter().all(|s| s.str_labels.is_empty()));
        kinds.push(name);
    }
    assert!(
        kinds.contains(&"process_cpu") && kinds.contains(&"memory"),
        "{kinds:?}"
    );
    // OTLP, decoded by opentelemetry-proto.
    let summaries: Vec<String> = otlp
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.path, "/v1development/profiles");
            check::otlp_summary(&r.body, &dir.join("otlp"))
        })
        .collect();
    for (pid, service, ty) in [
        (cpu_pid, &cpu_service, "cpu/nanoseconds"),
        (heap_pid, &heap_service, "inuse_space/bytes"),
    ] {
        assert!(
            summaries
                .iter()
                .any(|s| s.contains(&format!("resource process.pid={pid}\n"))
                    && s.contains(&format!("resource service.name={service}\n"))
                    && s.contains(&format!("profile {ty}"))),
            "no {ty} profile of pid {pid}: {summaries:#?}"
        );
    }
    // Parca: WriteRaw with the same series names.
    let names: Vec<String> = parca
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(
                r.path,
                "/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw"
            );
            let write = Message::decode(&r.body[5..]);
            let series = write.messages(2);
            let labels = series[0].message(1).messages(1);
            labels
                .iter()
                .find(|l| l.string(1) == "__name__")
                .map(|l| l.string(2))
                .unwrap()
        })
        .collect();
    assert!(
        names.iter().any(|n| n == "process_cpu") && names.iter().any(|n| n == "memory"),
        "{names:?}"
    );
    drop(heap);
}

#[test]
fn bad_flags_are_one_line_errors() {
    for (args, needle) in [
        (&["agent", "--bogus"][..], "--bogus"),
        (&["agent"], "no sink"),
        (&["agent", "--dir", "/tmp/x", "-F", "0"], "--frequency"),
        (
            &["agent", "--dir", "/tmp/x", "--no-heap", "--no-cpu"],
            "nothing to profile",
        ),
        (&["agent", "--dir", "/tmp/x", "--label", "a b=c"], "label"),
        (
            &["agent", "--dir", "/tmp/x", "--include", "pod:x"],
            "exe:TEXT",
        ),
    ] {
        let (_, stderr, code) = run_prof_bpf(args);
        assert_one_line_error(&stderr, code, needle);
    }
}

#[test]
fn without_cpu_a_process_that_execs_into_libprofalloc_is_examined_at_once() {
    require_bpf!();
    let dir = scratch("exec");
    // A copy of libprofalloc.so of its own: the agent's line on attaching
    // to it says that this process was examined, whatever else runs here.
    let lib = dir.join("libprofalloc-exec.so");
    std::fs::copy(profalloc_lib(), &lib).unwrap();
    let workload = build_workload("agent_heap", FLAGS);
    // A shell, seen by the agent as it starts, that waits for a line and
    // then runs the heap workload in its place (same pid).
    let mut w = Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg("read go; exec env LD_PRELOAD=\"$0\" PROFALLOC_SAMPLE_BYTES=4096 \"$1\" 0")
            .arg(&lib)
            .arg(&workload),
    );
    // An interval longer than the test: only the exec event can make the
    // agent look at the process again before the end.
    let (agent, _, lines) = start_following(
        &prof_bpf(),
        &[
            "agent",
            "--no-cpu",
            "--interval",
            "600",
            "--dir",
            dir.to_str().unwrap(),
        ],
        READY,
    );
    w.send_line("go");
    w.expect_line("ready");
    let attached = format!("of {} (every process mapping it)", lib.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the agent did not examine the process after its exec within 20 s");
        if line.contains(&attached) {
            break;
        }
    }
    leak(&mut w, 8, 8);
    let pid = w.pid();
    stop_agent(agent);
    let all = profiles(&dir, pid, "heap");
    assert_eq!(all.len(), 1, "the one (partial) interval");
    // The 8 blocks leaked and the 8 churned, all under main() (stacks
    // taken before the new program's unwind tables were built may miss
    // the frame under it); stdio's buffers aside.
    let p = &all[0];
    let i = p
        .sample_types
        .iter()
        .position(|t| t == "alloc_space")
        .unwrap();
    let made: i64 = p
        .samples
        .iter()
        .filter(|s| {
            let frames: Vec<&str> = s.stack.split(';').collect();
            frames.contains(&"main") && !frames.iter().any(|f| f.contains("_IO_"))
        })
        .map(|s| s.values[i])
        .sum();
    assert_close(made, 16 * BLOCK, "alloc_space under main()");
}
