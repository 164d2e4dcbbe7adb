//! clap value parsers for the options every subcommand shares: times and
//! rates, each with a lower and an upper bound, so that `--duration 1e30`
//! or `--interval 0.001` is refused before anything is attached, with the
//! accepted range in the message.
use std::time::Duration;

/// Longest `--duration` and `--min-age`: a year.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// Shortest `--interval`: each interval reads every map and builds a
/// report, which takes milliseconds; shorter ones would only measure that.
pub const MIN_INTERVAL: f64 = 0.1;
/// Longest `--interval`: a day.
pub const MAX_INTERVAL: f64 = 24.0 * 3600.0;
/// Highest sampling frequency accepted by the parser; the kernel's own
/// limit (`perf_event_max_sample_rate`) is checked when sampling starts.
pub const MAX_FREQUENCY: u64 = 100_000;

/// `--duration`: seconds in (0, a year].
pub fn seconds(s: &str) -> Result<Duration, String> {
    let v = number(s)?;
    if v > 0.0 && v <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "must be a number of seconds above 0 and at most {MAX_SECONDS:.0} (a year), got {s}"
        ))
    }
}

/// `--interval`: seconds in [0.1, a day].
pub fn interval(s: &str) -> Result<Duration, String> {
    let v = number(s)?;
    if (MIN_INTERVAL..=MAX_INTERVAL).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "must be a number of seconds from {MIN_INTERVAL} to {MAX_INTERVAL:.0} (a day), got {s}"
        ))
    }
}

/// `--min-age`: seconds in [0, a year].
pub fn age(s: &str) -> Result<Duration, String> {
    let v = number(s)?;
    if (0.0..=MAX_SECONDS).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "must be a number of seconds from 0 to {MAX_SECONDS:.0} (a year), got {s}"
        ))
    }
}

/// `-F`: a sampling frequency in Hz, in [1, 100000].
pub fn frequency(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(v) if (1..=MAX_FREQUENCY).contains(&v) => Ok(v),
        _ => Err(format!(
            "must be a whole number of Hz from 1 to {MAX_FREQUENCY}, got {s}"
        )),
    }
}

/// An interval longer than the whole run would never produce a report.
pub fn check_interval(
    interval: Option<Duration>,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    if let (Some(i), Some(d)) = (interval, duration)
        && i > d
    {
        anyhow::bail!(
            "--interval ({} s) is longer than --duration ({} s): no interval would end",
            i.as_secs_f64(),
            d.as_secs_f64()
        );
    }
    Ok(())
}

fn number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("must be a number of seconds, got {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "1e30", "nan", "inf", "x", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(seconds("1e30").unwrap_err().contains("at most 31536000"));
        assert_eq!(interval("0.1"), Ok(Duration::from_millis(100)));
        assert!(interval("0.001").unwrap_err().contains("from 0.1"));
        assert!(interval("86401").is_err());
        assert_eq!(age("0"), Ok(Duration::ZERO));
        assert!(age("-0.5").is_err());
        assert_eq!(frequency("99"), Ok(99));
        for bad in ["0", "100001", "9.5", "-3"] {
            assert!(frequency(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interval_within_duration() {
        let s = Duration::from_secs;
        assert!(check_interval(Some(s(2)), Some(s(5))).is_ok());
        assert!(check_interval(Some(s(5)), Some(s(5))).is_ok());
        assert!(check_interval(None, Some(s(1))).is_ok());
        let err = check_interval(Some(s(10)), Some(s(1))).unwrap_err();
        assert!(
            err.to_string()
                .contains("--interval (10 s) is longer than --duration (1 s)")
        );
    }
}
