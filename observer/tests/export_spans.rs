//! Spans through the real exporter to a real OTLP receiver, over gRPC and over HTTP.
mod export_support;
#[path = "../../tests/src/otlp.rs"]
mod otlp;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use export_support::*;
use observer::export::{
    Enriched, ExportConfig, Metrics, OtlpProtocol, SpanExporter, SpanSelection, SpanSink, Submit,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use otlp::{OtlpReceiver, Via};

const WAIT: Duration = Duration::from_secs(5);

fn fast_config() -> ExportConfig {
    ExportConfig {
        selection: SpanSelection::All,
        max_batch: 16,
        batch_interval: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(40),
        ..ExportConfig::default()
    }
}

fn start(config: &ExportConfig, metrics: &Arc<Metrics>) -> SpanExporter {
    let sink = SpanSink::from_config(config)
        .expect("valid sink")
        .expect("an endpoint is configured");
    SpanExporter::start(config, sink, CLOCK, metrics.clone()).expect("exporter starts")
}

/// Spans of every request, with the resource attributes they were sent under.
fn all_spans(requests: &[ExportTraceServiceRequest]) -> Vec<(BTreeMap<String, V>, Span)> {
    requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| {
            let resource = attrs(&rs.resource.as_ref().expect("resource").attributes);
            rs.scope_spans.iter().flat_map(move |ss| {
                assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("observer"));
                let resource = resource.clone();
                ss.spans
                    .iter()
                    .map(move |sp| (resource.clone(), sp.clone()))
            })
        })
        .collect()
}

/// The trace whose root is named `root_name`: (resource, root, children in order sent).
fn trace(
    spans: &[(BTreeMap<String, V>, Span)],
    root_name: &str,
) -> (BTreeMap<String, V>, Span, Vec<Span>) {
    let roots: Vec<_> = spans.iter().filter(|(_, s)| s.name == root_name).collect();
    assert_eq!(roots.len(), 1, "exactly one root named {root_name}");
    let (resource, root) = roots[0].clone();
    assert!(root.parent_span_id.is_empty(), "a root has no parent");
    assert_eq!(root.trace_id.len(), 16);
    assert_eq!(root.span_id.len(), 8);
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.trace_id == root.trace_id)
        .collect();
    let children: Vec<Span> = in_trace
        .iter()
        .filter(|(_, s)| s.span_id != root.span_id)
        .map(|(r, s)| {
            assert_eq!(r, &resource, "children share the root's resource");
            assert_eq!(
                s.parent_span_id, root.span_id,
                "{} is a child of the root",
                s.name
            );
            assert_eq!(s.span_id.len(), 8);
            s.clone()
        })
        .collect();
    assert_eq!(in_trace.len(), children.len() + 1, "one root per trace");
    (resource, root, children)
}

/// What would end the seed story's escape.
const SEED_FIX: &str = "use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app";

fn assert_seed_trace(spans: &[(BTreeMap<String, V>, Span)]) {
    let seed = seed_story();
    let (resource, root, children) = trace(spans, "connect db.another-lab.com:5432");

    let expected_resource: BTreeMap<String, V> = [
        ("service.name", s("web")),
        ("service.namespace", s("simple-web-app")),
        ("k8s.cluster.name", s("lab")),
        ("k8s.node.name", s("node-1")),
        ("k8s.namespace.name", s("simple-web-app")),
        ("k8s.pod.name", s("web-7d9f8-abc12")),
        ("k8s.pod.uid", s(SEED_POD_UID)),
        ("k8s.deployment.name", s("web")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(resource, expected_resource);

    assert_eq!(root.kind, SpanKind::Client as i32);
    assert_eq!(
        root.start_time_unix_nano, T0_UNIX_NS,
        "root starts at the first query"
    );
    assert_eq!(
        root.end_time_unix_nano,
        unix(seed.record.outcome_at),
        "root ends at the connect outcome"
    );
    let status = root.status.as_ref().expect("root status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(
        status.message,
        format!(
            "db resolved through search domain another-lab.com to 203.0.113.10, outside the cluster: {SEED_FIX}"
        )
    );
    let expected_root: BTreeMap<String, V> = [
        ("server.address", s("db.another-lab.com")),
        ("server.port", V::I(5432)),
        ("network.peer.address", s("203.0.113.10")),
        ("network.peer.port", V::I(5432)),
        ("network.transport", s("tcp")),
        ("network.type", s("ipv4")),
        ("network.local.address", s("198.18.0.5")),
        ("network.local.port", V::I(40000)),
        ("observer.egress", V::B(true)),
        ("observer.flagged", V::B(true)),
        ("observer.drift", V::B(false)),
        ("observer.resolution", s("search-escape")),
        ("observer.connect.outcome", s("established")),
        ("observer.query.name", s("db")),
        ("observer.search_domain", s("another-lab.com")),
        ("observer.dns.wasted_queries", V::I(3)),
        ("observer.dns.ndots_walk", V::B(false)),
        ("observer.dns.server.address", s(CLUSTER_DNS)),
        ("observer.dns.from_outside", V::B(false)),
        ("observer.fix", s(SEED_FIX)),
        ("observer.cgroup.id", V::I(12345)),
        ("k8s.namespace.name", s("simple-web-app")),
        ("k8s.pod.name", s("web-7d9f8-abc12")),
        ("k8s.pod.uid", s(SEED_POD_UID)),
        ("k8s.container.name", s("web")),
        ("container.id", s("3f2e1d0c9b8a")),
        ("process.pid", V::I(4242)),
        ("process.executable.name", s("web")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(attrs(&root.attributes), expected_root);

    let queries = &seed.record.chain.as_ref().unwrap().queries;
    assert_eq!(children.len(), 8, "one child per DNS query");
    let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dns A db.simple-web-app.svc.cluster.local",
            "dns AAAA db.simple-web-app.svc.cluster.local",
            "dns A db.svc.cluster.local",
            "dns AAAA db.svc.cluster.local",
            "dns A db.cluster.local",
            "dns AAAA db.cluster.local",
            "dns A db.another-lab.com",
            "dns AAAA db.another-lab.com",
        ]
    );
    for (child, query) in children.iter().zip(queries.iter()) {
        assert_eq!(child.kind, SpanKind::Client as i32);
        assert_eq!(
            child.start_time_unix_nano,
            unix(query.sent_at),
            "{}",
            child.name
        );
        assert_eq!(
            child.end_time_unix_nano,
            unix(query.answered_at.unwrap()),
            "{}",
            child.name
        );
        assert_eq!(
            child.status.as_ref().map(|s| s.code).unwrap_or(0),
            StatusCode::Unset as i32,
            "answered queries are not errors: {}",
            child.name
        );
        let answers = if child.name == "dns A db.another-lab.com" {
            vec!["203.0.113.10".to_owned()]
        } else {
            vec![]
        };
        let rcode = if child.name.ends_with("another-lab.com") {
            "NOERROR"
        } else {
            "NXDOMAIN"
        };
        let expected: BTreeMap<String, V> = [
            ("dns.question.name", s(&query.name)),
            ("observer.dns.question.type", s(&query.qtype.mnemonic())),
            ("network.peer.address", s(CLUSTER_DNS)),
            ("observer.dns.response_code", s(rcode)),
            ("dns.answers", V::A(answers)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(attrs(&child.attributes), expected, "{}", child.name);
    }
}

fn assert_healthy_trace(spans: &[(BTreeMap<String, V>, Span)]) {
    let healthy = healthy_in_cluster();
    let (resource, root, children) = trace(spans, "connect postgres.data.svc.cluster.local:5432");
    assert_eq!(resource["service.name"], s("api"));
    assert_eq!(resource["k8s.statefulset.name"], s("api"));
    assert!(!resource.contains_key("k8s.deployment.name"));
    assert_eq!(
        root.status.as_ref().map(|s| s.code).unwrap_or(0),
        StatusCode::Unset as i32,
        "a healthy connection is not an error"
    );
    let root_attrs = attrs(&root.attributes);
    assert_eq!(root_attrs["observer.flagged"], V::B(false));
    assert_eq!(root_attrs["observer.egress"], V::B(false));
    assert_eq!(root_attrs["observer.resolution"], s("in-cluster"));
    assert_eq!(root_attrs["observer.dns.wasted_queries"], V::I(0));
    assert!(!root_attrs.contains_key("network.local.address"));

    assert_eq!(children.len(), 2);
    assert_eq!(children[0].name, "dns A postgres.data.svc.cluster.local");
    assert_eq!(children[1].name, "dns AAAA postgres.data.svc.cluster.local");
    let unanswered = &children[1];
    let status = unanswered.status.as_ref().expect("status");
    assert_eq!(status.code, StatusCode::Error as i32, "unanswered => error");
    assert_eq!(status.message, "no response");
    assert_eq!(
        unanswered.end_time_unix_nano,
        unix(healthy.record.outcome_at),
        "an unanswered query lasts until the outcome"
    );
    let a = attrs(&unanswered.attributes);
    assert!(!a.contains_key("observer.dns.response_code"));
    assert!(!a.contains_key("dns.answers"));
}

async fn export_both_and_check(protocol: OtlpProtocol) {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    // Configured the way an operator does it: the standard environment variables.
    let env: Vec<(&str, String)> = match protocol {
        OtlpProtocol::Grpc => vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ],
        OtlpProtocol::HttpProtobuf => vec![(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            receiver.http_traces_url(),
        )],
    };
    let from_env = ExportConfig::from_vars(|name| {
        if name == "OTEL_EXPORTER_OTLP_HEADERS" {
            return Some("x-tenant=lab".into());
        }
        env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    })
    .expect("valid environment");
    assert_eq!(from_env.protocol, protocol);
    let config = ExportConfig {
        endpoint: from_env.endpoint,
        protocol: from_env.protocol,
        headers: from_env.headers,
        ..fast_config()
    };
    let metrics = Arc::new(Metrics::new());
    let exporter = start(&config, &metrics);

    assert_eq!(exporter.submit(&seed_story()), Submit::Queued);
    assert_eq!(exporter.submit(&healthy_in_cluster()), Submit::Queued);
    let received = receiver
        .wait_for_spans(9 + 3, WAIT)
        .await
        .expect("both traces arrive");

    let via = match protocol {
        OtlpProtocol::Grpc => Via::Grpc,
        OtlpProtocol::HttpProtobuf => Via::Http,
    };
    for r in &received {
        assert_eq!(r.via, via);
        assert!(
            r.headers.iter().any(|(k, v)| k == "x-tenant" && v == "lab"),
            "configured headers are sent: {:?}",
            r.headers
        );
        let content_type = r.content_type.as_deref().unwrap_or("");
        match protocol {
            OtlpProtocol::Grpc => assert!(content_type.starts_with("application/grpc")),
            OtlpProtocol::HttpProtobuf => assert_eq!(content_type, "application/x-protobuf"),
        }
    }
    let requests: Vec<_> = received.into_iter().map(|r| r.request).collect();
    let spans = all_spans(&requests);
    assert_eq!(spans.len(), 12);
    assert_seed_trace(&spans);
    assert_healthy_trace(&spans);

    // Each resource appears once per request: spans are grouped by workload.
    for request in &requests {
        let mut names: Vec<_> = request
            .resource_spans
            .iter()
            .map(|rs| attrs(&rs.resource.as_ref().unwrap().attributes)["service.name"].clone())
            .collect();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before);
    }
    exporter.shutdown(WAIT).await;
    let text = metrics.encode();
    assert!(
        text.contains("observer_spans_exported_total 12\n"),
        "{text}"
    );
}

#[tokio::test]
async fn seed_story_and_healthy_connection_over_grpc() {
    export_both_and_check(OtlpProtocol::Grpc).await;
}

#[tokio::test]
async fn seed_story_and_healthy_connection_over_http() {
    export_both_and_check(OtlpProtocol::HttpProtobuf).await;
}

fn counter(metrics: &Metrics, series: &str) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn wait_counter(metrics: &Metrics, series: &str, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = counter(metrics, series);
        if value >= at_least || tokio::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The collector is down: submits never wait, the queue holds at most its capacity, every
/// dropped span is counted; when the collector comes back, export resumes.
#[tokio::test(flavor = "current_thread")]
async fn collector_down_then_back() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_failing(true);
    let config = ExportConfig {
        queue_capacity: 8,
        max_batch: 4,
        max_attempts: 3,
        ..fast_config()
    }
    .with_base_endpoint(&receiver.grpc_url(), OtlpProtocol::Grpc);
    let metrics = Arc::new(Metrics::new());
    let exporter = start(&config, &metrics);

    // No await in this loop: the export task cannot run, so the queue alone absorbs them.
    let seed = seed_story();
    let outcomes: Vec<Submit> = (0..100).map(|_| exporter.submit(&seed)).collect();
    let queued = outcomes.iter().filter(|o| **o == Submit::Queued).count();
    let dropped = outcomes.iter().filter(|o| **o == Submit::Dropped).count();
    assert_eq!((queued, dropped), (8, 92), "bounded queue, newest dropped");
    assert_eq!(
        counter(
            &metrics,
            "observer_spans_dropped_total{reason=\"queue_full\"}"
        ),
        92 * 9
    );

    // The 8 queued traces go out in 2 batches of 4, each tried 3 times, then dropped.
    let failed = wait_counter(
        &metrics,
        "observer_spans_dropped_total{reason=\"export_failed\"}",
        8 * 9,
    )
    .await;
    assert_eq!(failed, 8 * 9);
    assert_eq!(receiver.refused(), 6, "2 batches x 3 attempts");
    assert_eq!(
        counter(
            &metrics,
            "observer_span_export_failures_total{reason=\"unavailable\"}"
        ),
        6
    );
    assert_eq!(receiver.span_count(), 0);

    receiver.set_failing(false);
    let healthy = healthy_in_cluster();
    for _ in 0..3 {
        assert_eq!(exporter.submit(&healthy), Submit::Queued);
    }
    let received = receiver
        .wait_for_spans(3 * 3, WAIT)
        .await
        .expect("export resumes once the collector is back");
    assert_eq!(received.iter().map(|r| r.span_count()).sum::<usize>(), 9);
    assert_eq!(
        wait_counter(&metrics, "observer_spans_exported_total", 9).await,
        9
    );
}

/// A collector that does not answer in time counts as a transient failure.
#[tokio::test]
async fn slow_collector_hits_the_timeout() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_delay(Duration::from_secs(3));
    let config = ExportConfig {
        timeout: Duration::from_millis(150),
        max_attempts: 2,
        ..fast_config()
    }
    .with_base_endpoint(&receiver.http_base_url(), OtlpProtocol::HttpProtobuf);
    let metrics = Arc::new(Metrics::new());
    let exporter = start(&config, &metrics);
    assert_eq!(exporter.submit(&healthy_in_cluster()), Submit::Queued);
    let dropped = wait_counter(
        &metrics,
        "observer_spans_dropped_total{reason=\"export_failed\"}",
        3,
    )
    .await;
    assert_eq!(dropped, 3);
    assert_eq!(
        counter(
            &metrics,
            "observer_span_export_failures_total{reason=\"timeout\"}"
        ),
        2
    );
}

#[tokio::test]
async fn export_policy_and_sampling() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let metrics = Arc::new(Metrics::new());
    let base = fast_config().with_base_endpoint(&receiver.grpc_url(), OtlpProtocol::Grpc);
    let egress_unflagged = host_ip_literal();
    let cases = [
        (SpanSelection::Flagged, 1.0, [true, false, false]),
        (SpanSelection::Egress, 1.0, [true, false, true]),
        (SpanSelection::All, 1.0, [true, true, true]),
        // Sampling never drops a flagged connection.
        (SpanSelection::All, 0.0, [true, false, false]),
    ];
    for (selection, ratio, expected) in cases {
        let config = ExportConfig {
            selection,
            sample_ratio: ratio,
            ..base.clone()
        };
        let exporter = start(&config, &metrics);
        let got: Vec<bool> = [seed_story(), healthy_in_cluster(), egress_unflagged.clone()]
            .iter()
            .map(|e: &Enriched| exporter.submit(e) == Submit::Queued)
            .collect();
        assert_eq!(got, expected, "{selection:?} ratio {ratio}");
    }
}

/// No collector configured: spans go to a file as OTLP/JSON, one request per line.
#[tokio::test]
async fn json_lines_sink_without_collector() {
    let path = std::env::temp_dir().join(format!("observer-spans-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let config = ExportConfig {
        json_path: Some(path.clone()),
        ..fast_config()
    };
    let metrics = Arc::new(Metrics::new());
    let exporter = start(&config, &metrics);
    assert_eq!(exporter.submit(&seed_story()), Submit::Queued);
    exporter.shutdown(WAIT).await;
    assert_eq!(exported_spans(&metrics), 9);

    let text = std::fs::read_to_string(&path).expect("span file written");
    std::fs::remove_file(&path).ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1);
    let raw: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    let trace_id = raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
        .as_str()
        .expect("OTLP/JSON trace ids are hex strings");
    assert_eq!(trace_id.len(), 32);
    assert!(trace_id.chars().all(|c| c.is_ascii_hexdigit()));
    let request: ExportTraceServiceRequest = serde_json::from_str(lines[0]).expect("OTLP/JSON");
    assert_seed_trace(&all_spans(&[request]));
}

fn exported_spans(metrics: &Metrics) -> u64 {
    counter(metrics, "observer_spans_exported_total")
}

/// A pod whose resolver is outside the cluster: the root span names the server that
/// answered and says it is outside; each DNS child names the server it asked.
#[test]
fn dns_served_from_outside_in_the_span() {
    let mut outside = seed_story();
    let chain = Arc::make_mut(outside.record.chain.as_mut().unwrap());
    for q in Arc::make_mut(&mut chain.queries) {
        q.server = "203.0.113.53".parse().unwrap();
    }
    outside.record.dns_from_outside = true;
    let spans = observer::export::SpanBuilder::new(CLOCK, "observer").spans(&outside);
    let root = attrs(&spans[0].attributes);
    assert_eq!(root["observer.dns.server.address"], s("203.0.113.53"));
    assert_eq!(root["observer.dns.from_outside"], V::B(true));
    for child in &spans[1..] {
        assert_eq!(
            attrs(&child.attributes)["network.peer.address"],
            s("203.0.113.53"),
            "{}",
            child.name
        );
    }
}

/// A chain that only wasted queries on the search list is no error: its fix is an
/// attribute; the healthy chain has none.
#[test]
fn amplified_chain_says_its_fix_without_an_error() {
    let mut amplified = healthy_in_cluster();
    let chain = Arc::make_mut(amplified.record.chain.as_mut().unwrap());
    chain.query_name = "api.partner.example".into();
    chain.server_address = "api.partner.example".into();
    chain.search_domain = None;
    chain.wasted_queries = 3;
    chain.ndots_walk = true;
    let builder = observer::export::SpanBuilder::new(CLOCK, "observer");
    let spans = builder.spans(&amplified);
    assert_eq!(
        attrs(&spans[0].attributes)["observer.fix"],
        s("use api.partner.example. or set the pod's dnsConfig ndots to 2")
    );
    assert_eq!(
        spans[0].status.as_ref().map(|s| s.code).unwrap_or(0),
        StatusCode::Unset as i32
    );
    let healthy = builder.spans(&healthy_in_cluster());
    assert!(!attrs(&healthy[0].attributes).contains_key("observer.fix"));
}
