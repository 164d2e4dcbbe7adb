//! The agent's service names of real processes, read from the real `/proc`:
//! a program that renames its main thread, one with `OTEL_SERVICE_NAME`, and
//! one moved into a hand-made cgroup named like a systemd unit, in the
//! cgroup v2 hierarchy and in a v1 `name=systemd` hierarchy mounted here.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

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

/// A cgroup directory made by the test, removed (after its process) on drop.
struct Cgroup {
    dir: PathBuf,
    /// The topmost directory made, removed last.
    top: PathBuf,
    /// A hierarchy mounted by the test, unmounted last.
    mount: Option<PathBuf>,
}

impl Cgroup {
    /// Makes `ROOT/prof-bpf-labels-PID/system.slice/demo.service`.
    fn demo_service(root: &Path, mount: Option<PathBuf>) -> Self {
        let top = root.join(format!("prof-bpf-labels-{}", std::process::id()));
        let dir = top.join("system.slice/demo.service");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { dir, top, mount }
    }

    fn enter(&self, pid: u32) {
        move_to(&self.dir, pid);
    }
}

fn move_to(dir: &Path, pid: u32) {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", procs.display()));
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Innermost first; a reaped process may leave the cgroup busy for a
        // moment.
        let mut dirs: Vec<PathBuf> = self.dir.ancestors().map(Path::to_path_buf).collect();
        dirs.truncate(
            dirs.iter()
                .position(|d| d == &self.top)
                .map_or(0, |i| i + 1),
        );
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mount) = &self.mount {
            let _ = Command::new("umount").arg(mount).status();
            let _ = std::fs::remove_dir(mount);
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup2 hierarchy is mounted")
}

#[test]
fn systemd_unit_of_a_cgroup_v2_path() {
    require_bpf!();
    let cgroup = Cgroup::demo_service(&cgroup2_mount(), None);
    let (proc, _) = renamed_main("demo-main", &[]);
    cgroup.enter(proc.pid());
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
    let want = format!(
        "0::/prof-bpf-labels-{}/system.slice/demo.service",
        std::process::id()
    );
    assert!(text.lines().any(|l| l == want), "{want} not in:\n{text}");
    let facts = labels::read(proc.pid());
    assert_eq!(facts.cgroup_path, want.trim_start_matches("0::"));
    assert_eq!(labels::service_name(&facts, &[]), "demo");
    assert_eq!(facts.container_id, None);
    drop(proc);
}

#[test]
fn systemd_unit_of_a_v1_name_systemd_path() {
    require_bpf!();
    let mount = std::env::temp_dir().join(format!("prof-bpf-labels-v1-{}", std::process::id()));
    std::fs::create_dir_all(&mount).unwrap();
    // Attaches systemd's named hierarchy when the host has one (a hybrid
    // host), or makes it.
    let status = Command::new("mount")
        .args(["-t", "cgroup", "-o", "none,name=systemd", "cgroup"])
        .arg(&mount)
        .status()
        .expect("running mount");
    assert!(
        status.success(),
        "mount -t cgroup -o none,name=systemd failed"
    );
    let cgroup = Cgroup::demo_service(&mount, Some(mount.clone()));
    let (proc, exe_name) = renamed_main("demo-main", &[]);
    // In the v2 hierarchy it stays at the root, as on a hybrid host where
    // systemd manages only the v1 one.
    move_to(&cgroup2_mount(), proc.pid());
    cgroup.enter(proc.pid());
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
    let want = format!(
        ":name=systemd:/prof-bpf-labels-{}/system.slice/demo.service",
        std::process::id()
    );
    assert!(
        text.lines().any(|l| l.ends_with(&want)),
        "{want} not in:\n{text}"
    );
    assert!(text.lines().any(|l| l == "0::/"), "{text}");
    let facts = labels::read(proc.pid());
    assert_eq!(labels::service_name(&facts, &[]), "demo");
    // Without the unit, the executable names it.
    move_to(&mount, proc.pid());
    assert_eq!(labels::source(proc.pid(), &[], &[]).service_name, exe_name);
    drop(proc);
}
