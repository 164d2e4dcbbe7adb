//! The one user-space reader of the kernel's counter sets
//! (`profiler_common::counters`), and the one way they are shown.
use std::marker::PhantomData;

use anyhow::Context as _;
use aya::maps::PerCpuArray;
use profiler_common::counters::CounterSet;

/// A counter set's totals over every CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts<S: CounterSet> {
    values: Vec<u64>,
    set: PhantomData<S>,
}

impl<S: CounterSet> Default for Counts<S> {
    fn default() -> Self {
        Self::from_values(vec![0; S::LEN as usize])
    }
}

impl<S: CounterSet> Counts<S> {
    /// Sums the per-CPU values of the map `name`, which holds the set `S`.
    pub fn read(ebpf: &aya::Ebpf, name: &str) -> anyhow::Result<Self> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            ebpf.map(name)
                .with_context(|| format!("counter map {name} missing from the eBPF object"))?,
        )?;
        let mut values = Vec::with_capacity(S::LEN as usize);
        for &counter in S::ALL {
            let per_cpu = map
                .get(&counter.index(), 0)
                .with_context(|| format!("reading counter {} of {name}", counter.name()))?;
            values.push(per_cpu.iter().fold(0u64, |sum, v| sum.saturating_add(*v)));
        }
        Ok(Self::from_values(values))
    }

    /// Counts from values in index order (missing ones are 0).
    pub fn from_values(mut values: Vec<u64>) -> Self {
        values.resize(S::LEN as usize, 0);
        Self {
            values,
            set: PhantomData,
        }
    }

    /// One counter's total.
    pub fn get(&self, counter: S) -> u64 {
        self.values[counter.index() as usize]
    }

    /// `TITLE: name N, name N, ...`, every counter in declaration order, for
    /// profile comments and logs.
    pub fn comment(&self, title: &str) -> String {
        let fields: Vec<String> = S::ALL
            .iter()
            .map(|&c| format!("{} {}", c.name(), self.get(c)))
            .collect();
        format!("{title}: {}", fields.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::stack::UnwindCounter;

    use super::*;

    #[test]
    fn comment_names_every_counter_in_order() {
        let mut values = vec![0; UnwindCounter::LEN as usize];
        values[UnwindCounter::Complete as usize] = 7;
        values[UnwindCounter::SignalFrames as usize] = 2;
        let counts = Counts::<UnwindCounter>::from_values(values);
        assert_eq!(counts.get(UnwindCounter::Complete), 7);
        let comment = counts.comment("user stack walks");
        assert!(
            comment.starts_with("user stack walks: stacks 0, complete 7, truncated_depth 0,"),
            "{comment}"
        );
        assert!(comment.contains(", signal_frames 2,"), "{comment}");
        assert!(comment.ends_with("file_changed 0"), "{comment}");
        assert_eq!(
            comment.matches(", ").count() + 1,
            UnwindCounter::NAMES.len()
        );
    }
}
