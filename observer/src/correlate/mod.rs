//! The correlation core: per-scope DNS resolution chains joined to TCP connects, classified.
//!
//! Pure: no I/O, no clock. Time comes in with every event (`at`) and through
//! [`Correlator::tick`]. Every structure is keyed by scope first and bounded; every
//! eviction and drop is counted in [`CoreCounters`]. See the book, "How connections are classified", for the rules.
mod answers;
mod chain;
mod expiry;
mod invariants;
mod pending;
mod scope;
mod types;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, hash_map::Entry},
    net::SocketAddr,
    sync::Arc,
};

pub use invariants::InvariantViolation;
pub use types::*;

use crate::{
    dns::{self, DnsMessage, DnsParseErrorKind},
    fast_hash::FastMap,
    networks::ClusterNetworks,
    record::{BootNs, ConnectionRecord, Resolution},
    scope::ScopeKey,
};
use answers::{AddrKey, AnswerRef, index_answer, seconds_up};
use chain::{ChainAnswer, StepKind};
use expiry::{DeadlineQueue, schedule};
use pending::{Pending, PendingKey, is_pending, pop_oldest_pending};
use scope::{Resolver, Scope, ScopeTable, evict_oldest_chain, insert_chain, scope_entry};

struct OpenConnect {
    record: ConnectionRecord,
    deadline: BootNs,
    /// The scope whose open-connect count this connect holds: (table id, serial).
    scope: Option<(u32, u64)>,
}

/// Whether a queued `(deadline, socket)` is still an open connect.
fn is_open(connects: &FastMap<u64, OpenConnect>, sock_id: &u64, deadline: BootNs) -> bool {
    connects
        .get(sock_id)
        .is_some_and(|c| c.deadline == deadline)
}

/// The correlation core. See the module docs.
pub struct Correlator {
    config: CorrelatorConfig,
    /// `config.cluster_networks` as one lookup.
    cluster_networks: ClusterNetworks,
    scopes: ScopeTable,
    /// (next deadline, scope id): which scopes `tick` must visit.
    wakeups: BTreeSet<(BootNs, u32)>,
    connects: FastMap<u64, OpenConnect>,
    connect_order: DeadlineQueue<u64>,
    /// drift key -> its names in `in_cluster_seen`. Scopes keep the handle they found
    /// ([`Scope::drift_names`]), so a connect does not hash the (long) key again.
    drift_tables: FastMap<Arc<str>, u32>,
    /// Per drift key: query name -> when it last resolved in-cluster. Looked up by
    /// reference, without building a key; never shrinks, so a handle stays valid.
    in_cluster_seen: Vec<FastMap<Arc<str>, BootNs>>,
    /// Entries of all `in_cluster_seen` maps.
    in_cluster_entries: usize,
    answers_total: usize,
    pending_total: usize,
    counters: CoreCounters,
}

impl Correlator {
    pub fn new(config: CorrelatorConfig) -> Self {
        Self {
            cluster_networks: ClusterNetworks::new(&config.cluster_networks),
            config,
            scopes: ScopeTable::default(),
            wakeups: BTreeSet::new(),
            connects: FastMap::default(),
            connect_order: DeadlineQueue::new(),
            drift_tables: FastMap::default(),
            in_cluster_seen: Vec::new(),
            in_cluster_entries: 0,
            answers_total: 0,
            pending_total: 0,
            counters: CoreCounters::default(),
        }
    }

    pub fn config(&self) -> &CorrelatorConfig {
        &self.config
    }

    /// Kubernetes reported new pod, service or node networks: later connects are judged
    /// against them (records already emitted keep their verdict).
    pub fn set_cluster_networks(&mut self, networks: Vec<ipnet::IpNet>) {
        self.cluster_networks = ClusterNetworks::new(&networks);
        self.config.cluster_networks = networks;
    }

    /// The cluster networks the core judges addresses against, as one lookup.
    pub fn cluster_networks(&self) -> &ClusterNetworks {
        &self.cluster_networks
    }

    pub fn counters(&self) -> &CoreCounters {
        &self.counters
    }

    pub fn scope_count(&self) -> usize {
        self.scopes.len()
    }

    /// Addresses currently indexed, all scopes.
    pub fn cached_answers(&self) -> usize {
        self.answers_total
    }

    pub fn pending_queries(&self) -> usize {
        self.pending_total
    }

    pub fn open_connects(&self) -> usize {
        self.connects.len()
    }

    /// The pod's resolv.conf, as identity read it. Replaces any inferred search list.
    pub fn set_resolver_config(
        &mut self,
        scope: &ScopeKey,
        resolver: &ResolverConfig,
    ) -> Result<(), ScopeLimitReached> {
        let result = self.set_resolver_config_step(scope, resolver);
        self.after_step();
        result
    }

    fn set_resolver_config_step(
        &mut self,
        scope: &ScopeKey,
        resolver: &ResolverConfig,
    ) -> Result<(), ScopeLimitReached> {
        let search = resolver
            .search
            .iter()
            .map(|d| Arc::from(normalize_name(d)))
            .filter(|d: &Arc<str>| !d.is_empty())
            .collect();
        let (_, state) = self.scope_mut(scope, 0)?;
        state.resolver = Resolver {
            search,
            ndots: resolver.ndots,
            inferred: false,
        };
        state.pinned = true;
        Ok(())
    }

    /// The workload identity that drift is tracked under (default: the scope itself).
    pub fn set_drift_key(&mut self, scope: &ScopeKey, key: &str) -> Result<(), ScopeLimitReached> {
        let result = self.set_drift_key_step(scope, key);
        self.after_step();
        result
    }

    fn set_drift_key_step(&mut self, scope: &ScopeKey, key: &str) -> Result<(), ScopeLimitReached> {
        let (_, state) = self.scope_mut(scope, 0)?;
        state.drift_key = Arc::from(key);
        state.drift_names = None;
        state.pinned = true;
        Ok(())
    }

    /// The pod is gone: forget everything about it now (connects already open still
    /// get their records).
    pub fn remove_scope(&mut self, scope: &ScopeKey) {
        self.remove_scope_step(scope);
        self.after_step();
    }

    fn remove_scope_step(&mut self, scope: &ScopeKey) {
        if let Some(state) = self.scopes.id(scope).and_then(|id| {
            let state = self.scopes.remove(id)?;
            if let Some(at) = state.scheduled {
                self.wakeups.remove(&(at, id));
            }
            Some(state)
        }) {
            self.answers_total -= state.index.len();
            self.pending_total -= state.pending.len();
        }
    }

    /// Parses wire bytes and observes the message; a parse failure is counted by kind
    /// and returned.
    pub fn observe_dns_wire(
        &mut self,
        scope: &ScopeKey,
        at: BootNs,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), dns::DnsParseError> {
        match dns::parse(bytes) {
            Ok(message) => {
                self.observe_message(scope, at, direction, src, dst, message);
                Ok(())
            }
            Err(e) => {
                self.count_parse_error(e.kind);
                Err(e)
            }
        }
    }

    /// Counts a parse failure the caller met (e.g. after TCP reassembly).
    pub fn count_parse_error(&mut self, kind: DnsParseErrorKind) {
        let c = &mut self.counters;
        match kind {
            DnsParseErrorKind::Empty => c.parse_empty += 1,
            DnsParseErrorKind::Truncated => c.parse_truncated += 1,
            DnsParseErrorKind::BadCounts => c.parse_bad_counts += 1,
            DnsParseErrorKind::BadName => c.parse_bad_name += 1,
            DnsParseErrorKind::BadRecord => c.parse_bad_record += 1,
        }
    }

    /// Counts a message the caller recognised from its header as the DNS server's side of an
    /// exchange (a query received, a response sent) and did not parse: it would be ignored.
    pub fn count_server_side(&mut self) {
        self.counters.dns_messages += 1;
        self.counters.dns_server_side_ignored += 1;
    }

    pub fn observe_dns(&mut self, obs: DnsObservation) {
        self.observe_message(
            &obs.scope,
            obs.at,
            obs.direction,
            obs.src,
            obs.dst,
            obs.message,
        );
    }

    /// [`Self::observe_dns`] without building an observation (no scope key clone).
    fn observe_message(
        &mut self,
        scope: &ScopeKey,
        at: BootNs,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        message: DnsMessage,
    ) {
        self.counters.dns_messages += 1;
        if dns::is_standard_query(&message) {
            match (direction, message.is_response) {
                (Direction::Egress, false) => self.on_query(scope, at, src, dst, message),
                (Direction::Ingress, true) => self.on_response(scope, at, src, dst, message),
                // The server's own socket: the client's side of the same exchange is what counts.
                _ => self.counters.dns_server_side_ignored += 1,
            }
        }
        self.after_step();
    }

    fn on_query(
        &mut self,
        scope_key: &ScopeKey,
        at: BootNs,
        src: SocketAddr,
        dst: SocketAddr,
        message: DnsMessage,
    ) {
        let Some(question) = message.question else {
            return;
        };
        self.counters.queries += 1;
        let key = PendingKey {
            id: message.id,
            client: src,
            server: dst,
        };
        let query_timeout = self.config.query_timeout_ns;
        let limits = self.config.limits;
        let chain_window = self.config.chain_window_ns;
        let Ok((scope_id, scope)) = scope_entry(
            &mut self.scopes,
            &mut self.wakeups,
            &mut self.counters,
            &self.config,
            scope_key,
            at,
        ) else {
            return;
        };
        scope.last_activity = at;
        if scope.pending.contains_key(&key) {
            // Same id, same 4-tuple, still unanswered: a retransmission.
            return;
        }
        let name = question.name;
        let qtype = question.qtype.0;

        let (slot, generation, step) =
            match chain::find_continuation(scope, &name, qtype, at, chain_window) {
                Some(found) => found,
                None => {
                    if scope.live_chains >= limits.max_chains_per_scope {
                        let removed = evict_oldest_chain(scope, None);
                        self.answers_total -= removed.answers;
                        self.counters.chains_evicted_cap += u64::from(removed.chains);
                        self.counters.answers_evicted_scope_cap += removed.answers as u64;
                    }
                    let chain = chain::start_chain(
                        &mut scope.resolver,
                        &name,
                        &self.config.cluster_domain,
                        at,
                        chain_window,
                    );
                    self.counters.chains_started += 1;
                    let (slot, generation) = insert_chain(scope, chain);
                    if scope.open.len() >= limits.max_open_chains_per_scope {
                        scope.open.pop_front();
                    }
                    scope.open.push_back((slot, generation));
                    (slot, generation, 0)
                }
            };
        let chain = scope.slots[slot as usize]
            .chain
            .as_mut()
            .expect("slot just found or inserted");
        chain.last_query_at = at;
        chain.free_at = chain.free_at.max(at + chain_window);
        let query = chain.push_query(step as usize, qtype, dst.ip(), at);
        // The step's own name: the message's copy is freed with it.
        let name = chain.step_name(step as usize).clone();

        // Room for the new pending query: the scope's oldest goes first, then the total.
        while scope.pending.len() >= limits.max_pending_per_scope
            || (self.pending_total >= limits.max_pending_total && !scope.pending.is_empty())
        {
            if pop_oldest_pending(scope).is_some() {
                self.pending_total -= 1;
                self.counters.queries_evicted_cap += 1;
            } else {
                break;
            }
        }
        if self.pending_total >= limits.max_pending_total {
            self.counters.queries_dropped_cap += 1;
        } else {
            let deadline = at + query_timeout;
            scope.pending.insert(
                key,
                Pending {
                    slot,
                    generation,
                    step,
                    query,
                    name,
                    qtype,
                    sent_at: at,
                    deadline,
                },
            );
            scope.pending_order.push(
                deadline,
                key,
                4 * limits.max_pending_per_scope + 16,
                |k, d| is_pending(&scope.pending, k, d),
            );
            self.pending_total += 1;
        }
        schedule(
            &mut self.wakeups,
            scope_id,
            scope,
            0,
            self.config.scope_idle_ns,
        );
    }

    fn on_response(
        &mut self,
        scope_key: &ScopeKey,
        at: BootNs,
        src: SocketAddr,
        dst: SocketAddr,
        message: DnsMessage,
    ) {
        self.counters.responses += 1;
        let key = PendingKey {
            id: message.id,
            client: dst,
            server: src,
        };
        let Some((scope_id, scope)) = self
            .scopes
            .id(scope_key)
            .and_then(|id| Some((id, self.scopes.get_mut(id)?)))
        else {
            self.counters.responses_unmatched += 1;
            return;
        };
        // Taken out at once (one hash of the key), put back in the rare case of a mismatch.
        let Some(pending) = scope.pending.remove(&key) else {
            self.counters.responses_unmatched += 1;
            return;
        };
        if let Some(q) = &message.question
            && (*q.name != *pending.name || q.qtype.0 != pending.qtype)
        {
            // Same id and tuple but another question: not the answer to this query.
            scope.pending.insert(key, pending);
            self.counters.responses_mismatched += 1;
            return;
        }
        self.pending_total -= 1;
        // Responses come mostly in send order: drop the answered entries at the front now
        // rather than keeping them until their timeout.
        scope
            .pending_order
            .drop_dead_front((pending.deadline, key), |k, d| {
                is_pending(&scope.pending, k, d)
            });
        scope.last_activity = at;
        if message.answers_capped {
            self.counters.responses_answers_capped += 1;
        }
        let Some(chain) = scope
            .slots
            .get_mut(pending.slot as usize)
            .filter(|s| s.generation == pending.generation)
            .and_then(|s| s.chain.as_mut())
        else {
            self.counters.responses_orphaned += 1;
            return;
        };
        let msg = &message;
        let mut lookup =
            chain::follow_answer(&pending.name, msg, self.config.limits.max_cname_hops);
        chain.answer_query(
            pending.query as usize,
            msg.rcode,
            at,
            std::mem::take(&mut lookup.items),
            msg.truncated,
        );

        if lookup.addresses(&pending.name, msg).next().is_none() {
            return;
        }
        match &chain.answer {
            Some(a) if a.step != pending.step => {
                // A later sibling step also answered (parallel resolver): the first wins.
                return;
            }
            Some(_) => {}
            None => {
                let step = &chain.steps[pending.step as usize];
                // The query joined this step because its name is the step's name.
                let server = &*pending.name;
                debug_assert_eq!(&**chain.step_name(pending.step as usize), server);
                let search_domain = match &step.kind {
                    StepKind::Search(d) => Some(&**d),
                    StepKind::AsIs => None,
                };
                let class = classify(
                    server,
                    search_domain,
                    lookup.cnames.last().map(|c| &**c),
                    &self.config.cluster_domain,
                );
                chain.answer = Some(ChainAnswer {
                    step: pending.step,
                    class,
                    cnames: lookup.cnames.as_slice().into(),
                    answered_at: at,
                });
                if class == Resolution::InCluster {
                    let name: Arc<str> = if chain.asked_absolute {
                        Arc::from(chain.query_name().as_ref())
                    } else {
                        chain.base.clone()
                    };
                    let room = self.in_cluster_entries < self.config.limits.max_drift_entries;
                    let handle =
                        drift_names(&self.drift_tables, &scope.drift_key, &mut scope.drift_names);
                    let names = match handle {
                        Some(id) => Some(&mut self.in_cluster_seen[id as usize]),
                        None if room => {
                            let id = self.in_cluster_seen.len() as u32;
                            self.drift_tables.insert(scope.drift_key.clone(), id);
                            self.in_cluster_seen.push(FastMap::default());
                            scope.drift_names = Some(id);
                            Some(&mut self.in_cluster_seen[id as usize])
                        }
                        None => None,
                    };
                    match names.map(|names| names.entry(name)) {
                        Some(Entry::Occupied(mut e)) => *e.get_mut() = at,
                        Some(Entry::Vacant(e)) if room => {
                            e.insert(at);
                            self.in_cluster_entries += 1;
                        }
                        _ => self.counters.drift_entries_dropped += 1,
                    }
                }
            }
        }
        let grace = self.config.answer_grace_ns;
        let mut latest = chain.free_at;
        let (slot, generation) = (pending.slot, pending.generation);
        for (ip, ttl) in lookup.addresses(&pending.name, msg) {
            let expires_at = at + u64::from(ttl) * 1_000_000_000;
            latest = latest.max(expires_at + grace);
            index_answer(
                scope,
                &mut self.answers_total,
                &mut self.counters,
                &self.config.limits,
                ip,
                AnswerRef {
                    slot,
                    generation,
                    expires_s: seconds_up(expires_at),
                },
            );
        }
        // Indexing never evicts the chain it indexes for.
        if let Some(chain) = scope.slots[slot as usize].chain.as_mut() {
            chain.free_at = latest;
        }
        schedule(
            &mut self.wakeups,
            scope_id,
            scope,
            0,
            self.config.scope_idle_ns,
        );
    }

    /// A TCP active open: joined now, against the answers this scope had at `open.at`.
    pub fn connect_open(&mut self, open: ConnectOpen) {
        self.connect_open_step(open);
        self.after_step();
    }

    fn connect_open_step(&mut self, open: ConnectOpen) {
        let limits = self.config.limits;
        let ip = open.destination.ip().to_canonical();
        let grace = self.config.answer_grace_ns;
        let mut resolution = Resolution::None;
        let mut chain_record = None;
        let mut drift = false;
        let mut scope_ref = None;
        if let Ok((scope_id, scope)) = scope_entry(
            &mut self.scopes,
            &mut self.wakeups,
            &mut self.counters,
            &self.config,
            &open.scope,
            open.at,
        ) {
            scope.last_activity = open.at;
            if scope.open_connects >= limits.max_open_connects_per_scope {
                self.counters.connects_dropped_cap += 1;
                return;
            }
            scope.open_connects += 1;
            scope_ref = Some((scope_id, scope.serial));
            if let Some(answer) = scope.index.get(&AddrKey::from(ip)).copied() {
                let chain = scope
                    .slots
                    .get_mut(answer.slot as usize)
                    .filter(|s| s.generation == answer.generation)
                    .and_then(|s| s.chain.as_mut());
                match chain {
                    Some(chain) if open.at <= answer.expires_at() + grace => {
                        let a = chain
                            .answer
                            .as_ref()
                            .expect("indexed chains have an answer");
                        resolution = a.class;
                        let answered_at = a.answered_at;
                        let materialized = chain.materialize();
                        if resolution != Resolution::InCluster {
                            drift = drift_names(
                                &self.drift_tables,
                                &scope.drift_key,
                                &mut scope.drift_names,
                            )
                            .and_then(|id| {
                                self.in_cluster_seen[id as usize].get(&*materialized.query_name)
                            })
                            .is_some_and(|seen| *seen <= answered_at);
                        }
                        chain_record = Some(materialized);
                        self.counters.connects_joined += 1;
                    }
                    Some(_) => self.counters.connects_answer_expired += 1,
                    None => self.counters.connects_answer_evicted += 1,
                }
            }
        }
        // Loopback never leaves the node, whatever the cluster networks are.
        let egress = !ip.is_loopback() && !self.cluster_networks.contains(ip);
        let flagged = egress
            && matches!(
                resolution,
                Resolution::SearchEscape | Resolution::CnameEscape
            );
        let dns_from_outside = chain_record
            .as_ref()
            .and_then(|c| c.answered_by())
            .is_some_and(|server| self.cluster_networks.dns_server_outside(server));
        let deadline = open.at + self.config.connect_timeout_ns;
        if self.connects.len() >= limits.max_open_connects_total
            && !self.connects.contains_key(&open.sock_id)
        {
            self.evict_oldest_connect();
        }
        // Built in place: a record is large, and each move of it is a copy.
        let previous = self.connects.insert(
            open.sock_id,
            OpenConnect {
                record: ConnectionRecord {
                    scope: open.scope,
                    cgroup_id: open.cgroup_id,
                    pid: open.pid,
                    comm: open.comm,
                    destination: open.destination,
                    source: open.source,
                    opened_at: open.at,
                    outcome: crate::record::Outcome::Timeout,
                    outcome_at: open.at,
                    resolution,
                    chain: chain_record,
                    egress,
                    flagged,
                    drift,
                    dns_from_outside,
                },
                deadline,
                scope: scope_ref,
            },
        );
        if let Some(prev) = previous {
            self.release_connect_slot(prev.scope);
        }
        self.connect_order.push(
            deadline,
            open.sock_id,
            2 * limits.max_open_connects_total + 1024,
            |id, d| is_open(&self.connects, id, d),
        );
    }

    /// The open's outcome: the connection's record, or `None` for an unknown socket.
    pub fn connect_outcome(&mut self, outcome: ConnectOutcome) -> Option<ConnectionRecord> {
        let record = self.connect_outcome_step(outcome);
        self.after_step();
        record
    }

    fn connect_outcome_step(&mut self, outcome: ConnectOutcome) -> Option<ConnectionRecord> {
        let Some(open) = self.connects.remove(&outcome.sock_id) else {
            self.counters.outcomes_unmatched += 1;
            return None;
        };
        self.release_connect_slot(open.scope);
        let mut record = open.record;
        record.outcome = outcome.outcome;
        record.outcome_at = outcome.at;
        if outcome.source.is_some() {
            record.source = outcome.source;
        }
        Some(record)
    }

    fn release_connect_slot(&mut self, scope: Option<(u32, u64)>) {
        if let Some(s) = scope.and_then(|r| self.scopes.get_serial_mut(r)) {
            s.open_connects = s.open_connects.saturating_sub(1);
        }
    }

    fn evict_oldest_connect(&mut self) {
        if let Some(id) = self
            .connect_order
            .pop_oldest(|id, d| is_open(&self.connects, id, d))
        {
            let c = self.connects.remove(&id).expect("checked");
            self.release_connect_slot(c.scope);
            self.counters.connects_evicted_cap += 1;
        }
    }

    /// The unit tests check the invariants after every call that changes the core; elsewhere
    /// this is nothing (the check walks the whole state).
    #[inline(always)]
    fn after_step(&self) {
        #[cfg(test)]
        if let Err(broken) = self.check_invariants() {
            panic!("{broken}");
        }
    }

    fn scope_mut(
        &mut self,
        key: &ScopeKey,
        at: BootNs,
    ) -> Result<(u32, &mut Scope), ScopeLimitReached> {
        scope_entry(
            &mut self.scopes,
            &mut self.wakeups,
            &mut self.counters,
            &self.config,
            key,
            at,
        )
    }
}

/// A scope's handle into `in_cluster_seen` ([`Scope::drift_names`]), found by its drift
/// key once and then kept.
fn drift_names(
    tables: &FastMap<Arc<str>, u32>,
    drift_key: &str,
    handle: &mut Option<u32>,
) -> Option<u32> {
    if handle.is_none() {
        *handle = tables.get(drift_key).copied();
    }
    *handle
}

/// Lower case, no trailing dot.
fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name` is `domain` or below it.
pub(crate) fn in_domain(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// The resolution class of an answered chain step (see the book, "How connections are classified").
fn classify(
    server: &str,
    search_domain: Option<&str>,
    cname_target: Option<&str>,
    cluster_domain: &str,
) -> Resolution {
    if in_domain(server, cluster_domain) {
        match cname_target {
            Some(t) if !in_domain(t, cluster_domain) => Resolution::CnameEscape,
            _ => Resolution::InCluster,
        }
    } else if search_domain.is_some() {
        Resolution::SearchEscape
    } else {
        Resolution::External
    }
}
