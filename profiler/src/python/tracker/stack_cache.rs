//! The Python stacks read from the kernel's map, kept by id so that each is
//! read once, with a bound: a long run meets ever new stacks (and processes
//! that exit), and the cache must not grow with them.
//!
//! Two generations: the stacks used since the last [`StackCache::rotate`]
//! (once per interval) and those used in the interval before. A rotation
//! evicts the older generation: what no sample asked for during a whole
//! interval. A stack used in an interval is kept into the next, so that a
//! sample counted after its id was read, and drained after the kernel's
//! copy was deleted, still finds it. Past its capacity,
//! the older generation goes first, then the current one; a stack asked
//! for after its eviction is read from the kernel's map again when the
//! walker stored it anew, else counted as lost. Every eviction is counted.
use std::collections::HashMap;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct StackCache<V> {
    current: HashMap<u64, V>,
    previous: HashMap<u64, V>,
    capacity: usize,
    /// Stacks evicted so far.
    pub(crate) evicted: u64,
}

impl<V: Clone> StackCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Stacks kept now.
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// The stack `id`, marked used in this interval.
    pub(crate) fn get(&mut self, id: u64) -> Option<V> {
        if let Some(v) = self.current.get(&id) {
            return Some(v.clone());
        }
        let v = self.previous.remove(&id)?;
        self.current.insert(id, v.clone());
        Some(v)
    }

    /// Keeps stack `id`, making room first when the cache is full.
    pub(crate) fn insert(&mut self, id: u64, v: V) {
        if self.len() >= self.capacity && !self.current.contains_key(&id) {
            if self.previous.is_empty() {
                self.evicted += self.current.len() as u64;
                self.current.clear();
            } else {
                self.evicted += self.previous.len() as u64;
                self.previous.clear();
                if self.current.len() >= self.capacity {
                    self.evicted += self.current.len() as u64;
                    self.current.clear();
                }
            }
        }
        self.current.insert(id, v);
    }

    /// An interval ended: the stacks not used in the one before are evicted.
    pub(crate) fn rotate(&mut self) {
        self.evicted += self.previous.len() as u64;
        self.previous = std::mem::take(&mut self.current);
    }
}

#[cfg(test)]
mod tests {
    use super::StackCache;

    #[test]
    fn stacks_unused_for_a_whole_interval_are_evicted_and_counted() {
        let mut cache = StackCache::new(100);
        cache.insert(1, "a");
        cache.insert(2, "b");
        cache.rotate();
        // Used in the second interval: kept into the third.
        assert_eq!(cache.get(1), Some("a"));
        cache.rotate();
        assert_eq!(cache.evicted, 1, "2 was not used in the second interval");
        assert_eq!(cache.get(2), None);
        assert_eq!(cache.get(1), Some("a"));
        cache.rotate();
        cache.rotate();
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.evicted, 2);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let mut cache = StackCache::new(64);
        for id in 0..10_000u64 {
            cache.insert(id, id);
            assert!(cache.len() <= cache.capacity, "at {id}");
            if id % 100 == 99 {
                cache.rotate();
            }
        }
        // Everything inserted is either kept or counted as evicted.
        assert_eq!(cache.len() as u64 + cache.evicted, 10_000);
        // The newest stack is always there.
        assert_eq!(cache.get(9_999), Some(9_999));
    }

    #[test]
    fn inserting_a_kept_stack_again_evicts_nothing() {
        let mut cache = StackCache::new(2);
        cache.insert(1, 1);
        cache.insert(2, 2);
        cache.insert(2, 2);
        assert_eq!((cache.len(), cache.evicted), (2, 0));
    }
}
