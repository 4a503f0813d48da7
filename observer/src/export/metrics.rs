//! Prometheus metrics. Label sets are bounded by design: no pod names, no IP addresses, and
//! every label fed by the outside world (namespaces, workloads, names) is capped, overflowing
//! into `_other`, so a pod resolving random names cannot blow up the series count.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{Enriched, ExportIdentity};
use crate::{record::ResolutionChain, scope::ScopeKey};

/// Label value for anything past its cap.
pub const OVERFLOW: &str = "_other";
const HOST_NAMESPACE: &str = "_host";
const UNKNOWN: &str = "_unknown";

/// Why spans are dropped (label `reason` of `observer_spans_dropped_total`).
pub(crate) const DROP_REASONS: [&str; 4] = ["queue_full", "export_failed", "rejected", "stopped"];
/// Why an export attempt failed (label `reason` of `observer_span_export_failures_total`).
pub(crate) const FAILURE_REASONS: [&str; 6] = [
    "unavailable",
    "timeout",
    "throttled",
    "transient",
    "rejected",
    "io",
];

/// Upper bounds in seconds, after OpenTelemetry's advice for short network calls.
const LOOKUP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Caps on distinct label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsLimits {
    pub namespaces: usize,
    /// Distinct (namespace, workload) pairs across the node.
    pub workloads: usize,
    /// Distinct `server_address` (and `query_name`, `search_domain`) values per workload.
    pub names_per_workload: usize,
    /// Distinct values of small enumerations (rcode, parse error kind, program, reason...).
    pub small_sets: usize,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        Self {
            namespaces: 200,
            workloads: 1000,
            names_per_workload: 100,
            small_sets: 64,
        }
    }
}

/// What the agent knows about its pod metadata source; exported as a 0/1 gauge per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrichmentState {
    /// Pod metadata comes from the Kubernetes API.
    Kube,
    /// No API: pods are known by UID from their cgroup path only.
    CgroupOnly,
    /// The API watch is failing; metadata may be stale.
    Degraded,
}

impl EnrichmentState {
    const ALL: [EnrichmentState; 3] = [Self::Kube, Self::CgroupOnly, Self::Degraded];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kube => "kube",
            Self::CgroupOnly => "cgroup-only",
            Self::Degraded => "degraded",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    namespace: String,
    workload: String,
    resolution: String,
    egress: String,
    flagged: String,
    server_address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlaggedLabels {
    namespace: String,
    workload: String,
    resolution: String,
    query_name: String,
    search_domain: String,
    server_address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    namespace: String,
    workload: String,
    server_address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    namespace: String,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    namespace: String,
    workload: String,
    rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    program: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type HistogramFamily = Family<SourceLabels, Histogram, fn() -> Histogram>;

/// The registry and every series observer exports. Shared as `Arc<Metrics>`.
/// Why a DNS response answered none of a pod's pending queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmatchedReason {
    NoQuery,
    OtherQuestion,
    ChainEvicted,
}

impl UnmatchedReason {
    pub const ALL: [UnmatchedReason; 3] = [
        UnmatchedReason::NoQuery,
        UnmatchedReason::OtherQuestion,
        UnmatchedReason::ChainEvicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UnmatchedReason::NoQuery => "no_query",
            UnmatchedReason::OtherQuestion => "other_question",
            UnmatchedReason::ChainEvicted => "chain_evicted",
        }
    }
}

/// Why the core could not name a connect's destination although DNS had been seen for it, or
/// could not pair an outcome with its open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnjoinedReason {
    AnswerExpired,
    AnswerEvicted,
    OutcomeWithoutOpen,
}

impl UnjoinedReason {
    pub const ALL: [UnjoinedReason; 3] = [
        UnjoinedReason::AnswerExpired,
        UnjoinedReason::AnswerEvicted,
        UnjoinedReason::OutcomeWithoutOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UnjoinedReason::AnswerExpired => "answer_expired",
            UnjoinedReason::AnswerEvicted => "answer_evicted",
            UnjoinedReason::OutcomeWithoutOpen => "outcome_without_open",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    connections: Family<ConnectionLabels, Counter>,
    flagged: Family<FlaggedLabels, Counter>,
    drift: Family<DriftLabels, Counter>,
    dns_responses: Family<RcodeLabels, Counter>,
    wasted_queries: Family<SourceLabels, Counter>,
    unanswered_queries: Family<SourceLabels, Counter>,
    external_dns: Family<SourceLabels, Counter>,
    lookup_duration: HistogramFamily,
    kernel_lost: Family<LossLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Family<ReasonLabels, Counter>,
    export_failures: Family<ReasonLabels, Counter>,
    enrichment: Family<StateLabels, Gauge>,
    parse_errors: Family<KindLabels, Counter>,
    evictions: Family<KindLabels, Counter>,
    unmatched_responses: Family<ReasonLabels, Counter>,
    unjoined_connects: Family<ReasonLabels, Counter>,
    dns_server_side: Counter,
    caps: Mutex<Caps>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_limits(MetricsLimits::default())
    }

    pub fn with_limits(limits: MetricsLimits) -> Self {
        let mut registry = Registry::with_prefix("observer");
        let connections = Family::default();
        registry.register(
            "connections",
            "Correlated TCP connections by how their destination's name was resolved",
            connections.clone(),
        );
        let flagged = Family::default();
        registry.register(
            "flagged_connections",
            "Egress connections whose name escaped the cluster through a search domain or a CNAME",
            flagged.clone(),
        );
        let drift = Family::default();
        registry.register(
            "drift_connections",
            "Connections to a name this workload resolved in-cluster before and outside now",
            drift.clone(),
        );
        let dns_responses = Family::default();
        registry.register(
            "dns_responses",
            "DNS responses seen, by response code",
            dns_responses.clone(),
        );
        let wasted_queries = Family::default();
        registry.register(
            "dns_wasted_queries",
            "Search-list names tried without an address before the one that answered (A/AAAA pairs count once)",
            wasted_queries.clone(),
        );
        let unanswered_queries = Family::default();
        registry.register(
            "dns_unanswered_queries",
            "DNS queries that never got a response",
            unanswered_queries.clone(),
        );
        let external_dns = Family::default();
        registry.register(
            "dns_external_server_responses",
            "DNS responses a pod received from a server outside the cluster networks (not loopback or link-local): a resolver that bypasses cluster DNS",
            external_dns.clone(),
        );
        let lookup_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(LOOKUP_BUCKETS));
        registry.register_with_unit(
            "dns_lookup_duration",
            "Time from the first query of a resolution chain to its last answer",
            Unit::Seconds,
            lookup_duration.clone(),
        );
        let kernel_lost = Family::default();
        registry.register(
            "kernel_events_lost",
            "Kernel events lost before reaching observer, by program and reason",
            kernel_lost.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Connection traces accepted by the OTLP collector or written to the JSON file",
            spans_exported.clone(),
        );
        let spans_dropped = Family::default();
        registry.register(
            "spans_dropped",
            "Connection traces dropped before export, by reason",
            spans_dropped.clone(),
        );
        let export_failures = Family::default();
        registry.register(
            "span_export_failures",
            "Failed export attempts (each retry counts), by reason",
            export_failures.clone(),
        );
        let enrichment = Family::default();
        registry.register(
            "enrichment_status",
            "1 for the current pod metadata source state, 0 for the others",
            enrichment.clone(),
        );
        let parse_errors = Family::default();
        registry.register(
            "dns_parse_errors",
            "DNS messages that could not be parsed, by kind",
            parse_errors.clone(),
        );
        let evictions = Family::default();
        registry.register(
            "core_evictions",
            "Entries the correlation core evicted to stay within its memory bounds, by kind",
            evictions.clone(),
        );
        let unmatched_responses = Family::default();
        registry.register(
            "dns_unmatched_responses",
            "DNS responses seen by a pod that answered none of its pending queries, by reason",
            unmatched_responses.clone(),
        );
        let unjoined_connects = Family::default();
        registry.register(
            "unjoined_connects",
            "TCP connects whose DNS answer the core had seen but could not use, and outcomes \
             whose open it never saw, by reason",
            unjoined_connects.clone(),
        );
        let dns_server_side = Counter::default();
        registry.register(
            "dns_server_side_messages",
            "DNS messages of a server's side (queries received, responses sent), left unread: \
             the client's side of the same exchange is what observer follows; over UDP the \
             kernel programs skip them before the ring",
            dns_server_side.clone(),
        );
        let metrics = Self {
            registry,
            connections,
            flagged,
            drift,
            dns_responses,
            wasted_queries,
            unanswered_queries,
            external_dns,
            lookup_duration,
            kernel_lost,
            spans_exported,
            spans_dropped,
            export_failures,
            enrichment,
            parse_errors,
            evictions,
            unmatched_responses,
            unjoined_connects,
            dns_server_side,
            caps: Mutex::new(Caps::new(limits)),
        };
        // Export health series exist from the start, so `rate()` and alert rules see zeros.
        for reason in DROP_REASONS {
            metrics.spans_dropped(reason, 0);
        }
        for reason in UnmatchedReason::ALL {
            metrics.set_unmatched_responses(reason, 0);
        }
        for reason in UnjoinedReason::ALL {
            metrics.set_unjoined_connects(reason, 0);
        }
        for reason in FAILURE_REASONS {
            metrics
                .export_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        // Every state is present from the start, so alert rules never see a missing series.
        for state in EnrichmentState::ALL {
            metrics
                .enrichment
                .get_or_create(&StateLabels {
                    state: state.as_str().to_owned(),
                })
                .set(0);
        }
        metrics
    }

    /// The registry in the text exposition format (OpenMetrics 1.0, which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one correlated connection. A resolution chain shared by several connections
    /// feeds the DNS series (wasted queries, lookup duration) once.
    pub fn observe_connection(&self, enriched: &Enriched) {
        let record = &enriched.record;
        let mut caps = self.caps();
        let source = caps.source(&enriched.identity, &record.comm);
        let chain = record.chain.as_ref();
        let server_address = chain.map_or(String::new(), |c| {
            caps.name(&source, NameKind::Server, &c.server_address)
        });
        self.connections
            .get_or_create(&ConnectionLabels {
                namespace: source.namespace.clone(),
                workload: source.workload.clone(),
                resolution: record.resolution.as_str().to_owned(),
                egress: record.egress.to_string(),
                flagged: record.flagged.to_string(),
                server_address: server_address.clone(),
            })
            .inc();
        if record.flagged {
            let query_name = chain.map_or(String::new(), |c| {
                caps.name(&source, NameKind::Query, &c.query_name)
            });
            let search_domain = chain
                .and_then(|c| c.search_domain.as_deref())
                .map_or(String::new(), |d| caps.name(&source, NameKind::Domain, d));
            self.flagged
                .get_or_create(&FlaggedLabels {
                    namespace: source.namespace.clone(),
                    workload: source.workload.clone(),
                    resolution: record.resolution.as_str().to_owned(),
                    query_name,
                    search_domain,
                    server_address: server_address.clone(),
                })
                .inc();
        }
        if record.drift {
            self.drift
                .get_or_create(&DriftLabels {
                    namespace: source.namespace.clone(),
                    workload: source.workload.clone(),
                    server_address,
                })
                .inc();
        }
        if let Some(chain) = chain
            && caps.first_sight(&record.scope, chain)
        {
            if chain.wasted_queries > 0 {
                self.wasted_queries
                    .get_or_create(&source)
                    .inc_by(chain.wasted_queries.into());
            }
            if let Some(seconds) = lookup_seconds(chain) {
                self.lookup_duration.get_or_create(&source).observe(seconds);
            }
        }
    }

    /// Counts `responses` DNS responses seen for `identity` (`comm` names node processes).
    /// The agent tallies responses per cgroup and code and adds them here at each tick.
    pub fn observe_dns_responses(
        &self,
        identity: &ExportIdentity,
        comm: &str,
        rcode: &str,
        responses: u64,
    ) {
        let mut caps = self.caps();
        let source = caps.source(identity, comm);
        let rcode = caps.small(SmallSet::Rcode, rcode);
        self.dns_responses
            .get_or_create(&RcodeLabels {
                namespace: source.namespace,
                workload: source.workload,
                rcode,
            })
            .inc_by(responses);
    }

    /// Counts `responses` DNS responses a pod received from a server outside the cluster
    /// networks (tallied by the agent, like the responses by code).
    pub fn observe_external_dns_responses(&self, identity: &ExportIdentity, responses: u64) {
        let source = self.caps().source(identity, "");
        self.external_dns.get_or_create(&source).inc_by(responses);
    }

    /// Counts one query the DNS side gave up waiting for.
    pub fn observe_unanswered_query(&self, identity: &ExportIdentity, comm: &str) {
        let source = self.caps().source(identity, comm);
        self.unanswered_queries.get_or_create(&source).inc();
    }

    pub fn observe_dns_parse_error(&self, kind: &str) {
        let kind = self.caps().small(SmallSet::ParseKind, kind);
        self.parse_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Sets the lost-event total that the kernel counted for `program`/`reason`.
    pub fn set_kernel_events_lost(&self, program: &str, reason: &str, total: u64) {
        let mut caps = self.caps();
        let labels = LossLabels {
            program: caps.small(SmallSet::Program, program),
            reason: caps.small(SmallSet::LossReason, reason),
        };
        drop(caps);
        raise_to(&self.kernel_lost.get_or_create(&labels), total);
    }

    /// Sets the total of DNS messages left unread as a server's side.
    pub fn set_dns_server_side_messages(&self, total: u64) {
        raise_to(&self.dns_server_side, total);
    }

    /// Sets the total of evictions of `kind` that the correlation core reports.
    pub fn set_core_evictions(&self, kind: &str, total: u64) {
        let kind = self.caps().small(SmallSet::EvictionKind, kind);
        raise_to(&self.evictions.get_or_create(&KindLabels { kind }), total);
    }

    /// Sets the total of responses the correlation core could not use, by `reason`:
    /// `no_query` (no pending query with that id and 4-tuple), `other_question` (the id and
    /// 4-tuple matched, the question did not), `chain_evicted` (the query's chain was evicted
    /// before the answer came). A fixed set of reasons: no cap needed.
    pub fn set_unmatched_responses(&self, reason: UnmatchedReason, total: u64) {
        let labels = ReasonLabels {
            reason: reason.as_str().to_owned(),
        };
        raise_to(&self.unmatched_responses.get_or_create(&labels), total);
    }

    /// Sets the total of connects (or outcomes) the core could not join, by `reason`; a fixed
    /// set of reasons: no cap needed.
    pub fn set_unjoined_connects(&self, reason: UnjoinedReason, total: u64) {
        let labels = ReasonLabels {
            reason: reason.as_str().to_owned(),
        };
        raise_to(&self.unjoined_connects.get_or_create(&labels), total);
    }

    pub fn set_enrichment_state(&self, current: EnrichmentState) {
        for state in EnrichmentState::ALL {
            self.enrichment
                .get_or_create(&StateLabels {
                    state: state.as_str().to_owned(),
                })
                .set(i64::from(state == current));
        }
    }

    pub fn spans_exported(&self, spans: u64) {
        self.spans_exported.inc_by(spans);
    }

    pub fn spans_dropped(&self, reason: &'static str, spans: u64) {
        self.spans_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(spans);
    }

    pub fn span_export_failure(&self, reason: &'static str) {
        self.export_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    fn caps(&self) -> MutexGuard<'_, Caps> {
        // A panic elsewhere while holding the lock leaves the sets usable: recover them.
        self.caps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters only go up: a total read from elsewhere raises ours by the difference.
fn raise_to(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn lookup_seconds(chain: &ResolutionChain) -> Option<f64> {
    let first = chain.queries.iter().map(|q| q.sent_at).min()?;
    let last = chain.queries.iter().filter_map(|q| q.answered_at).max()?;
    Some(last.saturating_sub(first) as f64 / 1e9)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum NameKind {
    Server,
    Query,
    Domain,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum SmallSet {
    Rcode,
    ParseKind,
    Program,
    LossReason,
    EvictionKind,
}

/// How many recent chains are remembered to count each chain once.
const SEEN_CHAINS: usize = 4096;

struct Caps {
    limits: MetricsLimits,
    namespaces: HashSet<String>,
    workloads: HashSet<(String, String)>,
    names: HashMap<(SourceLabels, NameKind), HashSet<String>>,
    small: HashMap<SmallSet, HashSet<String>>,
    seen_chains: HashSet<(ScopeKey, u64, Arc<str>)>,
    seen_order: VecDeque<(ScopeKey, u64, Arc<str>)>,
}

impl Caps {
    fn new(limits: MetricsLimits) -> Self {
        Self {
            limits,
            namespaces: HashSet::new(),
            workloads: HashSet::new(),
            names: HashMap::new(),
            small: HashMap::new(),
            seen_chains: HashSet::new(),
            seen_order: VecDeque::new(),
        }
    }

    /// `namespace`/`workload` labels: the pod's namespace and top controller; node processes
    /// are `_host`/<command>; pods known only by UID are `_unknown`.
    fn source(&mut self, identity: &ExportIdentity, comm: &str) -> SourceLabels {
        let (namespace, workload) = match &identity.pod {
            None => (HOST_NAMESPACE, comm),
            Some(pod) => (
                pod.namespace.as_deref().unwrap_or(UNKNOWN),
                pod.workload.as_ref().map_or(UNKNOWN, |w| w.name.as_str()),
            ),
        };
        let namespace = admit(&mut self.namespaces, self.limits.namespaces, namespace);
        if namespace == OVERFLOW {
            return SourceLabels {
                namespace,
                workload: OVERFLOW.to_owned(),
            };
        }
        let key = (namespace.clone(), workload.to_owned());
        // Known nearly always: hashed once then, not again by an insert.
        let workload = if self.workloads.contains(&key) {
            workload.to_owned()
        } else if self.workloads.len() < self.limits.workloads {
            self.workloads.insert(key);
            workload.to_owned()
        } else {
            OVERFLOW.to_owned()
        };
        SourceLabels {
            namespace,
            workload,
        }
    }

    fn name(&mut self, source: &SourceLabels, kind: NameKind, value: &str) -> String {
        let limit = self.limits.names_per_workload;
        let set = self.names.entry((source.clone(), kind)).or_default();
        admit(set, limit, value)
    }

    fn small(&mut self, set: SmallSet, value: &str) -> String {
        let limit = self.limits.small_sets;
        admit(self.small.entry(set).or_default(), limit, value)
    }

    /// True the first time a chain is seen (within the last `SEEN_CHAINS` chains).
    fn first_sight(&mut self, scope: &ScopeKey, chain: &ResolutionChain) -> bool {
        let first_sent = chain.queries.first().map_or(0, |q| q.sent_at);
        let key = (scope.clone(), first_sent, chain.query_name.clone());
        if self.seen_chains.contains(&key) {
            return false;
        }
        if self.seen_order.len() == SEEN_CHAINS
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen_chains.remove(&old);
        }
        self.seen_chains.insert(key.clone());
        self.seen_order.push_back(key);
        true
    }
}

fn admit(set: &mut HashSet<String>, limit: usize, value: &str) -> String {
    if set.contains(value) {
        return value.to_owned();
    }
    if set.len() < limit {
        set.insert(value.to_owned());
        return value.to_owned();
    }
    OVERFLOW.to_owned()
}
