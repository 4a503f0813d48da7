//! What the correlation core produces and the exporters consume: one correlated TCP
//! connection, with the DNS that led to it. Timestamps are kernel CLOCK_BOOTTIME
//! nanoseconds (`BootNs`); exporters turn them into wall-clock time.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use crate::dns::{QType, Rcode};
use compact_str::CompactString;

use crate::scope::ScopeKey;

/// Nanoseconds of CLOCK_BOOTTIME, as stamped by the kernel programs.
pub type BootNs = u64;

/// How the TCP active open ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Established,
    /// A RST answered the SYN.
    Refused,
    /// Closed before establishment without a RST (timed out, unreachable, abandoned).
    Timeout,
    /// Reset after it was established, before observer reported it.
    Reset,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Reset => "reset",
        }
    }
}

/// How the destination's name came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The name that answered lies in the cluster domain.
    InCluster,
    /// A relative name completed by a search domain outside the cluster domain.
    SearchEscape,
    /// The application asked for a name outside the cluster domain itself.
    External,
    /// A name in the cluster domain answered with a CNAME that leaves it.
    CnameEscape,
    /// A CNAME out of the cluster that a Service of type ExternalName declares (known from
    /// the Kubernetes API): intended egress, not flagged. Without the API it is `CnameEscape`.
    DeclaredEgress,
    /// No DNS answer of this scope contained the destination (IP literal, or unseen).
    None,
}

impl Resolution {
    pub const fn as_str(self) -> &'static str {
        match self {
            Resolution::InCluster => "in-cluster",
            Resolution::SearchEscape => "search-escape",
            Resolution::External => "external",
            Resolution::CnameEscape => "cname-escape",
            Resolution::DeclaredEgress => "declared-egress",
            Resolution::None => "none",
        }
    }
}

/// One address or CNAME target of a DNS answer; `Display` gives its text form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// v4-mapped IPv6 addresses are kept as IPv4.
    Address(IpAddr),
    /// Lower case, without the trailing dot.
    Cname(Arc<str>),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Address(ip) => fmt::Display::fmt(ip, f),
            Answer::Cname(target) => f.write_str(target),
        }
    }
}

/// One DNS query of a resolution chain, with its response when one came. Names are shared
/// with the correlation core, so that building a record copies no text.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsQueryRecord {
    /// Fully qualified, without the trailing dot, lower case.
    pub name: Arc<str>,
    /// Record type; `mnemonic()` gives "A", "AAAA", ...
    pub qtype: QType,
    /// The DNS server the query was sent to.
    pub server: IpAddr,
    /// Response code (`mnemonic()`: "NOERROR", "NXDOMAIN", ...), `None` if never answered.
    pub rcode: Option<Rcode>,
    /// Addresses and CNAME targets in the answer, in answer order.
    pub answers: Box<[Answer]>,
    pub sent_at: BootNs,
    pub answered_at: Option<BootNs>,
    /// The response had TC set: the resolver asks the same question again (over TCP).
    pub truncated: bool,
}

/// A pod's walk through its search list for one name the application asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolutionChain {
    /// What the application asked for, as it asked: `db`, or `db.another-lab.com.`.
    pub query_name: Arc<str>,
    /// The name whose answer held the destination (before any CNAME): `db.another-lab.com`.
    pub server_address: Arc<str>,
    /// The search domain that completed `query_name`, if one did.
    pub search_domain: Option<Arc<str>>,
    /// CNAME targets followed from `server_address`, in order.
    pub cname_chain: Vec<Arc<str>>,
    /// Names tried before the answer that got no address (A/AAAA pairs count once).
    pub wasted_queries: u32,
    /// A name with dots walked the search list because it had fewer than `ndots` dots.
    pub ndots_walk: bool,
    /// Every query of the chain in the order sent. Shared with the correlation core's
    /// chain: a connect's record costs no copy of it (`Arc::make_mut` to change one).
    pub queries: Arc<Vec<DnsQueryRecord>>,
}

impl ResolutionChain {
    /// The DNS server whose answer held the destination: the server of the first query of
    /// `server_address` answered with an address.
    pub fn answered_by(&self) -> Option<IpAddr> {
        self.queries
            .iter()
            .find(|q| {
                q.name == self.server_address
                    && q.answers.iter().any(|a| matches!(a, Answer::Address(_)))
            })
            .map(|q| q.server)
    }
}

/// One TCP active open, joined to the DNS that named its destination, classified.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionRecord {
    pub scope: ScopeKey,
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: CompactString,
    /// The address the application asked for.
    pub destination: SocketAddr,
    pub source: Option<SocketAddr>,
    pub opened_at: BootNs,
    pub outcome: Outcome,
    pub outcome_at: BootNs,
    pub resolution: Resolution,
    /// Shared by every connection joined to the same resolution: built once per chain.
    pub chain: Option<Arc<ResolutionChain>>,
    /// The destination is outside every configured cluster network.
    pub egress: bool,
    /// Egress reached through a search-domain escape or a CNAME out of the cluster domain.
    pub flagged: bool,
    /// This scope's workload resolved the same name in-cluster before, and outside now.
    pub drift: bool,
    /// The answer came from a DNS server outside the cluster networks (not the node's own
    /// or a node-local cache): the pod bypasses cluster DNS ([`ResolutionChain::answered_by`]).
    pub dns_from_outside: bool,
}

impl ConnectionRecord {
    /// The destination's address, for joins and metrics.
    pub fn peer_ip(&self) -> IpAddr {
        self.destination.ip()
    }
}
