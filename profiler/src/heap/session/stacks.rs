//! Stacks the stack map alone does not give: those the kernel copied where
//! a process's unwind tables were missing (unwound once the tables exist,
//! put in place of the frame-pointer walk the kernel made, finished at the
//! end of the session), and the native halves of combined native and
//! Python stack ids.
use std::collections::HashMap;

use profiler_common::{
    heap::StackKey,
    stack::{StackStatus, UserStack},
    stack_copy::{COPY_ID_BIT, COPY_STATS_MAP, CopyCounter},
};

use super::{super::maps, Session};
use crate::runtime::counters::Counts;

impl Session {
    /// Drops the tables of `pid`, which exited, once its stack copies are
    /// unwound (their objects may still be being built).
    pub(super) fn forget_tables(&mut self, pid: u32) {
        self.copies.process_exited(pid, &mut self.tables);
    }

    /// Puts the stacks unwound from copies in place of the frames the
    /// kernel walked before it copied, for native stack ids and for the
    /// native halves of combined ids (`native_of`), whose Python frames are
    /// then merged into the unwound stack like any other.
    pub(super) fn resolve_copies(
        &mut self,
        stacks: &mut HashMap<u64, UserStack>,
        native_of: &HashMap<u64, u64>,
    ) {
        let copies = &mut self.copies;
        resolve_copied(stacks, native_of, &mut self.copied, |id, kernel| {
            copies.take(id, kernel)
        });
    }

    /// At the end: the copies still waiting get their tables now, whatever
    /// the budget, and are unwound. Returns the copies' report line (also
    /// printed).
    pub(super) fn finish_copies(&mut self) -> anyhow::Result<String> {
        let started = self.copies.prepare_end(&mut self.tables);
        self.copies.unwind_ready(&self.tables, true);
        self.copies.finish_end(started);
        let line = self
            .copies
            .comment(&Counts::<CopyCounter>::read(&self.ebpf, COPY_STATS_MAP)?);
        eprintln!("prof-bpf: {line}");
        Ok(line)
    }

    /// The native stacks of combined (native and Python) ids, under the
    /// combined id; returns combined id -> native id.
    pub(super) fn add_paired_stacks<'a>(
        &self,
        stacks: &mut HashMap<u64, profiler_common::stack::UserStack>,
        keys: impl IntoIterator<Item = &'a StackKey>,
    ) -> anyhow::Result<HashMap<u64, u64>> {
        let pairs = self.python.pairs();
        let paired: Vec<(u64, StackKey)> = keys
            .into_iter()
            .filter_map(|k| {
                let (pair, _) = pairs.get(&k.stack_id)?;
                Some((
                    k.stack_id,
                    StackKey {
                        stack_id: pair.native,
                        ..*k
                    },
                ))
            })
            .collect();
        let natives = maps::user_stacks(&self.ebpf, paired.iter().map(|(_, k)| k))?;
        let mut native_of = HashMap::with_capacity(paired.len());
        for (combined, native) in paired {
            native_of.insert(combined, native.stack_id);
            if let Some(stack) = natives.get(&native.stack_id) {
                stacks.insert(combined, *stack);
            }
        }
        Ok(native_of)
    }
}

/// The stacks in `stacks` whose native stack was copied by the kernel
/// (the id itself, or the native half of a combined id in `native_of`)
/// replaced by the stack `take(copy id, frames the kernel walked)` unwound
/// from the copy. Each copy is unwound once: `done` keeps the results by
/// copy id, as several combined ids share one native stack.
fn resolve_copied(
    stacks: &mut HashMap<u64, UserStack>,
    native_of: &HashMap<u64, u64>,
    done: &mut HashMap<u64, UserStack>,
    mut take: impl FnMut(u64, &[u64]) -> Option<(Vec<u64>, StackStatus)>,
) {
    for (&id, stack) in stacks.iter_mut() {
        let copy_id = native_of.get(&id).copied().unwrap_or(id);
        if copy_id & COPY_ID_BIT == 0 {
            continue;
        }
        if let Some(unwound) = done.get(&copy_id) {
            *stack = *unwound;
        } else if let Some((frames, status)) = take(copy_id, stack.frames()) {
            let mut full = UserStack::EMPTY;
            let len = frames.len().min(full.ips.len());
            full.ips[..len].copy_from_slice(&frames[..len]);
            full.len = len as u32;
            full.status = status as u32;
            done.insert(copy_id, full);
            *stack = full;
        }
    }
}

#[cfg(test)]
mod tests;
