//! The agent's service names of real processes, read from the real `/proc`:
//! a program that renames its main thread, one with `OTEL_SERVICE_NAME`, and
//! one moved into a hand-made cgroup named like a systemd unit, in the
//! cgroup v2 hierarchy and in a v1 `name=systemd` hierarchy mounted here.
#[path = "agent_support/cgroup.rs"]
mod cgroup;

use std::process::Command;

use cgroup::{Cgroup, cgroup2_mount, move_to};
use prof_bpf_tests::{Proc, build_workload, require_bpf};
use profiler::agent::labels;

/// The workload, renaming its main thread to `comm`, with extra environment.
fn renamed_main(comm: &str, env: &[(&str, &str)]) -> (Proc, String) {
    let program = build_workload("renamed_main", &["-O1"]);
    let mut cmd = Command::new(&program);
    cmd.arg(comm)
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(&mut cmd);
    proc.expect_line("ready");
    let name = program.file_name().unwrap().to_string_lossy().into_owned();
    (proc, name)
}

#[test]
fn renamed_main_thread_keeps_its_executable_name() {
    require_bpf!();
    let (proc, exe_name) = renamed_main("not-its-name", &[]);
    let facts = labels::read(proc.pid());
    // The rename took effect, and the name ignores it.
    assert_eq!(facts.comm, "not-its-name");
    assert_eq!(labels::service_name(&facts, &[]), exe_name);
    let source = labels::source(proc.pid(), &[], &[]);
    assert_eq!(source.service_name, exe_name);
    assert_eq!(source.pid, proc.pid());
    assert!(
        source.executable.ends_with(&format!("/{exe_name}")),
        "{source:?}"
    );
    assert_eq!(source.hostname, nodename());
}

/// The host name by uname(2).
fn nodename() -> String {
    // SAFETY: an all-zero utsname is valid, and uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid utsname to write to.
    assert_eq!(unsafe { libc::uname(&mut uts) }, 0);
    // SAFETY: uname NUL-terminates nodename.
    let name = unsafe { std::ffi::CStr::from_ptr(uts.nodename.as_ptr()) };
    name.to_string_lossy().into_owned()
}

#[test]
fn otel_service_name_from_the_process_environment() {
    require_bpf!();
    let (proc, _) = renamed_main("worker", &[("OTEL_SERVICE_NAME", "checkout-api")]);
    assert_eq!(
        labels::source(proc.pid(), &[], &[]).service_name,
        "checkout-api"
    );
    // A rule overrides it.
    let rule = "renamed_(main)=rule-$1".parse().unwrap();
    assert_eq!(
        labels::source(proc.pid(), &[rule], &[]).service_name,
        "rule-main"
    );
}

#[test]
fn systemd_unit_of_a_cgroup_v2_path() {
    require_bpf!();
    let cgroup = Cgroup::demo_service(&cgroup2_mount(), None);
    let (proc, _) = renamed_main("demo-main", &[]);
    cgroup.enter(proc.pid());
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
    let want = format!("0::{}", cgroup.path());
    assert!(want.ends_with("/system.slice/demo.service"), "{want}");
    assert!(text.lines().any(|l| l == want), "{want} not in:\n{text}");
    let facts = labels::read(proc.pid());
    assert_eq!(facts.cgroup_path, cgroup.path());
    assert_eq!(labels::service_name(&facts, &[]), "demo");
    assert_eq!(facts.container_id, None);
    drop(proc);
}

#[test]
fn systemd_unit_of_a_v1_name_systemd_path() {
    require_bpf!();
    let cgroup = cgroup::systemd_v1_demo_service();
    let (proc, exe_name) = renamed_main("demo-main", &[]);
    // In the v2 hierarchy it stays at the root, as on a hybrid host where
    // systemd manages only the v1 one.
    move_to(&cgroup2_mount(), proc.pid());
    cgroup.enter(proc.pid());
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
    let want = format!(":name=systemd:{}", cgroup.path());
    assert!(
        text.lines().any(|l| l.ends_with(&want)),
        "{want} not in:\n{text}"
    );
    assert!(text.lines().any(|l| l == "0::/"), "{text}");
    let facts = labels::read(proc.pid());
    assert_eq!(labels::service_name(&facts, &[]), "demo");
    // Back at the hierarchy's root, the executable names it.
    move_to(cgroup.mount().unwrap(), proc.pid());
    assert_eq!(labels::source(proc.pid(), &[], &[]).service_name, exe_name);
    drop(proc);
}
