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

// ---- USDT probes (the OpenTelemetry memory-profiling contract) ----

/// The provider name of libprofalloc.so's USDT probes, as a literal (the
/// allocator writes it into its ELF notes with `asm!`). The contract's
/// final provider name is not fixed yet: this is the one place that
/// names it.
#[macro_export]
macro_rules! usdt_provider {
    () => {
        "otel_memory"
    };
}
/// The provider of libprofalloc.so's USDT probes ([`usdt_provider!`]).
pub const USDT_PROVIDER: &str = usdt_provider!();
/// `otel_memory:alloc(ptr, size, weight)`, fired for each sampled
/// allocation after it succeeded; `weight` as in [`SampleAllocFn`].
pub const USDT_ALLOC: &str = "alloc";
/// `otel_memory:free(ptr)`, fired when a sampled allocation is freed,
/// before its memory can be reused (never for unsampled pointers).
pub const USDT_FREE: &str = "free";

// ---- The sampled live heap, readable from outside ----
//
// libprofalloc.so keeps every sampled allocation that is still live in a
// table of its own (outside the profiled heap), so that an agent attaching
// late sees the sampled heap since process start. The exported symbol
// [`LIVE_HEAP_SYMBOL`] is a [`LiveHeapHeader`]; `slots` is the address of
// an array of `capacity` [`LiveSlot`]s, of which the first `used` have ever
// been written (the rest are zero).
//
// Reading from another process (`process_vm_readv`), with no lock:
// 1. read the header; check `magic`, `version`, `header_size`, `slot_size`
//    and `max_frames` (a reader of another version stops there);
// 2. copy slots `[0, used)` twice; a slot is a sample when both copies are
//    byte-identical, its `generation` is even and its `ptr` is not 0. A
//    slot that differs (a writer was inside it) is copied again.
// 3. a slot's `frames` hold its native stack (`depth` return addresses),
//    then, in a CPython process, its thread's Python stack
//    (`python_depth` words, see [`live_python_word`], each with its code
//    object's check in `python_checks`): the reader splices
//    them, replacing each evaluation-loop frame (`_PyEval_EvalFrameDefault`)
//    of the native stack by the Python frames of its activation, and names
//    them from the code objects (still in the process's memory), except
//    a frame whose code object's check differs now (it was freed and
//    another is at its address).
// A writer makes a slot's generation odd, writes the fields, then makes it
// even again (release order), and bumps the header's `generation` after
// each completed insert or remove: equal header generations around a copy
// mean no change completed in between.

/// Name of the exported [`LiveHeapHeader`] in `.dynsym`.
pub const LIVE_HEAP_SYMBOL: &str = "profalloc_live_heap";
/// The environment variable that caps the table's memory, in bytes
/// (default [`DEFAULT_LIVE_HEAP_BYTES`]; 0 turns the live heap off).
pub const LIVE_HEAP_BYTES_ENV: &str = "PROFALLOC_LIVE_HEAP_BYTES";
/// Default cap of the live heap's table: 64 MiB (about 95,000 samples of
/// 704 bytes, which at the default rate is about 46 GiB of live heap).
pub const DEFAULT_LIVE_HEAP_BYTES: u64 = 64 << 20;
/// `LiveHeapHeader::magic`: "PALIVEHP" in memory order.
pub const LIVE_HEAP_MAGIC: u64 = u64::from_le_bytes(*b"PALIVEHP");
/// `LiveHeapHeader::version` of this layout.
pub const LIVE_HEAP_VERSION: u32 = 3;
/// Return addresses kept per sample (deeper stacks are truncated).
pub const LIVE_MAX_FRAMES: usize = 64;
/// `LiveSlot::flags`: the stack was cut (too deep, or a frame the
/// unwinder could not step through).
pub const LIVE_SLOT_TRUNCATED: u32 = 1;
/// `LiveSlot::flags`: the Python walk did not reach the outermost frame
/// (too deep, or a frame that failed a check): Python frames are missing at
/// the outer end.
pub const LIVE_SLOT_PYTHON_CUT: u32 = 2;
/// Python words kept per sample at most; the native stack gets the rest of
/// the [`LIVE_MAX_FRAMES`].
pub const LIVE_MAX_PYTHON_WORDS: usize = 32;

/// A Python stack's word in [`LiveSlot::frames`], innermost first: 0 ends
/// an activation of the evaluation loop (the frames since the previous end
/// ran in one native `_PyEval_EvalFrameDefault` frame, as
/// `profiler_common::python::ACTIVATION_END`); any other word is a frame,
/// its `PyCodeObject`'s address divided by 8 in bits 0..44 (objects are
/// 8-aligned, below 2^47) and the offset of its current instruction from the
/// code's first, in 2-byte code units, in bits 44..64 (saturated: an offset
/// past 2 MiB gives no line).
pub fn live_python_word(code: u64, instr_offset: u32) -> u64 {
    let units = u64::from(instr_offset / 2).min(LIVE_PYTHON_UNITS_MAX);
    ((code >> 3) & LIVE_PYTHON_CODE_MASK) | units << 44
}

const LIVE_PYTHON_CODE_MASK: u64 = (1 << 44) - 1;
const LIVE_PYTHON_UNITS_MAX: u64 = (1 << 20) - 1;

/// The frame (code object address, instruction offset in bytes) of a
/// [`live_python_word`], or `None` for an activation's end.
pub fn live_python_frame(word: u64) -> Option<(u64, u32)> {
    (word != 0).then(|| ((word & LIVE_PYTHON_CODE_MASK) << 3, (word >> 44) as u32 * 2))
}

/// The header at [`LIVE_HEAP_SYMBOL`]. All fields are native-endian
/// integers written with atomic stores.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveHeapHeader {
    /// [`LIVE_HEAP_MAGIC`] once the table exists (0 before, or when the
    /// live heap is off).
    pub magic: u64,
    /// [`LIVE_HEAP_VERSION`].
    pub version: u32,
    /// `size_of::<LiveHeapHeader>()`.
    pub header_size: u32,
    /// `size_of::<LiveSlot>()`.
    pub slot_size: u32,
    /// [`LIVE_MAX_FRAMES`].
    pub max_frames: u32,
    /// Slots in the table.
    pub capacity: u64,
    /// Address of slot 0 in the process.
    pub slots: u64,
    /// Slots `[0, used)` have been written at least once.
    pub used: u64,
    /// Completed inserts and removes since start.
    pub generation: u64,
    /// Samples in the table now.
    pub live: u64,
    /// Samples recorded since start.
    pub inserted: u64,
    /// Samples that did not fit (table full) since start.
    pub dropped: u64,
    /// Mean sampling distance in bytes when the table was made.
    pub sample_bytes: u64,
    /// CLOCK_MONOTONIC (ns) when the table was made; slot times use the
    /// same clock.
    pub start_ns: u64,
}

/// One sample. An empty slot has `ptr` 0 (its other fields are
/// unspecified).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSlot {
    /// Odd while a writer is inside the slot, even otherwise.
    pub generation: u64,
    /// The allocation's address; 0 = empty.
    pub ptr: u64,
    /// Bytes asked for.
    pub size: u64,
    /// Unbiased estimate of the bytes this sample stands for.
    pub weight: u64,
    /// CLOCK_MONOTONIC (ns) at the allocation.
    pub time_ns: u64,
    /// Frames in `frames`: the caller of the allocation function first.
    pub depth: u32,
    /// [`LIVE_SLOT_TRUNCATED`], [`LIVE_SLOT_PYTHON_CUT`].
    pub flags: u32,
    /// Writer-internal: the next empty slot (+1) while this one is empty.
    pub link: u64,
    /// Python words after the native frames in `frames` (0 outside
    /// CPython, or with `PROFALLOC_PYTHON=0`); at most
    /// [`LIVE_MAX_PYTHON_WORDS`].
    pub python_depth: u32,
    pub _reserved: u32,
    /// `depth` return addresses, innermost first, then `python_depth`
    /// Python words ([`live_python_word`]), innermost first.
    pub frames: [u64; LIVE_MAX_FRAMES],
    /// The check (`crate::python::code_check`) of each Python word's code
    /// object when the sample was taken, in the words' order (0 for an
    /// activation's end).
    pub python_checks: [u32; LIVE_MAX_PYTHON_WORDS],
}

const _: () = assert!(core::mem::size_of::<LiveHeapHeader>() == 96);
const _: () = assert!(
    core::mem::size_of::<LiveSlot>() == 64 + 8 * LIVE_MAX_FRAMES + 4 * LIVE_MAX_PYTHON_WORDS
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_words_keep_the_code_and_the_offset() {
        let code = 0x7f12_3456_7890;
        assert_eq!(
            live_python_frame(live_python_word(code, 0)),
            Some((code, 0))
        );
        assert_eq!(
            live_python_frame(live_python_word(code, 4242)),
            Some((code, 4242))
        );
        // Past the largest offset: saturated, never another code's bits.
        let (c, off) = live_python_frame(live_python_word(code, u32::MAX)).unwrap();
        assert_eq!((c, off), (code, ((1 << 20) - 1) * 2));
        assert_ne!(live_python_word(code, 0), 0);
        assert_eq!(live_python_frame(0), None);
    }
}
