//! What every profiling subcommand shares: one tokio runtime, one way to
//! stop ([`Stop`]: Ctrl-C, SIGTERM, SIGHUP, `--duration`, the targets'
//! exit), bounded option parsers ([`args`]), and the one reader of the
//! kernel's counter sets ([`counters`]).
//!
//! A subcommand validates its options (including its output, through
//! `OutputArgs::check`) before it attaches anything, then records inside
//! [`block_on`] until [`Stop::next`] says why to stop, and always writes its
//! report: a signal is a request to finish, not to lose the run.
use std::future::Future;

use anyhow::Context as _;

pub mod args;
pub mod counters;
mod stop;

pub use stop::{Stop, StopEvent, StopReason};

/// Runs `future` on a current-thread tokio runtime: the collectors are
/// driven by timers and a few descriptors, and one thread keeps their state
/// free of locks.
pub fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(future)
}

/// Completes at `deadline`, or never when there is none (a `select!` arm
/// that is present only when the option is).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next tick of `interval`, or never when there is none.
pub async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
