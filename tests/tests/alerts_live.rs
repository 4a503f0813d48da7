//! observer's shipped alerts, live: a real Prometheus scrapes the real agent while the
//! testbed plays each alert's scenario, and the test reads Prometheus's own
//! `/api/v1/alerts`. Each alert must go pending, then firing, with the labels and on-call
//! text a user sees, for the namespace whose scenario drives it, and stay quiet for the
//! test's other namespaces (and for the healthy agent, for the agent's own alerts).
//!
//! The rules are the shipped ones with every `for:` set to [`HOLD`]
//! ([`LiveRules::shipped_with_hold`]); the book page "Alerts and dashboards" says so.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use observer_tests::{
    CLOSED_PORT, DnsServer, Family, Pod, PodSpec, Process, Testbed,
    agent::{Agent, AgentSpec},
    dashboard,
    kube_api::{KubeApi, external_name_service},
    plan,
    prometheus::{LiveRules, Prometheus, ScrapeTarget},
    story::{
        DB_NAME, DB_PORT, EXTERNAL_DB, Outside, cluster_args, connect, outside_resolver,
        service_db, testbed,
    },
};
use serde_json::Value;

/// How long every alert stays pending before it fires, in these tests only.
const HOLD: Duration = Duration::from_secs(5);
/// Hang guard for anything Prometheus must see (scrape, evaluation, hold): not a timing claim.
const GUARD: Duration = Duration::from_secs(120);
/// Lookups the amplification scenario makes: the shipped rule asks for more than 0.5 lookups
/// per second over 15 minutes (450), each wasting three names.
const AMPLIFIED_LOOKUPS: usize = 700;
/// Lookups without an answer in the unanswered scenario (the rule wants 5 in 10 minutes).
const UNANSWERED_LOOKUPS: usize = 8;

/// A pod of namespace `namespace` (the kubelet's search list for it, then `extra`), with a
/// long-lived main process: the agent reads a pod's resolv.conf through a live process.
fn pod_in(tb: &Testbed, name: &str, namespace: &str, extra: &[&str]) -> (Pod, Process) {
    let mut search = vec![
        format!("{namespace}.svc.cluster.local"),
        "svc.cluster.local".to_owned(),
        "cluster.local".to_owned(),
    ];
    search.extend(extra.iter().map(|s| (*s).to_owned()));
    let pod = tb
        .add_pod(PodSpec::new(name).search(search).ndots(5))
        .expect("pod");
    let main = pod
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("the pod's main process");
    (pod, main)
}

/// A healthy agent raises none of the alerts about the agent itself (lost kernel events,
/// failing or full span export, degraded enrichment).
fn assert_raises_no_agent_alert(prometheus: &Prometheus, agent: &Agent) {
    let instance = agent.metrics_addr().to_string();
    for name in [
        "ObserverKernelEventsLost",
        "ObserverSpanExportFailing",
        "ObserverSpanQueueFull",
        "ObserverEnrichmentDegraded",
    ] {
        assert!(
            alerts_of(prometheus, name, &[("instance", &instance)]).is_empty(),
            "the healthy agent raised {name}"
        );
    }
}

/// The alerts named `name` whose labels include every pair of `labels`.
fn alerts_of(prometheus: &Prometheus, name: &str, labels: &[(&str, &str)]) -> Vec<Value> {
    prometheus
        .alerts()
        .into_iter()
        .filter(|a| {
            a["labels"]["alertname"] == name && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
        })
        .collect()
}

/// What the test saw of one alert: when it was first pending and first firing.
struct Fired {
    alert: Value,
    to_pending: Option<Duration>,
    to_firing: Duration,
}

/// Polls `/api/v1/alerts` from `event` until alert `name` with `labels` fires; records when
/// it was seen pending first. Panics unless it was pending before it fired.
fn wait_firing(
    prometheus: &Prometheus,
    name: &str,
    labels: &[(&str, &str)],
    event: Instant,
) -> Fired {
    let mut to_pending = None;
    let alert = prometheus.wait_for(&format!("{name} {labels:?} firing"), GUARD, || {
        let found = alerts_of(prometheus, name, labels);
        assert!(
            found.len() <= 1,
            "one {name} alert for {labels:?}: {found:#?}"
        );
        let alert = found.into_iter().next()?;
        match alert["state"].as_str() {
            Some("pending") => {
                to_pending.get_or_insert_with(|| event.elapsed());
                None
            }
            Some("firing") => Some(alert),
            other => panic!("{name}: unexpected state {other:?}: {alert}"),
        }
    });
    let fired = Fired {
        alert,
        to_pending,
        to_firing: event.elapsed(),
    };
    eprintln!(
        "ALERT {name} {labels:?}: pending after {:?}, firing after {:.1?} from the event",
        fired.to_pending.map(|d| format!("{d:.1?}")),
        fired.to_firing
    );
    fired
}

/// The first record of `pod` whose `field` is `value`.
fn record_of(agent: &Agent, pod: &Pod, field: &str, value: &str) -> Value {
    let cgroup = pod.cgroup().container.id();
    agent.wait_for_record(GUARD, |r| {
        r["cgroup_id"].as_u64() == Some(cgroup) && r[field] == value
    })
}

/// What would end a flagged or amplified record's chain: its message after the reason.
fn fix_in(record: &Value) -> String {
    let message = record["message"].as_str().unwrap_or_default();
    message
        .split_once(", outside the cluster: ")
        .or_else(|| message.split_once(" answered: "))
        .map(|(_, fix)| fix.to_owned())
        .unwrap_or_else(|| panic!("a message with a fix: {record}"))
}

fn label_set(alert: &Value) -> BTreeMap<String, String> {
    alert["labels"]
        .as_object()
        .expect("labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_owned()))
        .collect()
}

fn pairs(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The test's own namespaces for which alert `name` is active (pending or firing).
fn namespaces_alerting(prometheus: &Prometheus, name: &str, ours: &[&str]) -> BTreeSet<String> {
    alerts_of(prometheus, name, &[])
        .iter()
        .filter_map(|a| a["labels"]["namespace"].as_str().map(str::to_owned))
        .filter(|ns| ours.contains(&ns.as_str()))
        .collect()
}

/// glibc in `pod` resolves `name` and connects to [`DB_PORT`]; panics unless it reached
/// `expected`.
fn connect_to(pod: &Pod, name: &str, expected: IpAddr, dns: &DnsServer) {
    let (_, peer) = connect(pod, name, DB_PORT, Family::V4, dns);
    assert_eq!(peer, expected, "{} connected to {name}", pod.name());
}

/// Runs a Python script in `pod` to its end (bounded), panicking with its output on failure.
fn run_script(pod: &Pod, script: &str, args: &[&str], within: Duration) {
    pod.command("python3")
        .args(["-c", script])
        .args(args)
        .timeout(within)
        .output()
        .expect("python3 in the pod")
        .check("script in the pod")
        .expect("the script succeeded");
}

/// `lookups` times: resolve `name` through the search list and connect to `port`.
const CONNECT_LOOP: &str = r#"import socket, sys
name, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    socket.create_connection((name, port), timeout=3).close()
"#;

/// `n` times: resolve `name` (A and AAAA); every attempt must fail (nobody answers).
const UNANSWERED_LOOP: &str = r#"import socket, sys
name, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    try:
        socket.getaddrinfo(name, 80)
        sys.exit("resolved: " + name)
    except socket.gaierror:
        pass
"#;

/// The seed story fires `ObserverSearchDomainEscape` (pending, then firing, exact labels and
/// text) and the in-cluster connection after the fix adds nothing; a CNAME out of the
/// cluster, a drift, a search-list amplification and unanswered queries each fire their
/// alert for their own namespace only; the healthy agent fires none of its own alerts.
#[test]
fn workload_alerts_fire_for_their_scenario_and_stay_quiet_without_it() {
    let test_start = Instant::now();
    let tb = testbed();
    let run = tb.run_id().suffix().to_owned();
    let ns = |role: &str| format!("{role}-{run}");
    let (esc, cname, drift, amp, lonely, hardcoded) = (
        ns("esc"),
        ns("cname"),
        ns("drift"),
        ns("amp"),
        ns("lonely"),
        ns("hardcoded"),
    );
    let ours = [
        esc.as_str(),
        cname.as_str(),
        drift.as_str(),
        amp.as_str(),
        lonely.as_str(),
        hardcoded.as_str(),
    ];

    // The address after db's (which the story's outside takes below).
    let partner = tb
        .add_external_host_at("partner", Ipv4Addr::new(203, 0, 113, 11))
        .expect("external host");
    let _partner_listener = partner.listen_tcp(DB_PORT).expect("listener");
    let (svc, _svc_listener) = service_db(&tb);
    let outside = Outside::with(&tb, |db, zone| {
        zone.local_zone("partner.example")
            .record(DB_NAME, db.ipv4())
            .record("api.partner.example", partner.ipv4())
            .record(&format!("db.{drift}.svc.cluster.local"), svc.ipv4())
            .cname(&format!("ledger.{cname}.svc.cluster.local"), DB_NAME)
            // What cluster DNS answers for the ExternalName Service `vendor`.
            .cname(&format!("vendor.{cname}.svc.cluster.local"), DB_NAME)
    });
    let dns = &outside.dns;
    let (esc_pod, _esc_main) = pod_in(&tb, "esc", &esc, &["another-lab.com"]);
    let (cname_pod, _cname_main) = pod_in(&tb, "cname", &cname, &["another-lab.com"]);
    let (drift_pod, _drift_main) = pod_in(&tb, "drift", &drift, &["another-lab.com"]);
    let (amp_pod, _amp_main) = pod_in(&tb, "amp", &amp, &[]);
    let lonely_pod = tb
        .add_pod(
            PodSpec::new("lonely")
                .search([
                    format!("{lonely}.svc.cluster.local"),
                    "svc.cluster.local".to_owned(),
                    "cluster.local".to_owned(),
                ])
                .nameserver(plan::UNANSWERED_CLUSTER_V4)
                .option("timeout:1")
                .option("attempts:1"),
        )
        .expect("pod whose DNS server never answers");
    // A pod whose nameserver is a resolver outside the cluster.
    let (resolver_host, _outside_resolver) = outside_resolver(&tb, partner.ipv4().into());
    let hardcoded_pod = tb
        .add_pod(
            PodSpec::new("hardcoded")
                .search([
                    format!("{hardcoded}.svc.cluster.local"),
                    "svc.cluster.local".to_owned(),
                    "cluster.local".to_owned(),
                ])
                .nameserver(resolver_host.ipv4()),
        )
        .expect("pod with an outside nameserver");
    let _hardcoded_main = hardcoded_pod
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("main process");
    let _lonely_main = lonely_pod
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("main process");

    // The Kubernetes API (a stand-in) declares `vendor` in the CNAME namespace as an
    // ExternalName Service: its CNAME out of the cluster is intended egress.
    let kube_api = KubeApi::start(
        vec![external_name_service(
            "vendor",
            &cname,
            "db.another-lab.com",
        )],
        &run,
    )
    .expect("the stand-in API server");
    let agent = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .args(["--kube", "auto"])
            .env("KUBECONFIG", kube_api.kubeconfig().display().to_string())
            .env("NODE_NAME", "node-a"),
    );
    let prometheus = Prometheus::start(
        &[ScrapeTarget {
            addr: agent.metrics_addr(),
            node: "node-a".to_owned(),
        }],
        &LiveRules::shipped_with_hold(HOLD),
    );
    prometheus.wait_for("the agent synced with the API, scraped", GUARD, || {
        (!prometheus
            .query("observer_enrichment_status{state=\"kube\"} == 1")
            .is_empty())
        .then_some(())
    });

    // The story: `db` walks the search list and escapes through another-lab.com.
    connect_to(&esc_pod, "db", EXTERNAL_DB.into(), dns);
    let escape_event = Instant::now();
    let escape_labels = [
        ("namespace", esc.as_str()),
        ("workload", "_unknown"),
        ("query_name", "db"),
        ("search_domain", "another-lab.com"),
        ("server_address", "db.another-lab.com"),
    ];
    let escape = wait_firing(
        &prometheus,
        "ObserverSearchDomainEscape",
        &escape_labels,
        escape_event,
    );
    assert!(
        escape.to_pending.is_some(),
        "the escape alert was seen pending before it fired"
    );
    let mut expected = pairs(&escape_labels);
    expected.insert("alertname".into(), "ObserverSearchDomainEscape".into());
    expected.insert("severity".into(), "critical".into());
    assert_eq!(label_set(&escape.alert), expected, "exactly these labels");
    let annotations = &escape.alert["annotations"];
    assert_eq!(
        annotations["summary"],
        format!(
            "{esc}/_unknown connected out of the cluster to db.another-lab.com through search domain another-lab.com"
        )
    );
    assert_eq!(
        annotations["description"],
        format!(
            "Workload _unknown in namespace {esc} asked for \"db\", found no such name in the cluster, \
             and its search list completed it with another-lab.com: it connected to db.another-lab.com, \
             outside the cluster (1 connections in 10 minutes). Whoever controls another-lab.com \
             receives this traffic. To end it: use db.another-lab.com. if that server is intended, \
             or create the Service db in namespace {esc}."
        )
    );
    // The alert says the fix in the words of the connection's record (and span status).
    let escape_fix = fix_in(&record_of(&agent, &esc_pod, "resolution", "search-escape"));
    assert_eq!(
        escape_fix,
        format!(
            "use db.another-lab.com. if that server is intended, or create the Service db in namespace {esc}"
        )
    );
    assert!(
        annotations["description"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("To end it: {escape_fix}."))),
        "{annotations}"
    );
    assert_eq!(
        annotations["runbook"],
        "1) Find the connections: Jaeger, service _unknown, tag observer.flagged=true (or \
         `observer run --output json | jq 'select(.flagged)'`). 2) If \"db\" should be an \
         in-cluster Service, it is missing or in another namespace: create it, or make the \
         application use the full name (db.<namespace>.svc.cluster.local.). 3) Remove \
         another-lab.com from the pod's dnsConfig.searches (or the node's resolv.conf that \
         kubelet copies), or lower ndots. 4) Treat data already sent to db.another-lab.com as \
         exposed."
    );

    // The fix: the Service exists; `db` answers in the cluster and nothing new fires.
    dns.add_record(&format!("db.{esc}.svc.cluster.local"), svc.ipv4())
        .expect("the Service's record");
    connect_to(&esc_pod, "db", svc.ipv4().into(), dns);
    let in_cluster =
        format!("observer_connections_total{{namespace=\"{esc}\",resolution=\"in-cluster\"}}");
    prometheus.wait_for("the fixed connection in Prometheus", GUARD, || {
        (!prometheus.query(&in_cluster).is_empty()).then_some(())
    });
    prometheus.wait_evaluations(2, GUARD);
    // The namespace has the escape and the escape's new external destination, both about
    // db.another-lab.com: nothing about the in-cluster name.
    let esc_alerts: Vec<Value> = prometheus
        .alerts()
        .into_iter()
        .filter(|a| a["labels"]["namespace"] == esc.as_str())
        .collect();
    let names: BTreeSet<&str> = esc_alerts
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "ObserverSearchDomainEscape",
            "ObserverNewExternalDestination"
        ]),
        "nothing new after the fix: {esc_alerts:#?}"
    );
    assert_eq!(esc_alerts.len(), 2, "{esc_alerts:#?}");
    assert!(
        esc_alerts
            .iter()
            .all(|a| a["labels"]["server_address"] == "db.another-lab.com"),
        "{esc_alerts:#?}"
    );
    let escape_now = esc_alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == "ObserverSearchDomainEscape")
        .expect("the escape");
    assert_eq!(label_set(escape_now), expected);
    assert_eq!(
        escape_now["annotations"]["description"], annotations["description"],
        "the in-cluster connection is not counted as an escape"
    );

    // An in-cluster name that is a CNAME out of the cluster.
    connect_to(&cname_pod, "ledger", EXTERNAL_DB.into(), dns);
    let ledger = format!("ledger.{cname}.svc.cluster.local");
    let cname_fired = wait_firing(
        &prometheus,
        "ObserverCnameEscape",
        &[
            ("namespace", cname.as_str()),
            ("query_name", "ledger"),
            ("server_address", ledger.as_str()),
        ],
        Instant::now(),
    );
    assert_eq!(cname_fired.alert["labels"]["severity"], "critical");
    assert_eq!(
        cname_fired.alert["annotations"]["summary"],
        format!("{cname}/_unknown followed the CNAME of {ledger} out of the cluster")
    );
    let cname_fix = fix_in(&record_of(&agent, &cname_pod, "resolution", "cname-escape"));
    assert_eq!(
        cname_fix,
        format!(
            "use db.another-lab.com. if that server is intended, or change what {ledger} points to"
        )
    );
    assert!(
        cname_fired.alert["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("or change what {ledger} points to."))),
        "{}",
        cname_fired.alert
    );

    // The same CNAME, declared by the ExternalName Service `vendor`: egress, no alert.
    connect_to(&cname_pod, "vendor", EXTERNAL_DB.into(), dns);
    let vendor = format!("vendor.{cname}.svc.cluster.local");
    let declared = record_of(&agent, &cname_pod, "server_address", &vendor);
    assert_eq!(declared["resolution"], "declared-egress", "{declared}");
    assert_eq!(declared["flagged"], false, "{declared}");
    let declared_series = format!(
        "observer_connections_total{{namespace=\"{cname}\",resolution=\"declared-egress\",server_address=\"{vendor}\"}}"
    );
    prometheus.wait_for("the declared egress in Prometheus", GUARD, || {
        (!prometheus.query(&declared_series).is_empty()).then_some(())
    });
    prometheus.wait_evaluations(2, GUARD);
    assert!(
        alerts_of(
            &prometheus,
            "ObserverCnameEscape",
            &[("server_address", vendor.as_str())]
        )
        .is_empty(),
        "the declared CNAME raises no CNAME escape: {:#?}",
        alerts_of(&prometheus, "ObserverCnameEscape", &[])
    );

    // Drift: `db` was in the cluster; its Service goes and the name escapes.
    connect_to(&drift_pod, "db", svc.ipv4().into(), dns);
    prometheus.wait_for("the drift pod's in-cluster connection", GUARD, || {
        (!prometheus
            .query(&format!(
                "observer_connections_total{{namespace=\"{drift}\",resolution=\"in-cluster\"}}"
            ))
            .is_empty())
        .then_some(())
    });
    dns.remove_record(&format!("db.{drift}.svc.cluster.local"))
        .expect("the Service goes");
    connect_to(&drift_pod, "db", EXTERNAL_DB.into(), dns);
    let drift_fired = wait_firing(
        &prometheus,
        "ObserverNameDrift",
        &[
            ("namespace", drift.as_str()),
            ("server_address", "db.another-lab.com"),
        ],
        Instant::now(),
    );
    assert_eq!(drift_fired.alert["labels"]["severity"], "warning");

    // Unanswered: the pod's DNS server never answers.
    let unanswered_event = Instant::now();
    run_script(
        &lonely_pod,
        UNANSWERED_LOOP,
        &["ghost", &UNANSWERED_LOOKUPS.to_string()],
        GUARD,
    );
    wait_firing(
        &prometheus,
        "ObserverDnsUnanswered",
        &[("namespace", lonely.as_str())],
        unanswered_event,
    );

    // DNS served from outside: the pod's hard-coded nameserver answers it.
    let resolved = hardcoded_pod
        .resolve("www.outside.example", Family::V4)
        .expect("resolve in the pod");
    assert_eq!(
        resolved.addrs,
        Ok(vec![IpAddr::from(partner.ipv4())]),
        "the outside resolver answered"
    );
    let outside = wait_firing(
        &prometheus,
        "ObserverDnsServedFromOutside",
        &[("namespace", hardcoded.as_str())],
        Instant::now(),
    );
    assert_eq!(
        outside.alert["annotations"]["summary"],
        format!("{hardcoded}/_unknown resolves names with a DNS server outside the cluster")
    );
    // The pod connects to what that server answered: the record names the server.
    connect_to(
        &hardcoded_pod,
        "www.outside.example",
        partner.ipv4().into(),
        dns,
    );
    let record = record_of(
        &agent,
        &hardcoded_pod,
        "server_address",
        "www.outside.example",
    );
    assert_eq!(
        record["dns_server"],
        resolver_host.ipv4().to_string(),
        "the record names the outside server: {record}"
    );
    assert_eq!(record["dns_from_outside"], true, "{record}");
    assert_eq!(record["resolution"], "external", "{record}");
    let cluster_dns_record = agent.wait_for_record(GUARD, |r| {
        r["cgroup_id"].as_u64() == Some(esc_pod.cgroup().container.id())
    });
    assert_eq!(
        cluster_dns_record["dns_server"],
        dns.ipv4().to_string(),
        "cluster DNS answered the story: {cluster_dns_record}"
    );
    assert_eq!(cluster_dns_record["dns_from_outside"], false);

    // Amplification: every lookup of an outside name walks three cluster suffixes first.
    // One lookup first, so the series exists in Prometheus before the burst: the rule's
    // rate() then counts every lookup of the burst.
    run_script(
        &amp_pod,
        CONNECT_LOOP,
        &["api.partner.example", &DB_PORT.to_string(), "1"],
        GUARD,
    );
    let amp_lookups = format!("observer_dns_lookup_duration_seconds_count{{namespace=\"{amp}\"}}");
    prometheus.wait_for(
        "the amplified workload's first lookup in Prometheus",
        GUARD,
        || (!prometheus.query(&amp_lookups).is_empty()).then_some(()),
    );
    let amp_event = Instant::now();
    run_script(
        &amp_pod,
        CONNECT_LOOP,
        &[
            "api.partner.example",
            &DB_PORT.to_string(),
            &AMPLIFIED_LOOKUPS.to_string(),
        ],
        GUARD * 3,
    );
    let amp_fired = wait_firing(
        &prometheus,
        "ObserverSearchListAmplification",
        &[("namespace", amp.as_str())],
        amp_event,
    );
    assert_eq!(
        amp_fired.alert["annotations"]["summary"],
        format!("{amp}/_unknown wastes 3.0 NXDOMAIN queries per DNS lookup")
    );
    let amp_record = agent.wait_for_record(GUARD, |r| {
        r["cgroup_id"].as_u64() == Some(amp_pod.cgroup().container.id())
    });
    assert_eq!(
        amp_record["message"],
        "api.partner.example tried 3 names of the search list in vain before api.partner.example \
         answered: use api.partner.example. or set the pod's dnsConfig ndots to 2",
        "{amp_record}"
    );
    assert!(
        amp_fired.alert["annotations"]["description"]
            .as_str()
            .is_some_and(|d| d.contains(
                "To end it: use each name with a trailing dot (api.example.com.), or set the pod's dnsConfig ndots"
            )),
        "{}",
        amp_fired.alert
    );

    // Every name first reached outside the cluster is a new external destination; the
    // in-cluster names (the fixed `db`, the drift's first `db`) are not.
    wait_firing(
        &prometheus,
        "ObserverNewExternalDestination",
        &[
            ("namespace", amp.as_str()),
            ("server_address", "api.partner.example"),
        ],
        amp_event,
    );
    prometheus.wait_evaluations(2, GUARD);
    let new_destinations: BTreeSet<(String, String)> =
        alerts_of(&prometheus, "ObserverNewExternalDestination", &[])
            .iter()
            .filter(|a| ours.contains(&a["labels"]["namespace"].as_str().unwrap_or_default()))
            .map(|a| {
                (
                    a["labels"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    a["labels"]["server_address"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
    let expected_new: BTreeSet<(String, String)> = [
        (esc.clone(), "db.another-lab.com".to_owned()),
        (cname.clone(), ledger.clone()),
        (cname.clone(), vendor.clone()),
        (drift.clone(), "db.another-lab.com".to_owned()),
        (amp.clone(), "api.partner.example".to_owned()),
        (hardcoded.clone(), "www.outside.example".to_owned()),
    ]
    .into_iter()
    .collect();
    assert_eq!(new_destinations, expected_new);

    // Quiet without the scenario: each alert is active for its own namespaces only.
    prometheus.wait_evaluations(2, GUARD);
    let expected_namespaces = [
        (
            "ObserverSearchDomainEscape",
            vec![esc.as_str(), drift.as_str()],
        ),
        ("ObserverCnameEscape", vec![cname.as_str()]),
        ("ObserverNameDrift", vec![drift.as_str()]),
        ("ObserverSearchListAmplification", vec![amp.as_str()]),
        ("ObserverDnsUnanswered", vec![lonely.as_str()]),
        ("ObserverDnsServedFromOutside", vec![hardcoded.as_str()]),
    ];
    for (name, namespaces) in expected_namespaces {
        let expected: BTreeSet<String> = namespaces.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            namespaces_alerting(&prometheus, name, &ours),
            expected,
            "{name} is active for exactly its scenario's namespaces"
        );
    }
    assert_raises_no_agent_alert(&prometheus, &agent);

    dashboard_shows_the_scenarios(&prometheus, &ours, test_start.elapsed());
    drop(prometheus);
    assert!(agent.stop().success());
}

/// The shipped dashboard against the same Prometheus: the ConfigMap carries the same JSON
/// with the sidecar's label; its variables list the test's namespaces and workloads; every
/// panel's query returns series with the labels it groups by, among them the series its
/// scenario made; and the panels render to a PNG (at `OBSERVER_DASHBOARD_PNG` when set).
fn dashboard_shows_the_scenarios(prometheus: &Prometheus, ours: &[&str], span: Duration) {
    let shipped = dashboard::shipped();
    let (in_configmap, configmap) = dashboard::from_configmap();
    assert_eq!(
        in_configmap, shipped,
        "the ConfigMap carries the shipped dashboard"
    );
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");

    let (selector, label) = dashboard::variable_query(&shipped, "namespace");
    let namespaces = prometheus.label_values(&label, &selector);
    for ns in ours {
        assert!(
            namespaces.iter().any(|n| n == ns),
            "the namespace variable offers {ns}: {namespaces:?}"
        );
    }
    let (selector, label) = dashboard::variable_query(&shipped, "workload");
    for ns in ours {
        let workloads =
            prometheus.label_values(&label, &dashboard::fill(&selector, ns, ".*", "1m"));
        assert_eq!(workloads, ["_unknown"], "the workload variable for {ns}");
    }

    let [esc, cname, _drift, amp, lonely, hardcoded] = ours else {
        panic!("the test's six namespaces")
    };
    // Per panel (by title), a label value its scenario must show.
    let expected: [(&str, (&str, &str)); 11] = [
        ("Flagged connections", ("namespace", esc)),
        (
            "New external destinations",
            ("server_address", "api.partner.example"),
        ),
        (
            "Egress by workload",
            ("server_address", "api.partner.example"),
        ),
        ("Wasted DNS queries", ("namespace", amp)),
        ("Amplification", ("namespace", amp)),
        ("DNS lookup latency", ("namespace", amp)),
        ("Unanswered DNS", ("namespace", lonely)),
        ("DNS served from outside", ("namespace", hardcoded)),
        ("Agent: kernel events lost", ("node", "node-a")),
        ("Agent: traces dropped", ("node", "node-a")),
        ("Agent: pod metadata source", ("node", "node-a")),
    ];
    let panels = dashboard::panels(&shipped);
    assert_eq!(panels.len(), expected.len(), "every panel is checked");
    let namespace_choice = ours.join("|");
    let mut filled = Vec::new();
    for panel in &panels {
        let (_, (label, value)) = expected
            .iter()
            .find(|(title, _)| panel.title.starts_with(title))
            .unwrap_or_else(|| panic!("no expectation for panel {:?}", panel.title));
        let expr = dashboard::fill(&panel.expr, &namespace_choice, ".*", "1m");
        let series = prometheus.query(&expr);
        assert!(
            !series.is_empty(),
            "panel {:?} shows nothing: {expr}",
            panel.title
        );
        for s in &series {
            for l in panel.grouping_labels() {
                assert!(
                    s["metric"][&l].is_string(),
                    "panel {:?}: a series without {l}: {s}",
                    panel.title
                );
            }
        }
        assert!(
            series.iter().any(|s| s["metric"][*label] == *value),
            "panel {:?} lacks {label}={value}: {series:#?}",
            panel.title
        );
        filled.push(dashboard::Panel {
            expr,
            ..panel.clone()
        });
    }
    // The flagged table names the story's escape and the CNAME escape.
    let flagged = prometheus.query(&filled[0].expr);
    for (ns, name) in [(esc, "db"), (cname, "ledger")] {
        assert!(
            flagged
                .iter()
                .any(|s| s["metric"]["namespace"] == *ns && s["metric"]["query_name"] == name),
            "the flagged table shows {ns} {name}: {flagged:#?}"
        );
    }

    let out = std::env::var_os("OBSERVER_DASHBOARD_PNG").map_or_else(
        || std::env::temp_dir().join(format!("observer-dashboard-{}.png", std::process::id())),
        std::path::PathBuf::from,
    );
    dashboard::render_png(prometheus, &filled, span, &out);
    if std::env::var_os("OBSERVER_DASHBOARD_PNG").is_none() {
        let _ = std::fs::remove_file(&out);
    }
}

/// A node's agent in trouble: its kernel ring too small for a burst of DNS, its OTLP
/// collector closed, its Kubernetes API unreachable. Each of the agent's alerts fires for
/// that agent's node, and none for a healthy agent scraped by the same Prometheus.
#[test]
fn agent_health_alerts_fire_for_the_agent_in_trouble_only() {
    let tb = testbed();
    let outside = Outside::new(&tb);
    let dns = &outside.dns;
    let namespace = format!("trouble-{}", tb.run_id().suffix());
    let (pod, _main) = pod_in(&tb, "web", &namespace, &["another-lab.com"]);

    // An API server address where nothing listens: every watch fails.
    let kubeconfig =
        std::env::temp_dir().join(format!("observer-kubeconfig-{}", tb.run_id().suffix()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: down\n\
             clusters: [{{name: down, cluster: {{server: \"http://127.0.0.1:{CLOSED_PORT}\"}}}}]\n\
             contexts: [{{name: down, context: {{cluster: down, user: nobody}}}}]\n\
             users: [{{name: nobody, user: {{}}}}]\n"
        ),
    )
    .expect("writing the kubeconfig");
    let troubled = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .args(["--kube", "auto", "--ring-size-kib", "4"])
            .env("KUBECONFIG", kubeconfig.display().to_string())
            .env("NODE_NAME", "node-b")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{CLOSED_PORT}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    );
    let healthy = Agent::start(AgentSpec::new().args(cluster_args()));
    let prometheus = Prometheus::start(
        &[
            ScrapeTarget {
                addr: troubled.metrics_addr(),
                node: "node-b".to_owned(),
            },
            ScrapeTarget {
                addr: healthy.metrics_addr(),
                node: "node-a".to_owned(),
            },
        ],
        &LiveRules::shipped_with_hold(HOLD),
    );
    let started = Instant::now();
    let troubled_node = [("node", "node-b")];
    let degraded = wait_firing(
        &prometheus,
        "ObserverEnrichmentDegraded",
        &troubled_node,
        started,
    );
    assert_eq!(
        degraded.alert["annotations"]["summary"],
        "observer on node-b cannot watch the Kubernetes API"
    );

    // A flagged connection is always exported; the collector is closed.
    connect_to(&pod, "db", EXTERNAL_DB.into(), dns);
    let export = wait_firing(
        &prometheus,
        "ObserverSpanExportFailing",
        &[("node", "node-b"), ("reason", "export_failed")],
        Instant::now(),
    );
    assert_eq!(
        export.alert["annotations"]["summary"],
        "observer on node-b is dropping traces (export_failed)"
    );

    // A burst of DNS answers overflows the 4 KiB ring.
    let burst_event = Instant::now();
    run_script(&pod, DNS_BURST, &[&dns.ipv4().to_string()], GUARD);
    let lost = wait_firing(
        &prometheus,
        "ObserverKernelEventsLost",
        &troubled_node,
        burst_event,
    );
    assert!(
        lost.alert["labels"]["reason"]
            .as_str()
            .is_some_and(|r| r.ends_with("ring_full")),
        "{}",
        lost.alert
    );

    prometheus.wait_evaluations(2, GUARD);
    assert_raises_no_agent_alert(&prometheus, &healthy);
    drop(prometheus);
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(troubled.stop().success());
    assert!(healthy.stop().success());
}

/// Sends 3000 DNS queries as fast as the socket takes them, then drains the answers.
const DNS_BURST: &str = r#"import socket, struct, sys, time
server = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
def query(i):
    name = b"".join(bytes([len(p)]) + p for p in [b"burst%d" % i, b"cluster", b"local"]) + b"\0"
    return struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
sent = 0
for i in range(3000):
    try:
        s.sendto(query(i), (server, 53))
        sent += 1
    except BlockingIOError:
        time.sleep(0.001)
# Read the answers for a while: they are delivered to this socket, hence seen by the agent.
end = time.time() + 3
while time.time() < end:
    try:
        s.recv(4096)
    except BlockingIOError:
        time.sleep(0.01)
assert sent > 1000, sent
"#;
