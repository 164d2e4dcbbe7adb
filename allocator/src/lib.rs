//! profalloc: a TCMalloc-style allocator.
//!
//! # Overview
//! Front end: per-thread caches ([`thread_cache`]) of free objects per size
//! class ([`size_class`]), reached without locks. Middle: per class, a
//! transfer cache of whole batches and a central list of spans
//! ([`central`]). Back end: the page heap of spans ([`page_heap`]), the page
//! map from address to span ([`pagemap`]), huge objects in their own
//! mappings ([`huge`]), and the OS ([`os`]). Every allocation also counts
//! down a per-thread sampler ([`sampler`]) whose hooks an agent can probe.
//! The sampler is the core's only way toward profiling: gperftools mode
//! ([`gperftools`]: HEAPPROFILE, HEAPCHECK, CPUPROFILE) sits behind it.
//! Settings come from the environment in one place ([`env`]).
//!
//! Two ways in: the C ABI of `libprofalloc.so` (package `profalloc-preload`
//! in `allocator/preload`, for `LD_PRELOAD`) and [`ProfAlloc`] as a Rust
//! `#[global_allocator]`:
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: profalloc::ProfAlloc = profalloc::ProfAlloc;
//! ```
//!
//! # Your responsibilities vs ours
//! Ours: memory safety of correct programs, errors as null (and ENOMEM),
//! detecting the double free of a class's most recently freed object and
//! frees of pointers we never handed out (abort with a message). Yours:
//! use LD_PRELOAD or static linking (the library uses initial-exec TLS and
//! may fail to `dlopen`). A signal handler may allocate and free: a call
//! that interrupts the allocator on its thread (fast or slow path) takes
//! the re-entrant path, which neither touches the interrupted lists nor
//! waits for a lock.
//!
//! # Resident code
//! Functions that run in every process (start-up, exit, the allocation
//! paths, sampling and its stack walk) carry
//! `#[link_section = ".text.hot.profalloc"]`; `allocator/preload/layout.ld`
//! puts that section, with the C runtime's and std's start-up code and the
//! PLT, in one 64 KiB group at the start of libprofalloc.so's text. The
//! kernel maps file pages around a fault in aligned 64 KiB groups, so with
//! that code spread over the whole text, every process had all of it
//! (about 380 KiB) resident. Mark a function that every process runs the
//! same way (a rarely used body behind a test that always runs goes in a
//! function of its own, unmarked); `cargo xtask check-fast-path` fails
//! when the section outgrows the group.
pub mod alloc;
mod cache_budget;
mod central;
mod counters;
mod decay;
mod env;
mod global;
pub mod gperftools;
mod huge;
mod live_set;
mod lock;
pub mod os;
mod page_heap;
mod pagemap;
mod probes;
mod sampler;
pub mod size_class;
mod span;
pub mod stats;
mod thread_cache;

pub use global::ProfAlloc;
pub use stats::{Stats, stats};
