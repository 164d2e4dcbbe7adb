//! The settings, read once from the environment at the allocator's first
//! initialisation (its first slow path, single-threaded). This is the only
//! place that calls `getenv`: the core's knobs (`PROFALLOC_SAMPLE_BYTES`,
//! `PROFALLOC_RELEASE_BYTES`, `PROFALLOC_BACKGROUND_RELEASE`, `PROFALLOC_STATS`,
//! `PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`) and gperftools mode's
//! (the gperftools names, `PROFALLOC_HEAPCHECK`, `PROFALLOC_PYTHON`,
//! `PROFBPF_PATH` and `TMPDIR`).
//!
//! Owner: `alloc::lifecycle` reads them; everything else only reads the
//! result through [`settings`]. No lock: written once before any reader.
//! [`for_each_entry`] walks the environment as it is now, for a child's.

pub(crate) const PATH_MAX: usize = 1024;

/// A string setting in a fixed buffer (getenv's result may change when the
/// program edits its environment; the allocator may not allocate a copy).
pub(crate) struct Text {
    bytes: [u8; PATH_MAX],
    len: usize,
}

impl Text {
    const fn empty() -> Self {
        Self {
            bytes: [0; PATH_MAX],
            len: 0,
        }
    }

    fn set(&mut self, src: &[u8]) {
        let n = src.len().min(PATH_MAX - 1);
        self.bytes[..n].copy_from_slice(&src[..n]);
        self.len = n;
    }

    pub(crate) fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub(crate) struct Settings {
    /// PROFALLOC_SAMPLE_BYTES: mean sampling distance (0 = off).
    pub(crate) sample_bytes: Option<u64>,
    /// PROFALLOC_RELEASE_BYTES: page heap release rate.
    pub(crate) release_bytes: Option<u64>,
    /// PROFALLOC_BACKGROUND_RELEASE: 0 = no idle-release thread.
    pub(crate) background_release: Option<u64>,
    /// PROFALLOC_LIVE_HEAP_BYTES: cap of the sampled live heap (0 = off).
    pub(crate) live_heap_bytes: Option<u64>,
    /// PROFALLOC_STATS=1: statistics on stderr at exit.
    pub(crate) stats_at_exit: bool,
    /// PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES: the budget of all thread
    /// caches.
    pub(crate) max_total_thread_cache_bytes: Option<u64>,
    /// HEAPPROFILE: the dump prefix (this process's own, see `unique_path`).
    pub(crate) heap_prefix: Text,
    /// HEAP_PROFILE_ALLOCATION_INTERVAL, HEAP_PROFILE_INUSE_INTERVAL
    /// (bytes) and HEAP_PROFILE_TIME_INTERVAL (seconds); 0 = off.
    pub(crate) alloc_interval: u64,
    pub(crate) inuse_interval: u64,
    pub(crate) time_interval: u64,
    /// HEAPCHECK (any value but "0") or PROFALLOC_HEAPCHECK=1.
    pub(crate) heap_check: bool,
    /// TMPDIR: where the heap checker writes its leak profile ("/tmp").
    pub(crate) leak_dir: Text,
    /// PROFBPF_PATH: the program that renders the leak profile.
    pub(crate) report_program: Text,
    /// CPUPROFILE (this process's own file) and CPUPROFILE_FREQUENCY.
    pub(crate) cpu_file: Text,
    pub(crate) cpu_frequency: u64,
    /// PROFALLOC_PYTHON=0: no Python frames in the stacks of a CPython
    /// process (native frames only, and no cost per stack).
    pub(crate) python_frames: bool,
}

impl Settings {
    const fn defaults() -> Self {
        Self {
            sample_bytes: None,
            release_bytes: None,
            background_release: None,
            live_heap_bytes: None,
            stats_at_exit: false,
            max_total_thread_cache_bytes: None,
            heap_prefix: Text::empty(),
            alloc_interval: 1 << 30,
            inuse_interval: 100 << 20,
            time_interval: 0,
            heap_check: false,
            leak_dir: Text::empty(),
            report_program: Text::empty(),
            cpu_file: Text::empty(),
            cpu_frequency: 100,
            python_frames: true,
        }
    }

    /// Whether gperftools mode has anything to do.
    pub(crate) fn gperftools_mode(&self) -> bool {
        !self.heap_prefix.is_empty() || self.heap_check || !self.cpu_file.is_empty()
    }
}

struct Shared(core::cell::UnsafeCell<Settings>);
// SAFETY: written once by `read`, before anything reads it (the first
// allocation's slow path, single-threaded initialisation).
unsafe impl Sync for Shared {}
static SETTINGS: Shared = Shared(core::cell::UnsafeCell::new(Settings::defaults()));

pub(crate) fn settings() -> &'static Settings {
    // SAFETY: see Shared.
    unsafe { &*SETTINGS.0.get() }
}

/// The raw value of an environment variable (getenv does not allocate).
fn var(name: &core::ffi::CStr) -> Option<&'static [u8]> {
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

/// Calls `f` with each `NAME=value` entry of the environment as the
/// program has it now (the C string and its bytes): what a child
/// inherits.
pub(crate) fn for_each_entry(mut f: impl FnMut(*const libc::c_char, &[u8])) {
    unsafe extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: environ is null or a null-terminated array of C strings.
    unsafe {
        let mut e = environ;
        while !e.is_null() && !(*e).is_null() {
            f(*e, core::ffi::CStr::from_ptr(*e).to_bytes());
            e = e.add(1);
        }
    }
}

/// A decimal number: digits only, no sign, no overflow.
fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn number(name: &core::ffi::CStr) -> Option<u64> {
    parse_u64(var(name)?)
}

/// HEAPCHECK's values: gperftools accepts a mode name; "0" or empty is off.
fn heap_check_on(heapcheck: Option<&[u8]>, profalloc_heapcheck: Option<u64>) -> bool {
    heapcheck.is_some_and(|v| !v.is_empty() && v != b"0")
        || profalloc_heapcheck.is_some_and(|n| n != 0)
}

/// A file name or prefix from `name` that is this process's own, as
/// gperftools makes it: the first process to read the variable uses it as
/// is and sets the high bit of its first byte in the environment; programs
/// it runs inherit the marked value and append `_PID`, so that parent and
/// children never write the same files. Leaves `dst` empty when the
/// variable is unset or empty.
#[unsafe(link_section = ".text.hot.profalloc")]
fn unique_path(name: &core::ffi::CStr, dst: &mut Text) {
    // SAFETY: getenv returns null or a NUL-terminated string in the
    // environment, which is writable memory (the initial stack, or a
    // string given to putenv/setenv).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return;
    }
    // SAFETY: as above.
    let bytes = unsafe { core::ffi::CStr::from_ptr(value) }.to_bytes();
    let Some(&first) = bytes.first() else {
        return;
    };
    dst.set(bytes);
    if first & 0x80 != 0 {
        dst.bytes[0] = first & 0x7f;
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u64;
        let mut suffix = crate::os::Message::new();
        suffix.str("_").dec(pid);
        for &b in suffix.as_bytes() {
            if dst.len < PATH_MAX - 1 {
                dst.bytes[dst.len] = b;
                dst.len += 1;
            }
        }
    } else {
        // SAFETY: `value` points at the variable's first byte (non-empty).
        unsafe { *value = (first | 0x80) as libc::c_char };
    }
}

/// Reads the settings.
///
/// # Safety
/// Called once, before any other thread uses the settings.
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) unsafe fn read() {
    // SAFETY: the caller's contract.
    let s = unsafe { &mut *SETTINGS.0.get() };
    s.sample_bytes = number(c"PROFALLOC_SAMPLE_BYTES");
    s.release_bytes = number(c"PROFALLOC_RELEASE_BYTES");
    s.background_release = number(c"PROFALLOC_BACKGROUND_RELEASE");
    s.live_heap_bytes = number(c"PROFALLOC_LIVE_HEAP_BYTES");
    s.stats_at_exit = number(c"PROFALLOC_STATS").is_some_and(|v| v != 0);
    s.max_total_thread_cache_bytes = number(c"PROFALLOC_MAX_TOTAL_THREAD_CACHE_BYTES");
    unique_path(c"HEAPPROFILE", &mut s.heap_prefix);
    if let Some(n) = number(c"HEAP_PROFILE_ALLOCATION_INTERVAL") {
        s.alloc_interval = n;
    }
    if let Some(n) = number(c"HEAP_PROFILE_INUSE_INTERVAL") {
        s.inuse_interval = n;
    }
    if let Some(n) = number(c"HEAP_PROFILE_TIME_INTERVAL") {
        s.time_interval = n;
    }
    s.heap_check = heap_check_on(var(c"HEAPCHECK"), number(c"PROFALLOC_HEAPCHECK"));
    match var(c"TMPDIR").filter(|t| !t.is_empty() && t.len() < PATH_MAX / 2) {
        Some(t) => s.leak_dir.set(t),
        None => s.leak_dir.set(b"/tmp"),
    }
    match var(c"PROFBPF_PATH").filter(|p| !p.is_empty()) {
        Some(p) => s.report_program.set(p),
        None => s.report_program.set(b"prof-bpf"),
    }
    unique_path(c"CPUPROFILE", &mut s.cpu_file);
    if let Some(n) = number(c"CPUPROFILE_FREQUENCY").filter(|&n| n > 0) {
        s.cpu_frequency = n.min(4000);
    }
    s.python_frames = number(c"PROFALLOC_PYTHON") != Some(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_plain_decimal_without_overflow() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"524288"), Some(524_288));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        for bad in [&b""[..], b"-1", b"1k", b" 1", b"0x10"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn heap_check_values() {
        assert!(heap_check_on(Some(b"normal"), None));
        assert!(heap_check_on(Some(b"strict"), None));
        assert!(!heap_check_on(Some(b"0"), None));
        assert!(!heap_check_on(Some(b""), None));
        assert!(!heap_check_on(None, None));
        assert!(heap_check_on(None, Some(1)));
        assert!(!heap_check_on(None, Some(0)));
    }

    #[test]
    fn text_keeps_room_for_a_terminator() {
        let mut t = Text::empty();
        t.set(&[b'a'; PATH_MAX + 10]);
        assert_eq!(t.as_bytes().len(), PATH_MAX - 1);
        t.set(b"/tmp/x");
        assert_eq!(t.as_str(), "/tmp/x");
        assert!(!t.is_empty());
    }
}
