//! `prof-bpf agent`: continuous heap and CPU profiling of the whole host
//! (or of some processes), one profile per process and kind every
//! interval, shipped to fleet backends through [`crate::sinks`].
//!
//! Both collectors run in one process on one BPF object, one unwind-table
//! manager and one symbolizer:
//! - `args`: the options, and [`settings`], where they become [`Settings`];
//! - `scope`: which processes are profiled, and which are named;
//! - `heap`: in-process samplers (libprofalloc.so hooks, otel_memory USDT
//!   probes) for every process, malloc uprobes for named ones under a
//!   per-process call-rate ceiling;
//! - `cpu`: the `cpu` sampler at 19 Hz, per process per interval;
//! - `emit`: symbolizing (one cache) and handing profiles to the sinks;
//! - `session`: the loop, the interval cut, SIGHUP, the final flush;
//! - `telemetry`: the agent's own counters in Prometheus text format.
//!
//! Service parts hook in at [`name_process`] (labels of a process),
//! [`settings`] (a config file merged into the options) and [`reload`]
//! (SIGHUP).
use std::process::ExitCode;

mod args;
mod cpu;
mod emit;
mod heap;
mod scope;
mod session;
mod telemetry;

pub use args::{AgentArgs, Settings, settings};
pub use scope::{Facts, Rule, Scope};
pub use telemetry::Telemetry;

use crate::{ebpf, process, runtime, sinks::Source};

/// Runs `prof-bpf agent` until SIGTERM, Ctrl-C or --duration.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(&args)?;
    ebpf::require_root()?;
    for &pid in settings.scope.pids() {
        process::check_user_process(pid)?;
    }
    runtime::block_on(session::run(settings))?;
    Ok(ExitCode::SUCCESS)
}

/// The name and labels of process `pid`, read while it runs: the service
/// is its executable's file name (not its thread name, which a program may
/// change), plus this host's name, the executable's path and the
/// `--label`s. A process already gone is named by its last thread name.
pub fn name_process(pid: u32, labels: &[(String, String)]) -> Source {
    let executable = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| {
            // A replaced binary (an upgrade) is still the same service.
            let path = p.to_string_lossy();
            path.strip_suffix(" (deleted)").unwrap_or(&path).to_owned()
        })
        .unwrap_or_default();
    let name = std::path::Path::new(&executable)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| process::comm(pid));
    Source {
        executable,
        labels: labels.to_vec(),
        ..Source::new(name, pid)
    }
}

/// SIGHUP: the settings as they should be now, or `None` when nothing is
/// to be re-read. Without a configuration file, the command line is all
/// there is.
pub fn reload(_current: &Settings) -> anyhow::Result<Option<Settings>> {
    eprintln!("prof-bpf: agent: SIGHUP: no --config file to re-read; settings unchanged");
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_is_named_after_its_executable_not_its_thread_name() {
        let me = super::name_process(std::process::id(), &[("env".into(), "t".into())]);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.executable, exe.to_string_lossy());
        assert_eq!(
            me.service_name,
            exe.file_name().unwrap().to_string_lossy(),
            "the test thread's name is not the service"
        );
        assert_eq!(me.labels, [("env".to_owned(), "t".to_owned())]);
    }
}
