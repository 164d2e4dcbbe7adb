//! One step of the user-stack walk: find the caller of a frame with the CFI
//! rows user space compiled for the frame's object
//! (`profiler_common::unwind` describes the rows and maps), or by the frame
//! pointer where no rows cover the pc.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    btf_maps::{Array, ArrayOfMaps},
    helpers::bpf_probe_read_user,
    macros::{btf_map, map},
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use profiler_common::{
    stack::UnwindCounter,
    unwind::{
        self as rows, CFA_NONE, CFA_SIGNAL, Frame, LeafRegs, MAPPINGS_MAX, MAX_SHARDS, MappingInfo,
        MappingKey, PAGE_MASK, PAGE_SHIFT, PAGES_MAX, PageKey, PageRows, REFRESH_MAX, SEARCH_STEPS,
        SHARD_MASK, SHARD_ROWS, SHARD_SHIFT, Step, UnwindRow,
    },
};

use crate::{
    stack::count,
    vma::{self, Vma},
};

/// One shard of rows (user space creates them; every shard has this size
/// and these flags, so the verifier inlines lookups in them).
type Shard = Array<UnwindRow, { SHARD_ROWS as usize }, { BPF_F_MMAPABLE as usize }>;

/// `UNWIND_ROW_SHARDS`: the rows of every loaded object, in shards.
#[btf_map(name = "UNWIND_ROW_SHARDS")]
static SHARDS: ArrayOfMaps<Shard, { MAX_SHARDS as usize }> = ArrayOfMaps::new();

/// `UNWIND_PAGES`: (object, 64 KiB page) -> its rows.
#[map(name = "UNWIND_PAGES")]
static PAGES: HashMap<PageKey, PageRows> = HashMap::with_max_entries(PAGES_MAX, 0);

/// `UNWIND_MAPPINGS`: (pid, address) -> object and load bias.
#[map(name = "UNWIND_MAPPINGS")]
static MAPPINGS: LpmTrie<MappingKey, MappingInfo> = LpmTrie::with_max_entries(MAPPINGS_MAX, 0);

/// `UNWIND_REFRESH`: pid -> a pc found outside its known mappings.
#[map(name = "UNWIND_REFRESH")]
static REFRESH: HashMap<u32, u64> = HashMap::with_max_entries(REFRESH_MAX, 0);

/// Outcome of one step of the walk.
pub(crate) enum StepResult {
    /// The caller's frame; `bp_chained`: its rbp came from a frame-pointer
    /// chain.
    Caller {
        frame: Frame,
        exact: bool,
        bp_chained: bool,
    },
    /// The outermost frame was reached: the stack is complete.
    End,
    /// The frame cannot be unwound (counted by reason): the stack is truncated.
    Stop,
}

/// Lowest address that can hold user code (the zero page is never mapped).
const MIN_USER_ADDR: u64 = 4096;
/// Lowest kernel address on x86-64.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// Reads 8 bytes of user memory.
#[inline(always)]
pub(crate) fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address and fails cleanly.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Finds the caller of `frame` in process `pid`. `leaf`: the frame's
/// volatile registers, when it is the sampled frame. `exact`: `frame.pc` is the
/// pc itself, not a return address (whose call instruction ends before it).
/// `bp_chained`: `frame.bp` was read from a frame-pointer chain (the
/// previous step followed frame pointers), so a zero there really ends the
/// chain; a zero rbp found in a register proves nothing in code that uses
/// rbp as a general register.
#[inline(always)]
pub(crate) fn step(
    pid: u32,
    frame: &Frame,
    leaf: Option<&LeafRegs>,
    exact: bool,
    bp_chained: bool,
) -> StepResult {
    let lookup_pc = if exact {
        frame.pc
    } else {
        frame.pc.wrapping_sub(1)
    };
    let mut switch = false;
    let (step, via_fp) = match find_row(pid, lookup_pc) {
        Some(row) if row.kind() != CFA_NONE => {
            count(UnwindCounter::FramesCfi);
            if row.kind() == CFA_SIGNAL {
                count(UnwindCounter::SignalFrames);
            }
            // Code that switches stacks keeps the old rsp in rbp or rbx and
            // its CFA rule says so (psm's `rust_psm_on_stack`, which rustc
            // runs the compiler on), or takes it from the sampled frame's
            // registers (`__longjmp`, `setcontext`): the caller's stack may
            // lie anywhere, above or below. These registers were tracked
            // from the leaf, so the CFA is trusted without the direction
            // check.
            switch = row.may_switch_stacks();
            (rows::step(&row, frame, leaf, read_user), false)
        }
        _ => {
            count(UnwindCounter::FramesFp);
            (rows::step_frame_pointer(frame, read_user), true)
        }
    };
    match step {
        Step::Caller { frame: next, exact } => {
            if next.pc == 0 {
                // A zeroed return address marks the outermost frame.
                return end_unless(via_fp && !bp_chained);
            }
            // The stack grows down: a caller's frame lies above (a signal
            // frame may sit anywhere, e.g. on an alternate stack).
            if (!exact && !switch && next.sp <= frame.sp)
                || next.pc < MIN_USER_ADDR
                || next.pc >= KERNEL_START
            {
                count(UnwindCounter::BadFrame);
                return StepResult::Stop;
            }
            StepResult::Caller {
                frame: next,
                exact,
                bp_chained: via_fp,
            }
        }
        Step::End => end_unless(via_fp && !bp_chained),
        Step::Unsupported => {
            count(UnwindCounter::UnsupportedRule);
            StepResult::Stop
        }
        Step::ReadFailed => {
            count(UnwindCounter::ReadFailed);
            StepResult::Stop
        }
    }
}

/// Whether a walk from the exact pc `pc` of process `pid` would use call
/// frame information rather than guess with frame pointers (which skips
/// the caller of a function that set up no frame, such as a syscall
/// wrapper). Unknown code asks user space for tables, as a walk does.
#[inline(always)]
pub(crate) fn has_cfi(pid: u32, pc: u64) -> bool {
    find_row(pid, pc).is_some_and(|row| row.kind() != CFA_NONE)
}

/// Whether the pc of `frame` lies in a mapping the tables of process `pid`
/// know (with or without rows); unknown code is new (a new process, a
/// `dlopen`) and gets a stack copy. Asks user space for tables, as a walk
/// does.
#[inline(always)]
pub(crate) fn is_mapped(pid: u32, frame: &Frame, exact: bool) -> bool {
    let pc = if exact {
        frame.pc
    } else {
        frame.pc.wrapping_sub(1)
    };
    if MAPPINGS
        .get(&Key::new(32 + 64, MappingKey::new(pid, pc)))
        .is_some()
    {
        return true;
    }
    count(UnwindCounter::UnknownMapping);
    if REFRESH.get_ptr(pid).is_none() {
        let _ = REFRESH.insert(pid, pc, 0);
    }
    // Rows loaded for another process cover it, or none ever will.
    match vma::resolve(pid, pc) {
        Vma::Object(_) => true,
        Vma::NoFile => {
            count(UnwindCounter::NoFileCode);
            true
        }
        Vma::Busy => {
            count(UnwindCounter::VmaBusy);
            false
        }
        Vma::Unknown => false,
    }
}

/// The walk ends here: complete, unless the end was only suggested by an
/// untrusted frame pointer.
#[inline(always)]
fn end_unless(untrusted: bool) -> StepResult {
    if untrusted {
        count(UnwindCounter::BadFrame);
        StepResult::Stop
    } else {
        StepResult::End
    }
}

/// The row in force at `pc` in process `pid`, if user space loaded rows for
/// the object mapped there.
#[inline(always)]
fn find_row(pid: u32, pc: u64) -> Option<UnwindRow> {
    let key = Key::new(32 + 64, MappingKey::new(pid, pc));
    let mapping = match MAPPINGS.get(&key) {
        Some(mapping) => *mapping,
        None => {
            // New code (dlopen) or a process without tables: ask user space
            // once, and meanwhile use rows loaded for the same file.
            count(UnwindCounter::UnknownMapping);
            if REFRESH.get_ptr(pid).is_none() {
                let _ = REFRESH.insert(pid, pc, 0);
            }
            let Vma::Object(mapping) = vma::resolve(pid, pc) else {
                return None;
            };
            count(UnwindCounter::FramesByFile);
            mapping
        }
    };
    if mapping.object == 0 {
        return None;
    }
    let vaddr = pc.wrapping_sub(mapping.bias);
    let page = PAGES.get_ptr(&PageKey {
        object: mapping.object,
        page: (vaddr >> PAGE_SHIFT) as u32,
    })?;
    // SAFETY: a pointer from a successful map lookup.
    let page = unsafe { *page };
    let rows = SHARDS.get(page.first >> SHARD_SHIFT)?;
    let first = page.first & SHARD_MASK;
    let target = (vaddr & PAGE_MASK) as u16;
    // Find the last row whose pc_low <= target; the first row is at 0.
    let (mut lo, mut hi) = (0u32, page.count);
    for _ in 0..SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let row = rows.get(first.wrapping_add(mid))?;
        if row.pc_low <= target {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    rows.get(first.wrapping_add(lo - 1)).copied()
}
