//! The correlation core: per-scope DNS resolution chains joined to TCP connects, classified.
//!
//! Pure: no I/O, no clock. Time comes in with every event (`at`) and through
//! [`Correlator::tick`]. Every structure is keyed by scope first and bounded; every
//! eviction and drop is counted in [`CoreCounters`]. See the book, "How connections are classified", for the rules.
mod chain;
mod types;

#[cfg(test)]
mod tests;

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, HashMap, VecDeque, hash_map::Entry},
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use types::*;

use crate::{
    dns::{self, DnsMessage, DnsParseErrorKind},
    record::{BootNs, ConnectionRecord, Resolution},
    scope::ScopeKey,
};
use chain::{Chain, ChainAnswer, StepKind};

/// Keys come from pods (names, addresses, ids they chose), so the hasher is seeded at
/// random per map: fast, without letting a pod pick colliding keys.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A query waiting for its response, keyed by what the response will carry reversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingKey {
    id: u16,
    client: SocketAddr,
    server: SocketAddr,
}

/// Hashed on every query and response: packed into as few words as the addresses allow
/// (one for IPv4 on both ends) rather than field by field.
impl Hash for PendingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let ports = u128::from(self.id)
            | u128::from(self.client.port()) << 16
            | u128::from(self.server.port()) << 32;
        match (self.client.ip(), self.server.ip()) {
            (IpAddr::V4(c), IpAddr::V4(s)) => state
                .write_u128(ports | u128::from(c.to_bits()) << 48 | u128::from(s.to_bits()) << 80),
            (c, s) => {
                state.write_u128(ports | 1 << 127);
                for ip in [c, s] {
                    match ip {
                        IpAddr::V4(v4) => state.write_u32(v4.to_bits()),
                        IpAddr::V6(v6) => state.write_u128(v6.to_bits()),
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    slot: u32,
    generation: u32,
    step: u16,
    query: u16,
    name: Arc<str>,
    qtype: u16,
    sent_at: BootNs,
    deadline: BootNs,
}

/// Where an address was learned: one chain, until `expires_s` (TTL) plus grace.
/// Kept to 12 bytes: with its address, an index entry takes 32 bytes rather than 40, and
/// a node caches a million of them.
#[derive(Clone, Copy, Debug)]
struct AnswerRef {
    slot: u32,
    generation: u32,
    /// When the TTL runs out, in whole seconds of boot time, rounded up (u32 seconds
    /// last 136 years; the grace period dwarfs the rounding).
    expires_s: u32,
}

impl AnswerRef {
    fn expires_at(&self) -> BootNs {
        u64::from(self.expires_s) * 1_000_000_000
    }
}

/// An address as an index key: IPv4 as its v4-mapped IPv6 form, 16 plain bytes. With
/// alignment 1 (`IpAddr` has a tag), an index entry takes 28 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AddrKey([u8; 16]);

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        AddrKey(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        })
    }
}

fn seconds_up(at: BootNs) -> u32 {
    u32::try_from(at.div_ceil(1_000_000_000)).unwrap_or(u32::MAX)
}

struct ChainSlot {
    generation: u32,
    chain: Option<Chain>,
}

/// The resolver settings of a scope, search domains normalized.
#[derive(Debug)]
struct Resolver {
    search: Vec<Arc<str>>,
    ndots: u8,
    /// Learned from the queries rather than set from resolv.conf.
    inferred: bool,
}

struct Scope {
    key: ScopeKey,
    /// Unique per scope created: tells a reused table id's scope from the one before.
    serial: u64,
    resolver: Resolver,
    drift_key: Arc<str>,
    /// Set by identity (resolver or drift key): kept while idle, until `remove_scope`.
    pinned: bool,
    pending: FastMap<PendingKey, Pending>,
    /// Pending keys in send order: the timeout is uniform, so this is deadline order.
    pending_order: VecDeque<(BootNs, PendingKey)>,
    slots: Vec<ChainSlot>,
    free_slots: Vec<u32>,
    live_chains: usize,
    /// Chains still accepting queries, oldest first.
    open: VecDeque<(u32, u32)>,
    /// Chains in creation order: the eviction order under caps.
    chain_order: VecDeque<(u32, u32)>,
    /// When each chain may be freed (lazy: re-checked against the chain when popped).
    chain_expiry: BinaryHeap<Reverse<(BootNs, u32, u32)>>,
    index: FastMap<AddrKey, AnswerRef>,
    open_connects: usize,
    last_activity: BootNs,
    scheduled: Option<BootNs>,
}

struct OpenConnect {
    record: ConnectionRecord,
    deadline: BootNs,
    /// The scope whose open-connect count this connect holds: (table id, serial).
    scope: Option<(u32, u64)>,
}

/// Scopes by small id: the per-scope state sits in one table, looked up by key once per
/// event; the wakeup queue and open connects refer to scopes by id.
#[derive(Default)]
struct ScopeTable {
    ids: FastMap<ScopeKey, u32>,
    slots: Vec<Option<Scope>>,
    free: Vec<u32>,
    next_serial: u64,
}

impl ScopeTable {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn id(&self, key: &ScopeKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Scope> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The scope of an open connect, if it is still the same scope.
    fn get_serial_mut(&mut self, (id, serial): (u32, u64)) -> Option<&mut Scope> {
        self.get_mut(id).filter(|s| s.serial == serial)
    }

    fn insert(&mut self, mut scope: Scope) -> u32 {
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

    fn remove(&mut self, id: u32) -> Option<Scope> {
        let scope = self.slots.get_mut(id as usize)?.take()?;
        self.ids.remove(&scope.key);
        self.free.push(id);
        Some(scope)
    }
}

/// The correlation core. See the module docs.
pub struct Correlator {
    config: CorrelatorConfig,
    scopes: ScopeTable,
    /// (next deadline, scope id): which scopes `tick` must visit.
    wakeups: BTreeSet<(BootNs, u32)>,
    connects: FastMap<u64, OpenConnect>,
    connect_order: VecDeque<(BootNs, u64)>,
    /// drift key -> query name -> when it last resolved in-cluster. Nested so that a
    /// connect looks its names up by reference, without building a key.
    in_cluster_seen: FastMap<Arc<str>, FastMap<Arc<str>, BootNs>>,
    /// Entries of all `in_cluster_seen` inner maps.
    in_cluster_entries: usize,
    answers_total: usize,
    pending_total: usize,
    counters: CoreCounters,
}

impl Correlator {
    pub fn new(config: CorrelatorConfig) -> Self {
        Self {
            config,
            scopes: ScopeTable::default(),
            wakeups: BTreeSet::new(),
            connects: FastMap::default(),
            connect_order: VecDeque::new(),
            in_cluster_seen: FastMap::default(),
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
        self.config.cluster_networks = networks;
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
        let (_, state) = self.scope_mut(scope, 0)?;
        state.drift_key = Arc::from(key);
        state.pinned = true;
        Ok(())
    }

    /// The pod is gone: forget everything about it now (connects already open still
    /// get their records).
    pub fn remove_scope(&mut self, scope: &ScopeKey) {
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
        if !dns::is_standard_query(&message) {
            return;
        }
        match (direction, message.is_response) {
            (Direction::Egress, false) => self.on_query(scope, at, src, dst, message),
            (Direction::Ingress, true) => self.on_response(scope, at, src, dst, message),
            // The server's own socket: the client's side of the same exchange is what counts.
            _ => self.counters.dns_server_side_ignored += 1,
        }
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
        let query = chain.push_query(step as usize, qtype, at);
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
            scope.pending_order.push_back((deadline, key));
            self.pending_total += 1;
            if scope.pending_order.len() > 4 * limits.max_pending_per_scope + 16 {
                let pending = &scope.pending;
                scope
                    .pending_order
                    .retain(|(d, k)| pending.get(k).is_some_and(|p| p.deadline == *d));
            }
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
        let Some(pending) = scope.pending.get(&key) else {
            self.counters.responses_unmatched += 1;
            return;
        };
        if let Some(q) = &message.question
            && (*q.name != *pending.name || q.qtype.0 != pending.qtype)
        {
            // Same id and tuple but another question: not the answer to this query.
            self.counters.responses_mismatched += 1;
            return;
        }
        let pending = scope.pending.remove(&key).expect("looked up above");
        self.pending_total -= 1;
        // Responses come mostly in send order: drop the answered entries at the front now
        // rather than keeping them until their timeout.
        while let Some((deadline, k)) = scope.pending_order.front() {
            if scope
                .pending
                .get(k)
                .is_some_and(|p| p.deadline == *deadline)
            {
                break;
            }
            scope.pending_order.pop_front();
        }
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
                    let names = match self.in_cluster_seen.get_mut(&*scope.drift_key) {
                        Some(names) => Some(names),
                        None if room => Some(
                            self.in_cluster_seen
                                .entry(scope.drift_key.clone())
                                .or_default(),
                        ),
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
        for (_, ttl) in lookup.addresses(&pending.name, msg) {
            let expires_at = at + u64::from(ttl) * 1_000_000_000;
            latest = latest.max(expires_at + grace);
        }
        chain.free_at = latest;
        let (slot, generation) = (pending.slot, pending.generation);
        for (ip, ttl) in lookup.addresses(&pending.name, msg) {
            let expires_at = at + u64::from(ttl) * 1_000_000_000;
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
                            drift = self
                                .in_cluster_seen
                                .get(&*scope.drift_key)
                                .and_then(|names| names.get(&*materialized.query_name))
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
        let egress = !ip.is_loopback()
            && !self
                .config
                .cluster_networks
                .iter()
                .any(|net| net.contains(&ip));
        let flagged = egress
            && matches!(
                resolution,
                Resolution::SearchEscape | Resolution::CnameEscape
            );
        let deadline = open.at + self.config.connect_timeout_ns;
        let record = ConnectionRecord {
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
        };
        if self.connects.len() >= limits.max_open_connects_total
            && !self.connects.contains_key(&open.sock_id)
        {
            self.evict_oldest_connect();
        }
        let previous = self.connects.insert(
            open.sock_id,
            OpenConnect {
                record,
                deadline,
                scope: scope_ref,
            },
        );
        if let Some(prev) = previous {
            self.release_connect_slot(prev.scope);
        }
        self.connect_order.push_back((deadline, open.sock_id));
        if self.connect_order.len() > 2 * limits.max_open_connects_total + 1024 {
            let connects = &self.connects;
            self.connect_order
                .retain(|(d, id)| connects.get(id).is_some_and(|c| c.deadline == *d));
        }
    }

    /// The open's outcome: the connection's record, or `None` for an unknown socket.
    pub fn connect_outcome(&mut self, outcome: ConnectOutcome) -> Option<ConnectionRecord> {
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
        while let Some((deadline, id)) = self.connect_order.pop_front() {
            if self
                .connects
                .get(&id)
                .is_some_and(|c| c.deadline == deadline)
            {
                let c = self.connects.remove(&id).expect("checked");
                self.release_connect_slot(c.scope);
                self.counters.connects_evicted_cap += 1;
                return;
            }
        }
    }

    /// Advances time: returns the queries that timed out unanswered, expires answers,
    /// chains, connects without outcome and idle scopes. Cost is proportional to what
    /// expires (plus one visit per scope with a due deadline).
    pub fn tick(&mut self, now: BootNs) -> Vec<UnansweredQuery> {
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

/// The scope's id and state, created (and scheduled for its idle check) on first sight.
/// One hash lookup, no key clone, on the hot path; the fields are passed apart so that
/// callers keep the others.
fn scope_entry<'a>(
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
                pinned: false,
                pending: FastMap::default(),
                pending_order: VecDeque::new(),
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

/// Makes sure `tick` visits the scope no later than its earliest deadline (`now` as in
/// [`Correlator::reschedule_after`], 0 outside `tick`).
fn schedule(
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

/// Indexes one address of a scope's answer; the most recent answer for an address wins.
/// Caps make room by evicting the scope's oldest chain (never the one being indexed).
fn index_answer(
    scope: &mut Scope,
    answers_total: &mut usize,
    counters: &mut CoreCounters,
    limits: &CoreLimits,
    ip: IpAddr,
    answer: AnswerRef,
) {
    let key = AddrKey::from(ip);
    if let Some(existing) = scope.index.get_mut(&key) {
        *existing = answer;
        return;
    }
    while scope.index.len() >= limits.max_answers_per_scope
        || *answers_total >= limits.max_answers_total
    {
        let scope_full = scope.index.len() >= limits.max_answers_per_scope;
        let removed = evict_oldest_chain(scope, Some((answer.slot, answer.generation)));
        if removed.chains == 0 {
            counters.answers_dropped_cap += 1;
            return;
        }
        *answers_total -= removed.answers;
        counters.chains_evicted_cap += u64::from(removed.chains);
        if scope_full {
            counters.answers_evicted_scope_cap += removed.answers as u64;
        } else {
            counters.answers_evicted_total_cap += removed.answers as u64;
        }
    }
    scope.index.insert(key, answer);
    *answers_total += 1;
}

fn insert_chain(scope: &mut Scope, chain: Chain) -> (u32, u32) {
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
    (slot, generation)
}

/// Frees a chain and the index entries still pointing at it; returns how many.
fn free_chain(scope: &mut Scope, slot: u32) -> usize {
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

struct Evicted {
    chains: u32,
    answers: usize,
}

/// Frees the scope's oldest chain, never `keep`.
fn evict_oldest_chain(scope: &mut Scope, keep: Option<(u32, u32)>) -> Evicted {
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

fn pop_oldest_pending(scope: &mut Scope) -> Option<Pending> {
    while let Some((deadline, key)) = scope.pending_order.pop_front() {
        if scope
            .pending
            .get(&key)
            .is_some_and(|p| p.deadline == deadline)
        {
            return scope.pending.remove(&key);
        }
    }
    None
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
