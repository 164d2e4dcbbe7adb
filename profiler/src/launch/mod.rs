//! Launch mode (`prof-bpf heap|cpu -- CMD ARGS`): run a command under the
//! profiler without ever harming it.
//!
//! The child is forked and held before `exec` until the probes are in
//! place, so that none of the program's work escapes. The guarantees:
//!
//! - prof-bpf gone before the exec (any time, SIGKILL included): the child
//!   exits without running the program. It waits on a pipe whose only write
//!   end is prof-bpf's; the child closes its own copy, so prof-bpf's death
//!   is an end of file.
//! - prof-bpf gone after the exec: the program runs on unprofiled, never
//!   stopped and never killed. Nothing is tied to prof-bpf's life (no
//!   `PR_SET_PDEATHSIG`, which would fire at the exit of the forking thread
//!   and survive exec). A session may hold the program stopped for a moment
//!   (heap stops it in its loader to load unwind tables); a *guard*, a tiny
//!   process forked by the child before exec and detached from it, resumes
//!   the program if prof-bpf dies before it ends the hold ([`Launched::attached`]).
//! - The program's exit status becomes prof-bpf's (128+N when killed by
//!   signal N); if the session fails, prof-bpf says so on stderr and still
//!   waits for the program and returns its status ([`Launched::finish`]).
//! - Reports never go into the program's stdout: the sessions send them to
//!   stderr or `-o` (`OutputPlan::stdout_to_stderr`).
//! - A signal that stops the session (SIGINT, SIGTERM, SIGHUP) is passed on
//!   to the program after the report, as a wrapper does.
//!
//! [`program`] finds what the command will run from its files.
use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::PathBuf,
    process::{Child, Command, ExitCode, ExitStatus},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::runtime::StopReason;

mod guard;
pub(crate) mod program;

/// Environment variable read only by the tests: makes prof-bpf announce a
/// point of the launch on stderr and wait there, so that a test can kill it
/// at a known step (`before-fork`, `before-exec`, `loader-stop`,
/// `after-attach`).
const TEST_PAUSE_ENV: &str = "PROF_BPF_TEST_PAUSE";
/// How long a test pause lasts (the test kills prof-bpf well before).
const TEST_PAUSE: Duration = Duration::from_secs(30);

/// Waits at `point` when the tests ask for it (see [`TEST_PAUSE_ENV`]).
pub(crate) fn test_pause(point: &str) {
    if std::env::var_os(TEST_PAUSE_ENV).is_some_and(|p| p == point) {
        eprintln!("prof-bpf: test pause at {point}");
        std::thread::sleep(TEST_PAUSE);
    }
}

/// Exit status of a child that prof-bpf abandoned before its exec.
const ABANDONED: i32 = 127;

/// A child forked and waiting before exec. Dropped without
/// [`Suspended::resume`], it exits without running the program.
pub(crate) struct Suspended {
    /// Its pid.
    pub pid: u32,
    /// Program file that will be executed (after `#!` resolution).
    pub program: PathBuf,
    /// The child execs on a byte, exits on end of file.
    release: Option<std::fs::File>,
    /// The guard leaves quietly on a byte (the hold is over).
    guard: Option<std::fs::File>,
    spawner: Option<std::thread::JoinHandle<std::io::Result<Child>>>,
}

impl Suspended {
    /// Lets the child exec and returns it, or the exec error.
    pub fn resume(mut self) -> anyhow::Result<Launched> {
        let mut release = self.release.take().context("the child was released")?;
        release
            .write_all(b"g")
            .context("releasing the launched program")?;
        drop(release);
        let spawner = self.spawner.take().context("the child was released")?;
        let child = spawner
            .join()
            .map_err(|_| anyhow::anyhow!("the launcher thread panicked"))?
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        Ok(Launched {
            pid: self.pid,
            child,
            guard: self.guard.take(),
        })
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        // End of file: the child exits without running the program; std's
        // spawn sees no exec error and returns it, to be reaped here.
        drop(self.release.take());
        if let Some(spawner) = self.spawner.take()
            && let Ok(Ok(mut child)) = spawner.join()
        {
            let _ = child.wait();
        }
    }
}

/// The program, running.
pub(crate) struct Launched {
    pid: u32,
    child: Child,
    /// Held while the session may stop the program.
    guard: Option<std::fs::File>,
}

impl Launched {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The session is recording and will not stop the program again: the
    /// guard leaves without touching it.
    pub fn attached(&mut self) {
        test_pause("after-attach");
        self.end_hold();
    }

    /// Tells the guard to leave without touching the program.
    fn end_hold(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            // A failed write (the guard died) leaves nothing to release.
            let _ = guard.write_all(b"r");
        }
    }

    /// Passes a signal that stopped the session on to the program, which
    /// ends as if prof-bpf were not there (a terminal's SIGINT or SIGHUP
    /// reached it anyway; a SIGTERM aimed at the wrapper is meant for it).
    pub fn pass_on(&self, reason: StopReason) {
        let signal = match reason {
            StopReason::Signal("SIGINT") => libc::SIGINT,
            StopReason::Signal("SIGTERM") => libc::SIGTERM,
            StopReason::Signal("SIGHUP") => libc::SIGHUP,
            _ => return,
        };
        // Not after it was reaped: its pid may name another process then.
        // It is reaped only in `finish`, which takes `self`.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid as libc::pid_t, signal) };
    }

    /// Ends launch mode: tells of the session's error (the program runs on
    /// unprofiled), waits for the program, and returns its status as
    /// prof-bpf's exit code.
    pub fn finish(mut self, session: anyhow::Result<()>) -> ExitCode {
        if let Err(err) = &session {
            eprintln!("prof-bpf: {err:#}");
            eprintln!("prof-bpf: the program runs on unprofiled");
        }
        // A hold the session did not end (an error) must not outlive it.
        if self.guard.is_some() && crate::process::state(self.pid) == Some('T') {
            // SAFETY: kill has no memory-safety preconditions; the child
            // is not reaped yet, so its pid is still its own.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
        }
        self.end_hold();
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!(
                "prof-bpf: waiting for the program (pid {}) to exit",
                self.pid
            );
        }
        match self.child.wait() {
            Ok(status) => {
                eprintln!("prof-bpf: the program exited ({status})");
                ExitCode::from(exit_code(status))
            }
            Err(err) => {
                eprintln!("prof-bpf: waiting for pid {}: {err}", self.pid);
                ExitCode::FAILURE
            }
        }
    }
}

/// prof-bpf's exit code for the program's `status`: its code, or 128+N
/// when it was killed by signal N (as shells report it).
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    }
}

/// Forks `command`, which stops before exec until [`Suspended::resume`].
pub(crate) fn spawn_suspended(command: &[OsString]) -> anyhow::Result<Suspended> {
    let (name, args) = command
        .split_first()
        .context("no command to launch after `--`")?;
    let program = program::find_program(name)?;
    test_pause("before-fork");
    let fds = ChildFds::new()?;
    let mut cmd = Command::new(&program);
    cmd.arg0(name).args(args);
    let raw = fds.raw();
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe calls (close, fork, waitpid, getpid, write, read,
    // and those of the guard) on descriptors open in the child.
    unsafe {
        cmd.pre_exec(move || before_exec(&raw));
    }
    let spawner = std::thread::spawn(move || cmd.spawn());
    let ChildFds {
        pid_rx,
        pid_tx,
        go_rx,
        go_tx,
        hold_rx,
        hold_tx,
        own_pidfd,
    } = fds;
    let mut pid_rx = std::fs::File::from(pid_rx);
    let mut pid = [0u8; 4];
    let read = pid_rx.read_exact(&mut pid);
    // The child has its own copies now; ours of its ends must close for
    // end of file to work both ways.
    drop((pid_tx, go_rx, hold_rx, own_pidfd));
    if read.is_err() {
        drop(go_tx);
        let err = spawner.join().ok().and_then(Result::err);
        bail!(
            "cannot run {}: {}",
            program.display(),
            err.map_or_else(|| "the child did not start".to_owned(), |e| e.to_string())
        );
    }
    let suspended = Suspended {
        pid: u32::from_ne_bytes(pid),
        program,
        release: Some(std::fs::File::from(go_tx)),
        guard: Some(std::fs::File::from(hold_tx)),
        spawner: Some(spawner),
    };
    test_pause("before-exec");
    Ok(suspended)
}

/// The descriptors shared with the child before exec (all close-on-exec).
struct ChildFds {
    /// The child's pid, child to prof-bpf.
    pid_rx: OwnedFd,
    pid_tx: OwnedFd,
    /// The go-ahead to exec, prof-bpf to child.
    go_rx: OwnedFd,
    go_tx: OwnedFd,
    /// The end of the hold, prof-bpf to the guard.
    hold_rx: OwnedFd,
    hold_tx: OwnedFd,
    /// prof-bpf's own pidfd, readable once prof-bpf has exited: the guard
    /// watches it.
    own_pidfd: OwnedFd,
}

/// The raw numbers of [`ChildFds`], as the child sees them.
#[derive(Clone, Copy)]
struct RawChildFds {
    pid_rx: RawFd,
    pid_tx: RawFd,
    go_rx: RawFd,
    go_tx: RawFd,
    hold_rx: RawFd,
    hold_tx: RawFd,
    own_pidfd: RawFd,
}

impl ChildFds {
    fn new() -> anyhow::Result<Self> {
        let (pid_rx, pid_tx) = pipe()?;
        let (go_rx, go_tx) = pipe()?;
        let (hold_rx, hold_tx) = pipe()?;
        Ok(Self {
            pid_rx,
            pid_tx,
            go_rx,
            go_tx,
            hold_rx,
            hold_tx,
            own_pidfd: pidfd_open(std::process::id()).context("pidfd_open of prof-bpf")?,
        })
    }

    fn raw(&self) -> RawChildFds {
        RawChildFds {
            pid_rx: self.pid_rx.as_raw_fd(),
            pid_tx: self.pid_tx.as_raw_fd(),
            go_rx: self.go_rx.as_raw_fd(),
            go_tx: self.go_tx.as_raw_fd(),
            hold_rx: self.hold_rx.as_raw_fd(),
            hold_tx: self.hold_tx.as_raw_fd(),
            own_pidfd: self.own_pidfd.as_raw_fd(),
        }
    }
}

/// The child's side, between fork and exec: closes prof-bpf's ends, starts
/// the guard, reports its pid and waits for the go-ahead.
fn before_exec(fds: &RawChildFds) -> std::io::Result<()> {
    // SAFETY: the calls below are async-signal-safe system calls on
    // descriptors and buffers owned by this single-threaded child.
    unsafe {
        libc::close(fds.pid_rx);
        libc::close(fds.go_tx);
        libc::close(fds.hold_tx);
    }
    guard::start(fds.hold_rx, fds.own_pidfd)?;
    // SAFETY: as above.
    unsafe {
        libc::close(fds.hold_rx);
        libc::close(fds.own_pidfd);
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(fds.pid_tx, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(fds.pid_tx);
        let mut go = [0u8; 1];
        loop {
            match libc::read(fds.go_rx, go.as_mut_ptr().cast(), 1) {
                1 => return Ok(()),
                -1 if *libc::__errno_location() == libc::EINTR => continue,
                // End of file: prof-bpf is gone or gave up; never run
                // unprofiled. Exit at once: std's report of a failed hook
                // would write to a pipe whose reader may be gone, and abort.
                _ => libc::_exit(ABANDONED),
            }
        }
    }
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pidfd (close-on-exec) of `pid`.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_the_programs_or_128_plus_the_signal() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGSEGV)), 139);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn launched_program_runs_and_returns_its_status() {
        let command: Vec<OsString> = ["sh", "-c", "exit 7"].map(OsString::from).to_vec();
        let mut launched = spawn_suspended(&command).unwrap().resume().unwrap();
        launched.attached();
        let status = launched.child.wait().unwrap();
        assert_eq!(exit_code(status), 7);
    }

    #[test]
    fn dropped_before_exec_never_runs_the_program() {
        let marker = std::env::temp_dir().join(format!("prof-bpf-never-{}", std::process::id()));
        let script = format!("touch {}", marker.display());
        let command: Vec<OsString> = ["sh".into(), "-c".into(), script.into()].to_vec();
        let suspended = spawn_suspended(&command).unwrap();
        let pid = suspended.pid;
        drop(suspended);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!marker.exists(), "the program ran");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the child is still there"
        );
    }
}
