//! The core's inputs, outputs, settings and counters.
use std::net::SocketAddr;

use compact_str::CompactString;
use ipnet::IpNet;

use crate::{
    dns::DnsMessage,
    record::{BootNs, Outcome},
    scope::ScopeKey,
};

pub use observer_common::Direction;

/// A DNS message seen by a socket of `scope`. Only queries sent (egress, QR=0) and
/// responses received (ingress, QR=1) are a client's; the server's view is ignored.
#[derive(Clone, Debug)]
pub struct DnsObservation {
    pub scope: ScopeKey,
    pub at: BootNs,
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub message: DnsMessage,
}

/// A TCP active open.
#[derive(Clone, Debug)]
pub struct ConnectOpen {
    pub scope: ScopeKey,
    /// Joins the open to its outcome.
    pub sock_id: u64,
    pub at: BootNs,
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: CompactString,
    /// What the application asked for (before any socket-level rewrite).
    pub destination: SocketAddr,
    pub source: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug)]
pub struct ConnectOutcome {
    pub sock_id: u64,
    pub at: BootNs,
    pub outcome: Outcome,
    /// The local address once bound, if the open did not know it.
    pub source: Option<SocketAddr>,
}

/// A pod's resolv.conf as far as name completion goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverConfig {
    pub search: Vec<String>,
    pub ndots: u8,
}

/// A query that got no response within the query timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnansweredQuery {
    pub scope: ScopeKey,
    /// The name on the wire (lower case, no trailing dot).
    pub name: String,
    pub qtype: String,
    /// What the application asked for, when the chain is still known.
    pub query_name: Option<String>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub sent_at: BootNs,
    /// The `tick` time at which it was declared unanswered.
    pub expired_at: BootNs,
}

/// A new scope could not be tracked: the scope cap is reached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot track {scope}: {limit} scopes already tracked")]
pub struct ScopeLimitReached {
    pub scope: ScopeKey,
    pub limit: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreLimits {
    pub max_scopes: usize,
    pub max_answers_total: usize,
    pub max_answers_per_scope: usize,
    pub max_pending_total: usize,
    pub max_pending_per_scope: usize,
    pub max_open_connects_total: usize,
    pub max_open_connects_per_scope: usize,
    pub max_chains_per_scope: usize,
    /// Chains of a scope that still accept the next query of a search-list walk.
    pub max_open_chains_per_scope: usize,
    pub max_drift_entries: usize,
    pub max_cname_hops: usize,
}

impl Default for CoreLimits {
    fn default() -> Self {
        Self {
            max_scopes: 65_536,
            max_answers_total: 2_000_000,
            max_answers_per_scope: 4096,
            max_pending_total: 262_144,
            max_pending_per_scope: 512,
            max_open_connects_total: 262_144,
            max_open_connects_per_scope: 4096,
            max_chains_per_scope: 2048,
            max_open_chains_per_scope: 16,
            max_drift_entries: 262_144,
            max_cname_hops: 8,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CorrelatorConfig {
    /// Lower case, no trailing dot.
    pub cluster_domain: String,
    /// Destinations outside all of these are egress.
    pub cluster_networks: Vec<IpNet>,
    /// How long past its TTL an answer still names a connect.
    pub answer_grace_ns: u64,
    /// A query without a response after this long is reported unanswered.
    pub query_timeout_ns: u64,
    /// How long after its last query a chain accepts the next name of its walk.
    pub chain_window_ns: u64,
    /// An open without outcome after this long is dropped (counted, not emitted).
    pub connect_timeout_ns: u64,
    /// An empty scope that identity did not configure is forgotten after this long.
    pub scope_idle_ns: u64,
    pub limits: CoreLimits,
}

impl Default for CorrelatorConfig {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            // Private ranges: the usual pod and service CIDRs. Deployments set their own.
            cluster_networks: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
                .iter()
                .map(|n| n.parse().expect("literal CIDR"))
                .collect(),
            answer_grace_ns: 10_000_000_000,
            query_timeout_ns: 5_000_000_000,
            chain_window_ns: 10_000_000_000,
            connect_timeout_ns: 180_000_000_000,
            scope_idle_ns: 600_000_000_000,
            limits: CoreLimits::default(),
        }
    }
}

/// Everything the core counted; plain monotonic u64 fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreCounters {
    pub dns_messages: u64,
    pub parse_empty: u64,
    pub parse_truncated: u64,
    pub parse_bad_counts: u64,
    pub parse_bad_name: u64,
    pub parse_bad_record: u64,
    /// Queries received and responses sent: the DNS server's side of an exchange.
    pub dns_server_side_ignored: u64,
    pub queries: u64,
    pub queries_unanswered: u64,
    pub queries_evicted_cap: u64,
    pub queries_dropped_cap: u64,
    pub responses: u64,
    pub responses_unmatched: u64,
    /// Matched id and tuple but asked another question.
    pub responses_mismatched: u64,
    /// Matched a query whose chain was already evicted.
    pub responses_orphaned: u64,
    pub responses_answers_capped: u64,
    pub chains_started: u64,
    pub chains_expired: u64,
    pub chains_evicted_cap: u64,
    pub answers_expired: u64,
    pub answers_evicted_scope_cap: u64,
    pub answers_evicted_total_cap: u64,
    pub answers_dropped_cap: u64,
    pub connects_joined: u64,
    /// The destination was in an answer, but past TTL + grace.
    pub connects_answer_expired: u64,
    /// The destination's answer pointed to a chain evicted since.
    pub connects_answer_evicted: u64,
    pub connects_expired: u64,
    pub connects_evicted_cap: u64,
    pub connects_dropped_cap: u64,
    pub outcomes_unmatched: u64,
    pub scopes_refused: u64,
    pub scopes_idle_evicted: u64,
    pub drift_entries_dropped: u64,
}
