//! From what identity knows about a cgroup to what the exporters print and attach.
use crate::{
    export::{ContainerIdentity, ExportIdentity, PodIdentity, Workload, WorkloadKind},
    identity::{WorkloadIdentity, model},
    scope::ScopeKey,
};

/// Cluster-wide facts every exported record carries.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    pub cluster: Option<String>,
    pub node: Option<String>,
}

pub fn export_identity(who: &WorkloadIdentity, node: &NodeFacts) -> ExportIdentity {
    let pod = match &who.scope {
        ScopeKey::Pod(uid) => Some(PodIdentity {
            uid: uid.to_string(),
            namespace: who.pod.as_ref().map(|p| p.namespace.to_string()),
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

fn workload(w: &model::WorkloadRef) -> Option<Workload> {
    let kind = match &w.kind {
        model::WorkloadKind::Deployment => WorkloadKind::Deployment,
        model::WorkloadKind::ReplicaSet => WorkloadKind::ReplicaSet,
        model::WorkloadKind::StatefulSet => WorkloadKind::StatefulSet,
        model::WorkloadKind::DaemonSet => WorkloadKind::DaemonSet,
        model::WorkloadKind::Job => WorkloadKind::Job,
        model::WorkloadKind::CronJob => WorkloadKind::CronJob,
        model::WorkloadKind::Pod => WorkloadKind::Pod,
        // A custom controller: name the pod's workload by the controller's name anyway,
        // so service.name stays what the user knows.
        model::WorkloadKind::Other(_) => WorkloadKind::Pod,
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
