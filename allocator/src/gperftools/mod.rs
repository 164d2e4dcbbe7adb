//! gperftools mode: the gperftools habits on profalloc, behind the
//! sampler ([`crate::sampler`] is its only caller in the allocator).
//!
//! - `HEAPPROFILE=prefix`: a stack for every sampled allocation (the
//!   always-on sampler), dumps `prefix.NNNN.heap` in pprof format on the
//!   gperftools triggers and at exit ([`heap_profile`]).
//! - `HEAPCHECK=normal` / `PROFALLOC_HEAPCHECK=1`: every allocation is
//!   recorded in place with its stack; at exit a conservative scan finds
//!   the unreachable objects ([`heap_check`]).
//! - `CPUPROFILE=file`: per-thread CPU-time timers and a SIGPROF handler
//!   ([`cpu_profile`]).
//!
//! Settings (read once by [`crate::env`], at the first allocation):
//! `HEAPPROFILE=prefix`; `HEAP_PROFILE_ALLOCATION_INTERVAL` (bytes,
//! default 1 GiB), `HEAP_PROFILE_INUSE_INTERVAL` (bytes, default 100 MiB),
//! `HEAP_PROFILE_TIME_INTERVAL` (seconds, default off), 0 turns a trigger
//! off; `PROFALLOC_SAMPLE_BYTES` (mean sampling distance, default 512 KiB);
//! `HEAPCHECK=normal` or `PROFALLOC_HEAPCHECK=1` (leak profile in
//! `$TMPDIR/profalloc.PID.leaks.heap`, rendered by `$PROFBPF_PATH` or
//! `prof-bpf` on PATH); `CPUPROFILE=file`, `CPUPROFILE_FREQUENCY` (Hz per
//! thread, default 100).
//!
//! Known limits: the heap checker records every object in a table entry
//! (about 40 bytes each, in its own mappings) and makes every free take the
//! slow path; as any conservative scan, a word of the roots that happens to
//! equal an object's address keeps that object alive.
//!
//! Everything here runs inside the allocator (slow paths, exit) or in a
//! signal handler: no allocation on the profiled heap (memory comes from
//! [`arena`]), no libc call that may allocate, no lock the interrupted
//! code may hold.
pub(crate) mod arena;
pub mod cpu_profile;
pub(crate) mod heap_check;
pub(crate) mod heap_profile;
pub(crate) mod objects;
pub(crate) mod pprof;
pub(crate) mod python;
/// libprofalloc.so's munmap runs the system call through it.
pub use python::unmapping;
pub(crate) mod unwind;

use core::{
    mem::MaybeUninit,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{
    env::{PATH_MAX, Settings},
    os::Message,
};

/// Makes allocation stacks available ([`Stack::fill`]): the object
/// table, the code ranges of this library and of the dynamic loader, and
/// in a CPython process its Python frames ([`python`]). Called once, from
/// the allocator's initialisation (first allocation, busy set), when
/// stacks are wanted (the live set or gperftools mode).
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn start_stacks(s: &Settings) {
    python::start(s.python_frames, s.gperftools_mode());
    objects::refresh();
    if let Some(o) = objects::this_library() {
        // Inside a program that links the allocator statically, its own
        // frames are the program's (the first object): keep them.
        let main = objects::all().first().map_or(0, |m| m.start);
        if o.start != main {
            OWN_START.store(o.start, Ordering::Relaxed);
            OWN_END.store(o.end, Ordering::Relaxed);
        }
    }
    // The dynamic loader is the object loaded at AT_BASE (none in a
    // static program).
    // SAFETY: getauxval has no preconditions and does not allocate.
    let base = unsafe { libc::getauxval(libc::AT_BASE) } as usize;
    if let Some(ld) = objects::all().iter().find(|o| base != 0 && o.bias == base) {
        LOADER_START.store(ld.start, Ordering::Relaxed);
        LOADER_END.store(ld.end, Ordering::Relaxed);
    }
}

/// Starts what the settings ask for. Called once by the sampler, from the
/// allocator's initialisation (first allocation, busy set), after
/// [`start_stacks`].
pub(crate) fn start(s: &Settings) {
    let heap_prefix = s.heap_prefix.as_str();
    if !heap_prefix.is_empty() && !s.heap_check && !prefix_dir_writable(heap_prefix) {
        let mut m = Message::new();
        m.str("profalloc: warning: HEAPPROFILE=")
            .str(heap_prefix)
            .str(": cannot write in its directory (")
            .str(errno_text())
            .str("); heap profiling is off\n");
        m.write_stderr();
    } else if !heap_prefix.is_empty() || s.heap_check {
        if heap_profile::start(s) {
            let mut m = Message::new();
            if s.heap_check {
                m.str("profalloc: heap checker on: recording a stack for every allocation\n");
            } else {
                m.str("profalloc: starting heap profile ")
                    .str(heap_prefix)
                    .str(".NNNN.heap\n");
            }
            m.write_stderr();
        } else {
            Message::new()
                .str("profalloc: warning: no memory for the heap profile tables\n")
                .write_stderr();
        }
    }
    if !s.cpu_file.is_empty() {
        cpu_profile::start(s);
    }
}

/// Whether the directory of a dump prefix exists and is writable.
fn prefix_dir_writable(prefix: &str) -> bool {
    let dir = match prefix.rfind('/') {
        Some(0) => "/",
        Some(i) => &prefix[..i],
        None => ".",
    };
    let mut c = [0u8; PATH_MAX + 1];
    c[..dir.len()].copy_from_slice(dir.as_bytes());
    // SAFETY: c is NUL-terminated; the descriptor is closed at once.
    unsafe {
        let fd = libc::open(
            c.as_ptr().cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        libc::close(fd);
        libc::access(c.as_ptr().cast(), libc::W_OK | libc::X_OK) == 0
    }
}

static OWN_START: AtomicUsize = AtomicUsize::new(0);
static OWN_END: AtomicUsize = AtomicUsize::new(0);

/// The code range of libprofalloc.so (frames to drop from the top of an
/// allocation's stack), when it is a library of its own.
pub(crate) fn own_code() -> Option<(usize, usize)> {
    let end = OWN_END.load(Ordering::Relaxed);
    (end != 0).then(|| (OWN_START.load(Ordering::Relaxed), end))
}

static LOADER_START: AtomicUsize = AtomicUsize::new(0);
static LOADER_END: AtomicUsize = AtomicUsize::new(0);

/// The code range of the dynamic loader (ld.so), when there is one.
pub(crate) fn loader_code() -> Option<(usize, usize)> {
    let end = LOADER_END.load(Ordering::Relaxed);
    (end != 0).then(|| (LOADER_START.load(Ordering::Relaxed), end))
}

/// Whether gperftools mode records allocation stacks (HEAPPROFILE or the
/// heap checker).
#[inline]
pub(crate) fn records_stacks() -> bool {
    heap_profile::ON.load(Ordering::Relaxed)
}

/// A sampled (or recorded) allocation succeeded, allocated from `stack`.
#[inline]
pub(crate) fn record_alloc(ptr: *mut u8, size: usize, weight: u64, stack: &Stack) {
    if records_stacks() {
        heap_profile::record_alloc(ptr, size, weight, stack);
    }
}

/// The stack of an allocation: return addresses, innermost first, from the
/// caller of the allocator's entry point (this library's own frames are
/// dropped when it is a library of its own).
///
/// The frames come last, apart from the words [`Self::empty`] sets: stores
/// next to an uninitialised array are merged by the compiler into one
/// memset over the whole of it.
#[repr(C)]
pub(crate) struct Stack {
    start: usize,
    end: usize,
    truncated: bool,
    /// Written up to `end` by [`Self::fill`]; never zeroed (half a KiB
    /// per sample, of which a walk fills a few words).
    frames: [MaybeUninit<u64>; heap_profile::MAX_FRAMES + 1],
}

impl Stack {
    /// No frames yet (see [`Self::fill`]).
    #[inline(always)]
    pub(crate) fn empty() -> Self {
        Self {
            start: 0,
            end: 0,
            truncated: false,
            frames: [MaybeUninit::uninit(); heap_profile::MAX_FRAMES + 1],
        }
    }

    /// Captures the current thread's native stack (from the in-process
    /// unwinder) in place. Inlined into the sampled path: the walk starts
    /// in that path's frame, one step from the program's, and the frames
    /// are never moved (a Stack returned by value is copied, half a KiB).
    #[inline(always)]
    pub(crate) fn fill(&mut self) {
        let (n, status) = unwind::walk_here(&mut self.frames);
        // SAFETY: the walk wrote the first n frames.
        let walked = unsafe { initialised(&self.frames[..n]) };
        self.start = match own_code() {
            Some((lo, hi)) => walked
                .iter()
                .take_while(|&&pc| (lo..hi).contains(&(pc as usize)))
                .count(),
            None => 0,
        };
        self.set_end(n, status == unwind::Status::Truncated);
    }

    /// Splices the thread's named Python frames (`w`, walked with names)
    /// into the native stack, for gperftools mode's tables.
    pub(crate) fn splice_python(&mut self, w: &python::Walk) {
        let mut merged = [0u64; heap_profile::MAX_FRAMES + 1];
        let (m, lost) = python::splice_named(w, self.frames(), false, &mut merged);
        for (to, &pc) in self.frames.iter_mut().zip(&merged[..m]) {
            to.write(pc);
        }
        self.start = 0;
        let truncated = self.truncated || lost;
        self.set_end(m, truncated);
    }

    fn set_end(&mut self, n: usize, truncated: bool) {
        (self.end, self.truncated) = if n - self.start > heap_profile::MAX_FRAMES {
            (self.start + heap_profile::MAX_FRAMES, true)
        } else {
            (n, truncated)
        };
    }

    pub(crate) fn frames(&self) -> &[u64] {
        // SAFETY: fill wrote every frame below end.
        unsafe { initialised(&self.frames[self.start..self.end]) }
    }

    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }
}

/// The frames of `s` as integers.
///
/// # Safety
/// Every element of `s` has been written.
unsafe fn initialised(s: &[MaybeUninit<u64>]) -> &[u64] {
    // SAFETY: MaybeUninit<u64> has u64's layout; the caller vouches that
    // each element is initialised.
    unsafe { core::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// A sampled (or recorded) object is being freed. `reentrant`: the free
/// runs on a thread already inside the allocator (a signal handler).
#[inline]
pub(crate) fn record_free(ptr: *mut u8, reentrant: bool) {
    if heap_profile::ON.load(Ordering::Relaxed) {
        heap_profile::record_free(ptr, !reentrant);
    }
}

/// The process exits (the allocator's destructor).
pub(crate) fn at_exit() {
    cpu_profile::at_exit();
    heap_check::at_exit();
    heap_profile::at_exit();
}

/// Seconds on the monotonic clock (the heap profile's time trigger).
pub(crate) fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// Writes `bytes` to `path` (created or truncated, mode 0644) with raw
/// system calls; the error names the cause.
pub(crate) fn write_file(path: &str, bytes: &[u8]) -> Result<(), &'static str> {
    let mut c = [0u8; PATH_MAX + 16];
    if path.len() >= c.len() {
        return Err("path too long");
    }
    c[..path.len()].copy_from_slice(path.as_bytes());
    // SAFETY: c is NUL-terminated; the fd is closed below.
    let fd = unsafe {
        libc::open(
            c.as_ptr().cast(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(errno_text());
    }
    let mut done = 0;
    let mut result = Ok(());
    while done < bytes.len() {
        // SAFETY: the range is in bounds.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n <= 0 {
            result = Err(errno_text());
            break;
        }
        done += n as usize;
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    result
}

/// The current errno as text (strerror may allocate for translations).
pub(crate) fn errno_text() -> &'static str {
    // SAFETY: this thread's errno slot.
    match unsafe { *libc::__errno_location() } {
        libc::ENOENT => "No such file or directory",
        libc::EACCES => "Permission denied",
        libc::EROFS => "Read-only file system",
        libc::ENOSPC => "No space left on device",
        libc::ENOTDIR => "Not a directory",
        libc::EISDIR => "Is a directory",
        libc::EDQUOT => "Disk quota exceeded",
        libc::ENAMETOOLONG => "File name too long",
        libc::EPERM => "Operation not permitted",
        _ => "I/O error",
    }
}
