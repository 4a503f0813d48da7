//! What the DNS scenarios share: the real agent with a real OTLP receiver, the motivating
//! story's pod, and readers for the agent's JSON lines and spans.
use std::{net::IpAddr, time::Duration};

use observer_tests::{
    ConnectOutcome, ConnectReport, DnsServer, Pod, PodSpec, Testbed,
    agent::{Agent, AgentSpec},
    otlp::OtlpReceiver,
};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, any_value::Value as OtlpValue},
    trace::v1::Span,
};
use serde_json::Value;

pub const STORY_SEARCH: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agent may take from the connect's outcome to its JSON line.
pub const RECORD_WAIT: Duration = Duration::from_secs(10);
/// Spans leave in batches (at most every 2 s), then cross gRPC.
pub const SPAN_WAIT: Duration = Duration::from_secs(15);

/// The real agent, told the testbed's cluster networks, exporting spans over OTLP/gRPC to a
/// real receiver. The runtime serves the receiver while the test thread blocks.
pub struct Observed {
    pub agent: Agent,
    pub receiver: OtlpReceiver,
    _runtime: tokio::runtime::Runtime,
}

impl Observed {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the OTLP receiver");
        let receiver = runtime
            .block_on(OtlpReceiver::start())
            .expect("starting the OTLP receiver");
        let agent = Agent::start(
            AgentSpec::new()
                .args([
                    "--cluster-cidr",
                    "198.18.0.0/15",
                    "--cluster-cidr",
                    "2001:db8:c::/64",
                ])
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url())
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        );
        Self {
            agent,
            receiver,
            _runtime: runtime,
        }
    }

    /// The one record of the pod's connection to `port` (the pod makes exactly one; its
    /// DNS over TCP, when any, is recorded as connections to port 53).
    pub fn record_of(&self, pod: &Pod, port: u16) -> Value {
        let cgroup_id = pod.cgroup().container.id();
        let to_port = |r: &Value| {
            r["cgroup_id"].as_u64() == Some(cgroup_id)
                && r["destination"]["port"].as_u64() == Some(u64::from(port))
        };
        let record = self.agent.wait_for_record(RECORD_WAIT, to_port);
        let all: Vec<Value> = self
            .agent
            .records_of_cgroup(cgroup_id)
            .into_iter()
            .filter(to_port)
            .collect();
        assert_eq!(all.len(), 1, "one connection, one record: {all:#?}");
        record
    }

    /// The spans of the pod's connection's trace: the root first, then its DNS children.
    pub fn trace_of(&self, pod: &Pod) -> Vec<Span> {
        let cgroup_id = pod.cgroup().container.id();
        let deadline = std::time::Instant::now() + SPAN_WAIT;
        loop {
            let spans: Vec<Span> = self
                .receiver
                .received()
                .into_iter()
                .flat_map(|r| r.request.resource_spans)
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans)
                .collect();
            if let Some(root) = spans.iter().find(|s| {
                int_attr(s, "observer.cgroup.id").is_some_and(|id| id as u64 == cgroup_id)
            }) {
                let mut trace = vec![root.clone()];
                trace.extend(
                    spans
                        .iter()
                        .filter(|s| s.trace_id == root.trace_id && s.span_id != root.span_id)
                        .cloned(),
                );
                return trace;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no span of cgroup {cgroup_id} within {SPAN_WAIT:?}; spans received: {}; agent log:\n{}",
                spans.len(),
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn metrics(&self) -> String {
        self.agent.metrics()
    }
}

pub fn testbed() -> Testbed {
    Testbed::new().expect("building the testbed (these tests must run as root)")
}

/// The pod of the motivating incident: `ndots:5` and the search list ending in another-lab.com.
pub fn story_pod(tb: &Testbed, name: &str) -> Pod {
    tb.add_pod(PodSpec::new(name).search(STORY_SEARCH).ndots(5))
        .expect("pod")
}

/// Connects from the pod and returns where it landed; panics with the DNS log otherwise.
pub fn connect(pod: &Pod, host: &str, port: u16, dns: &DnsServer) -> (ConnectReport, IpAddr) {
    let report = pod
        .connect_tcp(host, port, observer_tests::Family::Any, CONNECT_TIMEOUT)
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

/// `search_chain` as `(name, type, rcode)` triples.
pub fn chain(record: &Value) -> Vec<(String, String, Option<String>)> {
    record["search_chain"]
        .as_array()
        .unwrap_or_else(|| panic!("search_chain is an array: {record}"))
        .iter()
        .map(|q| {
            (
                q["name"].as_str().expect("query name").to_owned(),
                q["type"].as_str().expect("query type").to_owned(),
                q["rcode"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The distinct names of the chain, in order of first appearance.
pub fn chain_names(record: &Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _, _) in chain(record) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

pub fn destination_ip(record: &Value) -> IpAddr {
    record["destination"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("destination.address is an IP: {record}"))
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a OtlpValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

pub fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(span, key)? {
        OtlpValue::StringValue(s) => Some(s),
        _ => None,
    }
}

pub fn int_attr(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        OtlpValue::IntValue(i) => Some(*i),
        _ => None,
    }
}

pub fn bool_attr(span: &Span, key: &str) -> Option<bool> {
    match attr(span, key)? {
        OtlpValue::BoolValue(b) => Some(*b),
        _ => None,
    }
}

pub fn strings_attr(span: &Span, key: &str) -> Option<Vec<String>> {
    match attr(span, key)? {
        OtlpValue::ArrayValue(a) => Some(
            a.values
                .iter()
                .filter_map(|v| match v.value.as_ref()? {
                    OtlpValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}
