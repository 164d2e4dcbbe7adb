//! What the sinks count when the backend misbehaves.
use super::*;

fn pyroscope(receiver_url: String) -> Vec<SinkTarget> {
    vec![SinkTarget::Pyroscope(PyroscopeTarget::new(receiver_url))]
}

/// The interval start (seconds) of each profile a Pyroscope receiver got.
fn starts(requests: &[receiver::Recorded]) -> Vec<u64> {
    requests
        .iter()
        .map(|r| {
            let push = Message::decode(&r.body);
            let pprof = push.messages(1)[0].messages(2)[0].bytes(1);
            check::pprof(&pprof).time_nanos as u64 / 1_000_000_000
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_down_at_start_get_everything_once_they_are_up() {
    capture_logs();
    // Two free ports, nothing listening yet.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let sinks = Sinks::start(
        vec![
            SinkTarget::Pyroscope(PyroscopeTarget::new(format!(
                "http://127.0.0.1:{}",
                ports[0]
            ))),
            SinkTarget::Parca(ParcaTarget::new(format!("http://127.0.0.1:{}", ports[1]))),
        ],
        &fast(),
    )
    .unwrap();
    sinks.send(message(ProfileKind::Cpu, T0));
    sinks.send(message(ProfileKind::Heap, T0));
    wait_for(&sinks, "connection attempts", |c| c.retried >= 2).await;
    let pyroscope = Receiver::start(false, None, ports[0]);
    let parca = Receiver::start(true, None, ports[1]);
    assert!(
        sinks.flush(Duration::from_secs(20)).await,
        "{:?}",
        sinks.counters()
    );
    for c in counters_of(&sinks) {
        assert_eq!((c.sent, c.failed, c.dropped, c.queued), (2, 0, 0, 0));
        assert!(c.retried >= 1, "{c:?}");
    }
    assert_eq!(starts(&pyroscope.requests()), [T0, T0]);
    assert_eq!(parca.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_run_loses_nothing_within_the_queue_bound() {
    capture_logs();
    // The size of one request body, to bound the queue at three and a half.
    let probe = Receiver::http();
    let sizing = Sinks::start(pyroscope(probe.url()), &fast()).unwrap();
    sizing.send(message(ProfileKind::Cpu, T0));
    assert!(sizing.flush(Duration::from_secs(10)).await);
    let size = probe.requests()[0].body.len();
    drop(sizing);

    let mut receiver = Receiver::http();
    let sinks = Sinks::start(
        pyroscope(receiver.url()),
        &Delivery {
            queue_bytes: size * 7 / 2,
            ..fast()
        },
    )
    .unwrap();
    sinks.send(message(ProfileKind::Cpu, T0));
    assert!(sinks.flush(Duration::from_secs(10)).await);

    receiver.kill().await;
    // The next interval fails on the cut connection and stays in flight...
    sinks.send(message(ProfileKind::Cpu, T0 + 15));
    wait_for(&sinks, "the first failed attempt", |c| c.retried >= 1).await;
    // ...while five more arrive: three fit, the two oldest are dropped.
    for i in 2..7 {
        sinks.send(message(ProfileKind::Cpu, T0 + 15 * i));
    }
    let c = counters_of(&sinks)[0];
    assert_eq!(
        (c.sent, c.dropped, c.queued, c.failed),
        (1, 2, 3, 0),
        "{c:?}"
    );
    assert!(c.queued_bytes <= (size * 7 / 2) as u64);

    receiver.restart();
    assert!(
        sinks.flush(Duration::from_secs(20)).await,
        "{:?}",
        sinks.counters()
    );
    let c = counters_of(&sinks)[0];
    assert_eq!(
        (c.sent, c.dropped, c.queued, c.failed),
        (5, 2, 0, 0),
        "{c:?}"
    );
    // Each late profile keeps its own interval.
    assert_eq!(
        starts(&receiver.requests()),
        [T0, T0 + 15, T0 + 60, T0 + 75, T0 + 90]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_until_the_200() {
    capture_logs();
    let receiver = Receiver::http();
    receiver.script(&[Reply::Status(503, "busy"), Reply::Status(503, "busy")]);
    let sinks = Sinks::start(pyroscope(receiver.url()), &fast()).unwrap();
    sinks.send(message(ProfileKind::Heap, T0));
    assert!(
        sinks.flush(Duration::from_secs(10)).await,
        "{:?}",
        sinks.counters()
    );
    let c = counters_of(&sinks)[0];
    assert_eq!(
        (c.sent, c.retried, c.failed, c.dropped),
        (1, 2, 0, 0),
        "{c:?}"
    );
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests.iter().all(|r| r.body == requests[0].body),
        "the same profile each time"
    );
    let name = &sinks.counters()[0].0;
    // A failure streak is logged when it starts, and when it ends.
    assert_eq!(logged(&[name.as_str(), "HTTP 503"]).len(), 1);
    assert_eq!(logged(&[name.as_str(), "delivering again"]).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_not_retried_and_logged_once() {
    capture_logs();
    let receiver = Receiver::http();
    receiver.script(&[Reply::Status(400, "invalid profile"); 3]);
    let sinks = Sinks::start(pyroscope(receiver.url()), &fast()).unwrap();
    for i in 0..3 {
        sinks.send(message(ProfileKind::Cpu, T0 + 15 * i));
    }
    assert!(
        sinks.flush(Duration::from_secs(10)).await,
        "{:?}",
        sinks.counters()
    );
    let c = counters_of(&sinks)[0];
    assert_eq!(
        (c.sent, c.failed, c.retried, c.dropped),
        (0, 3, 0, 0),
        "{c:?}"
    );
    assert_eq!(receiver.requests().len(), 3);
    let name = &sinks.counters()[0].0;
    let lines = logged(&[name.as_str(), "HTTP 400 Bad Request: invalid profile"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("not retried"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_times_out_and_is_retried() {
    capture_logs();
    let receiver = Receiver::http();
    receiver.script(&[Reply::Hang]);
    let timeout = Duration::from_millis(400);
    let sinks = Sinks::start(
        pyroscope(receiver.url()),
        &Delivery {
            request_timeout: timeout,
            ..fast()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    sinks.send(message(ProfileKind::Cpu, T0));
    assert!(
        sinks.flush(Duration::from_secs(10)).await,
        "{:?}",
        sinks.counters()
    );
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    let c = counters_of(&sinks)[0];
    assert_eq!(
        (c.sent, c.retried, c.failed, c.dropped),
        (1, 1, 0, 0),
        "{c:?}"
    );
    assert_eq!(receiver.requests().len(), 2);
    let name = &sinks.counters()[0].0;
    assert_eq!(logged(&[name.as_str(), "request timeout"]).len(), 1);
}
