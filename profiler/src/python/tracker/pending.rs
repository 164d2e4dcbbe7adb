//! Processes named like Python whose interpreter was not found yet: a
//! launched interpreter has not mapped libpython at its exec. They are
//! looked at again, first after [`FIRST_DELAY`], then at doubling delays,
//! for [`LOOK_FOR`] at most.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

const LOOK_FOR: Duration = Duration::from_secs(10);
const FIRST_DELAY: Duration = Duration::from_millis(10);

struct Next {
    at: Instant,
    delay: Duration,
    until: Instant,
}

/// See the module docs.
#[derive(Default)]
pub struct Pending {
    processes: HashMap<u32, Next>,
    /// Looked at for [`LOOK_FOR`] in vain: not again until forgotten
    /// ([`Pending::remove`], at its exit or exec).
    given_up: HashSet<u32>,
}

impl Pending {
    /// Looks at `pid` again soon (nothing when it is pending already or
    /// was given up).
    pub fn add(&mut self, pid: u32, now: Instant) {
        if self.given_up.contains(&pid) {
            return;
        }
        self.processes.entry(pid).or_insert(Next {
            at: now + FIRST_DELAY,
            delay: FIRST_DELAY,
            until: now + LOOK_FOR,
        });
    }

    /// Found, or forgotten.
    pub fn remove(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.given_up.remove(&pid);
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// The processes due at `now`, each looked at next after twice its
    /// last delay, or given up when that is past its time.
    pub fn take_due(&mut self, now: Instant) -> Vec<u32> {
        let due: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, n)| n.at <= now)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in &due {
            if let Some(n) = self.processes.get_mut(pid) {
                n.delay *= 2;
                n.at = now + n.delay;
                if n.at > n.until {
                    self.processes.remove(pid);
                    self.given_up.insert(*pid);
                }
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_until_the_process_is_given_up() {
        let start = Instant::now();
        let mut p = Pending::default();
        p.add(7, start);
        assert!(p.take_due(start).is_empty(), "not before the first delay");
        let mut at = start + FIRST_DELAY;
        let mut looks = 0;
        while !p.is_empty() {
            assert_eq!(p.take_due(at), [7]);
            looks += 1;
            // Adding again does not reset the delay.
            p.add(7, at);
            at += FIRST_DELAY * (1 << looks);
        }
        // At 10, 30, 70 ... 5110 ms; the next one would be past 10 s.
        assert_eq!(looks, 9);
        // Forgotten (its exit or exec), it may be looked at again.
        p.remove(7);
        p.add(7, at);
        assert!(!p.is_empty());
        p.remove(7);
        assert!(p.is_empty());
    }
}
