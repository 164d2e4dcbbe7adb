//! CPUPROFILE: every thread samples itself on its own CPU-time clock
//! (timer_create on CLOCK_THREAD_CPUTIME_ID, delivered with
//! SIGEV_THREAD_ID to that thread), so each thread is sampled in
//! proportion to the CPU it uses, unlike a process-wide ITIMER_PROF. The
//! SIGPROF handler unwinds the interrupted context with the in-process
//! unwinder and counts (stack, thread) in an mmap'd table; the pprof
//! file is written at exit.
//!
//! Lock: one spin lock around the sample table, held for a lookup and an
//! insert (SIGPROF is blocked in its own handler, so a thread never waits
//! for itself). Owner: started by [`super::start`]; new threads are armed
//! by libprofalloc.so's `pthread_create` through [`on_thread_start`].
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{
    arena::Table,
    heap_profile::{MAX_FRAMES, path_str},
    pprof::Encoder,
    unwind::{self, Regs, Status},
    write_file,
};
use crate::{
    env::{self, Settings},
    lock::SpinLock,
    os::Message,
};

const ENTRIES: usize = 1 << 16;
const SLOTS: usize = 1 << 17;

#[derive(Clone, Copy)]
struct Entry {
    hash: u64,
    tid: u32,
    depth: u32,
    truncated: bool,
    count: u64,
    frames: [u64; MAX_FRAMES],
}

struct Samples {
    entries: Table<Entry>,
    index: Table<u32>,
    dropped: u64,
    enc: Encoder,
}

static LOCK: SpinLock = SpinLock::new();
struct Shared(core::cell::UnsafeCell<Samples>);
// SAFETY: only touched under LOCK.
unsafe impl Sync for Shared {}
static SAMPLES: Shared = Shared(core::cell::UnsafeCell::new(Samples {
    entries: Table::empty(),
    index: Table::empty(),
    dropped: 0,
    enc: Encoder::new(),
}));

static ON: AtomicBool = AtomicBool::new(false);
/// Samples taken, for reports.
static TAKEN: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds of CPU per sample.
static PERIOD: AtomicU64 = AtomicU64::new(10_000_000);

/// Whether CPU profiling is on: new threads must arm their timer.
#[unsafe(link_section = ".text.hot.profalloc")]
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A new thread starts its start routine (libprofalloc.so's
/// `pthread_create`): arms its CPU-time timer when profiling is on.
pub fn on_thread_start() {
    if is_on() {
        start_thread();
    }
}

pub(crate) fn start(s: &Settings) {
    LOCK.lock();
    // SAFETY: under LOCK.
    let ok = unsafe {
        let t = &mut *SAMPLES.0.get();
        t.entries.reserve(ENTRIES) && t.index.reserve(SLOTS)
    };
    LOCK.unlock();
    if !ok {
        Message::new()
            .str("profalloc: warning: no memory for the CPU profile tables\n")
            .write_stderr();
        return;
    }
    PERIOD.store(1_000_000_000 / s.cpu_frequency, Ordering::Relaxed);
    // SAFETY: installs an async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigprof as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGPROF, &sa, core::ptr::null_mut());
    }
    ON.store(true, Ordering::Release);
    let mut m = Message::new();
    m.str("profalloc: CPU profile to ")
        .str(s.cpu_file.as_str())
        .str(" at ")
        .dec(s.cpu_frequency)
        .str(" Hz per thread\n");
    m.write_stderr();
    start_thread();
}

/// Arms this thread's CPU-time timer.
fn start_thread() {
    let period = PERIOD.load(Ordering::Relaxed) as i64;
    // SAFETY: raw timer_create/timer_settime (glibc's wrappers may
    // allocate for other notification kinds; these never do).
    unsafe {
        let mut sev: libc::sigevent = core::mem::zeroed();
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGPROF;
        sev.sigev_notify_thread_id = libc::gettid();
        let mut id: i32 = 0;
        if libc::syscall(
            libc::SYS_timer_create,
            libc::CLOCK_THREAD_CPUTIME_ID,
            &sev,
            &mut id,
        ) != 0
        {
            return;
        }
        let ts = libc::timespec {
            tv_sec: period / 1_000_000_000,
            tv_nsec: period % 1_000_000_000,
        };
        let its = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &its,
            core::ptr::null_mut::<libc::itimerspec>(),
        );
    }
}

extern "C" fn on_sigprof(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: errno is this thread's.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid ucontext.
    let regs = unsafe {
        let g = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        Regs {
            pc: g[libc::REG_RIP as usize] as usize,
            sp: g[libc::REG_RSP as usize] as usize,
            bp: g[libc::REG_RBP as usize] as usize,
        }
    };
    let mut frames = [0u64; MAX_FRAMES];
    let (n, status) = unwind::walk(regs, &mut frames, false);
    let mut truncated = status == Status::Truncated;
    let (frames, n) = if super::python::is_on() {
        let mut merged = [0u64; MAX_FRAMES];
        let (m, lost) = super::python::merge(&frames[..n], true, &mut merged);
        truncated |= lost;
        (merged, m)
    } else {
        (frames, n)
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    // CPU-time timers are checked on scheduler ticks: an expiry found
    // late by more than a period counts the periods it missed in
    // si_overrun (kernel siginfo: _timer.si_overrun at offset 20), so the
    // sample stands for 1 + overrun periods.
    // SAFETY: the kernel's siginfo for a POSIX timer signal.
    let overrun = unsafe {
        if (*info).si_code == libc::SI_TIMER {
            (info.cast::<u8>().add(20).cast::<i32>().read()).max(0) as u64
        } else {
            0
        }
    };
    record(&frames[..n], truncated, tid, 1 + overrun);
    TAKEN.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

fn record(stack: &[u64], truncated: bool, tid: u32, periods: u64) {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ u64::from(tid);
    for &f in stack {
        h = (h ^ f).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h |= 1;
    // SIGPROF is blocked while its handler runs, so this thread never
    // holds the lock here; other threads hold it for a few instructions.
    LOCK.lock();
    // SAFETY: under LOCK.
    unsafe {
        let t = &mut *SAMPLES.0.get();
        let entries = t.entries.as_mut_slice().as_mut_ptr();
        let slots = t.index.slots();
        let mask = slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let e = slots[i];
            if e == 0 {
                break;
            }
            let en = &mut *entries.add(e as usize - 1);
            if en.hash == h && en.tid == tid && &en.frames[..en.depth as usize] == stack {
                en.count += periods;
                LOCK.unlock();
                return;
            }
            i = (i + 1) & mask;
        }
        let mut en = Entry {
            hash: h,
            tid,
            depth: stack.len() as u32,
            truncated,
            count: periods,
            frames: [0; MAX_FRAMES],
        };
        en.frames[..stack.len()].copy_from_slice(stack);
        if t.entries.push(en) {
            slots[i] = t.entries.len() as u32;
        } else {
            t.dropped += 1;
        }
    }
    LOCK.unlock();
}

/// Writes the profile, if one was started (the test runs in every
/// process, the writing only with CPUPROFILE).
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn at_exit() {
    if ON.swap(false, Ordering::AcqRel) {
        write_profile();
    }
}

#[inline(never)]
fn write_profile() {
    let s = env::settings();
    let period = PERIOD.load(Ordering::Relaxed) as i64;
    LOCK.lock();
    // SAFETY: under LOCK.
    let t = unsafe { &mut *SAMPLES.0.get() };
    let types = [("samples", "count"), ("cpu", "nanoseconds")];
    let mut ok = t.enc.begin(&types, "cpu", ("cpu", "nanoseconds", period));
    if ok {
        let mut c = Message::new();
        c.str("profalloc CPU profile: ")
            .dec(s.cpu_frequency)
            .str(" Hz per thread CPU-time timers");
        t.enc.comment(path_str(&c));
        if t.dropped > 0 {
            let mut c = Message::new();
            c.str("lost samples: ").dec(t.dropped);
            t.enc.comment(path_str(&c));
        }
        super::python::comments(|c| t.enc.comment(c));
        let process = super::pprof::ProcessLabels::read();
        let mut truncated = 0u64;
        for i in 0..t.entries.len() {
            let e = t.entries.as_slice()[i];
            truncated += u64::from(e.truncated) * e.count;
            t.enc.sample(
                &e.frames[..e.depth as usize],
                e.truncated,
                true,
                &[e.count as i64, e.count as i64 * period],
                &[("pid", process.pid), ("tid", i64::from(e.tid))],
                &[("comm", process.comm())],
            );
        }
        if truncated > 0 {
            let mut c = Message::new();
            c.str("truncated stacks: ").dec(truncated).str(" samples");
            t.enc.comment(path_str(&c));
        }
    }
    let result = if ok { t.enc.finish() } else { None };
    ok = match result {
        Some(bytes) => match write_file(s.cpu_file.as_str(), bytes) {
            Ok(()) => true,
            Err(e) => {
                let mut m = Message::new();
                m.str("profalloc: warning: cannot write CPUPROFILE ")
                    .str(s.cpu_file.as_str())
                    .str(": ")
                    .str(e)
                    .str("\n");
                m.write_stderr();
                return LOCK.unlock();
            }
        },
        None => false,
    };
    LOCK.unlock();
    let mut m = Message::new();
    if ok {
        m.str("profalloc: wrote CPU profile ")
            .str(s.cpu_file.as_str())
            .str(" (")
            .dec(TAKEN.load(Ordering::Relaxed))
            .str(" samples)\n");
    } else {
        m.str("profalloc: warning: out of memory writing the CPU profile\n");
    }
    m.write_stderr();
}
