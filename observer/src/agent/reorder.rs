//! Puts events from the two kernel rings back in kernel-time order.
//!
//! The DNS ring and the connect ring are drained separately, so a connect can reach the
//! agent before the DNS answer that named its destination. The core joins a connect to
//! the answers it has seen at that moment, so events wait here until both ring readers
//! have delivered everything older (their progress horizon) and leave in timestamp order.
use std::{cmp::Ordering, collections::BinaryHeap};

use crate::record::BootNs;

/// Holds items until a horizon passes them, then releases them oldest first.
///
/// The heap orders small keys; the items (events of a hundred and more bytes) stay put in
/// slots, so that sifting the heap moves 24 bytes a level instead of a whole event: moving
/// events through the heap was a tenth of the agent's CPU under a DNS flood.
pub struct Reorder<T> {
    heap: BinaryHeap<Key>,
    slots: Vec<Option<T>>,
    /// Slots emptied by a release, reused first.
    free: Vec<u32>,
    capacity: usize,
    next_seq: u64,
    /// Items released early because the buffer was full.
    pub forced: u64,
}

struct Key {
    at: BootNs,
    seq: u64,
    slot: u32,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    // Reversed: BinaryHeap is a max-heap and the oldest must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Reorder<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            capacity: capacity.max(1),
            next_seq: 0,
            forced: 0,
        }
    }

    /// Adds an item; when the buffer is full the oldest item is released at once.
    pub fn push(&mut self, at: BootNs, item: T, out: &mut Vec<T>) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(item);
                slot
            }
            None => {
                // At most `capacity + 1` items are ever held: the index fits.
                let slot = self.slots.len() as u32;
                self.slots.push(Some(item));
                slot
            }
        };
        self.heap.push(Key {
            at,
            seq: self.next_seq,
            slot,
        });
        self.next_seq += 1;
        while self.heap.len() > self.capacity {
            if let Some(item) = self.pop() {
                self.forced += 1;
                out.push(item);
            }
        }
    }

    /// The oldest item, its slot freed.
    fn pop(&mut self) -> Option<T> {
        let key = self.heap.pop()?;
        self.free.push(key.slot);
        self.slots[key.slot as usize].take()
    }

    /// Releases every item stamped at or before `horizon`, oldest first.
    pub fn release(&mut self, horizon: BootNs, out: &mut Vec<T>) {
        while self.heap.peek().is_some_and(|k| k.at <= horizon) {
            if let Some(item) = self.pop() {
                out.push(item);
            }
        }
    }

    /// Releases everything, oldest first (shutdown).
    pub fn drain(&mut self, out: &mut Vec<T>) {
        while let Some(item) = self.pop() {
            out.push(item);
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

    #[test]
    fn slots_are_reused_once_released() {
        let mut r = Reorder::new(1024);
        let mut out = Vec::new();
        for round in 0..100u64 {
            for i in 0..10 {
                r.push(round * 10 + i, round * 10 + i, &mut out);
            }
            r.release(round * 10 + 9, &mut out);
        }
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
        assert!(
            r.slots.len() <= 10,
            "{} slots for 10 held at once",
            r.slots.len()
        );
    }
}
