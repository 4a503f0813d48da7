//! Puts events from the two kernel rings back in kernel-time order.
//!
//! The DNS ring and the connect ring are drained separately, so a connect can reach the
//! agent before the DNS answer that named its destination. The core joins a connect to
//! the answers it has seen at that moment, so events wait here until both ring readers
//! have delivered everything older (their progress horizon) and leave in timestamp order.
use std::{cmp::Ordering, collections::BinaryHeap};

use crate::record::BootNs;

/// Holds items until a horizon passes them, then releases them oldest first.
pub struct Reorder<T> {
    heap: BinaryHeap<Entry<T>>,
    capacity: usize,
    next_seq: u64,
    /// Items released early because the buffer was full.
    pub forced: u64,
}

struct Entry<T> {
    at: BootNs,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and the oldest must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Reorder<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            heap: BinaryHeap::new(),
            capacity: capacity.max(1),
            next_seq: 0,
            forced: 0,
        }
    }

    /// Adds an item; when the buffer is full the oldest item is released at once.
    pub fn push(&mut self, at: BootNs, item: T, out: &mut Vec<T>) {
        self.heap.push(Entry {
            at,
            seq: self.next_seq,
            item,
        });
        self.next_seq += 1;
        while self.heap.len() > self.capacity {
            if let Some(entry) = self.heap.pop() {
                self.forced += 1;
                out.push(entry.item);
            }
        }
    }

    /// Releases every item stamped at or before `horizon`, oldest first.
    pub fn release(&mut self, horizon: BootNs, out: &mut Vec<T>) {
        while self.heap.peek().is_some_and(|e| e.at <= horizon) {
            if let Some(entry) = self.heap.pop() {
                out.push(entry.item);
            }
        }
    }

    /// Releases everything, oldest first (shutdown).
    pub fn drain(&mut self, out: &mut Vec<T>) {
        while let Some(entry) = self.heap.pop() {
            out.push(entry.item);
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_answer_overtakes_the_connect_it_named() {
        let mut r = Reorder::new(1024);
        let mut out = Vec::new();
        r.push(1_000, "connect", &mut out);
        r.release(900, &mut out);
        assert!(out.is_empty(), "the horizon has not passed anything yet");
        r.push(990, "dns answer", &mut out);
        r.push(1_200, "later", &mut out);
        r.release(1_100, &mut out);
        assert_eq!(out, vec!["dns answer", "connect"]);
        r.release(1_300, &mut out);
        assert_eq!(out, vec!["dns answer", "connect", "later"]);
        assert!(r.is_empty());
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut r = Reorder::new(1024);
        let mut out = Vec::new();
        for i in 0..5 {
            r.push(7, i, &mut out);
        }
        r.release(7, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_full_buffer_releases_the_oldest_and_counts_it() {
        let mut r = Reorder::new(3);
        let mut out = Vec::new();
        for at in [5, 1, 4, 2, 3] {
            r.push(at, at, &mut out);
        }
        assert_eq!(out, vec![1, 2]);
        assert_eq!(r.forced, 2);
        assert_eq!(r.len(), 3);
        r.drain(&mut out);
        assert_eq!(out, vec![1, 2, 3, 4, 5]);
    }
}
