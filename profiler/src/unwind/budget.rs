//! The CPU time that building unwind tables may take in a whole-host
//! session: a token bucket that refills at [`SHARE`] of one core, with one
//! [`BURST`] of savings, since compiling the CFI of large objects costs far
//! more than sampling.
use std::time::Duration;

/// Share of one core that building unwind tables may use on average in a
/// whole-host session.
pub const SHARE: f64 = 0.005;
/// Time that may be spent at once (start-up, or a large object).
pub const BURST: Duration = Duration::from_millis(200);

/// A token bucket of CPU time: refills at [`SHARE`] of wall time, may go
/// into debt by one large piece of work, which later work then waits out.
/// Instants are passed in, so that the policy is tested without waiting.
#[derive(Debug)]
pub struct Budget<I> {
    /// Seconds available (negative: debt).
    seconds: f64,
    refilled: I,
}

/// Time as the budget needs it: `std::time::Instant` in a session.
pub trait Clock: Copy {
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

    /// Wall time until work may start again (zero when it may now), as of
    /// the last refill.
    pub fn until_available(&self) -> Duration {
        if self.seconds > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.seconds / SHARE)
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
    fn debt_says_how_long_to_wait() {
        let mut budget = Budget::new(At(0.0));
        assert_eq!(budget.until_available(), Duration::ZERO);
        budget.spend(BURST + Duration::from_millis(10));
        assert!(!budget.available(At(0.0)));
        // 10 ms of debt at 0.5% of wall time: 2 s.
        let wait = budget.until_available().as_secs_f64();
        assert!((wait - 2.0).abs() < 1e-6, "{wait}");
    }
}
