//! prof-bpf: heap and CPU profiling of running processes through eBPF.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library.
//! Modules, following the data flow:
//! - [`process`]: what a target process is made of (`/proc/PID/maps`, its files).
//! - [`ebpf`]: loading the embedded eBPF object, the aya-log bridge.
//! - [`profile`]: the one profile model; [`symbolize`]: addresses to names;
//!   [`output`]: its writers; [`report`]: the `report` session (files in).
//! - [`count`]: the `count` session (malloc/free call counters).
//! - [`heap`]: the `heap` session (heap profiles and leak reports).
//! - [`unwind`]: CFI tables for the kernel-side user stack walker.
//! - [`usdt`]: USDT probes of an ELF file (`.note.stapsdt`), their
//!   arguments and attach offsets; [`live_heap`]: reading libprofalloc.so's
//!   sampled live heap out of a running process.
//! - [`runtime`]: what every subcommand shares (runtime, stop, option
//!   parsers, counter sets).

pub mod count;
pub mod cpu;
pub mod ebpf;
pub mod heap;
pub mod live_heap;
pub mod output;
pub mod probe_conflict;
pub mod probe_point;
pub mod process;
pub mod profile;
pub mod report;
pub mod runtime;
pub mod symbolize;
pub mod unwind;
pub mod usdt;
