//! `prof-bpf agent` as a service: `--config FILE` under the command line,
//! SIGHUP re-reading it (a changed file takes effect; a broken one is logged
//! and the agent goes on), `--metrics` over HTTP, and the service names it
//! gives real processes (seen in the directory sink's file names,
//! `STAMP-SERVICE-PID-KIND.pb.gz`).
#[path = "agent_support/cgroup.rs"]
mod cgroup;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use prof_bpf_tests::{
    Proc, assert_one_line_error, build_workload, prof_bpf, require_bpf, run_prof_bpf,
};

/// A scratch directory of this test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "prof-bpf-agent-service-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workload renaming its main thread to `comm` and spinning (CPU
/// profiles need samples), with extra environment.
fn spinner(comm: &str, env: &[(&str, &str)]) -> Proc {
    let program = build_workload("renamed_main", &[]);
    let mut cmd = Command::new(program);
    cmd.args([comm, "spin"])
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(&mut cmd);
    proc.expect_line("ready");
    proc
}

/// The agent, its stderr in a file the test reads as it grows.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(args: &[&str], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(prof_bpf())
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start prof-bpf agent");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a stderr line containing `needle`, and returns it.
    fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}) before `{needle}`:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then the exit code.
    fn stop(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The (service, kind) of each profile file of `pid` in `dir`.
fn profiles_of(dir: &Path, pid: u32) -> Vec<(String, String)> {
    let suffix = |kind: &str| format!("-{pid}-{kind}.pb.gz");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        for kind in ["cpu", "heap"] {
            // STAMP is YYYYMMDDTHHMMSS.mmmZ: the service follows its dash.
            if let Some(rest) = name.strip_suffix(&suffix(kind))
                && let Some((_, service)) = rest.split_once('-')
            {
                found.push((service.to_owned(), kind.to_owned()));
            }
        }
    }
    found
}

/// Waits until `dir` holds a CPU profile of `pid` named `service`.
fn wait_profile(agent: &Agent, dir: &Path, pid: u32, service: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !profiles_of(dir, pid)
        .iter()
        .any(|(s, k)| s == service && k == "cpu")
    {
        assert!(
            Instant::now() < deadline,
            "no cpu profile of {pid} as `{service}` in {}: {:?}\n{}",
            dir.display(),
            profiles_of(dir, pid),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sighup_rereads_the_config_file() {
    require_bpf!();
    let scratch = Scratch::new("sighup");
    let out = scratch.0.join("profiles");
    let config = scratch.0.join("agent.toml");
    let proc = spinner("sighup-main", &[]);
    let pid = proc.pid();
    let base = format!(
        "no-heap = true\npid = [{pid}]\ninterval = 1\ndir = [\"{}\"]\n",
        out.display()
    );
    std::fs::write(&config, &base).unwrap();
    let mut agent = Agent::start(
        &["--config", config.to_str().unwrap()],
        scratch.0.join("agent.log"),
    );
    wait_profile(&agent, &out, pid, "renamed_main");

    // A changed file takes effect.
    std::fs::write(
        &config,
        format!("{base}service-name-rule = [\"renamed_(main)=after.$1\"]\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_log("SIGHUP: new labels, scope and sinks in effect");
    wait_profile(&agent, &out, pid, "after.main");

    // A broken file is one logged line; the agent keeps its settings.
    std::fs::write(&config, format!("{base}frequency = \"fast\"\n")).unwrap();
    agent.signal(libc::SIGHUP);
    let line = agent.wait_log("SIGHUP: settings unchanged");
    assert!(
        line.contains(&config.display().to_string()) && line.contains("--frequency"),
        "{line}"
    );
    let before = std::fs::read_dir(&out).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&out).unwrap().count() <= before + 1 {
        assert!(
            Instant::now() < deadline,
            "no profiles after a bad SIGHUP:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.stop(), 0);
    drop(proc);
}

#[test]
fn command_line_overrides_the_config_file() {
    require_bpf!();
    let scratch = Scratch::new("override");
    let (file_dir, cli_dir) = (scratch.0.join("from-file"), scratch.0.join("from-cli"));
    let config = scratch.0.join("agent.toml");
    let proc = spinner("override-main", &[]);
    let pid = proc.pid().to_string();
    std::fs::write(
        &config,
        format!(
            "no-heap = true\npid = [1]\ninterval = 1\nduration = 600\ndir = [\"{}\"]\nservice-name-rule = [\"renamed=from.file\"]\n",
            file_dir.display()
        ),
    )
    .unwrap();
    // --pid and --dir replace the file's lists; --duration its value.
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--pid",
        &pid,
        "--dir",
        cli_dir.to_str().unwrap(),
        "--duration",
        "3",
    ];
    let agent = Agent::start(&args, scratch.0.join("agent.log"));
    let mut agent = agent;
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "--duration 3 did not end the run:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 0, "{}", agent.log());
    assert!(
        !file_dir.exists(),
        "the file's --dir was used:\n{}",
        agent.log()
    );
    let found = profiles_of(&cli_dir, proc.pid());
    assert!(
        found.iter().any(|(s, k)| s == "from.file" && k == "cpu"),
        "{found:?}"
    );
}

#[test]
fn config_errors_are_one_line() {
    let scratch = Scratch::new("errors");
    let config = scratch.0.join("agent.toml");
    for (text, needle) in [
        ("interval = 15\nsink = [\"x\"]\n", "unknown key `sink`"),
        ("no-heap = 1\n", "key `no-heap`: must be a boolean"),
        (
            "pyroscope = \"http://p:4040\"\n",
            "key `pyroscope`: must be a list",
        ),
        ("interval = 0\n", "--interval"),
    ] {
        std::fs::write(&config, text).unwrap();
        let (_, stderr, code) = run_prof_bpf(&["agent", "--config", config.to_str().unwrap()]);
        assert_one_line_error(&stderr, code, needle);
        assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    }
}

/// The value of one series line of a Prometheus exposition.
fn series(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{series}` in:\n{body}"))
        .parse()
        .unwrap()
}

/// One GET over a plain socket: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[test]
fn metrics_endpoint_of_a_running_agent() {
    require_bpf!();
    let scratch = Scratch::new("metrics");
    let out = scratch.0.join("profiles");
    let proc = spinner("metrics-main", &[]);
    let pid = proc.pid().to_string();
    let args = [
        "--no-heap",
        "--pid",
        &pid,
        "--interval",
        "1",
        "--dir",
        out.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut agent = Agent::start(&args, scratch.0.join("agent.log"));
    let line = agent.wait_log("metrics at http://");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    wait_profile(&agent, &out, proc.pid(), "renamed_main");
    // The counters are refreshed every second: the file just seen is
    // counted within one.
    let sent_series = format!(
        "prof_bpf_sink_sent_total{{sink=\"directory {}\"}}",
        out.display()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if series(&body, &sent_series) >= 1.0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "nothing counted as sent:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let value = |name: &str| series(&body, name);
    // Present (the values depend on the load).
    value("prof_bpf_collector_lost_events_total{collector=\"cpu\"}");
    value("prof_bpf_collector_truncated_stacks_total{collector=\"unwinder\"}");
    assert!(value("process_cpu_seconds_total") > 0.0);
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e10, "{rss}");
    assert_eq!(http_get(&addr, "/").0, "HTTP/1.1 404 Not Found");
    assert_eq!(agent.stop(), 0);
    drop(proc);
}

/// The service names the agent gives real processes: a renamed main thread
/// keeps its executable's name; OTEL_SERVICE_NAME wins; a process in a
/// unit's cgroup, v2 or v1 `name=systemd`, is named after the unit.
#[test]
fn service_names_of_real_processes() {
    require_bpf!();
    let scratch = Scratch::new("names");
    let out = scratch.0.join("profiles");
    let v2 = cgroup::Cgroup::demo_service(&cgroup::cgroup2_mount(), None);
    let v1 = cgroup::systemd_v1_demo_service();
    let renamed = spinner("not-its-name", &[]);
    let otel = spinner("worker", &[("OTEL_SERVICE_NAME", "checkout.api")]);
    let in_v2 = spinner("v2-main", &[]);
    v2.enter(in_v2.pid());
    let in_v1 = spinner("v1-main", &[]);
    cgroup::move_to(&cgroup::cgroup2_mount(), in_v1.pid());
    v1.enter(in_v1.pid());
    let pids: Vec<String> = [&renamed, &otel, &in_v2, &in_v1]
        .iter()
        .map(|p| p.pid().to_string())
        .collect();
    let mut args = vec![
        "--no-heap",
        "--interval",
        "1",
        "--dir",
        out.to_str().unwrap(),
    ];
    for pid in &pids {
        args.extend(["--pid", pid.as_str()]);
    }
    let agent = Agent::start(&args, scratch.0.join("agent.log"));
    for (proc, service) in [
        (&renamed, "renamed_main"),
        (&otel, "checkout.api"),
        (&in_v2, "demo"),
        (&in_v1, "demo"),
    ] {
        wait_profile(&agent, &out, proc.pid(), service);
    }
    assert_eq!(agent.stop(), 0);
    // Every profile of each process carries the one name.
    for (proc, service) in [(&renamed, "renamed_main"), (&otel, "checkout.api")] {
        let found = profiles_of(&out, proc.pid());
        assert!(found.iter().all(|(s, _)| s == service), "{found:?}");
    }
    drop((renamed, otel, in_v2, in_v1));
}
