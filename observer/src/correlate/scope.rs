//! Per-scope state (a pod or a host process): its resolver, pending queries, chains and
//! answer index; the table that numbers scopes; and the chain slots with their eviction
//! order.
use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, VecDeque},
    sync::Arc,
};

use super::{
    CoreCounters, CorrelatorConfig, FastMap, ScopeLimitReached,
    answers::{AddrKey, AnswerRef},
    chain::Chain,
    expiry::{DeadlineQueue, schedule},
    pending::{Pending, PendingKey},
};
use crate::{record::BootNs, scope::ScopeKey};

pub(super) struct ChainSlot {
    pub(super) generation: u32,
    pub(super) chain: Option<Chain>,
}

/// The resolver settings of a scope, search domains normalized.
#[derive(Debug)]
pub(super) struct Resolver {
    pub(super) search: Vec<Arc<str>>,
    pub(super) ndots: u8,
    /// Learned from the queries rather than set from resolv.conf.
    pub(super) inferred: bool,
}

pub(super) struct Scope {
    pub(super) key: ScopeKey,
    /// Unique per scope created: tells a reused table id's scope from the one before.
    pub(super) serial: u64,
    pub(super) resolver: Resolver,
    pub(super) drift_key: Arc<str>,
    /// `drift_key`'s names in `Correlator::in_cluster_seen`, once known.
    pub(super) drift_names: Option<u32>,
    /// Set by identity (resolver or drift key): kept while idle, until `remove_scope`.
    pub(super) pinned: bool,
    pub(super) pending: FastMap<PendingKey, Pending>,
    /// Pending keys in send order: the timeout is uniform, so this is deadline order.
    pub(super) pending_order: DeadlineQueue<PendingKey>,
    pub(super) slots: Vec<ChainSlot>,
    pub(super) free_slots: Vec<u32>,
    pub(super) live_chains: usize,
    /// Chains still accepting queries, oldest first.
    pub(super) open: VecDeque<(u32, u32)>,
    /// Chains in creation order: the eviction order under caps.
    pub(super) chain_order: VecDeque<(u32, u32)>,
    /// When each chain may be freed (lazy: re-checked against the chain when popped).
    pub(super) chain_expiry: BinaryHeap<Reverse<(BootNs, u32, u32)>>,
    pub(super) index: FastMap<AddrKey, AnswerRef>,
    pub(super) open_connects: usize,
    pub(super) last_activity: BootNs,
    pub(super) scheduled: Option<BootNs>,
}

/// Scopes by small id: the per-scope state sits in one table, looked up by key once per
/// event; the wakeup queue and open connects refer to scopes by id.
#[derive(Default)]
pub(super) struct ScopeTable {
    pub(super) ids: FastMap<ScopeKey, u32>,
    /// A pod's scope by the address of the UID text its events carry: identity hands every
    /// event of a pod the same `Arc`, so a number is hashed rather than the UID (and, when
    /// the table's key is another copy of the text, compared byte by byte) on every event.
    pub(super) by_uid_address: FastMap<usize, UidHandle>,
    pub(super) slots: Vec<Option<Scope>>,
    pub(super) free: Vec<u32>,
    pub(super) next_serial: u64,
}

/// A scope found by a UID `Arc`'s address. Holding the `Arc` keeps the address from being
/// reused for other text while the handle exists; the serial tells whether the scope it
/// named still lives.
pub(super) struct UidHandle {
    pub(super) uid: Arc<str>,
    pub(super) id: u32,
    pub(super) serial: u64,
}

/// Handles kept past the live scopes' count before they are all dropped (those of removed
/// scopes are only found stale when looked up).
pub(super) const SPARE_UID_HANDLES: usize = 1024;

impl ScopeTable {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The scope's id; a pod's is found by its UID text's address once seen.
    pub(super) fn id(&mut self, key: &ScopeKey) -> Option<u32> {
        let ScopeKey::Pod(uid) = key else {
            return self.ids.get(key).copied();
        };
        let address = Arc::as_ptr(uid).cast::<u8>() as usize;
        if let Some(handle) = self.by_uid_address.get(&address)
            && self.serial(handle.id) == Some(handle.serial)
        {
            return Some(handle.id);
        }
        let id = self.ids.get(key).copied()?;
        let serial = self.serial(id).expect("ids name live scopes");
        if self.by_uid_address.len() >= self.ids.len() * 2 + SPARE_UID_HANDLES {
            self.by_uid_address.clear();
        }
        self.by_uid_address.insert(
            address,
            UidHandle {
                uid: uid.clone(),
                id,
                serial,
            },
        );
        Some(id)
    }

    fn serial(&self, id: u32) -> Option<u64> {
        self.slots
            .get(id as usize)
            .and_then(Option::as_ref)
            .map(|s| s.serial)
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut Scope> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The scope of an open connect, if it is still the same scope.
    pub(super) fn get_serial_mut(&mut self, (id, serial): (u32, u64)) -> Option<&mut Scope> {
        self.get_mut(id).filter(|s| s.serial == serial)
    }

    pub(super) fn insert(&mut self, mut scope: Scope) -> u32 {
        scope.serial = self.next_serial;
        self.next_serial += 1;
        let key = scope.key.clone();
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(scope);
                id
            }
            None => {
                self.slots.push(Some(scope));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(key, id);
        id
    }

    pub(super) fn remove(&mut self, id: u32) -> Option<Scope> {
        let scope = self.slots.get_mut(id as usize)?.take()?;
        self.ids.remove(&scope.key);
        self.free.push(id);
        if self.by_uid_address.len() > self.ids.len() * 2 + SPARE_UID_HANDLES {
            self.by_uid_address.clear();
        }
        Some(scope)
    }
}

/// The scope's id and state, created (and scheduled for its idle check) on first sight.
/// One hash lookup, no key clone, on the hot path; the fields are passed apart so that
/// callers keep the others.
pub(super) fn scope_entry<'a>(
    scopes: &'a mut ScopeTable,
    wakeups: &mut BTreeSet<(BootNs, u32)>,
    counters: &mut CoreCounters,
    config: &CorrelatorConfig,
    key: &ScopeKey,
    at: BootNs,
) -> Result<(u32, &'a mut Scope), ScopeLimitReached> {
    match scopes.id(key) {
        Some(id) => Ok((id, scopes.get_mut(id).expect("ids name live scopes"))),
        None => {
            if scopes.len() >= config.limits.max_scopes {
                counters.scopes_refused += 1;
                return Err(ScopeLimitReached {
                    scope: key.clone(),
                    limit: config.limits.max_scopes,
                });
            }
            let ndots = match key {
                // Kubernetes writes ndots:5 into every ClusterFirst pod; glibc defaults to 1.
                ScopeKey::Pod(_) => 5,
                ScopeKey::Host(_) => 1,
            };
            let id = scopes.insert(Scope {
                key: key.clone(),
                serial: 0,
                resolver: Resolver {
                    search: Vec::new(),
                    ndots,
                    inferred: true,
                },
                drift_key: Arc::from(key.to_string()),
                drift_names: None,
                pinned: false,
                pending: FastMap::default(),
                pending_order: DeadlineQueue::new(),
                slots: Vec::new(),
                free_slots: Vec::new(),
                live_chains: 0,
                open: VecDeque::new(),
                chain_order: VecDeque::new(),
                chain_expiry: BinaryHeap::new(),
                index: FastMap::default(),
                open_connects: 0,
                last_activity: at,
                scheduled: None,
            });
            let scope = scopes.get_mut(id).expect("just inserted");
            schedule(wakeups, id, scope, 0, config.scope_idle_ns);
            Ok((id, scope))
        }
    }
}

pub(super) fn insert_chain(scope: &mut Scope, chain: Chain) -> (u32, u32) {
    let free_at = chain.free_at;
    let slot = match scope.free_slots.pop() {
        Some(slot) => {
            scope.slots[slot as usize].chain = Some(chain);
            slot
        }
        None => {
            scope.slots.push(ChainSlot {
                generation: 0,
                chain: Some(chain),
            });
            (scope.slots.len() - 1) as u32
        }
    };
    let generation = scope.slots[slot as usize].generation;
    scope.live_chains += 1;
    scope.chain_order.push_back((slot, generation));
    scope
        .chain_expiry
        .push(Reverse((free_at, slot, generation)));
    // Evicted chains leave their expiry behind until it is due, which a long TTL puts far
    // off: drop those now and then, as for the eviction order.
    if scope.chain_expiry.len() > 2 * scope.live_chains + 16 {
        let slots = &scope.slots;
        scope.chain_expiry.retain(|Reverse((_, s, g))| {
            let entry = &slots[*s as usize];
            entry.generation == *g && entry.chain.is_some()
        });
    }
    (slot, generation)
}

/// Frees a chain and the index entries still pointing at it; returns how many.
pub(super) fn free_chain(scope: &mut Scope, slot: u32) -> usize {
    let entry = &mut scope.slots[slot as usize];
    let Some(chain) = entry.chain.take() else {
        return 0;
    };
    let generation = entry.generation;
    entry.generation = entry.generation.wrapping_add(1);
    scope.free_slots.push(slot);
    scope.live_chains -= 1;
    // Chains freed by expiry leave their entry in the eviction order: drop those now and
    // then, so that a long-lived scope's order stays proportional to its live chains.
    if scope.chain_order.len() > 2 * scope.live_chains + 16 {
        let slots = &scope.slots;
        scope.chain_order.retain(|(s, g)| {
            let entry = &slots[*s as usize];
            entry.generation == *g && entry.chain.is_some()
        });
    }
    let mut removed = 0;
    for ip in chain.addresses() {
        let key = AddrKey::from(ip);
        if scope
            .index
            .get(&key)
            .is_some_and(|a| a.slot == slot && a.generation == generation)
        {
            scope.index.remove(&key);
            removed += 1;
        }
    }
    removed
}

pub(super) struct Evicted {
    pub(super) chains: u32,
    pub(super) answers: usize,
}

/// Frees the scope's oldest chain, never `keep`.
pub(super) fn evict_oldest_chain(scope: &mut Scope, keep: Option<(u32, u32)>) -> Evicted {
    while let Some((slot, generation)) = scope.chain_order.pop_front() {
        let live = scope.slots[slot as usize].generation == generation
            && scope.slots[slot as usize].chain.is_some();
        if !live {
            continue;
        }
        if Some((slot, generation)) == keep {
            scope.chain_order.push_back((slot, generation));
            if scope.chain_order.len() == 1 {
                break;
            }
            continue;
        }
        let answers = free_chain(scope, slot);
        return Evicted { chains: 1, answers };
    }
    Evicted {
        chains: 0,
        answers: 0,
    }
}
