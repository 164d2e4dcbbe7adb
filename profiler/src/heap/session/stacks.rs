//! Stacks the stack map alone does not give: those the kernel copied where
//! a process's unwind tables were missing (unwound once the tables exist,
//! put in place of the frame-pointer walk the kernel made, finished at the
//! end of the session), and the native halves of combined native and
//! Python stack ids.
use std::collections::HashMap;

use profiler_common::{
    heap::StackKey,
    stack::UserStack,
    stack_copy::{COPY_ID_BIT, COPY_STATS_MAP, CopyCounter},
};

use super::{super::maps, Session};
use crate::runtime::counters::Counts;

impl Session {
    /// Drops the tables of `pid`, which exited, once its stack copies that
    /// they cover are unwound.
    pub(super) fn forget_tables(&mut self, pid: u32) {
        self.copies.unwind_ready(&self.tables, false);
        self.copies.drop_process(pid);
        self.tables.remove_process(pid);
    }

    /// Puts the stacks unwound from copies in place of the frames the
    /// kernel walked before it copied.
    pub(super) fn resolve_copies(&mut self, stacks: &mut HashMap<u64, UserStack>) {
        for (&id, stack) in stacks.iter_mut() {
            if id & COPY_ID_BIT == 0 {
                continue;
            }
            if let Some(done) = self.copied.get(&id) {
                *stack = *done;
            } else if let Some((frames, status)) = self.copies.take(id, stack.frames()) {
                let mut full = UserStack::EMPTY;
                full.ips[..frames.len()].copy_from_slice(&frames);
                full.len = frames.len() as u32;
                full.status = status as u32;
                self.copied.insert(id, full);
                *stack = full;
            }
        }
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
    /// combined id.
    pub(super) fn add_paired_stacks<'a>(
        &self,
        stacks: &mut HashMap<u64, profiler_common::stack::UserStack>,
        keys: impl IntoIterator<Item = &'a StackKey>,
    ) -> anyhow::Result<()> {
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
        for (combined, native) in paired {
            if let Some(stack) = natives.get(&native.stack_id) {
                stacks.insert(combined, *stack);
            }
        }
        Ok(())
    }
}
