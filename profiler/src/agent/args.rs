//! `prof-bpf agent`'s options, and [`settings`]: the one place where they
//! become the agent's plain [`Settings`] (a config file merges in there).
use std::{path::PathBuf, time::Duration};

use anyhow::bail;

use super::{
    config::CommandLine,
    labels::ServiceNameRule,
    scope::{Rule, Scope},
};
use crate::{
    heap::sampling,
    runtime,
    sinks::{
        self, Delivery, DirectoryTarget, OtlpProtocol, OtlpTarget, ParcaTarget, PyroscopeTarget,
        SinkTarget,
    },
};

/// CPU samples per second on each CPU unless -F says otherwise (as the
/// Parca agent and Grafana Alloy).
pub const DEFAULT_FREQUENCY: u64 = 19;
/// Length of an interval unless --interval says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// Mean bytes between samples of the malloc uprobes (`--sample-bytes`).
pub const DEFAULT_SAMPLE_BYTES: u64 = sampling::DEFAULT_SAMPLE_BYTES;
/// Malloc and free calls per second above which a process's uprobes are
/// detached (`--max-uprobe-rate`).
pub const DEFAULT_MAX_UPROBE_RATE: u64 = 200_000;

/// Options of `prof-bpf agent`.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(after_help = "\
HEAP:
  Every process that samples its own heap (libprofalloc.so, or any allocator
  with the otel_memory:alloc/free USDT probes) is heap-profiled, new ones
  included: only sampled allocations trap. Processes named with --pid or
  --include that do not sample in-process get malloc uprobes instead, which
  cost every malloc and free call (about 1.5 us each); a process calling
  them more than --max-uprobe-rate times per second is detached.

EXAMPLES:
  sudo prof-bpf agent --pyroscope http://pyroscope:4040
  sudo prof-bpf agent --otlp http://collector:4318 --label env=prod
  sudo prof-bpf agent --otlp collector:4317 --otlp-protocol grpc --no-heap
  sudo prof-bpf agent --pid 1234 --dir /var/lib/prof-bpf --duration 60")]
pub struct AgentArgs {
    /// Profile only these processes (repeatable); those that do not sample
    /// their heap in-process get malloc uprobes.
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pub pids: Vec<u32>,
    /// Profile only processes whose executable (file name or path) or cgroup
    /// path contains TEXT (repeatable; `exe:TEXT` or `cgroup:TEXT` to say
    /// which); those that do not sample their heap in-process get malloc uprobes.
    #[arg(long = "include", value_name = "TEXT")]
    pub include: Vec<String>,
    /// Leave out processes whose executable or cgroup matches (as --include).
    #[arg(long = "exclude", value_name = "TEXT")]
    pub exclude: Vec<String>,
    /// No heap profiles.
    #[arg(long)]
    pub no_heap: bool,
    /// No CPU profiles.
    #[arg(long)]
    pub no_cpu: bool,
    /// CPU samples per second on each CPU [default: 19].
    #[arg(short = 'F', long = "frequency", value_name = "HZ",
          value_parser = runtime::args::frequency)]
    pub frequency: Option<u64>,
    /// Mean bytes between samples of the malloc uprobes [default: 524288].
    #[arg(long, value_name = "BYTES")]
    pub sample_bytes: Option<u64>,
    /// Malloc and free calls per second of one process above which its
    /// uprobes are detached [default: 200000].
    #[arg(long, value_name = "CALLS")]
    pub max_uprobe_rate: Option<u64>,
    /// Seconds per profile [default: 15].
    #[arg(long, value_name = "SECS", value_parser = runtime::args::interval)]
    pub interval: Option<Duration>,
    /// Stop after this many seconds [default: until SIGTERM or Ctrl-C].
    #[arg(long, short = 'd', value_name = "SECS", value_parser = runtime::args::seconds)]
    pub duration: Option<Duration>,
    /// A label for every profile (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = sinks::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Push to Grafana Pyroscope at this URL (repeatable).
    #[arg(long = "pyroscope", value_name = "URL")]
    pub pyroscope: Vec<String>,
    /// Pyroscope basic auth.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub pyroscope_basic_auth: Option<String>,
    /// Pyroscope bearer token.
    #[arg(long, value_name = "TOKEN")]
    pub pyroscope_token: Option<String>,
    /// Pyroscope tenant (X-Scope-OrgID header).
    #[arg(long, value_name = "TENANT")]
    pub pyroscope_tenant: Option<String>,
    /// Export OTLP profiles to this endpoint (repeatable; `env` takes
    /// OTEL_EXPORTER_OTLP_[PROFILES_]ENDPOINT).
    #[arg(long = "otlp", value_name = "URL")]
    pub otlp: Vec<String>,
    /// How OTLP is carried [default: http].
    #[arg(long, value_enum)]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Write to a Parca server (`HOST:PORT`, or a URL; repeatable).
    #[arg(long = "parca", value_name = "HOST:PORT")]
    pub parca: Vec<String>,
    /// Parca bearer token.
    #[arg(long, value_name = "TOKEN")]
    pub parca_token: Option<String>,
    /// Write one pprof file per profile into this directory (repeatable).
    #[arg(long = "dir", value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Size cap of each --dir; the oldest files go first [default: 1 GiB].
    #[arg(long, value_name = "BYTES")]
    pub dir_max_bytes: Option<u64>,
    /// Trust these PEM CA certificates instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Bytes of profiles queued per sink before the oldest are dropped [default: 64 MiB].
    #[arg(long, value_name = "BYTES")]
    pub queue_bytes: Option<u64>,
    /// Name the processes matching REGEX (in their executable path, command
    /// line or cgroup path) NAME; `$1` refers to a group (repeatable, the
    /// first match wins) [default: OTEL_SERVICE_NAME, else the systemd unit
    /// or container, else the executable's name].
    #[arg(long = "service-name-rule", value_name = "REGEX=NAME")]
    pub service_name_rules: Vec<ServiceNameRule>,
    /// Read options from this TOML file (keys are the long flag names;
    /// flags given here override them); SIGHUP reads it again.
    #[arg(long = super::config::CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve the agent's own counters in Prometheus text format at
    /// http://ADDR/metrics (`HOST:PORT`, or `:PORT` for every interface).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub unwind: crate::unwind::UnwindArgs,
}

/// What the agent does, in plain types.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scope: Scope,
    pub heap: bool,
    pub cpu: bool,
    pub frequency: u64,
    pub sample_bytes: u64,
    pub max_uprobe_rate: u64,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub labels: Vec<(String, String)>,
    pub sinks: Vec<SinkTarget>,
    pub delivery: Delivery,
    pub service_name_rules: Vec<ServiceNameRule>,
    pub metrics: Option<String>,
    /// `--unwind-memory` and the unwind table cache (fixed at start).
    pub unwind: crate::unwind::UnwindOptions,
    /// The command line whose `--config` file SIGHUP reads again (None
    /// without a file).
    pub reload_from: Option<CommandLine>,
}

/// Checks the options and their combinations. Every source of options (the
/// command line; a config file merged into `args` beforehand) ends here.
pub fn settings(args: &AgentArgs) -> anyhow::Result<Settings> {
    if args.no_heap && args.no_cpu {
        bail!("--no-heap and --no-cpu leave nothing to profile: drop one");
    }
    let sample_bytes = args.sample_bytes.unwrap_or(DEFAULT_SAMPLE_BYTES);
    if sample_bytes == 0 || sample_bytes > sampling::MAX_SAMPLE_BYTES {
        bail!(
            "--sample-bytes must be between 1 and {}, got {sample_bytes}",
            sampling::MAX_SAMPLE_BYTES
        );
    }
    // An interval longer than --duration is fine: the partial one is sent.
    let interval = args.interval.unwrap_or(DEFAULT_INTERVAL);
    let mut rules = Vec::new();
    for text in &args.include {
        rules.push((true, Rule::parse(text)?));
    }
    for text in &args.exclude {
        rules.push((false, Rule::parse(text)?));
    }
    let sinks = sink_targets(args)?;
    if sinks.is_empty() {
        bail!("no sink: give --pyroscope URL, --otlp URL, --parca HOST:PORT or --dir DIR");
    }
    let mut delivery = Delivery {
        ca_file: args.ca.clone(),
        ..Delivery::default()
    };
    if let Some(bytes) = args.queue_bytes {
        delivery.queue_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    Ok(Settings {
        scope: Scope::new(args.pids.clone(), rules),
        heap: !args.no_heap,
        cpu: !args.no_cpu,
        frequency: args.frequency.unwrap_or(DEFAULT_FREQUENCY),
        sample_bytes,
        max_uprobe_rate: args.max_uprobe_rate.unwrap_or(DEFAULT_MAX_UPROBE_RATE),
        interval,
        duration: args.duration,
        labels: args.labels.clone(),
        sinks,
        delivery,
        service_name_rules: args.service_name_rules.clone(),
        metrics: args.metrics.clone(),
        reload_from: None,
        unwind: args.unwind.options(),
    })
}

/// The sink flags as sink targets, in the order given per kind.
fn sink_targets(args: &AgentArgs) -> anyhow::Result<Vec<SinkTarget>> {
    let mut targets = Vec::new();
    let basic_auth = match &args.pyroscope_basic_auth {
        Some(pair) => match pair.split_once(':') {
            Some((user, password)) => Some((user.to_owned(), password.to_owned())),
            None => bail!("--pyroscope-basic-auth wants USER:PASSWORD"),
        },
        None => None,
    };
    for url in &args.pyroscope {
        targets.push(SinkTarget::Pyroscope(PyroscopeTarget {
            basic_auth: basic_auth.clone(),
            bearer_token: args.pyroscope_token.clone(),
            tenant_id: args.pyroscope_tenant.clone(),
            ..PyroscopeTarget::new(with_scheme(url))
        }));
    }
    for url in &args.otlp {
        targets.push(SinkTarget::Otlp(OtlpTarget {
            endpoint: (url != "env").then(|| with_scheme(url)),
            protocol: args.otlp_protocol.unwrap_or_default(),
            headers: Vec::new(),
        }));
    }
    for address in &args.parca {
        targets.push(SinkTarget::Parca(ParcaTarget {
            bearer_token: args.parca_token.clone(),
            ..ParcaTarget::new(with_scheme(address))
        }));
    }
    for dir in &args.dirs {
        let mut target = DirectoryTarget::new(dir);
        if let Some(max) = args.dir_max_bytes {
            target.max_bytes = max;
        }
        targets.push(SinkTarget::Directory(target));
    }
    Ok(targets)
}

/// `host:port` as `http://host:port`; a URL stays as it is.
fn with_scheme(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<Settings> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))?;
        settings(&cli.agent)
    }

    #[test]
    fn defaults_follow_the_fleet_agents() {
        let s = parse(&["--dir", "/tmp/x"]).unwrap();
        assert_eq!(s.frequency, 19);
        assert_eq!(s.interval, Duration::from_secs(15));
        assert!(s.heap && s.cpu);
        assert!(s.scope.whole_host());
        assert_eq!(s.delivery.queue_bytes, 64 << 20);
    }

    #[test]
    fn every_sink_flag_becomes_a_target() {
        let s = parse(&[
            "--pyroscope",
            "http://p:4040",
            "--pyroscope-basic-auth",
            "u:pw",
            "--otlp",
            "c:4317",
            "--otlp-protocol",
            "grpc",
            "--parca",
            "parca:7070",
            "--dir",
            "/tmp/d",
        ])
        .unwrap();
        let kinds: Vec<String> = s.sinks.iter().map(|t| format!("{t:?}")).collect();
        assert_eq!(kinds.len(), 4);
        match &s.sinks[0] {
            SinkTarget::Pyroscope(p) => {
                assert_eq!(p.url, "http://p:4040");
                assert_eq!(p.basic_auth, Some(("u".into(), "pw".into())));
            }
            other => panic!("{other:?}"),
        }
        match &s.sinks[1] {
            SinkTarget::Otlp(o) => {
                assert_eq!(o.endpoint.as_deref(), Some("http://c:4317"));
                assert_eq!(o.protocol, OtlpProtocol::Grpc);
            }
            other => panic!("{other:?}"),
        }
        match &s.sinks[2] {
            SinkTarget::Parca(p) => assert_eq!(p.url, "http://parca:7070"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_combinations_are_one_line_errors() {
        for (args, needle) in [
            (
                &["--no-heap", "--no-cpu", "--dir", "d"][..],
                "nothing to profile",
            ),
            (&[][..], "no sink"),
            (&["--dir", "d", "--sample-bytes", "0"], "--sample-bytes"),
            (&["--dir", "d", "--include", "foo:bar"], "exe:"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(parse(&["--dir", "d", "--label", "__x=1"]).is_err());
    }
}
