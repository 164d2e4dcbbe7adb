//! The ABI of libprofalloc.so's sampling hooks, for the agent that probes
//! them (`prof-bpf heap --probe hooks`) and the allocator that calls them.
//!
//! Every thread of a process running on libprofalloc.so counts down the
//! bytes it allocates and samples one allocation each time the count
//! crosses zero; distances are exponential with mean
//! [`SAMPLE_BYTES_SYMBOL`]'s value, so sampled bytes form a Poisson process.
//! For each sampled allocation the allocator calls
//! `profalloc_sample_alloc(ptr, size, weight)` after it succeeded, and
//! `profalloc_sample_free(ptr)` when that object is freed, before its
//! memory can be reused. Both functions do nothing, are never inlined and
//! are exported from the library's dynamic symbol table, so that a uprobe
//! on them sees exactly the sampled events. All arguments are integers
//! (System V: rdi, rsi, rdx on x86-64), readable from `pt_regs`.
use core::ffi::c_void;

/// `extern "C" fn(ptr: *mut c_void, size: usize, weight: u64)`.
pub const SAMPLE_ALLOC_SYMBOL: &str = "profalloc_sample_alloc";
/// `extern "C" fn(ptr: *mut c_void)`.
pub const SAMPLE_FREE_SYMBOL: &str = "profalloc_sample_free";
/// An exported `u64` (atomic) holding the mean sampling distance in bytes
/// of the running process; 0 means the sampler is off. Readable through
/// `/proc/PID/mem` at the symbol's address.
pub const SAMPLE_BYTES_SYMBOL: &str = "profalloc_sample_bytes";
/// The environment variable that sets the mean distance at start-up.
pub const SAMPLE_BYTES_ENV: &str = "PROFALLOC_SAMPLE_BYTES";
/// Default mean distance between samples: 512 KiB.
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;

/// Type of `profalloc_sample_alloc`. `size` is the size asked for;
/// `weight` the unbiased estimate of the bytes this sample stands for,
/// rounded: for size S and mean R, `S / (1 - exp(-S/R))`.
pub type SampleAllocFn = extern "C" fn(ptr: *mut c_void, size: usize, weight: u64);
/// Type of `profalloc_sample_free`.
pub type SampleFreeFn = extern "C" fn(ptr: *mut c_void);
