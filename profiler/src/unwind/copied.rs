//! Unwinding the stacks the kernel copied because their process's tables
//! were not loaded yet (`profiler_common::stack_copy`).
//!
//! The walk continues where the kernel's stopped, in the copy instead of
//! the live stack, with the same rows ([`Tables::row_at`]) and the same
//! `step`, and decides each step as the kernel walker does (rows where they
//! exist, frame pointers elsewhere, the same checks of a caller's frame).
//!
//! Your responsibilities: [`CopiedStacks::unwind_ready`] after tables were
//! placed, [`CopiedStacks::process_exited`] instead of removing an exited
//! process's tables yourself (they stay until its copies are unwound:
//! the builder may still be building them), [`CopiedStacks::take`] for an
//! event whose stack id has `COPY_ID_BIT`; when the session ends,
//! [`CopiedStacks::prepare_end`] (it builds the tables the copies left
//! still need) then `unwind_ready(.., true)`; and show
//! [`CopiedStacks::comment`] in the report.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf, lpm_trie::Key};
use log::debug;
use profiler_common::{
    stack::{MAX_USER_FRAMES, StackStatus},
    stack_copy::{COPY_BYTES, COPY_CONFIG_MAP, CopyCounter, STACK_COPIES_MAP},
    unwind::{CFA_NONE, Frame, LeafRegs, MappingKey, PAGE_MASK, PAGE_SHIFT, PageKey, Step},
};

use super::Tables;
use crate::process::Mapping;
use crate::runtime::counters::Counts;

/// Lowest address that can hold user code (as the kernel walker).
const MIN_USER_ADDR: u64 = 4096;
/// Lowest kernel address on x86-64.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// What the tables say about a pc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// In no mapping the tables know.
    Unmapped,
    /// In a known mapping without rows for this pc (frame pointers there).
    NoRows,
    /// The row in force at the pc.
    Row(profiler_common::unwind::UnwindRow),
}

impl Tables {
    /// The row in force at `pc` in process `pid`, looked up as the kernel
    /// walker does: the process's mapping, the object's page, the row.
    pub fn row_at(&self, pid: u32, pc: u64) -> Lookup {
        let Ok(mapping) = self
            .mappings
            .get(&Key::new(32 + 64, MappingKey::new(pid, pc)), 0)
        else {
            return Lookup::Unmapped;
        };
        if mapping.object == 0 {
            return Lookup::NoRows;
        }
        let vaddr = pc.wrapping_sub(mapping.bias);
        let Ok(page) = self.pages.get(
            &PageKey {
                object: mapping.object,
                page: (vaddr >> PAGE_SHIFT) as u32,
            },
            0,
        ) else {
            return Lookup::NoRows;
        };
        let Some(rows) = self.rows.rows(page.first, page.count) else {
            return Lookup::NoRows;
        };
        let i = profiler_common::unwind::find_row(rows, (vaddr & PAGE_MASK) as u16);
        Lookup::Row(rows[i])
    }
}

/// One copy, as received.
#[derive(Clone, Debug)]
pub struct Copy {
    pub pid: u32,
    /// Where the kernel walk stopped.
    pub frame: Frame,
    /// The frame's volatile registers when it is the sampled frame.
    pub leaf: LeafRegs,
    pub exact: bool,
    pub bp_chained: bool,
    /// Index of `frame.pc` in the stack the kernel stored.
    pub prefix: u32,
    /// The stack from `frame.sp` up.
    pub bytes: Vec<u8>,
}

/// How the walk of a copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The outermost frame: complete.
    Complete,
    /// The walk needed stack above the copy (the copy was too short).
    LeftCopy,
    /// Another reason (a bad frame, an unsupported rule, the depth limit).
    Stopped,
}

/// The callers found in a copy, after the frame where the kernel stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Walked {
    pub frames: Vec<u64>,
    pub ending: Ending,
    /// Bytes of the copy the walk read (from its start to the highest word).
    pub used: usize,
}

/// Walks `copy` with `lookup`; at most `max_frames` callers.
pub fn walk(copy: &Copy, max_frames: usize, mut lookup: impl FnMut(u64) -> Lookup) -> Walked {
    let base = copy.frame.sp;
    // A full copy ends at its last page, not at the stack's end.
    let full = (copy.frame.sp as usize % 4096) + copy.bytes.len() >= COPY_BYTES;
    let mut used = 0usize;
    let mut left = false;
    let mut read = |addr: u64| -> Option<u64> {
        let off = addr.checked_sub(base)? as usize;
        match copy.bytes.get(off..off + 8) {
            Some(word) => {
                used = used.max(off + 8);
                Some(u64::from_le_bytes(word.try_into().expect("8 bytes")))
            }
            None => {
                // Above the copy: a full copy was too short; a shorter one
                // reached the end of the stack, as a live read would.
                left |= full && off < (1 << 30);
                None
            }
        }
    };
    let mut frames = Vec::new();
    let (mut frame, mut exact, mut bp_chained) = (copy.frame, copy.exact, copy.bp_chained);
    let ending = loop {
        if frames.len() >= max_frames {
            break Ending::Stopped;
        }
        let pc = if exact {
            frame.pc
        } else {
            frame.pc.wrapping_sub(1)
        };
        // The sampled frame's volatile registers serve its own step only.
        let leaf = if frames.is_empty() {
            copy.leaf.if_known()
        } else {
            None
        };
        // As in the kernel walker: a row that takes the caller's rsp from
        // tracked registers may switch stacks.
        let mut switch = false;
        let (step, via_fp) = match lookup(pc) {
            Lookup::Row(row) if row.kind() != CFA_NONE => {
                switch = row.may_switch_stacks();
                (
                    profiler_common::unwind::step(&row, &frame, leaf, &mut read),
                    false,
                )
            }
            _ => (
                profiler_common::unwind::step_frame_pointer(&frame, &mut read),
                true,
            ),
        };
        let untrusted_end = via_fp && !bp_chained;
        match step {
            Step::Caller {
                frame: next,
                exact: next_exact,
            } => {
                if next.pc == 0 {
                    break if untrusted_end {
                        Ending::Stopped
                    } else {
                        Ending::Complete
                    };
                }
                if (!next_exact && !switch && next.sp <= frame.sp)
                    || next.pc < MIN_USER_ADDR
                    || next.pc >= KERNEL_START
                {
                    break Ending::Stopped;
                }
                frames.push(next.pc);
                frame = next;
                exact = next_exact;
                bp_chained = via_fp;
            }
            Step::End if !untrusted_end => break Ending::Complete,
            Step::End | Step::Unsupported => break Ending::Stopped,
            Step::ReadFailed => break Ending::Stopped,
        }
    };
    let ending = if ending == Ending::Stopped && left {
        Ending::LeftCopy
    } else {
        ending
    };
    Walked {
        frames,
        ending,
        used,
    }
}

/// What became of the copies, for the report.
#[derive(Clone, Debug, Default)]
pub struct CopyStats {
    /// Copies unwound, and how those walks ended.
    pub unwound: u64,
    pub complete: u64,
    pub too_short: u64,
    pub stopped: u64,
    /// Copies whose process was gone before its tables could be built:
    /// walked by frame pointers only.
    pub unresolved: u64,
    /// Copies walked by frame pointers on arrival: the waiting ones held
    /// [`PENDING_MAX_BYTES`] already.
    pub over_cap: u64,
    /// Bytes the walks used, per copy (for the distribution).
    pub used: Vec<u32>,
    /// Copies left when the session ended, and the time their tables and
    /// walks took then.
    pub at_end: u64,
    pub end_time: Duration,
}

/// The copies of one session.
pub struct CopiedStacks {
    /// Reads the ring buffer on a thread of its own: table building can
    /// hold the session's loop for seconds, and copies arrive by the
    /// thousand per second on a busy host.
    reader: Option<std::thread::JoinHandle<()>>,
    stop_reader: Arc<AtomicBool>,
    received: mpsc::Receiver<Received>,
    /// Mappings the reader read for processes with copies, to request
    /// their tables (even once they exited) at the next [`Self::settle`].
    mapped: Vec<(u32, Vec<Mapping>)>,
    /// The switch that turns copying on.
    config: Array<MapData, u32>,
    pending: HashMap<u64, Copy>,
    /// Pending copies already walked in vain, with their process's table
    /// generation then.
    tried: HashMap<u64, u64>,
    /// Bytes of stack the pending copies hold.
    pending_bytes: usize,
    /// Unwound copies not taken yet: index of their first frame in the
    /// kernel's stack, the callers found, and the status.
    done: HashMap<u64, (u32, Vec<u64>, StackStatus)>,
    /// Copies taken already: several samples may share one (a thread's
    /// stack copied at its exit serves all its samples after that).
    taken: HashSet<u64>,
    /// Processes that exited with copies waiting: their tables stay until
    /// those are unwound.
    exited: HashSet<u32>,
    pub stats: CopyStats,
}

impl CopiedStacks {
    /// Takes the copy maps out of `ebpf` and turns copying on.
    pub fn new(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let take = |ebpf: &mut aya::Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let ring: RingBuf<MapData> = take(ebpf, STACK_COPIES_MAP)?.try_into()?;
        let (sender, received) = mpsc::channel();
        let stop_reader = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stop_reader);
        let reader = std::thread::Builder::new()
            .name("stack-copies".to_owned())
            .spawn(move || read_ring(ring, &sender, &stop))
            .context("starting the stack copy reader")?;
        let mut config: Array<MapData, u32> = take(ebpf, COPY_CONFIG_MAP)?.try_into()?;
        config
            .set(0, 1, 0)
            .context("turning the stack-copy fallback on")?;
        Ok(Self {
            reader: Some(reader),
            stop_reader,
            received,
            mapped: Vec::new(),
            config,
            pending: HashMap::new(),
            tried: HashMap::new(),
            pending_bytes: 0,
            done: HashMap::new(),
            taken: HashSet::new(),
            exited: HashSet::new(),
            stats: CopyStats::default(),
        })
    }

    /// Takes the copies received so far.
    pub fn read(&mut self) {
        while let Ok((id, copy, maps)) = self.received.try_recv() {
            if let Some(maps) = maps {
                self.mapped.push((copy.pid, maps));
            }
            if self.pending_bytes + copy.bytes.len() > PENDING_MAX_BYTES {
                // Its event keeps the kernel's frame-pointer stack.
                self.stats.over_cap += 1;
                continue;
            }
            self.pending_bytes += copy.bytes.len();
            self.pending.insert(id, copy);
        }
    }

    /// Whether copy `id` arrived and waits for tables.
    pub fn is_pending(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Whether process `pid` has copies waiting for tables.
    pub fn has_pending(&self, pid: u32) -> bool {
        self.pending.values().any(|c| c.pid == pid)
    }

    /// Process `pid` exited: its tables go now, or once its waiting copies
    /// are unwound (their objects may still be being built).
    pub fn process_exited(&mut self, pid: u32, tables: &mut Tables) {
        self.unwind_ready(tables, false);
        if self.has_pending(pid) {
            self.exited.insert(pid);
        } else {
            tables.remove_process(pid);
        }
    }

    /// Requests the tables of the processes whose copies arrived with
    /// their mappings (cheap: no walk, no build).
    pub fn request_tables(&mut self, tables: &mut Tables) {
        self.read();
        for (pid, maps) in std::mem::take(&mut self.mapped) {
            if let Err(err) = tables.request_mapped(pid, &maps) {
                debug!("unwind tables for the copies of pid {pid}: {err:#}");
            }
        }
    }

    /// Requests tables ([`Self::request_tables`]), unwinds the copies that
    /// are ready ([`Self::unwind_ready`]), then
    /// drops the tables of exited processes that have none left.
    pub fn settle(&mut self, tables: &mut Tables) {
        self.request_tables(tables);
        self.unwind_ready(tables, false);
        let done: Vec<u32> = self
            .exited
            .iter()
            .copied()
            .filter(|&pid| !self.has_pending(pid))
            .collect();
        for pid in done {
            self.exited.remove(&pid);
            tables.remove_process(pid);
        }
    }

    /// Unwinds every copy whose walk now finds the tables it needs: it
    /// meets no code of its process whose object is still being built
    /// (with `force`: every copy; one whose process has no tables even now
    /// is counted unresolved). A copy is walked again only once its
    /// process got more tables.
    pub fn unwind_ready(&mut self, tables: &Tables, force: bool) {
        self.read();
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(id, c)| force || self.tried.get(id) != Some(&tables.generation(c.pid)))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let copy = &self.pending[&id];
            if !tables.has_process(copy.pid) {
                if force {
                    let copy = self.pending.remove(&id).expect("listed above");
                    self.pending_bytes -= copy.bytes.len();
                    self.tried.remove(&id);
                    self.without_tables();
                }
                continue;
            }
            let pid = copy.pid;
            let mut blocked = false;
            let walked = walk(copy, MAX_USER_FRAMES, |pc| {
                let found = tables.row_at(pid, pc);
                blocked |= found == Lookup::Unmapped && tables.is_pending_at(pid, pc);
                found
            });
            if blocked && !force {
                self.tried.insert(id, tables.generation(pid));
                continue;
            }
            let copy = self.pending.remove(&id).expect("listed above");
            self.pending_bytes -= copy.bytes.len();
            self.tried.remove(&id);
            self.record(id, copy.prefix, walked);
        }
    }

    /// A copy whose process is gone without tables: its event keeps the
    /// kernel's frame-pointer stack.
    fn without_tables(&mut self) {
        self.stats.unresolved += 1;
    }

    /// Counts a walk and keeps its result for [`Self::take`].
    fn record(&mut self, id: u64, prefix: u32, walked: Walked) {
        self.stats.unwound += 1;
        self.stats.used.push(walked.used as u32);
        let status = match walked.ending {
            Ending::Complete => {
                self.stats.complete += 1;
                StackStatus::Complete
            }
            Ending::LeftCopy => {
                self.stats.too_short += 1;
                StackStatus::Truncated
            }
            Ending::Stopped => {
                self.stats.stopped += 1;
                StackStatus::Truncated
            }
        };
        self.done.insert(id, (prefix, walked.frames, status));
    }

    /// The stack of event `id` once its copy was unwound with tables: the
    /// frames the kernel walked up to the copy's frame (from `kernel`, the
    /// stack it stored), then the callers found in the copy. `None`: keep
    /// `kernel` (not unwound yet, or never with tables).
    pub fn take(&mut self, id: u64, kernel: &[u64]) -> Option<(Vec<u64>, StackStatus)> {
        let (prefix, callers, mut status) = self.done.remove(&id)?;
        self.taken.insert(id);
        let keep = (prefix as usize + 1).min(kernel.len());
        let mut frames = kernel[..keep].to_vec();
        frames.extend(callers);
        if frames.len() > MAX_USER_FRAMES {
            frames.truncate(MAX_USER_FRAMES);
            status = StackStatus::Truncated;
        }
        Some((frames, status))
    }

    /// Whether copy `id` was taken by [`Self::take`]: the stack stored
    /// under its id then is the unwound one.
    pub fn was_taken(&self, id: u64) -> bool {
        self.taken.contains(&id)
    }

    /// At the end of a session (the programs detached): reads the last
    /// copies and builds the tables that the waiting ones need (whatever
    /// the table budget, processes with the most copies first), so that
    /// [`Self::unwind_ready`] with `force` finds them. Returns when it
    /// started, for [`Self::finish_end`].
    pub fn prepare_end(&mut self, tables: &mut Tables) -> Instant {
        let started = Instant::now();
        // Probes may still run (heap reports before detaching): no copy
        // that nobody would read.
        let _ = self.config.set(0, 0, 0);
        self.stop_reader.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.read();
        self.stats.at_end = self.pending.len() as u64;
        // Most copies first: within the time limit, the most stacks.
        let mut per_pid: HashMap<u32, usize> = HashMap::new();
        for copy in self.pending.values() {
            *per_pid.entry(copy.pid).or_default() += 1;
        }
        let mut pids: Vec<(usize, u32)> = per_pid.into_iter().map(|(p, n)| (n, p)).collect();
        pids.sort_unstable_by(|a, b| b.cmp(a));
        let pids: Vec<u32> = pids.into_iter().map(|(_, pid)| pid).collect();
        // Those left without tables at the limit are counted unresolved.
        tables.complete(&pids, started + END_LIMIT);
        debug!("tables for the stack copies of {} processes", pids.len());
        started
    }

    /// Notes how long the end of the session took for the copies.
    pub fn finish_end(&mut self, started: Instant) {
        self.stats.end_time = started.elapsed();
    }

    /// One report line about the copies, with the kernel's counters.
    pub fn comment(&self, kernel: &Counts<CopyCounter>) -> String {
        let s = &self.stats;
        let copies = kernel.get(CopyCounter::Copies);
        let bytes = kernel.get(CopyCounter::Bytes);
        let lost = kernel.get(CopyCounter::Lost);
        let limited = kernel.get(CopyCounter::RateLimited);
        let mut used = s.used.clone();
        used.sort_unstable();
        let pct = |p: usize| used.get((used.len() * p / 100).min(used.len().saturating_sub(1)));
        format!(
            "stack copies: copies {copies}, bytes_copied {bytes}, copies_lost {lost}, \
             copies_rate_limited {limited}, \
             unwound {}, complete {}, too_short {}, stopped {}, unresolved {}, over_memory_cap {}, \
             copy_bytes_used_p50 {}, copy_bytes_used_p99 {}, copy_bytes_used_max {}, \
             left_at_end {}, end_unwind_ms {}",
            s.unwound,
            s.complete,
            s.too_short,
            s.stopped,
            s.unresolved,
            s.over_cap,
            pct(50).copied().unwrap_or(0),
            pct(99).copied().unwrap_or(0),
            used.last().copied().unwrap_or(0),
            s.at_end,
            s.end_time.as_millis(),
        )
    }
}

/// Time the end of a session may spend building tables for the copies
/// still waiting (a host full of short-lived processes of huge binaries
/// could otherwise hold the report for minutes); the copies left are
/// counted unresolved.
const END_LIMIT: Duration = Duration::from_secs(10);

/// Memory the copies waiting for tables may hold: a busy host whose
/// processes come and go faster than their tables (heap --all tracking
/// every allocation) could otherwise fill memory.
const PENDING_MAX_BYTES: usize = 256 << 20;

#[path = "copy_reader.rs"]
mod reader;
#[cfg(test)]
use reader::parse;
use reader::{Received, read_ring};

#[cfg(test)]
#[path = "copied_tests.rs"]
mod tests;
