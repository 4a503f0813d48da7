//! Plain data about pods, workloads and services, as the rest of observer sees them. Filled
//! from the Kubernetes API by `identity::kube`, but free of any Kubernetes client types.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::SystemTime};

use super::cgroup_path::ContainerId;

/// What owns a pod, for `k8s.deployment.name` and its siblings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    pub name: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
    /// No controller: the pod is its own workload.
    Pod,
    /// Any other controller (a custom resource such as a rollout), by its kind.
    Other(Arc<str>),
}

impl WorkloadKind {
    pub fn from_kind(kind: &str) -> WorkloadKind {
        match kind {
            "Deployment" => WorkloadKind::Deployment,
            "ReplicaSet" => WorkloadKind::ReplicaSet,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Job" => WorkloadKind::Job,
            "CronJob" => WorkloadKind::CronJob,
            "Pod" => WorkloadKind::Pod,
            other => WorkloadKind::Other(Arc::from(other)),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Pod => "Pod",
            WorkloadKind::Other(kind) => kind,
        }
    }

    /// The OpenTelemetry resource attribute naming a workload of this kind; a custom
    /// controller's workload is named like a bare pod's.
    pub fn resource_attribute(&self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::ReplicaSet => "k8s.replicaset.name",
            WorkloadKind::StatefulSet => "k8s.statefulset.name",
            WorkloadKind::DaemonSet => "k8s.daemonset.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
            WorkloadKind::Pod | WorkloadKind::Other(_) => "k8s.pod.name",
        }
    }
}

/// A container of a pod, as the pod's status lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    pub id: ContainerId,
    pub name: Arc<str>,
}

/// A pod as the API server describes it, reduced to what identity needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub node: Option<Arc<str>>,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// Regular, init and ephemeral containers that have a runtime id.
    pub containers: Vec<ContainerMeta>,
    /// The controller owner as written on the pod (`ReplicaSet/web-7d4b9c`), before walking up.
    pub owner: Option<WorkloadRef>,
    /// A static pod's config hash (`kubernetes.io/config.mirror`): its cgroup carries this,
    /// not the mirror pod's API UID.
    pub static_pod_hash: Option<Arc<str>>,
}

impl PodMeta {
    pub fn container_name(&self, id: &ContainerId) -> Option<Arc<str>> {
        self.containers
            .iter()
            .find(|c| &c.id == id)
            .map(|c| Arc::clone(&c.name))
    }
}

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// Whether, and how well, pod identity is being enriched from the Kubernetes API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnrichmentStatus {
    /// Host mode: identity from the node only, by choice or for want of a cluster.
    Disabled,
    /// Watches started, initial lists not all complete yet.
    Syncing,
    Ready,
    /// A watch is failing; lookups answer from what was last known plus node identity.
    Degraded {
        since: SystemTime,
        last_error: Arc<str>,
    },
}

impl EnrichmentStatus {
    /// A short label for the health endpoint and the status metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            EnrichmentStatus::Disabled => "disabled",
            EnrichmentStatus::Syncing => "syncing",
            EnrichmentStatus::Ready => "ready",
            EnrichmentStatus::Degraded { .. } => "degraded",
        }
    }
}
