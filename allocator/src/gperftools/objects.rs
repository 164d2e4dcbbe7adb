//! The loaded objects (program, shared libraries, vdso), found with
//! dl_iterate_phdr: their code ranges for the unwinder (with the
//! PT_GNU_EH_FRAME table), and their paths, file offsets and build-ids
//! (PT_NOTE) for the profiles' mappings.
//!
//! The table only grows: entries are written before the count that
//! publishes them, and never change afterwards, so the unwinder reads it
//! without a lock, even from a signal handler. It is refreshed (under a
//! lock) when an address falls outside every known object and the loader
//! reports objects added since the last look (dlopen).
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::lock::SpinLock;

use super::{
    arena::Table,
    unwind::{SearchIndex, build_search_index},
};

pub const NAME_MAX: usize = 240;
pub const BUILD_ID_MAX: usize = 32;

#[derive(Clone, Copy)]
pub struct Object {
    /// Executable segment: [start, end) in memory, at file offset `offset`.
    pub start: usize,
    pub end: usize,
    pub offset: usize,
    /// Address of the PT_GNU_EH_FRAME section (.eh_frame_hdr), 0 if none.
    pub eh_frame_hdr: usize,
    /// The object's load bias (dlpi_addr).
    pub bias: usize,
    pub name: [u8; NAME_MAX],
    pub name_len: usize,
    pub build_id: [u8; BUILD_ID_MAX],
    pub build_id_len: usize,
    /// Where the object's file holds its CFI, to read it without touching
    /// the mapping (`unwind::source`); None for the vdso and unreadable
    /// files.
    pub cfi_file: Option<CfiFile>,
}

/// Where an object's CFI segment lies in its file, and which file that is.
/// No descriptor is kept: a stack walk opens the file when it first needs
/// it and closes it when it ends, so the program never sees one of ours
/// between samples (it may count, close or run out of descriptors).
#[derive(Clone, Copy)]
pub struct CfiFile {
    /// The segment holding .eh_frame_hdr: [lo, hi) in memory, at file
    /// offset `offset`.
    pub lo: usize,
    pub hi: usize,
    pub offset: usize,
    /// The file's device and inode when the object was learned.
    dev: u64,
    ino: u64,
    /// Keys into the file's .eh_frame_hdr search table, read once.
    pub index: Option<SearchIndex>,
}

impl CfiFile {
    /// The segment `[lo, hi)` at file offset `offset` of `path`, when the
    /// file's bytes at `hdr` match the mapped ones (the file was not
    /// replaced since it was loaded).
    ///
    /// # Safety
    /// `hdr..hdr + 16` is mapped, inside `[lo, hi)`.
    unsafe fn learn(path: &[u8], lo: usize, hi: usize, offset: usize, hdr: usize) -> Option<Self> {
        let mut f = Self {
            lo,
            hi,
            offset,
            dev: 0,
            ino: 0,
            index: None,
        };
        // SAFETY: the caller's contract.
        let (fd, dev, ino) = unsafe { f.open_matching(path, hdr)? };
        (f.dev, f.ino) = (dev, ino);
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        Some(f)
    }

    /// Opens the object's file (`path`, its .eh_frame_hdr at `hdr`) for one
    /// stack walk, when it is still the file learned: same device and
    /// inode, same bytes at `hdr`. The caller closes it. Async-signal-safe;
    /// errno may change.
    ///
    /// # Safety
    /// `hdr` is the object's mapped .eh_frame_hdr, inside `[lo, hi)`.
    #[unsafe(link_section = ".text.hot.profalloc")]
    pub unsafe fn open(&self, path: &[u8], hdr: usize) -> Option<i32> {
        // SAFETY: the caller's contract.
        let (fd, dev, ino) = unsafe { self.open_matching(path, hdr)? };
        if (dev, ino) == (self.dev, self.ino) {
            return Some(fd);
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        None
    }

    /// Opens `path` when its 16 bytes at `hdr` match the mapped ones: the
    /// descriptor, device and inode.
    ///
    /// # Safety
    /// As [`Self::open`].
    unsafe fn open_matching(&self, path: &[u8], hdr: usize) -> Option<(i32, u64, u64)> {
        let mut c_path = [0u8; NAME_MAX + 1];
        if path.is_empty() || path.len() >= NAME_MAX || path[0] != b'/' {
            return None;
        }
        c_path[..path.len()].copy_from_slice(path);
        // SAFETY: a NUL-terminated path; O_CLOEXEC so an exec in another
        // thread does not pass it on.
        let fd = unsafe { libc::open(c_path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let mut head = [0u8; 16];
        let mut st = core::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: pread writes 16 bytes into head, fstat a stat; hdr is
        // mapped (the contract).
        let same = unsafe {
            libc::pread(
                fd,
                head.as_mut_ptr().cast(),
                16,
                (self.offset + hdr - self.lo) as libc::off_t,
            ) == 16
                && head == *(hdr as *const [u8; 16])
                && libc::fstat(fd, st.as_mut_ptr()) == 0
        };
        if !same {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            return None;
        }
        // SAFETY: fstat succeeded.
        let st = unsafe { st.assume_init() };
        Some((fd, st.st_dev, st.st_ino))
    }
}

const CAPACITY: usize = 4096;
static LOCK: SpinLock = SpinLock::new();
struct Objects(core::cell::UnsafeCell<Table<Object>>);
// SAFETY: written only under LOCK, entries published through COUNT.
unsafe impl Sync for Objects {}
static OBJECTS: Objects = Objects(core::cell::UnsafeCell::new(Table::empty()));
/// Entries published to lock-free readers.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// The loader's dlpi_adds at the last refresh.
static ADDS: AtomicU64 = AtomicU64::new(u64::MAX);

/// The published objects.
pub fn all() -> &'static [Object] {
    let n = COUNT.load(Ordering::Acquire);
    if n == 0 {
        return &[];
    }
    // SAFETY: the first n entries are written and never change; the
    // table never moves.
    unsafe { &(*OBJECTS.0.get()).as_slice()[..n] }
}

/// The object whose code holds `pc`.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn find(pc: usize) -> Option<&'static Object> {
    all().iter().find(|o| o.start <= pc && pc < o.end)
}

/// Like [`find`], refreshing the table once if `pc` is unknown and the
/// loader has added objects since. Not for signal handlers.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn find_or_refresh(pc: usize) -> Option<&'static Object> {
    find(pc).or_else(|| {
        refresh();
        find(pc)
    })
}

/// Reads the loader's object list into the table (new objects only).
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn refresh() {
    LOCK.lock();
    // SAFETY: the table is written only under LOCK.
    unsafe {
        let t = &mut *OBJECTS.0.get();
        if t.reserve(CAPACITY) {
            let mut first = true;
            libc::dl_iterate_phdr(Some(visit), (&raw mut first).cast());
        }
    }
    LOCK.unlock();
}

#[unsafe(link_section = ".text.hot.profalloc")]
unsafe extern "C" fn visit(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    first: *mut libc::c_void,
) -> i32 {
    // SAFETY: the loader passes a valid info for the duration of the call;
    // we hold LOCK (see refresh).
    unsafe {
        let info = &*info;
        let first = &mut *first.cast::<bool>();
        if *first {
            *first = false;
            if COUNT.load(Ordering::Relaxed) > 0 && ADDS.load(Ordering::Relaxed) == info.dlpi_adds {
                return 1; // nothing was loaded since the last refresh
            }
            ADDS.store(info.dlpi_adds, Ordering::Relaxed);
        }
        let t = &mut *OBJECTS.0.get();
        let bias = info.dlpi_addr as usize;
        let phdrs = core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
        let mut o = Object {
            start: 0,
            end: 0,
            offset: 0,
            eh_frame_hdr: 0,
            bias,
            name: [0; NAME_MAX],
            name_len: 0,
            build_id: [0; BUILD_ID_MAX],
            build_id_len: 0,
            cfi_file: None,
        };
        let mut cfi_segment = None;
        for ph in phdrs {
            match ph.p_type {
                libc::PT_LOAD if ph.p_flags & libc::PF_X != 0 && o.start == 0 => {
                    o.start = bias + ph.p_vaddr as usize;
                    o.end = o.start + ph.p_memsz as usize;
                    o.offset = ph.p_offset as usize;
                }
                libc::PT_GNU_EH_FRAME => o.eh_frame_hdr = bias + ph.p_vaddr as usize,
                libc::PT_NOTE if o.build_id_len == 0 => {
                    read_build_id(bias + ph.p_vaddr as usize, ph.p_memsz as usize, &mut o);
                }
                _ => {}
            }
        }
        if o.start == 0 {
            return 0;
        }
        if o.eh_frame_hdr != 0 {
            cfi_segment = phdrs.iter().find(|ph| {
                let lo = bias + ph.p_vaddr as usize;
                ph.p_type == libc::PT_LOAD
                    && (lo..lo + ph.p_filesz as usize).contains(&(o.eh_frame_hdr + 15))
                    && lo <= o.eh_frame_hdr
            });
        }
        let n = COUNT.load(Ordering::Relaxed);
        if t.as_slice()[..n]
            .iter()
            .any(|e| e.start == o.start && e.end == o.end)
        {
            return 0;
        }
        let name = info.dlpi_name;
        if !name.is_null() && *name != 0 {
            let s = core::ffi::CStr::from_ptr(name).to_bytes();
            let len = s.len().min(NAME_MAX);
            o.name[..len].copy_from_slice(&s[..len]);
            o.name_len = len;
        } else if n == 0 || bias == 0 || is_main_program(phdrs) {
            // The program itself has an empty name.
            let len = libc::readlink(
                c"/proc/self/exe".as_ptr(),
                o.name.as_mut_ptr().cast(),
                NAME_MAX,
            );
            o.name_len = len.max(0) as usize;
        }
        if let Some(ph) = cfi_segment {
            let lo = bias + ph.p_vaddr as usize;
            let hi = lo + ph.p_filesz as usize;
            o.cfi_file = CfiFile::learn(
                &o.name[..o.name_len],
                lo,
                hi,
                ph.p_offset as usize,
                o.eh_frame_hdr,
            );
            // SAFETY: we hold LOCK; the header is mapped (learn read it).
            let index = build_search_index(&o);
            if let Some(f) = o.cfi_file.as_mut() {
                f.index = index;
            }
        }
        if t.push(o) {
            COUNT.store(t.len(), Ordering::Release);
        }
        0
    }
}

fn is_main_program(phdrs: &[libc::Elf64_Phdr]) -> bool {
    phdrs.iter().any(|p| p.p_type == libc::PT_INTERP)
}

/// Finds NT_GNU_BUILD_ID in a PT_NOTE segment.
///
/// # Safety
/// `addr..addr+len` is a mapped note segment.
unsafe fn read_build_id(addr: usize, len: usize, o: &mut Object) {
    let mut p = addr;
    let end = addr + len;
    while p + 12 <= end {
        // SAFETY: the note header lies inside the segment.
        let (namesz, descsz, kind) = unsafe {
            (
                *(p as *const u32) as usize,
                *((p + 4) as *const u32) as usize,
                *((p + 8) as *const u32),
            )
        };
        let name = p + 12;
        let desc = name + namesz.next_multiple_of(4);
        let next = desc + descsz.next_multiple_of(4);
        if next > end {
            return;
        }
        // SAFETY: name and desc lie inside the segment.
        unsafe {
            if kind == 3 && namesz == 4 && *(name as *const [u8; 4]) == *b"GNU\0" {
                let n = descsz.min(BUILD_ID_MAX);
                core::ptr::copy_nonoverlapping(desc as *const u8, o.build_id.as_mut_ptr(), n);
                o.build_id_len = n;
                return;
            }
        }
        p = next;
    }
}

/// The object holding this library's own code.
pub fn this_library() -> Option<&'static Object> {
    find_or_refresh(this_library as fn() -> _ as usize)
}
