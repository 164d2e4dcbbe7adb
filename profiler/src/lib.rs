//! prof-bpf: heap and CPU profiling of running processes through eBPF.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library.
//! Modules, following the data flow:
//! - [`process`]: what a target process is made of (`/proc/PID/maps`, its files).
//! - [`ebpf`]: loading the embedded eBPF object, the aya-log bridge.
//! - [`symbolize`]: addresses to names (normalized while a process lives,
//!   looked up later, per object).
//! - [`profile`]: the one profile model, built from live samples
//!   ([`profile::Collector`]) or read from files ([`profile::read`]).
//! - [`output`]: its writers, with options checked before a run.
//! - [`report`]: the `report` subcommand (show a saved profile).
//! - [`agent`]: the `agent` service (heap and CPU profiles of every
//!   process, continuously, to the sinks).
//! - [`count`]: the `count` session (malloc/free call counters).
//! - [`heap`]: the `heap` session (heap profiles and leak reports).
//! - [`cpu`]: the `cpu` session (CPU samples of the host or some processes).
//! - `launch`: `heap|cpu -- CMD`, a launched program that is never harmed.
//! - [`unwind`]: CFI tables for the kernel-side user stack walker.
//! - [`sinks`]: where finished profiles go (files, Pyroscope, OTLP, Parca).
//! - [`python`]: CPython threads and frames read from user space.
//! - [`usdt`]: USDT probes of an ELF file (`.note.stapsdt`), their
//!   arguments and attach offsets; [`live_heap`]: reading libprofalloc.so's
//!   sampled live heap out of a running process.
//! - [`runtime`]: what every subcommand shares (runtime, stop, option
//!   parsers, counter sets).

pub mod agent;
pub mod count;
pub mod cpu;
pub mod ebpf;
pub mod heap;
mod launch;
pub mod live_heap;
pub mod output;
pub mod probe_conflict;
pub mod probe_point;
pub mod process;
pub mod profile;
pub mod python;
pub mod report;
pub mod runtime;
pub mod sinks;
pub mod symbolize;
pub mod unwind;
pub mod usdt;
