//! Connection records for the export tests: the seed story and a healthy in-cluster call.
#![allow(dead_code)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use observer::{
    export::{
        ContainerIdentity, Enriched, ExportIdentity, PodIdentity, WallClock, Workload, WorkloadKind,
    },
    record::{
        Answer, ConnectionRecord, DnsQueryRecord, Outcome, QType, Rcode, Resolution,
        ResolutionChain,
    },
    scope::ScopeKey,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};

/// Boot time of the first query of every fixture chain.
pub const T0: u64 = 1_000_000_000_000;
/// T0 on the wall clock: 2025-06-15T15:06:40Z.
pub const T0_UNIX_NS: u64 = 1_750_000_000_000_000_000;
pub const CLOCK: WallClock = WallClock::new(T0_UNIX_NS as i128 - T0 as i128);

/// The cluster DNS server every fixture query was sent to.
pub const CLUSTER_DNS: &str = "198.18.0.10";
pub const SEED_POD_UID: &str = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
pub const SEARCH_LIST: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];

pub fn seed_identity() -> ExportIdentity {
    ExportIdentity {
        cluster: Some("lab".into()),
        node: Some("node-1".into()),
        pod: Some(PodIdentity {
            uid: SEED_POD_UID.into(),
            namespace: Some("simple-web-app".into()),
            name: Some("web-7d9f8-abc12".into()),
            workload: Some(Workload {
                kind: WorkloadKind::Deployment,
                name: "web".into(),
            }),
        }),
        container: Some(ContainerIdentity {
            id: Some("3f2e1d0c9b8a".into()),
            name: Some("web".into()),
        }),
    }
}

/// `db` walked the search list: three names answered NXDOMAIN (A and AAAA each), then
/// db.another-lab.com answered 203.0.113.10 (A) and no AAAA record; the app connected.
pub fn seed_story() -> Enriched {
    let mut queries = Vec::new();
    for (i, domain) in SEARCH_LIST.iter().enumerate() {
        let name = format!("db.{domain}");
        let sent = T0 + i as u64 * 2_000_000;
        let last = i == SEARCH_LIST.len() - 1;
        queries.push(DnsQueryRecord {
            name: name.as_str().into(),
            qtype: QType::A,
            server: CLUSTER_DNS.parse().unwrap(),
            rcode: Some(if last {
                Rcode::NOERROR
            } else {
                Rcode::NXDOMAIN
            }),
            answers: if last {
                vec![Answer::Address("203.0.113.10".parse().unwrap())].into()
            } else {
                Box::default()
            },
            sent_at: sent,
            answered_at: Some(sent + 1_000_000),
            truncated: false,
        });
        queries.push(DnsQueryRecord {
            name: name.into(),
            qtype: QType::AAAA,
            server: CLUSTER_DNS.parse().unwrap(),
            rcode: Some(if last {
                Rcode::NOERROR
            } else {
                Rcode::NXDOMAIN
            }),
            answers: Box::default(),
            sent_at: sent + 100_000,
            answered_at: Some(sent + 1_200_000),
            truncated: false,
        });
    }
    let opened_at = T0 + 7_400_000;
    Enriched {
        record: ConnectionRecord {
            scope: ScopeKey::Pod(Arc::from(SEED_POD_UID)),
            cgroup_id: 12345,
            pid: 4242,
            comm: "web".into(),
            destination: "203.0.113.10:5432".parse().unwrap(),
            source: Some("198.18.0.5:40000".parse().unwrap()),
            opened_at,
            outcome: Outcome::Established,
            outcome_at: opened_at + 1_500_000,
            resolution: Resolution::SearchEscape,
            chain: Some(Arc::new(ResolutionChain {
                query_name: "db".into(),
                server_address: "db.another-lab.com".into(),
                search_domain: Some("another-lab.com".into()),
                cname_chain: vec![],
                wasted_queries: 3,
                ndots_walk: false,
                queries: queries.into(),
            })),
            egress: true,
            flagged: true,
            drift: false,
            dns_from_outside: false,
        },
        identity: seed_identity(),
    }
}

pub const API_POD_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

/// `postgres` answered on the first search domain (A), its AAAA query never got an answer.
pub fn healthy_in_cluster() -> Enriched {
    let t = T0 + 50_000_000;
    Enriched {
        record: ConnectionRecord {
            scope: ScopeKey::Pod(Arc::from(API_POD_UID)),
            cgroup_id: 777,
            pid: 99,
            comm: "api".into(),
            destination: "198.18.1.20:5432".parse().unwrap(),
            source: None,
            opened_at: t + 3_000_000,
            outcome: Outcome::Established,
            outcome_at: t + 4_000_000,
            resolution: Resolution::InCluster,
            chain: Some(Arc::new(ResolutionChain {
                query_name: "postgres".into(),
                server_address: "postgres.data.svc.cluster.local".into(),
                search_domain: Some("data.svc.cluster.local".into()),
                cname_chain: vec![],
                wasted_queries: 0,
                ndots_walk: false,
                queries: Arc::new(vec![
                    DnsQueryRecord {
                        name: "postgres.data.svc.cluster.local".into(),
                        qtype: QType::A,
                        server: CLUSTER_DNS.parse().unwrap(),
                        rcode: Some(Rcode::NOERROR),
                        answers: vec![Answer::Address("198.18.1.20".parse().unwrap())].into(),
                        sent_at: t,
                        answered_at: Some(t + 500_000),
                        truncated: false,
                    },
                    DnsQueryRecord {
                        name: "postgres.data.svc.cluster.local".into(),
                        qtype: QType::AAAA,
                        server: CLUSTER_DNS.parse().unwrap(),
                        rcode: None,
                        answers: Box::default(),
                        sent_at: t + 50_000,
                        answered_at: None,
                        truncated: false,
                    },
                ]),
            })),
            egress: false,
            flagged: false,
            drift: false,
            dns_from_outside: false,
        },
        identity: ExportIdentity {
            cluster: Some("lab".into()),
            node: Some("node-1".into()),
            pod: Some(PodIdentity {
                uid: API_POD_UID.into(),
                namespace: Some("data".into()),
                name: Some("api-0".into()),
                workload: Some(Workload {
                    kind: WorkloadKind::StatefulSet,
                    name: "api".into(),
                }),
            }),
            container: Some(ContainerIdentity {
                id: Some("aa55".into()),
                name: Some("api".into()),
            }),
        },
    }
}

/// A node process connecting to an IP literal outside the cluster, refused.
pub fn host_ip_literal() -> Enriched {
    Enriched {
        record: ConnectionRecord {
            scope: ScopeKey::Host(31),
            cgroup_id: 31,
            pid: 1200,
            comm: "curl".into(),
            destination: "203.0.113.77:443".parse().unwrap(),
            source: None,
            opened_at: T0 + 90_000_000,
            outcome: Outcome::Refused,
            outcome_at: T0 + 90_300_000,
            resolution: Resolution::None,
            chain: None,
            egress: true,
            flagged: false,
            drift: false,
            dns_from_outside: false,
        },
        identity: ExportIdentity {
            cluster: None,
            node: Some("node-1".into()),
            pod: None,
            container: None,
        },
    }
}

/// Attribute values in a comparable shape.
#[derive(Clone, Debug, PartialEq)]
pub enum V {
    S(String),
    I(i64),
    B(bool),
    A(Vec<String>),
}

pub fn s(v: &str) -> V {
    V::S(v.to_owned())
}

pub fn attrs(list: &[KeyValue]) -> BTreeMap<String, V> {
    let mut map = BTreeMap::new();
    for kv in list {
        let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => V::S(s.clone()),
            Some(Value::IntValue(i)) => V::I(*i),
            Some(Value::BoolValue(b)) => V::B(*b),
            Some(Value::ArrayValue(a)) => V::A(
                a.values
                    .iter()
                    .map(|AnyValue { value }| match value {
                        Some(Value::StringValue(s)) => s.clone(),
                        other => panic!("non-string array element {other:?}"),
                    })
                    .collect(),
            ),
            other => panic!("unexpected attribute value {other:?} for {}", kv.key),
        };
        assert!(
            map.insert(kv.key.clone(), value).is_none(),
            "duplicate attribute {}",
            kv.key
        );
    }
    map
}

pub fn unix(boot: u64) -> u64 {
    boot - T0 + T0_UNIX_NS
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
