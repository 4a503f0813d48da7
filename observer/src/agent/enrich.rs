//! From what identity knows about a cgroup to what the exporters print and attach.
use std::sync::Arc;

use crate::{
    export::{ContainerIdentity, ExportIdentity, PodIdentity, Workload, WorkloadKind},
    identity::{WorkloadIdentity, model},
    record::{ConnectionRecord, Resolution},
    scope::ScopeKey,
};

/// A CNAME escape is declared egress when its in-cluster name is a Service of type
/// ExternalName whose declared target is the CNAME's (first) target: the cluster's owners
/// said this name leaves the cluster, so it is not flagged. `external_name(namespace, name)`
/// asks the Kubernetes API's Services; without the API it answers `None` and the escape
/// stays `cname-escape`.
pub fn declare_egress(
    record: &mut ConnectionRecord,
    cluster_domain: &str,
    external_name: impl Fn(&str, &str) -> Option<Arc<str>>,
) {
    if record.resolution != Resolution::CnameEscape {
        return;
    }
    let Some(chain) = &record.chain else { return };
    let Some(target) = chain.cname_chain.first() else {
        return;
    };
    let Some((name, namespace)) = service_of(&chain.server_address, cluster_domain) else {
        return;
    };
    if external_name(namespace, name).is_some_and(|declared| declared == *target) {
        record.resolution = Resolution::DeclaredEgress;
        record.flagged = false;
    }
}

/// `ledger.shop.svc.cluster.local` -> (`ledger`, `shop`): the Service a cluster DNS name is.
fn service_of<'a>(server: &'a str, cluster_domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = server.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
    let (name, namespace) = rest.split_once('.')?;
    (!namespace.contains('.')).then_some((name, namespace))
}

/// Cluster-wide facts every exported record carries.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub cluster: Option<String>,
    pub node: Option<String>,
    /// Lower case, no trailing dot.
    pub cluster_domain: String,
}

pub fn export_identity(who: &WorkloadIdentity, node: &NodeFacts) -> ExportIdentity {
    let pod = match &who.scope {
        ScopeKey::Pod(uid) => Some(PodIdentity {
            uid: uid.to_string(),
            namespace: who
                .pod
                .as_ref()
                .map(|p| p.namespace.to_string())
                .or_else(|| namespace_from_search_list(who, &node.cluster_domain)),
            name: who.pod.as_ref().map(|p| p.name.to_string()),
            workload: who.workload.as_ref().and_then(workload),
        }),
        ScopeKey::Host(_) => None,
    };
    let container = who.container_id().map(|id| ContainerIdentity {
        id: Some(id.as_str().to_owned()),
        name: who.container_name.as_ref().map(|n| n.to_string()),
    });
    ExportIdentity {
        cluster: node.cluster.clone(),
        node: node.node.clone(),
        pod,
        container,
    }
}

/// Without the API, a pod's namespace is still written in its resolv.conf: the kubelet puts
/// `<namespace>.svc.<cluster domain>` first in the search list of every ClusterFirst pod.
fn namespace_from_search_list(who: &WorkloadIdentity, cluster_domain: &str) -> Option<String> {
    let first = who.resolver.as_ref()?.search.first()?;
    let ns = first.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
    let valid = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then(|| ns.to_owned())
}

fn workload(w: &model::WorkloadRef) -> Option<Workload> {
    let kind = match &w.kind {
        // A custom controller: name the pod's workload by the controller's name anyway,
        // so service.name stays what the user knows.
        WorkloadKind::Other(_) => WorkloadKind::Pod,
        kind => kind.clone(),
    };
    Some(Workload {
        kind,
        name: w.name.to_string(),
    })
}

/// The key drift is tracked under: the same workload resolving the same name.
pub fn drift_key(who: &WorkloadIdentity) -> Option<String> {
    let pod = who.pod.as_ref()?;
    let w = who.workload.as_ref()?;
    Some(format!("{}/{}/{}", pod.namespace, w.kind.as_str(), w.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{WorkloadIdentity, parse_resolv_conf};

    fn pod_with_resolv(text: &str) -> WorkloadIdentity {
        WorkloadIdentity {
            scope: ScopeKey::Pod(Arc::from("0b5e77e5-0002-4bfd-8e9f-00000001d7e6")),
            resolver: Some(Arc::new(
                parse_resolv_conf(text.as_bytes()).expect("valid resolv.conf"),
            )),
            ..WorkloadIdentity::unknown(7055)
        }
    }

    #[test]
    fn host_mode_reads_the_namespace_from_the_kubelet_search_list() {
        let node = NodeFacts {
            cluster_domain: "cluster.local".into(),
            ..NodeFacts::default()
        };
        let who = pod_with_resolv(
            "search simple-web-app.svc.cluster.local svc.cluster.local cluster.local another-lab.com\nnameserver 10.96.0.10\noptions ndots:5\n",
        );
        let id = export_identity(&who, &node);
        let pod = id.pod.expect("a pod scope");
        assert_eq!(pod.namespace.as_deref(), Some("simple-web-app"));
        assert_eq!(pod.name, None);
        assert_eq!(pod.uid, "0b5e77e5-0002-4bfd-8e9f-00000001d7e6");
    }

    #[test]
    fn a_search_list_not_written_by_the_kubelet_names_no_namespace() {
        let node = NodeFacts {
            cluster_domain: "cluster.local".into(),
            ..NodeFacts::default()
        };
        for text in [
            "search another-lab.com cluster.local\n",
            "search svc.cluster.local\n",
            "search Bad_NS.svc.cluster.local\n",
            "nameserver 10.96.0.10\n",
        ] {
            let id = export_identity(&pod_with_resolv(text), &node);
            assert_eq!(id.pod.expect("a pod scope").namespace, None, "{text}");
        }
    }

    fn cname_escape(server: &str, target: &str) -> ConnectionRecord {
        ConnectionRecord {
            scope: ScopeKey::Host(1),
            cgroup_id: 1,
            pid: 1,
            comm: "app".into(),
            destination: "203.0.113.10:5432".parse().unwrap(),
            source: None,
            opened_at: 1,
            outcome: crate::record::Outcome::Established,
            outcome_at: 2,
            resolution: Resolution::CnameEscape,
            chain: Some(Arc::new(crate::record::ResolutionChain {
                query_name: "ledger".into(),
                server_address: server.into(),
                search_domain: Some("shop.svc.cluster.local".into()),
                cname_chain: vec![target.into()],
                wasted_queries: 0,
                ndots_walk: false,
                queries: Arc::default(),
            })),
            egress: true,
            flagged: true,
            drift: false,
            dns_from_outside: false,
        }
    }

    #[test]
    fn an_externalname_service_declares_its_cname_as_egress() {
        let api = |namespace: &str, name: &str| {
            (namespace == "shop" && name == "ledger").then(|| Arc::from("db.another-lab.com"))
        };
        let mut declared = cname_escape("ledger.shop.svc.cluster.local", "db.another-lab.com");
        declare_egress(&mut declared, "cluster.local", api);
        assert_eq!(declared.resolution, Resolution::DeclaredEgress);
        assert!(!declared.flagged && declared.egress);

        // Another target than the declared one, another Service, or no API: still an escape.
        for (server, target) in [
            ("ledger.shop.svc.cluster.local", "evil.example"),
            ("other.shop.svc.cluster.local", "db.another-lab.com"),
            ("ledger.shop.cluster.local", "db.another-lab.com"),
        ] {
            let mut record = cname_escape(server, target);
            declare_egress(&mut record, "cluster.local", api);
            assert_eq!(
                record.resolution,
                Resolution::CnameEscape,
                "{server} -> {target}"
            );
            assert!(record.flagged);
        }
        let mut without_api = cname_escape("ledger.shop.svc.cluster.local", "db.another-lab.com");
        declare_egress(&mut without_api, "cluster.local", |_, _| None);
        assert_eq!(without_api.resolution, Resolution::CnameEscape);
        assert!(without_api.flagged);
    }
}
