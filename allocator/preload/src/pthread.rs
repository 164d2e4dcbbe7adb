//! `pthread_create` of libprofalloc.so: with CPUPROFILE on, a new thread
//! arms its CPU-time timer before running its start routine (threads that
//! never allocate are sampled too). Otherwise glibc's is called as is.
use core::{
    ffi::c_void,
    sync::atomic::{AtomicUsize, Ordering},
};

use profalloc::gperftools::cpu_profile;

type Start = extern "C" fn(*mut c_void) -> *mut c_void;
type Create = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    Start,
    *mut c_void,
) -> i32;

/// glibc's pthread_create (the next definition), once looked up.
static REAL: AtomicUsize = AtomicUsize::new(0);

#[unsafe(link_section = ".text.hot.profalloc")]
extern "C" fn trampoline(p: *mut c_void) -> *mut c_void {
    // SAFETY: p is the two-word record made below, ours to free.
    let (start, arg) = unsafe {
        let rec = p.cast::<usize>();
        let r = (*rec, *rec.add(1));
        crate::free(p);
        r
    };
    cpu_profile::on_thread_start();
    // SAFETY: the start routine the program passed.
    let start: Start = unsafe { core::mem::transmute(start) };
    start(arg as *mut c_void)
}

/// # Safety
/// pthread_create's contract.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: Start,
    arg: *mut c_void,
) -> i32 {
    let mut real = REAL.load(Ordering::Relaxed);
    if real == 0 {
        // SAFETY: dlsym with a NUL-terminated name.
        real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        if real == 0 {
            return libc::EAGAIN;
        }
        REAL.store(real, Ordering::Relaxed);
    }
    // SAFETY: the next definition is glibc's pthread_create.
    let real: Create = unsafe { core::mem::transmute(real) };
    if !cpu_profile::is_on() {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { real(thread, attr, start, arg) };
    }
    let rec = crate::malloc(16).cast::<usize>();
    if rec.is_null() {
        return libc::EAGAIN;
    }
    // SAFETY: rec holds two words; ownership passes to the new thread,
    // or comes back on failure.
    unsafe {
        *rec = start as usize;
        *rec.add(1) = arg as usize;
        let r = real(thread, attr, trampoline, rec.cast());
        if r != 0 {
            crate::free(rec.cast());
        }
        r
    }
}
