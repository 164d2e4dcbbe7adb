//! Which sampled processes get unwind tables, and when, for callers that
//! build on their own thread (the agent; `cpu` and `heap --all` queue them
//! for the builder thread instead, see `unwind::background`).
//!
//! With `--pid` (or a launched command) every target gets them. A
//! whole-host session gives them to the busiest processes of the last
//! interval first, and only within the [`Budget`] of one core on average, since
//! compiling the CFI of large objects costs far more than sampling.
//! Processes left out keep frame-pointer stacks (cut stacks are shown as
//! such) and are considered again at the next interval. Objects already
//! loaded for one process are installed in any other at once, whatever the
//! budget: that costs a maps read, not a CFI compilation.
use std::{collections::HashMap, time::Instant};

pub(crate) use crate::unwind::budget::Budget;

/// Samples in an interval before a process is worth tables (whole host).
const MIN_SAMPLES: u64 = 2;

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
