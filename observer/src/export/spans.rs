//! One trace per correlated connection: a CLIENT root span `connect <name>:<port>` from the
//! first DNS query of its chain to the connect outcome, and one child span per DNS query.
//!
//! OTLP requests are built by hand rather than through an SDK provider because every workload
//! needs its own resource (`service.name` = the workload), and a provider has only one.
use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

pub use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use super::{Enriched, WallClock};
use crate::record::{ConnectionRecord, DnsQueryRecord, Outcome, Resolution};

const SCOPE_NAME: &str = "observer";

/// Resource attributes (all strings), hashable to group a batch's spans by resource.
type ResourcePairs = Vec<(&'static str, String)>;

/// Turns enriched connections into OTLP requests.
#[derive(Clone, Debug)]
pub struct SpanBuilder {
    clock: WallClock,
    fallback_service_name: String,
}

impl SpanBuilder {
    pub fn new(clock: WallClock, fallback_service_name: impl Into<String>) -> Self {
        Self {
            clock,
            fallback_service_name: fallback_service_name.into(),
        }
    }

    /// One request for a batch, spans grouped under one resource per distinct opener identity
    /// (in first-seen order).
    pub fn request<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a Enriched>,
    ) -> ExportTraceServiceRequest {
        let mut index: HashMap<ResourcePairs, usize> = HashMap::new();
        let mut groups: Vec<(ResourcePairs, Vec<Span>)> = Vec::new();
        for enriched in batch {
            let resource = self.resource_pairs(enriched);
            let spans = self.spans(enriched);
            match index.get(&resource) {
                Some(&i) => groups[i].1.extend(spans),
                None => {
                    index.insert(resource.clone(), groups.len());
                    groups.push((resource, spans));
                }
            }
        }
        ExportTraceServiceRequest {
            resource_spans: groups
                .into_iter()
                .map(|(pairs, spans)| ResourceSpans {
                    resource: Some(Resource {
                        attributes: pairs.into_iter().map(|(k, v)| kv_str(k, v)).collect(),
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: SCOPE_NAME.to_owned(),
                            version: env!("CARGO_PKG_VERSION").to_owned(),
                            ..Default::default()
                        }),
                        spans,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }

    /// The resource: who opened the connection, at pod granularity (containers and processes
    /// are span attributes, so one pod's spans share a resource).
    pub fn resource_attributes(&self, enriched: &Enriched) -> Vec<KeyValue> {
        self.resource_pairs(enriched)
            .into_iter()
            .map(|(k, v)| kv_str(k, v))
            .collect()
    }

    fn resource_pairs(&self, enriched: &Enriched) -> ResourcePairs {
        let id = &enriched.identity;
        let service = enriched
            .service_name()
            .unwrap_or_else(|| self.fallback_service_name.clone());
        let mut attrs = vec![pair("service.name", service)];
        if let Some(ns) = id.pod.as_ref().and_then(|p| p.namespace.as_ref()) {
            attrs.push(pair("service.namespace", ns));
        }
        if let Some(cluster) = &id.cluster {
            attrs.push(pair("k8s.cluster.name", cluster));
        }
        if let Some(node) = &id.node {
            attrs.push(pair("k8s.node.name", node));
            if id.pod.is_none() {
                attrs.push(pair("host.name", node));
            }
        }
        if let Some(pod) = &id.pod {
            if let Some(ns) = &pod.namespace {
                attrs.push(pair("k8s.namespace.name", ns));
            }
            if let Some(name) = &pod.name {
                attrs.push(pair("k8s.pod.name", name));
            }
            attrs.push(pair("k8s.pod.uid", &pod.uid));
            if let Some(w) = &pod.workload {
                let key = w.kind.resource_attribute();
                if !attrs.iter().any(|a| a.0 == key) {
                    attrs.push(pair(key, &w.name));
                }
            }
        }
        attrs
    }

    /// Root first, then one child per DNS query in the order sent.
    pub fn spans(&self, enriched: &Enriched) -> Vec<Span> {
        let record = &enriched.record;
        let trace_id = random_id::<16>();
        let root_id = random_id::<8>();
        let queries: &[DnsQueryRecord] = record.chain.as_ref().map_or(&[], |c| &c.queries);
        let start_boot = queries
            .iter()
            .map(|q| q.sent_at)
            .chain([record.opened_at])
            .min()
            .unwrap_or(record.opened_at);
        let end_boot = record.outcome_at.max(start_boot);

        let mut spans = Vec::with_capacity(1 + queries.len());
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id: root_id.to_vec(),
            name: root_name(record),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: self.clock.unix_ns(start_boot),
            end_time_unix_nano: self.clock.unix_ns(end_boot),
            attributes: root_attributes(enriched),
            status: Some(root_status(enriched)),
            ..Default::default()
        });
        for (i, query) in queries.iter().enumerate() {
            let end = query
                .answered_at
                .unwrap_or_else(|| unanswered_end(queries, i, end_boot))
                .max(query.sent_at);
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: random_id::<8>().to_vec(),
                parent_span_id: root_id.to_vec(),
                name: format!("dns {} {}", query.qtype.mnemonic(), query.name),
                kind: SpanKind::Client as i32,
                start_time_unix_nano: self.clock.unix_ns(query.sent_at),
                end_time_unix_nano: self.clock.unix_ns(end),
                attributes: query_attributes(query),
                status: Some(query_status(query)),
                ..Default::default()
            });
        }
        spans
    }
}

/// An unanswered query has no end of its own: the resolver gave up on it when it sent the
/// next query of the same type (glibc's retry or next search name), else at the outcome.
fn unanswered_end(queries: &[DnsQueryRecord], i: usize, fallback: u64) -> u64 {
    queries[i + 1..]
        .iter()
        .find(|q| q.qtype == queries[i].qtype)
        .map_or(fallback, |q| q.sent_at)
}

fn root_name(record: &ConnectionRecord) -> String {
    match &record.chain {
        Some(chain) => format!(
            "connect {}:{}",
            chain.server_address,
            record.destination.port()
        ),
        None => format!("connect {}", record.destination),
    }
}

fn root_attributes(enriched: &Enriched) -> Vec<KeyValue> {
    let record = &enriched.record;
    let dest = record.destination;
    let mut a = Vec::with_capacity(24);
    if let Some(chain) = &record.chain {
        a.push(kv_str("server.address", &*chain.server_address));
    }
    a.push(kv_int("server.port", dest.port().into()));
    a.push(kv_str("network.peer.address", dest.ip().to_string()));
    a.push(kv_int("network.peer.port", dest.port().into()));
    a.push(kv_str("network.transport", "tcp"));
    a.push(kv_str(
        "network.type",
        if dest.is_ipv4() { "ipv4" } else { "ipv6" },
    ));
    if let Some(source) = record.source {
        a.push(kv_str("network.local.address", source.ip().to_string()));
        a.push(kv_int("network.local.port", source.port().into()));
    }
    a.push(kv_bool("observer.egress", record.egress));
    a.push(kv_bool("observer.flagged", record.flagged));
    a.push(kv_bool("observer.drift", record.drift));
    a.push(kv_str("observer.resolution", record.resolution.as_str()));
    a.push(kv_str("observer.connect.outcome", record.outcome.as_str()));
    if let Some(chain) = &record.chain {
        a.push(kv_str("observer.query.name", &*chain.query_name));
        if let Some(domain) = &chain.search_domain {
            a.push(kv_str("observer.search_domain", &**domain));
        }
        a.push(kv_int(
            "observer.dns.wasted_queries",
            chain.wasted_queries.into(),
        ));
        if !chain.cname_chain.is_empty() {
            a.push(kv_str_array("observer.dns.cname_chain", &chain.cname_chain));
        }
        a.push(kv_bool("observer.dns.ndots_walk", chain.ndots_walk));
        if let Some(server) = chain.answered_by() {
            a.push(kv_str("observer.dns.server.address", server.to_string()));
        }
        a.push(kv_bool(
            "observer.dns.from_outside",
            record.dns_from_outside,
        ));
    }
    if let Some(fix) = fix(record, pod_namespace(enriched)) {
        a.push(kv_str("observer.fix", fix));
    }
    a.push(kv_int("observer.cgroup.id", record.cgroup_id as i64));
    let id = &enriched.identity;
    if let Some(pod) = &id.pod {
        if let Some(ns) = &pod.namespace {
            a.push(kv_str("k8s.namespace.name", ns));
        }
        if let Some(name) = &pod.name {
            a.push(kv_str("k8s.pod.name", name));
        }
        a.push(kv_str("k8s.pod.uid", &pod.uid));
    }
    if let Some(container) = &id.container {
        if let Some(name) = &container.name {
            a.push(kv_str("k8s.container.name", name));
        }
        if let Some(cid) = &container.id {
            a.push(kv_str("container.id", cid));
        }
    }
    a.push(kv_int("process.pid", record.pid.into()));
    a.push(kv_str("process.executable.name", record.comm.as_str()));
    a
}

fn root_status(enriched: &Enriched) -> Status {
    let record = &enriched.record;
    let failed = match record.outcome {
        Outcome::Established => None,
        Outcome::Refused => Some("connection refused"),
        Outcome::Timeout => Some("connection timed out"),
        Outcome::Reset => Some("connection reset"),
    };
    // Only a flag or a drift makes the connection an error: a chain that merely wasted
    // queries says its fix in `observer.fix`.
    let flag = (record.flagged || record.drift)
        .then(|| flag_message(record, pod_namespace(enriched)))
        .flatten();
    match (flag, failed) {
        (Some(flag), Some(f)) => error(format!("{flag} ({f})")),
        (Some(flag), None) => error(flag),
        (None, Some(f)) => error(f.to_owned()),
        (None, None) => Status::default(),
    }
}

/// The opener's namespace, when known: the fix names the Service to create there.
pub(crate) fn pod_namespace(enriched: &Enriched) -> Option<&str> {
    enriched
        .identity
        .pod
        .as_ref()
        .and_then(|p| p.namespace.as_deref())
}

/// The sentence that says why a connection stands out and what would end it (see
/// [`fix`]), or `None` when it does not stand out. `namespace` is the opener's.
pub fn flag_message(record: &ConnectionRecord, namespace: Option<&str>) -> Option<String> {
    let ip = record.destination.ip();
    let chain = record.chain.as_ref();
    let why = if record.flagged {
        match (record.resolution, chain) {
            (Resolution::SearchEscape, Some(c)) => format!(
                "{} resolved through search domain {} to {ip}, outside the cluster",
                c.query_name.trim_end_matches('.'),
                c.search_domain.as_deref().unwrap_or("?"),
            ),
            (Resolution::CnameEscape, Some(c)) => format!(
                "{} resolved through CNAME {} to {ip}, outside the cluster",
                c.server_address,
                c.cname_chain.join(" -> "),
            ),
            (resolution, Some(c)) => format!(
                "{} resolved ({}) to {ip}, outside the cluster",
                c.server_address,
                resolution.as_str()
            ),
            (_, None) => format!("connection to {ip} flagged, outside the cluster"),
        }
    } else if record.drift {
        let name = chain.map_or_else(|| ip.to_string(), |c| c.server_address.to_string());
        format!(
            "{name} resolved to {ip}, outside the cluster, where this workload resolved it inside the cluster before"
        )
    } else {
        let c = chain.filter(|c| c.wasted_queries > 0)?;
        format!(
            "{} tried {} names of the search list in vain before {} answered",
            c.query_name.trim_end_matches('.'),
            c.wasted_queries,
            c.server_address
        )
    };
    Some(match fix(record, namespace) {
        Some(fix) => format!("{why}: {fix}"),
        None => why,
    })
}

/// What would end a flagged, drifted or amplified chain, in one clause: the fully qualified
/// name with a trailing dot (it walks no search list), the missing Service, or `dnsConfig`
/// `ndots`. The shipped alerts' descriptions say the same words (deploy/monitoring). `None`
/// for a chain that needs no fix.
pub fn fix(record: &ConnectionRecord, namespace: Option<&str>) -> Option<String> {
    let chain = record.chain.as_ref()?;
    let asked = chain.query_name.trim_end_matches('.');
    let service = || missing_service(asked, namespace);
    if record.flagged {
        return Some(match record.resolution {
            Resolution::CnameEscape => format!(
                "use {}. if that server is intended, or change what {} points to",
                chain.cname_chain.last().unwrap_or(&chain.server_address),
                chain.server_address
            ),
            _ => format!(
                "use {}. if that server is intended, or create {}",
                chain.server_address,
                service()
            ),
        });
    }
    if record.drift {
        return Some(format!(
            "create {} again, or use {}. if that server is intended",
            service(),
            chain.server_address
        ));
    }
    if chain.wasted_queries == 0 {
        return None;
    }
    let dots = asked.matches('.').count();
    Some(if chain.ndots_walk && chain.search_domain.is_none() {
        format!(
            "use {}. or set the pod's dnsConfig ndots to {dots}",
            chain.server_address
        )
    } else {
        format!("use {}.", chain.server_address)
    })
}

/// `the Service db in namespace shop`: a name asked as `db.shop` (or `db.shop.svc...`) is
/// the Service `db` of namespace `shop`, a bare `db` one of the opener's namespace.
fn missing_service(asked: &str, namespace: Option<&str>) -> String {
    let labels: Vec<&str> = asked.split('.').collect();
    match labels[..] {
        [service] => match namespace {
            Some(ns) => format!("the Service {service} in namespace {ns}"),
            None => format!("the Service {service} in the pod's namespace"),
        },
        [service, ns] | [service, ns, "svc", ..] => {
            format!("the Service {service} in namespace {ns}")
        }
        _ => format!("a Service for {asked}"),
    }
}

fn query_attributes(query: &DnsQueryRecord) -> Vec<KeyValue> {
    let mut a = vec![
        kv_str("dns.question.name", &*query.name),
        kv_str("observer.dns.question.type", query.qtype.mnemonic()),
        kv_str("network.peer.address", query.server.to_string()),
    ];
    if let Some(rcode) = query.rcode {
        a.push(kv_str("observer.dns.response_code", rcode.mnemonic()));
        a.push(kv_str_array("dns.answers", &query.answers));
    }
    a
}

fn query_status(query: &DnsQueryRecord) -> Status {
    match query.rcode.as_ref().map(|r| r.mnemonic()).as_deref() {
        None => error("no response".to_owned()),
        Some(rcode @ ("SERVFAIL" | "REFUSED" | "FORMERR" | "NOTIMP")) => {
            error(format!("response code {rcode}"))
        }
        Some(_) => Status::default(),
    }
}

fn error(message: String) -> Status {
    Status {
        message,
        code: StatusCode::Error as i32,
    }
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        // An all-zero id is invalid in OTLP.
        if id.iter().any(|&b| b != 0) {
            return id;
        }
    }
}

fn pair(key: &'static str, value: impl Into<String>) -> (&'static str, String) {
    (key, value.into())
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn kv_str(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(value.into()))
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    kv(key, Value::IntValue(value))
}

fn kv_bool(key: &str, value: bool) -> KeyValue {
    kv(key, Value::BoolValue(value))
}

fn kv_str_array(key: &str, values: &[impl std::fmt::Display]) -> KeyValue {
    kv(
        key,
        Value::ArrayValue(ArrayValue {
            values: values
                .iter()
                .map(|v| AnyValue {
                    value: Some(Value::StringValue(v.to_string())),
                })
                .collect(),
        }),
    )
}
