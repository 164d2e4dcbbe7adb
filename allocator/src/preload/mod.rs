//! Preload mode: the gperftools habits on profalloc.
//!
//! - `HEAPPROFILE=prefix`: a stack for every sampled allocation (the
//!   always-on sampler of [`crate::sampler`]), dumps `prefix.NNNN.heap`
//!   in pprof format on the gperftools triggers and at exit
//!   ([`heap_profile`]).
//! - `HEAPCHECK=normal` / `PROFALLOC_HEAPCHECK=1`: every allocation gets
//!   a stack; at exit a conservative scan finds the unreachable objects
//!   ([`heap_check`]).
//! - `CPUPROFILE=file`: per-thread CPU-time timers and a SIGPROF handler
//!   ([`cpu_profile`]).
//!
//! Environment (read once, at the first allocation):
//! `HEAPPROFILE=prefix`; `HEAP_PROFILE_ALLOCATION_INTERVAL` (bytes,
//! default 1 GiB), `HEAP_PROFILE_INUSE_INTERVAL` (bytes, default 100 MiB),
//! `HEAP_PROFILE_TIME_INTERVAL` (seconds, default off), 0 turns a trigger
//! off; `PROFALLOC_SAMPLE_BYTES` (mean sampling distance, default 512 KiB);
//! `HEAPCHECK=normal` or `PROFALLOC_HEAPCHECK=1` (leak profile in
//! `$TMPDIR/profalloc.PID.leaks.heap`, rendered by `$PROFBPF_PATH` or
//! `prof-bpf` on PATH); `CPUPROFILE=file`, `CPUPROFILE_FREQUENCY` (Hz per
//! thread, default 100).
//!
//! Known limits: a program exec'd with the same environment writes the
//! same file names; the heap checker gives every object its own page
//! span (about 8 KiB of address space and one touched page each); as any
//! conservative scan, a word of the roots that happens to equal an
//! object's address keeps that object alive.
//!
//! Everything here runs inside the allocator (slow paths, exit) or in a
//! signal handler: no allocation on the profiled heap (memory comes from
//! [`arena`]), no libc call that may allocate, no lock the interrupted
//! code may hold.
pub mod arena;
pub mod cpu_profile;
pub mod env;
pub mod heap_check;
pub mod heap_profile;
pub mod objects;
pub mod pprof;
pub mod unwind;

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::os::Message;

/// Reads the environment and starts what it asks for. Called once from
/// the allocator's initialisation (first allocation, busy set).
pub fn init() {
    // SAFETY: called once, during single-threaded initialisation.
    unsafe { env::read() };
    let s = env::settings();
    if s.heap_prefix_len == 0 && !s.heap_check && s.cpu_file_len == 0 {
        return;
    }
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
    if s.heap_prefix_len > 0 && !s.heap_check && !prefix_dir_writable(s.heap_prefix()) {
        let mut m = Message::new();
        m.str("profalloc: warning: HEAPPROFILE=")
            .str(s.heap_prefix())
            .str(": cannot write in its directory (")
            .str(errno_text())
            .str("); heap profiling is off\n");
        m.write_stderr();
    } else if s.heap_prefix_len > 0 || s.heap_check {
        if heap_profile::start(s) {
            let mut m = Message::new();
            if s.heap_check {
                m.str("profalloc: heap checker on: recording a stack for every allocation\n");
            } else {
                m.str("profalloc: starting heap profile ")
                    .str(s.heap_prefix())
                    .str(".NNNN.heap\n");
            }
            m.write_stderr();
        } else {
            Message::new()
                .str("profalloc: warning: no memory for the heap profile tables\n")
                .write_stderr();
        }
    }
    if s.cpu_file_len > 0 {
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
    let mut c = [0u8; env::PATH_MAX + 1];
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
pub fn own_code() -> Option<(usize, usize)> {
    let end = OWN_END.load(Ordering::Relaxed);
    (end != 0).then(|| (OWN_START.load(Ordering::Relaxed), end))
}

/// The sampler's cold path: a sampled allocation succeeded.
#[inline]
pub fn sampled_alloc(ptr: *mut u8, size: usize, weight: u64) {
    if heap_profile::ON.load(Ordering::Relaxed) {
        heap_profile::record_alloc(ptr, size, weight);
    }
}

/// A sampled object is being freed. `reentrant`: the free runs on a
/// thread already inside the allocator (a signal handler).
#[inline]
pub fn sampled_free(ptr: *mut u8, reentrant: bool) {
    if heap_profile::ON.load(Ordering::Relaxed) {
        heap_profile::record_free(ptr, !reentrant);
    }
}

/// A thread set up its cache (its first allocation). CPU timers of new
/// threads are armed by `pthread_create` instead (threads that never
/// allocate are sampled too).
#[inline]
pub fn thread_started() {
    if env::settings().heap_check {
        // The heap checker records every allocation, this thread's first
        // one too: make the slow path that set up the cache sample it.
        // SAFETY: this thread's own cache, inside its slow path.
        unsafe { (*crate::thread_cache::tls()).countdown = -1 };
    }
}

/// The process exits (the allocator's destructor).
pub fn at_exit() {
    cpu_profile::at_exit();
    heap_check::at_exit();
    heap_profile::at_exit();
}

/// A spin lock with try_lock, for the profiler's tables.
pub struct Lock(AtomicBool);

impl Lock {
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }
    pub fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
    pub fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
    }
    pub fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Default for Lock {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `bytes` to `path` (created or truncated, mode 0644) with raw
/// system calls; the error names the cause.
pub fn write_file(path: &str, bytes: &[u8]) -> Result<(), &'static str> {
    let mut c = [0u8; env::PATH_MAX + 16];
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
pub fn errno_text() -> &'static str {
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

/// Makes sure the allocator (and with it the preload mode) is set up
/// before the program runs, even if it never allocates before creating
/// its first thread.
extern "C" fn init_before_main() {
    let p = crate::alloc::malloc(1);
    // SAFETY: p was just allocated (or is null).
    unsafe { crate::alloc::free(p) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT_BEFORE_MAIN: extern "C" fn() = init_before_main;
