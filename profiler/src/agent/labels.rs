//! The labels of a profiled process: its service name, executable and
//! container, read from `/proc/PID/{environ,cgroup,exe,comm}`.
//!
//! `service_name` is decided in this order (the first that gives a name):
//! 1. a `--service-name-rule REGEX=NAME` whose regex matches the process
//!    (see [`ServiceNameRule`]);
//! 2. the process's own `OTEL_SERVICE_NAME`, or `service.name` in its
//!    `OTEL_RESOURCE_ATTRIBUTES` (the OpenTelemetry SDKs' precedence), as
//!    found in `/proc/PID/environ` (the environment the program was started
//!    with; a later `setenv` is not seen);
//! 3. the innermost systemd service or container of its cgroup path (cgroup
//!    v2 `0::/...`, else the v1 `name=systemd` hierarchy): `demo.service` →
//!    `demo`; a container → its short id (12 hex digits, as `docker ps` shows
//!    it);
//! 4. the file name of its executable (`/proc/PID/exe`), not the thread name
//!    in `comm`, which a program may rename; `comm` only when there is no
//!    executable (kernel threads).
//!
//! Why `demo` and not `demo.service`: the unit type says how systemd runs the
//! program, not what it is, and the OpenTelemetry SDK of the same program
//! would call it `demo`. The Parca agent keeps the whole unit name in a
//! separate `systemd_unit` label; Grafana's agents take the service name from
//! their discovery (Kubernetes container, Docker container name) and send
//! `unspecified` otherwise.
//!
//! The parsers are pure functions over the text of those files; [`read`] is
//! the thin layer that reads them.
use std::{fmt, path::Path, str::FromStr};

use regex::Regex;

use crate::sinks::Source;

/// What is known of a process, as read from `/proc`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    /// `/proc/PID/exe`, without the kernel's ` (deleted)` suffix (empty for
    /// kernel threads).
    pub executable: String,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// `/proc/PID/cmdline`, arguments joined by spaces.
    pub cmdline: String,
    /// The process's `OTEL_SERVICE_NAME`, or `service.name` of its
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub otel_service_name: Option<String>,
    /// The cgroup path that names its unit (see [`unit_cgroup_path`]).
    pub cgroup_path: String,
    pub container_id: Option<String>,
}

/// Reads a process's facts. Files that cannot be read (the process exited,
/// a kernel thread has no `exe`) leave their field empty.
pub fn read(pid: u32) -> ProcessFacts {
    let proc = Path::new("/proc").join(pid.to_string());
    let text = |name: &str| std::fs::read(proc.join(name)).unwrap_or_default();
    let executable = std::fs::read_link(proc.join("exe"))
        .map(|p| executable_path(&p.to_string_lossy()))
        .unwrap_or_default();
    let cgroup = String::from_utf8_lossy(&text("cgroup")).into_owned();
    let lines = parse_cgroup(&cgroup);
    ProcessFacts {
        executable,
        comm: String::from_utf8_lossy(&text("comm")).trim_end().to_owned(),
        cmdline: nul_separated(&text("cmdline")).join(" "),
        otel_service_name: otel_service_name(&text("environ")),
        cgroup_path: unit_cgroup_path(&lines).unwrap_or_default().to_owned(),
        container_id: container_id(&lines),
    }
}

/// The [`Source`] of a process's profiles: its labels, this host's name and
/// the agent's `--label`s.
pub fn source(pid: u32, rules: &[ServiceNameRule], labels: &[(String, String)]) -> Source {
    let facts = read(pid);
    Source {
        service_name: service_name(&facts, rules),
        hostname: crate::sinks::hostname(),
        pid,
        executable: facts.executable,
        container_id: facts.container_id,
        labels: labels.to_vec(),
    }
}

/// The service name of a process (the order is in the module's doc).
pub fn service_name(facts: &ProcessFacts, rules: &[ServiceNameRule]) -> String {
    if let Some(name) = rules.iter().find_map(|r| r.apply(facts)) {
        return name;
    }
    if let Some(name) = &facts.otel_service_name {
        return name.clone();
    }
    if let Some(name) = cgroup_service(&facts.cgroup_path, facts.container_id.as_deref()) {
        return name;
    }
    match Path::new(&facts.executable).file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None if !facts.comm.is_empty() => facts.comm.clone(),
        None => "unknown".to_owned(),
    }
}

/// `--service-name-rule REGEX=NAME`: processes matching REGEX are named NAME.
/// REGEX is searched (not anchored) in the executable path, then the command
/// line, then the cgroup path; NAME may refer to its groups (`$1`, `${name}`).
/// The split is at the last `=`, so REGEX may contain `=`. Rules are tried in
/// the order given; the first that matches wins.
#[derive(Clone, Debug)]
pub struct ServiceNameRule {
    regex: Regex,
    name: String,
}

impl ServiceNameRule {
    /// The name this rule gives the process, if it matches.
    pub fn apply(&self, facts: &ProcessFacts) -> Option<String> {
        [&facts.executable, &facts.cmdline, &facts.cgroup_path]
            .into_iter()
            .find_map(|subject| {
                let caps = self.regex.captures(subject)?;
                let mut name = String::new();
                caps.expand(&self.name, &mut name);
                Some(name).filter(|n| !n.is_empty())
            })
    }
}

impl FromStr for ServiceNameRule {
    type Err = String;
    fn from_str(arg: &str) -> Result<Self, String> {
        let (regex, name) = arg
            .rsplit_once('=')
            .filter(|(r, n)| !r.is_empty() && !n.is_empty())
            .ok_or_else(|| format!("`{arg}` is not of the form REGEX=NAME"))?;
        let regex = Regex::new(regex).map_err(|e| {
            // regex's message spans lines (pattern, caret, error): keep the last.
            let e = e.to_string();
            let why = e.lines().last().unwrap_or("").trim_start_matches("error: ");
            format!("bad regex `{regex}`: {why}")
        })?;
        Ok(Self {
            regex,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceNameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.regex.as_str(), self.name)
    }
}

/// The kernel appends ` (deleted)` to the link of a replaced executable.
fn executable_path(link: &str) -> String {
    link.strip_suffix(" (deleted)").unwrap_or(link).to_owned()
}

fn nul_separated(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The service name a process gives itself in `/proc/PID/environ`:
/// `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`
/// (comma-separated `key=value`, values percent-encoded), as the
/// OpenTelemetry SDKs resolve it. Empty values count as unset.
pub fn otel_service_name(environ: &[u8]) -> Option<String> {
    let vars = nul_separated(environ);
    let var = |key: &str| {
        // getenv returns the first assignment of a name.
        vars.iter()
            .find_map(|v| v.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    if let Some(name) = var("OTEL_SERVICE_NAME") {
        return Some(name.to_owned());
    }
    var("OTEL_RESOURCE_ATTRIBUTES")?
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.trim() == "service.name")
        .map(|(_, v)| crate::sinks::otlp::percent_decode(v.trim()))
        .filter(|v| !v.is_empty())
}

/// One line of `/proc/PID/cgroup`: `ID:CONTROLLERS:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLine<'a> {
    pub hierarchy: &'a str,
    /// Comma-separated controllers (`name=systemd` for systemd's named v1
    /// hierarchy); empty for cgroup v2.
    pub controllers: &'a str,
    pub path: &'a str,
}

impl CgroupLine<'_> {
    fn is_v2(&self) -> bool {
        self.hierarchy == "0" && self.controllers.is_empty()
    }
    fn is_systemd_v1(&self) -> bool {
        self.controllers.split(',').any(|c| c == "name=systemd")
    }
}

pub fn parse_cgroup(text: &str) -> Vec<CgroupLine<'_>> {
    text.lines()
        .filter_map(|line| {
            let (hierarchy, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            Some(CgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// The cgroup path that names the process's unit: the v2 one, unless it is
/// the root (a hybrid host whose systemd runs the v1 `name=systemd`
/// hierarchy leaves the unified one empty), then the `name=systemd` one.
pub fn unit_cgroup_path<'a>(lines: &[CgroupLine<'a>]) -> Option<&'a str> {
    let v2 = lines.iter().find(|l| l.is_v2()).map(|l| l.path);
    let systemd = lines.iter().find(|l| l.is_systemd_v1()).map(|l| l.path);
    match (v2, systemd) {
        (Some(p), _) if p != "/" => Some(p),
        (_, Some(p)) => Some(p),
        (p, None) => p,
    }
}

/// The container id in any of the process's cgroup paths (the unit path
/// first, then every v1 controller's: without systemd, Docker's cgroupfs
/// driver puts `/docker/ID` in each).
pub fn container_id(lines: &[CgroupLine<'_>]) -> Option<String> {
    let first = unit_cgroup_path(lines);
    first
        .into_iter()
        .chain(lines.iter().map(|l| l.path))
        .find_map(|path| path.split('/').rev().find_map(container_of_component))
        .map(str::to_owned)
}

/// Runtimes' prefixes of a container's cgroup (systemd driver: `docker-ID.scope`,
/// `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`; Kubernetes'
/// containerd without systemd: `...:cri-containerd:ID`; cgroupfs driver: a
/// bare `ID` under `/docker`, `/kubepods/...` or `/libpod_parent`).
const CONTAINER_PREFIXES: &[&str] = &["docker-", "cri-containerd-", "crio-", "libpod-", ""];

/// The container id a cgroup path component names: 64 hex digits after a
/// runtime's prefix. Conmon's own cgroups (`crio-conmon-ID`,
/// `libpod-conmon-ID`) hold the monitor, not the container, and do not match.
fn container_of_component(component: &str) -> Option<&str> {
    let component = component.strip_suffix(".scope").unwrap_or(component);
    let component = component.rsplit(':').next().unwrap_or(component);
    CONTAINER_PREFIXES.iter().find_map(|prefix| {
        let id = component.strip_prefix(prefix)?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

/// The service named by a cgroup path: its innermost systemd service
/// (`demo.service` → `demo`, `getty@tty1.service` → `getty@tty1`) or
/// container (short id), whichever is deeper.
fn cgroup_service(path: &str, container_id: Option<&str>) -> Option<String> {
    path.split('/').rev().find_map(|component| {
        if let Some(unit) = component.strip_suffix(".service")
            && !unit.is_empty()
        {
            return Some(unit.to_owned());
        }
        container_of_component(component)
            .filter(|id| Some(*id) == container_id)
            .map(|id| id[..12].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f6b1a2c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";

    fn facts(cgroup: &str, exe: &str) -> ProcessFacts {
        let lines = parse_cgroup(cgroup);
        ProcessFacts {
            executable: exe.to_owned(),
            comm: "renamed".to_owned(),
            cmdline: format!("{exe} --serve"),
            otel_service_name: None,
            cgroup_path: unit_cgroup_path(&lines).unwrap_or_default().to_owned(),
            container_id: container_id(&lines),
        }
    }

    #[test]
    fn systemd_unit_in_cgroup_v2() {
        let f = facts("0::/system.slice/demo.service\n", "/usr/bin/demo-server");
        assert_eq!(f.cgroup_path, "/system.slice/demo.service");
        assert_eq!(service_name(&f, &[]), "demo");
        assert_eq!(f.container_id, None);
        // A templated unit keeps its instance; a user's own service is
        // deeper than its user manager.
        let f = facts(
            "0::/system.slice/system-getty.slice/getty@tty1.service\n",
            "/sbin/agetty",
        );
        assert_eq!(service_name(&f, &[]), "getty@tty1");
        let f = facts(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service\n",
            "/usr/bin/syncd",
        );
        assert_eq!(service_name(&f, &[]), "sync");
    }

    #[test]
    fn systemd_unit_in_v1_name_systemd_hierarchy() {
        // A hybrid host (this is what Debian 10's /proc/self/cgroup looks like).
        let text = "12:pids:/system.slice/demo.service\n\
                    11:memory:/system.slice/demo.service\n\
                    2:cpu,cpuacct:/system.slice/demo.service\n\
                    1:name=systemd:/system.slice/demo.service\n\
                    0::/\n";
        let f = facts(text, "/usr/bin/demo-server");
        assert_eq!(f.cgroup_path, "/system.slice/demo.service");
        assert_eq!(service_name(&f, &[]), "demo");
        // Pure v1 (no unified line at all).
        let f = facts(
            "1:name=systemd:/system.slice/cron.service\n",
            "/usr/sbin/cron",
        );
        assert_eq!(service_name(&f, &[]), "cron");
    }

    #[test]
    fn session_scopes_and_the_root_fall_back_to_the_executable() {
        let f = facts(
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "/usr/local/bin/worker",
        );
        assert_eq!(service_name(&f, &[]), "worker");
        assert_eq!(
            executable_path("/opt/app/bin/app (deleted)"),
            "/opt/app/bin/app"
        );
        // A kernel thread has no executable: its comm is all there is.
        let mut f = facts("0::/\n", "");
        f.comm = "kworker/0:1".to_owned();
        assert_eq!(service_name(&f, &[]), "kworker/0:1");
    }

    #[test]
    fn container_ids_of_each_runtime() {
        let paths = [
            format!("0::/system.slice/docker-{ID}.scope"),
            format!("12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "0::/system.slice/containerd.service/kubepods-besteffort-pod9.slice:cri-containerd:{ID}"
            ),
            format!("0::/kubepods/besteffort/pod7a1e/{ID}"),
            format!("0::/machine.slice/crio-{ID}.scope"),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            format!("1:name=systemd:/libpod_parent/libpod-{ID}\n0::/"),
        ];
        for text in &paths {
            let f = facts(text, "/usr/sbin/nginx");
            assert_eq!(f.container_id.as_deref(), Some(ID), "{text}");
        }
        // The innermost of a service and a container wins.
        let f = facts(&paths[0], "/usr/sbin/nginx");
        assert_eq!(service_name(&f, &[]), &ID[..12]);
        let f = facts(
            &format!("0::/system.slice/docker-{ID}.scope/system.slice/nginx.service"),
            "/usr/sbin/nginx",
        );
        assert_eq!(service_name(&f, &[]), "nginx");
        assert_eq!(f.container_id.as_deref(), Some(ID));
        // Conmon and short hex names are not containers (this machine's own
        // sandbox cgroup has 32 hex digits).
        for text in [
            format!("0::/machine.slice/libpod-conmon-{ID}.scope"),
            "4:memory:/process_api/0872355b2f93709ff08e0d3cf6b269e5\n0::/".to_owned(),
        ] {
            assert_eq!(facts(&text, "/usr/bin/conmon").container_id, None, "{text}");
        }
    }

    #[test]
    fn otel_variables_from_environ() {
        let env = b"PATH=/usr/bin\0OTEL_SERVICE_NAME=checkout\0HOME=/root\0";
        assert_eq!(otel_service_name(env).as_deref(), Some("checkout"));
        let env =
            b"OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod, service.name=cart%20api\0";
        assert_eq!(otel_service_name(env).as_deref(), Some("cart api"));
        // OTEL_SERVICE_NAME wins over the resource attribute; empty is unset.
        let env = b"OTEL_RESOURCE_ATTRIBUTES=service.name=b\0OTEL_SERVICE_NAME=a\0";
        assert_eq!(otel_service_name(env).as_deref(), Some("a"));
        let env = b"OTEL_SERVICE_NAME=\0OTEL_RESOURCE_ATTRIBUTES=service.name=b\0";
        assert_eq!(otel_service_name(env).as_deref(), Some("b"));
        assert_eq!(otel_service_name(b"XOTEL_SERVICE_NAME=x\0"), None);
        assert_eq!(otel_service_name(b""), None);
        // The environment wins over the cgroup.
        let mut f = facts("0::/system.slice/demo.service\n", "/usr/bin/demo");
        f.otel_service_name = Some("checkout".to_owned());
        assert_eq!(service_name(&f, &[]), "checkout");
    }

    #[test]
    fn rules_override_and_expand_groups() {
        let rule = |s: &str| s.parse::<ServiceNameRule>().unwrap();
        let mut f = facts("0::/system.slice/demo.service\n", "/opt/shop/bin/cart");
        f.otel_service_name = Some("from-env".to_owned());
        let rules = [rule("^/opt/(\\w+)/bin/=shop-$1"), rule("demo=never")];
        assert_eq!(service_name(&f, &rules), "shop-shop");
        // The command line and the cgroup path are searched too.
        assert_eq!(service_name(&f, &[rule("--serve=server")]), "server");
        assert_eq!(
            service_name(&f, &[rule("system\\.slice/(?<u>[a-z]+)=unit-${u}")]),
            "unit-demo"
        );
        // No match: the usual order applies.
        assert_eq!(service_name(&f, &[rule("^/usr/=x")]), "from-env");
        // The split is at the last `=`.
        let r = rule("a=b=c");
        assert_eq!(r.to_string(), "a=b=c");
        assert_eq!(r.regex.as_str(), "a=b");
        for bad in ["noequals", "=name", "regex=", "(=x"] {
            let err = bad.parse::<ServiceNameRule>().unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(bad.split('=').next().unwrap()), "{err}");
        }
    }
}
