//! Python frames in allocation and CPU stacks: when the process is CPython
//! 3.11 to 3.13 (its executable or a loaded libpython exports `_PyRuntime`
//! and `Py_Version`), every stack the sampled live heap, HEAPPROFILE,
//! HEAPCHECK and CPUPROFILE take also walks the current thread's Python
//! frames ([`walk`]).
//! - gperftools mode splices them into the native stack in place of the
//!   evaluation-loop frames that ran them
//!   (`profiler_common::python_splice`, the profiler's rules), each frame
//!   named from copies of its code object ([`names`]) in the dumps;
//! - the live heap keeps them apart, as code object addresses and
//!   instruction offsets ([`live_words`]): the agent that reads the table
//!   from outside splices and names them with the same rules.
//!
//! The layout is `profiler_common::python_layout`'s, as for the profiler:
//! tables for 3.11 and 3.12, `_Py_DebugOffsets` for 3.13; any other version
//! is named in one line and gets native frames only.
use core::{
    cell::UnsafeCell,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use profiler_common::{
    hooks::live_python_word,
    python::ACTIVATION_END,
    python_layout::{self, DEBUG_OFFSETS_LEN, PythonVersion},
    python_splice::{Spliced, splice},
};

use crate::{live_set::PythonWords, os::Message};

mod eval_code;
mod mapped;
pub(crate) mod names;
mod read;
mod symbols;
mod walk;

use eval_code::EvalCode;
pub use mapped::unmapping;
use mapped::{PageCache, Readers};
use read::{PLANNED_BYTES, Plan, Reader};
pub(crate) use walk::Walk;
use walk::{End, Layout, MAX_SLOTS, NoFrame};

struct Found(UnsafeCell<Option<(Layout, EvalCode)>>);
// SAFETY: written once by `start` before ON is published, then only read.
unsafe impl Sync for Found {}
static FOUND: Found = Found(UnsafeCell::new(None));
static ON: AtomicBool = AtomicBool::new(false);
/// The process runs CPython (it exports `_PyRuntime`), walked or not.
static CPYTHON: AtomicBool = AtomicBool::new(false);

/// Walks attempted, and those that ended early (a failed read or check,
/// or the slot limit), for the dumps' comments.
pub(crate) static WALKS: AtomicU64 = AtomicU64::new(0);
pub(crate) static CUT: AtomicU64 = AtomicU64::new(0);
/// Walks that read through the kernel (pages no earlier walk of the thread
/// kept, see [`mapped`]).
pub(crate) static KERNEL_WALKS: AtomicU64 = AtomicU64::new(0);
/// Activations whose evaluation-loop frame the native stack did not hold
/// (their frames went to the outer end).
pub(crate) static UNMATCHED: AtomicU64 = AtomicU64::new(0);
/// Thread-list lookups of a thread state (a thread's first walk, or its
/// kept thread state no longer checks out).
pub(crate) static LOOKUPS: AtomicU64 = AtomicU64::new(0);
/// Stacks taken on threads without a thread state (native frames only).
pub(crate) static NO_STATE: AtomicU64 = AtomicU64::new(0);

/// Whether walks name their frames in the code table ([`names`]):
/// gperftools mode's dumps need it; the live heap keeps code addresses.
static INTERN: AtomicBool = AtomicBool::new(false);

/// Finds the interpreter and, with `walk`, turns the Python walk on;
/// `intern`: gperftools mode will name frames ([`names`]). Called once,
/// from the allocator's initialisation, when stacks are taken.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn start(walk: bool, intern: bool) {
    let mut l = symbols::Lookup {
        names: &[
            b"_PyRuntime",
            b"Py_Version",
            b"PyCode_Type",
            b"_PyEval_EvalFrameDefault",
        ],
        found: [None; 8],
        object: core::ptr::null(),
        bias: 0,
        phdrs: &[],
    };
    symbols::find(&mut l);
    let Some(runtime) = l.found[0] else {
        return; // not CPython
    };
    CPYTHON.store(true, Ordering::Relaxed);
    if !walk {
        return;
    }
    let Some(version) = l.found[1] else {
        let mut m = Message::new();
        m.str("(").str(object_name(l.object)).str(")");
        return say_unsupported_with(
            core::str::from_utf8(m.as_bytes()).unwrap_or("?"),
            "older than 3.11: it exports no Py_Version",
        );
    };
    let version = PythonVersion {
        // SAFETY: Py_Version is a const u32 of the interpreter's image.
        hex: unsafe { (version.address as *const u32).read() },
    };
    let offsets = if let Some(t) = python_layout::table(version) {
        t
    } else if python_layout::has_debug_offsets(version) {
        // SAFETY: _PyRuntime starts with _Py_DebugOffsets (3.13), static data.
        let bytes =
            unsafe { core::slice::from_raw_parts(runtime.address as *const u8, DEBUG_OFFSETS_LEN) };
        match python_layout::from_debug_offsets(bytes, version) {
            Ok(o) => o,
            Err(_) => {
                return say_version(version, "its _Py_DebugOffsets are not the expected ones");
            }
        }
    } else {
        return say_version(version, "only 3.11 to 3.13 are supported");
    };
    let (Some(code_type), Some(eval)) = (l.found[2], l.found[3]) else {
        return say_version(
            version,
            "PyCode_Type or _PyEval_EvalFrameDefault is not exported",
        );
    };
    if intern {
        if !names::start() {
            return;
        }
        INTERN.store(true, Ordering::Relaxed);
    }
    let layout = Layout {
        runtime: runtime.address as u64,
        code_type: code_type.address as u64,
        o: offsets,
    };
    let object = eval_code::Object {
        bias: l.bias,
        phdrs: l.phdrs,
    };
    // SAFETY: the object exports the loop, so its segments and CFI are
    // mapped, and the symbol's range is in its code.
    let eval = unsafe { eval_code::find(&object, eval.address, eval.address + eval.size) };
    // SAFETY: written once, before ON publishes it.
    unsafe { *FOUND.0.get() = Some((layout, eval)) };
    // SAFETY: registers a handler without preconditions (it only resets
    // counters).
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
    let mut m = symbols::Lookup {
        names: &[b"munmap", b"profalloc_unmap_hook"],
        found: [None; 8],
        object: core::ptr::null(),
        bias: 0,
        phdrs: &[],
    };
    symbols::find(&mut m);
    // The first object that defines munmap, the one every call binds to,
    // is libprofalloc.so (it exports the hook's marker).
    if m.found[1].is_some() {
        mapped::hooked();
    }
    ON.store(true, Ordering::Release);
}

fn say_version(v: PythonVersion, why: &str) {
    let mut m = Message::new();
    m.dec(u64::from(v.major()))
        .str(".")
        .dec(u64::from(v.minor()))
        .str(".")
        .dec(u64::from(v.micro()));
    say_unsupported_with(core::str::from_utf8(m.as_bytes()).unwrap_or("?"), why);
}

/// The base name of the object that exports `_PyRuntime` (the libpython
/// soname, which carries the version), or "the executable".
fn object_name(object: *const libc::c_char) -> &'static str {
    if object.is_null() {
        return "the executable";
    }
    // SAFETY: the loader's name of a loaded object: NUL-terminated, kept
    // while the object stays loaded (libpython is never unloaded).
    let name = unsafe { core::ffi::CStr::from_ptr(object) }.to_bytes();
    let base = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
    match core::str::from_utf8(base) {
        Ok(b) if !b.is_empty() => b,
        _ => "the executable",
    }
}

/// The one line that says why stacks have no Python frames, kept for the
/// dumps' comments.
struct Unsupported(UnsafeCell<Message>);
// SAFETY: written once by `start` (initialisation, single-threaded), before
// UNSUPPORTED publishes it.
unsafe impl Sync for Unsupported {}
static UNSUPPORTED_TEXT: Unsupported = Unsupported(UnsafeCell::new(Message::new()));
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

fn say_unsupported_with(version: &str, why: &str) {
    // SAFETY: see Unsupported.
    let m = unsafe { &mut *UNSUPPORTED_TEXT.0.get() };
    m.str("Python ")
        .str(version)
        .str(" is not supported (")
        .str(why)
        .str("): only native frames are shown");
    UNSUPPORTED.store(true, Ordering::Release);
    Message::new()
        .str("profalloc: ")
        .str(core::str::from_utf8(m.as_bytes()).unwrap_or(""))
        .str("\n")
        .write_stderr();
}

/// Calls `f` with the comment lines the dumps carry about Python frames:
/// the walks' counters when the process is a supported CPython, the
/// unsupported line when it is another one, nothing otherwise.
pub(crate) fn comments(mut f: impl FnMut(&str)) {
    if UNSUPPORTED.load(Ordering::Acquire) {
        // SAFETY: published by UNSUPPORTED, never written again.
        let m = unsafe { &*UNSUPPORTED_TEXT.0.get() };
        f(core::str::from_utf8(m.as_bytes()).unwrap_or(""));
        return;
    }
    if !is_on() {
        return;
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut m = Message::new();
    m.str("python stack walks (in-process): ")
        .dec(get(&WALKS))
        .str(" walks, ")
        .dec(get(&CUT))
        .str(" cut, ")
        .dec(get(&UNMATCHED))
        .str(" activations without an eval-loop frame, ")
        .dec(names::UNNAMED.load(Ordering::Relaxed) as u64)
        .str(" frames unnamed, ")
        .dec(get(&KERNEL_WALKS))
        .str(" read through the kernel");
    f(core::str::from_utf8(m.as_bytes()).unwrap_or(""));
    // SAFETY: published by ON (checked by is_on above).
    if let Some((_, eval)) = unsafe { &*FOUND.0.get() } {
        f(core::str::from_utf8(eval_line(eval).as_bytes()).unwrap_or(""));
    }
    let mut m = Message::new();
    m.str("python thread states (in-process): ")
        .dec(get(&NO_STATE))
        .str(" stacks on threads without a thread state, ")
        .dec(get(&LOOKUPS))
        .str(" thread-state lookups");
    f(core::str::from_utf8(m.as_bytes()).unwrap_or(""));
}

/// The comment line that says where the evaluation loop's code is, in
/// the object's addresses (as `readelf` and the profiler show them).
fn eval_line(eval: &EvalCode) -> Message {
    let mut m = Message::new();
    let hex = |m: &mut Message, (lo, hi): (usize, usize)| {
        m.hex((lo - eval.bias) as u64)
            .str("-")
            .hex((hi - eval.bias) as u64);
    };
    m.str("python eval loop (in-process): hot part ");
    hex(&mut m, eval.hot);
    if eval.cold_parts().is_empty() {
        m.str(", no cold part");
    }
    for (i, &part) in eval.cold_parts().iter().enumerate() {
        m.str(if i == 0 { ", cold parts " } else { " " });
        hex(&mut m, part);
    }
    m
}

/// Whether stacks get Python frames.
#[inline]
pub(crate) fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Whether the process runs CPython (see [`start`]).
pub(crate) fn is_cpython() -> bool {
    CPYTHON.load(Ordering::Relaxed)
}

/// The calling thread's thread state, kept between walks in static TLS
/// (see `thread_cache` for why not `thread_local!`): checked at each use
/// ([`walk::current_frame`]), looked up again in the thread lists when the
/// check fails. A thread without a thread state (not a Python thread, or
/// not yet) looks again when the first thread list's head has changed
/// since it last looked (a new thread state goes in at the head), and at
/// least every [`NO_STATE_RETRY`] stacks (a thread state is bound to its
/// thread after it joins the list).
#[repr(C)]
struct ThreadSlot {
    tstate: u64,
    /// Stacks left before a thread without a thread state looks again.
    retry_in: u64,
    /// The list heads when it last looked ([`walk::list_heads`]).
    heads: u64,
    /// The ranges its last walk read ([`read`]).
    plan: Plan,
    /// The pages its walks read directly ([`mapped`]).
    pages: PageCache,
    /// Its thread id, as of fork generation `tid_forks` (0: not known).
    tid: i32,
    tid_forks: u64,
}

/// Forks so far: a forked child's thread has another id.
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn after_fork_child() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    mapped::after_fork_child();
}

/// The calling thread's id, kept in its slot (gettid is a system call).
fn thread_id(slot: *mut ThreadSlot) -> i32 {
    let forks = FORKS.load(Ordering::Relaxed);
    // SAFETY: this thread's slot; a signal handler that interrupts the
    // update writes the same values.
    unsafe {
        if (*slot).tid == 0 || (*slot).tid_forks != forks {
            (*slot).tid = libc::gettid();
            (*slot).tid_forks = forks;
        }
        (*slot).tid
    }
}

/// See [`ThreadSlot`].
const NO_STATE_RETRY: u64 = 32;

#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".globl __profalloc_python_thread",
    ".hidden __profalloc_python_thread",
    ".p2align 3",
    ".type __profalloc_python_thread,@object",
    ".size __profalloc_python_thread, {size}",
    "__profalloc_python_thread:",
    ".zero {size}",
    ".popsection",
    size = const core::mem::size_of::<ThreadSlot>(),
);

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn thread_slot() -> *mut ThreadSlot {
    let p: usize;
    // SAFETY: reads the thread pointer and the symbol's TLS offset from
    // the GOT (initial-exec model); no memory is written.
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + __profalloc_python_thread@GOTTPOFF]",
            p = out(reg) p,
            options(pure, readonly, nostack),
        );
    }
    p as *mut ThreadSlot
}

#[cfg(not(target_arch = "x86_64"))]
std::thread_local! {
    static SLOT: UnsafeCell<ThreadSlot> =
        const { UnsafeCell::new(ThreadSlot { tstate: 0, retry_in: 0, heads: 0, plan: Plan::EMPTY, pages: PageCache::EMPTY, tid: 0, tid_forks: 0 }) };
}

#[cfg(not(target_arch = "x86_64"))]
fn thread_slot() -> *mut ThreadSlot {
    SLOT.with(|c| c.get())
}

/// The calling thread's innermost frame (0: none), or None when it has no
/// thread state. Err: its thread state's frame could not be read.
fn thread_frame(layout: &Layout, r: &mut Reader<'_>) -> Option<Result<u64, ()>> {
    let slot = thread_slot();
    // SAFETY: this thread's slot; a signal handler interrupting this
    // leaves at worst a stale tstate, which the next check rejects.
    let (cached, retry_in, heads) = unsafe { ((*slot).tstate, (*slot).retry_in, (*slot).heads) };
    if cached != 0 {
        match walk::current_frame(layout, r, cached) {
            Ok(frame) => return Some(Ok(frame)),
            Err(NoFrame::Unreadable) => return Some(Err(())),
            Err(NoFrame::NotOurs) => {}
        }
    }
    let now = walk::list_heads(layout, r);
    if cached == 0 && retry_in > 0 && now == heads {
        // SAFETY: as above.
        unsafe { (*slot).retry_in = retry_in - 1 };
        NO_STATE.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    LOOKUPS.fetch_add(1, Ordering::Relaxed);
    let found = walk::thread_state(layout, r);
    // SAFETY: as above.
    unsafe {
        (*slot).tstate = found.unwrap_or(0);
        (*slot).retry_in = if found.is_some() { 0 } else { NO_STATE_RETRY };
        (*slot).heads = now;
    }
    let Some(tstate) = found else {
        NO_STATE.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    Some(walk::current_frame(layout, r, tstate).map_err(|_| ()))
}

/// Walks the calling thread's Python frames into `w` (its slots hold code
/// addresses, and frame words when `intern` and gperftools mode names
/// frames). False when Python walks are off or the thread has no thread
/// state (`w` is then left empty).
pub(crate) fn walk_thread(intern: bool, w: &mut Walk) -> bool {
    w.len = 0;
    w.end = End::Complete;
    w.intern = intern && INTERN.load(Ordering::Relaxed);
    if !is_on() {
        return false;
    }
    // SAFETY: published by ON (checked above).
    let Some((layout, _)) = (unsafe { *FOUND.0.get() }) else {
        return false;
    };
    let slot = thread_slot();
    let tid = thread_id(slot);
    // SAFETY: this thread's slot; an interrupted update leaves at worst a
    // wrong plan, which only costs the ranges it names, or fewer pages.
    let (plan, mut pages) = unsafe { ((*slot).plan, (*slot).pages) };
    let readers = Readers::enter(&mut pages);
    let mut batch = [0u8; PLANNED_BYTES];
    let mut r = Reader::prefetch(tid, &plan, &mut batch, readers.direct.then_some(&pages));
    let Some(frame) = thread_frame(&layout, &mut r) else {
        // SAFETY: as above.
        unsafe { (*slot).plan = r.next };
        return false;
    };
    WALKS.fetch_add(1, Ordering::Relaxed);
    match frame {
        Ok(frame) => walk::walk(&layout, &mut r, frame, w),
        Err(()) => w.end = End::Broken,
    }
    let (next, from_kernel, n) = (r.next, r.from_kernel, r.n_from_kernel);
    KERNEL_WALKS.fetch_add(u64::from(n > 0), Ordering::Relaxed);
    // Only a walk that passed every check keeps its pages.
    if readers.direct && w.end != End::Broken {
        for &(addr, len) in &from_kernel[..n] {
            pages.keep(addr, len as usize);
        }
    }
    // SAFETY: as above.
    unsafe {
        (*slot).plan = next;
        (*slot).pages = pages;
    }
    drop(readers);
    CUT.fetch_add(u64::from(w.is_cut()), Ordering::Relaxed);
    true
}

/// The live heap's words of a walk (`profiler_common::hooks`) and their
/// code objects' checks, into `words` and `checks`.
fn live_words<'a>(
    w: &Walk,
    words: &'a mut [u64; MAX_SLOTS],
    checks: &'a mut [u32; MAX_SLOTS],
) -> PythonWords<'a> {
    for ((word, check), slot) in words
        .iter_mut()
        .zip(checks.iter_mut())
        .zip(&w.slots[..w.len])
    {
        (*word, *check) = if slot.code == ACTIVATION_END {
            (0, 0)
        } else {
            (live_python_word(slot.code, slot.instr_offset), slot.check)
        };
    }
    PythonWords {
        words: &words[..w.len],
        checks: &checks[..w.len],
        cut: w.is_cut(),
    }
}

/// Writes `native` (leaf first, return addresses after `native[0]`) into
/// `out` with the walk's named frames (`w`, from [`walk_thread`] with
/// `intern`) spliced in. Returns the frames written and whether frames were
/// lost (`out` full, or the Python walk cut).
pub(crate) fn splice_named(
    w: &Walk,
    native: &[u64],
    leaf_is_pc: bool,
    out: &mut [u64],
) -> (usize, bool) {
    // SAFETY: published by ON (a walk happened).
    let Some((_, eval)) = (unsafe { &*FOUND.0.get() }) else {
        return copy(native, out);
    };
    let cut = w.is_cut();
    let is_eval = |i: usize| {
        let pc = native[i] as usize;
        let pc = if i == 0 && leaf_is_pc {
            pc
        } else {
            pc.wrapping_sub(1)
        };
        eval.contains(pc)
    };
    let (mut n, mut full) = (0, false);
    let order: [u8; MAX_SLOTS] = core::array::from_fn(|i| i as u8);
    let is_end = |&i: &u8| w.slots[i as usize].code == ACTIVATION_END;
    let unmatched = splice(native.len(), is_eval, &order[..w.len], is_end, cut, |s| {
        let word = match s {
            Spliced::Native(i) => native[i],
            Spliced::Python { frame, .. } => w.words[frame as usize],
            Spliced::Truncated { .. } => names::TRUNCATED_WORD,
        };
        if n < out.len() {
            out[n] = word;
            n += 1;
        } else {
            full = true;
        }
    });
    UNMATCHED.fetch_add(unmatched as u64, Ordering::Relaxed);
    (n, full)
}

/// Calls `f` with the calling thread's Python stack (named for gperftools
/// mode when `named`) and, when `live`, its words for the live heap; with
/// None outside CPython, with Python frames off, or on a thread without a
/// thread state. Not inlined: the walk's buffers (a few KiB) stay off the
/// sampled path's frame, and cost nothing without Python.
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn with_stack(named: bool, live: bool, f: impl FnOnce(Option<&Walk>, PythonWords<'_>)) {
    if !is_on() {
        return f(None, PythonWords::NONE);
    }
    let mut w = Walk::empty();
    if !walk_thread(named, &mut w) {
        return f(None, PythonWords::NONE);
    }
    let mut words = [0; MAX_SLOTS];
    let mut checks = [0; MAX_SLOTS];
    let python = if live {
        live_words(&w, &mut words, &mut checks)
    } else {
        PythonWords::NONE
    };
    f(Some(&w), python)
}

/// [`walk_thread`] then [`splice_named`] (CPU profile stacks).
pub(crate) fn merge(native: &[u64], leaf_is_pc: bool, out: &mut [u64]) -> (usize, bool) {
    let mut w = Walk::empty();
    if !walk_thread(true, &mut w) {
        return copy(native, out);
    }
    splice_named(&w, native, leaf_is_pc, out)
}

fn copy(native: &[u64], out: &mut [u64]) -> (usize, bool) {
    let n = native.len().min(out.len());
    out[..n].copy_from_slice(&native[..n]);
    (n, n < native.len())
}
