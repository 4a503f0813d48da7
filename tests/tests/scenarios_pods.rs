//! End-to-end scenarios about pods, run against the real agent binary (`observer run`) in the
//! testbed: real network namespaces, a real dnsmasq, glibc's own resolution through each pod's
//! resolv.conf, kubelet-shaped cgroups. Every assertion reads the agent's real outputs (its
//! JSON lines, filtered on this test's own cgroup ids, and its /metrics): the agent sees the
//! whole machine, and other tests run beside these.
//!
//! Privileged: run as root (they fail, never skip, otherwise).
mod scenario_pods_support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use observer_tests::{
    CLOSED_PORT, Pod, PodSpec, Testbed,
    agent::{assert_fields, metric_sum},
    plan,
    story::{DB_NAME, EXTERNAL_DB, Outside, service_db, testbed},
};
use scenario_pods_support::{
    chain_names, client, client_report, spawn_client, start_agent, text, wait_for_records,
};
use serde_json::{Value, json};

const RECORD_WAIT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The sentence the agent writes when `name` escapes through another-lab.com to `ip`.
fn escape_message(name: &str, ip: &str, namespace: &str) -> String {
    format!(
        "{name} resolved through search domain another-lab.com to {ip}, outside the cluster: \
         use {name}.another-lab.com. if that server is intended, or create the Service {name} \
         in namespace {namespace}"
    )
}

/// The kubelet's search list for a pod in `namespace`, followed by the node's domain (the
/// incident's `another-lab.com`), with the kubelet's ndots:5.
fn pod_in(tb: &Testbed, name: &str, namespace: &str) -> Pod {
    tb.add_pod(
        PodSpec::new(name)
            .search([
                format!("{namespace}.svc.cluster.local"),
                "svc.cluster.local".into(),
                "cluster.local".into(),
                "another-lab.com".into(),
            ])
            .ndots(5),
    )
    .expect("pod")
}

/// `lookup + connect` from the pod's (first) container; the client's report.
fn connect(pod: &Pod, name: &str, port: u16) -> Value {
    connect_within(pod, name, port, CONNECT_TIMEOUT)
}

/// As [`connect`], giving up on the connect after `timeout`.
fn connect_within(pod: &Pod, name: &str, port: u16, timeout: Duration) -> Value {
    let report = client(
        |python| pod.command(python),
        &[
            "connect",
            name,
            &port.to_string(),
            "any",
            &timeout.as_secs_f64().to_string(),
        ],
    );
    assert!(
        report["error"].is_null(),
        "{name}:{port} from pod {}: {report}",
        pod.name()
    );
    report
}

fn destination(record: &Value) -> (IpAddr, u16) {
    let d = &record["destination"];
    (
        d["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("destination address in {record}")),
        d["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("destination port in {record}")),
    )
}

/// The first `steps` names glibc tries for `name` in a pod of `namespace` (see [`pod_in`]):
/// the search list in order, then the name as is.
fn walk(name: &str, namespace: &str, steps: usize) -> Vec<String> {
    [
        format!("{namespace}.svc.cluster.local"),
        "svc.cluster.local".into(),
        "cluster.local".into(),
        "another-lab.com".into(),
    ]
    .iter()
    .map(|domain| format!("{name}.{domain}"))
    .chain([name.to_owned()])
    .take(steps)
    .collect()
}

/// The record's chain is exactly `names`, in order, each asked as A and AAAA (glibc sends
/// both at once, so their order within a step is free): no query of another pod, none missing.
fn assert_chain(record: &Value, names: &[String]) {
    let chain = chain_names(record);
    let mut steps: Vec<&str> = Vec::new();
    for (name, _) in &chain {
        if steps.last() != Some(&name.as_str()) {
            steps.push(name);
        }
    }
    assert_eq!(steps, names, "chain of {record}");
    for name in names {
        let mut types: Vec<&str> = chain
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .collect();
        types.sort_unstable();
        assert_eq!(types, ["A", "AAAA"], "{name} in {record}");
    }
}

fn dump(records: &[Value]) -> String {
    records
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Scenario 8: pods resolve the same name to different addresses and different names to the
/// same address, at the same time; a sidecar resolves for the app container. Each record
/// carries its own pod's resolution, never another pod's.
#[test]
fn each_pod_gets_its_own_resolution() {
    let tb = testbed();
    let db_a = tb.add_cluster_host("db-a").expect("cluster host");
    let db_b = tb.add_cluster_host("db-b").expect("cluster host");
    let outside = Outside::with(&tb, |outside, zone| {
        zone.record("db.a.svc.cluster.local", db_a.ipv4())
            .record("db.b.svc.cluster.local", db_b.ipv4())
            .record(DB_NAME, outside.ipv4())
            .record("cdn-a.another-lab.com", outside.ipv4())
            .record("cdn-b.another-lab.com", outside.ipv4())
    });
    let _listeners = [
        db_a.listen_tcp(5432).expect("listen"),
        db_b.listen_tcp(5432).expect("listen"),
        outside.db.listen_tcp(443).expect("listen"),
    ];
    let pod_a = pod_in(&tb, "a", "a");
    let pod_b = pod_in(&tb, "b", "b");
    let pod_c = pod_in(&tb, "c", "c");
    let agent = start_agent();

    // All three pods at once, three rounds each: `db` in a and b stays in their own
    // namespaces; c has no `db` Service and escapes to the address a and b reach through
    // their CDN names, which are different names for that same address.
    const ROUNDS: usize = 3;
    std::thread::scope(|s| {
        for (pod, second) in [
            (&pod_a, Some("cdn-a.another-lab.com")),
            (&pod_b, Some("cdn-b.another-lab.com")),
            (&pod_c, None),
        ] {
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    connect(pod, "db", 5432);
                    if let Some(cdn) = second {
                        connect(pod, cdn, 443);
                    }
                }
            });
        }
    });

    for (pod, ns, db, cdn) in [
        (&pod_a, "a", db_a.ipv4(), "cdn-a.another-lab.com"),
        (&pod_b, "b", db_b.ipv4(), "cdn-b.another-lab.com"),
    ] {
        let cg = pod.cgroup();
        let records = wait_for_records(&agent, cg.container.id(), 2 * ROUNDS, RECORD_WAIT);
        assert_eq!(records.len(), 2 * ROUNDS, "pod {ns}:\n{}", dump(&records));
        let own_service = format!("db.{ns}.svc.cluster.local");
        for r in &records {
            assert_eq!(r["pod"]["uid"], cg.pod_uid.as_str(), "{r}");
            // Each client is a one-shot process (lookup, connect, exit) and the pod has no
            // other: its resolv.conf was read while its lookup was in flight, since without
            // the Kubernetes API the namespace comes from the search list.
            assert_eq!(
                r["pod"]["namespace"],
                ns,
                "{r}\n{}",
                agent
                    .stderr()
                    .lines()
                    .filter(|l| l.contains("identity read")
                        && l.contains(&cg.container.id().to_string()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            assert_eq!(
                text(r, "container_id"),
                Some(cg.container_id.as_str()),
                "{r}"
            );
            match destination(r) {
                (ip, 5432) => {
                    assert_eq!(ip, IpAddr::V4(db), "{r}");
                    assert_eq!(text(r, "query_name"), Some("db"), "{r}");
                    assert_eq!(text(r, "server_address"), Some(own_service.as_str()), "{r}");
                    assert_eq!(text(r, "resolution"), Some("in-cluster"), "{r}");
                    assert_chain(r, &walk("db", ns, 1));
                    assert_eq!(r["egress"], false, "{r}");
                    assert_eq!(r["flagged"], false, "{r}");
                }
                (ip, 443) => {
                    assert_eq!(ip, IpAddr::V4(EXTERNAL_DB), "{r}");
                    assert_eq!(text(r, "query_name"), Some(cdn), "{r}");
                    assert_eq!(text(r, "server_address"), Some(cdn), "{r}");
                    assert_eq!(text(r, "resolution"), Some("external"), "{r}");
                    // The whole search list first (ndots:5), then the name as is.
                    assert_chain(r, &walk(cdn, ns, 5));
                    assert_eq!(r["egress"], true, "{r}");
                    assert_eq!(r["flagged"], false, "{r}");
                }
                other => panic!("unexpected destination {other:?}: {r}"),
            }
            assert_eq!(text(r, "outcome"), Some("established"), "{r}");
        }
    }
    let cg = pod_c.cgroup();
    let records = wait_for_records(&agent, cg.container.id(), ROUNDS, RECORD_WAIT);
    assert_eq!(records.len(), ROUNDS, "pod c:\n{}", dump(&records));
    for r in &records {
        assert_eq!(r["pod"]["uid"], cg.pod_uid.as_str(), "{r}");
        assert_eq!(
            r["pod"]["namespace"], "c",
            "one-shot clients, their own search list: {r}"
        );
        assert_eq!(destination(r), (IpAddr::V4(EXTERNAL_DB), 5432), "{r}");
        assert_db_escaped(r);
        assert_chain(r, &walk("db", "c", 4));
    }

    // A sidecar (a second container of pod c) resolves `db`; the app container connects to
    // the address it got, as an IP literal (no DNS of its own). One pod, one scope: the
    // connect carries the sidecar's chain, and the app container's identity.
    let sidecar = tb.add_sidecar(&pod_c).expect("sidecar container");
    let resolved = client(|python| sidecar.command(python), &["resolve", "db"]);
    assert_eq!(
        resolved["addrs"],
        serde_json::json!([EXTERNAL_DB.to_string()]),
        "{resolved}"
    );
    let report = connect(&pod_c, &EXTERNAL_DB.to_string(), 5432);
    assert_eq!(report["outcome"], "established", "{report}");
    let pid = report["pid"].as_u64().expect("pid");
    let app = agent.wait_for_record(RECORD_WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(cg.container.id()) && r["pid"].as_u64() == Some(pid)
    });
    assert_eq!(
        text(&app, "container_id"),
        Some(cg.container_id.as_str()),
        "{app}"
    );
    assert_eq!(app["pod"]["uid"], cg.pod_uid.as_str(), "{app}");
    assert_eq!(text(&app, "query_name"), Some("db"), "{app}");
    assert_eq!(
        text(&app, "server_address"),
        Some("db.another-lab.com"),
        "{app}"
    );
    assert_eq!(text(&app, "resolution"), Some("search-escape"), "{app}");
    assert_eq!(app["flagged"], true, "{app}");
    assert_chain(&app, &walk("db", "c", 4));
    assert!(
        agent
            .records_of_cgroup(sidecar.cgroup().container.id())
            .is_empty(),
        "the sidecar only resolved; it made no connection"
    );
    assert_ne!(sidecar.cgroup().container.id(), cg.container.id());
    agent.stop();
}

/// Scenario 9: a lookup nobody answers is counted as unanswered; a refused connect and a
/// connect that times out are reported with their outcome and their resolution.
#[test]
fn unanswered_queries_refused_and_timed_out_connects() {
    let tb = testbed();
    let _outside = Outside::with(&tb, |outside, zone| {
        zone.record(DB_NAME, outside.ipv4())
            .record("gone.another-lab.com", plan::UNANSWERED_EXTERNAL_V4)
            .record("stuck.shop.svc.cluster.local", plan::UNANSWERED_CLUSTER_V4)
    });
    let web = pod_in(&tb, "web", "shop");
    // Its nameserver is an address the switch drops silently: glibc's queries go out and
    // nothing ever comes back (one try of one second, so the lookup fails fast).
    let quiet = tb
        .add_pod(
            PodSpec::new("quiet")
                .search([
                    "shop.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local",
                ])
                .ndots(5)
                .nameserver(plan::UNANSWERED_CLUSTER_V4)
                .option("timeout:1")
                .option("attempts:1"),
        )
        .expect("pod");
    let agent = start_agent();
    let unanswered_before = metric_sum(
        &agent.metrics(),
        "observer_dns_unanswered_queries_total",
        &[],
    );

    let lookup = client(|python| quiet.command(python), &["resolve", "db"]);
    assert!(
        lookup["error"].is_string(),
        "nothing answers the quiet pod: {lookup}"
    );

    let refused = connect(&web, "db", CLOSED_PORT);
    assert_eq!(refused["outcome"], "refused", "{refused}");
    let slow = Duration::from_secs(1);
    let gone = connect_within(&web, "gone", 80, slow);
    assert_eq!(gone["outcome"], "timeout", "{gone}");
    let stuck = connect_within(&web, "stuck", 80, slow);
    assert_eq!(stuck["outcome"], "timeout", "{stuck}");

    let cg = web.cgroup();
    let records = wait_for_records(&agent, cg.container.id(), 3, RECORD_WAIT);
    assert_eq!(records.len(), 3, "{}", dump(&records));
    let by_port = |port: u16, ip: IpAddr| {
        records
            .iter()
            .find(|r| destination(r) == (ip, port))
            .unwrap_or_else(|| panic!("no record for {ip}:{port}:\n{}", dump(&records)))
    };
    // The flag sentence; the outcome is its own field (the span status adds it).
    let refused = json!({
        "outcome": "refused", "resolution": "search-escape",
        "server_address": "db.another-lab.com", "egress": true, "flagged": true,
        "message": escape_message("db", "203.0.113.10", "shop")
    });
    let timed_out_outside = json!({
        "outcome": "timeout", "resolution": "search-escape",
        "server_address": "gone.another-lab.com", "egress": true, "flagged": true,
        "message": escape_message("gone", "203.0.113.250", "shop")
    });
    let timed_out_inside = json!({
        "outcome": "timeout", "resolution": "in-cluster",
        "server_address": "stuck.shop.svc.cluster.local", "egress": false, "flagged": false
    });
    for (port, ip, expected) in [
        (CLOSED_PORT, EXTERNAL_DB, refused),
        (80, plan::UNANSWERED_EXTERNAL_V4, timed_out_outside),
        (80, plan::UNANSWERED_CLUSTER_V4, timed_out_inside),
    ] {
        assert_fields(by_port(port, IpAddr::V4(ip)), expected);
    }
    assert_chain(
        by_port(80, IpAddr::V4(plan::UNANSWERED_EXTERNAL_V4)),
        &walk("gone", "shop", 4),
    );

    // The quiet pod's queries (A and AAAA of its first search-list name) are given up on
    // after the core's query timeout: named in the agent's log with the pod's scope, and
    // counted. The counter is node-wide (other tests' pods count too), so it must rise by
    // at least this pod's two.
    let scope = format!("scope=pod/{}", quiet.cgroup().pod_uid);
    let deadline = Instant::now() + RECORD_WAIT;
    let given_up = |log: &str, qtype: &str| {
        log.lines().any(|l| {
            l.contains("DNS query never answered")
                && l.contains("name=db.shop.svc.cluster.local")
                && l.contains(&format!("qtype={qtype}"))
                && l.contains(&scope)
        })
    };
    while !(given_up(&agent.stderr(), "A") && given_up(&agent.stderr(), "AAAA")) {
        assert!(
            Instant::now() < deadline,
            "the agent never reported the quiet pod's queries as unanswered; its log:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.metrics_when(RECORD_WAIT, |m| {
        metric_sum(m, "observer_dns_unanswered_queries_total", &[]) >= unanswered_before + 2.0
    });
    assert!(
        agent
            .records_of_cgroup(quiet.cgroup().container.id())
            .is_empty(),
        "a lookup that failed made no connection"
    );
    agent.stop();
}

/// Scenario 10: the in-cluster answer is withdrawn while the pod runs; the next connect
/// escapes through the search list and is reported as drift.
#[test]
fn a_name_that_leaves_the_cluster_drifts() {
    let tb = testbed();
    let (in_cluster, _in_cluster_listener) = service_db(&tb);
    let outside = Outside::with(&tb, |outside, zone| {
        zone.record("db.shop.svc.cluster.local", in_cluster.ipv4())
            .record(DB_NAME, outside.ipv4())
    });
    let dns = &outside.dns;
    let web = pod_in(&tb, "web", "shop");
    let agent = start_agent();
    let cg = web.cgroup().container.id();

    let first = connect(&web, "db", 5432);
    assert_eq!(first["peer"], in_cluster.ipv4().to_string(), "{first}");
    let records = wait_for_records(&agent, cg, 1, RECORD_WAIT);
    let r = &records[0];
    assert_eq!(text(r, "resolution"), Some("in-cluster"), "{r}");
    assert_eq!(
        text(r, "server_address"),
        Some("db.shop.svc.cluster.local"),
        "{r}"
    );
    assert_eq!(
        (&r["egress"], &r["drift"]),
        (&json!(false), &json!(false)),
        "{r}"
    );

    // dnsmasq's local answers carry TTL 0 (no --local-ttl) and glibc keeps no cache, so the
    // next lookup asks again and the walk goes on to the node's domain.
    dns.remove_record("db.shop.svc.cluster.local")
        .expect("remove record");
    let second = connect(&web, "db", 5432);
    assert_eq!(second["peer"], EXTERNAL_DB.to_string(), "{second}");
    let records = wait_for_records(&agent, cg, 2, RECORD_WAIT);
    assert_eq!(records.len(), 2, "{}", dump(&records));
    let r = &records[1];
    assert_eq!(destination(r), (IpAddr::V4(EXTERNAL_DB), 5432), "{r}");
    assert_fields(
        r,
        json!({
            "query_name": "db", "resolution": "search-escape",
            "server_address": "db.another-lab.com"
        }),
    );
    assert_chain(r, &walk("db", "shop", 4));
    assert_fields(
        r,
        json!({
            "drift": true, "flagged": true, "egress": true
        }),
    );
    assert_eq!(
        records[0]["drift"], false,
        "the first connect did not drift"
    );
    agent.stop();
}

/// Scenario 11: a node process (no pod) with the same search list makes the same lookup and
/// connect: attributed to its host cgroup, and still classified as an escape.
#[test]
fn a_node_process_escapes_as_the_host() {
    let tb = testbed();
    let _outside = Outside::new(&tb);
    // The pod only lends its network namespace and resolv.conf: the process runs in a
    // systemd service's cgroup, as a node daemon would.
    let node_net = pod_in(&tb, "node", "shop");
    let service = tb.host_cgroup("node-daemon").expect("host cgroup");
    let agent = start_agent();

    let report = client(
        |python| node_net.netns().command(python).in_cgroup(&service),
        &["connect", "db", "5432", "any", "2"],
    );
    assert_eq!(report["outcome"], "established", "{report}");
    let pid = report["pid"].as_u64().expect("pid");
    let records = wait_for_records(&agent, service.id(), 1, RECORD_WAIT);
    assert_eq!(records.len(), 1, "{}", dump(&records));
    let r = &records[0];
    assert_eq!(r["pid"].as_u64(), Some(pid), "{r}");
    assert!(r["pod"].is_null(), "a node process has no pod: {r}");
    assert!(r["container_id"].is_null(), "{r}");
    assert_eq!(destination(r), (IpAddr::V4(EXTERNAL_DB), 5432), "{r}");
    assert_fields(
        r,
        json!({
            "query_name": "db", "server_address": "db.another-lab.com",
            "search_domain": "another-lab.com", "resolution": "search-escape"
        }),
    );
    assert_chain(r, &walk("db", "shop", 4));
    assert_fields(
        r,
        json!({
            "wasted_queries": 3, "egress": true, "flagged": true
        }),
    );
    assert!(
        agent
            .records_of_cgroup(node_net.cgroup().container.id())
            .is_empty(),
        "nothing ran in the pod's own cgroup"
    );
    // The node process was a one-shot (lookup, connect, exit). Its resolv.conf is read, when
    // the identity worker reaches the cgroup before the process exits, through the first
    // query's early wakeup: a race that a slow guest (QEMU without acceleration) can lose,
    // so it is not asserted here; the chain above is the user-visible result either way.
    // Pods' one-shot clients are asserted to get their own search list in
    // `each_pod_gets_its_own_resolution`.
    agent.stop();
}

/// Scenario 12: many pods resolve and connect at once for a while. No kernel event is lost,
/// every connect a pod made is reported once, each with the resolution of the name it used.
#[test]
fn many_pods_at_once_lose_nothing() {
    const PODS: usize = 10;
    const LOAD: Duration = Duration::from_secs(12);
    const MAX_ROUNDS: usize = 200;
    // Between rounds: a steady load (about 300 connects and 1200 DNS messages a second in
    // all), not one burst.
    const PAUSE: Duration = Duration::from_millis(100);
    let tb = testbed();
    let api = tb.add_cluster_host("api").expect("cluster host");
    let ext = tb
        .add_external_host_at("ext", Ipv4Addr::new(203, 0, 113, 11))
        .expect("external host");
    let _listeners = [
        api.listen_tcp(8080).expect("listen"),
        ext.listen_tcp(443).expect("listen"),
    ];
    let outside = Outside::with(&tb, |db, zone| {
        (0..PODS).fold(
            zone.record(DB_NAME, db.ipv4())
                .record("ext.another-lab.com", ext.ipv4()),
            |zone, i| zone.record(&format!("api.ns{i}.svc.cluster.local"), api.ipv4()),
        )
    });
    let db = &outside.db;
    let pods: Vec<Pod> = (0..PODS)
        .map(|i| pod_in(&tb, &format!("m{i}"), &format!("ns{i}")))
        .collect();
    let agent = start_agent();

    // Per name: where it must lead and how observer must classify it. `api` is a Service of
    // the pod's namespace; `db` escapes through the node's domain; the absolute name is
    // asked as is.
    let expected: BTreeMap<&str, (IpAddr, u16, &str, bool)> = BTreeMap::from([
        ("api", (api.ipv4().into(), 8080, "in-cluster", false)),
        ("db", (db.ipv4().into(), 5432, "search-escape", true)),
        (
            "ext.another-lab.com.",
            (ext.ipv4().into(), 443, "external", true),
        ),
    ]);
    let targets: Vec<String> = expected
        .iter()
        .map(|(name, (_, port, _, _))| format!("{name}:{port}"))
        .collect();
    let mut args = vec![
        "loop".to_owned(),
        LOAD.as_secs_f64().to_string(),
        MAX_ROUNDS.to_string(),
        PAUSE.as_secs_f64().to_string(),
        CONNECT_TIMEOUT.as_secs_f64().to_string(),
    ];
    args.extend(targets);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let running: Vec<_> = pods
        .iter()
        .map(|pod| spawn_client(|python| pod.command(python), &args))
        .collect();
    let reports: Vec<Value> = running
        .into_iter()
        // A hang guard on top of the load's own length: python's start and the last
        // round's connect take tens of seconds in a guest under TCG on a busy machine.
        .map(|p| client_report(p, &args, LOAD + Duration::from_secs(120)))
        .collect();
    eprintln!("load ran {:?}", started.elapsed());

    let mut total = 0;
    for (pod, report) in pods.iter().zip(&reports) {
        // name -> connects the pod made with it (every one established).
        let mut made: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, (ip, _, _, _)) in &expected {
            let per_peer = report["names"][*name]
                .as_object()
                .unwrap_or_else(|| panic!("pod {} never used {name}: {report}", pod.name()));
            assert_eq!(
                per_peer.keys().collect::<Vec<_>>(),
                [&ip.to_string()],
                "pod {} reached other peers: {report}",
                pod.name()
            );
            let outcomes = &per_peer[&ip.to_string()];
            assert_eq!(
                outcomes.as_object().map(|o| o.keys().collect::<Vec<_>>()),
                Some(vec![&"established".to_owned()]),
                "pod {}: {report}",
                pod.name()
            );
            made.insert(
                name,
                outcomes["established"].as_u64().expect("count") as usize,
            );
        }
        let connects: usize = made.values().sum();
        total += connects;
        let cg = pod.cgroup().container.id();
        let records = wait_for_records(&agent, cg, connects, RECORD_WAIT);
        assert_eq!(
            records.len(),
            connects,
            "pod {}: one record per connect",
            pod.name()
        );
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &records {
            let dest = destination(r);
            let (name, (_, _, resolution, egress)) = expected
                .iter()
                .find(|(_, (ip, port, _, _))| (*ip, *port) == dest)
                .unwrap_or_else(|| panic!("pod {}: unexpected destination: {r}", pod.name()));
            assert_eq!(text(r, "query_name"), Some(*name), "{r}");
            assert_eq!(text(r, "resolution"), Some(*resolution), "{r}");
            assert_eq!(r["egress"], *egress, "{r}");
            assert_eq!(r["flagged"], *resolution == "search-escape", "{r}");
            assert_eq!(text(r, "outcome"), Some("established"), "{r}");
            *seen.entry(name).or_default() += 1;
        }
        assert_eq!(seen, made, "pod {}: records per name", pod.name());
    }
    eprintln!("{total} connects from {PODS} pods, each reported once");

    // The loss counters are published every second: wait for a scrape taken after the run.
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = agent.metrics();
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("observer_kernel_events_lost_total{"))
        .collect();
    assert!(!series.is_empty(), "no loss counters published:\n{metrics}");
    assert_eq!(
        metric_sum(&metrics, "observer_kernel_events_lost_total", &[]),
        0.0,
        "kernel events were lost: {series:#?}"
    );
    // Nothing more arrives for these pods: each connect was reported exactly once.
    for pod in &pods {
        let records = agent.records_of_cgroup(pod.cgroup().container.id());
        let report = &reports[pods
            .iter()
            .position(|p| p.name() == pod.name())
            .expect("pod")];
        let made: u64 = report["names"]
            .as_object()
            .expect("names")
            .values()
            .flat_map(|per_peer| per_peer.as_object().expect("peers").values())
            .flat_map(|outcomes| outcomes.as_object().expect("outcomes").values())
            .map(|n| n.as_u64().expect("count"))
            .sum();
        assert_eq!(records.len() as u64, made, "pod {}", pod.name());
    }
    agent.stop();
}

/// A named pipe in the temporary directory, removed when dropped: reading it blocks until a
/// writer opens it and closes it, as a hung `/proc` or cgroupfs read blocks.
struct Fifo(std::path::PathBuf);

impl Fifo {
    fn new(tag: &str) -> Fifo {
        let path = std::env::temp_dir().join(format!(
            "observer-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(
            made,
            0,
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Fifo(path)
    }

    /// Lets the reader blocked on the pipe go on: opens it for writing (once the reader has
    /// it open, bounded) and closes it, so the reader sees its end.
    fn release(&self, within: Duration) {
        use std::os::unix::fs::OpenOptionsExt;
        let deadline = Instant::now() + within;
        loop {
            // Non-blocking: with no reader yet, open fails (ENXIO) instead of waiting.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0)
            {
                Ok(writer) => {
                    drop(writer);
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("opening {} for writing: {e}", self.0.display()),
            }
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Identity never blocks correlation. The identity worker's first read of one pod's identity
/// stalls (a real blocking read of a named pipe, through the agent's test-only fault
/// injection point `OBSERVER_FAULT_STALL_IDENTITY`): that pod's connects wait, while another
/// pod's connects made after them are still reported. Once the read goes on, the stalled
/// pod's connects are all reported, in the order they were made, with its pod and the
/// search list of its own resolv.conf.
#[test]
fn a_stalled_identity_read_holds_back_only_its_own_pod() {
    let tb = testbed();
    let _outside = Outside::new(&tb);
    let busy = pod_in(&tb, "busy", "busy");
    let stalled = pod_in(&tb, "stalled", "slow");
    // The pod's long-running process: what the agent reads the pod's resolv.conf through
    // once the stall is over, its one-shot clients being gone by then.
    let _main = stalled
        .command("sleep")
        .arg("3600")
        .spawn()
        .expect("the stalled pod's main process");
    let fifo = Fifo::new("stall");
    let stalled_cgroup = stalled.cgroup().container.id();
    let busy_cgroup = busy.cgroup().container.id();
    let filter = "info,observer::agent=debug";
    let mut spec = observer_tests::agent::AgentSpec::new()
        .args(["--kube", "off", "--log-level", filter])
        .env("RUST_LOG", filter)
        .env(
            "OBSERVER_FAULT_STALL_IDENTITY",
            format!("{stalled_cgroup}:{}", fifo.0.display()),
        );
    for cidr in scenario_pods_support::CLUSTER_CIDRS {
        spec = spec.args(["--cluster-cidr", cidr]);
    }
    let agent = observer_tests::agent::Agent::start(spec);

    // The busy pod's identity is known before the stall begins.
    let first = connect(&busy, "db", 5432);
    assert_eq!(first["outcome"], "established", "{first}");
    wait_for_records(&agent, busy_cgroup, 1, RECORD_WAIT);

    // The stalled pod's one-shot clients: their events reach the agent, whose worker
    // stalls on their cgroup.
    let stalled_pids: Vec<u64> = (0..2)
        .map(|_| {
            let report = connect(&stalled, "db", 5432);
            assert_eq!(report["outcome"], "established", "{report}");
            report["pid"].as_u64().expect("pid")
        })
        .collect();
    let deadline = Instant::now() + RECORD_WAIT;
    while !agent
        .stderr()
        .contains("fault injection: stalling the identity worker")
    {
        assert!(
            Instant::now() < deadline,
            "the identity worker never reached the stall:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // While it stalls, the busy pod's later connects are reported...
    let later = connect(&busy, "db", 5432);
    let later_pid = later["pid"].as_u64().expect("pid");
    let connected = Instant::now();
    agent.wait_for_record(RECORD_WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(busy_cgroup) && r["pid"].as_u64() == Some(later_pid)
    });
    // A figure for the book, not a bound: how soon a record comes while identity stalls.
    eprintln!(
        "during the stall, the busy pod's connect was reported {:?} after it returned",
        connected.elapsed()
    );
    // ...and the stalled pod's earlier ones wait for their identity rather than going on
    // without it.
    assert!(
        agent.records_of_cgroup(stalled_cgroup).is_empty(),
        "reported before its identity was read:\n{}",
        dump(&agent.records_of_cgroup(stalled_cgroup))
    );
    assert!(
        !agent
            .stderr()
            .contains("fault injection: the identity worker goes on"),
        "the stall ended by itself"
    );

    fifo.release(RECORD_WAIT);
    let released = Instant::now();
    let records = wait_for_records(&agent, stalled_cgroup, stalled_pids.len(), RECORD_WAIT);
    eprintln!(
        "the stalled pod's connects were reported {:?} after the stall ended",
        released.elapsed()
    );
    assert_eq!(
        records
            .iter()
            .map(|r| r["pid"].as_u64())
            .collect::<Vec<_>>(),
        stalled_pids.iter().map(|p| Some(*p)).collect::<Vec<_>>(),
        "every connect once, in order:\n{}",
        dump(&records)
    );
    for r in &records {
        assert_eq!(r["pod"]["uid"], stalled.cgroup().pod_uid.as_str(), "{r}");
        // Without the Kubernetes API the namespace comes from the pod's own search list.
        assert_eq!(r["pod"]["namespace"], "slow", "{r}");
        assert_db_escaped(r);
        assert_chain(r, &walk("db", "slow", 4));
    }
    for r in agent.records_of_cgroup(busy_cgroup) {
        assert_eq!(r["pod"]["namespace"], "busy", "{r}");
        assert_chain(&r, &walk("db", "busy", 4));
    }
    let metrics = agent.metrics_when(RECORD_WAIT, |m| {
        m.contains("kind=\"identity_wait_expired\"")
    });
    for kind in [
        "identity_wait_expired",
        "identity_wait_full",
        "identity_requests_dropped",
    ] {
        assert_eq!(
            metric_sum(&metrics, "observer_core_evictions_total", &[("kind", kind)]),
            0.0,
            "{kind}"
        );
    }
    agent.stop();
}

/// The story's record: `db` walked the search list and was answered by
/// `db.another-lab.com`, outside the cluster, after three NXDOMAIN.
fn assert_db_escaped(r: &Value) {
    assert_fields(
        r,
        json!({
            "query_name": "db", "server_address": "db.another-lab.com",
            "search_domain": "another-lab.com", "resolution": "search-escape",
            "wasted_queries": 3, "flagged": true
        }),
    );
}
