//! HEAPPROFILE: a stack per sampled allocation, aggregated into buckets
//! (one per distinct stack), the live sampled objects, and the dumps
//! (`prefix.NNNN.heap`, pprof) on the gperftools triggers. The heap
//! checker reuses the same tables with every allocation recorded.
//!
//! Lock: one spin lock around the tables. It is taken only on sampled
//! allocations and their frees, after the allocator released its own
//! locks; a re-entrant free (signal handler on a thread holding it) only
//! tries it. Owner: the sampler's recorder ([`super::record_alloc`],
//! [`super::record_free`]); the heap checker reads the tables at exit.
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Stack, arena::Table, now_secs, pprof::Encoder, write_file};
use crate::{
    env::{self, Settings},
    lock::SpinLock,
    os::Message,
    sampler,
};

pub(crate) const MAX_FRAMES: usize = profiler_common::hooks::LIVE_MAX_FRAMES;
const BUCKET_CAP: usize = 1 << 16;
const BUCKET_SLOTS: usize = 1 << 17;
/// The live table starts small and doubles (rehashing) at 3/4 full: a
/// hash table touches its pages at random, so a table sized for the worst
/// case up front would cost a resident page per recorded object.
const LIVE_SLOTS_START: usize = 1 << 16;
const LIVE_SLOTS_MAX: usize = 1 << 26;

#[derive(Clone, Copy)]
pub(crate) struct Bucket {
    pub hash: u64,
    pub depth: u32,
    pub truncated: bool,
    pub frames: [u64; MAX_FRAMES],
    /// Estimated objects and bytes allocated and freed from this stack.
    pub alloc_objects: f64,
    pub alloc_bytes: u64,
    pub free_objects: f64,
    pub free_bytes: u64,
    /// Heap checker: unreachable objects and their bytes.
    pub leak_objects: u64,
    pub leak_bytes: u64,
}

/// A live sampled object. `ptr` 0 = empty slot.
#[derive(Clone, Copy)]
pub(crate) struct Live {
    pub ptr: usize,
    pub size: usize,
    pub weight: u64,
    pub bucket: u32,
    /// Heap checker: reached by the scan.
    pub marked: bool,
}

pub(crate) struct Heap {
    pub buckets: Table<Bucket>,
    index: Table<u32>,
    pub live: Table<Live>,
    pub live_count: usize,
    /// Estimated totals since start.
    pub allocated: u64,
    pub in_use: u64,
    /// Objects whose stack did not fit (tables full).
    pub dropped: u64,
    dumps: u32,
    next_alloc_dump: u64,
    next_inuse_dump: u64,
    last_dump_secs: u64,
    warned: bool,
    enc: Encoder,
}

pub(crate) static LOCK: SpinLock = SpinLock::new();
struct Shared(core::cell::UnsafeCell<Heap>);
// SAFETY: only touched under LOCK.
unsafe impl Sync for Shared {}
static HEAP: Shared = Shared(core::cell::UnsafeCell::new(Heap {
    buckets: Table::empty(),
    index: Table::empty(),
    live: Table::empty(),
    live_count: 0,
    allocated: 0,
    in_use: 0,
    dropped: 0,
    dumps: 0,
    next_alloc_dump: 0,
    next_inuse_dump: 0,
    last_dump_secs: 0,
    warned: false,
    enc: Encoder::new(),
}));

/// Stacks are recorded (HEAPPROFILE or the heap checker).
pub(crate) static ON: AtomicBool = AtomicBool::new(false);
/// Frees of sampled objects on a re-entrant path that found the table
/// locked (their objects stay in use in the profile).
static LOST_FREES: AtomicU64 = AtomicU64::new(0);

/// The tables; the caller holds LOCK.
///
/// # Safety
/// LOCK is held by this thread.
pub(crate) unsafe fn heap() -> &'static mut Heap {
    // SAFETY: the caller holds the lock.
    unsafe { &mut *HEAP.0.get() }
}

pub(crate) fn start(s: &Settings) -> bool {
    LOCK.lock();
    // SAFETY: under LOCK.
    let ok = unsafe {
        let h = heap();
        let ok = h.buckets.reserve(BUCKET_CAP)
            && h.index.reserve(BUCKET_SLOTS)
            && h.live.reserve(LIVE_SLOTS_START);
        h.next_alloc_dump = s.alloc_interval;
        h.next_inuse_dump = s.inuse_interval;
        h.last_dump_secs = now_secs();
        ok
    };
    LOCK.unlock();
    if ok {
        ON.store(true, Ordering::Release);
    }
    ok
}

fn hash_frames(frames: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &f in frames {
        h = (h ^ f).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h | 1
}

fn slot_of(ptr: usize, mask: usize) -> usize {
    ((ptr as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

/// A sampled allocation of `size` bytes standing for `weight` bytes,
/// allocated from `stack`.
pub(crate) fn record_alloc(ptr: *mut u8, size: usize, weight: u64, stack: &Stack) {
    LOCK.lock();
    // SAFETY: under LOCK.
    unsafe {
        let h = heap();
        h.add(
            ptr as usize,
            size,
            weight,
            stack.frames(),
            stack.truncated(),
        );
        h.maybe_dump();
    }
    LOCK.unlock();
}

/// A sampled object is freed. `may_wait`: false on a re-entrant path
/// (the lock may be held by this very thread).
pub(crate) fn record_free(ptr: *mut u8, may_wait: bool) {
    if may_wait {
        LOCK.lock();
    } else if !try_lock() {
        LOST_FREES.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // SAFETY: under LOCK.
    unsafe { heap().remove(ptr as usize) };
    LOCK.unlock();
}

fn try_lock() -> bool {
    for _ in 0..64 {
        if LOCK.try_lock() {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

impl Heap {
    fn bucket(&mut self, stack: &[u64], truncated: bool) -> Option<u32> {
        let hash = hash_frames(stack);
        let slots = self.index.slots();
        let mask = slots.len() - 1;
        let mut i = hash as usize & mask;
        let buckets = self.buckets.as_slice();
        loop {
            let b = slots[i];
            if b == 0 {
                break;
            }
            let bk = &buckets[b as usize - 1];
            if bk.hash == hash && &bk.frames[..bk.depth as usize] == stack {
                return Some(b - 1);
            }
            i = (i + 1) & mask;
        }
        let mut bk = Bucket {
            hash,
            depth: stack.len() as u32,
            truncated,
            frames: [0; MAX_FRAMES],
            alloc_objects: 0.0,
            alloc_bytes: 0,
            free_objects: 0.0,
            free_bytes: 0,
            leak_objects: 0,
            leak_bytes: 0,
        };
        bk.frames[..stack.len()].copy_from_slice(stack);
        if !self.buckets.push(bk) {
            return None;
        }
        let idx = self.buckets.len() as u32;
        self.index.slots()[i] = idx;
        Some(idx - 1)
    }

    fn add(&mut self, ptr: usize, size: usize, weight: u64, stack: &[u64], truncated: bool) {
        let Some(b) = self.bucket(stack, truncated) else {
            self.dropped += 1;
            return;
        };
        if self.live_count * 4 >= self.live.capacity() * 3 && !self.grow_live() {
            self.dropped += 1;
            return;
        }
        let objects = weight as f64 / size.max(1) as f64;
        let bk = &mut self.buckets.as_mut_slice()[b as usize];
        bk.alloc_objects += objects;
        bk.alloc_bytes += weight;
        self.allocated += weight;
        self.in_use += weight;
        let slots = self.live.slots();
        let mask = slots.len() - 1;
        let mut i = slot_of(ptr, mask);
        while slots[i].ptr != 0 && slots[i].ptr != ptr {
            i = (i + 1) & mask;
        }
        if slots[i].ptr == 0 {
            self.live_count += 1;
        }
        slots[i] = Live {
            ptr,
            size,
            weight,
            bucket: b,
            marked: false,
        };
    }

    /// Doubles the live table; false at the maximum size or out of memory.
    fn grow_live(&mut self) -> bool {
        let cap = self.live.capacity() * 2;
        let mut bigger = Table::<Live>::empty();
        if cap > LIVE_SLOTS_MAX || !bigger.reserve(cap) {
            return false;
        }
        let slots = bigger.slots();
        let mask = slots.len() - 1;
        for old in self.live.slots().iter().filter(|l| l.ptr != 0) {
            let mut i = slot_of(old.ptr, mask);
            while slots[i].ptr != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = *old;
        }
        self.live.release();
        self.live = bigger;
        true
    }

    /// Removes `ptr` from the live table (backward-shift deletion, so
    /// lookups never cross tombstones).
    fn remove(&mut self, ptr: usize) {
        let slots = self.live.slots();
        if slots.is_empty() {
            return;
        }
        let mask = slots.len() - 1;
        let mut i = slot_of(ptr, mask);
        loop {
            if slots[i].ptr == 0 {
                return; // not tracked (sampled before profiling started)
            }
            if slots[i].ptr == ptr {
                break;
            }
            i = (i + 1) & mask;
        }
        let gone = slots[i];
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if slots[j].ptr == 0 {
                break;
            }
            let home = slot_of(slots[j].ptr, mask);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !between {
                slots[hole] = slots[j];
                hole = j;
            }
        }
        slots[hole].ptr = 0;
        self.live_count -= 1;
        let bk = &mut self.buckets.as_mut_slice()[gone.bucket as usize];
        bk.free_objects += gone.weight as f64 / gone.size.max(1) as f64;
        bk.free_bytes += gone.weight;
        self.in_use -= gone.weight;
    }

    /// Finds the live object starting at `ptr`.
    pub(crate) fn find(&mut self, ptr: usize) -> Option<&mut Live> {
        let slots = self.live.slots();
        if slots.is_empty() {
            return None;
        }
        let mask = slots.len() - 1;
        let mut i = slot_of(ptr, mask);
        loop {
            if slots[i].ptr == 0 {
                return None;
            }
            if slots[i].ptr == ptr {
                return Some(&mut slots[i]);
            }
            i = (i + 1) & mask;
        }
    }

    fn maybe_dump(&mut self) {
        let s = env::settings();
        if s.heap_prefix.is_empty() || self.warned {
            return;
        }
        if s.alloc_interval > 0 && self.allocated >= self.next_alloc_dump {
            self.dump(self.allocated >> 20, "MB allocated");
        } else if s.inuse_interval > 0 && self.in_use >= self.next_inuse_dump {
            self.dump(self.in_use >> 20, "MB in use");
        } else if s.time_interval > 0 && now_secs() >= self.last_dump_secs + s.time_interval {
            self.dump(now_secs() - self.last_dump_secs, "s since the last dump");
        }
    }

    /// Writes `prefix.NNNN.heap`; `n` and `why` say what triggered it. A
    /// failure is reported once, and no dump is tried after it.
    pub(crate) fn dump(&mut self, n: u64, why: &str) {
        let s = env::settings();
        if self.warned {
            return;
        }
        self.dumps += 1;
        if s.alloc_interval > 0 {
            while self.next_alloc_dump <= self.allocated {
                self.next_alloc_dump += s.alloc_interval;
            }
        }
        if s.inuse_interval > 0 {
            self.next_inuse_dump = self.in_use + s.inuse_interval;
        }
        self.last_dump_secs = now_secs();
        let mut path = Message::new();
        path.str(s.heap_prefix.as_str()).str(".");
        let d = self.dumps;
        for div in [1000, 100, 10, 1] {
            path.dec(u64::from(d / div % 10));
        }
        path.str(".heap");
        let mut reason = Message::new();
        if n != u64::MAX {
            reason.dec(n).str(" ");
        }
        reason.str(why);
        let result = match self.encode(sampler::rate(), path_str(&reason), false) {
            Some(bytes) => write_file(path_str(&path), bytes),
            None => Err("out of memory"),
        };
        let mut m = Message::new();
        match result {
            Ok(()) => {
                m.str("profalloc: dumped heap profile to ")
                    .str(path_str(&path))
                    .str(" (")
                    .str(path_str(&reason))
                    .str(")\n");
            }
            Err(e) => {
                self.warned = true;
                m.str("profalloc: warning: cannot write HEAPPROFILE dump ")
                    .str(path_str(&path))
                    .str(": ")
                    .str(e)
                    .str("; the program continues without heap profile dumps\n");
            }
        }
        m.write_stderr();
    }

    /// The pprof bytes of the buckets: everything, or (`leaks`) only the
    /// objects the heap checker found unreachable.
    pub(crate) fn encode(&mut self, rate: u64, why: &str, leaks: bool) -> Option<&[u8]> {
        let types = [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes"),
        ];
        if !self
            .enc
            .begin(&types, "inuse_space", ("space", "bytes", rate as i64))
        {
            return None;
        }
        let mut c = Message::new();
        c.str("profalloc heap profile: sampling every ")
            .dec(rate)
            .str(" bytes on average");
        self.enc.comment(path_str(&c));
        let mut c = Message::new();
        c.str("dumped: ").str(why);
        self.enc.comment(path_str(&c));
        if self.dropped > 0 || LOST_FREES.load(Ordering::Relaxed) > 0 {
            let mut c = Message::new();
            c.str("lost events: ")
                .dec(self.dropped)
                .str(" allocations not recorded (tables full), ")
                .dec(LOST_FREES.load(Ordering::Relaxed))
                .str(" frees not recorded");
            self.enc.comment(path_str(&c));
        }
        super::python::comments(|c| self.enc.comment(c));
        let process = super::pprof::ProcessLabels::read();
        let n = self.buckets.len();
        let mut truncated = 0u64;
        for b in 0..n {
            let bk = self.buckets.as_slice()[b];
            let values = if leaks {
                let (objs, bytes) = (bk.leak_objects as i64, bk.leak_bytes as i64);
                if objs == 0 {
                    continue;
                }
                [objs, bytes, objs, bytes]
            } else {
                if bk.alloc_bytes == 0 {
                    continue;
                }
                [
                    bk.alloc_objects.round() as i64,
                    bk.alloc_bytes as i64,
                    (bk.alloc_objects - bk.free_objects).round() as i64,
                    (bk.alloc_bytes - bk.free_bytes) as i64,
                ]
            };
            truncated += u64::from(bk.truncated);
            self.enc.sample(
                &bk.frames[..bk.depth as usize],
                bk.truncated,
                false,
                &values,
                &[("pid", process.pid)],
                &[("comm", process.comm())],
            );
        }
        if truncated > 0 {
            let mut c = Message::new();
            c.str("truncated stacks: ").dec(truncated);
            self.enc.comment(path_str(&c));
        }
        self.enc.finish()
    }
}

/// A message buffer's text.
pub(crate) fn path_str(m: &Message) -> &str {
    core::str::from_utf8(m.as_bytes()).unwrap_or("")
}

/// The final dump at exit.
pub(crate) fn at_exit() {
    if !ON.load(Ordering::Acquire) || env::settings().heap_prefix.is_empty() {
        return;
    }
    LOCK.lock();
    // SAFETY: under LOCK.
    unsafe { heap().dump(u64::MAX, "at exit") };
    LOCK.unlock();
}
