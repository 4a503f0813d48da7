//! Whose traffic is it: cgroup id -> pod, container and workload, plus the pod's resolver
//! configuration.
//!
//! Two sources, layered:
//! - the node itself (`cgroup`, `cgroup_path`, `resolv`): the cgroup path names the pod UID,
//!   QoS class, container id and runtime; `/proc/<pid>/root/etc/resolv.conf` gives the search
//!   list. Always available, no Kubernetes needed.
//! - the Kubernetes API (`kube`): names, labels, workloads, Services and cluster networks,
//!   watched into local stores. Optional; lookups never wait on it.
pub mod cgroup;
pub mod cgroup_path;
pub mod kube;
pub mod model;
pub mod resolv;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use cgroup::{CgroupCache, CgroupCacheConfig, CgroupCacheStats, CgroupError};
pub use cgroup_path::{
    CgroupDriver, CgroupOwner, CgroupPathError, ContainerId, ContainerRuntime, PodCgroup,
    PodMember, PodUid, QosClass, parse_cgroup_path, parse_container_status_id,
};
pub use kube::{KubeIdentity, KubeWatchConfig};
pub use model::{ContainerMeta, EnrichmentStatus, PodMeta, ServiceRef, WorkloadKind, WorkloadRef};
pub use resolv::{
    ResolvCache, ResolvCacheConfig, ResolvConf, ResolvConfError, ResolvConfIssue, parse_resolv_conf,
};

use crate::scope::ScopeKey;

/// Whether to enrich identity from the Kubernetes API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeMode {
    /// Use the API when `kube::Config::infer()` finds one (in-cluster or kubeconfig);
    /// otherwise run in host mode.
    #[default]
    Auto,
    /// Host mode: identity from the node only.
    Off,
}

#[derive(Clone, Debug, Default)]
pub struct IdentityConfig {
    pub kube_mode: KubeMode,
    /// This node's name (`--node-name`, `NODE_NAME` from the downward API). Needed with the
    /// API: only this node's pods are watched.
    pub node_name: Option<String>,
    /// The cgroup2 mount; `None` finds it in `/proc/self/mountinfo`.
    pub cgroup_root: Option<PathBuf>,
    pub cgroup: CgroupCacheConfig,
    pub resolv: ResolvCacheConfig,
    /// The cluster networks are configured (`--cluster-cidr`): Nodes need not be watched.
    pub cluster_networks_given: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "a Kubernetes API was found but no node name was given (--node-name or NODE_NAME): \
         without it every pod of the cluster would be watched"
    )]
    NodeNameRequired,
    #[error("building the Kubernetes client")]
    KubeClient(#[source] ::kube::Error),
}

/// Everything known about the owner of one cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadIdentity {
    pub scope: ScopeKey,
    pub cgroup_id: u64,
    /// Relative to the cgroup2 mount; `None` when the id is unknown (cgroup gone, or too new
    /// and the rescan budget spent).
    pub cgroup_path: Option<Arc<str>>,
    /// What the cgroup path says (node-derived, always present for pods).
    pub pod_cgroup: Option<PodCgroup>,
    /// The path lay in the kubelet's hierarchy but broke its naming: scoped as a host process.
    pub cgroup_error: Option<CgroupPathError>,
    /// From the API, when enrichment is on and the pod is known.
    pub pod: Option<Arc<PodMeta>>,
    pub container_name: Option<Arc<str>>,
    /// The pod's controller, walked up ReplicaSet -> Deployment and Job -> CronJob.
    pub workload: Option<WorkloadRef>,
    pub resolver: Option<Arc<ResolvConf>>,
}

impl WorkloadIdentity {
    /// What is known of a cgroup without its path: a cgroup of the node, scoped alone.
    pub fn unknown(cgroup_id: u64) -> WorkloadIdentity {
        WorkloadIdentity {
            scope: ScopeKey::Host(cgroup_id),
            cgroup_id,
            cgroup_path: None,
            pod_cgroup: None,
            cgroup_error: None,
            pod: None,
            container_name: None,
            workload: None,
            resolver: None,
        }
    }

    pub fn container_id(&self) -> Option<&ContainerId> {
        self.pod_cgroup.as_ref().and_then(PodCgroup::container_id)
    }
}

/// Cheap to clone; all state is shared.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    cgroups: CgroupCache,
    resolv: ResolvCache,
    kube: Option<KubeIdentity>,
    memo: Mutex<HashMap<u64, Memo>>,
}

struct Memo {
    kube_generation: u64,
    identity: Arc<WorkloadIdentity>,
}

/// Memoised identities at most; beyond that the memo starts over (it is only a cache).
const MEMO_MAX: usize = 65_536;

impl Identity {
    /// Starts identity per `config`: in `Auto` mode, tries `kube::Config::infer()` and falls
    /// back to host mode with one log line; in `Off` mode, host mode.
    pub async fn start(config: IdentityConfig) -> Result<Identity, IdentityError> {
        let root = match &config.cgroup_root {
            Some(root) => root.clone(),
            None => cgroup::find_cgroup2_mount()?,
        };
        let cgroups = CgroupCache::new(root, config.cgroup.clone());
        let resolv = ResolvCache::new(config.resolv.clone());
        if config.kube_mode == KubeMode::Off {
            tracing::info!("kubernetes enrichment off: identity from the node only (host mode)");
            return Ok(Identity::host_only(cgroups, resolv));
        }
        let kube_config = match ::kube::Config::infer().await {
            Ok(kube_config) => kube_config,
            Err(e) => {
                tracing::info!(
                    reason = %e,
                    "no Kubernetes API configuration (in-cluster or kubeconfig): host mode, identity from the node only"
                );
                return Ok(Identity::host_only(cgroups, resolv));
            }
        };
        let node_name = config
            .node_name
            .clone()
            .ok_or(IdentityError::NodeNameRequired)?;
        let watch = KubeWatchConfig {
            watch_nodes: !config.cluster_networks_given,
            ..KubeWatchConfig::new(node_name)
        };
        let kube = KubeIdentity::start(kube_config, watch).map_err(IdentityError::KubeClient)?;
        Ok(Identity::with_kube(cgroups, resolv, Some(kube)))
    }

    pub fn host_only(cgroups: CgroupCache, resolv: ResolvCache) -> Identity {
        Identity::with_kube(cgroups, resolv, None)
    }

    pub fn with_kube(
        cgroups: CgroupCache,
        resolv: ResolvCache,
        kube: Option<KubeIdentity>,
    ) -> Identity {
        cgroups.refresh();
        Identity {
            inner: Arc::new(Inner {
                cgroups,
                resolv,
                kube,
                memo: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Who owns cgroup `cgroup_id`. Never waits on the network, but reads the node's files:
    /// the cgroup cache may walk the local cgroup tree (rate-limited) and the resolver cache
    /// may read `cgroup.procs` and a few small `/proc` files. The agent calls it on its
    /// identity worker only, never on the task that owns the correlation core.
    /// `pid`, when known, is remembered to read the pod's resolv.conf through.
    pub fn resolve(&self, cgroup_id: u64, pid: Option<u32>) -> Arc<WorkloadIdentity> {
        let inner = &self.inner;
        let cgroup_path = inner.cgroups.path_of(cgroup_id);
        let kube_generation = self.kube_generation();
        // Every event asks: what the path says is read from the identity memoised for the
        // same path rather than parsed again.
        let memoised = {
            let memo = inner.memo.lock().unwrap_or_else(|p| p.into_inner());
            memo.get(&cgroup_id)
                .filter(|hit| {
                    hit.kube_generation == kube_generation
                        && hit.identity.cgroup_path == cgroup_path
                })
                .map(|hit| Arc::clone(&hit.identity))
        };
        if let Some(hit) = memoised {
            let resolver = inner.resolv.get_or_discover(&hit.scope, pid, || {
                member_pids(
                    inner.cgroups.root(),
                    hit.cgroup_path.as_deref(),
                    hit.pod_cgroup.as_ref(),
                )
            });
            let same_resolver = match (&hit.resolver, &resolver) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same_resolver {
                return hit;
            }
        }
        let (pod_cgroup, cgroup_error) = match cgroup_path.as_deref().map(parse_cgroup_path) {
            Some(Ok(CgroupOwner::Pod(pod))) => (Some(pod), None),
            Some(Err(e)) => (None, Some(e)),
            Some(Ok(CgroupOwner::Host)) | None => (None, None),
        };
        let scope = match &pod_cgroup {
            Some(pod) => ScopeKey::Pod(pod.uid.as_arc()),
            None => ScopeKey::Host(cgroup_id),
        };
        let resolver = inner.resolv.get_or_discover(&scope, pid, || {
            member_pids(
                inner.cgroups.root(),
                cgroup_path.as_deref(),
                pod_cgroup.as_ref(),
            )
        });
        let mut memo = inner.memo.lock().unwrap_or_else(|p| p.into_inner());
        let (pod, container_name, workload) = match (&inner.kube, &pod_cgroup) {
            (Some(kube), Some(pc)) => match kube.pod_by_uid(pc.uid.as_str()) {
                Some(meta) => {
                    let container_name = pc.container_id().and_then(|id| meta.container_name(id));
                    let workload = kube.workload_of(&meta);
                    (Some(meta), container_name, Some(workload))
                }
                None => (None, None, None),
            },
            _ => (None, None, None),
        };
        let identity = Arc::new(WorkloadIdentity {
            scope,
            cgroup_id,
            cgroup_path,
            pod_cgroup,
            cgroup_error,
            pod,
            container_name,
            workload,
            resolver,
        });
        if memo.len() >= MEMO_MAX {
            memo.clear();
        }
        memo.insert(
            cgroup_id,
            Memo {
                kube_generation,
                identity: Arc::clone(&identity),
            },
        );
        identity
    }

    /// Networks that belong to the cluster: pod CIDRs and addresses of nodes, Service CIDRs
    /// (or Service cluster IPs where the API has no ServiceCIDR). Empty in host mode.
    pub fn cluster_networks(&self) -> Vec<ipnet::IpNet> {
        self.inner
            .kube
            .as_ref()
            .map_or_else(Vec::new, KubeIdentity::cluster_networks)
    }

    pub fn service_for_ip(&self, ip: IpAddr) -> Option<ServiceRef> {
        self.inner.kube.as_ref()?.service_for_ip(ip)
    }

    /// Whether Service `name` exists in namespace `namespace`. `None` when unknown (host mode),
    /// so "no such Service" is only reported when the API said so.
    pub fn service_exists(&self, namespace: &str, name: &str) -> Option<bool> {
        Some(self.inner.kube.as_ref()?.service_exists(namespace, name))
    }

    /// The target Service `name` of namespace `namespace` declares, if the API says it is
    /// of type ExternalName; `None` also in host mode.
    pub fn external_name(&self, namespace: &str, name: &str) -> Option<Arc<str>> {
        self.inner.kube.as_ref()?.external_name(namespace, name)
    }

    pub fn status(&self) -> EnrichmentStatus {
        self.inner
            .kube
            .as_ref()
            .map_or(EnrichmentStatus::Disabled, KubeIdentity::status)
    }

    pub fn kube(&self) -> Option<&KubeIdentity> {
        self.inner.kube.as_ref()
    }

    pub fn cgroup_stats(&self) -> CgroupCacheStats {
        self.inner.cgroups.stats()
    }

    /// Whether the last cgroup walk found cgroup `id`; reads no file.
    pub fn cgroup_known(&self, id: u64) -> bool {
        self.inner.cgroups.knows(id)
    }

    /// How long an unknown cgroup may wait for the next cgroup walk.
    pub fn cgroup_rescan_interval(&self) -> std::time::Duration {
        self.inner.cgroups.min_rescan_interval()
    }

    /// Changes whenever the Kubernetes metadata changes (0 in host mode): identities
    /// resolved under another generation may be stale. One atomic load.
    pub fn kube_generation(&self) -> u64 {
        self.inner.kube.as_ref().map_or(0, KubeIdentity::generation)
    }

    /// Re-walks the cgroup tree now (periodic housekeeping: forgets removed cgroups).
    pub fn refresh_cgroups(&self) {
        self.inner.cgroups.refresh();
    }

    /// The scope is gone (its pod deleted, its process exited): drop its resolver config and
    /// the memoised identities of its cgroups.
    pub fn forget_scope(&self, scope: &ScopeKey) {
        self.inner.resolv.forget(scope);
        let mut memo = self.inner.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.retain(|_, m| &m.identity.scope != scope);
    }
}

/// Processes that can show a cgroup's resolv.conf: a pod's members (see
/// [`pod_member_pids`]), or a node cgroup's own processes, so that a node process that
/// exits right after its lookup is read while its lookup is in flight.
fn member_pids(
    root: &std::path::Path,
    relative: Option<&str>,
    pod: Option<&PodCgroup>,
) -> Vec<u32> {
    match (relative, pod) {
        (Some(path), Some(pod)) => pod_member_pids(root, path, pod),
        (Some(path), None) => {
            let mut pids = Vec::new();
            add_procs(&root.join(path.trim_start_matches('/')), &mut pids);
            pids
        }
        (None, _) => Vec::new(),
    }
}

/// Pids read from member files at most per discovery: a few small kernel files, never many.
const MEMBER_PIDS_MAX: usize = 8;

/// Appends the pids of the cgroup at `dir` (its `cgroup.procs`), up to [`MEMBER_PIDS_MAX`].
fn add_procs(dir: &std::path::Path, pids: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        let room = MEMBER_PIDS_MAX.saturating_sub(pids.len());
        pids.extend(
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .take(room),
        );
    }
}

/// Processes that can show a pod's resolv.conf, best first: those of the event's own cgroup,
/// then those of the pod's other containers (its main process or a sidecar outlives a
/// one-shot client). Conmon monitors are skipped: they run in the node's root, whose
/// resolv.conf is not the pod's. A few small kernel files are read; never many pids.
fn pod_member_pids(root: &std::path::Path, relative: &str, pod: &PodCgroup) -> Vec<u32> {
    let relative = relative.trim_start_matches('/').trim_end_matches('/');
    let mut pids = Vec::new();
    if !matches!(pod.member, PodMember::ConmonMonitor { .. }) {
        add_procs(&root.join(relative), &mut pids);
    }
    let pod_dir = match pod.member {
        PodMember::PodLevel => relative,
        _ => relative.rsplit_once('/').map_or("", |(parent, _)| parent),
    };
    if pod_dir.is_empty() {
        return pids;
    }
    let Ok(children) = std::fs::read_dir(root.join(pod_dir)) else {
        return pids;
    };
    for child in children.flatten() {
        if pids.len() >= MEMBER_PIDS_MAX {
            break;
        }
        let Some(name) = child.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let child_relative = format!("{pod_dir}/{name}");
        if child_relative == relative || !child.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let sibling_is_container = matches!(
            parse_cgroup_path(&child_relative),
            Ok(CgroupOwner::Pod(PodCgroup { member: PodMember::Container { .. }, ref uid, .. })) if *uid == pod.uid
        );
        if sibling_is_container {
            add_procs(&child.path(), &mut pids);
        }
    }
    pids
}
