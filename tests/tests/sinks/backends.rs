//! What each backend receives, every sink at once, and over TLS.
use super::*;

/// The facts of one pprof profile the sinks shipped for `kind`.
fn check_pprof(bytes: &[u8], kind: ProfileKind, start: u64, scratch: &std::path::Path) {
    let p = check::pprof(bytes);
    let (types, first, second) = match kind {
        ProfileKind::Cpu => (["samples", "cpu"], vec![3, 30_000_000], vec![1, 10_000_000]),
        ProfileKind::Heap => (
            ["alloc_space", "inuse_space"],
            vec![4096, 0],
            vec![1024, 1024],
        ),
    };
    assert_eq!(p.sample_types, types);
    assert_eq!(p.time_nanos, start as i64 * 1_000_000_000);
    assert_eq!(p.duration_nanos, 15_000_000_000);
    let pid = ("pid".to_owned(), i64::from(PID));
    let want = [
        (
            "work;main",
            first,
            vec![pid.clone(), ("tid".to_owned(), 4243)],
        ),
        // Kernel frames are named plainly in pprof; their mapping,
        // `[kernel.kallsyms]`, says where they are.
        ("do_syscall_64;work;main", second, vec![pid]),
    ];
    assert_eq!(p.samples.len(), 2);
    for (sample, (stack, values, num_labels)) in p.samples.iter().zip(want) {
        assert_eq!(sample.stack, stack);
        assert_eq!(sample.values, values);
        // The pid is a number, and no string label is sent (one profile is
        // one process; comm and thread names would only make series).
        assert_eq!(sample.num_labels, num_labels);
        assert_eq!(sample.str_labels, []);
    }
    let raw = check::go_pprof_raw(bytes, scratch);
    assert!(
        raw.contains("pid:[4242]") && raw.contains("/usr/bin/app"),
        "{raw}"
    );
    assert!(!raw.contains("comm"), "{raw}");
}

/// Series labels from a list of (name, value) messages.
fn labels(pairs: &[Message]) -> Vec<(String, String)> {
    pairs.iter().map(|l| (l.string(1), l.string(2))).collect()
}

fn series_labels(name: &str) -> Vec<(String, String)> {
    [
        ("__name__", name),
        ("service_name", "checkout"),
        ("hostname", "host-a"),
        ("executable", "/usr/bin/app"),
        ("container_id", "c0ffee"),
        ("env", "test"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// The gRPC message of a request: one uncompressed length-prefixed frame.
fn grpc_message(request: &receiver::Recorded) -> &[u8] {
    assert_eq!(request.version, hyper::Version::HTTP_2);
    assert_eq!(request.headers["content-type"], "application/grpc");
    assert_eq!(request.headers["te"], "trailers");
    let body = &request.body[..];
    assert_eq!(body[0], 0, "compressed flag");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    assert_eq!(len, body.len() - 5, "one frame");
    &body[5..]
}

const KINDS: [(ProfileKind, &str); 2] = [
    (ProfileKind::Cpu, "process_cpu"),
    (ProfileKind::Heap, "memory"),
];

fn otlp_expected(kind: ProfileKind) -> String {
    let when = format!("at {} for 15000000000", T0 * 1_000_000_000);
    let profiles = match kind {
        ProfileKind::Cpu => format!(
            "profile samples/count {when}\n  work;main 3\n  do_syscall_64;work;main 1\n\
             profile cpu/nanoseconds {when}\n  work;main 30000000\n  do_syscall_64;work;main 10000000\n"
        ),
        // The zero in-use value of the first stack is left out.
        ProfileKind::Heap => format!(
            "profile alloc_space/bytes {when}\n  work;main 4096\n  do_syscall_64;work;main 1024\n\
             profile inuse_space/bytes {when}\n  do_syscall_64;work;main 1024\n"
        ),
    };
    format!(
        "zero entries first: True\n\
         resource container.id=c0ffee\nresource env=test\nresource host.name=host-a\n\
         resource process.executable.path=/usr/bin/app\nresource process.pid=4242\n\
         resource service.name=checkout\nscope prof-bpf\n{profiles}"
    )
}

/// Pyroscope: Connect unary over HTTP/1.1, credentials, one series per
/// profile. Returns the pprof bytes, CPU then heap.
fn check_pyroscope(pyroscope: &Receiver, dir: &std::path::Path) -> Vec<Vec<u8>> {
    let requests = pyroscope.requests();
    assert_eq!(requests.len(), 2);
    let mut pprofs = Vec::new();
    for (request, (kind, name)) in requests.iter().zip(KINDS) {
        assert_eq!(request.path, "/push.v1.PusherService/Push");
        assert_eq!(request.headers["content-type"], "application/proto");
        // base64("user:secret")
        assert_eq!(request.headers["authorization"], "Basic dXNlcjpzZWNyZXQ=");
        assert_eq!(request.headers["x-scope-orgid"], "team-a");
        let push = Message::decode(&request.body);
        let series = push.messages(1);
        assert_eq!(series.len(), 1);
        assert_eq!(labels(&series[0].messages(1)), series_labels(name));
        let samples = series[0].messages(2);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].string(2).len(), 36, "a UUID as the profile's ID");
        let pprof = samples[0].bytes(1);
        check_pprof(&pprof, kind, T0, &dir.join(kind.name()));
        pprofs.push(pprof);
    }
    pprofs
}

/// Parca: gRPC WriteRaw with the same pprof bytes and labels.
fn check_parca(parca: &Receiver, pprofs: &[Vec<u8>]) {
    let requests = parca.requests();
    assert_eq!(requests.len(), 2);
    for ((request, (_, name)), pprof) in requests.iter().zip(KINDS).zip(pprofs) {
        assert_eq!(
            request.path,
            "/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw"
        );
        assert_eq!(request.headers["authorization"], "Bearer tok");
        let write = Message::decode(grpc_message(request));
        assert_eq!(
            write.varint(3),
            0,
            "normalized: addresses are as the process saw them"
        );
        let series = write.messages(2);
        assert_eq!(series.len(), 1);
        let mut want = series_labels(name);
        want.push(("pid".to_owned(), PID.to_string()));
        assert_eq!(labels(&series[0].message(1).messages(1)), want);
        assert_eq!(&series[0].messages(2)[0].bytes(1), pprof);
    }
}

/// OTLP over HTTP and gRPC, decoded by opentelemetry-proto.
fn check_otlp(otlp_http: &Receiver, otlp_grpc: &Receiver, dir: &std::path::Path) {
    let http = otlp_http.requests();
    let grpc = otlp_grpc.requests();
    assert_eq!((http.len(), grpc.len()), (2, 2));
    for ((h, g), (kind, _)) in http.iter().zip(&grpc).zip(KINDS) {
        assert_eq!(h.path, "/v1development/profiles");
        assert_eq!(h.headers["content-type"], "application/x-protobuf");
        assert_eq!(h.headers["x-api-key"], "k1");
        assert_eq!(
            g.path,
            "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
        );
        let want = otlp_expected(kind);
        assert_eq!(check::otlp_summary(&h.body, &dir.join("http")), want);
        assert_eq!(
            check::otlp_summary(grpc_message(g), &dir.join("grpc")),
            want
        );
    }
}

/// The directory: one file per profile, named by interval, pid and kind.
fn check_directory(files: &std::path::Path, pprofs: &[Vec<u8>]) {
    let mut names: Vec<String> = std::fs::read_dir(files)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "20270115T080000.000Z-checkout-4242-cpu.pb.gz",
            "20270115T080000.000Z-checkout-4242-heap.pb.gz"
        ]
    );
    for (name, pprof) in names.iter().zip(pprofs) {
        assert_eq!(&std::fs::read(files.join(name)).unwrap(), pprof);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_at_once_delivers_what_each_backend_expects() {
    capture_logs();
    let dir = scratch("all");
    let pyroscope = Receiver::http();
    let otlp_http = Receiver::http();
    let otlp_grpc = Receiver::grpc();
    let parca = Receiver::grpc();
    let files = dir.join("profiles");
    let sinks = Sinks::start(
        vec![
            SinkTarget::Pyroscope(PyroscopeTarget {
                url: pyroscope.url(),
                basic_auth: Some(("user".into(), "secret".into())),
                bearer_token: None,
                tenant_id: Some("team-a".into()),
            }),
            SinkTarget::Otlp(OtlpTarget {
                endpoint: Some(otlp_http.url()),
                protocol: OtlpProtocol::Http,
                headers: vec![("x-api-key".into(), "k1".into())],
            }),
            SinkTarget::Otlp(OtlpTarget {
                endpoint: Some(otlp_grpc.url()),
                protocol: OtlpProtocol::Grpc,
                headers: vec![],
            }),
            SinkTarget::Parca(ParcaTarget {
                url: parca.url(),
                bearer_token: Some("tok".into()),
            }),
            SinkTarget::Directory(DirectoryTarget::new(&files)),
        ],
        &fast(),
    )
    .unwrap();
    for (kind, _) in KINDS {
        sinks.send(message(kind, T0));
    }
    assert!(
        sinks.flush(Duration::from_secs(20)).await,
        "{:?}",
        sinks.counters()
    );

    let pprofs = check_pyroscope(&pyroscope, &dir);
    check_parca(&parca, &pprofs);
    check_otlp(&otlp_http, &otlp_grpc, &dir);
    check_directory(&files, &pprofs);

    // Counters: two profiles each, bytes as the receivers got them (the
    // gRPC frame's 5-byte prefix is not part of the message).
    let body_bytes = |r: &Receiver, prefix: u64| -> u64 {
        r.requests()
            .iter()
            .map(|q| q.body.len() as u64 - prefix)
            .sum()
    };
    let file_bytes: u64 = pprofs.iter().map(|p| p.len() as u64).sum();
    let expected_bytes = [
        body_bytes(&pyroscope, 0),
        body_bytes(&otlp_http, 0),
        body_bytes(&otlp_grpc, 5),
        body_bytes(&parca, 5),
        file_bytes,
    ];
    for (counters, bytes) in counters_of(&sinks).into_iter().zip(expected_bytes) {
        let want = SinkCounters {
            sent: 2,
            bytes,
            ..SinkCounters::default()
        };
        assert_eq!(counters, want);
    }
    let metrics = sinks.metrics_text();
    let line = format!(
        "prof_bpf_sink_sent_total{{sink=\"parca {}\"}} 2",
        parca.url()
    );
    assert!(
        metrics.lines().any(|l| l == line),
        "no `{line}` in:\n{metrics}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CA and a certificate for 127.0.0.1 signed by it, made by openssl.
fn make_certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=prof-bpf test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_refused_without_it() {
    capture_logs();
    let dir = scratch("tls");
    let (ca, cert, key) = make_certificates(&dir);
    let tls = receiver::tls_config(&cert, &key);
    let https = Receiver::start(false, Some(tls.clone()), 0);
    let grpcs = Receiver::start(true, Some(tls), 0);
    let targets = || {
        vec![
            SinkTarget::Pyroscope(PyroscopeTarget::new(https.url())),
            SinkTarget::Parca(ParcaTarget::new(grpcs.url())),
        ]
    };
    assert!(https.url().starts_with("https://"));

    // The system's roots do not know the test CA: nothing is delivered, the
    // attempts are retried, the cause is logged.
    let untrusting = Sinks::start(targets(), &fast()).unwrap();
    untrusting.send(message(ProfileKind::Cpu, T0));
    wait_for(&untrusting, "a refused handshake", |c| c.retried >= 2).await;
    assert!(counters_of(&untrusting).iter().all(|c| c.sent == 0));
    assert_eq!(https.requests().len() + grpcs.requests().len(), 0);
    let name = &untrusting.counters()[0].0;
    assert!(
        !logged(&[name.as_str(), "certificate"]).is_empty(),
        "no certificate error logged for {name}"
    );
    drop(untrusting);

    let trusting = Sinks::start(
        targets(),
        &Delivery {
            ca_file: Some(ca),
            ..fast()
        },
    )
    .unwrap();
    trusting.send(message(ProfileKind::Cpu, T0));
    assert!(
        trusting.flush(Duration::from_secs(20)).await,
        "{:?}",
        trusting.counters()
    );
    for c in counters_of(&trusting) {
        assert_eq!((c.sent, c.failed, c.retried, c.dropped), (1, 0, 0, 0));
    }
    assert_eq!(https.requests().len(), 1);
    // gRPC over TLS negotiates HTTP/2 by ALPN.
    let _ = grpc_message(&grpcs.requests()[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}
