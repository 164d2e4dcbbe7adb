//! The preload mode's settings, read once from the environment (the
//! gperftools names, plus PROFALLOC_HEAPCHECK and PROFBPF_PATH).
use core::sync::atomic::Ordering;

use crate::sampler;

pub const PATH_MAX: usize = 1024;

pub struct Settings {
    pub heap_prefix: [u8; PATH_MAX],
    pub heap_prefix_len: usize,
    /// HEAP_PROFILE_ALLOCATION_INTERVAL, HEAP_PROFILE_INUSE_INTERVAL
    /// (bytes) and HEAP_PROFILE_TIME_INTERVAL (seconds); 0 = off.
    pub alloc_interval: u64,
    pub inuse_interval: u64,
    pub time_interval: u64,
    pub heap_check: bool,
    pub cpu_file: [u8; PATH_MAX],
    pub cpu_file_len: usize,
    pub cpu_frequency: u64,
}

struct Shared(core::cell::UnsafeCell<Settings>);
// SAFETY: written once by `read`, before anything reads it (the first
// allocation's slow path, single-threaded initialisation).
unsafe impl Sync for Shared {}
static SETTINGS: Shared = Shared(core::cell::UnsafeCell::new(Settings {
    heap_prefix: [0; PATH_MAX],
    heap_prefix_len: 0,
    alloc_interval: 1 << 30,
    inuse_interval: 100 << 20,
    time_interval: 0,
    heap_check: false,
    cpu_file: [0; PATH_MAX],
    cpu_file_len: 0,
    cpu_frequency: 100,
}));

pub fn settings() -> &'static Settings {
    // SAFETY: see Shared.
    unsafe { &*SETTINGS.0.get() }
}

impl Settings {
    pub fn heap_prefix(&self) -> &str {
        core::str::from_utf8(&self.heap_prefix[..self.heap_prefix_len]).unwrap_or("")
    }
    pub fn cpu_file(&self) -> &str {
        core::str::from_utf8(&self.cpu_file[..self.cpu_file_len]).unwrap_or("")
    }
}

/// The raw value of an environment variable (getenv does not allocate).
pub fn var(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns null or a NUL-terminated string that lives
    // as long as the environment is not modified.
    unsafe {
        let v = libc::getenv(name.as_ptr());
        if v.is_null() {
            None
        } else {
            Some(core::ffi::CStr::from_ptr(v).to_bytes())
        }
    }
}

fn number(name: &core::ffi::CStr) -> Option<u64> {
    let v = var(name)?;
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn copy(dst: &mut [u8; PATH_MAX], src: &[u8]) -> usize {
    let n = src.len().min(PATH_MAX - 1);
    dst[..n].copy_from_slice(&src[..n]);
    n
}

/// A file name or prefix from `name` that is this process's own, as
/// gperftools makes it: the first process to read the variable uses it as
/// is and sets the high bit of its first byte in the environment; programs
/// it runs inherit the marked value and append `_PID`, so that parent and
/// children never write the same files. Returns the length written to
/// `dst` (0 when the variable is unset or empty).
fn unique_path(name: &core::ffi::CStr, dst: &mut [u8; PATH_MAX]) -> usize {
    // SAFETY: getenv returns null or a NUL-terminated string in the
    // environment, which is writable memory (the initial stack, or a
    // string given to putenv/setenv).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return 0;
    }
    // SAFETY: as above.
    let bytes = unsafe { core::ffi::CStr::from_ptr(value) }.to_bytes();
    let Some(&first) = bytes.first() else {
        return 0;
    };
    let mut n = copy(dst, bytes);
    if first & 0x80 != 0 {
        dst[0] = first & 0x7f;
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u64;
        let mut suffix = crate::os::Message::new();
        suffix.str("_").dec(pid);
        for &b in suffix.as_bytes() {
            if n < PATH_MAX - 1 {
                dst[n] = b;
                n += 1;
            }
        }
    } else {
        // SAFETY: `value` points at the variable's first byte (non-empty).
        unsafe { *value = (first | 0x80) as libc::c_char };
    }
    n
}

/// Reads the settings.
///
/// # Safety
/// Called once, before any other thread uses the settings.
pub unsafe fn read() {
    // SAFETY: the caller's contract.
    let s = unsafe { &mut *SETTINGS.0.get() };
    s.heap_prefix_len = unique_path(c"HEAPPROFILE", &mut s.heap_prefix);
    if let Some(n) = number(c"HEAP_PROFILE_ALLOCATION_INTERVAL") {
        s.alloc_interval = n;
    }
    if let Some(n) = number(c"HEAP_PROFILE_INUSE_INTERVAL") {
        s.inuse_interval = n;
    }
    if let Some(n) = number(c"HEAP_PROFILE_TIME_INTERVAL") {
        s.time_interval = n;
    }
    let check = var(c"HEAPCHECK").is_some_and(|v| !v.is_empty() && v != b"0")
        || number(c"PROFALLOC_HEAPCHECK").is_some_and(|n| n != 0);
    s.heap_check = check;
    s.cpu_file_len = unique_path(c"CPUPROFILE", &mut s.cpu_file);
    if let Some(n) = number(c"CPUPROFILE_FREQUENCY").filter(|&n| n > 0) {
        s.cpu_frequency = n.min(4000);
    }
    if check {
        // Every allocation is recorded: a stack for each, weight = size,
        // in place (see `sampler::RECORD_ALL`).
        sampler::profalloc_sample_bytes.store(1, Ordering::Relaxed);
        sampler::RECORD_ALL.store(true, Ordering::Relaxed);
    }
}

pub fn sample_rate() -> u64 {
    sampler::rate()
}

pub fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}
