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

use super::arena::Table;

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
pub fn find(pc: usize) -> Option<&'static Object> {
    all().iter().find(|o| o.start <= pc && pc < o.end)
}

/// Like [`find`], refreshing the table once if `pc` is unknown and the
/// loader has added objects since. Not for signal handlers.
pub fn find_or_refresh(pc: usize) -> Option<&'static Object> {
    find(pc).or_else(|| {
        refresh();
        find(pc)
    })
}

/// Reads the loader's object list into the table (new objects only).
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
        };
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
