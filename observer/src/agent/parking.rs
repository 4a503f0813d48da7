//! Events of a cgroup whose identity is still being read, held in order until it lands.
//!
//! The identity worker reads cgroupfs and `/proc` off the event loop; until it answers for a
//! new cgroup, that cgroup's events wait here, each cgroup in its own queue, while every
//! other cgroup's events go on to the core. Waiting is bounded by age (kernel time, against
//! the loop's horizon) and by count, per cgroup and in all: past a bound the cgroup's events
//! are given up on, handed to the core with the identity known so far, and counted.
use std::collections::VecDeque;

use super::FastMap;
use crate::record::BootNs;

/// Why a cgroup's events stopped waiting for its identity without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// Its oldest event waited longer than the age bound.
    Expired,
    /// Its queue, or all queues together, reached the count bound.
    Full,
}

#[derive(Clone, Copy, Debug)]
pub struct ParkingLimits {
    /// Kernel time an event may wait for its cgroup's identity.
    pub max_wait_ns: BootNs,
    pub per_cgroup: usize,
    pub total: usize,
}

/// Per-cgroup queues of events waiting for an identity, oldest first.
pub struct Parking<T> {
    queues: FastMap<u64, VecDeque<(BootNs, T)>>,
    total: usize,
    limits: ParkingLimits,
    /// Events that waited and were handed on with their identity.
    pub resolved: u64,
    /// Events handed on without their identity, past the age bound.
    pub expired: u64,
    /// Events handed on without their identity, past a count bound.
    pub overflowed: u64,
}

impl<T> Parking<T> {
    pub fn new(limits: ParkingLimits) -> Self {
        Parking {
            queues: FastMap::default(),
            total: 0,
            limits,
            resolved: 0,
            expired: 0,
            overflowed: 0,
        }
    }

    /// Whether events of `cgroup_id` are waiting: a later one must wait behind them.
    pub fn is_waiting(&self, cgroup_id: u64) -> bool {
        self.queues.contains_key(&cgroup_id)
    }

    /// Parks `item`. When a count bound is reached the cgroup is given up on: its queue,
    /// this item last, comes back in order, to be handled without waiting any longer.
    pub fn park(&mut self, cgroup_id: u64, at: BootNs, item: T) -> Option<Vec<T>> {
        let queue = self.queues.entry(cgroup_id).or_default();
        queue.push_back((at, item));
        self.total += 1;
        if queue.len() > self.limits.per_cgroup || self.total > self.limits.total {
            return self.give_up(cgroup_id, GaveUp::Full);
        }
        None
    }

    /// The identity of `cgroup_id` landed: its events, oldest first.
    pub fn resolved(&mut self, cgroup_id: u64) -> Vec<T> {
        let items = self.take(cgroup_id);
        self.resolved += items.len() as u64;
        items
    }

    /// Cgroups whose oldest event is older than the age bound at `horizon`, each with its
    /// events, oldest first: they stop waiting.
    pub fn expire(&mut self, horizon: BootNs) -> Vec<(u64, Vec<T>)> {
        let limit = horizon.saturating_sub(self.limits.max_wait_ns);
        let due: Vec<u64> = self
            .queues
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(at, _)| *at < limit))
            .map(|(id, _)| *id)
            .collect();
        due.into_iter()
            .filter_map(|id| Some((id, self.give_up(id, GaveUp::Expired)?)))
            .collect()
    }

    /// Everything still waiting (shutdown), per cgroup, each queue oldest first.
    pub fn drain(&mut self) -> Vec<(u64, Vec<T>)> {
        let ids: Vec<u64> = self.queues.keys().copied().collect();
        ids.into_iter()
            .map(|id| {
                let items = self.take(id);
                (id, items)
            })
            .collect()
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn give_up(&mut self, cgroup_id: u64, why: GaveUp) -> Option<Vec<T>> {
        let items = self.take(cgroup_id);
        let counter = match why {
            GaveUp::Expired => &mut self.expired,
            GaveUp::Full => &mut self.overflowed,
        };
        *counter += items.len() as u64;
        (!items.is_empty()).then_some(items)
    }

    fn take(&mut self, cgroup_id: u64) -> Vec<T> {
        let items: Vec<T> = self
            .queues
            .remove(&cgroup_id)
            .map(|q| q.into_iter().map(|(_, item)| item).collect())
            .unwrap_or_default();
        self.total -= items.len();
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ParkingLimits = ParkingLimits {
        max_wait_ns: 1_000,
        per_cgroup: 3,
        total: 5,
    };

    #[test]
    fn a_cgroups_events_wait_in_order_and_leave_together_when_its_identity_lands() {
        let mut parking = Parking::new(LIMITS);
        assert!(!parking.is_waiting(7));
        assert_eq!(parking.park(7, 10, "query"), None);
        assert_eq!(parking.park(8, 11, "other"), None);
        assert_eq!(parking.park(7, 12, "answer"), None);
        assert!(parking.is_waiting(7));
        assert_eq!(parking.resolved(7), vec!["query", "answer"]);
        assert!(!parking.is_waiting(7));
        assert!(parking.is_waiting(8), "another cgroup's wait is its own");
        assert_eq!(parking.len(), 1);
        assert_eq!(parking.resolved, 2);
    }

    #[test]
    fn past_the_age_bound_only_the_late_cgroup_stops_waiting_and_is_counted() {
        let mut parking = Parking::new(LIMITS);
        parking.park(7, 100, "old");
        parking.park(7, 1_500, "newer");
        parking.park(8, 1_200, "young");
        assert!(parking.expire(1_100).is_empty(), "nothing waited 1000 yet");
        assert_eq!(parking.expire(1_101), vec![(7, vec!["old", "newer"])]);
        assert_eq!(parking.expired, 2);
        assert!(parking.is_waiting(8));
        assert_eq!(parking.len(), 1);
    }

    #[test]
    fn a_full_queue_gives_the_cgroup_up_with_its_events_in_order() {
        let mut parking = Parking::new(LIMITS);
        for (at, item) in [(1, 1), (2, 2), (3, 3)] {
            assert_eq!(parking.park(7, at, item), None);
        }
        assert_eq!(parking.park(7, 4, 4), Some(vec![1, 2, 3, 4]));
        assert_eq!(parking.overflowed, 4);
        assert!(parking.is_empty());
        // All queues together: the cgroup that passes the total is given up on.
        for at in 0..3 {
            parking.park(1, at, 10 + at);
        }
        parking.park(2, 0, 20);
        parking.park(2, 1, 21);
        assert_eq!(parking.park(2, 2, 22), Some(vec![20, 21, 22]));
        assert!(parking.is_waiting(1));
        assert_eq!(parking.len(), 3);
    }

    #[test]
    fn shutdown_drains_every_queue() {
        let mut parking = Parking::new(LIMITS);
        parking.park(7, 1, "a");
        parking.park(8, 2, "b");
        parking.park(7, 3, "c");
        let mut drained = parking.drain();
        drained.sort();
        assert_eq!(drained, vec![(7, vec!["a", "c"]), (8, vec!["b"])]);
        assert!(parking.is_empty());
    }
}
