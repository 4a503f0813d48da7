//! Puts events from the two kernel rings back in kernel-time order.
//!
//! The DNS ring and the connect ring are drained separately, so a connect can reach the
//! agent before the DNS answer that named its destination. The core joins a connect to
//! the answers it has seen at that moment, so events wait here until both ring readers
//! have delivered everything older (their progress horizon) and leave in timestamp order.
use std::{
    cmp::Ordering,
    collections::{BinaryHeap, VecDeque},
};

use crate::record::BootNs;

/// Holds items until a horizon passes them, then releases them oldest first.
///
/// Each ring delivers its events nearly in time order (only CPUs racing to reserve a
/// record, and opens read late from their slots, break it), so each source is a queue
/// kept in order by appending, and releasing merges the queues' fronts: a constant cost
/// per event. An item older than its queue's last one is a straggler and waits in a
/// heap of its own, merged with the queues. A single heap of every event (the way before)
/// was the agent's largest single cost under a DNS flood.
pub struct Reorder<T, const LANES: usize> {
    lanes: [VecDeque<Held<T>>; LANES],
    stragglers: BinaryHeap<Held<T>>,
    held: usize,
    capacity: usize,
    next_seq: u64,
    /// Items released early because the buffer was full.
    pub forced: u64,
}

struct Held<T> {
    at: BootNs,
    /// Arrival order, which breaks ties between equal timestamps.
    seq: u64,
    item: T,
}

impl<T> Held<T> {
    fn key(&self) -> (BootNs, u64) {
        (self.at, self.seq)
    }
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    // Reversed: BinaryHeap is a max-heap and the oldest must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

/// Where the oldest held item is.
#[derive(Clone, Copy)]
enum Oldest {
    Lane(usize),
    Straggler,
}

impl<T, const LANES: usize> Reorder<T, LANES> {
    pub fn new(capacity: usize) -> Self {
        Self {
            lanes: std::array::from_fn(|_| VecDeque::new()),
            stragglers: BinaryHeap::new(),
            held: 0,
            capacity: capacity.max(1),
            next_seq: 0,
            forced: 0,
        }
    }

    /// Adds an item from source `lane` (`< LANES`); when the buffer is full the oldest item
    /// is released at once.
    pub fn push(&mut self, lane: usize, at: BootNs, item: T, out: &mut Vec<T>) {
        let held = Held {
            at,
            seq: self.next_seq,
            item,
        };
        self.next_seq += 1;
        let queue = &mut self.lanes[lane];
        if queue.back().is_none_or(|last| last.at <= at) {
            queue.push_back(held);
        } else {
            self.stragglers.push(held);
        }
        self.held += 1;
        while self.held > self.capacity {
            if let Some(item) = self.pop_oldest() {
                self.forced += 1;
                out.push(item);
            }
        }
    }

    /// The oldest held item's place and time.
    fn oldest(&self) -> Option<(Oldest, BootNs)> {
        let mut best: Option<(Oldest, (BootNs, u64))> =
            self.stragglers.peek().map(|h| (Oldest::Straggler, h.key()));
        for (lane, queue) in self.lanes.iter().enumerate() {
            if let Some(front) = queue.front()
                && best.is_none_or(|(_, key)| front.key() < key)
            {
                best = Some((Oldest::Lane(lane), front.key()));
            }
        }
        best.map(|(place, (at, _))| (place, at))
    }

    fn take(&mut self, place: Oldest) -> Option<T> {
        let held = match place {
            Oldest::Lane(lane) => self.lanes[lane].pop_front(),
            Oldest::Straggler => self.stragglers.pop(),
        }?;
        self.held -= 1;
        Some(held.item)
    }

    fn pop_oldest(&mut self) -> Option<T> {
        let (place, _) = self.oldest()?;
        self.take(place)
    }

    /// Releases every item stamped at or before `horizon`, oldest first.
    pub fn release(&mut self, horizon: BootNs, out: &mut Vec<T>) {
        while let Some((place, at)) = self.oldest() {
            if at > horizon {
                break;
            }
            if let Some(item) = self.take(place) {
                out.push(item);
            }
        }
    }

    /// Releases everything, oldest first (shutdown).
    pub fn drain(&mut self, out: &mut Vec<T>) {
        while let Some(item) = self.pop_oldest() {
            out.push(item);
        }
    }

    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTS: usize = 0;
    const DNS: usize = 1;

    #[test]
    fn a_late_answer_overtakes_the_connect_it_named() {
        let mut r = Reorder::<_, 2>::new(1024);
        let mut out = Vec::new();
        r.push(CONNECTS, 1_000, "connect", &mut out);
        r.release(900, &mut out);
        assert!(out.is_empty(), "the horizon has not passed anything yet");
        r.push(DNS, 990, "dns answer", &mut out);
        r.push(CONNECTS, 1_200, "later", &mut out);
        r.release(1_100, &mut out);
        assert_eq!(out, vec!["dns answer", "connect"]);
        r.release(1_300, &mut out);
        assert_eq!(out, vec!["dns answer", "connect", "later"]);
        assert!(r.is_empty());
    }

    #[test]
    fn equal_timestamps_keep_arrival_order_across_sources() {
        let mut r = Reorder::<_, 2>::new(1024);
        let mut out = Vec::new();
        for i in 0..6 {
            r.push(i % 2, 7, i, &mut out);
        }
        r.release(7, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_item_older_than_its_sources_last_still_leaves_in_order() {
        // Two CPUs racing for the ring, or an open read late from its slot.
        let mut r = Reorder::<_, 2>::new(1024);
        let mut out = Vec::new();
        for at in [10, 30, 20, 40, 5] {
            r.push(CONNECTS, at, at, &mut out);
        }
        r.push(DNS, 25, 25, &mut out);
        r.release(30, &mut out);
        assert_eq!(out, vec![5, 10, 20, 25, 30]);
        r.drain(&mut out);
        assert_eq!(out, vec![5, 10, 20, 25, 30, 40]);
    }

    #[test]
    fn a_full_buffer_releases_the_oldest_and_counts_it() {
        let mut r = Reorder::<_, 1>::new(3);
        let mut out = Vec::new();
        for at in [5, 1, 4, 2, 3] {
            r.push(0, at, at, &mut out);
        }
        assert_eq!(out, vec![1, 2]);
        assert_eq!(r.forced, 2);
        assert_eq!(r.len(), 3);
        r.drain(&mut out);
        assert_eq!(out, vec![1, 2, 3, 4, 5]);
    }

    /// Nearly sorted sources with stragglers, released at random horizons: what leaves is
    /// what a stable sort by time of everything pushed would give, and nothing is held past
    /// its horizon.
    #[test]
    fn release_order_is_a_stable_sort_by_time() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut r = Reorder::<_, 2>::new(usize::MAX);
        let mut out = Vec::new();
        let mut pushed: Vec<(BootNs, usize)> = Vec::new();
        let mut clock = [1_000u64; 2];
        let mut horizon = 0;
        for i in 0..20_000 {
            let lane = (next() % 2) as usize;
            clock[lane] += next() % 50;
            // One in eight comes late: a little, or a long way (an open read from its slot).
            let at = match next() % 16 {
                0 => clock[lane].saturating_sub(next() % 40),
                1 => clock[lane].saturating_sub(next() % 5_000),
                _ => clock[lane],
            }
            .max(horizon + 1);
            pushed.push((at, i));
            r.push(lane, at, (at, i), &mut out);
            if next() % 64 == 0 {
                horizon = clock[0]
                    .min(clock[1])
                    .saturating_sub(next() % 3_000)
                    .max(horizon);
                r.release(horizon, &mut out);
                assert!(out.iter().all(|&(at, _)| at <= horizon));
            }
        }
        r.drain(&mut out);
        pushed.sort_by_key(|&(at, _)| at);
        assert_eq!(out, pushed);
        assert!(r.is_empty());
    }
}
