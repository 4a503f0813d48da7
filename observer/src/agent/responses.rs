//! DNS responses counted per cgroup, response code and server between two publications of
//! the metrics. Every pod-side response is counted, and under a DNS flood building the
//! metrics' labels (the workload's label set, label strings hashed and compared) for each
//! one was a sixth of the agent's instructions: here a response costs one lookup of a few
//! integers, and the labels are built once per cgroup, code and server kind at each tick.
use std::sync::Arc;

use super::FastMap;
use crate::{dns::Rcode, identity::WorkloadIdentity};

/// Responses seen since the last publication, under the identity they were seen with.
#[derive(Default)]
pub struct ResponseTally {
    pending: FastMap<(u64, Rcode, bool), Pending>,
}

/// Responses of one cgroup with one code, from servers inside the cluster networks or
/// outside them.
pub struct Pending {
    pub who: Arc<WorkloadIdentity>,
    pub rcode: Rcode,
    /// From a DNS server outside the cluster networks.
    pub outside: bool,
    pub count: u64,
}

impl ResponseTally {
    /// Counts one response seen by `who`. If the cgroup's identity changed since its
    /// responses were last published (its pod's metadata arrived, say), the responses
    /// counted under the old identity are handed back to be published under it, so each
    /// response keeps the labels it was seen with.
    pub fn count(
        &mut self,
        who: &Arc<WorkloadIdentity>,
        rcode: Rcode,
        outside: bool,
    ) -> Option<Pending> {
        let fresh = || Pending {
            who: who.clone(),
            rcode,
            outside,
            count: 1,
        };
        let key = (who.cgroup_id, rcode, outside);
        let Some(pending) = self.pending.get_mut(&key) else {
            self.pending.insert(key, fresh());
            return None;
        };
        // The snapshot hands out the same `Arc` while the identity stands; an identity
        // built anew for each event (a cgroup never resolved) compares equal by value.
        if Arc::ptr_eq(&pending.who, who) || pending.who == *who {
            pending.count += 1;
            return None;
        }
        Some(std::mem::replace(pending, fresh()))
    }

    /// Everything counted since the last call; the map keeps its room for the next tick.
    pub fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.pending.drain().map(|(_, pending)| pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::ScopeKey;

    fn identity(cgroup_id: u64, uid: &str) -> Arc<WorkloadIdentity> {
        Arc::new(WorkloadIdentity {
            scope: ScopeKey::Pod(Arc::from(uid)),
            ..WorkloadIdentity::unknown(cgroup_id)
        })
    }

    fn drained(tally: &mut ResponseTally) -> Vec<(u64, u16, bool, u64)> {
        let mut counts: Vec<_> = tally
            .drain()
            .map(|p| (p.who.cgroup_id, p.rcode.0, p.outside, p.count))
            .collect();
        counts.sort();
        counts
    }

    #[test]
    fn counts_per_cgroup_code_and_server_kind_until_drained() {
        let mut tally = ResponseTally::default();
        let (web, api) = (identity(7, "web"), identity(8, "api"));
        for _ in 0..3 {
            assert!(tally.count(&web, Rcode::NXDOMAIN, false).is_none());
        }
        assert!(tally.count(&web, Rcode::NOERROR, false).is_none());
        assert!(tally.count(&web, Rcode::NOERROR, true).is_none());
        assert!(tally.count(&web, Rcode::NOERROR, true).is_none());
        assert!(tally.count(&api, Rcode::NOERROR, false).is_none());
        assert_eq!(
            drained(&mut tally),
            [
                (7, 0, false, 1),
                (7, 0, true, 2),
                (7, 3, false, 3),
                (8, 0, false, 1)
            ]
        );
        assert_eq!(drained(&mut tally), [], "a drain starts the count anew");
    }

    #[test]
    fn an_identity_rebuilt_equal_keeps_counting() {
        let mut tally = ResponseTally::default();
        let unknown = || Arc::new(WorkloadIdentity::unknown(9));
        assert!(tally.count(&unknown(), Rcode::NOERROR, false).is_none());
        assert!(tally.count(&unknown(), Rcode::NOERROR, false).is_none());
        assert_eq!(drained(&mut tally), [(9, 0, false, 2)]);
    }

    #[test]
    fn a_changed_identity_hands_back_what_was_counted_under_the_old_one() {
        let mut tally = ResponseTally::default();
        let before = identity(7, "web");
        let after = Arc::new(WorkloadIdentity {
            container_name: Some(Arc::from("app")),
            ..(*before).clone()
        });
        tally.count(&before, Rcode::NOERROR, false);
        tally.count(&before, Rcode::NOERROR, false);
        let handed_back = tally
            .count(&after, Rcode::NOERROR, false)
            .expect("the old identity's responses");
        assert!(Arc::ptr_eq(&handed_back.who, &before));
        assert_eq!(handed_back.count, 2);
        let left: Vec<_> = tally.drain().collect();
        assert_eq!(left.len(), 1);
        assert!(Arc::ptr_eq(&left[0].who, &after));
        assert_eq!(left[0].count, 1);
    }
}
