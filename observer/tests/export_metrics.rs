//! `/metrics`, `/healthz` and `/readyz` served over real HTTP, scraped and parsed strictly.
mod export_support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use export_support::*;
use observer::export::{EnrichmentState, Metrics, Readiness, UnmatchedReason, serve_http};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Status, content type and body of a plain HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: observer\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict reader of the OpenMetrics text format: any line it does not understand fails the
/// test, every sample must belong to a declared family, and the exposition ends with `# EOF`.
fn parse_exposition(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    let mut saw_eof = false;
    for line in text.lines() {
        assert!(!saw_eof, "content after # EOF");
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let family = parts.next().expect("family name").to_owned();
            let value = parts.next().unwrap_or("").to_owned();
            match kind {
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&value.as_str()),
                        "type {value}"
                    );
                    types.insert(family, value);
                }
                "HELP" => assert!(!value.is_empty(), "empty help for {family}"),
                "UNIT" => assert_eq!(value, "seconds"),
                other => panic!("unknown descriptor {other}: {line}"),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                (name.to_owned(), parse_labels(body))
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "metric name {name}"
        );
        let family = types
            .keys()
            .find(|f| {
                name == **f
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name == format!("{f}{suffix}"))
            })
            .unwrap_or_else(|| panic!("sample {name} outside any declared family"));
        if types[family] == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter sample {name} lacks _total"
            );
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    assert!(saw_eof, "exposition ends with # EOF");
    (types, samples)
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "label value opens with a quote");
        let mut value = String::new();
        loop {
            match chars.next().expect("unterminated label value") {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        assert!(labels.insert(key, value).is_none(), "duplicate label");
        match chars.next() {
            Some(',') => continue,
            None => break,
            Some(c) => panic!("unexpected {c} after label"),
        }
    }
    labels
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, labels);
    assert_eq!(
        found.len(),
        1,
        "one {name} series with {labels:?}: {found:?}"
    );
    found[0].value
}

#[tokio::test]
async fn metrics_scraped_over_http() {
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::new();
    let (addr, server) = serve_http(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        readiness.clone(),
    )
    .await
    .expect("serve");

    let seed = seed_story();
    // Two connections through the same resolution chain: DNS series count the chain once.
    metrics.observe_connection(&seed);
    metrics.observe_connection(&seed);
    metrics.observe_connection(&healthy_in_cluster());
    metrics.observe_connection(&host_ip_literal());
    let mut drifted = seed_story();
    drifted.record.drift = true;
    let chain = Arc::make_mut(drifted.record.chain.as_mut().unwrap());
    Arc::make_mut(&mut chain.queries)[0].sent_at += 1;
    metrics.observe_connection(&drifted);
    let identity = seed_identity();
    // Tallies of two ticks add up.
    metrics.observe_dns_responses(&identity, "web", "NXDOMAIN", 4);
    metrics.observe_dns_responses(&identity, "web", "NXDOMAIN", 2);
    metrics.observe_dns_responses(&identity, "web", "NOERROR", 1);
    metrics.observe_unanswered_query(&healthy_in_cluster().identity, "api");
    metrics.observe_external_dns_responses(&healthy_in_cluster().identity, 1);
    metrics.observe_dns_parse_error("truncated");
    metrics.set_kernel_events_lost("dns_capture", "ringbuf_full", 5);
    metrics.set_kernel_events_lost("dns_capture", "ringbuf_full", 17);
    metrics.set_kernel_events_lost("dns_capture", "ringbuf_full", 3); // stale read: ignored
    metrics.set_core_evictions("pending_query", 42);
    metrics.set_unmatched_responses(UnmatchedReason::OtherQuestion, 3);
    metrics.set_enrichment_state(EnrichmentState::CgroupOnly);

    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let (types, samples) = parse_exposition(&body);
    for (family, kind) in [
        ("observer_connections", "counter"),
        ("observer_flagged_connections", "counter"),
        ("observer_drift_connections", "counter"),
        ("observer_dns_responses", "counter"),
        ("observer_dns_wasted_queries", "counter"),
        ("observer_dns_unanswered_queries", "counter"),
        ("observer_dns_external_server_responses", "counter"),
        ("observer_dns_lookup_duration_seconds", "histogram"),
        ("observer_kernel_events_lost", "counter"),
        ("observer_spans_exported", "counter"),
        ("observer_spans_dropped", "counter"),
        ("observer_span_export_failures", "counter"),
        ("observer_enrichment_status", "gauge"),
        ("observer_dns_parse_errors", "counter"),
        ("observer_core_evictions", "counter"),
        ("observer_dns_unmatched_responses", "counter"),
    ] {
        assert_eq!(
            types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }

    let seed_labels = [
        ("namespace", "simple-web-app"),
        ("workload", "web"),
        ("resolution", "search-escape"),
        ("egress", "true"),
        ("flagged", "true"),
        ("server_address", "db.another-lab.com"),
    ];
    assert_eq!(
        value(&samples, "observer_connections_total", &seed_labels),
        3.0
    );
    let seed_series = find(&samples, "observer_connections_total", &seed_labels);
    let label_names: BTreeSet<&str> = seed_series[0].labels.keys().map(String::as_str).collect();
    assert_eq!(
        label_names,
        BTreeSet::from([
            "namespace",
            "workload",
            "resolution",
            "egress",
            "flagged",
            "server_address"
        ]),
        "no pod names, no IPs"
    );
    assert_eq!(
        value(
            &samples,
            "observer_connections_total",
            &[
                ("namespace", "data"),
                ("workload", "api"),
                ("resolution", "in-cluster"),
                ("egress", "false")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_connections_total",
            &[
                ("namespace", "_host"),
                ("workload", "curl"),
                ("resolution", "none"),
                ("server_address", "")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_flagged_connections_total",
            &[
                ("namespace", "simple-web-app"),
                ("workload", "web"),
                ("resolution", "search-escape"),
                ("query_name", "db"),
                ("search_domain", "another-lab.com"),
                ("server_address", "db.another-lab.com"),
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_drift_connections_total",
            &[("workload", "web")]
        ),
        1.0
    );
    // Two distinct chains (the original, seen twice, and the drifted one): 3 wasted each.
    assert_eq!(
        value(
            &samples,
            "observer_dns_wasted_queries_total",
            &[("workload", "web")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_dns_lookup_duration_seconds_count",
            &[("workload", "web")]
        ),
        2.0
    );
    // The seed chain took 7.2 ms from the first query to the last answer.
    let sum = value(
        &samples,
        "observer_dns_lookup_duration_seconds_sum",
        &[("workload", "web")],
    );
    assert!((sum - (0.0072 + 0.0072 - 1e-9)).abs() < 1e-9, "{sum}");
    assert_eq!(
        value(
            &samples,
            "observer_dns_lookup_duration_seconds_bucket",
            &[("workload", "web"), ("le", "0.0075")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_dns_lookup_duration_seconds_bucket",
            &[("workload", "web"), ("le", "0.005")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_dns_responses_total",
            &[("workload", "web"), ("rcode", "NXDOMAIN")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_dns_unanswered_queries_total",
            &[("namespace", "data"), ("workload", "api")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_dns_parse_errors_total",
            &[("kind", "truncated")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_kernel_events_lost_total",
            &[("program", "dns_capture"), ("reason", "ringbuf_full")]
        ),
        17.0
    );
    assert_eq!(
        value(
            &samples,
            "observer_core_evictions_total",
            &[("kind", "pending_query")]
        ),
        42.0
    );
    // Every reason exists from the start, so alert rules see zeros rather than nothing.
    for (reason, expected) in [
        ("no_query", 0.0),
        ("other_question", 3.0),
        ("chain_evicted", 0.0),
    ] {
        assert_eq!(
            value(
                &samples,
                "observer_dns_unmatched_responses_total",
                &[("reason", reason)]
            ),
            expected,
            "{reason}"
        );
    }
    for (state, expected) in [("kube", 0.0), ("cgroup-only", 1.0), ("degraded", 0.0)] {
        assert_eq!(
            value(&samples, "observer_enrichment_status", &[("state", state)]),
            expected
        );
    }
    server.abort();
}

#[tokio::test]
async fn server_address_cardinality_is_capped() {
    let metrics = Arc::new(Metrics::new());
    let (addr, server) = serve_http(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        Readiness::new(),
    )
    .await
    .expect("serve");
    for i in 0..1000 {
        let mut e = seed_story();
        let chain = Arc::make_mut(e.record.chain.as_mut().unwrap());
        chain.server_address = format!("host-{i}.another-lab.com").into();
        chain.query_name = format!("host-{i}").into();
        metrics.observe_connection(&e);
    }
    let (_, _, body) = get(addr, "/metrics").await;
    let (_, samples) = parse_exposition(&body);
    for family in [
        "observer_connections_total",
        "observer_flagged_connections_total",
    ] {
        let series = find(&samples, family, &[("workload", "web")]);
        let addresses: BTreeSet<&str> = series
            .iter()
            .map(|s| s.labels["server_address"].as_str())
            .collect();
        assert_eq!(addresses.len(), 101, "{family}: 100 names + _other");
        assert!(addresses.contains("_other"));
        let total: f64 = series.iter().map(|s| s.value).sum();
        assert_eq!(total, 1000.0, "{family}: capping loses no count");
        assert_eq!(
            value(
                &samples,
                family,
                &[("workload", "web"), ("server_address", "_other")]
            ),
            900.0
        );
    }
    server.abort();
}

#[tokio::test]
async fn health_and_readiness() {
    let readiness = Readiness::new();
    let (addr, server) = serve_http(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Metrics::new()),
        readiness.clone(),
    )
    .await
    .expect("serve");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body, "not ready: probes not attached, export not running\n");
    readiness.set_probes_attached(true);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: export not running\n")
    );
    readiness.set_export_running(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/nope").await.0, 404);
    server.abort();
}
