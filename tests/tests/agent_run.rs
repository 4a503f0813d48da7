//! `observer run` end to end: the real agent binary with its real kernel programs watches a
//! pod of the testbed resolve `db` through its search list with glibc (dnsmasq answering) and
//! connect; the tests read what the agent reports: the OTLP span tree (gRPC and HTTP, into a
//! real receiver), /metrics, the JSON and text lines, and how it starts, fails and stops.
//!
//! The agent sees the whole machine (other tests run in parallel): every assertion is about
//! this test's own pod, found by its cgroup id, pod UID or pid. Privileged: run as root.
mod agent_support;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_support::*;
use observer_tests::{
    ConnectOutcome,
    agent::{Agent, AgentSpec, free_local_port, http_get},
    otlp::{OtlpReceiver, Via},
    story::*,
    traces::*,
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use serde_json::{Value, json};

/// Hang guards: each wait ends with the record or trace (guests under TCG run ~10x slower).
const RECORD_WAIT: Duration = Duration::from_secs(120);
/// Batches leave every 2 s; retries and a loaded machine need a margin.
const TRACE_WAIT: Duration = Duration::from_secs(120);
/// `observer run` lets its exporter flush for 5 s on SIGTERM; a loaded 2-core machine adds
/// scheduling delay on top, and a guest under TCG ten times more. A hang guard, not a speed
/// figure.
const STOP_WITHIN: Duration = Duration::from_secs(60);

/// What glibc asks, in order, for `db` with the story's search list and ndots:5, and what
/// dnsmasq answers.
const SEED_CHAIN: [(&str, &str, &str); 8] = [
    ("db.simple-web-app.svc.cluster.local", "A", "NXDOMAIN"),
    ("db.simple-web-app.svc.cluster.local", "AAAA", "NXDOMAIN"),
    ("db.svc.cluster.local", "A", "NXDOMAIN"),
    ("db.svc.cluster.local", "AAAA", "NXDOMAIN"),
    ("db.cluster.local", "A", "NXDOMAIN"),
    ("db.cluster.local", "AAAA", "NXDOMAIN"),
    ("db.another-lab.com", "A", "NOERROR"),
    ("db.another-lab.com", "AAAA", "NOERROR"),
];
const IN_CLUSTER_DB: &str = "db.simple-web-app.svc.cluster.local";

/// Label pairs a sample must carry.
type Labels<'a> = &'a [(&'a str, &'a str)];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime for the OTLP receiver")
}

fn json_record_of(agent: &Agent, story: &Story, conn: &Connection) -> Value {
    let cgroup = story.cgroup_id();
    let pid = conn.report.pid;
    agent.wait_for_record(RECORD_WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(cgroup) && r["pid"].as_u64() == Some(pid.into())
    })
}

fn stop_cleanly(agent: Agent) {
    let started = Instant::now();
    let (status, log) = agent.stop_with_log();
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM:\n{log}"
    );
    assert!(
        started.elapsed() < STOP_WITHIN,
        "the agent took {:?} to stop",
        started.elapsed()
    );
}

fn span_status(span: &Span) -> (StatusCode, &str) {
    let status = span.status.as_ref().expect("every span has a status");
    (
        StatusCode::try_from(status.code).expect("a known status code"),
        status.message.as_str(),
    )
}

/// Asserts the DNS children of a trace: one per query of `chain`, in order, each a child of
/// the root with the query's attributes, inside the root's time span.
fn assert_dns_children(
    root: &Span,
    children: &[Span],
    chain: &[(&str, &str, &str)],
    answers: &[(&str, &str, Vec<String>)],
) {
    let got: Vec<(String, String)> = children
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                str_attr(&c.attributes, "observer.dns.response_code")
                    .unwrap_or("<unanswered>")
                    .to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = chain
        .iter()
        .map(|(name, qtype, rcode)| (format!("dns {qtype} {name}"), (*rcode).to_owned()))
        .collect();
    assert_eq!(got, want, "the DNS children, in the order sent");
    for (child, (name, qtype, _)) in children.iter().zip(chain) {
        assert_eq!(child.trace_id, root.trace_id, "{}: same trace", child.name);
        assert_eq!(child.parent_span_id, root.span_id, "{}: parent", child.name);
        assert_eq!(child.kind, SpanKind::Client as i32, "{}: kind", child.name);
        assert_eq!(
            str_attr(&child.attributes, "dns.question.name"),
            Some(*name)
        );
        assert_eq!(
            str_attr(&child.attributes, "observer.dns.question.type"),
            Some(*qtype)
        );
        let expected_answers = answers
            .iter()
            .find(|(n, t, _)| n == name && t == qtype)
            .map_or_else(Vec::new, |(_, _, a)| a.clone());
        assert_eq!(
            str_array_attr(&child.attributes, "dns.answers"),
            Some(expected_answers),
            "{}: answers",
            child.name
        );
        assert_eq!(
            span_status(child).0,
            StatusCode::Unset,
            "{}: NXDOMAIN on a search step and NOERROR are no errors",
            child.name
        );
        assert!(
            child.start_time_unix_nano >= root.start_time_unix_nano
                && child.start_time_unix_nano <= child.end_time_unix_nano
                && child.end_time_unix_nano <= root.end_time_unix_nano,
            "{} lies within the root span",
            child.name
        );
    }
    let mut starts: Vec<u64> = children.iter().map(|c| c.start_time_unix_nano).collect();
    starts.sort_unstable();
    assert_eq!(
        starts,
        children
            .iter()
            .map(|c| c.start_time_unix_nano)
            .collect::<Vec<_>>(),
        "children come in the order their queries were sent"
    );
    assert_eq!(
        root.start_time_unix_nano, children[0].start_time_unix_nano,
        "the root starts when the first query of the chain was sent"
    );
}

/// The root's identity attributes (and the resource's) name this pod, container and process.
fn assert_opener(trace: &Trace, story: &Story, conn: &Connection, record: &Value) {
    let a = &trace.root.attributes;
    assert_eq!(str_attr(a, "k8s.pod.uid"), Some(story.pod_uid()));
    assert_eq!(
        str_attr(&trace.resource, "k8s.pod.uid"),
        Some(story.pod_uid())
    );
    assert_eq!(
        str_attr(&trace.resource, "service.name"),
        Some("observer"),
        "a pod known only by UID is under OTEL_SERVICE_NAME's default"
    );
    assert_eq!(str_attr(a, "container.id"), Some(story.container_id()));
    assert_eq!(int_attr(a, "process.pid"), Some(conn.report.pid.into()));
    let comm = record["comm"].as_str().expect("comm");
    assert!(
        comm.starts_with("python3"),
        "the connecting process: {comm}"
    );
    assert_eq!(str_attr(a, "process.executable.name"), Some(comm));
    assert_eq!(
        int_attr(a, "observer.cgroup.id"),
        Some(story.cgroup_id() as i64)
    );
    let ConnectOutcome::Connected { local, .. } = conn.report.outcome else {
        unreachable!("Story::connect checked the connect")
    };
    assert_eq!(
        str_attr(a, "network.local.address"),
        Some(story.pod.ipv4().to_string().as_str())
    );
    assert_eq!(int_attr(a, "network.local.port"), Some(local.port().into()));
    let end = parse_rfc3339_utc(record["time"].as_str().expect("time")).expect("JSON time");
    assert_eq!(
        trace.root.end_time_unix_nano, end,
        "the root ends at the connect outcome (the JSON line's time)"
    );
}

fn seed_story_span_tree(protocol: &str, via: Via) {
    let rt = runtime();
    let receiver = rt
        .block_on(OtlpReceiver::start())
        .expect("OTLP receiver on loopback");
    let endpoint = match via {
        Via::Grpc => receiver.grpc_url(),
        Via::Http => receiver.http_base_url(),
    };
    let story = Story::new();
    let agent = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .args(["--export", "all"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
    );
    let conn = story.connect("db", story.db.ipv4().into());
    story
        .listener
        .wait_for_peer(story.pod.ipv4().into(), RECORD_WAIT)
        .expect("the external db saw the pod");
    let record = json_record_of(&agent, &story, &conn);
    let trace = wait_for_trace(&receiver, story.cgroup_id(), TRACE_WAIT, |t| {
        int_attr(&t.root.attributes, "process.pid") == Some(conn.report.pid.into())
    });

    let root = &trace.root;
    assert_eq!(root.name, "connect db.another-lab.com:5432");
    assert_eq!(root.kind, SpanKind::Client as i32);
    assert_eq!(
        span_status(root),
        (StatusCode::Error, FLAG_MESSAGE),
        "a flagged connection stands out"
    );
    let a = &root.attributes;
    assert_eq!(str_attr(a, "server.address"), Some("db.another-lab.com"));
    assert_eq!(int_attr(a, "server.port"), Some(5432));
    assert_eq!(str_attr(a, "network.peer.address"), Some("203.0.113.10"));
    assert_eq!(int_attr(a, "network.peer.port"), Some(5432));
    assert_eq!(str_attr(a, "network.transport"), Some("tcp"));
    assert_eq!(str_attr(a, "network.type"), Some("ipv4"));
    assert_eq!(bool_attr(a, "observer.egress"), Some(true));
    assert_eq!(bool_attr(a, "observer.flagged"), Some(true));
    assert_eq!(bool_attr(a, "observer.drift"), Some(false));
    assert_eq!(str_attr(a, "observer.resolution"), Some("search-escape"));
    assert_eq!(str_attr(a, "observer.connect.outcome"), Some("established"));
    assert_eq!(str_attr(a, "observer.query.name"), Some("db"));
    assert_eq!(
        str_attr(a, "observer.search_domain"),
        Some("another-lab.com")
    );
    assert_eq!(int_attr(a, "observer.dns.wasted_queries"), Some(3));
    assert_eq!(bool_attr(a, "observer.dns.ndots_walk"), Some(false));
    assert_opener(&trace, &story, &conn, &record);
    assert_dns_children(
        root,
        &trace.others,
        &SEED_CHAIN,
        &[("db.another-lab.com", "A", vec!["203.0.113.10".to_owned()])],
    );
    assert!(
        root.start_time_unix_nano >= unix_ns(conn.before)
            && root.end_time_unix_nano <= unix_ns(conn.after),
        "the trace lies within the test's connect"
    );
    for received in receiver.received() {
        for resource_spans in &received.request.resource_spans {
            for scope_spans in &resource_spans.scope_spans {
                let scope = scope_spans
                    .scope
                    .as_ref()
                    .expect("an instrumentation scope");
                assert_eq!(scope.name, "observer");
            }
        }
        assert_eq!(received.via, via, "every export came over {via:?}");
        if via == Via::Http {
            assert_eq!(
                received.content_type.as_deref(),
                Some("application/x-protobuf")
            );
        }
    }
    stop_cleanly(agent);
}

/// The motivating incident, as a Jaeger user sees it over OTLP gRPC: one CLIENT trace whose
/// root names the escape and whose children are the search list walk.
#[test]
fn seed_story_span_tree_over_otlp_grpc() {
    seed_story_span_tree("grpc", Via::Grpc);
}

/// The same trace over OTLP HTTP/protobuf.
#[test]
fn seed_story_span_tree_over_otlp_http() {
    seed_story_span_tree("http/protobuf", Via::Http);
}

/// A pod whose `db` resolves in the cluster: a healthy trace (one step, A and AAAA) under
/// `--export all`, and no trace at all under the default `--export egress`, while a flagged
/// connection of the same pod, made after it, reaches both collectors.
#[test]
fn in_cluster_connection_is_a_healthy_trace_exported_only_with_export_all() {
    let rt = runtime();
    let all = rt.block_on(OtlpReceiver::start()).expect("receiver");
    let egress = rt.block_on(OtlpReceiver::start()).expect("receiver");
    let cache = std::cell::RefCell::new(None);
    let service = std::cell::RefCell::new(None);
    let story = Story::with(|tb, dns| {
        let (svc, svc_listener) = service_db(tb);
        let ext = tb.add_external_host("cache").expect("external host");
        let dns = dns
            .record(IN_CLUSTER_DB, svc.ipv4())
            .record("cache.another-lab.com", ext.ipv4());
        service.replace(Some((svc_listener, svc)));
        cache.replace(Some((ext.listen_tcp(DB_PORT).expect("listener"), ext)));
        dns
    });
    let (_svc_listener, svc) = service.take().expect("cluster host made");
    let (_cache_listener, cache) = cache.take().expect("external host made");
    let agent_all = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .args(["--export", "all"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", all.grpc_url())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    );
    let agent_egress = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", egress.grpc_url())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    );

    let healthy = story.connect("db", svc.ipv4().into());
    let escaped = story.connect("cache", cache.ipv4().into());
    let record = json_record_of(&agent_all, &story, &healthy);
    json_record_of(&agent_egress, &story, &healthy);

    let pid_is =
        |pid: u32| move |t: &Trace| int_attr(&t.root.attributes, "process.pid") == Some(pid.into());
    let trace = wait_for_trace(
        &all,
        story.cgroup_id(),
        TRACE_WAIT,
        pid_is(healthy.report.pid),
    );
    let root = &trace.root;
    assert_eq!(root.name, format!("connect {IN_CLUSTER_DB}:5432"));
    assert_eq!(root.kind, SpanKind::Client as i32);
    assert_eq!(
        span_status(root).0,
        StatusCode::Unset,
        "a healthy connection is no error: {:?}",
        root.status
    );
    let a = &root.attributes;
    assert_eq!(str_attr(a, "server.address"), Some(IN_CLUSTER_DB));
    assert_eq!(
        str_attr(a, "network.peer.address"),
        Some(svc.ipv4().to_string().as_str())
    );
    assert_eq!(str_attr(a, "observer.resolution"), Some("in-cluster"));
    assert_eq!(bool_attr(a, "observer.egress"), Some(false));
    assert_eq!(bool_attr(a, "observer.flagged"), Some(false));
    assert_eq!(bool_attr(a, "observer.drift"), Some(false));
    assert_eq!(str_attr(a, "observer.query.name"), Some("db"));
    assert_eq!(int_attr(a, "observer.dns.wasted_queries"), Some(0));
    assert_opener(&trace, &story, &healthy, &record);
    assert_dns_children(
        root,
        &trace.others,
        &[
            (IN_CLUSTER_DB, "A", "NOERROR"),
            (IN_CLUSTER_DB, "AAAA", "NOERROR"),
        ],
        &[(IN_CLUSTER_DB, "A", vec![svc.ipv4().to_string()])],
    );

    // The flagged connection came after the healthy one: once the egress agent exported it,
    // the healthy one would have been exported too, had the policy selected it.
    wait_for_trace(
        &egress,
        story.cgroup_id(),
        TRACE_WAIT,
        pid_is(escaped.report.pid),
    );
    wait_for_trace(
        &all,
        story.cgroup_id(),
        TRACE_WAIT,
        pid_is(escaped.report.pid),
    );
    let exported: Vec<String> = traces_of_cgroup(&egress.received(), story.cgroup_id())
        .iter()
        .map(|t| t.root.name.clone())
        .collect();
    assert_eq!(
        exported,
        vec!["connect cache.another-lab.com:5432".to_owned()],
        "--export egress exports the flagged connection only"
    );
    stop_cleanly(agent_all);
    stop_cleanly(agent_egress);
}

/// The body of `path` once it mentions `needle` (the agent publishes its status each second).
fn wait_for_body(addr: std::net::SocketAddr, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        let (code, body) = http_get(addr, path).expect(path);
        assert_eq!(code, 200, "{path}: {body}");
        if body.contains(needle) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never said {needle:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// /metrics, read strictly, counts the seed story; /healthz and /readyz answer.
#[test]
fn metrics_count_the_seed_story() {
    let story = Story::new();
    let agent = Agent::start(AgentSpec::new().args(cluster_args()));
    // Both say where pod metadata comes from (host mode here: no Kubernetes API).
    for (path, first) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let body = wait_for_body(agent.metrics_addr(), path, "enrichment:");
        assert_eq!(
            body.lines().collect::<Vec<_>>(),
            [first, "enrichment: cgroup-only (no Kubernetes API)"],
            "{path}"
        );
    }
    let scrape = || {
        parse_exposition(&agent.metrics())
            .unwrap_or_else(|e| panic!("/metrics is not a valid exposition: {e}"))
    };
    let before = scrape();
    let conn = story.connect("db", EXTERNAL_DB.into());
    json_record_of(&agent, &story, &conn);

    // In cgroup-only mode a pod is known by UID, and its namespace by the first search domain
    // the kubelet wrote: its workload is unknown.
    let pod = [("namespace", "simple-web-app"), ("workload", "_unknown")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        pod.iter().chain(extra).copied().collect()
    };
    let connection = with(&[
        ("resolution", "search-escape"),
        ("egress", "true"),
        ("flagged", "true"),
        ("server_address", "db.another-lab.com"),
    ]);
    let flagged = with(&[
        ("resolution", "search-escape"),
        ("query_name", "db"),
        ("search_domain", "another-lab.com"),
        ("server_address", "db.another-lab.com"),
    ]);
    let nxdomain = with(&[("rcode", "NXDOMAIN")]);
    let noerror = with(&[("rcode", "NOERROR")]);
    let expectations: [(&str, Labels<'_>, f64); 6] = [
        ("observer_connections_total", &connection, 1.0),
        ("observer_flagged_connections_total", &flagged, 1.0),
        ("observer_dns_responses_total", &nxdomain, 6.0),
        ("observer_dns_responses_total", &noerror, 2.0),
        ("observer_dns_wasted_queries_total", &pod, 3.0),
        ("observer_dns_lookup_duration_seconds_count", &pod, 1.0),
    ];
    let deadline = Instant::now() + RECORD_WAIT;
    let after = loop {
        let after = scrape();
        let short: Vec<String> = expectations
            .iter()
            .filter_map(|(name, labels, rise)| {
                let delta = sum(&after, name, labels) - sum(&before, name, labels);
                (delta < *rise).then(|| format!("{name}{labels:?} rose by {delta}, not {rise}"))
            })
            .collect();
        let kernel_lost_published = matching(&after, "observer_kernel_events_lost_total", &[])
            .next()
            .is_some();
        if short.is_empty() && kernel_lost_published {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "after the seed story: {short:#?}, kernel loss series published: {kernel_lost_published}\n{}",
            agent.metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let lost: Vec<&Sample> = matching(&after, "observer_kernel_events_lost_total", &[])
        .filter(|s| s.value != 0.0)
        .collect();
    assert!(lost.is_empty(), "kernel events lost in this run: {lost:?}");
    for (state, value) in [("cgroup-only", 1.0), ("kube", 0.0), ("degraded", 0.0)] {
        assert_eq!(
            sum(&after, "observer_enrichment_status", &[("state", state)]),
            value,
            "enrichment state {state} with --kube off"
        );
    }
    for sample in &after {
        for (key, value) in &sample.labels {
            assert!(
                value.parse::<IpAddr>().is_err() && !value.contains(story.pod_uid()),
                "labels carry no addresses and no pod UIDs: {sample:?} ({key})"
            );
        }
    }
    stop_cleanly(agent);
}

fn assert_json_opener(record: &Value, story: &Story, conn: &Connection) {
    let mut keys: Vec<&str> = record
        .as_object()
        .expect("a JSON object per line")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    // The fields the book's output reference is generated from.
    let mut documented: Vec<&str> = observer::export::JSON_FIELDS
        .iter()
        .map(|(name, _)| *name)
        .collect();
    documented.sort_unstable();
    assert_eq!(keys, documented, "the documented fields, no more: {record}");

    let time = record["time"].as_str().expect("time is a string");
    let at = parse_rfc3339_utc(time).expect("time is RFC 3339 UTC");
    assert!(
        (unix_ns(conn.before)..=unix_ns(conn.after)).contains(&at),
        "time {time} is within the test's connect"
    );
    assert_eq!(
        record["pod"],
        json!({"namespace": "simple-web-app", "name": null, "uid": story.pod_uid()}),
        "without the API a pod is known by UID, its namespace by its kubelet search list"
    );
    assert_eq!(record["container_id"], json!(story.container_id()));
    assert_eq!(record["cgroup_id"], json!(story.cgroup_id()));
    assert_eq!(record["pid"], json!(conn.report.pid));
    assert!(
        record["comm"]
            .as_str()
            .is_some_and(|c| c.starts_with("python3")),
        "comm: {}",
        record["comm"]
    );
    let ConnectOutcome::Connected { peer, local } = conn.report.outcome else {
        unreachable!("Story::connect checked the connect")
    };
    assert_eq!(
        record["destination"],
        json!({"address": peer.ip().to_string(), "port": peer.port()})
    );
    assert_eq!(
        record["source"],
        json!({"address": local.ip().to_string(), "port": local.port()})
    );
    assert_eq!(record["outcome"], json!("established"));
    assert_eq!(record["workload"], Value::Null);
    assert_eq!(record["container_name"], Value::Null);
    assert_eq!(record["cname_chain"], json!([]));
}

fn json_chain(chain: &[(&str, &str, &str)]) -> Value {
    chain
        .iter()
        .map(|(name, qtype, rcode)| json!({"name": name, "type": qtype, "rcode": rcode}))
        .collect()
}

/// The JSON line of the seed story and of a healthy connection, field by field.
#[test]
fn json_lines_of_the_seed_story_and_a_healthy_connection() {
    let story = Story::new();
    let (svc, _svc_listener) = service_db(&story.tb);
    let agent = Agent::start(AgentSpec::new().args(cluster_args()));

    let escaped = story.connect("db", EXTERNAL_DB.into());
    let record = json_record_of(&agent, &story, &escaped);
    assert_json_opener(&record, &story, &escaped);
    assert_eq!(record["query_name"], json!("db"));
    assert_eq!(record["server_address"], json!("db.another-lab.com"));
    assert_eq!(record["resolution"], json!("search-escape"));
    assert_eq!(record["search_chain"], json_chain(&SEED_CHAIN));
    assert_eq!(record["egress"], json!(true));
    assert_eq!(record["flagged"], json!(true));
    assert_eq!(record["drift"], json!(false));
    assert_eq!(record["search_domain"], json!("another-lab.com"));
    assert_eq!(record["wasted_queries"], json!(3));
    assert_eq!(record["message"], json!(FLAG_MESSAGE));
    assert_eq!(record["dns_server"], json!(story.dns.ipv4().to_string()));
    assert_eq!(
        record["dns_from_outside"],
        json!(false),
        "cluster DNS answered"
    );

    // The cluster's own db appears: the next lookup of `db` stays inside.
    story
        .dns
        .add_record(IN_CLUSTER_DB, svc.ipv4())
        .expect("adding the in-cluster record");
    let healthy = story.connect("db", svc.ipv4().into());
    let record = json_record_of(&agent, &story, &healthy);
    assert_json_opener(&record, &story, &healthy);
    assert_eq!(record["query_name"], json!("db"));
    assert_eq!(record["server_address"], json!(IN_CLUSTER_DB));
    assert_eq!(record["resolution"], json!("in-cluster"));
    assert_eq!(
        record["search_chain"],
        json_chain(&[
            (IN_CLUSTER_DB, "A", "NOERROR"),
            (IN_CLUSTER_DB, "AAAA", "NOERROR")
        ])
    );
    assert_eq!(record["egress"], json!(false));
    assert_eq!(record["flagged"], json!(false));
    assert_eq!(record["drift"], json!(false));
    assert_eq!(
        record["search_domain"],
        json!("simple-web-app.svc.cluster.local")
    );
    assert_eq!(record["wasted_queries"], json!(0));
    assert_eq!(record["message"], Value::Null);
    stop_cleanly(agent);
}

/// `--output text` prints the seed story as one readable line, without colour codes when
/// standard output is not a terminal.
#[test]
fn text_line_of_the_seed_story() {
    let story = Story::new();
    let agent = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .args(["--output", "text"])
            // Set but empty is "not set": only the terminal check may turn colour off.
            .env("NO_COLOR", ""),
    );
    let conn = story.connect("db", EXTERNAL_DB.into());
    let who = format!("simple-web-app/pod/{}", story.pod_uid());
    let line = agent.wait_for_line(RECORD_WAIT, |l| l.contains(&who));
    assert!(!line.contains('\x1b'), "no colour off a terminal: {line:?}");
    let (time, rest) = line.split_once(' ').expect("time first");
    let at = parse_rfc3339_utc(time).expect("an RFC 3339 time");
    // Millisecond precision: the window widens to the millisecond.
    assert!(
        at + 1_000_000 > unix_ns(conn.before) && at <= unix_ns(conn.after),
        "{time} is within the test's connect"
    );
    assert_eq!(
        rest,
        format!(
            "{who} db -> db.another-lab.com (via search domain another-lab.com, 3 NXDOMAIN) -> 203.0.113.10:5432 established EGRESS FLAGGED: \
             use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app"
        )
    );
    let ours = agent.lines().iter().filter(|l| l.contains(&who)).count();
    assert_eq!(ours, 1, "one line per connection");
    stop_cleanly(agent);
}

fn assert_clean_failure(exited: &Exited, names: &[&str], what: &str) {
    assert!(!exited.status.success(), "{what}: exited {}", exited.status);
    assert!(
        // It fails by itself rather than hang (a hang guard sized for guests under TCG).
        exited.took < STOP_WITHIN,
        "{what}: took {:?} to fail",
        exited.took
    );
    for name in names {
        assert!(
            exited.stderr.contains(name),
            "{what}: the message names {name}:\n{}",
            exited.stderr
        );
    }
    let lower = exited.stderr.to_ascii_lowercase();
    assert!(
        !lower.contains("panicked") && !lower.contains("backtrace"),
        "{what}: no panic, no backtrace:\n{}",
        exited.stderr
    );
    assert!(
        exited.stdout.is_empty(),
        "{what}: stdout {:?}",
        exited.stdout
    );
}

/// Wrong flags and a config file with a typo stop the agent at once with a message naming
/// what is wrong, whatever RUST_BACKTRACE says.
#[test]
fn bad_flags_fail_fast_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("observer-e2e-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("observer.toml");
    std::fs::write(&config, "cluster_domian = \"cluster.local\"\n").expect("config file");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let metrics = format!("127.0.0.1:{}", free_local_port());
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--output", "yaml"], &["yaml", "--output"]),
        (
            &["--cluster-cidr", "10.0.0.0/33"],
            &["10.0.0.0/33", "--cluster-cidr"],
        ),
        (&["--sample-ratio", "2"], &["sample-ratio"]),
        (&["--no-such-flag"], &["--no-such-flag"]),
        (&["--config", &config], &["cluster_domian", &config]),
    ];
    for (flags, names) in cases {
        for backtrace in [None, Some("1")] {
            let mut args = vec!["run", "--kube", "off", "--metrics-addr", &metrics];
            args.extend(flags);
            let env: Vec<(&str, &str)> = backtrace
                .map(|b| vec![("RUST_BACKTRACE", b), ("RUST_LIB_BACKTRACE", b)])
                .unwrap_or_default();
            let exited = run_to_exit(
                &observer_tests::agent::observer_bin(),
                &args,
                &env,
                STOP_WITHIN,
            );
            assert_clean_failure(
                &exited,
                names,
                &format!("observer {args:?} (RUST_BACKTRACE={backtrace:?})"),
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `--print-config` prints the effective settings with where each came from, an
/// environment variable told apart from a flag, and exits without loading anything.
#[test]
fn print_config_names_where_each_setting_came_from() {
    let exited = run_to_exit(
        &observer_tests::agent::observer_bin(),
        &["run", "--print-config", "--output", "json"],
        &[("OBSERVER_CLUSTER_NAME", "lab")],
        STOP_WITHIN,
    );
    assert!(exited.status.success(), "{exited:?}");
    for line in [
        "output = \"json\"  # flag",
        "cluster_name = \"lab\"  # environment",
        "cluster_domain = \"cluster.local\"  # default",
    ] {
        assert!(
            exited.stdout.lines().any(|l| l == line),
            "{line:?} in:\n{}",
            exited.stdout
        );
    }
}

/// An unprivileged user gets a message naming the capabilities it lacks.
#[test]
fn without_privileges_the_agent_names_the_missing_capabilities() {
    let bin = observer_tests::agent::observer_bin();
    let bin = bin.to_str().expect("utf-8 path");
    let metrics = format!("127.0.0.1:{}", free_local_port());
    for backtrace in ["0", "1"] {
        let exited = run_to_exit(
            std::path::Path::new("setpriv"),
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                bin,
                "run",
                "--kube",
                "off",
                "--metrics-addr",
                &metrics,
            ],
            &[("RUST_BACKTRACE", backtrace)],
            STOP_WITHIN,
        );
        assert_clean_failure(
            &exited,
            &["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"],
            &format!("observer run as nobody (RUST_BACKTRACE={backtrace})"),
        );
    }
}

/// With the collector gone the agent keeps observing, counts what it could not export, and
/// still stops cleanly.
#[test]
fn without_a_collector_the_agent_observes_and_counts_export_failures() {
    let story = Story::new();
    let closed = free_local_port();
    let agent = Agent::start(
        AgentSpec::new()
            .args(cluster_args())
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{closed}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
    );
    let first = story.connect("db", EXTERNAL_DB.into());
    let record = json_record_of(&agent, &story, &first);
    assert_eq!(record["flagged"], json!(true));

    // 4 attempts (200 ms doubling backoff) after a batch of up to 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples = parse_exposition(&agent.metrics()).expect("a valid exposition");
        let failures = sum(&samples, "observer_span_export_failures_total", &[]);
        let dropped = sum(
            &samples,
            "observer_spans_dropped_total",
            &[("reason", "export_failed")],
        );
        // The seed story alone is 9 spans (the root and 8 queries).
        if failures > 0.0 && dropped >= 9.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "export failures {failures}, spans dropped (export_failed) {dropped}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let again = story.connect("db", EXTERNAL_DB.into());
    let record = json_record_of(&agent, &story, &again);
    assert_eq!(record["flagged"], json!(true), "still observing");
    stop_cleanly(agent);
}

/// SIGTERM: the agent detaches its kernel programs, says so in plain text logs (no colour
/// codes off a terminal), and exits 0 within its bound.
#[test]
fn sigterm_detaches_and_exits_zero() {
    let agent = Agent::start(AgentSpec::new().args(cluster_args()));
    let addr = agent.metrics_addr();
    let started = Instant::now();
    let (status, log) = agent.stop_with_log();
    let took = started.elapsed();
    assert!(status.success(), "exit status on SIGTERM: {status}\n{log}");
    assert!(took < STOP_WITHIN, "took {took:?} to stop\n{log}");
    assert!(log.contains("terminated: detaching"), "{log}");
    assert!(log.contains("kernel programs detached"), "{log}");
    // Standard error is a pipe here, as in a log file: no colour codes.
    assert!(!log.contains('\x1b'), "no colour off a terminal: {log:?}");
    let lower = log.to_ascii_lowercase();
    assert!(
        !lower.contains("panicked") && !lower.contains("error"),
        "{log}"
    );
    assert!(
        http_get(addr, "/healthz").is_err(),
        "nothing serves /healthz after exit"
    );
}

/// SIGINT (Ctrl-C) is handled as SIGTERM is, also when it comes while the agent is busy
/// with events: its listener lives as long as the event loop.
#[test]
fn sigint_detaches_and_exits_zero() {
    let agent = Agent::start(AgentSpec::new().args(cluster_args()));
    let started = Instant::now();
    let (status, log) = agent.signal_with_log(libc::SIGINT);
    let took = started.elapsed();
    assert!(status.success(), "exit status on SIGINT: {status}\n{log}");
    assert!(took < STOP_WITHIN, "took {took:?} to stop\n{log}");
    assert!(log.contains("interrupted: detaching"), "{log}");
    assert!(log.contains("kernel programs detached"), "{log}");
}
