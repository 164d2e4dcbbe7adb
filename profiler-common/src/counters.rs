//! Counter sets: one pattern for every "counted and shown" value, from the
//! kernel to the report.
//!
//! A set is an enum declared with [`counter_set!`]: each variant is one
//! counter with its name in reports. The macro derives the number of
//! counters and the name table from the same list, so they cannot disagree.
//! The kernel keeps a set in a `PerCpuArray<u64>` of [`CounterSet::LEN`]
//! entries indexed by [`CounterSet::index`]; user space sums the CPUs.

/// A set of counters kept in one per-CPU array map.
pub trait CounterSet: Copy + 'static {
    /// Number of counters (the map's entries).
    const LEN: u32;
    /// The counters' names in reports, in index order.
    const NAMES: &'static [&'static str];
    /// Every counter, in index order.
    const ALL: &'static [Self];
    /// The counter's map index.
    fn index(self) -> u32;
    /// The counter's name in reports.
    fn name(self) -> &'static str {
        Self::NAMES[self.index() as usize]
    }
}

/// Declares a counter set: a `#[repr(u32)]` enum whose variants are numbered
/// from 0 in order, each with its report name.
///
/// ```
/// profiler_common::counter_set! {
///     /// Events of an example.
///     pub enum Example {
///         /// Things seen.
///         Seen = "seen",
///         /// Things lost.
///         Lost = "lost",
///     }
/// }
/// use profiler_common::counters::CounterSet as _;
/// assert_eq!(Example::LEN, 2);
/// assert_eq!(Example::Lost.name(), "lost");
/// ```
#[macro_export]
macro_rules! counter_set {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::counters::CounterSet for $name {
            const LEN: u32 = [$(stringify!($variant)),+].len() as u32;
            const NAMES: &'static [&'static str] = &[$($label),+];
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            #[inline(always)]
            fn index(self) -> u32 {
                self as u32
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::CounterSet;

    crate::counter_set! {
        /// A test set.
        pub enum Test {
            /// First.
            A = "a",
            /// Second.
            B = "b",
            /// Third.
            C = "c",
        }
    }

    #[test]
    fn names_and_indexes_agree() {
        assert_eq!(Test::LEN, 3);
        assert_eq!(Test::NAMES, &["a", "b", "c"]);
        for (i, c) in Test::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
            assert_eq!(c.name(), Test::NAMES[i]);
        }
    }
}
