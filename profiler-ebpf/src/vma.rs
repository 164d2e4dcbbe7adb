//! The object of a pc the process's own tables do not know yet, found
//! through the kernel's mapping of that pc and the file it maps
//! (`profiler_common::unwind_files` describes the maps): a new process
//! unwinds with rows loaded for another process from its first sample.
//!
//! In a perf event's interrupt, `bpf_find_vma` works once per program run
//! (it releases the mapping lock through a per-CPU irq_work that stays
//! queued until the interrupt ends), so what it finds is kept per process
//! ([`VMA_CACHE`]) until user space enters the process's own mappings:
//! each sample adds one mapping, and all later frames in it resolve at
//! once.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_find_vma, bpf_get_current_task_btf},
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use profiler_common::{
    stack::UnwindCounter,
    unwind::MappingInfo,
    unwind_files::{FILES_MAX, FileKey, FileObject, VmaOffsets},
};

use crate::stack::count;

/// `UNWIND_FILES`: file identity -> object and load segments.
#[map(name = "UNWIND_FILES")]
static FILES: HashMap<FileKey, FileObject> =
    HashMap::with_max_entries(FILES_MAX, BPF_F_NO_PREALLOC);

/// `UNWIND_VMA_CONFIG`: where the kernel keeps the fields read below.
#[map(name = "UNWIND_VMA_CONFIG")]
static CONFIG: Array<VmaOffsets> = Array::with_max_entries(1, 0);

/// A mapping found by `bpf_find_vma`: [start, end) maps an object whose
/// rows are loaded (`object` > 0) with `bias`, or no file (`object` 0).
/// `check` ties the fields together: a slot written by two threads at once
/// fails it and is ignored.
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedVma {
    start: u64,
    end: u64,
    bias: u64,
    object: u32,
    check: u32,
}

impl CachedVma {
    #[inline(always)]
    fn checksum(&self) -> u32 {
        let x = self.start ^ self.end.rotate_left(17) ^ self.bias.rotate_left(33);
        (x ^ (x >> 32)) as u32 ^ self.object ^ 0x5bd1_e995
    }
}

/// Mappings kept per process.
const CACHE_SLOTS: usize = 8;

/// The mappings found for one process, valid while its address space
/// (`mm`) is the same one (an exec replaces it).
#[repr(C)]
#[derive(Clone, Copy)]
struct VmaCache {
    mm: u64,
    next: u32,
    _pad: u32,
    slots: [CachedVma; CACHE_SLOTS],
}

/// `UNWIND_VMA_CACHE`: pid -> the mappings `bpf_find_vma` found for it.
#[map(name = "UNWIND_VMA_CACHE")]
static VMA_CACHE: LruHashMap<u32, VmaCache> = LruHashMap::with_max_entries(4096, 0);

/// `UNWIND_VMA_EMPTY`: an all-zero [`VmaCache`] to start a process's from
/// (too big for the BPF stack).
#[map(name = "UNWIND_VMA_EMPTY")]
static EMPTY: PerCpuArray<VmaCache> = PerCpuArray::with_max_entries(1, 0);

/// What the kernel's mapping of a pc says.
pub(crate) enum Vma {
    /// A file whose rows are loaded: the mapping's object and bias.
    Object(MappingInfo),
    /// No file (or no mapping): no rows can ever cover the pc.
    NoFile,
    /// A file without loaded rows, or the lookup is off.
    Unknown,
    /// The mapping could not be looked up (its lock was held).
    Busy,
}

/// The `bpf_find_vma` callback's input and output.
#[repr(C)]
struct Found {
    offsets: VmaOffsets,
    start: u64,
    end: u64,
    pgoff: u64,
    inode: u64,
    mtime_sec: i64,
    mtime_nsec: u32,
    dev: u32,
    /// 1: a file mapping; 2: the vDSO; 0: neither.
    kind: u32,
    _pad: u32,
}

/// Reads the u64 at `base + offset` of kernel memory (0 when unreadable).
/// The address is a plain number: the verifier refuses variable offsets
/// on typed kernel pointers, but a probe read of any address is safe.
#[inline(always)]
fn read_u64(base: u64, offset: u32) -> u64 {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base.wrapping_add(offset as u64)) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn read_u32(base: u64, offset: u32) -> u32 {
    // SAFETY: as in `read_u64`.
    unsafe { bpf_probe_read_kernel((base.wrapping_add(offset as u64)) as *const u32) }.unwrap_or(0)
}

/// The current task's `mm` (0 once `exit_mm` released it), or `None`
/// when the kernel's field offsets are not known.
#[inline(always)]
pub(crate) fn current_mm() -> Option<u64> {
    let offsets = CONFIG.get(0)?;
    if offsets.enabled == 0 {
        return None;
    }
    // SAFETY: a helper call; the task is only read through probe reads.
    let task = unsafe { bpf_get_current_task_btf() };
    Some(read_u64(task as u64, offsets.task_mm))
}

/// The `bpf_find_vma` callback: reads the mapping's start, offset and file.
#[inline(never)]
extern "C" fn read_vma(_task: *mut c_void, vma: *mut c_void, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Found` that `resolve` passed.
    let found = unsafe { &mut *ctx.cast::<Found>() };
    let o = found.offsets;
    let vma = vma as u64;
    found.start = read_u64(vma, o.vm_start);
    found.end = read_u64(vma, o.vm_end);
    found.pgoff = read_u64(vma, o.vm_pgoff);
    let file = read_u64(vma, o.vm_file);
    if file != 0 {
        let inode = read_u64(file, o.f_inode);
        if inode != 0 {
            found.inode = read_u64(inode, o.i_ino);
            found.dev = read_u32(read_u64(inode, o.i_sb), o.s_dev);
            found.mtime_sec = read_u64(inode, o.i_mtime_sec) as i64;
            found.mtime_nsec = read_u32(inode, o.i_mtime_nsec);
            found.kind = 1;
        }
    } else if read_u64(read_u64(vma, o.vm_mm), o.mm_vdso) == found.start {
        found.kind = 2;
    }
    0
}

/// `UNWIND_VMA_FOUND`: the mapping [`unwind_vma_resolve`] found last on
/// this CPU (more than its return value holds).
#[map(name = "UNWIND_VMA_FOUND")]
static FOUND: PerCpuArray<MappingInfo> = PerCpuArray::with_max_entries(1, 0);

/// The object mapped at `pc` in process `pid`, the current task's, by the
/// identity of the file its mapping maps.
#[inline(always)]
pub(crate) fn resolve(pid: u32, pc: u64) -> Vma {
    match unwind_vma_resolve(pid, pc) {
        RESOLVED_NO_FILE => Vma::NoFile,
        RESOLVED_BUSY => Vma::Busy,
        RESOLVED_OBJECT => match FOUND.get(0) {
            Some(info) => Vma::Object(*info),
            None => Vma::Unknown,
        },
        _ => Vma::Unknown,
    }
}

const RESOLVED_NO_FILE: u32 = 1;
const RESOLVED_BUSY: u32 = 2;
const RESOLVED_OBJECT: u32 = 3;

/// [`resolve`] as a function of its own, with a global symbol: the
/// verifier checks a global function once, on its own, instead of once
/// per state of every walk step that calls it (which made the walker's
/// programs several times longer to verify). Its result is a number
/// (`RESOLVED_*`, else unknown); an object's mapping is in [`FOUND`].
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn unwind_vma_resolve(pid: u32, pc: u64) -> u32 {
    match resolve_here(pid, pc) {
        Vma::NoFile => RESOLVED_NO_FILE,
        Vma::Busy => RESOLVED_BUSY,
        Vma::Object(info) => match FOUND.get_ptr_mut(0) {
            Some(slot) => {
                // SAFETY: a pointer from a successful lookup of this CPU's slot.
                unsafe { *slot = info };
                RESOLVED_OBJECT
            }
            None => 0,
        },
        Vma::Unknown => 0,
    }
}

#[inline(always)]
fn resolve_here(pid: u32, pc: u64) -> Vma {
    let Some(offsets) = CONFIG.get(0) else {
        return Vma::Unknown;
    };
    if offsets.enabled == 0 {
        return Vma::Unknown;
    }
    // SAFETY: a helper call; the task is only read through probe reads.
    let task = unsafe { bpf_get_current_task_btf() };
    let mm = read_u64(task as u64, offsets.task_mm);
    let cache = match VMA_CACHE.get_ptr_mut(&pid) {
        Some(c) => c,
        None => {
            let Some(empty) = EMPTY.get_ptr(0) else {
                return Vma::Unknown;
            };
            // SAFETY: a pointer from a successful lookup; the record is
            // never written, so it stays all zeros (no slot passes its check).
            let _ = VMA_CACHE.insert(&pid, unsafe { &*empty }, 0);
            match VMA_CACHE.get_ptr_mut(&pid) {
                Some(c) => c,
                None => return Vma::Unknown,
            }
        }
    };
    // SAFETY: a pointer from a successful lookup; torn slots fail their
    // check.
    let cache = unsafe { &mut *cache };
    if cache.mm != mm {
        // A new address space (exec, or a reused pid): forget the old one.
        cache.mm = mm;
        for slot in cache.slots.iter_mut() {
            slot.check = 0;
        }
    }
    for slot in cache.slots.iter() {
        let entry = *slot;
        if entry.start <= pc && pc < entry.end && entry.check == entry.checksum() {
            if entry.object == 0 {
                return Vma::NoFile;
            }
            return Vma::Object(MappingInfo {
                bias: entry.bias,
                object: entry.object,
                _pad: 0,
            });
        }
    }
    let (vma, found) = find(offsets, task, pc);
    let entry = match vma {
        Vma::Object(info) => CachedVma {
            start: found.start,
            end: found.end,
            bias: info.bias,
            object: info.object,
            check: 0,
        },
        Vma::NoFile if found.end > found.start => CachedVma {
            start: found.start,
            end: found.end,
            bias: 0,
            object: 0,
            check: 0,
        },
        _ => return vma,
    };
    let at = cache.next as usize % CACHE_SLOTS;
    cache.next = cache.next.wrapping_add(1);
    if let Some(slot) = cache.slots.get_mut(at) {
        *slot = CachedVma {
            check: entry.checksum(),
            ..entry
        };
    }
    vma
}

/// Asks the kernel for the mapping of `pc` in `task`.
#[inline(always)]
fn find(offsets: &VmaOffsets, task: *mut aya_ebpf::bindings::task_struct, pc: u64) -> (Vma, Found) {
    let mut found = Found {
        offsets: *offsets,
        start: 0,
        end: 0,
        pgoff: 0,
        inode: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        dev: 0,
        kind: 0,
        _pad: 0,
    };
    // SAFETY: `read_vma` has the callback signature bpf_find_vma expects
    // and `found` outlives the call.
    let ret = unsafe {
        bpf_find_vma(
            task,
            pc,
            read_vma as *const () as *mut c_void,
            (&raw mut found).cast(),
            0,
        )
    };
    const ENOENT: i64 = -2;
    if ret == ENOENT {
        return (Vma::NoFile, found);
    }
    if ret != 0 {
        return (Vma::Busy, found);
    }
    let key = match found.kind {
        1 => FileKey {
            dev: found.dev,
            _pad: 0,
            inode: found.inode,
        },
        2 => FileKey::default(),
        _ => return (Vma::NoFile, found),
    };
    // SAFETY: the value is copied out at once.
    let Some(object) = (unsafe { FILES.get(&key) }).copied() else {
        return (Vma::Unknown, found);
    };
    // The inode was modified since its rows were built (rewritten in
    // place): they may describe other code.
    if found.kind == 1 && !object.same_mtime(found.mtime_sec, found.mtime_nsec) {
        count(UnwindCounter::FileChanged);
        return (Vma::Unknown, found);
    }
    let vma = match object.bias(found.start, found.pgoff << 12) {
        Some(bias) => Vma::Object(MappingInfo {
            bias,
            object: object.object,
            _pad: 0,
        }),
        None => Vma::Unknown,
    };
    (vma, found)
}
