//! libprofalloc.so: the complete glibc malloc API and every C++ operator
//! new/delete, all served by profalloc. Load it with `LD_PRELOAD` (its
//! initial-exec TLS may make `dlopen` fail).
//!
//! The C++ operators call the exported `malloc`, `memalign` and `free`
//! (never inlined), so a probe on those symbols sees every allocation.
//! Errors follow glibc: null with errno ENOMEM (or EINVAL for a bad
//! alignment), `realloc(p, 0)` frees and returns null, `free(NULL)` does
//! nothing; `operator new` calls the new-handler and throws
//! `std::bad_alloc` (through libstdc++, found at run time).
//!
//! It also exports `pthread_create` ([`pthread`]), for CPUPROFILE's
//! per-thread timers, and, from the `profalloc` crate, the sampler's hook
//! functions, `profalloc_sample_bytes` and `profalloc_live_heap` (the
//! sampled live heap's header), with the `otel_memory` USDT notes.
use core::ffi::{c_int, c_void};

use profalloc::{alloc as a, size_class::MIN_ALIGN};

mod pthread;
mod unmap;

const SYS_PAGE: usize = 4096;

#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    a::malloc(size).cast()
}

/// # Safety
/// `p` is null or a live allocation.
#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: caller contract.
    unsafe { a::free(p.cast()) }
}

/// # Safety
/// `p` is null or a live allocation.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: caller contract.
    unsafe { free(p) }
}

#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    a::calloc(n, size).cast()
}

/// # Safety
/// `p` is null or a live allocation.
#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: caller contract.
    unsafe { a::realloc(p.cast(), size).cast() }
}

/// # Safety
/// `p` is null or a live allocation.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        profalloc::os::set_enomem();
        return core::ptr::null_mut();
    };
    // SAFETY: caller contract.
    unsafe { realloc(p, total) }
}

fn set_errno(e: c_int) {
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // glibc: a non-power-of-two alignment is rounded up.
    let Some(align) = align.max(1).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    if align > isize::MAX as usize / 2 {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    a::memalign(align, size).cast()
}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    memalign(align, size)
}

/// # Safety
/// `out` is a valid pointer.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = memalign(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: caller contract.
    unsafe { *out = p };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    memalign(SYS_PAGE, size)
}

#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(rounded) = size.max(1).checked_add(SYS_PAGE - 1) else {
        profalloc::os::set_enomem();
        return core::ptr::null_mut();
    };
    memalign(SYS_PAGE, rounded & !(SYS_PAGE - 1))
}

/// # Safety
/// `p` is null or a live allocation.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: caller contract.
    unsafe { a::usable_size(p.cast()) }
}

#[unsafe(no_mangle)]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    c_int::from(a::trim() > 0)
}

/// Accepted and ignored (glibc's tunables have no meaning here).
#[unsafe(no_mangle)]
pub extern "C" fn mallopt(_param: c_int, _value: c_int) -> c_int {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn malloc_stats() {
    profalloc::stats::write_report();
}

fn info2() -> libc::mallinfo2 {
    let s = profalloc::stats();
    let free = s.thread_caches + s.central + s.page_heap;
    libc::mallinfo2 {
        arena: (s.mapped - s.returned) as usize,
        ordblks: 0,
        smblks: 0,
        hblks: 0,
        hblkhd: 0,
        usmblks: 0,
        fsmblks: 0,
        uordblks: s.in_use as usize,
        fordblks: free as usize,
        keepcost: s.page_heap as usize,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn mallinfo2() -> libc::mallinfo2 {
    info2()
}

#[unsafe(no_mangle)]
pub extern "C" fn mallinfo() -> libc::mallinfo {
    let i = info2();
    // glibc truncates to int the same way.
    libc::mallinfo {
        arena: i.arena as c_int,
        ordblks: 0,
        smblks: 0,
        hblks: 0,
        hblkhd: 0,
        usmblks: 0,
        fsmblks: 0,
        uordblks: i.uordblks as c_int,
        fordblks: i.fordblks as c_int,
        keepcost: i.keepcost as c_int,
    }
}

/// Fills `*out` with the allocator's statistics (see `profalloc::Stats`:
/// eight `uint64_t` fields: in_use, thread_caches, central, page_heap,
/// returned, mapped, metadata, sampled).
///
/// # Safety
/// `out` points to writable memory for the struct.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn profalloc_stats(out: *mut profalloc::Stats) {
    if !out.is_null() {
        // SAFETY: caller contract.
        unsafe { *out = profalloc::stats() };
    }
}

// ---- C++ operators ----

type Handler = extern "C-unwind" fn();

/// libstdc++'s function behind `name`, when the program has libstdc++.
fn cxx_symbol(name: &core::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

/// operator new's failure path: call the new-handler until it gives up,
/// then throw std::bad_alloc.
#[cold]
fn new_failed() {
    let get = cxx_symbol(c"_ZSt15get_new_handlerv");
    if !get.is_null() {
        // SAFETY: std::get_new_handler() returns the handler or null.
        let get: extern "C" fn() -> Option<Handler> = unsafe { core::mem::transmute(get) };
        if let Some(handler) = get() {
            handler();
            return;
        }
    }
    let throw = cxx_symbol(c"_ZSt17__throw_bad_allocv");
    if throw.is_null() {
        profalloc::os::fatal(
            "operator new",
            0,
            "out of memory and no std::bad_alloc to throw",
        );
    }
    // SAFETY: std::__throw_bad_alloc() throws; the "C-unwind" ABI lets the
    // exception pass through these frames to the caller.
    let throw: extern "C-unwind" fn() -> ! = unsafe { core::mem::transmute(throw) };
    throw()
}

#[unsafe(link_section = ".text.hot.profalloc")]
fn new_impl(size: usize, align: usize) -> *mut c_void {
    loop {
        let p = if align <= MIN_ALIGN {
            malloc(size)
        } else {
            memalign(align, size)
        };
        if !p.is_null() {
            return p;
        }
        new_failed();
    }
}

macro_rules! operator_new {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        #[unsafe(link_section = ".text.hot.profalloc")]
        pub extern "C-unwind" fn $name(size: usize) -> *mut c_void {
            new_impl(size, 0)
        }
    )*};
}
macro_rules! operator_new_aligned {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C-unwind" fn $name(size: usize, align: usize) -> *mut c_void {
            new_impl(size, align)
        }
    )*};
}
macro_rules! operator_new_nothrow {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name(size: usize, _nothrow: *const c_void) -> *mut c_void {
            malloc(size)
        }
    )*};
}
macro_rules! operator_new_aligned_nothrow {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name(size: usize, align: usize, _nothrow: *const c_void) -> *mut c_void {
            memalign(align, size)
        }
    )*};
}
macro_rules! operator_delete {
    ($($name:ident($($arg:ident: $t:ty),*)),*) => {$(
        /// # Safety
        /// `p` is null or a live allocation.
        #[unsafe(no_mangle)]
        #[unsafe(link_section = ".text.hot.profalloc")]
        pub unsafe extern "C" fn $name(p: *mut c_void $(, $arg: $t)*) {
            $(let _ = $arg;)*
            // SAFETY: caller contract.
            unsafe { free(p) }
        }
    )*};
}

operator_new!(_Znwm, _Znam);
operator_new_aligned!(_ZnwmSt11align_val_t, _ZnamSt11align_val_t);
operator_new_nothrow!(_ZnwmRKSt9nothrow_t, _ZnamRKSt9nothrow_t);
operator_new_aligned_nothrow!(
    _ZnwmSt11align_val_tRKSt9nothrow_t,
    _ZnamSt11align_val_tRKSt9nothrow_t
);
operator_delete!(
    _ZdlPv(),
    _ZdaPv(),
    _ZdlPvm(size: usize),
    _ZdaPvm(size: usize),
    _ZdlPvRKSt9nothrow_t(nothrow: *const c_void),
    _ZdaPvRKSt9nothrow_t(nothrow: *const c_void),
    _ZdlPvSt11align_val_t(align: usize),
    _ZdaPvSt11align_val_t(align: usize),
    _ZdlPvmSt11align_val_t(size: usize, align: usize),
    _ZdaPvmSt11align_val_t(size: usize, align: usize),
    _ZdlPvSt11align_val_tRKSt9nothrow_t(align: usize, nothrow: *const c_void),
    _ZdaPvSt11align_val_tRKSt9nothrow_t(align: usize, nothrow: *const c_void)
);
