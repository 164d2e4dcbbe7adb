use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use super::*;
use crate::{
    profile::{Profile, SampleType},
    sinks::{Delivery, DirectoryTarget, ProfileKind, ProfileMessage, SinkTarget, Sinks, Source},
};

/// One HTTP/1.1 request over a plain socket: (status line, headers, body).
fn get(addr: SocketAddr, request_line: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "{request_line}\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// The value of an unlabelled or labelled series line.
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{series}` in:\n{body}"))
        .parse()
        .unwrap()
}

/// Burns `seconds` of this process's CPU time.
fn burn(seconds: f64) {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write to.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    let start = now();
    let mut x = 1u64;
    while now() - start < seconds {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// The CPU time of this process by getrusage, an oracle apart from /proc.
fn rusage_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid rusage to write to.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

#[test]
fn serves_sinks_collectors_and_process_figures_over_http() {
    let dir = std::env::temp_dir().join(format!("prof-bpf-metrics-http-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (server, sinks) = runtime.block_on(async {
        let sinks = Sinks::start(
            vec![SinkTarget::Directory(DirectoryTarget::new(&dir))],
            &Delivery::default(),
        )
        .unwrap();
        let profile = Profile {
            sample_types: vec![SampleType::new("samples", "count")],
            ..Profile::default()
        };
        sinks.send(ProfileMessage {
            kind: ProfileKind::Cpu,
            profile,
            source: Arc::new(Source::new("demo", 42)),
            start: std::time::SystemTime::now(),
            duration: Duration::from_secs(15),
        });
        assert!(sinks.flush(Duration::from_secs(20)).await);
        let sinks = Arc::new(sinks);
        let shared = Arc::clone(&sinks);
        let readings: ReadingsFn = Arc::new(move || Readings {
            sinks_text: shared.metrics_text(),
            collectors: vec![
                CollectorCounters {
                    collector: "cpu".into(),
                    lost_events: 3,
                    truncated_stacks: 5,
                },
                CollectorCounters {
                    collector: "heap".into(),
                    lost_events: 0,
                    truncated_stacks: 7,
                },
            ],
        });
        (
            MetricsServer::start("127.0.0.1:0", readings).unwrap(),
            sinks,
        )
    });
    let addr = server.local_addr();
    burn(0.3);
    let before = rusage_seconds();
    let (status, headers, body) = get(addr, "GET /metrics HTTP/1.1");
    let after = rusage_seconds();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    let sink = format!("directory {}", dir.display());
    assert_eq!(
        value(
            &body,
            &format!("prof_bpf_sink_sent_total{{sink=\"{sink}\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &body,
            &format!("prof_bpf_sink_dropped_total{{sink=\"{sink}\"}}")
        ),
        0.0
    );
    assert_eq!(
        value(
            &body,
            "prof_bpf_collector_lost_events_total{collector=\"cpu\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &body,
            "prof_bpf_collector_truncated_stacks_total{collector=\"heap\"}"
        ),
        7.0
    );
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{body}"
    );
    // /proc's clock ticks are 10 ms; getrusage is finer.
    let cpu = value(&body, "process_cpu_seconds_total");
    assert!(
        cpu >= 0.3 && cpu >= before - 0.02 && cpu <= after + 0.02,
        "{cpu} not in [{before}, {after}]"
    );
    let rss = value(&body, "process_resident_memory_bytes");
    let peak = value(&body, "prof_bpf_agent_resident_memory_peak_bytes");
    let statm_rss = std::fs::read_to_string("/proc/self/statm")
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        * page_size();
    assert!(
        (rss - statm_rss).abs() < statm_rss * 0.25,
        "rss {rss} vs statm {statm_rss}"
    );
    assert!(peak >= rss, "peak {peak} < rss {rss}");

    let (status, _, _) = get(addr, "GET / HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = get(addr, "POST /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    drop(server);
    drop(sinks);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn proc_parsers() {
    // A command name with spaces and a parenthesis.
    let stat = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 4 0 55 1000 300";
    assert_eq!(cpu_ticks(stat), Some(287));
    assert_eq!(cpu_ticks("garbage"), None);
    let status = "Name:\tprof-bpf\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
    assert_eq!(status_kib(status, "VmRSS"), Some(10240));
    assert_eq!(status_kib(status, "VmHWM"), Some(20480));
    assert_eq!(status_kib(status, "VmSwap"), None);
}

#[test]
fn bind_errors_name_the_flag() {
    let err = MetricsServer::start("256.0.0.1:1", Arc::new(Readings::default))
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.starts_with("--metrics 256.0.0.1:1: cannot listen"),
        "{err}"
    );
    assert!(!err.contains('\n'));
}

#[test]
fn dropping_the_server_closes_its_port() {
    let server = MetricsServer::start("127.0.0.1:0", Arc::new(Readings::default)).unwrap();
    let addr = server.local_addr();
    assert_eq!(get(addr, "GET /metrics HTTP/1.1").0, "HTTP/1.1 200 OK");
    drop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_ok() {
        assert!(std::time::Instant::now() < deadline, "{addr} still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn page_size() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as f64 }
}
