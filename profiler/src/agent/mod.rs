//! `prof-bpf agent`: continuous heap and CPU profiling shipped to sinks.
//! - [`labels`]: a process's service name, executable and container;
//! - [`config`]: `--config FILE` (TOML) merged under the command line, and
//!   re-read on SIGHUP;
//! - [`metrics_http`]: `--metrics ADDR`, the agent's own counters.
pub mod config;
pub mod labels;
pub mod metrics_http;
