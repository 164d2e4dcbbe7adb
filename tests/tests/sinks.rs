//! The sinks against receivers in this process (127.0.0.1, ephemeral
//! ports): what each backend receives, checked by field numbers from the
//! published .proto files, `go tool pprof` and PyPI's opentelemetry-proto,
//! and what each sink counts when the backend is down, killed, busy,
//! refusing, silent, or behind TLS. No root needed.
#[path = "sinks/check.rs"]
mod check;
#[path = "sinks/receiver.rs"]
mod receiver;
#[path = "sinks/wire.rs"]
mod wire;

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use profiler::{
    profile::{Frame, Label, Location, LocationKind, Mapping, Profile, Sample, SampleType},
    sinks::{
        Delivery, DirectoryTarget, OtlpProtocol, OtlpTarget, ParcaTarget, ProfileKind,
        ProfileMessage, PyroscopeTarget, SinkCounters, SinkTarget, Sinks, Source,
    },
};
use receiver::{Receiver, Reply};
use wire::Message;

/// 2027-01-15T08:00:00Z: the start of the first interval.
const T0: u64 = 1_800_000_000;
const PID: u32 = 4242;

/// Short retries and timeouts so that faults play out in milliseconds.
fn fast() -> Delivery {
    Delivery {
        queue_bytes: 64 << 20,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(3),
        ca_file: None,
    }
}

fn source() -> Arc<Source> {
    Arc::new(Source {
        service_name: "checkout".into(),
        hostname: "host-a".into(),
        pid: PID,
        executable: "/usr/bin/app".into(),
        container_id: Some("c0ffee".into()),
        labels: vec![("env".into(), "test".into())],
    })
}

/// A profile of `kind` with two stacks whose values are known: CPU samples
/// 3 + 1 (30 + 10 ms), heap 4096 + 1024 bytes allocated, 1024 in use. The
/// samples carry string labels (`comm`, `thread_comm`) and a wrong pid, all
/// of which the sinks must replace.
fn profile(kind: ProfileKind) -> Profile {
    let (sample_types, values) = match kind {
        ProfileKind::Cpu => (
            [("samples", "count"), ("cpu", "nanoseconds")],
            [[3, 30_000_000], [1, 10_000_000]],
        ),
        ProfileKind::Heap => (
            [("alloc_space", "bytes"), ("inuse_space", "bytes")],
            [[4096, 0], [1024, 1024]],
        ),
    };
    let location = |mapping, address, kind, name: &str| Location {
        mapping,
        address,
        kind,
        frames: vec![Frame::named(name)],
    };
    Profile {
        sample_types: sample_types
            .iter()
            .map(|(k, u)| SampleType::new(*k, *u))
            .collect(),
        mappings: vec![Mapping {
            start: 0x40_0000,
            limit: 0x50_0000,
            file: "/usr/bin/app".into(),
            build_id: "0123abcd".into(),
            ..Mapping::default()
        }],
        locations: vec![
            location(Some(0), 0x40_1000, LocationKind::User, "main"),
            location(Some(0), 0x40_2000, LocationKind::User, "work"),
            location(
                None,
                0xffff_ffff_8100_0000,
                LocationKind::Kernel,
                "do_syscall_64",
            ),
        ],
        samples: vec![
            Sample {
                locations: vec![1, 0],
                values: values[0].to_vec(),
                labels: vec![
                    Label::str("comm", "app"),
                    Label::num("pid", 1, ""),
                    Label::num("tid", 4243, ""),
                ],
            },
            Sample {
                locations: vec![2, 1, 0],
                values: values[1].to_vec(),
                labels: vec![Label::str("thread_comm", "worker")],
            },
        ],
        ..Profile::default()
    }
}

fn message(kind: ProfileKind, start: u64) -> ProfileMessage {
    ProfileMessage {
        kind,
        profile: profile(kind),
        source: source(),
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(start),
        duration: Duration::from_secs(15),
    }
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-sinks-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counters_of(sinks: &Sinks) -> Vec<SinkCounters> {
    sinks.counters().into_iter().map(|(_, c)| c).collect()
}

/// Waits (at most 10 s) until `done` holds for the first sink's counters.
async fn wait_for(sinks: &Sinks, what: &str, done: impl Fn(&SinkCounters) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&counters_of(sinks)[0]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            counters_of(sinks)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines of the sinks, kept to check what is logged (and how often).
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = format!("{} {}", record.level(), record.args());
            eprintln!("{line}");
            LOGS.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

/// Starts capturing log lines (once per test binary).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// The captured log lines that contain every one of `needles`.
fn logged(needles: &[&str]) -> Vec<String> {
    let logs = LOGS.lock().unwrap();
    logs.iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .cloned()
        .collect()
}

#[path = "sinks/backends.rs"]
mod backends;
#[path = "sinks/faults.rs"]
mod faults;
