//! The start of a whole-host session: tables for the processes already
//! running, busiest first, before the first sample asks for them.
//!
//! Their samples before the tables arrive are complete anyway (the kernel
//! copies their stacks, `crate::unwind::copied`), but each copy costs
//! bytes and a late walk; tables built up front save both. The work stays
//! within the session's table budget: the processes it does not reach wait
//! for their samples to ask, as any other.
use std::{collections::HashMap, time::Instant};

use log::debug;

use super::budget::Budget;
use crate::unwind::Tables;

/// Time between the two readings of every process's CPU time.
const WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// Builds tables for the running processes, busiest first, while the
/// budget allows.
pub(crate) fn build_busiest(tables: &mut Tables, budget: &mut Budget<Instant>) {
    let before = cpu_times();
    std::thread::sleep(WINDOW);
    let after = cpu_times();
    let own = std::process::id();
    let order = busiest(&before, &after, own);
    let mut built = 0;
    for pid in &order {
        if !budget.available(Instant::now()) {
            break;
        }
        let started = Instant::now();
        match tables.add_process(*pid) {
            Ok(()) => built += 1,
            Err(err) => debug!("no unwind tables for pid {pid} at start: {err:#}"),
        }
        budget.spend(started.elapsed());
    }
    debug!(
        "unwind tables at start: {built} of {} processes",
        order.len()
    );
}

/// Processes ordered by CPU time used between the two readings, then by
/// CPU time used in all (the busiest of the recent past first); kernel
/// threads and `own` left out.
fn busiest(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>, own: u32) -> Vec<u32> {
    let mut ranked: Vec<(u64, u64, u32)> = after
        .iter()
        .filter(|&(&pid, _)| pid != own)
        .map(|(&pid, &now)| {
            let recent = now.saturating_sub(before.get(&pid).copied().unwrap_or(now));
            (recent, now, pid)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().map(|(_, _, pid)| pid).collect()
}

/// User + system CPU time (clock ticks) of every user process.
fn cpu_times() -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?))
        })
        .collect()
}

/// utime + stime from a `/proc/PID/stat` line; `None` for a kernel thread
/// (flag PF_KTHREAD), which has no user stack.
fn parse_stat(stat: &str) -> Option<u64> {
    // The comm may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // Field 3 (state) is fields[0]; flags is field 9, utime 14, stime 15.
    let flags: u64 = fields.get(6)?.parse().ok()?;
    if flags & 0x0020_0000 != 0 {
        return None;
    }
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_cpu_time_and_kernel_threads_none() {
        let user = "4242 (a b) c) R 1 4242 4242 0 -1 4194304 100 0 0 0 70 30 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(user), Some(100));
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 3 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_stat(kthread), None);
    }

    #[test]
    fn recent_cpu_time_first_then_total() {
        let before = HashMap::from([(1, 100), (2, 10), (3, 500), (9, 0)]);
        let after = HashMap::from([(1, 150), (2, 60), (3, 500), (4, 7), (9, 99)]);
        // 1 and 2 both used 50 ticks; 1 used more in all. 4 is new.
        assert_eq!(busiest(&before, &after, 9), vec![1, 2, 3, 4]);
    }
}
