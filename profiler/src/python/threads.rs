//! The Python thread states of a process: interpreters from `_PyRuntime`,
//! then each interpreter's list of `PyThreadState`s, each with the kernel
//! thread id it runs on. This table (tid → thread state) is what the
//! kernel-side walker needs to start from a sampled thread.
use super::{
    discover::Interpreter,
    memory::{Memory, ReadError},
    offsets::GilAnchor,
};

/// Bounds on the lists, so that a cycle or garbage in a list that changes
/// under the reader cannot loop forever.
const MAX_INTERPRETERS: usize = 256;
const MAX_THREADS: usize = 65_536;

/// One Python thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyThread {
    /// Kernel thread id (`native_thread_id`).
    pub tid: u32,
    /// `pthread_t` of the thread (`thread_id`).
    pub pthread: u64,
    /// Address of its `PyThreadState`.
    pub tstate: u64,
    /// Address of its `PyInterpreterState`.
    pub interp: u64,
}

/// Why a thread walk failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ThreadsError {
    Read(ReadError),
    /// A thread state does not point back at its interpreter: the layout
    /// is not the one the offsets describe.
    LayoutMismatch {
        tstate: u64,
        interp: u64,
        found: u64,
    },
    /// A list is longer than the bound (most likely a cycle).
    TooLong,
}

impl std::fmt::Display for ThreadsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(err) => write!(f, "walking the thread states: {err}"),
            Self::LayoutMismatch {
                tstate,
                interp,
                found,
            } => write!(
                f,
                "thread state {tstate:#x} of interpreter {interp:#x} names interpreter \
                 {found:#x}: the structure layout is not the expected one"
            ),
            Self::TooLong => f.write_str("the thread list does not end (changing or corrupt)"),
        }
    }
}

impl std::error::Error for ThreadsError {}

impl From<ReadError> for ThreadsError {
    fn from(err: ReadError) -> Self {
        Self::Read(err)
    }
}

/// All thread states of all interpreters. Thread states that have no
/// kernel thread yet (native id 0, being created) are left out.
pub fn threads(memory: &impl Memory, py: &Interpreter) -> Result<Vec<PyThread>, ThreadsError> {
    let o = &py.offsets;
    let mut out = Vec::new();
    let mut interp = memory.read_pointer(py.runtime + o.runtime_interpreters_head, 8)?;
    for _ in 0..MAX_INTERPRETERS {
        let mut tstate = memory.read_u64(interp + o.interp_threads_head)?;
        while tstate != 0 {
            if out.len() >= MAX_THREADS {
                return Err(ThreadsError::TooLong);
            }
            super::memory::check_pointer(tstate, 8)?;
            let found = memory.read_u64(tstate + o.tstate_interp)?;
            if found != interp {
                return Err(ThreadsError::LayoutMismatch {
                    tstate,
                    interp,
                    found,
                });
            }
            let native = memory.read_u64(tstate + o.tstate_native_thread_id)?;
            if let Ok(tid) = u32::try_from(native)
                && tid != 0
            {
                out.push(PyThread {
                    tid,
                    pthread: memory.read_u64(tstate + o.tstate_thread_id)?,
                    tstate,
                    interp,
                });
            }
            tstate = memory.read_u64(tstate + o.tstate_next)?;
        }
        interp = memory.read_u64(interp + o.interp_next)?;
        if interp == 0 {
            return Ok(out);
        }
        super::memory::check_pointer(interp, 8)?;
    }
    Err(ThreadsError::TooLong)
}

/// Addresses of the main interpreter's GIL state in the process:
/// (`locked`, `last_holder`), or None while the interpreter has not set
/// its GIL up yet. The main interpreter is the first one created, the last
/// of the list.
pub fn gil(memory: &impl Memory, py: &Interpreter) -> Result<Option<(u64, u64)>, ThreadsError> {
    let o = &py.offsets;
    match o.gil {
        GilAnchor::InRuntime { locked, holder } => {
            Ok(Some((py.runtime + locked, py.runtime + holder)))
        }
        GilAnchor::ThroughInterpreter {
            gil,
            locked,
            holder,
        } => {
            let mut interp = memory.read_pointer(py.runtime + o.runtime_interpreters_head, 8)?;
            for _ in 0..MAX_INTERPRETERS {
                let next = memory.read_u64(interp + o.interp_next)?;
                if next == 0 {
                    let state = memory.read_u64(interp + gil)?;
                    if state == 0 {
                        return Ok(None);
                    }
                    super::memory::check_pointer(state, 8)?;
                    return Ok(Some((state + locked, state + holder)));
                }
                super::memory::check_pointer(next, 8)?;
                interp = next;
            }
            Err(ThreadsError::TooLong)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{
        memory::fake::FakeMemory,
        offsets::{PY312, PythonVersion},
    };

    const RUNTIME: u64 = 0x10_0000;
    const INTERP: u64 = 0x20_0000;
    const T1: u64 = 0x30_0000;
    const T2: u64 = 0x31_0000;

    fn interpreter() -> Interpreter {
        Interpreter {
            object: "test".to_owned(),
            version: PythonVersion { hex: 0x030c_01f0 },
            runtime: RUNTIME,
            code_type: 0,
            offsets: PY312,
            eval_loop: profiler_common::python_splice::EvalCode::default(),
        }
    }

    /// A thread state of 3.12: next at 8, interp at 16, pthread at 136,
    /// native id at 144.
    fn tstate(next: u64, interp: u64, native: u64) -> Vec<u64> {
        let mut words = vec![0; 19];
        words[1] = next;
        words[2] = interp;
        words[17] = 0x7f00_0000_0000 + native;
        words[18] = native;
        words
    }

    fn image(t1_interp: u64) -> FakeMemory {
        let mut m = FakeMemory::default();
        m.put_u64s(RUNTIME + 40, &[INTERP]);
        let mut interp = vec![0; 10];
        interp[9] = T1;
        m.put_u64s(INTERP, &interp);
        m.put_u64s(T1, &tstate(T2, t1_interp, 101));
        m.put_u64s(T2, &tstate(0, INTERP, 102));
        m
    }

    #[test]
    fn walks_every_thread_state_of_the_interpreter() {
        let found = threads(&image(INTERP), &interpreter()).unwrap();
        let tids: Vec<(u32, u64)> = found.iter().map(|t| (t.tid, t.tstate)).collect();
        assert_eq!(tids, [(101, T1), (102, T2)]);
        assert_eq!(found[1].pthread, 0x7f00_0000_0000 + 102);
    }

    #[test]
    fn a_thread_state_of_another_interpreter_is_a_layout_mismatch() {
        let err = threads(&image(0x99_0000), &interpreter()).unwrap_err();
        assert!(matches!(err, ThreadsError::LayoutMismatch { .. }), "{err}");
    }

    /// 3.12: the main interpreter (the list's last) points at its GIL.
    #[test]
    fn the_gil_is_found_through_the_main_interpreter() {
        let mut m = image(INTERP);
        let mut interp = vec![0; 49];
        interp[9] = T1;
        interp[48] = 0x40_0000;
        m.put_u64s(INTERP, &interp);
        assert_eq!(
            gil(&m, &interpreter()),
            Ok(Some((0x40_0000 + 16, 0x40_0000 + 8)))
        );
        interp[48] = 0;
        m.put_u64s(INTERP, &interp);
        assert_eq!(gil(&m, &interpreter()), Ok(None));
    }

    #[test]
    fn a_cycle_ends_with_an_error() {
        let mut m = image(INTERP);
        m.put_u64s(T2, &tstate(T1, INTERP, 102));
        assert_eq!(threads(&m, &interpreter()), Err(ThreadsError::TooLong));
    }
}
