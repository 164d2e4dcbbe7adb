//! What the session knows of the sampled tasks besides their samples:
//! names (kept after a task exits, from its exit event), which processes
//! have exited, and which are kernel threads.
//!
//! /proc is reached through [`ProcFs`], so that naming and kernel-thread
//! rules are tested without root and without real processes.
use std::collections::{HashMap, HashSet};

use profiler_common::cpu::{TASK_EXEC, TASK_EXEC_CALL, TASK_EXIT, TaskEvent, generation_is_older};

/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;
/// The name of the idle tasks (tid 0), as `ps` shows them.
const IDLE_NAME: &str = "swapper";
/// The name of a task that is gone and was never seen under a name.
const UNKNOWN_NAME: &str = "?";

/// What the session reads of a task in /proc.
pub(crate) trait ProcFs {
    /// The comm of thread `tid` of process `pid`, if it still exists.
    fn comm(&self, pid: u32, tid: u32) -> Option<String>;
    /// The text of `/proc/PID/stat`, if the process still exists.
    fn stat(&self, pid: u32) -> Option<String>;
}

/// The real /proc.
pub(crate) struct LiveProc;

impl ProcFs for LiveProc {
    fn comm(&self, pid: u32, tid: u32) -> Option<String> {
        let path = if tid == pid {
            format!("/proc/{pid}/comm")
        } else {
            format!("/proc/{pid}/task/{tid}/comm")
        };
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim_end().to_owned())
    }

    fn stat(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
    }
}

/// What a task event changes for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Process `pid` runs a new program: its mappings and unwind tables are new.
    Exec(u32),
    /// Process `pid` (its main thread) has exited.
    ProcessExit(u32),
    /// Nothing beyond a name.
    None,
}

/// Names and life of the sampled tasks.
#[derive(Default)]
pub(crate) struct Tasks {
    /// Last known comm of each task (tid), from exec/exit events or /proc.
    names: HashMap<u32, String>,
    /// Processes whose main thread has exited (their /proc entry is going).
    exited: HashSet<u32>,
    /// Whether each process is a kernel thread (no user memory).
    kthreads: HashMap<u32, bool>,
    /// The program generation each process runs, from its last exec event
    /// (`profiler_common::cpu::KEY_GENERATION_SHIFT`).
    generations: HashMap<u32, u32>,
    /// The names of the programs a process ran before its last execs:
    /// (generation, name), the newest last, at most [`PROGRAMS_KEPT`].
    replaced: HashMap<u32, Vec<(u32, String)>>,
}

/// Replaced programs remembered per process: a shell that execs a wrapper
/// that execs the program is two.
const PROGRAMS_KEPT: usize = 4;

impl Tasks {
    /// Takes in one exec or exit event.
    pub fn apply(&mut self, event: &TaskEvent) -> Change {
        let comm = comm_string(&event.comm);
        match event.kind {
            TASK_EXEC => {
                // The caller's name, unless its exec call said it already.
                let old = event.generation.wrapping_sub(1) & 0xffff;
                if let Some(name) = self.names.get(&event.pid).cloned() {
                    self.remember_program(event.pid, old, name, false);
                }
                self.generations.insert(event.pid, event.generation);
                self.names.insert(event.tid, comm.clone());
                self.names.insert(event.pid, comm);
                self.exited.remove(&event.pid);
                self.kthreads.insert(event.pid, false);
                Change::Exec(event.pid)
            }
            TASK_EXIT => {
                // The final name: the one a short-lived task is shown under
                // once /proc has forgotten it.
                self.names.insert(event.tid, comm);
                if event.tid == event.pid {
                    self.exited.insert(event.pid);
                    Change::ProcessExit(event.pid)
                } else {
                    Change::None
                }
            }
            TASK_EXEC_CALL => {
                self.remember_program(event.pid, event.generation, comm, true);
                Change::None
            }
            _ => Change::None,
        }
    }

    /// Remembers `name` for generation `generation` of `pid`; `replace`: it
    /// wins over a name remembered before.
    fn remember_program(&mut self, pid: u32, generation: u32, name: String, replace: bool) {
        let programs = self.replaced.entry(pid).or_default();
        match programs.iter_mut().find(|(g, _)| *g == generation) {
            Some(known) if replace => known.1 = name,
            Some(_) => {}
            None => {
                programs.push((generation, name));
                if programs.len() > PROGRAMS_KEPT {
                    programs.remove(0);
                }
            }
        }
    }

    /// Whether a sample of `pid` taken in program generation `generation`
    /// was taken before the process's last exec seen: its program was
    /// replaced before the sample was drained.
    pub fn ran_replaced_program(&self, pid: u32, generation: u32) -> bool {
        self.generations
            .get(&pid)
            .is_some_and(|&latest| generation_is_older(generation, latest))
    }

    /// The name of the program of generation `generation` of `pid`, one
    /// that an exec replaced; `?` when it was never seen.
    pub fn replaced_program_name(&self, pid: u32, generation: u32) -> String {
        self.replaced
            .get(&pid)
            .and_then(|p| p.iter().find(|(g, _)| *g == generation))
            .map_or_else(|| UNKNOWN_NAME.to_owned(), |(_, name)| name.clone())
    }

    pub fn has_exited(&self, pid: u32) -> bool {
        self.exited.contains(&pid)
    }

    /// The name of thread `tid` of process `pid`: the one last seen in an
    /// event, else /proc's (then remembered), else `?`.
    pub fn comm(&mut self, tid: u32, pid: u32, proc: &impl ProcFs) -> String {
        if tid == 0 {
            return IDLE_NAME.to_owned();
        }
        if let Some(name) = self.names.get(&tid) {
            return name.clone();
        }
        match proc.comm(pid, tid) {
            Some(name) => {
                self.names.insert(tid, name.clone());
                name
            }
            None => UNKNOWN_NAME.to_owned(),
        }
    }

    /// Whether `pid` is a kernel thread: decided once, from its stat flags.
    /// A process gone before it was asked about counts as a user process.
    pub fn is_kthread(&mut self, pid: u32, proc: &impl ProcFs) -> bool {
        *self.kthreads.entry(pid).or_insert_with(|| {
            proc.stat(pid)
                .and_then(|stat| stat_flags(&stat))
                .is_some_and(|flags| flags & PF_KTHREAD != 0)
        })
    }
}

/// The flags field (the 9th) of a `/proc/PID/stat` line; the comm before it
/// is parenthesised and may hold spaces and parentheses.
fn stat_flags(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(6)?.parse().ok()
}

/// A NUL-padded kernel comm as text.
pub(crate) fn comm_string(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A /proc with a fixed set of live tasks: (pid, tid) → comm, pid → stat.
    #[derive(Default)]
    pub(crate) struct FakeProc {
        pub comms: HashMap<(u32, u32), String>,
        pub stats: HashMap<u32, String>,
    }

    impl ProcFs for FakeProc {
        fn comm(&self, pid: u32, tid: u32) -> Option<String> {
            self.comms.get(&(pid, tid)).cloned()
        }

        fn stat(&self, pid: u32) -> Option<String> {
            self.stats.get(&pid).cloned()
        }
    }

    pub(crate) fn event(kind: u32, pid: u32, tid: u32, comm: &str) -> TaskEvent {
        let mut raw = [0u8; 16];
        raw[..comm.len()].copy_from_slice(comm.as_bytes());
        TaskEvent {
            kind,
            pid,
            tid,
            generation: 0,
            comm: raw,
        }
    }

    /// A stat line with these flags and a comm made to confuse a naive split.
    pub(crate) fn stat_line(pid: u32, flags: u64) -> String {
        format!("{pid} (a) b (c)) S 1 {pid} {pid} 0 -1 {flags} 100 0 0 0 5 3")
    }

    #[test]
    fn exited_task_keeps_its_final_name() {
        let mut tasks = Tasks::default();
        let proc = FakeProc::default();
        // The thread renamed itself before exiting; /proc no longer has it.
        assert_eq!(
            tasks.apply(&event(TASK_EXIT, 10, 11, "worker-2")),
            Change::None
        );
        assert_eq!(tasks.comm(11, 10, &proc), "worker-2");
        assert!(!tasks.has_exited(10));
        assert_eq!(
            tasks.apply(&event(TASK_EXIT, 10, 10, "main")),
            Change::ProcessExit(10)
        );
        assert!(tasks.has_exited(10));
        assert_eq!(tasks.comm(10, 10, &proc), "main");
    }

    #[test]
    fn exec_renames_process_and_revives_it() {
        let mut tasks = Tasks::default();
        let proc = FakeProc::default();
        tasks.apply(&event(TASK_EXIT, 20, 20, "sh"));
        assert!(tasks.has_exited(20));
        // A non-leader thread that execs becomes the process: both ids get the name.
        assert_eq!(
            tasks.apply(&event(TASK_EXEC, 20, 21, "cc1")),
            Change::Exec(20)
        );
        assert!(!tasks.has_exited(20));
        assert_eq!(tasks.comm(20, 20, &proc), "cc1");
        assert_eq!(tasks.comm(21, 20, &proc), "cc1");
        // A program that just exec'd is not a kernel thread, whatever /proc says.
        let lying = FakeProc {
            stats: HashMap::from([(20, stat_line(20, PF_KTHREAD))]),
            ..FakeProc::default()
        };
        assert!(!tasks.is_kthread(20, &lying));
    }

    #[test]
    fn live_task_is_named_from_proc_once() {
        let mut tasks = Tasks::default();
        let mut proc = FakeProc::default();
        proc.comms.insert((30, 31), "io-thread".to_owned());
        assert_eq!(tasks.comm(31, 30, &proc), "io-thread");
        // Remembered after the task is gone from /proc.
        proc.comms.clear();
        assert_eq!(tasks.comm(31, 30, &proc), "io-thread");
        assert_eq!(tasks.comm(32, 30, &proc), UNKNOWN_NAME);
        assert_eq!(tasks.comm(0, 0, &proc), IDLE_NAME);
    }

    #[test]
    fn kernel_threads_are_told_by_their_stat_flags() {
        let mut tasks = Tasks::default();
        let proc = FakeProc {
            stats: HashMap::from([
                (2, stat_line(2, PF_KTHREAD | 0x40)),
                (40, stat_line(40, 0x0040_0140)),
            ]),
            ..FakeProc::default()
        };
        assert!(tasks.is_kthread(2, &proc));
        assert!(!tasks.is_kthread(40, &proc));
        // Gone before being asked: a user process.
        assert!(!tasks.is_kthread(41, &proc));
        assert_eq!(stat_flags(&stat_line(7, 12345)), Some(12345));
        assert_eq!(stat_flags("garbage"), None);
    }

    #[test]
    fn comm_string_stops_at_nul_or_16_bytes() {
        assert_eq!(comm_string(&event(0, 0, 0, "bash").comm), "bash");
        assert_eq!(comm_string(&[b'x'; 16]), "x".repeat(16));
    }
}
