//! Time in the core: one wakeup per scope, booked at the scope's earliest deadline (its
//! oldest pending query, its next chain expiry, or its idle check), and `tick`, which
//! visits only the scopes that are due and then the open connects past their timeout.
//! Entries leave their queues lazily: a queued deadline is checked against the map that owns
//! the entry when it comes due, and a queue is compacted when dead entries pile up. Pending
//! queries and open connects expire through one [`DeadlineQueue`] each; chains through a
//! heap per scope (`Scope::chain_expiry`), because a chain's free time moves later as it is
//! used, which a queue in push order cannot follow.
use std::{
    cmp::Reverse,
    collections::{BTreeSet, VecDeque},
};

use super::{
    Correlator, UnansweredQuery, is_open,
    pending::is_pending,
    scope::{Scope, free_chain},
};
use crate::{dns, record::BootNs};

impl Correlator {
    /// Advances time: returns the queries that timed out unanswered, expires answers,
    /// chains, connects without outcome and idle scopes. Cost is proportional to what
    /// expires (plus one visit per scope with a due deadline).
    pub fn tick(&mut self, now: BootNs) -> Vec<UnansweredQuery> {
        let unanswered = self.tick_step(now);
        self.after_step();
        unanswered
    }

    fn tick_step(&mut self, now: BootNs) -> Vec<UnansweredQuery> {
        let mut unanswered = Vec::new();
        while let Some((due, _)) = self.wakeups.first() {
            if *due > now {
                break;
            }
            let (_, id) = self.wakeups.pop_first().expect("first exists");
            let remove = {
                let Some(scope) = self.scopes.get_mut(id) else {
                    continue;
                };
                scope.scheduled = None;
                while let Some((_, pk)) = scope
                    .pending_order
                    .pop_due(now, |k, d| is_pending(&scope.pending, k, d))
                {
                    let p = scope.pending.remove(&pk).expect("checked");
                    self.pending_total -= 1;
                    self.counters.queries_unanswered += 1;
                    let asked = scope
                        .slots
                        .get(p.slot as usize)
                        .filter(|s| s.generation == p.generation)
                        .and_then(|s| s.chain.as_ref())
                        .map(|c| c.query_name().into_owned());
                    unanswered.push(UnansweredQuery {
                        scope: scope.key.clone(),
                        name: p.name.to_string(),
                        qtype: dns::QType(p.qtype).mnemonic().into_owned(),
                        query_name: asked,
                        client: pk.client,
                        server: pk.server,
                        sent_at: p.sent_at,
                        expired_at: now,
                    });
                }
                while let Some(Reverse((free_at, slot, generation))) =
                    scope.chain_expiry.peek().copied()
                {
                    if free_at > now {
                        break;
                    }
                    scope.chain_expiry.pop();
                    let Some(chain) = scope.slots[slot as usize]
                        .chain
                        .as_ref()
                        .filter(|_| scope.slots[slot as usize].generation == generation)
                    else {
                        continue;
                    };
                    if chain.free_at > now {
                        scope
                            .chain_expiry
                            .push(Reverse((chain.free_at, slot, generation)));
                        continue;
                    }
                    let answers = free_chain(scope, slot);
                    self.answers_total -= answers;
                    self.counters.chains_expired += 1;
                    self.counters.answers_expired += answers as u64;
                }
                let idle = scope.pending.is_empty()
                    && scope.live_chains == 0
                    && scope.open_connects == 0
                    && !scope.pinned;
                idle && now.saturating_sub(scope.last_activity) >= self.config.scope_idle_ns
            };
            if remove {
                self.scopes.remove(id);
                self.counters.scopes_idle_evicted += 1;
            } else {
                self.reschedule_after(id, now);
            }
        }
        while let Some((_, id)) = self
            .connect_order
            .pop_due(now, |id, d| is_open(&self.connects, id, d))
        {
            let c = self.connects.remove(&id).expect("checked");
            self.release_connect_slot(c.scope);
            self.counters.connects_expired += 1;
        }
        unanswered
    }

    /// As `schedule`, from within `tick(now)`: everything due by `now` was handled, so
    /// only the idle check can be due; a scope kept alive (open connects) is looked at
    /// again one idle period later rather than on every tick.
    fn reschedule_after(&mut self, id: u32, now: BootNs) {
        if let Some(scope) = self.scopes.get_mut(id) {
            schedule(&mut self.wakeups, id, scope, now, self.config.scope_idle_ns);
        }
    }
}

/// Makes sure `tick` visits the scope no later than its earliest deadline (`now` as in
/// [`Correlator::reschedule_after`], 0 outside `tick`).
pub(super) fn schedule(
    wakeups: &mut BTreeSet<(BootNs, u32)>,
    id: u32,
    scope: &mut Scope,
    now: BootNs,
    scope_idle: BootNs,
) {
    let mut next = scope.pending_order.first_deadline();
    if let Some(Reverse((d, _, _))) = scope.chain_expiry.peek() {
        next = Some(next.map_or(*d, |n| n.min(*d)));
    }
    let idle_at = scope.last_activity + scope_idle;
    let mut next = next.unwrap_or(idle_at);
    if next <= now {
        next = now + scope_idle;
    }
    match scope.scheduled {
        // A later wakeup than the one booked is found when the booked one fires.
        Some(booked) if booked <= next => {}
        booked => {
            if let Some(b) = booked {
                wakeups.remove(&(b, id));
            }
            wakeups.insert((next, id));
            scope.scheduled = Some(next);
        }
    }
}

/// Entries in deadline order (pushed with deadlines that never decrease), removed lazily:
/// the map that owns an entry is the truth, and a queued `(deadline, key)` counts only while
/// `is_live` says the map still holds that key with that deadline. The pending queries of a
/// scope and the open connects each expire through one.
pub(super) struct DeadlineQueue<K> {
    entries: VecDeque<(BootNs, K)>,
}

impl<K: Copy + PartialEq> DeadlineQueue<K> {
    pub(super) fn new() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains(&self, deadline: BootNs, key: K) -> bool {
        self.entries.contains(&(deadline, key))
    }

    /// The earliest deadline queued (perhaps of a dead entry: waking early is harmless).
    pub(super) fn first_deadline(&self) -> Option<BootNs> {
        self.entries.front().map(|(d, _)| *d)
    }

    /// Queues an entry; past `compact_over` entries, the dead ones are dropped, so that the
    /// queue stays proportional to what is live.
    pub(super) fn push(
        &mut self,
        deadline: BootNs,
        key: K,
        compact_over: usize,
        is_live: impl Fn(&K, BootNs) -> bool,
    ) {
        self.entries.push_back((deadline, key));
        if self.entries.len() > compact_over {
            self.entries.retain(|(d, k)| is_live(k, *d));
        }
    }

    /// The next live entry due by `now`, dead ones on the way dropped.
    pub(super) fn pop_due(
        &mut self,
        now: BootNs,
        is_live: impl Fn(&K, BootNs) -> bool,
    ) -> Option<(BootNs, K)> {
        while let Some((deadline, key)) = self.entries.front().copied() {
            if deadline > now {
                return None;
            }
            self.entries.pop_front();
            if is_live(&key, deadline) {
                return Some((deadline, key));
            }
        }
        None
    }

    /// The oldest live entry, whatever its deadline: the one a cap evicts.
    pub(super) fn pop_oldest(&mut self, is_live: impl Fn(&K, BootNs) -> bool) -> Option<K> {
        self.pop_due(BootNs::MAX, is_live).map(|(_, key)| key)
    }

    /// Drops the entries at the front that are dead now rather than when they come due:
    /// first `(deadline, key)`, an entry just removed from its map, with no lookup, then
    /// any that an earlier removal left behind it (answered out of order).
    pub(super) fn drop_dead_front(
        &mut self,
        removed: (BootNs, K),
        is_live: impl Fn(&K, BootNs) -> bool,
    ) {
        if self.entries.front() == Some(&removed) {
            self.entries.pop_front();
        }
        while let Some((deadline, key)) = self.entries.front() {
            if is_live(key, *deadline) {
                break;
            }
            self.entries.pop_front();
        }
    }
}
