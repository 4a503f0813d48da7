//! What the DNS scenarios share: the real agent with a real OTLP receiver, and readers for
//! the agent's JSON lines.
use std::{net::IpAddr, time::Duration};

use observer_tests::{
    Pod,
    agent::{Agent, AgentSpec, metric_sum},
    kube_api::KubeApi,
    otlp::OtlpReceiver,
};
pub use observer_tests::{agent::assert_fields, story::*, traces::*};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value;

/// How long the agent may take from the connect's outcome to its JSON line: a hang guard,
/// the wait ends with the line (guests under TCG run ~10x slower).
pub const RECORD_WAIT: Duration = Duration::from_secs(120);
/// Spans leave in batches (at most every 2 s), then cross gRPC.
pub const SPAN_WAIT: Duration = Duration::from_secs(120);

/// The real agent, told the testbed's cluster networks, exporting spans over OTLP/gRPC to a
/// real receiver. The runtime serves the receiver while the test thread blocks.
pub struct Observed {
    pub agent: Agent,
    pub receiver: OtlpReceiver,
    _runtime: tokio::runtime::Runtime,
}

impl Observed {
    pub fn start() -> Self {
        Self::start_with(|spec| spec)
    }

    /// As [`Observed::start`], the agent watching the (stand-in) Kubernetes API `api` as the
    /// agent of node-a; returns once the agent has synced with it.
    pub fn with_kube_api(api: &KubeApi) -> Self {
        let observed = Self::start_with(|spec| {
            spec.args(["--kube", "auto"])
                .env("KUBECONFIG", api.kubeconfig().display().to_string())
                .env("NODE_NAME", "node-a")
        });
        observed.agent.metrics_when(RECORD_WAIT, |m| {
            metric_sum(m, "observer_enrichment_status", &[("state", "kube")]) == 1.0
        });
        observed
    }

    fn start_with(spec: impl FnOnce(AgentSpec) -> AgentSpec) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the OTLP receiver");
        let receiver = runtime
            .block_on(OtlpReceiver::start())
            .expect("starting the OTLP receiver");
        let agent = Agent::start(spec(
            AgentSpec::new()
                .args(cluster_args())
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url())
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ));
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
        let trace = wait_for_trace(
            &self.receiver,
            pod.cgroup().container.id(),
            SPAN_WAIT,
            |_| true,
        );
        std::iter::once(trace.root).chain(trace.others).collect()
    }

    pub fn metrics(&self) -> String {
        self.agent.metrics()
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
