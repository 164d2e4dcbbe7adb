//! The walker's fault-safe reads of this process's memory, batched.
//!
//! A read is a process_vm_readv on the calling thread's own id (any thread
//! id names the process's memory, and the caller has it: no getpid per
//! read). Each costs a system call, and most of its cost is per call and
//! per range, so a walk first reads, in one call, the ranges the same
//! thread's previous walk read ([`Plan`]): a thread that allocates in a
//! loop walks the same frames and code objects again. The walk then reads
//! as before; a read that matches a prefetched range (same address and
//! length) is served from the batch, any other goes to the kernel. The
//! batch is read on this thread at the start of its own walk, while this
//! thread (the only one that changes its frames) runs the walk, so a
//! prefetched range holds what a read at its turn would have found; every
//! check the walk makes applies to it as to any read. A wrong plan only
//! costs the ranges it names.
//!
//! Ranges on pages the thread's earlier walks read ([`super::mapped`]) are
//! neither prefetched nor read through the kernel: they are copied
//! directly.
use super::mapped::PageCache;

/// Ranges a plan holds, and their bytes at most.
pub(crate) const PLANNED: usize = 24;
pub(crate) const PLANNED_BYTES: usize = 3072;

/// The ranges one walk read, for the next walk of the same thread.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Plan {
    addr: [u64; PLANNED],
    len: [u16; PLANNED],
    n: u16,
    bytes: u16,
}

impl Plan {
    pub(crate) const EMPTY: Plan = Plan {
        addr: [0; PLANNED],
        len: [0; PLANNED],
        n: 0,
        bytes: 0,
    };

    fn push(&mut self, addr: u64, len: usize) {
        let n = self.n as usize;
        if n < PLANNED && self.bytes as usize + len <= PLANNED_BYTES {
            self.addr[n] = addr;
            self.len[n] = len as u16;
            self.n += 1;
            self.bytes += len as u16;
        }
    }
}

pub(crate) struct Reader<'a> {
    pub tid: i32,
    /// The plan prefetched, and where each of its ranges is in the batch
    /// (NOT_FETCHED: not read there).
    plan: &'a Plan,
    fetched: [u16; PLANNED],
    batch: &'a [u8],
    /// The pages read directly (None: every read goes to the kernel).
    direct: Option<&'a PageCache>,
    /// The ranges this walk reads.
    pub next: Plan,
    /// The ranges the kernel read (prefetched or not), for the thread's
    /// kept pages when the walk passes every check.
    pub from_kernel: [(u64, u16); FROM_KERNEL],
    pub n_from_kernel: usize,
}

/// Ranges read by the kernel that one walk keeps the pages of, at most.
const FROM_KERNEL: usize = 64;

impl<'a> Reader<'a> {
    /// Reads the ranges of `plan` into `batch`, in one system call, but
    /// those `direct` covers.
    pub(crate) fn prefetch(
        tid: i32,
        plan: &'a Plan,
        batch: &'a mut [u8; PLANNED_BYTES],
        direct: Option<&'a PageCache>,
    ) -> Self {
        let n = (plan.n as usize).min(PLANNED);
        let mut local = [libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        }; PLANNED];
        let mut remote = local;
        // The plan's index of each range read, in batch order.
        let mut which = [0usize; PLANNED];
        let (mut at, mut used) = (0, 0);
        for i in 0..n {
            let len = plan.len[i] as usize;
            if at + len > batch.len() || !plausible(plan.addr[i]) {
                break;
            }
            if direct.is_some_and(|c| c.covers(plan.addr[i], len)) {
                continue;
            }
            local[used] = libc::iovec {
                iov_base: batch[at..].as_mut_ptr().cast(),
                iov_len: len,
            };
            remote[used] = libc::iovec {
                iov_base: plan.addr[i] as *mut libc::c_void,
                iov_len: len,
            };
            which[used] = i;
            at += len;
            used += 1;
        }
        let got = if used == 0 {
            0
        } else {
            // SAFETY: reads our own memory into `batch` (the local ranges
            // lie in it); the kernel checks the remote ranges and stops at
            // the first it cannot read.
            unsafe {
                libc::process_vm_readv(
                    tid,
                    local.as_ptr(),
                    used as u64,
                    remote.as_ptr(),
                    used as u64,
                    0,
                )
            }
        };
        // The ranges read whole: a partial read stops at the first range
        // that failed.
        let mut fetched = [NOT_FETCHED; PLANNED];
        let mut sum = 0;
        for &i in &which[..used] {
            let len = plan.len[i] as usize;
            if got < 0 || sum + len > got as usize {
                break;
            }
            fetched[i] = sum as u16;
            sum += len;
        }
        Self {
            tid,
            plan,
            fetched,
            batch: &batch[..],
            direct,
            next: Plan::EMPTY,
            from_kernel: [(0, 0); FROM_KERNEL],
            n_from_kernel: 0,
        }
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub(crate) fn read(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        if !plausible(addr) {
            return None;
        }
        let len = buf.len();
        if self.direct.is_some_and(|c| c.covers(addr, len)) {
            // SAFETY: a kept page, which no unmap can remove while this
            // walk runs (see super::mapped).
            unsafe { copy_volatile(addr as usize, buf) };
            self.next.push(addr, len);
            return Some(());
        }
        for i in 0..(self.plan.n as usize).min(PLANNED) {
            let at = self.fetched[i];
            if at != NOT_FETCHED && self.plan.addr[i] == addr && self.plan.len[i] as usize == len {
                let at = at as usize;
                buf.copy_from_slice(&self.batch[at..at + len]);
                self.next.push(addr, len);
                self.read_by_kernel(addr, len);
                return Some(());
            }
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: reads our own memory into `buf`; the kernel checks the
        // range.
        let n = unsafe { libc::process_vm_readv(self.tid, &local, 1, &remote, 1, 0) };
        if n != len as isize {
            return None;
        }
        self.next.push(addr, len);
        self.read_by_kernel(addr, len);
        Some(())
    }

    fn read_by_kernel(&mut self, addr: u64, len: usize) {
        if self.n_from_kernel < FROM_KERNEL {
            self.from_kernel[self.n_from_kernel] = (addr, len as u16);
            self.n_from_kernel += 1;
        }
    }

    /// The ranges the kernel read.
    #[cfg(test)]
    pub(crate) fn kernel_ranges(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.from_kernel[..self.n_from_kernel]
            .iter()
            .map(|&(a, l)| (a, l as usize))
    }

    pub(crate) fn u64_at(&mut self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Some(u64::from_le_bytes(b))
    }
}

const NOT_FETCHED: u16 = u16::MAX;

/// Copies `buf.len()` bytes at `addr`, word by word where aligned.
/// Volatile: memory the thread (or, for code objects, another thread)
/// may change as it is read.
///
/// # Safety
/// `[addr, addr + buf.len())` is mapped readable.
unsafe fn copy_volatile(addr: usize, buf: &mut [u8]) {
    let mut k = 0;
    // SAFETY: the caller's contract; words are read aligned.
    unsafe {
        if addr.is_multiple_of(8) {
            while k + 8 <= buf.len() {
                let w = core::ptr::read_volatile((addr + k) as *const u64);
                buf[k..k + 8].copy_from_slice(&w.to_ne_bytes());
                k += 8;
            }
        }
        for (i, b) in buf.iter_mut().enumerate().skip(k) {
            *b = core::ptr::read_volatile((addr + i) as *const u8);
        }
    }
}

/// A user-space address.
pub(crate) fn plausible(addr: u64) -> bool {
    (4096..1 << 47).contains(&addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetched_ranges_serve_reads_until_the_first_unreadable_one() {
        let mut data = [1u64, 2, 3];
        let at = |i: usize, d: &[u64; 3]| &d[i] as *const u64 as u64;
        let mut plan = Plan::EMPTY;
        plan.push(at(0, &data), 8);
        // Below mmap_min_addr: never mapped.
        plan.push(8192, 8);
        plan.push(at(2, &data), 8);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut batch = [0u8; PLANNED_BYTES];
        let mut r = Reader::prefetch(tid, &plan, &mut batch, None);
        data[0] = 10;
        data[2] = 30;
        let (a0, a2) = (at(0, &data), at(2, &data));
        // The first range comes from the batch (read before the change),
        // the third, after the failed one, from the kernel.
        assert_eq!(r.u64_at(a0), Some(1));
        assert_eq!(r.u64_at(8192), None);
        assert_eq!(r.u64_at(a2), Some(30));
        // A range of another length is read again.
        let mut four = [0u8; 4];
        assert_eq!(r.read(a0, &mut four), Some(()));
        assert_eq!(u32::from_le_bytes(four), 10);
        assert_eq!(r.next.n, 3);
        assert_eq!(&r.next.addr[..3], &[a0, a2, a0]);
    }
}
