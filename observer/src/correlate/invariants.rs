//! What must hold between the core's structures after every event, checked in one place.
//!
//! The core keeps running totals and lazily cleaned queues by hand for speed; this module
//! says what they must agree with. The unit tests check it after every call (see
//! [`Correlator::after_step`]), the stateful fuzz target after every step of arbitrary
//! sequences. Nothing on the agent's hot path calls it: it walks the whole state.
use std::{collections::HashSet, sync::Arc};

use super::Correlator;
use crate::scope::ScopeKey;

/// The first rule found broken, in words.
#[derive(Debug, thiserror::Error)]
#[error("correlation core invariant broken: {0}")]
pub struct InvariantViolation(String);

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(InvariantViolation(format!($($msg)+)));
        }
    };
}

impl Correlator {
    /// Checks that totals match what they count, that every live entry can be found by the
    /// queues that expire or evict it, that scopes, wakeups and open connects refer to one
    /// another consistently, and that every structure is within its memory bound.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let limits = &self.config.limits;
        let table = &self.scopes;
        let live_scopes = table.slots.iter().filter(|s| s.is_some()).count();
        ensure!(
            table.ids.len() == live_scopes,
            "{} scope keys but {live_scopes} live scope slots",
            table.ids.len()
        );
        ensure!(
            table.free.len() + live_scopes == table.slots.len(),
            "scope free list of {} beside {live_scopes} live of {} slots",
            table.free.len(),
            table.slots.len()
        );
        ensure!(
            table.len() <= limits.max_scopes,
            "{} scopes over the cap {}",
            table.len(),
            limits.max_scopes
        );
        ensure!(
            table.by_uid_address.len() <= 2 * table.len() + super::scope::SPARE_UID_HANDLES,
            "{} UID handles for {} scopes",
            table.by_uid_address.len(),
            table.len()
        );
        for (address, handle) in &table.by_uid_address {
            ensure!(
                Arc::as_ptr(&handle.uid).cast::<u8>() as usize == *address,
                "a UID handle filed under another address than its text's"
            );
            let live = table.slots.get(handle.id as usize).and_then(Option::as_ref);
            if let Some(scope) = live.filter(|s| s.serial == handle.serial) {
                ensure!(
                    scope.key == ScopeKey::Pod(handle.uid.clone()),
                    "UID handle {} names scope {}",
                    handle.uid,
                    scope.key
                );
            }
        }
        let mut answers = 0;
        let mut pending = 0;
        let mut open_connects_by_scope = std::collections::HashMap::new();
        for (id, scope) in table.slots.iter().enumerate() {
            let Some(scope) = scope else { continue };
            let id = id as u32;
            ensure!(
                table.ids.get(&scope.key) == Some(&id),
                "scope {} not found by its key",
                scope.key
            );
            match scope.scheduled {
                Some(at) => ensure!(
                    self.wakeups.contains(&(at, id)),
                    "scope {} booked at {at} but not in the wakeups",
                    scope.key
                ),
                None => ensure!(false, "scope {} has no wakeup", scope.key),
            }
            answers += scope.index.len();
            pending += scope.pending.len();
            open_connects_by_scope.insert((id, scope.serial), scope.open_connects);

            let live = scope.slots.iter().filter(|s| s.chain.is_some()).count();
            ensure!(
                live == scope.live_chains,
                "scope {}: {live} chains in slots, {} counted",
                scope.key,
                scope.live_chains
            );
            let free: HashSet<u32> = scope.free_slots.iter().copied().collect();
            ensure!(
                free.len() == scope.free_slots.len()
                    && free.len() + live == scope.slots.len()
                    && free
                        .iter()
                        .all(|s| scope.slots[*s as usize].chain.is_none()),
                "scope {}: the free chain slots are not exactly the empty ones",
                scope.key
            );
            for (addr, answer) in &scope.index {
                let chain = scope
                    .slots
                    .get(answer.slot as usize)
                    .filter(|s| s.generation == answer.generation)
                    .and_then(|s| s.chain.as_ref());
                ensure!(
                    chain.is_some_and(|c| c.answer.is_some()),
                    "scope {}: address {addr:?} indexed to a chain that is gone or unanswered",
                    scope.key
                );
            }
            for (key, p) in &scope.pending {
                ensure!(
                    scope.pending_order.contains(p.deadline, *key),
                    "scope {}: pending query {key:?} missing from its expiry order",
                    scope.key
                );
            }
            for (slot, chain) in scope.slots.iter().enumerate() {
                if let Some(chain) = &chain.chain {
                    let id = (slot as u32, scope.slots[slot].generation);
                    ensure!(
                        scope.chain_order.contains(&id),
                        "scope {}: chain {id:?} missing from the eviction order",
                        scope.key
                    );
                    ensure!(
                        scope
                            .chain_expiry
                            .iter()
                            .any(|e| (e.0.1, e.0.2) == id && e.0.0 <= chain.free_at),
                        "scope {}: chain {id:?} has no expiry at or before its free time",
                        scope.key
                    );
                }
            }
            // Memory bounds: the live entries by the caps, the lazily cleaned queues by the
            // compaction thresholds that keep them proportional to what is live.
            for (what, len, bound) in [
                (
                    "pending queries",
                    scope.pending.len(),
                    limits.max_pending_per_scope,
                ),
                (
                    "pending expiry order",
                    scope.pending_order.len(),
                    4 * limits.max_pending_per_scope + 17,
                ),
                ("answers", scope.index.len(), limits.max_answers_per_scope),
                ("chains", scope.live_chains, limits.max_chains_per_scope),
                (
                    "chain slots",
                    scope.slots.len(),
                    limits.max_chains_per_scope + 1,
                ),
                (
                    "open chains",
                    scope.open.len(),
                    limits.max_open_chains_per_scope,
                ),
                (
                    "chain eviction order",
                    scope.chain_order.len(),
                    2 * limits.max_chains_per_scope + 18,
                ),
                (
                    "chain expiry queue",
                    scope.chain_expiry.len(),
                    2 * limits.max_chains_per_scope + 18,
                ),
                (
                    "open connects",
                    scope.open_connects,
                    limits.max_open_connects_per_scope,
                ),
            ] {
                ensure!(
                    len <= bound,
                    "scope {}: {what} {len} over the bound {bound}",
                    scope.key
                );
            }
        }
        ensure!(
            self.wakeups.len() == live_scopes,
            "{} wakeups for {live_scopes} scopes",
            self.wakeups.len()
        );
        ensure!(
            answers == self.answers_total,
            "answers total {} but {answers} indexed",
            self.answers_total
        );
        ensure!(
            pending == self.pending_total,
            "pending total {} but {pending} pending",
            self.pending_total
        );
        ensure!(
            self.answers_total <= limits.max_answers_total,
            "{} answers over the cap {}",
            self.answers_total,
            limits.max_answers_total
        );
        ensure!(
            self.pending_total <= limits.max_pending_total,
            "{} pending queries over the cap {}",
            self.pending_total,
            limits.max_pending_total
        );

        let mut held = std::collections::HashMap::new();
        for (sock, c) in &self.connects {
            ensure!(
                self.connect_order.contains(c.deadline, *sock),
                "open connect {sock} missing from its expiry order"
            );
            if let Some(scope) = c.scope
                && open_connects_by_scope.contains_key(&scope)
            {
                *held.entry(scope).or_insert(0usize) += 1;
            }
        }
        for (scope, count) in &open_connects_by_scope {
            let holding = held.get(scope).copied().unwrap_or(0);
            ensure!(
                holding == *count,
                "scope {scope:?} counts {count} open connects, {holding} hold it"
            );
        }
        ensure!(
            self.connects.len() <= limits.max_open_connects_total,
            "{} open connects over the cap {}",
            self.connects.len(),
            limits.max_open_connects_total
        );
        ensure!(
            self.connect_order.len() <= 2 * limits.max_open_connects_total + 1025,
            "connect expiry order of {} over its bound",
            self.connect_order.len()
        );

        let drift: usize = self.in_cluster_seen.iter().map(|names| names.len()).sum();
        ensure!(
            drift == self.in_cluster_entries,
            "drift entries counted {} but {drift} held",
            self.in_cluster_entries
        );
        ensure!(
            drift <= limits.max_drift_entries,
            "{drift} drift entries over the cap {}",
            limits.max_drift_entries
        );
        Ok(())
    }
}
