//! The kernel-side Python frame walker's maps and records.
//!
//! - [`PROCESSES_MAP`]: `HashMap<u32 (tgid), PyProcess>`: the CPython
//!   processes whose Python frames are walked, with the structure offsets
//!   of their interpreter version (written by user space, which found the
//!   interpreter and its layout).
//! - [`THREADS_MAP`]: `HashMap<u32 (tid), u64 (PyThreadState address)>`,
//!   filled by user space from the interpreters' thread lists (matched on
//!   `native_thread_id`) and refreshed every interval. A sampled thread of a
//!   listed process missing here is counted ([`PyCounter::ThreadUnknown`]).
//!   Why not the thread-local `_Py_tss_tstate`: stripped builds do not
//!   export it, 3.11 keeps the thread state in a pthread TSS key, and the
//!   GIL holder is not the sampled thread; the thread list serves all three.
//! - [`STACKS_MAP`]: `HashMap<u64 (stack id), PyStack>`: the Python frames
//!   of an event, by content hash like the user stacks.
//! - [`PAIRS_MAP`]: `HashMap<u64 (combined id), PyPair>`: for programs
//!   whose records hold one stack id (heap), the id that stands for a
//!   native stack and a Python stack together.
//! - [`STATS_MAP`]: the [`PyCounter`] set.

/// Slots of a [`PyStack`]: frames plus one marker per evaluation-loop
/// activation. Deeper stacks end [`PY_STACK_TRUNCATED`].
pub const MAX_PY_SLOTS: usize = 128;

/// [`PyProcess::frame_is_entry`] / [`PyProcess::owner_cstack`] value for
/// "the version has no such field".
pub const NO_FIELD: u64 = u64::MAX;

/// What the kernel needs of one interpreter: offsets named
/// `<structure>_<field>` as in `profiler::python::offsets`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcess {
    /// `PyThreadState.cframe` (3.11, 3.12), or [`NO_FIELD`] (3.13: the
    /// thread state holds `current_frame` itself).
    pub tstate_cframe: u64,
    /// `_PyCFrame.current_frame`, or `PyThreadState.current_frame` (3.13).
    pub current_frame: u64,
    pub frame_code: u64,
    pub frame_previous: u64,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13).
    pub frame_instr: u64,
    pub frame_owner: u64,
    /// `_PyInterpreterFrame.is_entry` (3.11), or [`NO_FIELD`].
    pub frame_is_entry: u64,
    /// `owner` of a C-stack shim frame (3.12+), or [`NO_FIELD`].
    pub owner_cstack: u64,
    /// `owner` of a generator's frame.
    pub owner_generator: u64,
    pub object_type: u64,
    pub var_object_size: u64,
    pub code_adaptive: u64,
    pub code_firsttraceable: u64,
    /// Address of `PyCode_Type` in the process.
    pub code_type: u64,
    /// Addresses of the main GIL's `locked` (an `int`) and `last_holder`
    /// (a `PyThreadState *`) in the process, 0 when not known yet.
    pub gil_locked: u64,
    pub gil_holder: u64,
    /// Non-zero with `--gil`: CPU samples of this process's threads that do
    /// not hold the GIL are dropped (counted, [`PyCounter::NotGilHolder`]).
    pub gil_only: u64,
    /// Where the code object's qualified name, file name and location
    /// table pointers lie: a block of [`CHECK_BLOCK_WORDS`] words at this
    /// offset, at these word indexes (read at once for [`code_check`]); or
    /// [`NO_FIELD`] when they do not fit one block (frames get
    /// [`NO_CODE_CHECK`]).
    pub code_check_block: u64,
    pub check_qualname: u64,
    pub check_filename: u64,
    pub check_linetable: u64,
    pub code_firstlineno: u64,
}

const _: () = assert!(core::mem::size_of::<PyProcess>() == 176);

/// Words of [`PyProcess::code_check_block`].
pub const CHECK_BLOCK_WORDS: usize = 4;

/// [`PyFrameSlot::code`] of a slot that marks the outer end of one
/// activation of the evaluation loop (`_PyEval_EvalFrameDefault`): the
/// frames since the previous marker ran in that one native frame.
pub const ACTIVATION_END: u64 = 0;

/// One slot of a [`PyStack`]: a frame, or an activation marker.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyFrameSlot {
    /// Address of the `PyCodeObject`, or [`ACTIVATION_END`].
    pub code: u64,
    /// Byte offset of the current instruction from the code's first.
    pub instr_offset: u32,
    /// [`code_check`] of the code object when the frame was recorded, or
    /// [`NO_CODE_CHECK`]: a code object freed before its frames are named
    /// may have another in its place by then, which the check tells apart.
    pub check: u32,
}

/// [`PyFrameSlot::check`] of a frame recorded without reading its code
/// object's names.
pub const NO_CODE_CHECK: u32 = 0;

/// What tells a code object from another at the same address: the
/// addresses of its qualified name, file name and location table, and its
/// first line, mixed into 32 bits (never [`NO_CODE_CHECK`]). A code object
/// freed and another allocated at its address differs in at least one of
/// them (its strings and table are objects of its own), so a frame whose
/// check differs from its code object's now is not named after the new one.
pub fn code_check(qualname: u64, filename: u64, linetable: u64, firstlineno: u32) -> u32 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for v in [qualname, filename, linetable, u64::from(firstlineno)] {
        h = (h ^ v).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 32;
    }
    (h as u32).max(1)
}

/// [`PyStack::status`]: the walk reached the outermost frame.
pub const PY_STACK_COMPLETE: u32 = 0;
/// [`PyStack::status`]: cut at [`MAX_PY_SLOTS`] (`[python truncated]`).
pub const PY_STACK_TRUNCATED: u32 = 1;
/// [`PyStack::status`]: a read failed or a frame was not valid; the slots
/// before it are good, the outer frames are missing.
pub const PY_STACK_BROKEN: u32 = 2;

/// The Python frames of one event, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub slots: [PyFrameSlot; MAX_PY_SLOTS],
    pub len: u32,
    /// `PY_STACK_*`.
    pub status: u32,
}

const _: () = assert!(core::mem::size_of::<PyStack>() == 16 * MAX_PY_SLOTS + 8);

impl PyStack {
    pub const EMPTY: Self = Self {
        slots: [PyFrameSlot {
            code: 0,
            instr_offset: 0,
            check: NO_CODE_CHECK,
        }; MAX_PY_SLOTS],
        len: 0,
        status: PY_STACK_COMPLETE,
    };

    /// The recorded slots.
    pub fn slots(&self) -> &[PyFrameSlot] {
        &self.slots[..(self.len as usize).min(MAX_PY_SLOTS)]
    }
}

impl Default for PyStack {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// A native stack and the Python stack taken with it (see [`PAIRS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyPair {
    /// Id in the user stack map (or the heap's missing-stack id).
    pub native: u64,
    /// Id in [`STACKS_MAP`].
    pub python: u64,
    /// Process (tgid) of the event.
    pub pid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PyPair>() == 24);

crate::impl_pod!(PyProcess, PyFrameSlot, PyStack, PyPair);

/// Name of the pair map.
pub const PAIRS_MAP: &str = "PY_PAIRS";
/// Capacity of [`PAIRS_MAP`].
pub const PAIRS_MAX: u32 = 32768;

/// Name of the process map.
pub const PROCESSES_MAP: &str = "PY_PROCESSES";
/// Capacity of [`PROCESSES_MAP`].
pub const PROCESSES_MAX: u32 = 1024;
/// Name of the thread map.
pub const THREADS_MAP: &str = "PY_THREADS";
/// Capacity of [`THREADS_MAP`].
pub const THREADS_MAX: u32 = 16384;
/// Name of the Python stack map.
pub const STACKS_MAP: &str = "PY_STACKS";
/// Capacity of [`STACKS_MAP`]: distinct Python stacks per interval (user
/// space deletes what it read).
pub const STACKS_MAX: u32 = 16384;
/// Name of the counter map.
pub const STATS_MAP: &str = "PY_STATS";

crate::counter_set! {
    /// What the Python frame walker did; every stack it could not take
    /// completely is counted here.
    pub enum PyCounter {
        /// Events of threads of CPython processes (walks attempted).
        Walks = "walks",
        /// Threads not (yet) in the thread map: no Python frames.
        ThreadUnknown = "thread_unknown",
        /// Threads running no Python code at the event.
        NoFrames = "no_frames",
        /// Stacks walked to the outermost frame.
        Complete = "complete",
        /// Stacks cut at the slot limit (`[python truncated]`).
        Truncated = "truncated",
        /// Walks ended by a failed read of the target's memory.
        ReadFailed = "read_failed",
        /// Walks ended by a frame whose code pointer is not a code object or
        /// whose instruction lies outside its code.
        BadFrame = "bad_frame",
        /// C-stack shim frames skipped (3.12+).
        CstackFrames = "cstack_frames",
        /// Frames not yet past their prologue, skipped.
        IncompleteFrames = "incomplete_frames",
        /// Stacks not stored: the stack map was full.
        MapFull = "map_full",
        /// Pairs not stored: the pair map was full (the event keeps its
        /// native stack only).
        PairsFull = "pairs_full",
        /// Events that found the per-CPU walk record in use (a walk
        /// interrupted on the same CPU), left without Python frames.
        Busy = "busy",
        /// CPU samples left out by `--gil`: the thread did not hold the GIL.
        NotGilHolder = "not_gil_holder",
    }
}
