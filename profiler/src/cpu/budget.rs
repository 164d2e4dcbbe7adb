//! Which sampled processes get unwind tables, and when.
//!
//! With `--pid` (or a launched command) every target gets them. A
//! whole-host session gives them to the busiest processes of the last
//! interval first, and only within [`SHARE`] of one core on average, since
//! compiling the CFI of large objects costs far more than sampling.
//! Processes left out keep frame-pointer stacks (cut stacks are shown as
//! such) and are considered again at the next interval. Objects already
//! loaded for one process are installed in any other at once, whatever the
//! budget: that costs a maps read, not a CFI compilation.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Share of one core that building unwind tables may use on average in a
/// whole-host session.
const SHARE: f64 = 0.005;
/// Time that may be spent at once (start-up, or a large object).
const BURST: Duration = Duration::from_millis(200);
/// Samples in an interval before a process is worth tables (whole host).
const MIN_SAMPLES: u64 = 2;

/// A token bucket of CPU time: refills at [`SHARE`] of wall time, may go
/// into debt by one large piece of work, which later work then waits out.
/// Instants are passed in, so that the policy is tested without waiting.
#[derive(Debug)]
pub(crate) struct Budget<I> {
    /// Seconds available (negative: debt).
    seconds: f64,
    refilled: I,
}

/// Time as the budget needs it: `std::time::Instant` in a session.
pub(crate) trait Clock: Copy {
    fn seconds_since(self, earlier: Self) -> f64;
}

impl Clock for std::time::Instant {
    fn seconds_since(self, earlier: Self) -> f64 {
        self.saturating_duration_since(earlier).as_secs_f64()
    }
}

impl<I: Clock> Budget<I> {
    /// A full bucket at `now`.
    pub fn new(now: I) -> Self {
        Self {
            seconds: BURST.as_secs_f64(),
            refilled: now,
        }
    }

    /// Refills up to `now`; whether work may start.
    pub fn available(&mut self, now: I) -> bool {
        let earned = now.seconds_since(self.refilled) * SHARE;
        self.seconds = (self.seconds + earned).min(BURST.as_secs_f64());
        self.refilled = now;
        self.seconds > 0.0
    }

    pub fn spend(&mut self, used: Duration) {
        self.seconds -= used.as_secs_f64();
    }
}

/// The order in which processes that asked for tables are served: busiest
/// of the last interval first, exited ones never. On the whole host, the
/// quiet ones (fewer than [`MIN_SAMPLES`]) wait; the budget is checked by
/// the caller before each one.
pub(crate) fn candidates(
    mut unknown: Vec<u32>,
    interval_samples: &HashMap<u32, u64>,
    whole_host: bool,
    has_exited: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let busy = |pid: &u32| interval_samples.get(pid).copied().unwrap_or(0);
    unknown.retain(|&pid| !has_exited(pid) && (!whole_host || busy(&pid) >= MIN_SAMPLES));
    // Stable: equally busy processes keep the walker's order.
    unknown.sort_by_key(|pid| std::cmp::Reverse(busy(pid)));
    unknown
}

/// Serves the walkers' requests for tables: processes that mapped new code
/// are refreshed, and those without tables get them, busiest first. On the
/// whole host, building objects waits for `budget`; installing objects
/// that are already loaded (the same library in a new process) does not,
/// since it costs a maps read. With `install_only`, nothing is built: that
/// is cheap enough to run often, so that a short-lived process gets the
/// loaded objects within milliseconds.
pub(crate) fn serve_requests(
    tables: &mut crate::unwind::Tables,
    budget: &mut Budget<Instant>,
    interval_samples: &HashMap<u32, u64>,
    whole_host: bool,
    install_only: bool,
    has_exited: impl Fn(u32) -> bool,
) {
    let may_build = |budget: &mut Budget<Instant>| {
        !install_only && (!whole_host || budget.available(Instant::now()))
    };
    let build = may_build(budget);
    let started = Instant::now();
    let unknown = tables.poll(build);
    if build {
        budget.spend(started.elapsed());
    }
    let served = if install_only {
        Vec::new()
    } else {
        candidates(unknown.clone(), interval_samples, whole_host, &has_exited)
    };
    for &pid in &served {
        let started = Instant::now();
        let result = if may_build(budget) {
            let result = tables.add_process(pid);
            budget.spend(started.elapsed());
            result
        } else {
            tables.install_loaded(pid)
        };
        if let Err(err) = result {
            log::debug!("no unwind tables for pid {pid}: {err:#}");
        }
    }
    // The quiet ones get what is loaded already.
    for pid in unknown {
        if !served.contains(&pid)
            && !has_exited(pid)
            && let Err(err) = tables.install_loaded(pid)
        {
            log::debug!("no unwind tables for pid {pid}: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since an arbitrary origin.
    #[derive(Clone, Copy, Debug)]
    struct At(f64);

    impl Clock for At {
        fn seconds_since(self, earlier: Self) -> f64 {
            (self.0 - earlier.0).max(0.0)
        }
    }

    #[test]
    fn budget_allows_a_burst_then_waits_out_the_debt() {
        let mut budget = Budget::new(At(0.0));
        assert!(budget.available(At(0.0)));
        // One large object: 1 s of work puts the bucket 0.8 s in debt.
        budget.spend(Duration::from_secs(1));
        assert!(!budget.available(At(0.0)));
        // At 0.5% of wall time, 0.8 s of debt takes 160 s to repay.
        assert!(!budget.available(At(159.0)));
        assert!(budget.available(At(161.0)));
    }

    #[test]
    fn budget_never_saves_more_than_one_burst() {
        let mut budget = Budget::new(At(0.0));
        // A day idle earns far more than the burst; only the burst is kept.
        assert!(budget.available(At(86_400.0)));
        budget.spend(BURST + Duration::from_millis(1));
        assert!(!budget.available(At(86_400.0)));
        // 1 ms of debt is repaid in 0.2 s.
        assert!(budget.available(At(86_400.3)));
    }

    #[test]
    fn busiest_first_and_quiet_or_exited_left_out_on_the_whole_host() {
        let samples = HashMap::from([(10, 1), (11, 50), (12, 7), (13, 50)]);
        let exited = |pid| pid == 13;
        let unknown = vec![10, 12, 11, 13, 14];
        assert_eq!(
            candidates(unknown.clone(), &samples, true, exited),
            vec![11, 12]
        );
        // Targets: everyone alive, even without samples yet.
        assert_eq!(
            candidates(unknown, &samples, false, exited),
            vec![11, 12, 10, 14]
        );
    }
}
