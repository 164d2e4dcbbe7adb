//! The line `heap` prints once attached: what it tracks, in which
//! processes.
use super::Session;
use crate::{heap::settings::Targets, process};

impl Session {
    /// The line printed once attached.
    pub(super) fn banner(&self) -> String {
        let targets = match self.settings.targets {
            Targets::All => "all processes".to_owned(),
            _ => self
                .pids
                .iter()
                .map(|&p| format!("{} ({p})", process::comm(p)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let allocator = self
            .allocators
            .first()
            .map(|(a, _)| a.path.clone())
            .unwrap_or_default();
        format!(
            "prof-bpf: heap: attached to {allocator} of {targets}, tracking {}{}{}{}; Ctrl-C to stop",
            self.tracking.describe(),
            if self.settings.mmap {
                " and every anonymous mapping"
            } else {
                ""
            },
            if self.settings.pymalloc {
                ", and pymalloc's PyObject_Malloc family"
            } else {
                ""
            },
            if self.settings.leaks {
                ", leak mode"
            } else {
                ""
            }
        )
    }
}
