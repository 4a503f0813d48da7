//! End-to-end DNS scenarios: the real agent binary watches a testbed pod resolve names with
//! glibc through its own resolv.conf against a real dnsmasq, then connect; each scenario
//! asserts what the agent printed (JSON lines), served (/metrics) and exported (OTLP spans).
//! Every scenario runs its own agent and testbed and filters on its own pod's cgroup: the
//! agent sees the whole machine, parallel tests included.
//! Privileged: they fail (never skip) when not run as root.
mod scenario_support;

use std::net::{IpAddr, Ipv4Addr};

use observer_tests::{
    DnsConfig, Family, PodSpec, QueryOutcome,
    agent::{metric_sum, series_of},
};
use scenario_support::*;
use serde_json::{Value, json};

const NX: Option<&str> = Some("NXDOMAIN");
const NOERROR: Option<&str> = Some("NOERROR");

fn owned(chain: &[(&str, &str, Option<&str>)]) -> Vec<(String, String, Option<String>)> {
    chain
        .iter()
        .map(|(n, t, r)| (n.to_string(), t.to_string(), r.map(str::to_owned)))
        .collect()
}

/// A and AAAA of each name, in order, all with `rcode`.
fn pairs<'a>(
    names: &[&'a str],
    rcode: Option<&'a str>,
) -> Vec<(&'a str, &'a str, Option<&'a str>)> {
    names
        .iter()
        .flat_map(|n| [(*n, "A", rcode), (*n, "AAAA", rcode)])
        .collect()
}

fn flagged_count(metrics: &str, resolution: &str, query: &str, domain: &str, server: &str) -> f64 {
    metric_sum(
        metrics,
        "observer_flagged_connections_total",
        &[
            ("resolution", resolution),
            ("query_name", query),
            ("search_domain", domain),
            ("server_address", server),
        ],
    )
}

/// The story's search chain: A and AAAA of `db` under each cluster suffix (NXDOMAIN), then
/// of db.another-lab.com (NOERROR).
fn escape_chain() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    let cluster = [
        "db.simple-web-app.svc.cluster.local",
        "db.svc.cluster.local",
        "db.cluster.local",
    ];
    let mut chain = pairs(&cluster, NX);
    chain.extend(pairs(&["db.another-lab.com"], NOERROR));
    chain
}

/// The record's search chain is `expected` (name, type, rcode), in order.
fn assert_chain(record: &Value, expected: &[(&str, &str, Option<&str>)]) {
    assert_eq!(chain(record), owned(expected), "{record:#}");
}

/// Not flagged; `message` is the chain's note when it wasted queries (with its fix), else
/// there is no sentence at all.
fn assert_not_flagged(record: &Value, message: Option<&str>) {
    assert_eq!(record["flagged"], false, "{record:#}");
    assert_eq!(record["message"].as_str(), message, "{record:#}");
}

/// Scenario 1: The seed story: `db` walks the search list through three cluster suffixes (NXDOMAIN)
/// and escapes through another-lab.com to an address outside the cluster.
#[test]
fn seed_story_search_escape_is_flagged() {
    let story = Story::new();
    let Story { db, dns, pod, .. } = &story;
    let observed = Observed::start();
    let before = observed.metrics();

    let (report, peer) = connect(pod, "db", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V4(db.ipv4()));

    let record = observed.record_of(pod, 5432);
    assert_fields(
        &record,
        json!({
            "query_name": "db", "resolution": "search-escape",
            "server_address": "db.another-lab.com", "search_domain": "another-lab.com",
            "wasted_queries": 3, "egress": true, "flagged": true, "drift": false,
            "outcome": "established"
        }),
    );
    assert_eq!(record["cname_chain"], serde_json::json!([]));
    assert_eq!(destination_ip(&record), IpAddr::V4(db.ipv4()));
    assert_eq!(record["destination"]["port"], 5432);
    assert_eq!(record["source"]["address"], pod.ipv4().to_string());
    assert_eq!(record["pid"], report.pid);
    assert_eq!(record["pod"]["uid"], pod.cgroup().pod_uid.as_str());
    assert_eq!(record["container_id"], pod.cgroup().container_id.as_str());
    assert_eq!(record["message"], FLAG_MESSAGE);
    assert_chain(&record, &escape_chain());

    // The same story as a trace: the connection's root span and one child per DNS query.
    let trace = observed.trace_of(pod);
    let root = &trace[0];
    assert_eq!(
        str_attr(&root.attributes, "server.address"),
        Some("db.another-lab.com")
    );
    assert_eq!(int_attr(&root.attributes, "server.port"), Some(5432));
    assert_eq!(
        str_attr(&root.attributes, "network.peer.address"),
        Some("203.0.113.10")
    );
    assert_eq!(str_attr(&root.attributes, "network.type"), Some("ipv4"));
    assert_eq!(bool_attr(&root.attributes, "observer.egress"), Some(true));
    assert_eq!(bool_attr(&root.attributes, "observer.flagged"), Some(true));
    assert_eq!(
        str_attr(&root.attributes, "observer.resolution"),
        Some("search-escape")
    );
    assert_eq!(
        str_attr(&root.attributes, "observer.query.name"),
        Some("db")
    );
    assert_eq!(
        str_attr(&root.attributes, "observer.search_domain"),
        Some("another-lab.com")
    );
    assert_eq!(
        int_attr(&root.attributes, "observer.dns.wasted_queries"),
        Some(3)
    );
    assert_eq!(
        bool_attr(&root.attributes, "observer.dns.ndots_walk"),
        Some(false)
    );
    assert_eq!(
        str_attr(&root.attributes, "observer.connect.outcome"),
        Some("established")
    );
    assert_eq!(
        str_attr(&root.attributes, "k8s.pod.uid"),
        Some(pod.cgroup().pod_uid.as_str())
    );
    assert_eq!(
        root.status.as_ref().map(|s| s.message.as_str()),
        record["message"].as_str(),
        "the span status carries the flag sentence"
    );
    let mut children = trace[1..].to_vec();
    children.sort_by_key(|s| s.start_time_unix_nano);
    let child_chain: Vec<(String, String, Option<String>)> = children
        .iter()
        .map(|s| {
            (
                str_attr(&s.attributes, "dns.question.name")
                    .unwrap_or_default()
                    .to_owned(),
                str_attr(&s.attributes, "observer.dns.question.type")
                    .unwrap_or_default()
                    .to_owned(),
                str_attr(&s.attributes, "observer.dns.response_code").map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        child_chain,
        owned(&escape_chain()),
        "one child span per query"
    );
    assert!(children.iter().all(|c| c.parent_span_id == root.span_id));
    let answer = children
        .iter()
        .find(|s| {
            str_attr(&s.attributes, "dns.question.name") == Some("db.another-lab.com")
                && str_attr(&s.attributes, "observer.dns.question.type") == Some("A")
        })
        .expect("the answering query's span");
    assert_eq!(
        str_array_attr(&answer.attributes, "dns.answers"),
        Some(vec!["203.0.113.10".to_owned()])
    );

    // /metrics counts it (other agents' tests may run at once: compare with before).
    let after = observed.metrics();
    let flagged = |m: &str| {
        flagged_count(
            m,
            "search-escape",
            "db",
            "another-lab.com",
            "db.another-lab.com",
        )
    };
    assert!(flagged(&after) >= flagged(&before) + 1.0, "{after}");
    let wasted = |m: &str| metric_sum(m, "observer_dns_wasted_queries_total", &[]);
    assert!(wasted(&after) >= wasted(&before) + 3.0, "{after}");
    // DNS responses are tallied and added at the agent's next tick.
    let nx = |m: &str| metric_sum(m, "observer_dns_responses_total", &[("rcode", "NXDOMAIN")]);
    observed
        .agent
        .metrics_when(RECORD_WAIT, |m| nx(m) >= nx(&before) + 6.0);
}

/// Scenario 2: The same pod and name, with the Service present: the first search domain answers
/// with an in-cluster address; nothing leaves, nothing is flagged, no query is wasted.
#[test]
fn service_present_resolves_in_cluster() {
    let tb = testbed();
    let (svc, _service) = service_db(&tb);
    let outside = Outside::with(&tb, |db, zone| {
        zone.record(DB_NAME, db.ipv4())
            .record("db.simple-web-app.svc.cluster.local", svc.ipv4())
    });
    let dns = &outside.dns;
    let pod = story_pod(&tb, "web");
    let observed = Observed::start();

    let (_, peer) = connect(&pod, "db", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V4(svc.ipv4()));
    assert_eq!(svc.ipv4().octets()[..2], [198, 18]);

    let record = observed.record_of(&pod, 5432);
    assert_fields(
        &record,
        json!({
            "query_name": "db", "resolution": "in-cluster",
            "server_address": "db.simple-web-app.svc.cluster.local",
            "search_domain": "simple-web-app.svc.cluster.local", "wasted_queries": 0,
            "egress": false
        }),
    );
    assert_not_flagged(&record, None);
    assert_eq!(record["outcome"], "established");
    assert_eq!(destination_ip(&record), IpAddr::V4(svc.ipv4()));
    assert_chain(
        &record,
        &pairs(&["db.simple-web-app.svc.cluster.local"], NOERROR),
    );
}

/// Scenario 3: An absolute name (trailing dot): asked as-is only, answered outside the cluster. It
/// leaves the cluster on purpose: egress, `external`, not an escape, not flagged.
#[test]
fn absolute_external_name_is_egress_but_not_flagged() {
    let story = Story::new();
    let Story { db, dns, pod, .. } = &story;
    let observed = Observed::start();

    let (_, peer) = connect(pod, "db.another-lab.com.", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V4(db.ipv4()));

    let record = observed.record_of(pod, 5432);
    assert_fields(
        &record,
        json!({
            "query_name": "db.another-lab.com.", "resolution": "external",
            "server_address": "db.another-lab.com", "search_domain": null, "wasted_queries": 0,
            "egress": true
        }),
    );
    assert_not_flagged(&record, None);
    assert_eq!(destination_ip(&record), IpAddr::V4(db.ipv4()));
    // No cluster suffix tried.
    assert_chain(&record, &pairs(&["db.another-lab.com"], NOERROR));
}

/// Scenario 4: A dotted name under ndots:1 is asked as-is first (external, nothing wasted); the same
/// name under ndots:5 walks the whole search list first (an ndots walk, 4 names wasted),
/// then is answered as-is: external, not flagged either way.
#[test]
fn ndots_decides_whether_a_dotted_name_walks_the_search_list() {
    let tb = testbed();
    let outside = Outside::new(&tb);
    let (db, dns) = (&outside.db, &outside.dns);
    let ndots1 = tb
        .add_pod(PodSpec::new("ndots1").search(STORY_SEARCH).ndots(1))
        .expect("pod");
    let ndots5 = story_pod(&tb, "ndots5");
    let observed = Observed::start();

    for pod in [&ndots1, &ndots5] {
        let (_, peer) = connect(pod, "db.another-lab.com", 5432, Family::Any, dns);
        assert_eq!(peer, IpAddr::V4(db.ipv4()));
    }

    let direct = observed.record_of(&ndots1, 5432);
    assert_fields(
        &direct,
        json!({
            "query_name": "db.another-lab.com", "resolution": "external",
            "server_address": "db.another-lab.com", "search_domain": null, "wasted_queries": 0,
            "egress": true
        }),
    );
    assert_not_flagged(&direct, None);
    assert_chain(&direct, &pairs(&["db.another-lab.com"], NOERROR));

    let walked = observed.record_of(&ndots5, 5432);
    assert_fields(
        &walked,
        json!({
            "query_name": "db.another-lab.com", "resolution": "external",
            "server_address": "db.another-lab.com", "search_domain": null, "wasted_queries": 4,
            "egress": true
        }),
    );
    assert_not_flagged(
        &walked,
        Some(
            "db.another-lab.com tried 4 names of the search list in vain before db.another-lab.com answered: \
             use db.another-lab.com. or set the pod's dnsConfig ndots to 2",
        ),
    );
    let mut expected = pairs(
        &[
            "db.another-lab.com.simple-web-app.svc.cluster.local",
            "db.another-lab.com.svc.cluster.local",
            "db.another-lab.com.cluster.local",
            "db.another-lab.com.another-lab.com",
        ],
        NX,
    );
    expected.extend(pairs(&["db.another-lab.com"], NOERROR));
    assert_chain(&walked, &expected);

    let direct_span = &observed.trace_of(&ndots1)[0];
    assert_eq!(
        bool_attr(&direct_span.attributes, "observer.dns.ndots_walk"),
        Some(false)
    );
    assert_eq!(
        int_attr(&direct_span.attributes, "observer.dns.wasted_queries"),
        Some(0)
    );
    let walked_span = &observed.trace_of(&ndots5)[0];
    assert_eq!(
        bool_attr(&walked_span.attributes, "observer.dns.ndots_walk"),
        Some(true)
    );
    assert_eq!(
        int_attr(&walked_span.attributes, "observer.dns.wasted_queries"),
        Some(4)
    );
    assert_eq!(
        bool_attr(&walked_span.attributes, "observer.flagged"),
        Some(false)
    );
    assert_eq!(
        str_attr(&walked_span.attributes, "observer.fix"),
        Some("use db.another-lab.com. or set the pod's dnsConfig ndots to 2"),
        "the span says the fix"
    );
    assert_eq!(
        str_attr(&direct_span.attributes, "observer.fix"),
        None,
        "nothing to fix"
    );
}

/// Scenario 5b: a CNAME out of the cluster, as in scenario 5, declared by a Service of type
/// ExternalName that the (stand-in) Kubernetes API serves: intended egress, its own class
/// `declared-egress`, counted under that resolution, not flagged, no message. Without the
/// API (scenario 5) such a chain is a `cname-escape`. The pod's namespace is this run's own,
/// so the agent's metrics (which see the whole machine) are this scenario's alone.
#[test]
fn externalname_service_cname_is_declared_egress() {
    let tb = testbed();
    let namespace = format!("vendors-{}", tb.run_id().suffix());
    let outside = Outside::with(&tb, |db, zone| {
        zone.record(DB_NAME, db.ipv4())
            .cname(&format!("ledger.{namespace}.svc.cluster.local"), DB_NAME)
    });
    let (db, dns) = (&outside.db, &outside.dns);
    let pod = tb
        .add_pod(
            PodSpec::new("billing")
                .search([
                    format!("{namespace}.svc.cluster.local"),
                    "svc.cluster.local".to_owned(),
                    "cluster.local".to_owned(),
                ])
                .ndots(5),
        )
        .expect("pod");
    let api = observer_tests::kube_api::KubeApi::start(
        vec![observer_tests::kube_api::external_name_service(
            "ledger",
            &namespace,
            "db.another-lab.com.",
        )],
        tb.run_id().suffix(),
    )
    .expect("the stand-in API server");
    let observed = Observed::with_kube_api(&api);

    let (_, peer) = connect(&pod, "ledger", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V4(db.ipv4()));

    let record = observed.record_of(&pod, 5432);
    assert_eq!(record["resolution"], "declared-egress", "{record:#}");
    assert_eq!(
        record["server_address"],
        format!("ledger.{namespace}.svc.cluster.local")
    );
    assert_eq!(
        record["cname_chain"],
        serde_json::json!(["db.another-lab.com"])
    );
    assert_eq!(record["egress"], true);
    assert_not_flagged(&record, None);
    // The pod is not in the API: its namespace is read from its resolv.conf search list, and
    // the metric below is counted under it.
    assert_eq!(
        record["pod"]["namespace"],
        namespace.as_str(),
        "the namespace of a pod the API does not know: {record:#}"
    );

    let root = &observed.trace_of(&pod)[0];
    assert_eq!(
        str_attr(&root.attributes, "observer.resolution"),
        Some("declared-egress")
    );
    assert_eq!(bool_attr(&root.attributes, "observer.flagged"), Some(false));
    assert_eq!(
        root.status.as_ref().map(|s| s.code).unwrap_or(0),
        0,
        "declared egress is no error"
    );

    let metrics = observed.metrics();
    let ours = ("namespace", namespace.as_str());
    assert_eq!(
        metric_sum(
            &metrics,
            "observer_connections_total",
            &[ours, ("resolution", "declared-egress")]
        ),
        1.0,
        "counted under its own resolution: {}",
        series_of(&metrics, "observer_connections_total")
    );
    assert_eq!(
        metric_sum(&metrics, "observer_flagged_connections_total", &[ours]),
        0.0,
        "not flagged"
    );
}

/// Scenario 5: CoreDNS autopath: the pod's first query is answered with a CNAME out of the cluster
/// domain and the target's address, so no NXDOMAIN is ever seen. Still an escape.
#[test]
fn autopath_style_cname_out_of_the_cluster_is_flagged() {
    let story = Story::with(|_, dns| {
        dns.cname("db.simple-web-app.svc.cluster.local", "db.another-lab.com")
    });
    let Story { db, dns, pod, .. } = &story;
    let observed = Observed::start();
    let before = observed.metrics();

    let (_, peer) = connect(pod, "db", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V4(db.ipv4()));
    let log = dns.queries().expect("dns log");
    assert!(
        log.iter().all(|q| q.outcome != QueryOutcome::NxDomain),
        "the CNAME answered the first query: {log:#?}"
    );

    let record = observed.record_of(pod, 5432);
    assert_eq!(record["query_name"], "db", "{record:#}");
    assert_eq!(record["resolution"], "cname-escape", "{record:#}");
    assert_eq!(
        record["server_address"],
        "db.simple-web-app.svc.cluster.local"
    );
    assert_eq!(
        record["cname_chain"],
        serde_json::json!(["db.another-lab.com"])
    );
    assert_eq!(record["wasted_queries"], 0);
    assert_eq!(record["egress"], true);
    assert_eq!(record["flagged"], true);
    assert!(record["message"].is_string(), "{record:#}");
    assert_eq!(
        record["message"],
        "db.simple-web-app.svc.cluster.local resolved through CNAME db.another-lab.com to 203.0.113.10, \
         outside the cluster: use db.another-lab.com. if that server is intended, or change what \
         db.simple-web-app.svc.cluster.local points to",
        "{record:#}"
    );
    assert_eq!(destination_ip(&record), IpAddr::V4(db.ipv4()));
    assert_chain(
        &record,
        &pairs(&["db.simple-web-app.svc.cluster.local"], NOERROR),
    );

    let root = &observed.trace_of(pod)[0];
    assert_eq!(
        str_attr(&root.attributes, "observer.resolution"),
        Some("cname-escape")
    );
    assert_eq!(
        str_array_attr(&root.attributes, "observer.dns.cname_chain"),
        Some(vec!["db.another-lab.com".to_owned()])
    );
    assert_eq!(bool_attr(&root.attributes, "observer.flagged"), Some(true));

    let after = observed.metrics();
    let flagged = |m: &str| {
        metric_sum(
            m,
            "observer_flagged_connections_total",
            &[
                ("resolution", "cname-escape"),
                ("query_name", "db"),
                ("server_address", "db.simple-web-app.svc.cluster.local"),
            ],
        )
    };
    assert!(flagged(&after) >= flagged(&before) + 1.0, "{after}");
}

/// Scenario 6: IPv6 only: `db` escapes through another-lab.com to a name with only an AAAA record;
/// the pod connects over IPv6 to the external segment.
#[test]
fn ipv6_only_search_escape_is_flagged() {
    let tb = testbed();
    let outside = Outside::with(&tb, |db, zone| zone.record(DB_NAME, db.ipv6()));
    let (db, dns) = (&outside.db, &outside.dns);
    let pod = story_pod(&tb, "web");
    let observed = Observed::start();

    let (_, peer) = connect(&pod, "db", 5432, Family::Any, dns);
    assert_eq!(peer, IpAddr::V6(db.ipv6()));

    let record = observed.record_of(&pod, 5432);
    assert_fields(
        &record,
        json!({
            "query_name": "db", "resolution": "search-escape",
            "server_address": "db.another-lab.com", "search_domain": "another-lab.com",
            "wasted_queries": 3, "egress": true, "flagged": true
        }),
    );
    assert_eq!(destination_ip(&record), IpAddr::V6(db.ipv6()));
    assert_eq!(
        record["source"]["address"]
            .as_str()
            .map(|a| a.parse::<IpAddr>()),
        Some(Ok(IpAddr::V6(pod.ipv6()))),
        "{record:#}"
    );
    // The A query finds the name without an IPv4 address: NOERROR, no data.
    assert_chain(&record, &escape_chain());

    let root = &observed.trace_of(&pod)[0];
    assert_eq!(str_attr(&root.attributes, "network.type"), Some("ipv6"));
    assert_eq!(
        str_attr(&root.attributes, "network.peer.address").map(|a| a.parse::<IpAddr>()),
        Some(Ok(IpAddr::V6(db.ipv6())))
    );
}

/// Scenario 7: DNS over TCP: the answer does not fit 512 bytes, dnsmasq truncates it over UDP, glibc
/// asks again over TCP; the agent reassembles the TCP answer and joins the connect to it.
#[test]
fn truncated_answer_retried_over_tcp_still_classifies() {
    const RECORDS: u8 = 40;
    let tb = testbed();
    let big = tb
        .add_external_host_at("big", Ipv4Addr::new(203, 0, 113, 100))
        .expect("external host");
    let addrs: Vec<Ipv4Addr> = (0..RECORDS)
        .map(|i| Ipv4Addr::new(203, 0, 113, 100 + i))
        .collect();
    // The host answers on every address the name has, whichever glibc picks.
    for a in &addrs[1..] {
        big.command("ip")
            .args(["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .output()
            .expect("ip addr add")
            .check("ip addr add on the external host")
            .expect("address added");
    }
    let _listener = big.listen_tcp(5432).expect("listener");
    let mut config = DnsConfig::dnsmasq().local_zone("another-lab.com");
    for a in &addrs {
        config = config.record("big.another-lab.com", *a);
    }
    let dns = tb.start_dns(config).expect("dnsmasq");
    let pod = story_pod(&tb, "web");
    let observed = Observed::start();

    let (_, peer) = connect(&pod, "big", 5432, Family::Any, &dns);
    let IpAddr::V4(peer_v4) = peer else {
        panic!("connected over IPv6 to {peer}")
    };
    assert!(addrs.contains(&peer_v4), "{peer}");

    // The TCP path was taken: dnsmasq answers each TCP connection from a forked child,
    // which logs under its own pid.
    let server_pid = dns.pid();
    let log = dns.raw_log().expect("dns log");
    let tcp_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("query[A] big.another-lab.com"))
        .filter(|l| !l.contains(&format!("dnsmasq[{server_pid}]")))
        .collect();
    assert!(
        !tcp_lines.is_empty(),
        "glibc asked again over TCP; log:\n{log}"
    );

    // glibc's TCP connection to the DNS server is a connection of the pod too.
    let dns_over_tcp = observed.agent.wait_for_record(RECORD_WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(pod.cgroup().container.id())
            && r["destination"]["port"] == 53
    });
    assert_eq!(
        dns_over_tcp["destination"]["address"],
        dns.ipv4().to_string()
    );
    assert_eq!(dns_over_tcp["egress"], false);

    let record = observed.record_of(&pod, 5432);
    assert_fields(
        &record,
        json!({
            "query_name": "big", "resolution": "search-escape",
            "server_address": "big.another-lab.com", "search_domain": "another-lab.com",
            "wasted_queries": 3, "flagged": true
        }),
    );
    assert_eq!(destination_ip(&record), peer);
    assert_eq!(
        chain_names(&record),
        vec![
            "big.simple-web-app.svc.cluster.local",
            "big.svc.cluster.local",
            "big.cluster.local",
            "big.another-lab.com",
        ],
        "{record:#}"
    );
    assert!(
        chain(&record).contains(&(
            "big.another-lab.com".into(),
            "A".into(),
            Some("NOERROR".into())
        )),
        "{record:#}"
    );

    // Only the TCP answer holds every record: the agent parsed the reassembled stream.
    let trace = observed.trace_of(&pod);
    let all: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let answers: Vec<Vec<String>> = trace[1..]
        .iter()
        .filter(|s| {
            str_attr(&s.attributes, "dns.question.name") == Some("big.another-lab.com")
                && str_attr(&s.attributes, "observer.dns.question.type") == Some("A")
        })
        .filter_map(|s| str_array_attr(&s.attributes, "dns.answers"))
        .collect();
    assert!(
        answers.iter().any(|a| {
            let mut a = a.clone();
            a.sort();
            let mut want = all.clone();
            want.sort();
            a == want
        }),
        "a DNS span holds all {RECORDS} addresses: {answers:#?}"
    );
}
