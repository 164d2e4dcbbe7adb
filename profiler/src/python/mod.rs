//! Python frames of a running CPython (3.11 to 3.13, x86-64, GIL builds):
//! read from user space (a snapshot dump of every thread's Python stack,
//! and the reference for the kernel-side walker), and in the heap and CPU
//! profiles through that walker.
//!
//! - [`discover`]: which mapped object is the interpreter, its version, and
//!   its structure [`offsets`] (tables for 3.11/3.12, `_Py_DebugOffsets`
//!   for 3.13).
//! - [`threads`]: kernel thread id → `PyThreadState`, walked from
//!   `_PyRuntime`.
//! - [`stack`]: a thread's frames as (code object, instruction offset).
//! - [`symbolize`]: those as `qualname (file.py:LINE)`.
//! - [`tracker`]: the user side of the kernel's frame walker
//!   (`profiler-ebpf/src/python.rs`): which processes and threads it walks,
//!   and the names of the stacks it records.
//! - [`merge`]: those stacks spliced into the native ones, each
//!   evaluation-loop frame replaced by the Python frames it ran.
//!
//! The target keeps running while it is read (nothing stops it), so every
//! walker validates what it reads and stops at the first inconsistency.
use std::{collections::HashMap, fmt};

use anyhow::Context as _;

pub mod discover;
pub mod dump_command;
pub mod eval_code;
pub mod memory;
pub mod merge;
pub mod offsets;
pub mod stack;
pub mod symbolize;
pub mod thread_names;
pub mod threads;
pub mod tracker;

use memory::{Memory as _, ProcessMemory, ReadError};
use stack::WalkEnd;
use symbolize::{PyFrame, Symbolizer, Unnamed};

/// `--python-frames`: what CPython processes' stacks show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PythonFrames {
    /// Each native evaluation-loop frame replaced by the Python frames it
    /// ran; every other native frame kept.
    #[default]
    Mixed,
    /// Python frames only, as py-spy shows them without `--native`: the
    /// native and kernel frames of a stack that has Python frames are
    /// left out (a stack without any keeps its native frames).
    Python,
    /// Native frames only: the Python frames are not walked at all.
    Native,
}

/// `--python-lines`: whether Python frames carry their line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PythonLines {
    /// `qualname (file.py:LINE)`.
    #[default]
    On,
    /// `qualname (file.py)`: one frame per function, as py-spy's
    /// `--function`.
    Off,
}

/// The Python options of `cpu` and `heap`.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct PythonArgs {
    /// CPython processes (3.11-3.13): `mixed` replaces each evaluation-loop
    /// frame by the Python frames it ran, `python` shows the Python frames
    /// only (py-spy's default view), `native` the interpreter's C frames
    /// only.
    #[arg(long, value_enum, default_value_t = PythonFrames::Mixed)]
    pub python_frames: PythonFrames,
    /// `off` aggregates Python frames by function, `qualname (file.py)`
    /// (py-spy's `--function`), instead of by line.
    #[arg(long, value_enum, default_value_t = PythonLines::On)]
    pub python_lines: PythonLines,
    /// `cpu` only: keep only the samples of the thread holding the GIL (as
    /// py-spy's `--gil`); samples of the threads of a CPython process that
    /// do not hold it are left out and counted (`not_gil_holder`). Threads
    /// of subinterpreters with a GIL of their own count as not holding it.
    #[arg(long)]
    pub gil: bool,
}

impl PythonArgs {
    /// `heap` refuses `--gil`, in one line.
    pub fn check_for_heap(&self) -> anyhow::Result<()> {
        if self.gil {
            anyhow::bail!(
                "--gil applies to `cpu` only: an allocation is made by whichever thread runs it"
            );
        }
        Ok(())
    }
}

/// A CPython this module cannot read: profiles of it show native frames
/// only.
#[derive(Debug)]
pub struct Unsupported {
    /// `3.10`, `3.14.0` ...
    pub version: String,
    /// The interpreter's object, as the target sees it.
    pub object: String,
    pub why: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Python {} ({}) is not supported ({}): only native frames are shown",
            self.version, self.object, self.why
        )
    }
}

impl std::error::Error for Unsupported {}

/// The Python stack of one thread at the time of a dump.
#[derive(Clone, Debug)]
pub struct ThreadStack {
    /// Kernel thread id.
    pub tid: u32,
    /// The thread's Python name (`threading.Thread.name`), else the one the
    /// kernel has (`/proc/PID/task/TID/comm`).
    pub name: String,
    /// Innermost frame first.
    pub frames: Vec<PyFrame>,
    /// Shim frames of C calling into Python that were skipped.
    pub cstack_frames: u32,
    /// Frames not yet started that were skipped.
    pub incomplete_frames: u32,
    /// How the walk ended (anything but `Complete` means frames may be
    /// missing at the outer end).
    pub end: WalkEnd,
    /// The thread held the main GIL when the dump started.
    pub holds_gil: bool,
}

/// Every Python thread's stack in process `pid`, in the order of the
/// interpreter's thread list. Fails with one line when the process has no
/// supported CPython ([`Unsupported`] can be downcast from the error), or
/// exits during the dump.
pub fn dump(pid: u32) -> anyhow::Result<Vec<ThreadStack>> {
    dump_process(pid).map(|(_, stacks)| stacks)
}

/// [`dump`], with the interpreter found.
pub fn dump_process(pid: u32) -> anyhow::Result<(discover::Interpreter, Vec<ThreadStack>)> {
    let memory = ProcessMemory::new(pid);
    let gone = |err: anyhow::Error| exited_or(pid, err);
    let py = discover::find(pid, &memory).map_err(gone)?;
    let threads = thread_states(&memory, &py)
        .map_err(gone)
        .with_context(|| format!("pid {pid}"))?;
    let gil_holder = gil_holder(&memory, &py);
    // Per interpreter; a process that did not import `threading` has none.
    let mut names: HashMap<u64, HashMap<u64, String>> = HashMap::new();
    let mut symbolizer = Symbolizer::default();
    let mut stacks = Vec::with_capacity(threads.len());
    for thread in threads {
        let raw = stack::walk(&memory, &py, thread.tstate);
        if let WalkEnd::ReadFailed(ReadError::ProcessGone) = raw.end {
            return Err(gone(anyhow::Error::new(ReadError::ProcessGone)));
        }
        let mut end = raw.end;
        let mut frames = Vec::with_capacity(raw.frames.len());
        for &frame in &raw.frames {
            match symbolizer.frame(pid, &memory, &py, frame) {
                Ok(named) => frames.push(named),
                Err(Unnamed::Unreadable(ReadError::ProcessGone)) => {
                    return Err(gone(anyhow::Error::new(ReadError::ProcessGone)));
                }
                // The code object changed under the reader: the frames
                // from here on are not trustworthy. (Frames walked now
                // carry no check, and their code runs: none is `Freed`.)
                Err(err) => {
                    end = WalkEnd::ReadFailed(match err {
                        Unnamed::Unreadable(err) => err,
                        Unnamed::Freed => ReadError::BadPointer(frame.code),
                    });
                    break;
                }
            }
        }
        let python_name = names
            .entry(thread.interp)
            .or_insert_with(|| {
                thread_names::thread_names(&memory, &py, thread.interp).unwrap_or_default()
            })
            .get(&thread.pthread)
            .cloned();
        stacks.push(ThreadStack {
            tid: thread.tid,
            name: python_name.unwrap_or_else(|| thread_name(pid, thread.tid)),
            frames,
            cstack_frames: raw.cstack_frames,
            incomplete_frames: raw.incomplete_frames,
            end,
            holds_gil: gil_holder == Some(thread.tstate),
        });
    }
    Ok((py, stacks))
}

/// The thread state holding the main GIL (None: nobody, or not known).
fn gil_holder(memory: &ProcessMemory, py: &discover::Interpreter) -> Option<u64> {
    let (locked, holder) = threads::gil(memory, py).ok()??;
    (memory.read_u32(locked).ok()? != 0).then(|| memory.read_u64(holder).ok())?
}

/// Attempts at walking the thread list, which threads starting and exiting
/// change under the reader.
const THREAD_WALK_ATTEMPTS: usize = 5;

/// The thread states of the process, walked again when the list changed
/// under the reader. A thread state that persistently does not point back
/// at its interpreter means an unexpected layout: [`Unsupported`].
fn thread_states(
    memory: &ProcessMemory,
    py: &discover::Interpreter,
) -> anyhow::Result<Vec<threads::PyThread>> {
    let mut attempt = 1;
    loop {
        let err = match threads::threads(memory, py) {
            Ok(threads) => return Ok(threads),
            Err(err) => err,
        };
        let lasting = matches!(
            err,
            threads::ThreadsError::Read(ReadError::ProcessGone | ReadError::PermissionDenied)
        );
        if !lasting && attempt < THREAD_WALK_ATTEMPTS {
            attempt += 1;
            continue;
        }
        return Err(match err {
            threads::ThreadsError::LayoutMismatch { .. } => Unsupported {
                version: py.version.to_string(),
                object: py.object.clone(),
                why: err.to_string(),
            }
            .into(),
            other => other.into(),
        });
    }
}

fn thread_name(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// `err`, or "exited" when the process is gone (or a zombie), which is
/// what most failures in the middle of a dump come down to.
fn exited_or(pid: u32, err: anyhow::Error) -> anyhow::Error {
    match crate::process::state(pid) {
        None | Some('Z' | 'X') => anyhow::anyhow!("pid {pid} exited during the Python stack dump"),
        Some(_) => err,
    }
}
