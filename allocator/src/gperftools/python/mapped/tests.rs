use core::sync::atomic::{AtomicBool, Ordering};

use super::{super::read::Reader, *};
use crate::gperftools::python::read::{PLANNED_BYTES, Plan};

fn page() -> *mut u64 {
    // SAFETY: a fresh anonymous mapping.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// One walk's read of `addr` with `cache`; keeps the pages read.
fn walk_read(cache: &mut PageCache, addr: u64) -> Option<u64> {
    let readers = Readers::enter(cache);
    let plan = Plan::EMPTY;
    let mut batch = [0u8; PLANNED_BYTES];
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let kept = *cache;
    let mut r = Reader::prefetch(tid, &plan, &mut batch, readers.direct.then_some(&kept));
    let v = r.u64_at(addr);
    if readers.direct && v.is_some() {
        for (a, l) in r.kernel_ranges() {
            cache.keep(a, l);
        }
    }
    v
}

#[test]
fn pages_are_kept_per_page_and_forgotten_after_an_unmap() {
    hooked();
    let mut c = PageCache::EMPTY;
    let r = Readers::enter(&mut c);
    c.keep(0x10ff8, 16);
    assert!(c.covers(0x10000, 8) && c.covers(0x11ff0, 16));
    assert!(!c.covers(0x11ff8, 16));
    drop(r);
    unmapping(|| ());
    let _r = Readers::enter(&mut c);
    assert!(!c.covers(0x10000, 8));
}

#[test]
fn a_kept_page_that_is_unmapped_is_never_read_directly() {
    hooked();
    let p = page();
    // SAFETY: our mapping.
    unsafe { p.write(7) };
    let mut c = PageCache::EMPTY;
    // The first read goes to the kernel and keeps the page, the next is
    // direct (and sees what the kernel's read would).
    assert_eq!(walk_read(&mut c, p as u64), Some(7));
    // SAFETY: our mapping.
    unsafe { p.write(8) };
    assert_eq!(walk_read(&mut c, p as u64), Some(8));
    // SAFETY: our mapping, unused from here on.
    unmapping(|| unsafe { libc::munmap(p.cast(), 4096) });
    // A direct read would fault: the kernel's read fails instead.
    assert_eq!(walk_read(&mut c, p as u64), None);
    assert!(!c.covers(p as u64, 8));
}

#[test]
fn an_unmap_waits_for_the_walks_under_way() {
    hooked();
    let mut c = PageCache::EMPTY;
    let walk = Readers::enter(&mut c);
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let unmapper = {
        let done = done.clone();
        std::thread::spawn(move || unmapping(|| done.store(true, Ordering::SeqCst)))
    };
    // While the walk runs no unmap happens, and walks that start
    // meanwhile read through the kernel only.
    while UNMAPPING.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    let mut other = PageCache::EMPTY;
    assert!(!Readers::enter(&mut other).direct);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(!done.load(Ordering::SeqCst));
    drop(walk);
    unmapper.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}
