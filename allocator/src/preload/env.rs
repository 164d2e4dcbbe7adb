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

/// Reads the settings.
///
/// # Safety
/// Called once, before any other thread uses the settings.
pub unsafe fn read() {
    // SAFETY: the caller's contract.
    let s = unsafe { &mut *SETTINGS.0.get() };
    if let Some(p) = var(c"HEAPPROFILE").filter(|p| !p.is_empty()) {
        s.heap_prefix_len = copy(&mut s.heap_prefix, p);
    }
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
    if let Some(p) = var(c"CPUPROFILE").filter(|p| !p.is_empty()) {
        s.cpu_file_len = copy(&mut s.cpu_file, p);
    }
    if let Some(n) = number(c"CPUPROFILE_FREQUENCY").filter(|&n| n > 0) {
        s.cpu_frequency = n.min(4000);
    }
    if check {
        // Every allocation is sampled: a stack for each, weight = size.
        sampler::profalloc_sample_bytes.store(1, Ordering::Relaxed);
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
