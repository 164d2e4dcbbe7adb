//! The guard: a tiny process that resumes the launched program if prof-bpf
//! dies while the program may be held stopped.
//!
//! The launched child forks it before exec (twice, so that it is not the
//! program's child: the program never sees it as a child nor reaps it). It
//! watches two descriptors:
//! - the hold pipe: a byte from prof-bpf means the hold is over, and the
//!   guard leaves without touching the program; an end of file alone says
//!   nothing (prof-bpf may still hold the program), so it keeps watching
//! - prof-bpf's pidfd: readable once prof-bpf has exited, after its
//!   descriptors (and so its probes) are gone. The guard then sends SIGCONT
//!   to the program, through a pidfd, which can never name a later process
//!   that reused the pid.
//!
//! It runs between fork and exec of a multi-threaded program's child, so it
//! makes async-signal-safe system calls only, and allocates nothing.
use std::os::fd::RawFd;

/// The guard's name in `ps`.
const NAME: &[u8] = b"prof-bpf-guard\0";
/// Descriptor numbers in the guard after it closed everything else.
const HOLD_FD: RawFd = 0;
const PROFILER_FD: RawFd = 1;
const PROGRAM_FD: RawFd = 2;

/// Starts the guard of the calling process (the child, before exec), which
/// watches `hold_rx` and prof-bpf's pidfd `profiler_pidfd`.
pub(super) fn start(hold_rx: RawFd, profiler_pidfd: RawFd) -> std::io::Result<()> {
    // SAFETY: the calls below are async-signal-safe system calls made by the
    // single-threaded child between fork and exec.
    unsafe {
        let program = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0);
        if program < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let program = program as RawFd;
        match libc::fork() {
            -1 => return Err(std::io::Error::last_os_error()),
            0 => {
                // The intermediate process: fork the guard and leave at once,
                // so that the guard's parent is not the program.
                if libc::fork() == 0 {
                    run(hold_rx, profiler_pidfd, program);
                }
                libc::_exit(0);
            }
            intermediate => {
                let mut status = 0;
                while libc::waitpid(intermediate, &mut status, 0) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
            }
        }
        libc::close(program);
    }
    Ok(())
}

/// The guard's whole life.
fn run(hold_rx: RawFd, profiler_pidfd: RawFd, program_pidfd: RawFd) -> ! {
    // SAFETY: the calls below are async-signal-safe system calls on the
    // guard's own descriptors and stack buffers.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr());
        // A terminal's Ctrl-C or hangup is for the program and prof-bpf; the
        // guard leaves when prof-bpf does.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        // prof-bpf's own handler (inherited) would write to its signal pipe.
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        // Keep only the three descriptors watched, as 0, 1 and 2, and close
        // every other one: the guard must not keep pipes of prof-bpf or of
        // the program's readers open. Copies above 2 first, in case one of
        // them is 0, 1 or 2 (prof-bpf started with stdio closed).
        let high = |fd| libc::fcntl(fd, libc::F_DUPFD, 3);
        let (hold, profiler, program) = (high(hold_rx), high(profiler_pidfd), high(program_pidfd));
        libc::dup2(hold, HOLD_FD);
        libc::dup2(profiler, PROFILER_FD);
        libc::dup2(program, PROGRAM_FD);
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        let mut watch = [
            libc::pollfd {
                fd: PROFILER_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: HOLD_FD,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut watched = watch.len();
        loop {
            if libc::poll(watch.as_mut_ptr(), watched as libc::nfds_t, -1) < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                // Cannot watch: resuming is the safe side.
                resume_and_exit();
            }
            if watch[0].revents != 0 {
                resume_and_exit();
            }
            if watched > 1 && watch[1].revents != 0 {
                let mut byte = 0u8;
                match libc::read(HOLD_FD, (&raw mut byte).cast(), 1) {
                    1 => libc::_exit(0),
                    // End of file: prof-bpf closed it without ending the
                    // hold; only its exit says the hold is over.
                    0 => watched = 1,
                    _ => {}
                }
            }
        }
    }
}

/// Sends SIGCONT to the program and exits.
fn resume_and_exit() -> ! {
    // SAFETY: pidfd_send_signal on the guard's own pidfd with no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            PROGRAM_FD,
            libc::SIGCONT,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        );
        libc::_exit(0)
    }
}
