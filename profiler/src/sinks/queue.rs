//! A FIFO bounded by the total size of its items: pushing past the bound
//! drops the oldest items (the newest data is the most useful to a backend
//! that comes back).
use std::collections::VecDeque;

pub(crate) struct ByteQueue<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    capacity: usize,
}

/// What a push removed to make room.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub items: u64,
    pub bytes: u64,
}

impl<T> ByteQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    /// Appends `item` of `size` bytes, dropping the oldest items until it
    /// fits. An item larger than the whole capacity is itself dropped.
    pub(crate) fn push(&mut self, item: T, size: usize) -> Dropped {
        let mut dropped = Dropped::default();
        if size > self.capacity {
            dropped.items = 1;
            dropped.bytes = size as u64;
            return dropped;
        }
        while self.bytes + size > self.capacity {
            let Some((_, old)) = self.items.pop_front() else {
                break;
            };
            self.bytes -= old;
            dropped.items += 1;
            dropped.bytes += old as u64;
        }
        self.items.push_back((item, size));
        self.bytes += size;
        dropped
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        let (item, size) = self.items.pop_front()?;
        self.bytes -= size;
        Some(item)
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_counts_bytes() {
        let mut q = ByteQueue::new(100);
        assert_eq!(q.push('a', 30), Dropped::default());
        assert_eq!(q.push('b', 30), Dropped::default());
        assert_eq!((q.len(), q.bytes()), (2, 60));
        assert_eq!(q.pop(), Some('a'));
        assert_eq!((q.len(), q.bytes()), (1, 30));
        assert_eq!(q.pop(), Some('b'));
        assert_eq!(q.pop(), None);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn full_queue_drops_the_oldest_until_the_new_item_fits() {
        let mut q = ByteQueue::new(100);
        for (c, size) in [('a', 40), ('b', 40), ('c', 20)] {
            q.push(c, size);
        }
        // 100 + 50 > 100: 'a' (40) goes, then 60 + 50 > 100: 'b' goes too.
        assert_eq!(
            q.push('d', 50),
            Dropped {
                items: 2,
                bytes: 80
            }
        );
        assert_eq!((q.len(), q.bytes()), (2, 70));
        assert_eq!(q.pop(), Some('c'));
        assert_eq!(q.pop(), Some('d'));
    }

    #[test]
    fn an_item_larger_than_the_capacity_is_dropped_alone() {
        let mut q = ByteQueue::new(100);
        q.push('a', 10);
        assert_eq!(
            q.push('b', 101),
            Dropped {
                items: 1,
                bytes: 101
            }
        );
        assert_eq!(q.pop(), Some('a'));
        assert_eq!(q.pop(), None);
    }
}
