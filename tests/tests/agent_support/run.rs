//! Starting and stopping the agent with a directory sink, and reading
//! what it wrote.
use std::{
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use prof_bpf_tests::start_prof_bpf;

use super::check::{self, Pprof};

/// The agent's line once everything is attached.
pub const READY: &str = "prof-bpf: agent: profiling";
/// A fresh scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prof-bpf-agent-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the agent and waits until it is attached; returns it and its
/// stderr lines so far.
pub fn start_agent(args: &[&str]) -> (Child, Vec<String>) {
    let mut all = vec!["agent"];
    all.extend_from_slice(args);
    start_prof_bpf(&all, READY)
}

/// SIGTERM, then the agent must flush and exit 0 (within 30 s).
pub fn stop_agent(mut agent: Child) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            assert!(status.success(), "the agent exited with {status:?}");
            return;
        }
        assert!(Instant::now() < deadline, "the agent did not stop in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The profiles of `pid` and `kind` written to `dir`, oldest first.
pub fn profiles(dir: &Path, pid: u32, kind: &str) -> Vec<Pprof> {
    let suffix = format!("-{pid}-{kind}.pb.gz");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(&suffix))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| check::pprof(&std::fs::read(dir.join(n)).unwrap()))
        .collect()
}

/// Waits (at most 60 s) until a profile of `pid` and `kind` beyond the
/// first `after` satisfies `good`; returns every profile so far.
pub fn wait_profile(
    dir: &Path,
    pid: u32,
    kind: &str,
    after: usize,
    good: impl Fn(&Pprof) -> bool,
) -> Vec<Pprof> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = profiles(dir, pid, kind);
        if all.iter().skip(after).any(&good) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} profile of pid {pid} as expected within 60 s: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sum of the values of sample type `ty` over the samples whose stack
/// contains `function`.
pub fn value(p: &Pprof, ty: &str, function: &str) -> i64 {
    let i = p
        .sample_types
        .iter()
        .position(|t| t == ty)
        .unwrap_or_else(|| panic!("no {ty} in {:?}", p.sample_types));
    p.samples
        .iter()
        .filter(|s| s.stack.split(';').any(|f| f == function))
        .map(|s| s.values[i])
        .sum()
}
