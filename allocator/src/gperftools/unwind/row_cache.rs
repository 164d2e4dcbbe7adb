//! A cache of the unwind rows found for return addresses: sampled
//! allocations come from a few call sites, and reading their CFI again
//! (search table, FDE, CFA program) costs most of a stack walk.
//!
//! Direct-mapped, lock-free and safe in signal handlers: an entry is two
//! words, `pc ^ row` and `row`, each stored atomically; a reader takes the
//! row only when the words agree with its pc, so an entry torn by a
//! concurrent writer is a miss, never a wrong row. Rows that depend on
//! the registers (a CFA given by a DWARF expression) are not cached.
//! Objects are never unloaded from the unwinder's view (its object table
//! only grows), so an entry never goes stale.
use core::sync::atomic::{AtomicU64, Ordering};

use profiler_common::unwind::UnwindRow;

const ENTRIES: usize = 4096;

struct Entry {
    check: AtomicU64,
    row: AtomicU64,
}

static CACHE: [Entry; ENTRIES] = [const {
    Entry {
        check: AtomicU64::new(0),
        row: AtomicU64::new(0),
    }
}; ENTRIES];

fn slot(pc: usize) -> &'static Entry {
    let h = (pc as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52;
    &CACHE[h as usize % ENTRIES]
}

fn bits(row: &UnwindRow) -> u64 {
    // SAFETY: UnwindRow is 8 bytes of integers, no padding.
    unsafe { core::mem::transmute::<UnwindRow, u64>(*row) }
}

/// The row cached for `pc`.
pub(super) fn get(pc: usize) -> Option<UnwindRow> {
    let e = slot(pc);
    let row = e.row.load(Ordering::Relaxed);
    let check = e.check.load(Ordering::Relaxed);
    // An all-zero entry is empty (pc 0 is never looked up).
    (check ^ row == pc as u64 && check != 0).then(|| {
        // SAFETY: every bit pattern is a valid UnwindRow (integers only).
        unsafe { core::mem::transmute::<u64, UnwindRow>(row) }
    })
}

/// Remembers `row` for `pc`.
pub(super) fn put(pc: usize, row: &UnwindRow) {
    let e = slot(pc);
    let b = bits(row);
    e.row.store(b, Ordering::Relaxed);
    e.check.store(pc as u64 ^ b, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_for_their_pc_only() {
        let row = UnwindRow::new(0, profiler_common::unwind::CFA_RSP, 24, 0, 0).unwrap();
        let pc = 0x7f00_1234_5678;
        assert_eq!(get(pc), None);
        put(pc, &row);
        assert_eq!(get(pc), Some(row));
        // Another pc in the same entry misses.
        let other = (1..)
            .map(|k| pc + k)
            .find(|&p| core::ptr::eq(slot(p), slot(pc)))
            .unwrap();
        assert_eq!(get(other), None);
        // A torn entry (the row of one write, the check of another) misses.
        let row2 = UnwindRow::new(0, profiler_common::unwind::CFA_RSP, 40, 0, 0).unwrap();
        slot(pc).row.store(bits(&row2), Ordering::Relaxed);
        assert_eq!(get(pc), None);
    }
}
