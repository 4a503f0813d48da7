//! The core driven with real DNS wire bytes, shaped as glibc sends queries (A and AAAA
//! from one socket, separate ids) and as dnsmasq answers (NXDOMAIN with an SOA).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::*;
use crate::{
    dns::build::{WireAnswer, query, response},
    record::{Answer, ConnectionRecord, Outcome, QType, Rcode, Resolution},
};

const SEC: u64 = 1_000_000_000;
const SEARCH: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
const A: u16 = 1;
const AAAA: u16 = 28;
const NOERROR: u16 = 0;
const NXDOMAIN: u16 = 3;

fn config() -> CorrelatorConfig {
    CorrelatorConfig {
        cluster_networks: vec![
            "198.18.0.0/15".parse().unwrap(),
            "fd00:198:18::/48".parse().unwrap(),
        ],
        ..CorrelatorConfig::default()
    }
}

fn pod(uid: &str) -> ScopeKey {
    ScopeKey::Pod(Arc::from(uid))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A pod's stub resolver: one UDP socket, ids counting up, a clock moving 1 ms a message.
struct Client {
    scope: ScopeKey,
    addr: SocketAddr,
    server: SocketAddr,
    next_id: u16,
    now: u64,
}

/// What the server answers for one name: NXDOMAIN, or addresses (and CNAMEs).
#[derive(Clone)]
enum Reply {
    Nx,
    NoData,
    Addrs(Vec<WireAnswer>),
    Silent,
}

fn addr(owner: &str, ttl: u32, ip_text: &str) -> WireAnswer {
    WireAnswer::Addr {
        owner: owner.into(),
        ttl,
        ip: ip(ip_text),
    }
}

impl Client {
    fn new(uid: &str, client_ip: &str) -> Self {
        Self {
            scope: pod(uid),
            addr: SocketAddr::new(ip(client_ip), 40000),
            server: "198.18.0.10:53".parse().unwrap(),
            next_id: 0x100,
            now: 100 * SEC,
        }
    }

    fn tick(&mut self) -> u64 {
        self.now += 1_000_000;
        self.now
    }

    fn send(&mut self, c: &mut Correlator, name: &str, qtype: u16) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        let at = self.tick();
        c.observe_dns_wire(
            &self.scope,
            at,
            Direction::Egress,
            self.addr,
            self.server,
            &query(id, name, qtype),
        )
        .unwrap();
        id
    }

    fn receive(&mut self, c: &mut Correlator, id: u16, name: &str, qtype: u16, reply: &Reply) {
        let (rcode, answers, soa) = match reply {
            Reply::Nx => (NXDOMAIN, vec![], Some("cluster.local")),
            Reply::NoData => (NOERROR, vec![], Some("cluster.local")),
            Reply::Addrs(a) => (
                NOERROR,
                a.iter()
                    .filter(|w| match w {
                        WireAnswer::Addr { ip, .. } => ip.is_ipv4() == (qtype == A),
                        WireAnswer::Cname { .. } => true,
                    })
                    .cloned()
                    .collect(),
                None,
            ),
            Reply::Silent => return,
        };
        self.deliver(c, &response(id, name, qtype, rcode, &answers, soa));
    }

    /// Delivers a response's wire bytes from the server to this client.
    fn deliver(&mut self, c: &mut Correlator, bytes: &[u8]) {
        let at = self.tick();
        c.observe_dns_wire(
            &self.scope,
            at,
            Direction::Ingress,
            self.server,
            self.addr,
            bytes,
        )
        .unwrap();
    }

    /// glibc: A and AAAA for a name in parallel, then both responses.
    fn lookup(&mut self, c: &mut Correlator, name: &str, reply: Reply) {
        let a = self.send(c, name, A);
        let aaaa = self.send(c, name, AAAA);
        self.receive(c, a, name, A, &reply);
        let aaaa_reply = match &reply {
            Reply::Addrs(list)
                if !list
                    .iter()
                    .any(|w| matches!(w, WireAnswer::Addr { ip, .. } if ip.is_ipv6())) =>
            {
                Reply::NoData
            }
            other => other.clone(),
        };
        self.receive(c, aaaa, name, AAAA, &aaaa_reply);
    }

    /// A lookup the server answers with one address (`ttl` seconds) for `name` itself.
    fn resolve(&mut self, c: &mut Correlator, name: &str, ttl: u32, ip_text: &str) {
        self.lookup(c, name, Reply::Addrs(vec![addr(name, ttl, ip_text)]));
    }

    fn connect(
        &mut self,
        c: &mut Correlator,
        sock_id: u64,
        dest: &str,
        outcome: Outcome,
    ) -> ConnectionRecord {
        let at = self.tick();
        c.connect_open(ConnectOpen {
            scope: self.scope.clone(),
            sock_id,
            at,
            cgroup_id: 7,
            pid: 1234,
            comm: "app".into(),
            destination: dest.parse().unwrap(),
            source: None,
        });
        let at = self.tick();
        c.connect_outcome(ConnectOutcome {
            sock_id,
            at,
            outcome,
            source: Some(SocketAddr::new(self.addr.ip(), 50000)),
        })
        .expect("an open gets its record")
    }
}

fn configured(c: &mut Correlator, client: &Client, ndots: u8) {
    c.set_resolver_config(
        &client.scope,
        &ResolverConfig {
            search: SEARCH.iter().map(|s| s.to_string()).collect(),
            ndots,
        },
    )
    .unwrap();
}

/// The usual client: pod-a at 198.18.1.5 with the story's search list and `ndots`.
fn configured_pod_a(ndots: u8) -> (Correlator, Client) {
    let mut c = Correlator::new(config());
    let client = Client::new("pod-a", "198.18.1.5");
    configured(&mut c, &client, ndots);
    (c, client)
}

/// The motivating story: three NXDOMAINs, then the external search domain answers.
fn seed_story(c: &mut Correlator, client: &mut Client) {
    client.lookup(c, "db.simple-web-app.svc.cluster.local", Reply::Nx);
    client.lookup(c, "db.svc.cluster.local", Reply::Nx);
    client.lookup(c, "db.cluster.local", Reply::Nx);
    client.lookup(
        c,
        "db.another-lab.com",
        Reply::Addrs(vec![addr("db.another-lab.com", 300, "203.0.113.10")]),
    );
}

#[test]
fn seed_story_is_a_flagged_search_escape_with_or_without_resolv_conf() {
    for known in [true, false] {
        let mut c = Correlator::new(config());
        let mut client = Client::new("pod-a", "198.18.1.5");
        if known {
            configured(&mut c, &client, 5);
        }
        seed_story(&mut c, &mut client);
        let r = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);
        assert_eq!(
            r.resolution,
            Resolution::SearchEscape,
            "known config: {known}"
        );
        assert!(r.egress && r.flagged && !r.drift);
        assert_eq!(r.outcome, Outcome::Established);
        let chain = r.chain.as_ref().unwrap();
        assert_eq!(&*chain.query_name, "db");
        assert_eq!(&*chain.server_address, "db.another-lab.com");
        assert_eq!(chain.search_domain.as_deref(), Some("another-lab.com"));
        assert_eq!(chain.wasted_queries, 3);
        assert!(!chain.ndots_walk);
        assert_eq!(chain.queries.len(), 8);
        assert_eq!(
            &*chain.queries[0].name,
            "db.simple-web-app.svc.cluster.local"
        );
        assert_eq!(chain.queries[0].rcode, Some(Rcode::NXDOMAIN));
        assert_eq!(
            &*chain.queries[6].answers,
            [Answer::Address(ip("203.0.113.10"))]
        );
        assert_eq!(chain.queries[7].qtype.mnemonic(), "AAAA");
        assert_eq!(c.counters().chains_started, 1);
    }
}

#[test]
fn service_present_is_in_cluster() {
    let (mut c, mut client) = configured_pod_a(5);
    client.resolve(
        &mut c,
        "db.simple-web-app.svc.cluster.local",
        30,
        "198.18.0.20",
    );
    let r = client.connect(&mut c, 1, "198.18.0.20:5432", Outcome::Established);
    assert_eq!(r.resolution, Resolution::InCluster);
    assert!(!r.egress && !r.flagged);
    let chain = r.chain.unwrap();
    assert_eq!(&*chain.query_name, "db");
    assert_eq!(chain.wasted_queries, 0);
    assert_eq!(
        chain.search_domain.as_deref(),
        Some("simple-web-app.svc.cluster.local")
    );
}

#[test]
fn autopath_cname_out_of_the_cluster_domain_is_a_cname_escape() {
    let (mut c, mut client) = configured_pod_a(5);
    client.lookup(
        &mut c,
        "db.simple-web-app.svc.cluster.local",
        Reply::Addrs(vec![
            WireAnswer::Cname {
                owner: "db.simple-web-app.svc.cluster.local".into(),
                ttl: 30,
                target: "db.another-lab.com".into(),
            },
            addr("db.another-lab.com", 30, "203.0.113.10"),
        ]),
    );
    let r = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);
    assert_eq!(r.resolution, Resolution::CnameEscape);
    assert!(r.flagged);
    let chain = r.chain.unwrap();
    assert_eq!(&*chain.query_name, "db");
    assert_eq!(
        &*chain.server_address,
        "db.simple-web-app.svc.cluster.local"
    );
    assert_eq!(
        chain.cname_chain,
        vec![Arc::<str>::from("db.another-lab.com")]
    );
    assert_eq!(chain.wasted_queries, 0);
}

#[test]
fn aaaa_only_answer_joins_a_v6_connect() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-a", "fd00:198:18::5");
    configured(&mut c, &client, 5);
    client.lookup(&mut c, "db.simple-web-app.svc.cluster.local", Reply::Nx);
    client.lookup(&mut c, "db.svc.cluster.local", Reply::Nx);
    client.lookup(&mut c, "db.cluster.local", Reply::Nx);
    client.resolve(&mut c, "db.another-lab.com", 300, "2001:db8::10");
    let r = client.connect(&mut c, 1, "[2001:db8::10]:5432", Outcome::Established);
    assert_eq!(r.resolution, Resolution::SearchEscape);
    assert!(r.flagged);
    let chain = r.chain.unwrap();
    assert_eq!(chain.queries[6].rcode, Some(Rcode::NOERROR));
    assert!(chain.queries[6].answers.is_empty(), "A was NODATA");
    assert_eq!(
        &*chain.queries[7].answers,
        [Answer::Address(ip("2001:db8::10"))]
    );
    // A dual-stack socket asking for the v4-mapped form of an A answer joins it too.
    let mapped = "203.0.113.10"
        .parse::<std::net::Ipv4Addr>()
        .unwrap()
        .to_ipv6_mapped();
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-b", "198.18.1.6");
    configured(&mut c, &client, 5);
    seed_story(&mut c, &mut client);
    let r = client.connect(&mut c, 2, &format!("[{mapped}]:5432"), Outcome::Established);
    assert_eq!(r.resolution, Resolution::SearchEscape);
}

#[test]
fn answers_expire_after_ttl_plus_grace() {
    let cfg = config();
    let grace = cfg.answer_grace_ns;
    for (wait, joined) in [
        (30 * SEC + grace - SEC, true),
        (30 * SEC + grace + SEC, false),
    ] {
        let mut c = Correlator::new(cfg.clone());
        let mut client = Client::new("pod-a", "198.18.1.5");
        configured(&mut c, &client, 5);
        client.resolve(
            &mut c,
            "db.simple-web-app.svc.cluster.local",
            30,
            "198.18.0.20",
        );
        client.now += wait;
        let r = client.connect(&mut c, 1, "198.18.0.20:80", Outcome::Established);
        assert_eq!(r.chain.is_some(), joined, "after {wait} ns");
        if !joined {
            assert_eq!(r.resolution, Resolution::None);
            assert_eq!(c.counters().connects_answer_expired, 1);
        }
    }
}

#[test]
fn scopes_never_share_answers() {
    let mut c = Correlator::new(config());
    let mut a = Client::new("pod-a", "198.18.1.5");
    let mut b = Client::new("pod-b", "198.18.1.6");
    // CDN: different names, one address.
    a.resolve(&mut c, "img.shop.example", 60, "203.0.113.50");
    b.resolve(&mut c, "static.news.example", 60, "203.0.113.50");
    let ra = a.connect(&mut c, 1, "203.0.113.50:443", Outcome::Established);
    let rb = b.connect(&mut c, 2, "203.0.113.50:443", Outcome::Established);
    assert_eq!(&*ra.chain.unwrap().query_name, "img.shop.example");
    assert_eq!(&*rb.chain.unwrap().query_name, "static.news.example");

    // One name, different addresses per pod: each pod only knows its own.
    a.resolve(&mut c, "api.example.com", 60, "203.0.113.1");
    b.resolve(&mut c, "api.example.com", 60, "203.0.113.2");
    assert!(
        a.connect(&mut c, 3, "203.0.113.1:443", Outcome::Established)
            .chain
            .is_some()
    );
    let cross = a.connect(&mut c, 4, "203.0.113.2:443", Outcome::Established);
    assert_eq!(cross.resolution, Resolution::None);
    assert!(cross.egress && !cross.flagged);
    // A pod that resolved nothing has nothing.
    let mut stranger = Client::new("pod-c", "198.18.1.7");
    assert_eq!(
        stranger
            .connect(&mut c, 5, "203.0.113.50:443", Outcome::Established)
            .resolution,
        Resolution::None
    );
}

#[test]
fn loopback_is_never_egress() {
    let (mut c, mut client) = configured_pod_a(5);
    for (sock, dest) in [
        (1, "127.0.0.1:9464"),
        (2, "[::1]:9464"),
        (3, "[::ffff:127.0.0.1]:80"),
    ] {
        let r = client.connect(&mut c, sock, dest, Outcome::Established);
        assert!(
            !r.egress && !r.flagged,
            "{dest} counted as leaving the cluster"
        );
    }
}

#[test]
fn absolute_name_is_external_not_an_escape() {
    let (mut c, mut client) = configured_pod_a(5);
    // `db.another-lab.com.`: tried as-is although it has fewer dots than ndots.
    client.resolve(&mut c, "db.another-lab.com", 300, "203.0.113.10");
    let r = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);
    assert_eq!(r.resolution, Resolution::External);
    assert!(r.egress && !r.flagged);
    let chain = r.chain.unwrap();
    assert_eq!(&*chain.query_name, "db.another-lab.com.");
    assert_eq!(chain.search_domain, None);
}

#[test]
fn ndots_decides_whether_a_dotted_name_walks_the_search_list() {
    // ndots:1: as-is first.
    let (mut c, mut client) = configured_pod_a(1);
    client.resolve(&mut c, "api.example.com", 60, "203.0.113.7");
    let chain = client
        .connect(&mut c, 1, "203.0.113.7:443", Outcome::Established)
        .chain
        .unwrap();
    assert_eq!(
        (&*chain.query_name, chain.wasted_queries, chain.ndots_walk),
        ("api.example.com", 0, false)
    );

    // ndots:5: every search domain first, then as-is.
    let (mut c, mut client) = configured_pod_a(5);
    for d in SEARCH {
        client.lookup(&mut c, &format!("api.example.com.{d}"), Reply::Nx);
    }
    client.resolve(&mut c, "api.example.com", 60, "203.0.113.7");
    let r = client.connect(&mut c, 1, "203.0.113.7:443", Outcome::Established);
    assert_eq!(r.resolution, Resolution::External);
    assert!(!r.flagged);
    let chain = r.chain.unwrap();
    assert_eq!(&*chain.query_name, "api.example.com");
    assert_eq!(chain.wasted_queries, 4);
    assert!(chain.ndots_walk);
    assert_eq!(chain.queries.len(), 10);
    assert_eq!(c.counters().chains_started, 1);

    // ndots:5 and a wildcard in an outside search domain: the dotted name escapes.
    let (mut c, mut client) = configured_pod_a(5);
    for d in &SEARCH[..3] {
        client.lookup(&mut c, &format!("api.example.com.{d}"), Reply::Nx);
    }
    let wildcard = "api.example.com.another-lab.com";
    client.resolve(&mut c, wildcard, 60, "203.0.113.66");
    let r = client.connect(&mut c, 1, "203.0.113.66:443", Outcome::Established);
    assert_eq!(r.resolution, Resolution::SearchEscape);
    assert!(r.flagged && r.chain.unwrap().ndots_walk);
}

#[test]
fn unanswered_queries_are_reported_by_tick() {
    let (mut c, mut client) = configured_pod_a(5);
    client.lookup(&mut c, "db.simple-web-app.svc.cluster.local", Reply::Nx);
    client.lookup(&mut c, "db.svc.cluster.local", Reply::Silent);
    let sent = client.now;
    assert!(c.tick(sent + SEC).is_empty(), "not yet timed out");
    let mut lost = c.tick(sent + 6 * SEC);
    lost.sort_by(|a, b| a.qtype.cmp(&b.qtype));
    assert_eq!(lost.len(), 2);
    assert_eq!(lost[0].name, "db.svc.cluster.local");
    assert_eq!(lost[0].qtype, "A");
    assert_eq!(lost[1].qtype, "AAAA");
    assert_eq!(lost[0].query_name.as_deref(), Some("db"));
    assert_eq!(lost[0].server, client.server);
    assert_eq!(c.counters().queries_unanswered, 2);
    assert_eq!(c.pending_queries(), 0);
    assert!(c.tick(sent + 7 * SEC).is_empty(), "reported once");
}

#[test]
fn drift_is_tracked_per_workload() {
    let mut c = Correlator::new(config());
    let mut old = Client::new("pod-old", "198.18.1.5");
    let mut new = Client::new("pod-new", "198.18.1.6");
    for cl in [&old, &new] {
        configured(&mut c, cl, 5);
        c.set_drift_key(&cl.scope, "simple-web-app/deployment/web")
            .unwrap();
    }
    old.resolve(
        &mut c,
        "db.simple-web-app.svc.cluster.local",
        30,
        "198.18.0.20",
    );
    assert!(
        !old.connect(&mut c, 1, "198.18.0.20:5432", Outcome::Established)
            .drift
    );
    // The Service is deleted; the replacement pod's `db` escapes.
    new.now = old.now + 60 * SEC;
    seed_story(&mut c, &mut new);
    let r = new.connect(&mut c, 2, "203.0.113.10:5432", Outcome::Established);
    assert!(r.drift && r.flagged);
    // Another workload asking for `db` outside is not drift.
    let mut other = Client::new("pod-other", "198.18.1.7");
    configured(&mut c, &other, 5);
    other.now = new.now;
    seed_story(&mut c, &mut other);
    assert!(
        !other
            .connect(&mut c, 3, "203.0.113.10:5432", Outcome::Established)
            .drift
    );
}

#[test]
fn outcomes_and_connects_without_outcome() {
    let (mut c, mut client) = configured_pod_a(5);
    seed_story(&mut c, &mut client);
    for (id, outcome) in [
        (1, Outcome::Refused),
        (2, Outcome::Timeout),
        (3, Outcome::Reset),
    ] {
        let r = client.connect(&mut c, id, "203.0.113.10:5432", outcome);
        assert_eq!(r.outcome, outcome);
        assert_eq!(r.resolution, Resolution::SearchEscape);
        assert!(r.outcome_at > r.opened_at);
        assert!(r.source.is_some());
    }
    c.connect_open(ConnectOpen {
        scope: client.scope.clone(),
        sock_id: 9,
        at: client.now,
        cgroup_id: 7,
        pid: 1,
        comm: "app".into(),
        destination: "203.0.113.10:5432".parse().unwrap(),
        source: None,
    });
    assert_eq!(c.open_connects(), 1);
    c.tick(client.now + c.config().connect_timeout_ns + 1);
    assert_eq!(c.open_connects(), 0);
    assert_eq!(c.counters().connects_expired, 1);
    let late = ConnectOutcome {
        sock_id: 9,
        at: client.now,
        outcome: Outcome::Established,
        source: None,
    };
    assert!(c.connect_outcome(late).is_none());
    assert_eq!(c.counters().outcomes_unmatched, 1);
}

#[test]
fn server_side_traffic_and_malformed_messages_are_counted_not_used() {
    let mut c = Correlator::new(config());
    let server_scope = pod("coredns");
    let client: SocketAddr = "198.18.1.5:40000".parse().unwrap();
    let server: SocketAddr = "198.18.0.10:53".parse().unwrap();
    c.observe_dns_wire(
        &server_scope,
        1,
        Direction::Ingress,
        client,
        server,
        &query(1, "db.another-lab.com", A),
    )
    .unwrap();
    c.observe_dns_wire(
        &server_scope,
        2,
        Direction::Egress,
        server,
        client,
        &response(
            1,
            "db.another-lab.com",
            A,
            0,
            &[addr("db.another-lab.com", 60, "203.0.113.10")],
            None,
        ),
    )
    .unwrap();
    assert_eq!(c.counters().dns_server_side_ignored, 2);
    assert_eq!(c.scope_count(), 0);
    assert_eq!(c.cached_answers(), 0);

    let scope = pod("pod-a");
    let bad = [vec![], vec![0x12, 0x34, 0x81], {
        let mut m = query(2, "x.example.com", A);
        m[12] = 0xc0;
        m[13] = 0x0c;
        m
    }];
    for b in &bad {
        assert!(
            c.observe_dns_wire(&scope, 3, Direction::Ingress, server, client, b)
                .is_err()
        );
    }
    let k = c.counters();
    assert_eq!(
        (k.parse_empty, k.parse_truncated, k.parse_bad_name),
        (1, 1, 1)
    );
    // A response nobody asked for.
    c.observe_dns_wire(
        &scope,
        4,
        Direction::Ingress,
        server,
        client,
        &response(77, "x.example.com", A, 3, &[], None),
    )
    .unwrap();
    assert_eq!(c.counters().responses_unmatched, 1);
}

#[test]
fn caps_evict_and_count() {
    let mut cfg = config();
    cfg.limits.max_answers_per_scope = 4;
    cfg.limits.max_scopes = 2;
    cfg.limits.max_pending_per_scope = 3;
    let mut c = Correlator::new(cfg);
    let mut client = Client::new("pod-a", "198.18.1.5");
    for i in 0..3 {
        let name = format!("n{i}.example.com");
        let o = format!("203.0.113.{}", 10 * i + 1);
        let t = format!("203.0.113.{}", 10 * i + 2);
        client.lookup(
            &mut c,
            &name,
            Reply::Addrs(vec![addr(&name, 60, &o), addr(&name, 60, &t)]),
        );
    }
    assert_eq!(c.cached_answers(), 4);
    assert_eq!(c.counters().answers_evicted_scope_cap, 2);
    assert_eq!(c.counters().chains_evicted_cap, 1);
    // The oldest chain went: its addresses no longer name connects.
    assert_eq!(
        client
            .connect(&mut c, 1, "203.0.113.1:443", Outcome::Established)
            .resolution,
        Resolution::None
    );
    assert!(
        client
            .connect(&mut c, 2, "203.0.113.21:443", Outcome::Established)
            .chain
            .is_some()
    );

    for i in 0..5 {
        client.send(&mut c, &format!("q{i}.example.com"), A);
    }
    assert_eq!(c.pending_queries(), 3);
    assert_eq!(c.counters().queries_evicted_cap, 2);

    let mut b = Client::new("pod-b", "198.18.1.6");
    b.send(&mut c, "x.example.com", A);
    let third = pod("pod-c");
    assert!(c.set_drift_key(&third, "k").is_err());
    assert_eq!(c.scope_count(), 2);
    assert_eq!(c.counters().scopes_refused, 1);
}

#[test]
fn tick_expires_chains_and_idle_scopes() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-a", "198.18.1.5");
    client.resolve(&mut c, "a.example.com", 30, "203.0.113.9");
    assert_eq!(c.cached_answers(), 1);
    let grace = c.config().answer_grace_ns;
    c.tick(client.now + 30 * SEC + grace + SEC);
    assert_eq!(c.cached_answers(), 0);
    assert_eq!(c.counters().answers_expired, 1);
    assert_eq!(c.counters().chains_expired, 1);
    assert_eq!(c.scope_count(), 1);
    c.tick(client.now + c.config().scope_idle_ns + SEC);
    assert_eq!(c.scope_count(), 0);
    assert_eq!(c.counters().scopes_idle_evicted, 1);
}

#[test]
fn concurrent_lookups_of_one_pod_keep_their_own_chains() {
    let (mut c, mut client) = configured_pod_a(5);
    // Two threads: `db` walks while `cache` resolves in-cluster in between.
    client.lookup(&mut c, "db.simple-web-app.svc.cluster.local", Reply::Nx);
    client.resolve(
        &mut c,
        "cache.simple-web-app.svc.cluster.local",
        30,
        "198.18.0.30",
    );
    client.lookup(&mut c, "db.svc.cluster.local", Reply::Nx);
    client.lookup(&mut c, "db.cluster.local", Reply::Nx);
    client.resolve(&mut c, "db.another-lab.com", 300, "203.0.113.10");
    let db = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);
    let cache = client.connect(&mut c, 2, "198.18.0.30:6379", Outcome::Established);
    assert_eq!(db.chain.unwrap().wasted_queries, 3);
    assert_eq!(cache.resolution, Resolution::InCluster);
    assert_eq!(&*cache.chain.unwrap().query_name, "cache");
}

#[test]
fn idle_scope_with_an_open_connect_is_kept_and_tick_terminates() {
    let client = Client::new("pod-a", "198.18.1.5");
    let mut cfg = config();
    let idle = cfg.scope_idle_ns;
    cfg.connect_timeout_ns = 10 * idle;
    let mut c = Correlator::new(cfg);
    c.connect_open(ConnectOpen {
        scope: client.scope.clone(),
        sock_id: 1,
        at: client.now,
        cgroup_id: 7,
        pid: 1,
        comm: "app".into(),
        destination: "203.0.113.10:80".parse().unwrap(),
        source: None,
    });
    // Past the idle time but before the connect expires: the scope stays.
    c.tick(client.now + 2 * idle);
    assert_eq!((c.scope_count(), c.open_connects()), (1, 1));
    c.tick(client.now + 11 * idle);
    assert_eq!(c.open_connects(), 0);
    c.tick(client.now + 13 * idle);
    assert_eq!(c.scope_count(), 0);
}

#[test]
fn answers_to_another_question_or_to_no_question_name_nothing() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-hostile", "198.18.1.9");
    configured(&mut c, &client, 5);
    // Same id and 4-tuple, but the response asks another question: not the answer.
    let id = client.send(&mut c, "api.example.com", A);
    client.deliver(
        &mut c,
        &response(
            id,
            "evil.example.net",
            A,
            0,
            &[addr("evil.example.net", 300, "203.0.113.66")],
            None,
        ),
    );
    assert_eq!(c.counters().responses_mismatched, 1);
    let r = client.connect(&mut c, 1, "203.0.113.66:443", Outcome::Established);
    assert_eq!(r.resolution, Resolution::None);

    // A response without a question, whose answer is owned by a name nobody asked for.
    let id = client.send(&mut c, "web.example.com", A);
    let mut bytes = response(
        id,
        "web.example.com",
        A,
        0,
        &[addr("other.example.net", 300, "203.0.113.67")],
        None,
    );
    // Drop the question: QDCOUNT 0 and its bytes (name + type + class) removed.
    let qlen = "web.example.com".len() + 2 + 4;
    bytes.drain(12..12 + qlen);
    bytes[4] = 0;
    bytes[5] = 0;
    client.deliver(&mut c, &bytes);
    let r = client.connect(&mut c, 2, "203.0.113.67:443", Outcome::Established);
    assert_eq!(r.resolution, Resolution::None, "{r:?}");
}

#[test]
fn answer_addresses_are_written_as_their_display_text() {
    let mut v4s: Vec<IpAddr> = (0..=255u8)
        .map(|o| IpAddr::V4(std::net::Ipv4Addr::new(o, 255 - o, o / 10, o % 100)))
        .collect();
    v4s.push(ip("0.0.0.0"));
    v4s.push(ip("255.255.255.255"));
    for v6 in ["2001:db8::1", "::ffff:203.0.113.10", "::", "fe80::1:2:3:4"] {
        v4s.push(ip(v6));
    }
    for a in v4s {
        assert_eq!(Answer::Address(a).to_string(), a.to_string());
    }
}

#[test]
fn a_record_keeps_the_chain_as_it_was_at_its_connect() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-cow", "198.18.1.7");
    configured(&mut c, &client, 5);
    for d in &SEARCH[..3] {
        client.lookup(&mut c, &format!("db.{d}"), Reply::Nx);
    }
    let name = "db.another-lab.com";
    let answer = Reply::Addrs(vec![addr(name, 300, "203.0.113.10")]);
    let a = client.send(&mut c, name, A);
    client.receive(&mut c, a, name, A, &answer);
    let first = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);

    // The AAAA of the answering step comes late: the chain grows, the record does not.
    let aaaa = client.send(&mut c, name, AAAA);
    client.receive(&mut c, aaaa, name, AAAA, &Reply::NoData);
    let second = client.connect(&mut c, 2, "203.0.113.10:5432", Outcome::Established);

    let before = first.chain.expect("joined");
    let after = second.chain.expect("joined");
    assert_eq!(before.queries.len(), 7, "{before:?}");
    assert_eq!(after.queries.len(), 8, "{after:?}");
    assert_eq!(after.queries[7].qtype, QType::AAAA);
    assert_eq!(after.queries[7].rcode, Some(Rcode::NOERROR));
    assert_eq!(before.queries[..], after.queries[..7]);
    assert_eq!(c.counters().chains_started, 1);
}

#[test]
fn a_chain_stops_taking_queries_at_its_cap() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-repeat", "198.18.1.8");
    configured(&mut c, &client, 5);
    // The same unanswered name, asked again and again with new ids.
    for _ in 0..100 {
        client.send(&mut c, "db.simple-web-app.svc.cluster.local", A);
    }
    assert_eq!(c.counters().queries, 100);
    assert_eq!(c.counters().chains_started, 2, "{:?}", c.counters());
    let scope = c.scopes.id(&client.scope).unwrap();
    let scope = c.scopes.get_mut(scope).unwrap();
    let longest = scope
        .slots
        .iter()
        .filter_map(|s| s.chain.as_ref())
        .map(|chain| chain.queries.len())
        .max();
    assert_eq!(longest, Some(chain::MAX_QUERIES_PER_CHAIN));
}

#[test]
fn a_record_lists_queries_in_the_order_sent_even_when_they_arrived_out_of_order() {
    let mut c = Correlator::new(config());
    let client = Client::new("pod-order", "198.18.1.9");
    configured(&mut c, &client, 1);
    let name = "db.another-lab.com";
    let send = |c: &mut Correlator, id: u16, qtype: u16, at: u64| {
        c.observe_dns_wire(
            &client.scope,
            at,
            Direction::Egress,
            client.addr,
            client.server,
            &query(id, name, qtype),
        )
        .unwrap();
    };
    // The AAAA was sent first but its event is handed over second.
    send(&mut c, 2, A, 101 * SEC);
    send(&mut c, 3, AAAA, 100 * SEC);
    let answers = [addr(name, 300, "203.0.113.10")];
    c.observe_dns_wire(
        &client.scope,
        102 * SEC,
        Direction::Ingress,
        client.server,
        client.addr,
        &response(2, name, A, NOERROR, &answers, None),
    )
    .unwrap();
    c.connect_open(ConnectOpen {
        scope: client.scope.clone(),
        sock_id: 9,
        at: 103 * SEC,
        cgroup_id: 7,
        pid: 1234,
        comm: "app".into(),
        destination: "203.0.113.10:5432".parse().unwrap(),
        source: None,
    });
    let record = c
        .connect_outcome(ConnectOutcome {
            sock_id: 9,
            at: 104 * SEC,
            outcome: Outcome::Established,
            source: None,
        })
        .expect("an open gets its record");
    let chain = record.chain.expect("joined");
    let sent: Vec<(QType, u64)> = chain.queries.iter().map(|q| (q.qtype, q.sent_at)).collect();
    assert_eq!(sent, [(QType::AAAA, 100 * SEC), (QType::A, 101 * SEC)]);
}

/// The record names the DNS server whose answer held the destination, and says whether it
/// lies outside the cluster networks (a hard-coded resolver) or not (cluster DNS, a
/// node-local cache).
#[test]
fn dns_served_from_outside_the_cluster_is_marked_on_the_record() {
    for (server, outside) in [
        ("198.18.0.10:53", false),
        ("169.254.20.10:53", false),
        ("203.0.113.53:53", true),
    ] {
        let mut c = Correlator::new(config());
        let mut client = Client::new("pod-a", "198.18.1.5");
        client.server = server.parse().unwrap();
        configured(&mut c, &client, 5);
        seed_story(&mut c, &mut client);
        let r = client.connect(&mut c, 1, "203.0.113.10:5432", Outcome::Established);
        let chain = r.chain.as_ref().expect("joined");
        assert_eq!(
            chain.answered_by(),
            Some(client.server.ip()),
            "the server that answered"
        );
        assert!(
            chain.queries.iter().all(|q| q.server == client.server.ip()),
            "every query names the server it was sent to"
        );
        assert_eq!(r.dns_from_outside, outside, "{server}");
        assert!(r.flagged, "the escape is flagged whoever answered");
    }
}

#[test]
fn the_invariants_catch_a_total_that_drifted_from_what_it_counts() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-a", "198.18.1.1");
    let id = client.send(&mut c, "db.another-lab.com.", A);
    let reply = Reply::Addrs(vec![addr("db.another-lab.com", 60, "203.0.113.10")]);
    client.receive(&mut c, id, "db.another-lab.com.", A, &reply);
    assert_eq!(c.cached_answers(), 1);
    c.check_invariants().unwrap();
    c.answers_total += 1;
    let broken = c.check_invariants().unwrap_err().to_string();
    assert!(broken.contains("answers total"), "{broken}");
}

/// Resolvers may randomise the case of a query's name (0x20) and servers echo it byte for
/// byte: a response is matched to its query whether its question repeats the query's bytes
/// or only its name in another case, and the name is recorded lower case either way.
#[test]
fn a_question_in_randomised_case_matches_echoed_or_not() {
    for echoed in ["aPi.ExAmple.COM", "api.example.com"] {
        let mut c = Correlator::new(config());
        let mut client = Client::new("pod-case", "198.18.1.9");
        configured(&mut c, &client, 1);
        let id = client.send(&mut c, "aPi.ExAmple.COM", A);
        client.deliver(
            &mut c,
            &response(id, echoed, A, 0, &[addr(echoed, 300, "203.0.113.7")], None),
        );
        assert_eq!(c.counters().responses_mismatched, 0, "{echoed}");
        let r = client.connect(&mut c, 1, "203.0.113.7:443", Outcome::Established);
        let chain = r.chain.expect("the connect joined the answer");
        assert_eq!(&*chain.server_address, "api.example.com", "{echoed}");
    }
}

/// A response is matched to its pending query before it is parsed: one that the core does
/// not follow (malformed, or another opcode) leaves the query pending, and the real
/// response still answers it.
#[test]
fn a_response_not_followed_leaves_its_query_pending() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-a", "198.18.1.5");
    let name = "db.another-lab.com";
    let id = client.send(&mut c, name, A);
    let good = response(id, name, A, 0, &[addr(name, 60, "203.0.113.10")], None);
    let mut cut = good.clone();
    cut.truncate(good.len() - 2);
    let at = client.tick();
    assert!(
        c.observe_dns_wire(
            &client.scope,
            at,
            Direction::Ingress,
            client.server,
            client.addr,
            &cut
        )
        .is_err()
    );
    let mut status = good.clone();
    status[2] |= 0x10; // opcode 2, STATUS
    client.deliver(&mut c, &status);
    assert_eq!(c.pending_queries(), 1);
    assert_eq!(c.counters().responses, 0);

    client.deliver(&mut c, &good);
    assert_eq!(c.pending_queries(), 0);
    assert_eq!(c.counters().responses_unmatched, 0);
    let r = client.connect(&mut c, 1, "203.0.113.10:443", Outcome::Established);
    assert_eq!(&*r.chain.expect("joined").server_address, name);
}

/// A step keeps the wire bytes of its first query's question: a later query of the step
/// spelled in another case (0x20) gets a response repeating its own bytes, which is read
/// as usual and still answers it.
#[test]
fn a_step_s_second_query_in_another_case_is_answered() {
    let mut c = Correlator::new(config());
    let mut client = Client::new("pod-case", "198.18.1.9");
    configured(&mut c, &client, 1);
    let a = client.send(&mut c, "api.example.com", A);
    let aaaa = client.send(&mut c, "API.Example.com", AAAA);
    client.deliver(
        &mut c,
        &response(
            a,
            "api.example.com",
            A,
            0,
            &[addr("api.example.com", 300, "203.0.113.7")],
            None,
        ),
    );
    client.deliver(
        &mut c,
        &response(
            aaaa,
            "API.Example.com",
            AAAA,
            0,
            &[addr("API.Example.com", 300, "2001:db8::7")],
            None,
        ),
    );
    assert_eq!(c.counters().responses_mismatched, 0);
    assert_eq!(c.pending_queries(), 0);
    let r = client.connect(&mut c, 1, "[2001:db8::7]:443", Outcome::Established);
    let chain = r.chain.expect("the connect joined the AAAA answer");
    assert_eq!(&*chain.server_address, "api.example.com");
}

#[test]
fn a_pod_is_found_by_any_copy_of_its_uid_and_a_stale_handle_finds_no_other_pod() {
    let mut c = Correlator::new(config());
    let pod = |uid: &str| ScopeKey::Pod(Arc::from(uid));
    let (a, a_copy, b) = (pod("uid-a"), pod("uid-a"), pod("uid-b"));
    c.set_drift_key(&a, "workload-a").unwrap();
    // Another `Arc` of the same text: the same scope, and it is found again by its own address.
    let id = c.scopes.id(&a_copy);
    assert_eq!(id, c.scopes.id(&a));
    assert_eq!(c.scopes.id(&a_copy), id);
    assert_eq!(c.scope_count(), 1);

    // The pod goes and another takes its table slot: `a`'s handle names the slot, but not
    // the scope now in it.
    c.remove_scope(&a);
    c.set_drift_key(&b, "workload-b").unwrap();
    assert_eq!(c.scopes.id(&b), id, "the freed slot is reused");
    assert_eq!(c.scopes.id(&a), None);
    assert_eq!(c.scopes.id(&a_copy), None);
    c.set_drift_key(&a, "workload-a").unwrap();
    assert_eq!(c.scope_count(), 2);
    assert_ne!(c.scopes.id(&a), id);
    let b_id = id.unwrap();
    assert_eq!(&*c.scopes.get_mut(b_id).unwrap().drift_key, "workload-b");
    c.check_invariants().unwrap();
}
