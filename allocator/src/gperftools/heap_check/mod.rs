//! HEAPCHECK: at exit, finds the recorded objects no longer reachable.
//!
//! Every allocation was recorded in place by the sampler's record-all
//! mode (a live-table entry with its stack; the object stays where the
//! allocator put it). Conservative mark phase, as gperftools' heap
//! checker: every aligned word of the roots that points into a live
//! recorded object marks it (anywhere inside a small object; inside the
//! first or last page of a large object, or the first page of a huge one:
//! the pages the page map names), and marked objects are scanned in turn.
//! Roots: writable segments (data, bss) of every loaded object except this
//! library (the allocator's metadata), the stack, registers and static TLS
//! of every thread. Threads still running at exit are stopped
//! ([`threads`]). Objects the dynamic loader allocated are not leaks and
//! are scanned as roots (see [`made_by_loader`]): that is what keeps
//! joined and detached threads from leaving false leaks behind.
//!
//! Unmarked objects are leaks ([`report`]): grouped by allocation stack,
//! as a leak profile symbolized by `prof-bpf report` (PROFBPF_PATH or
//! PATH), and the process exits with status 1.
//!
//! Lock: the heap profile's table lock, taken for the whole check (or not,
//! when a stopped thread holds it: it cannot move any more). Owner: the
//! allocator's exit handler, through [`super::at_exit`].
mod anon_roots;
mod report;
mod threads;

use core::sync::atomic::Ordering;

use super::{
    arena::{Buf, Table},
    heap_profile::{self, Heap},
};
use crate::env;

/// The mappings of /proc/self/maps as (start, end).
fn read_maps(out: &mut Table<(usize, usize)>, text: &mut Buf) {
    read_file(c"/proc/self/maps", text);
    parse_maps(out, text);
}

/// Appends the contents of `path` to `text`.
fn read_file(path: &core::ffi::CStr, text: &mut Buf) {
    // SAFETY: open/read/close into buffers we own.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut chunk = [0u8; 4096];
        loop {
            let n = libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len());
            if n <= 0 {
                break;
            }
            text.extend(&chunk[..n as usize]);
        }
        libc::close(fd);
    }
}

fn parse_maps(out: &mut Table<(usize, usize)>, text: &Buf) {
    for line in text.as_slice().split(|&b| b == b'\n') {
        let range = line.split(|&b| b == b' ').next().unwrap_or(b"");
        let mut parts = range.split(|&b| b == b'-');
        let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
            continue;
        };
        let hex = |s: &[u8]| {
            s.iter().try_fold(0usize, |v, &c| {
                Some(v * 16 + (c as char).to_digit(16)? as usize)
            })
        };
        if let (Some(a), Some(b)) = (hex(a), hex(b)) {
            out.push((a, b));
        }
    }
}

fn mapping_of(maps: &Table<(usize, usize)>, addr: usize) -> Option<(usize, usize)> {
    maps.as_slice()
        .iter()
        .copied()
        .find(|&(a, b)| a <= addr && addr < b)
}

struct Marker<'a> {
    heap: &'a mut Heap,
    work: Table<(usize, usize)>,
    overflow: bool,
}

impl Marker<'_> {
    /// Marks the objects the dynamic loader allocated (see
    /// [`made_by_loader`]) and queues them for scanning: they are not
    /// leaks, and what they point to is reachable.
    fn mark_loader_objects(&mut self, loader: (usize, usize)) {
        let buckets = self.heap.buckets.as_slice();
        for l in self.heap.live.slots().iter_mut() {
            if l.ptr == 0 || l.marked {
                continue;
            }
            let b = &buckets[l.bucket as usize];
            if made_by_loader(&b.frames[..b.depth as usize], loader) {
                l.marked = true;
                let usable = crate::alloc::recorded_block_at(l.ptr).map_or(l.size, |(_, u)| u);
                if !self.work.push((l.ptr, usable.max(l.size))) {
                    self.overflow = true;
                }
            }
        }
    }

    /// The live recorded object `w` points into, if any.
    fn object_of(&mut self, w: usize) -> Option<(usize, usize)> {
        // The block's start and usable size: realloc within the usable
        // size keeps the object (and its record's smaller size), so the
        // scan covers all of it.
        let (start, usable) = crate::alloc::recorded_block_at(w)?;
        let live = self.heap.find(start)?;
        if w < live.ptr || w >= live.ptr + usable.max(1) || live.marked {
            return None;
        }
        live.marked = true;
        Some((live.ptr, usable.max(live.size)))
    }

    /// Scans `[from, to)` word by word.
    ///
    /// # Safety
    /// The range is mapped and readable.
    unsafe fn scan(&mut self, from: usize, to: usize) {
        let mut p = from.next_multiple_of(8);
        while p + 8 <= to {
            // SAFETY: inside the caller's readable range.
            let w = unsafe { *(p as *const usize) };
            self.word(w);
            p += 8;
        }
    }

    fn word(&mut self, w: usize) {
        if w < 4096 {
            return;
        }
        if let Some(obj) = self.object_of(w)
            && !self.work.push(obj)
        {
            self.overflow = true;
        }
    }

    fn drain(&mut self) {
        while let Some((p, size)) = self.work.pop() {
            // SAFETY: a live object of ours, `size` bytes long.
            unsafe { self.scan(p, p + size) };
        }
    }
}

/// Whether an allocation's stack (the allocator's own frames dropped,
/// caller first) says the dynamic loader made it: its caller, or the
/// caller's caller, is code of the loader (`loader`: its code range), as
/// gperftools' checker decides. Such objects live in the loader's own
/// structures, some of which no scan can see: the dynamic thread vector
/// (`allocate_dtv`, in `pthread_create`) of a joined or exited thread stays
/// with glibc's cached thread stacks.
fn made_by_loader(stack: &[u64], (lo, hi): (usize, usize)) -> bool {
    stack
        .iter()
        .take(2)
        .any(|&pc| (lo..hi).contains(&(pc as usize)))
}

struct Roots<'a, 'b> {
    marker: &'a mut Marker<'b>,
    own_bias: usize,
}

unsafe extern "C" fn visit_segments(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut libc::c_void,
) -> i32 {
    // SAFETY: the loader's info is valid during the call; data is Roots.
    unsafe {
        let roots = &mut *data.cast::<Roots>();
        let info = &*info;
        if info.dlpi_addr as usize == roots.own_bias {
            return 0; // the allocator's own metadata
        }
        for ph in core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) {
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 {
                let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
                roots.marker.scan(start, start + ph.p_memsz as usize);
            }
        }
        0
    }
}

/// Runs the check if HEAPCHECK asked for it; exits with status 1 on leaks.
/// (The test runs in every process, the check only with HEAPCHECK.)
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn at_exit() {
    if env::settings().heap_check && heap_profile::ON.load(Ordering::Acquire) {
        check();
    }
}

#[inline(never)]
fn check() {
    // Nothing may change the tables from here on.
    heap_profile::ON.store(false, Ordering::Release);
    let asked = threads::stop_threads();
    // A stopped thread may hold the table lock (it stopped in the middle
    // of a record): wait a little, then go on, since it cannot move.
    let locked = (0..1000).any(|_| {
        heap_profile::LOCK.try_lock() || {
            // SAFETY: usleep has no preconditions.
            unsafe { libc::usleep(1000) };
            false
        }
    });
    // SAFETY: under the lock, or with every other thread stopped.
    let heap = unsafe { heap_profile::heap() };
    let mut marker = Marker {
        heap,
        work: Table::empty(),
        overflow: false,
    };
    marker.work.reserve(1 << 24);
    let mut maps = Table::empty();
    maps.reserve(1 << 16);
    let mut text = Buf::new();
    read_maps(&mut maps, &mut text);

    // Data and bss of every object but ours.
    let own_bias = super::objects::this_library().map_or(usize::MAX, |o| o.bias);
    let own_bias = if super::own_code().is_some() {
        own_bias
    } else {
        usize::MAX
    };
    let mut roots = Roots {
        marker: &mut marker,
        own_bias,
    };
    // SAFETY: the callback only reads the loaded objects' segments.
    unsafe { libc::dl_iterate_phdr(Some(visit_segments), (&raw mut roots).cast()) };
    if let Some(loader) = super::loader_code() {
        marker.mark_loader_objects(loader);
    }
    marker.drain();
    // Thread stacks are roots from their stack pointer only (below it is
    // dead data): keep the anonymous scan off them.
    let sp_here: usize;
    // SAFETY: reads rsp.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) sp_here, options(nomem, nostack)) };
    let mut all_stacks = Table::<(usize, usize)>::empty();
    all_stacks.reserve(threads::stopped() + 2);
    all_stacks.push(mapping_of(&maps, sp_here).unwrap_or((0, 0)));
    for i in 0..threads::stopped() {
        if let Some(m) = mapping_of(&maps, threads::stopped_thread(i).sp) {
            all_stacks.push(m);
        }
    }
    // Only under CPython, whose pymalloc arenas hold the pointers to most
    // of its malloc'd objects: elsewhere the same scan would also read
    // glibc's cached stacks of joined threads, whose dead frames hide real
    // leaks.
    if super::python::is_cpython() {
        anon_roots::scan(&mut marker, all_stacks.as_slice());
    }

    // This thread: its stack from the frame that called the allocator's
    // exit handler (the checker's own frames are not roots), and its TLS.
    let here = threads::thread_pointer();
    let sp = match super::own_code().and_then(|(lo, hi)| super::unwind::sp_outside(lo, hi)) {
        Some(sp) => sp,
        None => {
            let sp: usize;
            // SAFETY: reads rsp.
            unsafe { core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack)) };
            sp
        }
    };
    let stopped = threads::stopped();
    for i in 0..=stopped {
        let (sp, fs) = if i == stopped {
            (sp, here)
        } else {
            let slot = threads::stopped_thread(i);
            for r in slot.regs {
                marker.word(r);
            }
            (slot.sp, slot.fs)
        };
        // The stack (a stopped thread's with the 128-byte red zone below
        // its rsp; our own from the caller's frame); for
        // threads other than the main one the mapping also holds the
        // thread's TLS and descriptor.
        if let Some((_, end)) = mapping_of(&maps, sp) {
            let from = sp
                .saturating_sub(128)
                .max(mapping_of(&maps, sp).map_or(sp, |m| m.0));
            // SAFETY: inside one mapping (the thread's stack).
            unsafe { marker.scan(from, end) };
        }
        // Static TLS lies below the thread pointer.
        if let Some((a, b)) = mapping_of(&maps, fs) {
            // SAFETY: inside one mapping.
            unsafe { marker.scan(fs.saturating_sub(64 << 10).max(a), (fs + 4096).min(b)) };
        }
        marker.drain();
    }
    let overflow = marker.overflow;
    report::report(marker.heap, asked, stopped as u32, overflow);
    if locked {
        heap_profile::LOCK.unlock();
    }
    threads::release_threads();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_made_what_its_code_called_up_to_two_frames_deep() {
        let ld = (0x7000, 0x9000);
        assert!(made_by_loader(&[0x7000, 0x100, 0x200], ld));
        assert!(made_by_loader(&[0x100, 0x8fff, 0x200], ld));
        assert!(!made_by_loader(&[0x100, 0x200, 0x8000], ld));
        assert!(!made_by_loader(&[0x9000, 0x6fff], ld));
        assert!(!made_by_loader(&[], ld));
    }
}
