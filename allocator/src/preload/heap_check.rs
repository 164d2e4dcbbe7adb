//! HEAPCHECK: at exit, finds the recorded objects no longer reachable.
//!
//! Conservative mark phase, as gperftools' heap checker: every aligned
//! word of the roots that points into a live recorded object (its start
//! or anywhere inside its first or last page) marks it, and marked objects
//! are scanned in turn. Roots: writable segments (data, bss) of every
//! loaded object except this library (the allocator's metadata), the
//! stack, registers and static TLS of every thread. Threads still running
//! at exit are stopped with a signal; each publishes its registers and
//! stack pointer from the handler and waits there until the check is done.
//!
//! Unmarked objects are leaks: reported grouped by allocation stack, as a
//! leak profile symbolized by `prof-bpf report` (PROFBPF_PATH or PATH),
//! and the process exits with status 1.
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use super::{
    arena::{Buf, Table},
    env::{self, PATH_MAX},
    heap_profile::{self, Heap, path_str},
    write_file,
};
use crate::{os::Message, pagemap, size_class::PAGE_SHIFT, span};

const MAX_THREADS: usize = 1024;
const NGREG: usize = 23;

#[derive(Clone, Copy)]
struct Stopped {
    regs: [usize; NGREG],
    sp: usize,
    fs: usize,
}

struct Slots(core::cell::UnsafeCell<[Stopped; MAX_THREADS]>);
// SAFETY: slot i is written by the one thread that claimed it, and read by
// the checker after that thread's STOPPED increment (release/acquire).
unsafe impl Sync for Slots {}
static SLOTS: Slots = Slots(core::cell::UnsafeCell::new(
    [Stopped {
        regs: [0; NGREG],
        sp: 0,
        fs: 0,
    }; MAX_THREADS],
));
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicU32 = AtomicU32::new(0);
static RELEASE: AtomicBool = AtomicBool::new(false);

fn stop_signal() -> i32 {
    libc::SIGRTMAX() - 2
}

fn thread_pointer() -> usize {
    let fs: usize;
    // SAFETY: reads the TCB's self pointer at %fs:0 (x86-64 glibc).
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) fs, options(nostack, readonly))
    };
    fs
}

extern "C" fn on_stop(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    if i < MAX_THREADS {
        // SAFETY: the kernel passes a valid ucontext; slot i is ours.
        unsafe {
            let uc = &*ctx.cast::<libc::ucontext_t>();
            let slot = &mut (*SLOTS.0.get())[i];
            for (r, &g) in slot.regs.iter_mut().zip(uc.uc_mcontext.gregs.iter()) {
                *r = g as usize;
            }
            slot.sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as usize;
            slot.fs = thread_pointer();
        }
    }
    STOPPED.fetch_add(1, Ordering::Release);
    while !RELEASE.load(Ordering::Acquire) {
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Stops every other thread; returns how many were asked to stop.
fn stop_threads() -> u32 {
    // SAFETY: a plain sigaction install; the handler is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_stop as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        libc::sigaction(stop_signal(), &sa, core::ptr::null_mut());
    }
    let me = gettid();
    let mut asked = 0;
    for_each_thread(|tid| {
        if tid != me {
            // SAFETY: tgkill to a thread of this process.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, stop_signal()) };
            if r == 0 {
                asked += 1;
            }
        }
    });
    // Threads that have signals blocked never answer: wait up to 2 s.
    for _ in 0..2000 {
        if STOPPED.load(Ordering::Acquire) >= asked {
            break;
        }
        // SAFETY: usleep has no preconditions.
        unsafe { libc::usleep(1000) };
    }
    asked
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Calls `f` with every thread id of this process (/proc/self/task,
/// read with getdents64: no allocation).
fn for_each_thread(mut f: impl FnMut(i32)) {
    // SAFETY: open/getdents64/close on a buffer we own.
    unsafe {
        let fd = libc::open(
            c"/proc/self/task".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                let name = &buf[off + 19..off + reclen];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
                    let tid = name.iter().fold(0i32, |t, &d| t * 10 + i32::from(d - b'0'));
                    f(tid);
                }
                off += reclen;
            }
        }
        libc::close(fd);
    }
}

/// The mappings of /proc/self/maps as (start, end).
fn read_maps(out: &mut Table<(usize, usize)>, text: &mut Buf) {
    // SAFETY: open/read/close into buffers we own.
    unsafe {
        let fd = libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
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
    /// The live recorded object `w` points into, if any.
    fn object_of(&mut self, w: usize) -> Option<(usize, usize)> {
        let s = pagemap::span(w >> PAGE_SHIFT);
        if s.is_null() {
            return None;
        }
        // SAFETY: the page map only holds live span records; other threads
        // are stopped.
        // The object's start and usable size: realloc within the usable
        // size keeps the object (and its record's smaller size), so the
        // scan covers all of it.
        let (start, usable) = unsafe {
            match (*s).state {
                span::SMALL => {
                    let size = crate::size_class::size_of_class((*s).class as usize);
                    let base = (*s).start_addr();
                    (base + (w - base) / size * size, size)
                }
                span::LARGE if (*s).sampled => ((*s).start_addr(), (*s).npages << PAGE_SHIFT),
                span::HUGE if (*s).sampled => (crate::huge::user(s), crate::huge::usable(s)),
                _ => return None,
            }
        };
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
pub fn at_exit() {
    let s = env::settings();
    if !s.heap_check || !heap_profile::ON.load(Ordering::Acquire) {
        return;
    }
    // Nothing may change the tables from here on.
    heap_profile::ON.store(false, Ordering::Release);
    let asked = stop_threads();
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
    marker.drain();

    // This thread: its stack from the frame that called the allocator's
    // exit handler (the checker's own frames are not roots), and its TLS.
    let here = thread_pointer();
    let sp = match super::own_code().and_then(|(lo, hi)| super::unwind::sp_outside(lo, hi)) {
        Some(sp) => sp,
        None => {
            let sp: usize;
            // SAFETY: reads rsp.
            unsafe { core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack)) };
            sp
        }
    };
    let stopped = NEXT_SLOT.load(Ordering::Acquire).min(MAX_THREADS);
    for i in 0..=stopped {
        let (sp, fs) = if i == stopped {
            (sp, here)
        } else {
            // SAFETY: slot i was published before STOPPED was counted.
            let slot = unsafe { (*SLOTS.0.get())[i] };
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
    report(marker.heap, asked, stopped as u32, overflow);
    if locked {
        heap_profile::LOCK.unlock();
    }
    RELEASE.store(true, Ordering::Release);
}

fn report(heap: &mut Heap, asked: u32, stopped: u32, overflow: bool) {
    let (mut objs, mut bytes, mut live_objs, mut live_bytes) = (0u64, 0u64, 0u64, 0u64);
    for b in heap.buckets.as_mut_slice() {
        b.leak_objects = 0;
        b.leak_bytes = 0;
    }
    for l in heap.live.slots().iter() {
        if l.ptr == 0 {
            continue;
        }
        live_objs += 1;
        live_bytes += l.size as u64;
        if !l.marked {
            objs += 1;
            bytes += l.size as u64;
            let b = &mut heap.buckets.as_mut_slice()[l.bucket as usize];
            b.leak_objects += 1;
            b.leak_bytes += l.size as u64;
        }
    }
    let mut m = Message::new();
    if asked > stopped {
        m.str("profalloc: heap check: warning: ")
            .dec(u64::from(asked - stopped))
            .str(" threads did not stop (signals blocked); their stacks were not scanned\n");
        m.write_stderr();
    }
    if overflow {
        Message::new().str("profalloc: heap check: warning: mark stack overflow, some objects may be reported as leaks wrongly\n").write_stderr();
    }
    if objs == 0 {
        let mut m = Message::new();
        m.str("profalloc: heap check: no leaks found (")
            .dec(live_objs)
            .str(" objects, ")
            .dec(live_bytes)
            .str(" bytes still reachable)\n");
        m.write_stderr();
        return;
    }
    let mut order: Table<u32> = Table::empty();
    order.reserve(heap.buckets.len().max(1));
    for (i, b) in heap.buckets.as_slice().iter().enumerate() {
        if b.leak_objects > 0 {
            order.push(i as u32);
        }
    }
    // Largest first (insertion sort: leak sites are few).
    let bk = heap.buckets.as_slice();
    let o = order.as_mut_slice();
    for i in 1..o.len() {
        let mut j = i;
        while j > 0 && bk[o[j] as usize].leak_bytes > bk[o[j - 1] as usize].leak_bytes {
            o.swap(j, j - 1);
            j -= 1;
        }
    }
    let mut m = Message::new();
    m.str("profalloc: heap check: found ")
        .dec(objs)
        .str(" leaked objects (")
        .dec(bytes)
        .str(" bytes) from ")
        .dec(order.len() as u64)
        .str(" allocation stacks; ")
        .dec(live_objs - objs)
        .str(" objects (")
        .dec(live_bytes - bytes)
        .str(" bytes) still reachable\n");
    m.write_stderr();

    // The leak profile, next to the heap profile or in $TMPDIR.
    let mut path = Message::new();
    match env::var(c"TMPDIR").filter(|t| !t.is_empty() && t.len() < PATH_MAX / 2) {
        Some(t) => path.str(core::str::from_utf8(t).unwrap_or("/tmp")),
        None => path.str("/tmp"),
    };
    // SAFETY: getpid has no preconditions.
    path.str("/profalloc.")
        .dec(u64::from(unsafe { libc::getpid() } as u32))
        .str(".leaks.heap");
    let written = match heap.encode(1, "heap check at exit: unreachable objects", true) {
        Some(bytes) => write_file(path_str(&path), bytes),
        None => Err("out of memory"),
    };
    if let Err(e) = written {
        let mut m = Message::new();
        m.str("profalloc: heap check: cannot write the leak profile ")
            .str(path_str(&path))
            .str(": ")
            .str(e)
            .str("\n");
        m.write_stderr();
    }
    let symbolized = written.is_ok() && run_report(path_str(&path));
    if !symbolized {
        Message::new()
            .str("profalloc: heap check: prof-bpf report did not run; raw stacks (leaf first):\n")
            .write_stderr();
        for &b in order.as_slice() {
            let b = &heap.buckets.as_slice()[b as usize];
            let mut m = Message::new();
            m.str("Leak of ")
                .dec(b.leak_bytes)
                .str(" bytes in ")
                .dec(b.leak_objects)
                .str(" objects allocated from:\n");
            m.write_stderr();
            for &f in &b.frames[..b.depth as usize] {
                let mut m = Message::new();
                m.str("\t@ ").hex(f).str("\n");
                m.write_stderr();
            }
            if b.truncated {
                Message::new().str("\t[truncated]\n").write_stderr();
            }
        }
        if written.is_ok() {
            let mut m = Message::new();
            m.str("profalloc: for a symbolized report run: prof-bpf report ")
                .str(path_str(&path))
                .str("\n");
            m.write_stderr();
        }
    }
    let mut m = Message::new();
    m.str("profalloc: heap check: exiting with status 1 because of ")
        .dec(objs)
        .str(" leaked objects\n");
    m.write_stderr();
    // SAFETY: flushing stdio and exiting; the other threads stay stopped.
    unsafe {
        libc::fflush(core::ptr::null_mut());
        libc::_exit(1);
    }
}

/// Runs `prof-bpf report FILE` (PROFBPF_PATH, or prof-bpf on PATH) with
/// its output on our stderr. False when it could not run or failed.
fn run_report(file: &str) -> bool {
    let mut prog = [0u8; PATH_MAX + 1];
    let name: &[u8] = env::var(c"PROFBPF_PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or(b"prof-bpf");
    let n = name.len().min(PATH_MAX);
    prog[..n].copy_from_slice(&name[..n]);
    let mut arg = [0u8; PATH_MAX + 1];
    arg[..file.len().min(PATH_MAX)].copy_from_slice(&file.as_bytes()[..file.len().min(PATH_MAX)]);
    let argv = [
        prog.as_ptr().cast::<libc::c_char>(),
        c"report".as_ptr(),
        arg.as_ptr().cast(),
        core::ptr::null(),
    ];
    let mut m = Message::new();
    m.str("profalloc: heap check: leaks by allocation stack (")
        .str(core::str::from_utf8(&name[..n]).unwrap_or("prof-bpf"))
        .str(" report ")
        .str(file)
        .str("):\n");
    m.write_stderr();
    // The report runs without our preload settings (it would check itself).
    let mut envp: Table<*const libc::c_char> = Table::empty();
    // SAFETY: environ is a null-terminated array of C strings.
    unsafe {
        unsafe extern "C" {
            static environ: *const *const libc::c_char;
        }
        envp.reserve(1 << 16);
        let mut e = environ;
        while !e.is_null() && !(*e).is_null() && envp.len() + 1 < envp.capacity() {
            let var = core::ffi::CStr::from_ptr(*e).to_bytes();
            let ours = [
                &b"LD_PRELOAD="[..],
                b"HEAPCHECK=",
                b"PROFALLOC_HEAPCHECK=",
                b"HEAPPROFILE=",
                b"CPUPROFILE=",
            ];
            if !ours.iter().any(|p| var.starts_with(p)) {
                envp.push(*e);
            }
            e = e.add(1);
        }
        envp.push(core::ptr::null());
    }
    // SAFETY: vfork (no fork handlers: stopped threads may hold the
    // allocator's locks), then in the child only dup2/exec/_exit.
    unsafe {
        #[allow(
            deprecated,
            reason = "the child only calls dup2 and execve before leaving"
        )]
        let pid = libc::vfork();
        if pid < 0 {
            return false;
        }
        if pid == 0 {
            libc::dup2(2, 1);
            libc::execvpe(argv[0], argv.as_ptr(), envp.as_slice().as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                return false;
            }
        }
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}
