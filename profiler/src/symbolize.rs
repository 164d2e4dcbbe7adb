//! Addresses to names, in two steps.
//!
//! 1. [`Normalizer`]: while a process is alive, an absolute address becomes
//!    (object, file offset), using a cached copy of the process's executable
//!    mappings. The object file is opened at that moment, so it can still be
//!    read after the process exited or the file was replaced or deleted, and
//!    inside other mount namespaces. JIT code is named from the process's
//!    perf map (`/tmp/perf-PID.map`) at the same time.
//! 2. [`SymbolCache::frames`]: later, addresses of one object are looked up
//!    with blazesym in one batch: ELF symbols, DWARF (file:line, inlined
//!    functions), `.gnu_debuglink` and `/usr/lib/debug/.build-id` files,
//!    demangled C++ and Rust names; kernel addresses through `/proc/kallsyms`.
//!    The profile model drives it (`Profile::symbolize`); this module knows
//!    nothing of profiles, and its [`Frame`] is what their locations hold.
//!
//! An address that no symbol covers stays unresolved (`lib.so+0x1a2b`): blazesym
//! only gives a name when the address lies inside the symbol's extent (or is
//! the exact start of a sizeless symbol), so a stripped binary's static
//! function is never labelled with the nearest exported one.
use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use crate::process;

/// A function at an address: what symbolization yields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name.
    pub function: String,
    /// Source file, empty when unknown.
    pub file: String,
    /// Source line, 0 when unknown.
    pub line: i64,
    /// This call was inlined into the next frame of the location.
    pub inlined: bool,
}

impl Frame {
    pub fn named(function: impl Into<String>) -> Self {
        Self {
            function: function.into(),
            ..Self::default()
        }
    }
}

/// An object file mapped by profiled processes, opened when first seen.
#[derive(Debug)]
pub(crate) struct Object {
    /// The path as the process saw it.
    pub(crate) path: String,
    /// GNU build-id, lower-case hex; empty when the file has none.
    pub(crate) build_id: String,
    /// Size of the file, bounding its file offsets.
    pub(crate) size: u64,
    /// The open file (kept open so that it outlives the process; shared
    /// for the vDSO's image).
    file: Option<Arc<File>>,
}

impl Object {
    /// Where to read the object now: its own path when that is still the
    /// same file (so blazesym finds debug links next to it), else the
    /// descriptor opened while the process lived.
    pub(crate) fn local_path(&self) -> Option<PathBuf> {
        let file = self.file.as_ref()?;
        let opened = file.metadata().ok()?;
        let same = Path::new(&self.path)
            .metadata()
            .is_ok_and(|m| m.dev() == opened.dev() && m.ino() == opened.ino());
        if same {
            Some(PathBuf::from(&self.path))
        } else {
            use std::os::fd::AsRawFd as _;
            Some(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
        }
    }
}

/// Where an absolute user address landed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Normalized {
    /// In an object file: index into [`Normalizer::objects`] and file offset.
    File { object: usize, offset: u64 },
    /// JIT code named by the process's perf map.
    Jit { name: String },
    /// In an executable mapping that is not a file (`[vdso]`, anonymous code
    /// without a perf map entry): its name and the offset into it.
    Anon { name: String, offset: u64 },
}

/// One executable mapping of a process.
#[derive(Clone, Debug)]
struct ExecMapping {
    start: u64,
    end: u64,
    offset: u64,
    target: MappingTarget,
}

#[derive(Clone, Debug)]
enum MappingTarget {
    Object(usize),
    /// Not a file: pseudo name (`[vdso]`) or empty for anonymous memory.
    Anon(String),
}

#[derive(Debug, Default)]
struct ProcessState {
    mappings: Vec<ExecMapping>,
    read_at: Option<Instant>,
    perf_map: Vec<(u64, u64, String)>,
    perf_map_read_at: Option<Instant>,
}

/// Do not re-read a process's maps more often than this when addresses miss
/// (garbage frames would otherwise cost a maps read each).
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Normalizes absolute addresses of live processes (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Normalizer {
    pub(crate) objects: Vec<Object>,
    /// (device, inode) of each opened object.
    by_identity: HashMap<(u64, u64), usize>,
    processes: HashMap<u32, ProcessState>,
    /// The vDSO as an object, once dumped (`Some(None)`: dumping failed).
    vdso: Option<Option<usize>>,
    /// Mappings shared with other normalizers, when a long-running
    /// profiler keeps them (see [`MapsCache`]).
    shared: Option<Arc<MapsCache>>,
}

impl Normalizer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Reads `pid`'s mappings now; returns false when the process is gone.
    pub(crate) fn note_process(&mut self, pid: u32) -> bool {
        if let Some(shared) = &self.shared {
            let Some(read) = shared.maps(pid) else {
                return false;
            };
            self.note_read(pid, &read.maps, read.at);
            return true;
        }
        // A program that exited early is known from the mappings kept at its exec.
        let Ok(maps) = process::maps_or_remembered(pid) else {
            return false;
        };
        self.note_maps(pid, &maps);
        true
    }

    /// Reads mappings through `cache`, shared with other normalizers.
    pub(crate) fn share_maps(&mut self, cache: Arc<MapsCache>) {
        self.shared = Some(cache);
    }

    /// Takes `maps` as `pid`'s mappings (read by the caller while the
    /// process lived, or just now): its addresses are placed with them
    /// even after it exits.
    pub(crate) fn note_maps(&mut self, pid: u32, maps: &[process::Mapping]) {
        self.note_read(pid, maps, Instant::now());
    }

    fn note_read(&mut self, pid: u32, maps: &[process::Mapping], at: Instant) {
        let mut mappings = Vec::new();
        for m in maps.iter().filter(|m| m.is_executable()) {
            let target = if m.path == "[vdso]" {
                match self.vdso_object() {
                    Some(o) => MappingTarget::Object(o),
                    None => MappingTarget::Anon(m.path.clone()),
                }
            } else if m.is_file() {
                match self.object_for(pid, m) {
                    Some(o) => MappingTarget::Object(o),
                    None => MappingTarget::Anon(m.path.clone()),
                }
            } else {
                MappingTarget::Anon(m.path.clone())
            };
            mappings.push(ExecMapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                target,
            });
        }
        let state = self.processes.entry(pid).or_default();
        state.mappings = mappings;
        state.read_at = Some(at);
    }

    /// The object of `pid`'s executable (`/proc/PID/exe`), once
    /// [`Normalizer::note_process`] has seen it mapped.
    pub(crate) fn executable(&self, pid: u32) -> Option<usize> {
        let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        self.by_identity.get(&(meta.dev(), meta.ino())).copied()
    }

    /// Normalizes `addr` of `pid`, re-reading the process's maps once when it
    /// falls outside every known executable mapping. `None`: not code.
    pub(crate) fn normalize(&mut self, pid: u32, addr: u64) -> Option<Normalized> {
        if let Some(n) = self.lookup(pid, addr) {
            return Some(n);
        }
        if let Some(shared) = self.shared.clone() {
            let Some(seen) = self.processes.get(&pid).and_then(|s| s.read_at) else {
                return if self.note_process(pid) {
                    self.lookup(pid, addr)
                } else {
                    None
                };
            };
            let read = shared.after_miss(pid, seen)?;
            self.note_read(pid, &read.maps, read.at);
            let placed = self.lookup(pid, addr);
            if placed.is_some() {
                shared.placed(pid);
            }
            return placed;
        }
        let stale = self
            .processes
            .get(&pid)
            .and_then(|s| s.read_at)
            .is_none_or(|t| t.elapsed() >= REFRESH_INTERVAL);
        if stale && self.note_process(pid) {
            return self.lookup(pid, addr);
        }
        None
    }

    fn lookup(&mut self, pid: u32, addr: u64) -> Option<Normalized> {
        let state = self.processes.get(&pid)?;
        let i = state.mappings.partition_point(|m| m.end <= addr);
        let m = state.mappings.get(i).filter(|m| m.start <= addr)?;
        let offset = addr - m.start + m.offset;
        match &m.target {
            MappingTarget::Object(object) => Some(Normalized::File {
                object: *object,
                offset,
            }),
            MappingTarget::Anon(name) => {
                let name = name.clone();
                let start = m.start;
                if name.is_empty() || name.starts_with("[anon") {
                    if let Some(jit) = self.perf_map_name(pid, addr) {
                        return Some(Normalized::Jit { name: jit });
                    }
                    return Some(Normalized::Anon {
                        name: "[anon]".to_owned(),
                        offset: addr - start,
                    });
                }
                Some(Normalized::Anon { name, offset })
            }
        }
    }

    /// The JIT symbol covering `addr` in `/tmp/perf-PID.map` (the perf map
    /// convention of V8, the JVM's perf-map-agent, Python 3.12's -X perf...).
    fn perf_map_name(&mut self, pid: u32, addr: u64) -> Option<String> {
        let state = self.processes.get_mut(&pid)?;
        let find = |map: &[(u64, u64, String)]| {
            let i = map.partition_point(|(start, _, _)| *start <= addr);
            let (start, size, name) = map.get(i.checked_sub(1)?)?;
            (addr < start + size).then(|| name.clone())
        };
        if let Some(name) = find(&state.perf_map) {
            return Some(name);
        }
        // JIT compilers append to the map as they go: re-read on a miss.
        if state
            .perf_map_read_at
            .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL)
        {
            return None;
        }
        state.perf_map_read_at = Some(Instant::now());
        let path = process::path_in_root(pid, &format!("/tmp/perf-{pid}.map"));
        let text = std::fs::read_to_string(path).ok()?;
        state.perf_map = parse_perf_map(&text);
        find(&state.perf_map)
    }

    /// The vDSO, which is no file: every 64-bit process of this kernel maps
    /// the same image, so this process's copy, saved to an unlinked file,
    /// symbolizes everyone's (`__vdso_clock_gettime`...).
    fn vdso_object(&mut self) -> Option<usize> {
        if let Some(done) = self.vdso {
            return done;
        }
        let object = own_vdso().map(|(file, build_id, size)| {
            self.objects.push(Object {
                path: "[vdso]".to_owned(),
                build_id: build_id.clone(),
                size: *size,
                file: Some(Arc::clone(file)),
            });
            self.objects.len() - 1
        });
        self.vdso = Some(object);
        object
    }

    fn object_for(&mut self, pid: u32, m: &process::Mapping) -> Option<usize> {
        // Opened already (by this normalizer, for this or another process).
        let listed = (libc::makedev(m.dev.0, m.dev.1), m.inode);
        if let Some(&i) = self.by_identity.get(&listed) {
            return Some(i);
        }
        // /proc/PID/map_files reaches the mapped file even when it was
        // deleted or lives in another mount namespace; it needs root, so
        // fall back to the path through the process's root.
        let file = File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
            .or_else(|_| File::open(process::path_in_root(pid, &m.path)))
            .or_else(|_| same_file(m))
            .ok()?;
        let meta = file.metadata().ok()?;
        let identity = (meta.dev(), meta.ino());
        if let Some(&i) = self.by_identity.get(&identity) {
            return Some(i);
        }
        let build_id = build_id_of(&file, &meta);
        let path = m
            .path
            .strip_suffix(" (deleted)")
            .unwrap_or(&m.path)
            .to_owned();
        self.objects.push(Object {
            path,
            build_id,
            size: meta.len(),
            file: Some(Arc::new(file)),
        });
        let i = self.objects.len() - 1;
        self.by_identity.insert(identity, i);
        Some(i)
    }
}

/// Build ids already read, by file identity: every interval's profiles
/// see the same objects, whose ELF notes need not be parsed again.
static BUILD_IDS: std::sync::Mutex<Option<HashMap<FileIdentity, String>>> =
    std::sync::Mutex::new(None);

/// Build ids remembered at most (then forgotten all at once: files come and go).
const MAX_BUILD_IDS: usize = 4096;

/// (device, inode, size, modification time in ns).
type FileIdentity = (u64, u64, u64, i64);

fn identity_of(meta: &std::fs::Metadata) -> FileIdentity {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    )
}

/// The GNU build-id of `file` (lower-case hex, empty when none).
fn build_id_of(file: &File, meta: &std::fs::Metadata) -> String {
    let identity = identity_of(meta);
    let mut known = BUILD_IDS.lock().unwrap_or_else(|e| e.into_inner());
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(id) = known.get(&identity) {
        return id.clone();
    }
    use std::os::fd::AsRawFd as _;
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let id = blazesym::helper::read_elf_build_id(&fd_path)
        .ok()
        .flatten()
        .map(|id| hex(&id))
        .unwrap_or_default();
    if known.len() >= MAX_BUILD_IDS {
        known.clear();
    }
    known.insert(identity, id.clone());
    id
}

/// The file of mapping `m` opened by its path in this mount namespace, if it
/// is the very file mapped (same device and inode): the way left once the
/// process is gone.
fn same_file(m: &process::Mapping) -> std::io::Result<File> {
    let file = File::open(&m.path)?;
    let meta = file.metadata()?;
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    if meta.ino() == m.inode && dev == m.dev {
        Ok(file)
    } else {
        Err(std::io::ErrorKind::NotFound.into())
    }
}

/// This process's vDSO image, dumped once (every normalizer of a
/// long-running process shares it: one file, one identity, parsed once by
/// the symbol cache), with its build id and size.
fn own_vdso() -> Option<&'static (Arc<File>, String, u64)> {
    static VDSO: OnceLock<Option<(Arc<File>, String, u64)>> = OnceLock::new();
    VDSO.get_or_init(|| {
        let file = dump_own_vdso().ok()?;
        use std::os::fd::AsRawFd as _;
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let build_id = blazesym::helper::read_elf_build_id(&fd_path)
            .ok()
            .flatten()
            .map(|id| hex(&id))
            .unwrap_or_default();
        let size = file.metadata().map_or(0, |m| m.len());
        Some((Arc::new(file), build_id, size))
    })
    .as_ref()
}

/// Copies this process's vDSO image into an unlinked temporary file.
fn dump_own_vdso() -> std::io::Result<File> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let maps = process::maps(std::process::id()).map_err(std::io::Error::other)?;
    let vdso = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| std::io::Error::other("no [vdso] mapping"))?;
    let mut image = vec![0; usize::try_from(vdso.end - vdso.start).map_err(std::io::Error::other)?];
    let mut mem = File::open("/proc/self/mem")?;
    mem.seek(SeekFrom::Start(vdso.start))?;
    mem.read_exact(&mut image)?;
    let path = std::env::temp_dir().join(format!("prof-bpf-vdso-{}.so", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.write_all(&image)?;
    Ok(file)
}

/// Parses perf map lines `START SIZE NAME` (hex numbers), sorted by start.
pub(crate) fn parse_perf_map(text: &str) -> Vec<(u64, u64, String)> {
    let mut entries: Vec<(u64, u64, String)> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let start = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
            Some((start, size, parts.next()?.trim().to_owned()))
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    entries
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

mod maps_cache;
mod symbol_cache;
pub(crate) use maps_cache::MapsCache;
pub(crate) use symbol_cache::KALLSYMS;
pub use symbol_cache::{DEFAULT_MAPPED_BOUND, SymbolCache, SymbolSource};

#[cfg(test)]
mod tests;
