//! The motivating incident on the testbed: a pod with the kubelet's search list plus
//! another-lab.com and `ndots:5`; dnsmasq knows db.another-lab.com, an external host at
//! 203.0.113.10 listening on 5432. glibc walks three cluster suffixes (NXDOMAIN) and escapes.
//! Shared by every test that starts from the story.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use crate::{
    ConnectOutcome, ConnectReport, DnsConfig, DnsServer, Family, Host, Pod, PodSpec, Process,
    TcpServer, Testbed,
};

/// The search list of the incident's pod: the kubelet's three suffixes, then another-lab.com.
pub const STORY_SEARCH: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
pub const DB_PORT: u16 = 5432;
/// Where db.another-lab.com points: outside the cluster.
pub const EXTERNAL_DB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Bounds each connect attempt of a pod.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The sentence the agent must write about the story's connection: why it stands out, and
/// what would end it.
pub const FLAG_MESSAGE: &str = "db resolved through search domain another-lab.com to 203.0.113.10, outside the cluster: \
     use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app";

/// The testbed's cluster networks (v4 and v6), as the agent must be told them.
pub fn cluster_args() -> [&'static str; 4] {
    [
        "--cluster-cidr",
        "198.18.0.0/15",
        "--cluster-cidr",
        "2001:db8:c::/64",
    ]
}

/// A fresh testbed; tests that cannot build one fail (they need root).
pub fn testbed() -> Testbed {
    Testbed::new().expect("building the testbed (these tests must run as root)")
}

/// A pod of the incident: `ndots:5` and the search list ending in another-lab.com.
pub fn story_pod(tb: &Testbed, name: &str) -> Pod {
    tb.add_pod(PodSpec::new(name).search(STORY_SEARCH).ndots(5))
        .expect("pod")
}

/// glibc in `pod` resolves `host` and connects to `port`; returns the report and the address
/// connected to, or panics with the DNS server's log.
pub fn connect(
    pod: &Pod,
    host: &str,
    port: u16,
    family: Family,
    dns: &DnsServer,
) -> (ConnectReport, IpAddr) {
    let report = pod
        .connect_tcp(host, port, family, CONNECT_TIMEOUT)
        .expect("connect helper");
    match report.outcome {
        ConnectOutcome::Connected { peer, .. } => {
            let ip = peer.ip();
            (report, ip)
        }
        ref other => panic!(
            "the pod did not connect to {host}:{port}: {other:?}; dns log:\n{}",
            dns.raw_log().unwrap_or_default()
        ),
    }
}

/// Where the story's `db` lives outside the cluster, and the name that reaches it.
pub const DB_NAME: &str = "db.another-lab.com";

/// The incident's outside on a testbed: the external host `db` at [`EXTERNAL_DB`] listening
/// on [`DB_PORT`], and dnsmasq serving the local zone another-lab.com. Tests that need their
/// own pods (other names, namespaces or ndots) start from this; [`Story`] adds the pod `web`.
pub struct Outside {
    pub db: Host,
    pub listener: TcpServer,
    pub dns: DnsServer,
}

impl Outside {
    /// The outside as told: db.another-lab.com has db's IPv4 address, nothing more.
    pub fn new(tb: &Testbed) -> Outside {
        Outside::with(tb, |db, zone| zone.record(DB_NAME, db.ipv4()))
    }

    /// The outside with the records `records` writes into the zone (given db, and the zone
    /// without any record yet).
    pub fn with(tb: &Testbed, records: impl FnOnce(&Host, DnsConfig) -> DnsConfig) -> Outside {
        let db = tb
            .add_external_host_at("db", EXTERNAL_DB)
            .expect("external host");
        let listener = db
            .listen_tcp(DB_PORT)
            .expect("listener on the external host");
        let zone = DnsConfig::dnsmasq().local_zone("another-lab.com");
        let dns = tb.start_dns(records(&db, zone)).expect("dnsmasq");
        Outside { db, listener, dns }
    }
}

/// The backend of a Service `db` inside the cluster: a cluster host listening on [`DB_PORT`].
pub fn service_db(tb: &Testbed) -> (Host, TcpServer) {
    let host = tb.add_cluster_host("db-svc").expect("cluster host");
    let listener = host
        .listen_tcp(DB_PORT)
        .expect("listener on the cluster host");
    (host, listener)
}

/// A resolver outside the cluster, on the external host `resolver`, answering `address` for
/// outside.example and every name below it: the nameserver of a pod that hard-codes one.
pub fn outside_resolver(tb: &Testbed, address: IpAddr) -> (Host, Process) {
    let host = tb.add_external_host("resolver").expect("external host");
    let resolver = crate::dns::start_outside_resolver(&host, "outside.example", address)
        .expect("the outside resolver");
    (host, resolver)
}

/// The incident's testbed: the [`Outside`] (plus what `extra` adds to its zone) and the pod
/// `web`.
pub struct Story {
    /// The container's main process, alive as long as the story (a real container always
    /// has one): observer reads the pod's resolv.conf through a live process of the pod,
    /// and the helpers that resolve and connect exit within milliseconds.
    _main: Process,
    pub db: Host,
    pub listener: TcpServer,
    pub dns: DnsServer,
    pub pod: Pod,
    // Last: removes everything above when the story drops.
    pub tb: Testbed,
}

impl Story {
    /// The story as told: no records beyond db.another-lab.com.
    pub fn new() -> Story {
        Story::with(|_, config| config)
    }

    /// The story with more of the testbed: `extra` may add hosts and DNS records.
    pub fn with(extra: impl FnOnce(&Testbed, DnsConfig) -> DnsConfig) -> Story {
        let tb = testbed();
        let Outside { db, listener, dns } =
            Outside::with(&tb, |db, zone| extra(&tb, zone.record(DB_NAME, db.ipv4())));
        let pod = story_pod(&tb, "web");
        let main = pod
            .command("sleep")
            .arg("300")
            .spawn()
            .expect("the pod's main process");
        Story {
            _main: main,
            db,
            listener,
            dns,
            pod,
            tb,
        }
    }

    pub fn cgroup_id(&self) -> u64 {
        self.pod.cgroup().container.id()
    }

    pub fn pod_uid(&self) -> &str {
        &self.pod.cgroup().pod_uid
    }

    pub fn container_id(&self) -> &str {
        &self.pod.cgroup().container_id
    }

    /// glibc resolves `name` through the pod's search list and connects to [`DB_PORT`];
    /// panics unless the connect reached `expected`.
    pub fn connect(&self, name: &str, expected: IpAddr) -> Connection {
        self.connect_family(name, Family::Any, expected)
    }

    /// As [`Story::connect`], with the address families glibc may ask for.
    pub fn connect_family(&self, name: &str, family: Family, expected: IpAddr) -> Connection {
        let before = SystemTime::now();
        let (report, peer) = connect(&self.pod, name, DB_PORT, family, &self.dns);
        let after = SystemTime::now();
        assert_eq!(
            peer,
            expected,
            "the pod's connect to {name} did not reach {expected}; DNS log:\n{}",
            self.dns.raw_log().unwrap_or_default()
        );
        Connection {
            report,
            before,
            after,
        }
    }
}

impl Default for Story {
    fn default() -> Self {
        Story::new()
    }
}

/// A connect the test made, with the wall-clock window it happened in.
pub struct Connection {
    pub report: ConnectReport,
    pub before: SystemTime,
    pub after: SystemTime,
}
