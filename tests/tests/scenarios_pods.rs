//! End-to-end scenarios about pods, run against the real agent binary (`observer run`) in the
//! testbed: real network namespaces, a real dnsmasq, glibc's own resolution through each pod's
//! resolv.conf, kubelet-shaped cgroups. Every assertion reads the agent's real outputs (its
//! JSON lines, filtered on this test's own cgroup ids, and its /metrics): the agent sees the
//! whole machine, and other tests run beside these.
//!
//! Privileged: run as root (they fail, never skip, otherwise).
mod scenario_pods_support;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use observer_tests::{DnsConfig, Pod, PodSpec, Testbed, agent::metric_sum};
use scenario_pods_support::{
    chain_names, client, start_agent, text, wait_for_metrics, wait_for_records,
};
use serde_json::Value;

const EXTERNAL_DB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const RECORD_WAIT: Duration = Duration::from_secs(15);

fn testbed() -> Testbed {
    Testbed::new().expect("building the testbed (these scenarios must run as root)")
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
    let report = client(
        |python| pod.command(python),
        &["connect", name, &port.to_string(), "any", "2"],
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
    let outside = tb
        .add_external_host_at("outside", EXTERNAL_DB)
        .expect("external host");
    let _listeners = [
        db_a.listen_tcp(5432).expect("listen"),
        db_b.listen_tcp(5432).expect("listen"),
        outside.listen_tcp(5432).expect("listen"),
        outside.listen_tcp(443).expect("listen"),
    ];
    let _dns = tb
        .start_dns(
            DnsConfig::dnsmasq()
                .local_zone("another-lab.com")
                .record("db.a.svc.cluster.local", db_a.ipv4())
                .record("db.b.svc.cluster.local", db_b.ipv4())
                .record("db.another-lab.com", outside.ipv4())
                .record("cdn-a.another-lab.com", outside.ipv4())
                .record("cdn-b.another-lab.com", outside.ipv4()),
        )
        .expect("dnsmasq");
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
        assert_eq!(destination(r), (IpAddr::V4(EXTERNAL_DB), 5432), "{r}");
        assert_eq!(text(r, "query_name"), Some("db"), "{r}");
        assert_eq!(text(r, "server_address"), Some("db.another-lab.com"), "{r}");
        assert_eq!(text(r, "search_domain"), Some("another-lab.com"), "{r}");
        assert_eq!(text(r, "resolution"), Some("search-escape"), "{r}");
        assert_eq!(r["wasted_queries"], 3, "{r}");
        assert_eq!(r["flagged"], true, "{r}");
        assert_chain(r, &walk("db", "c", 4));
    }

    // A sidecar (a second container of pod c) resolves `db`; the app container connects to
    // the address it got, as an IP literal (no DNS of its own). One pod, one scope: the
    // connect carries the sidecar's chain, and the app container's identity.
    let sidecar = tb.add_container(&pod_c).expect("sidecar container");
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
        agent.records_of_cgroup(sidecar.cgroup.id()).is_empty(),
        "the sidecar only resolved; it made no connection"
    );
    assert_ne!(sidecar.cgroup.id(), cg.container.id());
    agent.stop();
}
