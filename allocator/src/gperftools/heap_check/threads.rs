//! Stopping the other threads for the heap check: each gets a real-time
//! signal, publishes its registers, stack pointer and thread pointer from
//! the handler into a slot, and waits there until the check is done (the
//! process then exits). No lock: a slot is claimed with a fetch-add.
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

pub(super) const MAX_THREADS: usize = 1024;
const NGREG: usize = 23;

#[derive(Clone, Copy)]
pub(super) struct Stopped {
    pub(super) regs: [usize; NGREG],
    pub(super) sp: usize,
    pub(super) fs: usize,
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

pub(super) fn thread_pointer() -> usize {
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
pub(super) fn stop_threads() -> u32 {
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

/// The threads that stopped so far (at most [`MAX_THREADS`]).
pub(super) fn stopped() -> usize {
    NEXT_SLOT.load(Ordering::Acquire).min(MAX_THREADS)
}

/// The registers and stack of stopped thread `i` (< [`stopped`]).
pub(super) fn stopped_thread(i: usize) -> Stopped {
    // SAFETY: slot i was published before STOPPED was counted.
    unsafe { (*SLOTS.0.get())[i] }
}

/// Lets the stopped threads go on (they wait in their handler).
pub(super) fn release_threads() {
    RELEASE.store(true, Ordering::Release);
}
