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
//! - `python`: Python frames in both collectors' stacks (one walker);
//! - `tasks`: exec and exit events without the CPU collector;
//! - `emit`: symbolizing (one cache) and handing profiles to the sinks;
//! - `session`: the loop, the interval cut, SIGHUP, the final flush;
//! - [`labels`]: a process's service name, executable and container;
//! - [`config`]: `--config FILE` (TOML) under the command line, read again
//!   on SIGHUP ([`reload`]);
//! - [`metrics_http`]: `--metrics ADDR`, the agent's own counters.
use std::process::ExitCode;

mod args;
pub mod config;
mod cpu;
mod emit;
mod heap;
pub mod labels;
pub mod metrics_http;
mod python;
mod scope;
mod session;
mod tasks;

pub use args::{AgentArgs, Settings, settings};
pub use scope::{Facts, Rule, Scope};

use crate::{ebpf, process, runtime, sinks::Source};

/// Runs `prof-bpf agent` until SIGTERM, Ctrl-C or --duration. With
/// `--config FILE`, the options are the file's under the command line's.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let settings = match &args.config {
        None => settings(&args)?,
        Some(_) => from_config(config::CommandLine::of_agent(std::env::args_os()))?,
    };
    ebpf::require_root()?;
    for &pid in settings.scope.pids() {
        process::check_user_process(pid)?;
    }
    runtime::block_on(session::run(settings))?;
    Ok(ExitCode::SUCCESS)
}

/// The settings of a command line that names a config file.
fn from_config(command_line: config::CommandLine) -> anyhow::Result<Settings> {
    let args: AgentArgs = command_line.parse()?;
    let mut settings = settings(&args)?;
    settings.reload_from = Some(command_line);
    Ok(settings)
}

/// The name and labels of process `pid`, read while it runs (see
/// [`labels`] for how the service is named), plus this host's name and the
/// `--label`s.
pub fn name_process(
    pid: u32,
    rules: &[labels::ServiceNameRule],
    extra: &[(String, String)],
) -> Source {
    labels::source(pid, rules, extra)
}

/// Whether process `pid` still runs (not gone, not a zombie): one read of
/// `/proc/PID/stat`, for the checks made on every process every interval.
pub(crate) fn running(pid: u32) -> bool {
    process::state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

/// SIGHUP: the settings as they should be now, or `None` when nothing is
/// to be re-read. Without a configuration file, the command line is all
/// there is.
pub fn reload(current: &Settings) -> anyhow::Result<Option<Settings>> {
    let Some(command_line) = &current.reload_from else {
        eprintln!("prof-bpf: agent: SIGHUP: no --config file to re-read; settings unchanged");
        return Ok(None);
    };
    from_config(command_line.clone()).map(Some)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_is_named_after_its_executable_not_its_thread_name() {
        let me = super::name_process(std::process::id(), &[], &[("env".into(), "t".into())]);
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
