//! Why and when a session stops.
//!
//! One [`Stop`] per session merges every reason to end recording: SIGINT
//! (Ctrl-C), SIGTERM (`timeout`, service managers), SIGHUP (a closed
//! terminal or ssh session), the `--duration` deadline, and the exit of the
//! last watched target. The signal handlers are installed when it is made,
//! before anything is attached, so a signal that arrives while attaching is
//! kept and still ends the session with its report.
use std::collections::HashSet;

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

use crate::process::ExitWatcher;

/// Why a session stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A signal asked to stop: `"SIGINT"`, `"SIGTERM"` or `"SIGHUP"`.
    Signal(&'static str),
    /// `--duration` elapsed.
    Deadline,
    /// Every watched target exited.
    TargetsExited,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signal(name) => f.write_str(name),
            Self::Deadline => f.write_str("--duration reached"),
            Self::TargetsExited => f.write_str("the targets exited"),
        }
    }
}

/// What [`Stop::next`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopEvent {
    /// A watched process exited. When it was the last one, the next call
    /// returns `Stop(TargetsExited)` at once.
    Exited(u32),
    /// Stop recording.
    Stop(StopReason),
}

/// Every reason a session can stop, as one cancel-safe future source.
pub struct Stop {
    interrupt: Signal,
    terminate: Signal,
    /// None when SIGHUP is the caller's own (the agent re-reads its config).
    hangup: Option<Signal>,
    deadline: Option<Instant>,
    exits_tx: mpsc::UnboundedSender<u32>,
    exits: mpsc::UnboundedReceiver<u32>,
    /// Watched processes that have not exited yet.
    running: HashSet<u32>,
    /// Whether any process was watched (none: targets never "all exit").
    watching: bool,
}

impl Stop {
    /// Installs the SIGINT, SIGTERM and SIGHUP handlers; call it inside the
    /// runtime, before attaching anything.
    pub fn new() -> anyhow::Result<Self> {
        let mut stop = Self::without_hangup()?;
        stop.hangup = Some(signal(SignalKind::hangup()).context("installing the SIGHUP handler")?);
        Ok(stop)
    }

    /// A [`Stop`] that leaves SIGHUP to the caller (a service reloads on it).
    pub fn without_hangup() -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Ok(Self {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: None,
            deadline: None,
            exits_tx,
            exits,
            running: HashSet::new(),
            watching: false,
        })
    }

    /// Stops at `at` (`--duration`, counted from when recording starts).
    pub fn set_deadline(&mut self, at: Instant) {
        self.deadline = Some(at);
    }

    /// Watches `pid`; once every watched process has exited, the session
    /// stops. Watching the same process twice is harmless.
    pub fn watch(&mut self, pid: u32) -> anyhow::Result<()> {
        if !self.running.insert(pid) {
            return Ok(());
        }
        self.watching = true;
        let watcher = ExitWatcher::new(pid)?;
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            watcher.exited().await;
            // The receiver lives as long as the Stop; a send after it is
            // dropped has nobody to tell.
            let _ = tx.send(pid);
        });
        Ok(())
    }

    /// The next reason to act: a target's exit or a reason to stop.
    /// Cancel-safe: meant for a `tokio::select!` arm inside the loop.
    pub async fn next(&mut self) -> StopEvent {
        if self.watching && self.running.is_empty() {
            return StopEvent::Stop(StopReason::TargetsExited);
        }
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return StopEvent::Stop(StopReason::Signal("SIGINT")),
                _ = self.terminate.recv() => return StopEvent::Stop(StopReason::Signal("SIGTERM")),
                _ = hangup(&mut self.hangup) => return StopEvent::Stop(StopReason::Signal("SIGHUP")),
                () = super::sleep_until(self.deadline) => return StopEvent::Stop(StopReason::Deadline),
                Some(pid) = self.exits.recv() => {
                    if self.running.remove(&pid) {
                        return StopEvent::Exited(pid);
                    }
                }
            }
        }
    }
}

/// The next SIGHUP, or never when it is not this [`Stop`]'s.
async fn hangup(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Signal handlers are process-wide: the tests that make a `Stop` run
    /// one at a time, so a signal raised by one is never seen by another.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn run<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> T {
        let _guard = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        super::super::block_on(f).unwrap()
    }

    #[test]
    fn deadline_stops() {
        let reason = run(async {
            let mut stop = Stop::new()?;
            stop.set_deadline(Instant::now() + Duration::from_millis(20));
            Ok(stop.next().await)
        });
        assert_eq!(reason, StopEvent::Stop(StopReason::Deadline));
    }

    #[test]
    fn the_last_exit_stops() {
        let events = run(async {
            let mut stop = Stop::new()?;
            let mut a = std::process::Command::new("sleep").arg("0.05").spawn()?;
            let mut b = std::process::Command::new("sleep").arg("0.1").spawn()?;
            stop.watch(a.id())?;
            stop.watch(b.id())?;
            let mut events = Vec::new();
            for _ in 0..3 {
                events.push(stop.next().await);
            }
            a.wait()?;
            b.wait()?;
            Ok((events, a.id(), b.id()))
        });
        let (events, a, b) = events;
        assert_eq!(
            events,
            [
                StopEvent::Exited(a),
                StopEvent::Exited(b),
                StopEvent::Stop(StopReason::TargetsExited)
            ]
        );
    }

    #[test]
    fn a_signal_during_the_attach_is_kept() {
        // SIGHUP raised before the loop starts waiting still stops it.
        let event = run(async {
            let mut stop = Stop::new()?;
            // SAFETY: raise sends a signal to this thread; the handler
            // installed above catches it.
            unsafe { libc::raise(libc::SIGHUP) };
            Ok(stop.next().await)
        });
        assert_eq!(event, StopEvent::Stop(StopReason::Signal("SIGHUP")));
    }
}
