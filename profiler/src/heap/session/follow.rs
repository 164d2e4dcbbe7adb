//! Following the targets while recording: a launched program through its
//! loader and exec, code loaded later (dlopen) into the unwind tables, and
//! `otel_memory` probes in objects mapped after the attach.
use std::num::NonZeroU32;

use aya::programs::uprobe::UProbeScope;
use log::{debug, warn};

use super::{
    super::{
        attach::{self, Launch},
        discover,
        settings::Targets,
        usdt_sites::PROVIDER,
    },
    Session,
};

impl Session {
    /// Launch mode: lets the held program run, stopping it in its loader
    /// to load the unwind tables of what it maps.
    pub(super) fn release(&mut self, launch: Launch) -> anyhow::Result<crate::launch::Launched> {
        let pid = launch.child.pid;
        let link = match &launch.loader {
            Some((path, offset)) => Some(attach::loader_stop(&mut self.ebpf, pid, path, *offset)?),
            None => None,
        };
        let mut launched = launch.child.resume()?;
        if let Some(link) = link {
            attach::serve_loader_stops(pid, || self.load_mapped(pid));
            attach::detach_loader_stop(&mut self.ebpf, link, pid);
        }
        launched.attached();
        Ok(launched)
    }

    /// The unwind tables of what `pid` maps now (added, or refreshed).
    pub(super) fn load_mapped(&mut self, pid: u32) {
        self.refresh_process(pid);
        if self.tables.has_process(pid) {
            if let Err(err) = self.tables.refresh_process(pid) {
                debug!("refreshing the unwind tables of pid {pid}: {err:#}");
            }
        } else {
            self.add_unwind_tables(pid);
        }
    }

    /// Launch mode: rereads the program's mappings, and loads the tables
    /// of what its loader mapped.
    pub(super) fn follow_launched(&mut self, ticks: u64) {
        for pid in self.pids.clone() {
            if self.processes.exited.contains(&pid) {
                continue;
            }
            self.refresh_process(pid);
            if !self.tables.has_process(pid) {
                self.add_unwind_tables(pid);
            } else if ticks < 3 {
                // The loader may still be mapping libraries.
                let _ = self.tables.refresh_process(pid);
            }
        }
    }

    /// Processes whose walks met code outside their tables (dlopen) are
    /// refreshed; with --all, new processes get tables (and their mappings
    /// are read, so that their stacks can be placed and named after they
    /// exit). Their objects are built in the background: until they are
    /// placed, stacks are copied (and unwound then). Nothing here waits for
    /// a build.
    pub(super) fn serve_table_requests(&mut self) {
        let all = self.settings.targets == Targets::All;
        for pid in self.tables.poll_queued() {
            if all {
                self.refresh_process(pid);
            } else if !self.pids.contains(&pid) {
                self.tables.remove_process(pid);
            }
        }
        self.copies.settle(&mut self.tables);
    }

    /// After exec the program's real mappings exist: check that the probed
    /// allocator is the one it uses, and probe the one it does use if not.
    pub(super) fn check_launched(&mut self) {
        for pid in self.pids.clone() {
            if self.processes.exited.contains(&pid) {
                continue;
            }
            self.refresh_process(pid);
            let Ok(found) = discover::for_process(pid, self.settings.lib.as_deref()) else {
                continue;
            };
            if self.allocators.iter().any(|(a, _)| a.inode == found.inode) {
                continue;
            }
            warn!(
                "pid {pid} uses {} rather than the allocator found before exec; probing it too",
                found.path
            );
            let Some(nz) = NonZeroU32::new(pid) else {
                continue;
            };
            let scope = UProbeScope::OneProcess(nz);
            match attach::allocator(&mut self.ebpf, self.tracking, &found, scope, &mut self.usdt) {
                Ok(()) => self.allocators.push((found, scope)),
                Err(err) => warn!("{err:#}"),
            }
        }
    }

    /// Probes the `otel_memory` sites of objects the targets mapped since
    /// the attach (dlopen), with their unwind tables loaded first.
    pub(super) fn follow_usdt_objects(&mut self) {
        for pid in self.pids.clone() {
            if self.processes.exited.contains(&pid) {
                continue;
            }
            if let Err(err) = self.tables.refresh_process(pid) {
                debug!("refreshing the unwind tables of pid {pid}: {err:#}");
            }
            for path in self.usdt.follow(&mut self.ebpf, pid) {
                self.refresh_process(pid);
                eprintln!(
                    "prof-bpf: heap: probing the {} USDT probes of {path} (pid {pid}), mapped after the attach",
                    PROVIDER
                );
            }
        }
    }
}
