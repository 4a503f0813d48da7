//! Time in the core: one wakeup per scope, booked at the scope's earliest deadline (its
//! oldest pending query, its next chain expiry, or its idle check), and `tick`, which
//! visits only the scopes that are due and then the open connects past their timeout.
//! The per-scope queues are cleaned lazily: an entry is checked against the live state
//! when it comes due, and each queue is compacted when dead entries outnumber live ones.
use std::{cmp::Reverse, collections::BTreeSet};

use super::{
    Correlator, UnansweredQuery,
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
                while let Some((deadline, pk)) = scope.pending_order.front().copied() {
                    if deadline > now {
                        break;
                    }
                    scope.pending_order.pop_front();
                    if scope
                        .pending
                        .get(&pk)
                        .is_some_and(|p| p.deadline == deadline)
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
        while let Some((deadline, id)) = self.connect_order.front().copied() {
            if deadline > now {
                break;
            }
            self.connect_order.pop_front();
            if self
                .connects
                .get(&id)
                .is_some_and(|c| c.deadline == deadline)
            {
                let c = self.connects.remove(&id).expect("checked");
                self.release_connect_slot(c.scope);
                self.counters.connects_expired += 1;
            }
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
    let mut next = scope.pending_order.front().map(|(d, _)| *d);
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
