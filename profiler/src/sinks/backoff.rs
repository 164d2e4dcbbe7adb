//! Retry delays: exponential from a minimum to a maximum, with jitter so that
//! many agents retrying the same backend spread out.
use std::time::Duration;

/// The delay before retry number `attempt` (0 for the first retry): `min`
/// doubled `attempt` times, capped at `max`, then reduced by up to a fifth
/// according to `unit_random` in [0, 1), never below `min`.
pub(crate) fn delay(attempt: u32, min: Duration, max: Duration, unit_random: f64) -> Duration {
    let doubled = min.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    let base = doubled.min(max);
    let jittered = base.mul_f64(1.0 - 0.2 * unit_random.clamp(0.0, 1.0));
    jittered.max(min.min(max))
}

/// [`delay`] with a fresh random number.
pub(crate) fn next(attempt: u32, min: Duration, max: Duration) -> Duration {
    delay(attempt, min, max, fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn doubles_from_min_to_max() {
        let got: Vec<Duration> = (0..9).map(|a| delay(a, S(1), S(60), 0.0)).collect();
        let want: Vec<Duration> = [1, 2, 4, 8, 16, 32, 60, 60, 60].map(S).to_vec();
        assert_eq!(got, want);
        // Far past the shift width: still the maximum, no overflow.
        assert_eq!(delay(1000, S(1), S(60), 0.0), S(60));
    }

    #[test]
    fn jitter_shortens_by_at_most_a_fifth_and_never_below_min() {
        assert_eq!(delay(3, S(1), S(60), 0.5), Duration::from_millis(7200));
        let shortest = delay(6, S(1), S(60), 0.999_999);
        assert!(shortest > S(48) && shortest < Duration::from_millis(48_001));
        assert_eq!(delay(0, S(1), S(60), 0.9), S(1));
    }
}
