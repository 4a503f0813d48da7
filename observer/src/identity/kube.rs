//! Identity from the Kubernetes API: watches of this node's Pods, and of Services, Nodes and
//! ServiceCIDRs, kept in local stores that lookups read without waiting. The API being slow,
//! down or forbidding a watch never blocks a lookup; it shows in [`EnrichmentStatus`].
//!
//! Owners: a pod names its ReplicaSet or Job, not the Deployment or CronJob above it. Those
//! are fetched with one `get` per distinct owner of a local pod, cached. A node runs tens of
//! pods, so this is tens of small requests at start and a few as pods come and go; watching
//! ReplicaSets instead would stream every ReplicaSet of the cluster (Deployments keep ten old
//! ones each by default) to every node, and would need `list`/`watch` rights on them.
use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt, future::BoxFuture};
use ipnet::IpNet;
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Node, Pod, Service},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Config, Resource,
    client::ClientBuilder,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use serde::{Deserialize, de::DeserializeOwned};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    cgroup_path::parse_container_status_id,
    model::{ContainerMeta, EnrichmentStatus, PodMeta, ServiceRef, WorkloadKind, WorkloadRef},
};

const STATIC_POD_MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Clone, Debug)]
pub struct KubeWatchConfig {
    /// Only pods with `spec.nodeName` equal to this are watched.
    pub node_name: String,
    /// How long an owner's owner (ReplicaSet -> Deployment) is trusted before it is re-fetched.
    pub owner_ttl: Duration,
    /// Wait before re-fetching an owner after a failed request.
    pub owner_retry: Duration,
    /// Owner fetches queued at most; more are dropped (and retried on the pod's next event).
    pub owner_queue: usize,
    /// Time allowed for one owner fetch.
    pub owner_request_timeout: Duration,
    /// Whether Nodes are watched, for their pod CIDRs and InternalIPs (the cluster
    /// networks). Every Node's status update reaches every agent, so when the cluster's
    /// networks are given (`--cluster-cidr`) the watch is left out.
    pub watch_nodes: bool,
}

impl KubeWatchConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        KubeWatchConfig {
            node_name: node_name.into(),
            owner_ttl: Duration::from_secs(600),
            owner_retry: Duration::from_secs(5),
            owner_queue: 1024,
            owner_request_timeout: Duration::from_secs(10),
            watch_nodes: true,
        }
    }
}

/// One kind of request the agent makes of the API server: what its ClusterRole must grant
/// (the deploy tests compare the manifest with [`api_access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// The API group, `""` for the core group.
    pub group: &'static str,
    /// The resource's plural, as in the API path and in RBAC rules.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

impl ApiAccess {
    const fn of<K: k8s_openapi::Resource>(verbs: &'static [&'static str]) -> ApiAccess {
        ApiAccess {
            group: K::GROUP,
            resource: K::URL_PATH_SEGMENT,
            verbs,
        }
    }
}

const LIST_WATCH: &[&str] = &["list", "watch"];

/// Objects per page of the cluster-wide lists (kube-rs and the API server default to 500).
/// A page is read whole and decoded before the next: 500 Nodes are about 5 MB of JSON, and
/// the peak of the initial list stays in the agent's resident memory; pages of 100 keep it
/// near 1 MB for a few more requests at start (50 for 5,000 Nodes).
const LIST_PAGE: u32 = 100;

/// The owners fetched one by name to walk up to their workload ([`fetch_owner_parent`]).
const OWNER_ACCESS: [ApiAccess; 2] = [
    ApiAccess::of::<ReplicaSet>(&["get"]),
    ApiAccess::of::<Job>(&["get"]),
];

/// Every request the agent makes: the watches, then the owner fetches.
pub fn api_access() -> impl Iterator<Item = ApiAccess> {
    Watched::ALL
        .into_iter()
        .map(Watched::access)
        .chain(OWNER_ACCESS)
}

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Watched {
    Pods,
    Services,
    Nodes,
    ServiceCidrs,
}

impl Watched {
    const ALL: [Watched; 4] = [
        Watched::Pods,
        Watched::Services,
        Watched::Nodes,
        Watched::ServiceCidrs,
    ];

    const fn access(self) -> ApiAccess {
        match self {
            Watched::Pods => ApiAccess::of::<Pod>(LIST_WATCH),
            Watched::Services => ApiAccess::of::<Service>(LIST_WATCH),
            Watched::Nodes => ApiAccess::of::<Node>(LIST_WATCH),
            Watched::ServiceCidrs => ApiAccess::of::<ServiceCIDR>(LIST_WATCH),
        }
    }

    const fn plural(self) -> &'static str {
        self.access().resource
    }

    /// The resource a list or watch request is for: the last segment of a collection path.
    fn of_path(path: &str) -> Option<Watched> {
        let last = path.trim_end_matches('/').rsplit('/').next()?;
        Watched::ALL.into_iter().find(|w| w.plural() == last)
    }
}

#[derive(Default)]
struct WatchHealth {
    synced: bool,
    /// Not watched: the API has no such resource (ServiceCIDR before Kubernetes 1.33), or
    /// it is not needed (Nodes when the cluster networks are given).
    not_watched: bool,
    failing: Option<WatchFailure>,
}

#[derive(Clone)]
struct WatchFailure {
    since: SystemTime,
    last_at: Instant,
    last_error: Arc<str>,
}

/// When each watched resource last got a 2xx from the API server. A watch that resumes
/// after an outage produces no event until something changes; the successful response to
/// its request is the evidence that it is back.
#[derive(Clone, Default)]
struct ApiSuccesses(Arc<Mutex<HashMap<Watched, Instant>>>);

impl ApiSuccesses {
    fn record(&self, watched: Watched) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(watched, Instant::now());
    }

    fn last(&self, watched: Watched) -> Option<Instant> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&watched).copied()
    }
}

struct SuccessLayer(ApiSuccesses);

impl<S> tower_layer::Layer<S> for SuccessLayer {
    type Service = SuccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SuccessService {
            inner,
            successes: self.0.clone(),
        }
    }
}

struct SuccessService<S> {
    inner: S,
    successes: ApiSuccesses,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for SuccessService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let watched = Watched::of_path(request.uri().path());
        let successes = self.successes.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            if let (Some(watched), Ok(ok)) = (watched, &response)
                && ok.status().is_success()
            {
                successes.record(watched);
            }
            response
        })
    }
}

#[derive(Default)]
struct PodIndex {
    by_uid: HashMap<Arc<str>, Arc<PodMeta>>,
}

#[derive(Clone, Default)]
struct ServiceIndex {
    by_ip: HashMap<IpAddr, ServiceRef>,
    names: HashSet<(Arc<str>, Arc<str>)>,
    /// ExternalName Services: (namespace, name) -> the declared target (lower case, no
    /// trailing dot), the CNAME cluster DNS answers for the Service's name.
    external_names: HashMap<(Arc<str>, Arc<str>), Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OwnerKey {
    namespace: Arc<str>,
    kind: WorkloadKind,
    name: Arc<str>,
}

enum OwnerEntry {
    Pending,
    /// The owner's own controller (`None`: it has none, or is gone).
    Resolved {
        parent: Option<WorkloadRef>,
        at: Instant,
    },
    Failed {
        retry_at: Instant,
    },
}

struct Shared {
    config: KubeWatchConfig,
    pods: RwLock<Arc<PodIndex>>,
    services: RwLock<Arc<ServiceIndex>>,
    /// Per node: pod CIDRs and internal addresses.
    node_networks: RwLock<HashMap<String, Vec<IpNet>>>,
    service_cidrs: RwLock<HashMap<String, Vec<IpNet>>>,
    /// The aggregate of the three sources above, rebuilt when read after any of them changed:
    /// a churning cluster pays for one aggregation per read, not one per change.
    networks: RwLock<Arc<Vec<IpNet>>>,
    networks_stale: AtomicBool,
    owners: Mutex<HashMap<OwnerKey, OwnerEntry>>,
    owner_queue: mpsc::Sender<OwnerKey>,
    owner_drops: AtomicU64,
    generation: AtomicU64,
    watches: Mutex<HashMap<Watched, WatchHealth>>,
    successes: ApiSuccesses,
}

/// Aborts the background tasks when the last handle goes.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Handle to the API-backed stores. Cheap to clone; dropping the last clone stops the watches.
/// `(entries, capacity)` of each index [`KubeIdentity`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexSizes {
    pub service_addresses: (usize, usize),
    pub service_names: (usize, usize),
    pub external_names: (usize, usize),
    pub node_networks: (usize, usize),
    pub pods: (usize, usize),
}

#[derive(Clone)]
pub struct KubeIdentity {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl KubeIdentity {
    /// Builds a client from `config` and starts the watches on the current tokio runtime.
    /// Returns at once: nothing waits for the API.
    pub fn start(config: Config, watch: KubeWatchConfig) -> Result<KubeIdentity, kube::Error> {
        let successes = ApiSuccesses::default();
        let client = ClientBuilder::try_from(config)?
            .with_layer(&SuccessLayer(successes.clone()))
            .build();
        let (owner_tx, owner_rx) = mpsc::channel(watch.owner_queue.max(1));
        let shared = Arc::new(Shared {
            config: watch.clone(),
            pods: RwLock::default(),
            services: RwLock::default(),
            node_networks: RwLock::default(),
            service_cidrs: RwLock::default(),
            networks: RwLock::default(),
            networks_stale: AtomicBool::new(false),
            owners: Mutex::default(),
            owner_queue: owner_tx,
            owner_drops: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            watches: Mutex::new(
                Watched::ALL
                    .into_iter()
                    .map(|w| {
                        let health = WatchHealth {
                            not_watched: w == Watched::Nodes && !watch.watch_nodes,
                            ..WatchHealth::default()
                        };
                        (w, health)
                    })
                    .collect(),
            ),
            successes,
        });
        let pod_selector = format!("spec.nodeName={}", shared.config.node_name);
        let mut tasks = vec![
            tokio::spawn(run_watch(
                Arc::clone(&shared),
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().fields(&pod_selector),
                Watched::Pods,
                project_pod,
                Commit::Whole(commit_pods),
            )),
            tokio::spawn(run_watch(
                Arc::clone(&shared),
                Api::<Service>::all(client.clone()),
                watcher::Config::default().page_size(LIST_PAGE),
                Watched::Services,
                project_service,
                Commit::Each(change_service),
            )),
            tokio::spawn(run_watch(
                Arc::clone(&shared),
                Api::<ServiceCIDR>::all(client.clone()),
                watcher::Config::default().page_size(LIST_PAGE),
                Watched::ServiceCidrs,
                project_service_cidr,
                Commit::Each(change_service_cidr),
            )),
        ];
        if watch.watch_nodes {
            tasks.push(tokio::spawn(run_watch(
                Arc::clone(&shared),
                Api::<NodeNetworks>::all(client.clone()),
                watcher::Config::default().page_size(LIST_PAGE),
                Watched::Nodes,
                project_node,
                Commit::Each(change_node),
            )));
        }
        tasks.push(tokio::spawn(run_owner_fetcher(
            Arc::clone(&shared),
            client,
            owner_rx,
        )));
        Ok(KubeIdentity {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// A pod of this node by API UID, or by a static pod's config hash (which is what its
    /// cgroup path carries).
    pub fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodMeta>> {
        let pods = Arc::clone(&self.shared.pods.read().unwrap_or_else(|p| p.into_inner()));
        pods.by_uid.get(uid).cloned()
    }

    /// Every pod of this node currently known.
    pub fn pods(&self) -> Vec<Arc<PodMeta>> {
        let pods = Arc::clone(&self.shared.pods.read().unwrap_or_else(|p| p.into_inner()));
        let mut seen = HashSet::new();
        pods.by_uid
            .values()
            .filter(|p| seen.insert(Arc::clone(&p.uid)))
            .cloned()
            .collect()
    }

    /// The pod's workload: its controller, walked up ReplicaSet -> Deployment and
    /// Job -> CronJob where the owner's owner is known. Until it is, the direct owner.
    pub fn workload_of(&self, pod: &PodMeta) -> WorkloadRef {
        let Some(owner) = &pod.owner else {
            return WorkloadRef {
                kind: WorkloadKind::Pod,
                name: Arc::clone(&pod.name),
            };
        };
        if !matches!(owner.kind, WorkloadKind::ReplicaSet | WorkloadKind::Job) {
            return owner.clone();
        }
        let key = OwnerKey {
            namespace: Arc::clone(&pod.namespace),
            kind: owner.kind.clone(),
            name: Arc::clone(&owner.name),
        };
        let owners = self.shared.owners.lock().unwrap_or_else(|p| p.into_inner());
        match owners.get(&key) {
            Some(OwnerEntry::Resolved {
                parent: Some(parent),
                ..
            }) => parent.clone(),
            Some(_) => owner.clone(),
            None => {
                drop(owners);
                self.shared.request_owner(key);
                owner.clone()
            }
        }
    }

    pub fn service_for_ip(&self, ip: IpAddr) -> Option<ServiceRef> {
        let services = self.services();
        services.by_ip.get(&ip).cloned()
    }

    /// The Service index as last published. A lookup holds this snapshot only while it
    /// reads; the watch updates the index in place when no lookup holds it (`change_service`).
    fn services(&self) -> Arc<ServiceIndex> {
        Arc::clone(
            &self
                .shared
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// How many entries the shared indexes hold, and room for how many: a mass delete must
    /// give the room back (a memory bound the tests check).
    pub fn index_sizes(&self) -> IndexSizes {
        let services = self.services();
        let nodes = self
            .shared
            .node_networks
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let pods = self.shared.pods.read().unwrap_or_else(|p| p.into_inner());
        IndexSizes {
            service_addresses: (services.by_ip.len(), services.by_ip.capacity()),
            service_names: (services.names.len(), services.names.capacity()),
            external_names: (
                services.external_names.len(),
                services.external_names.capacity(),
            ),
            node_networks: (nodes.len(), nodes.capacity()),
            pods: (pods.by_uid.len(), pods.by_uid.capacity()),
        }
    }

    pub fn service_exists(&self, namespace: &str, name: &str) -> bool {
        let services = self.services();
        services
            .names
            .contains(&(Arc::from(namespace), Arc::from(name)))
    }

    /// The target Service `name` of namespace `namespace` declares, if it is of type
    /// ExternalName.
    pub fn external_name(&self, namespace: &str, name: &str) -> Option<Arc<str>> {
        let services = self.services();
        services
            .external_names
            .get(&(Arc::from(namespace), Arc::from(name)))
            .cloned()
    }

    pub fn cluster_networks(&self) -> Vec<IpNet> {
        if self.shared.networks_stale.swap(false, Ordering::AcqRel) {
            self.shared.recompute_networks();
        }
        self.shared
            .networks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .clone()
    }

    /// Changes whenever what `pod_by_uid` or `workload_of` would answer changes.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Owner fetches dropped because the queue was full.
    pub fn owner_fetches_dropped(&self) -> u64 {
        self.shared.owner_drops.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> EnrichmentStatus {
        self.shared.refresh_recovered();
        let watches = self
            .shared
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let active = || watches.values().filter(|w| !w.not_watched);
        let failures: Vec<&WatchFailure> = active().filter_map(|w| w.failing.as_ref()).collect();
        if let Some(latest) = failures.iter().max_by_key(|f| f.last_at) {
            let since = failures
                .iter()
                .map(|f| f.since)
                .min()
                .unwrap_or(latest.since);
            return EnrichmentStatus::Degraded {
                since,
                last_error: Arc::clone(&latest.last_error),
            };
        }
        if active().all(|w| w.synced) {
            EnrichmentStatus::Ready
        } else {
            EnrichmentStatus::Syncing
        }
    }
}

impl Shared {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn request_owner(&self, key: OwnerKey) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        let due = match owners.get(&key) {
            None => true,
            Some(OwnerEntry::Pending) => false,
            Some(OwnerEntry::Resolved { at, .. }) => at.elapsed() >= self.config.owner_ttl,
            Some(OwnerEntry::Failed { retry_at }) => Instant::now() >= *retry_at,
        };
        if !due {
            return;
        }
        match self.owner_queue.try_send(key.clone()) {
            Ok(()) => {
                // A stale answer keeps serving until the fresh one lands.
                if !matches!(owners.get(&key), Some(OwnerEntry::Resolved { .. })) {
                    owners.insert(key, OwnerEntry::Pending);
                }
            }
            Err(_) => {
                self.owner_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn watch_event(&self, watched: Watched, synced: bool) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let health = watches.entry(watched).or_default();
        health.failing = None;
        health.synced |= synced;
    }

    fn watch_error(&self, watched: Watched, error: &watcher::Error) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let health = watches.entry(watched).or_default();
        let since = health
            .failing
            .as_ref()
            .map_or_else(SystemTime::now, |f| f.since);
        health.failing = Some(WatchFailure {
            since,
            last_at: Instant::now(),
            last_error: Arc::from(format!("{}: {error}", watched.plural())),
        });
    }

    fn mark_unsupported(&self, watched: Watched) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let health = watches.entry(watched).or_default();
        health.not_watched = true;
        health.failing = None;
    }

    /// A failing watch whose resource got a successful response after its last error is
    /// working again (a resumed watch sends nothing until something changes).
    fn refresh_recovered(&self) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        for (watched, health) in watches.iter_mut() {
            if let Some(failure) = &health.failing
                && self
                    .successes
                    .last(*watched)
                    .is_some_and(|ok| ok > failure.last_at)
            {
                health.failing = None;
            }
        }
    }

    fn networks_changed(&self) {
        self.networks_stale.store(true, Ordering::Release);
    }

    fn recompute_networks(&self) {
        let mut nets: Vec<IpNet> = Vec::new();
        nets.extend(
            self.node_networks
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .flatten(),
        );
        let service_cidrs = self.service_cidrs.read().unwrap_or_else(|p| p.into_inner());
        if service_cidrs.is_empty() {
            // No ServiceCIDR objects (older API): each Service's cluster IP stands for itself.
            let services = Arc::clone(&self.services.read().unwrap_or_else(|p| p.into_inner()));
            nets.extend(services.by_ip.keys().map(|ip| IpNet::from(*ip)));
        } else {
            nets.extend(service_cidrs.values().flatten());
        }
        drop(service_cidrs);
        let aggregated = IpNet::aggregate(&nets);
        *self.networks.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(aggregated);
    }
}

/// A table emptied by a mass delete (a namespace removed) gives its memory back instead of
/// keeping the capacity of its largest day.
macro_rules! shrink_after_deletes {
    ($($table:expr),+) => {
        $(if $table.capacity() > 64 && $table.capacity() > 4 * $table.len() {
            $table.shrink_to_fit();
        })+
    };
}

/// How a watch publishes its objects to the readers.
enum Commit<T> {
    /// Rebuilt from the whole set after every change: for the pods of this node (about a
    /// hundred), where a rebuild costs less than bookkeeping would.
    Whole(fn(&Shared, &HashMap<String, Arc<T>>)),
    /// One change at a time (`old` -> `new`, `None` where the object is absent), so that a
    /// change costs the same in a cluster of 20,000 Services as in one of 20: for cluster-wide
    /// watches. A relist is applied as the changes between the old set and the new one.
    Each(fn(&Shared, &str, Option<&T>, Option<&T>)),
}

impl<T> Commit<T> {
    fn change(
        &self,
        shared: &Shared,
        items: &HashMap<String, Arc<T>>,
        key: &str,
        old: Option<&T>,
        new: Option<&T>,
    ) {
        match self {
            Commit::Whole(commit) => commit(shared, items),
            Commit::Each(change) => change(shared, key, old, new),
        }
    }

    fn replace(
        &self,
        shared: &Shared,
        items: &mut HashMap<String, Arc<T>>,
        relisted: HashMap<String, Arc<T>>,
    ) where
        T: PartialEq,
    {
        let old = std::mem::replace(items, relisted);
        match self {
            Commit::Whole(commit) => commit(shared, items),
            Commit::Each(change) => {
                for (key, before) in &old {
                    match items.get(key) {
                        Some(after) if after == before => {}
                        after => change(shared, key, Some(before), after.map(Arc::as_ref)),
                    }
                }
                for (key, after) in items.iter() {
                    if !old.contains_key(key) {
                        change(shared, key, None, Some(after));
                    }
                }
            }
        }
    }
}

/// One watch: events are reduced to `T` on arrival (only what identity needs is kept), the
/// full set is kept here, and `commit` publishes each change to the readers; an event that
/// leaves the reduced object as it was (a Node's status heartbeat, a Service's annotations)
/// costs nothing more. An initial list (or a relist after 410 Gone) is buffered and swapped
/// in whole at `InitDone`, so objects deleted while the watch was broken disappear.
async fn run_watch<K, T>(
    shared: Arc<Shared>,
    api: Api<K>,
    config: watcher::Config,
    watched: Watched,
    project: fn(&K) -> Option<(String, T)>,
    commit: Commit<T>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: PartialEq + Send + Sync + 'static,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut items: HashMap<String, Arc<T>> = HashMap::new();
    let mut relist: Option<HashMap<String, Arc<T>>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                if watched == Watched::ServiceCidrs && is_not_found(&error) {
                    tracing::info!(
                        "the API server has no networking.k8s.io/v1 ServiceCIDR: \
                         Service networks come from Service cluster IPs"
                    );
                    shared.mark_unsupported(watched);
                    return;
                }
                tracing::warn!(resource = watched.plural(), %error, "kubernetes watch failing");
                shared.watch_error(watched, &error);
                continue;
            }
        };
        match event {
            Event::Init => {
                relist = Some(HashMap::new());
            }
            Event::InitApply(object) => {
                shared.watch_event(watched, false);
                if let (Some(buffer), Some((key, value))) = (relist.as_mut(), project(&object)) {
                    buffer.insert(key, Arc::new(value));
                }
            }
            Event::InitDone => {
                if let Some(buffer) = relist.take() {
                    commit.replace(&shared, &mut items, buffer);
                }
                shared.watch_event(watched, true);
            }
            Event::Apply(object) => {
                shared.watch_event(watched, false);
                match project(&object) {
                    Some((key, value)) => {
                        if items.get(&key).is_some_and(|old| **old == value) {
                            continue;
                        }
                        let value = Arc::new(value);
                        let old = items.insert(key.clone(), Arc::clone(&value));
                        commit.change(&shared, &items, &key, old.as_deref(), Some(&value));
                    }
                    None => {
                        if let Some(key) = object_key(&object)
                            && let Some(old) = items.remove(&key)
                        {
                            commit.change(&shared, &items, &key, Some(&old), None);
                        }
                    }
                }
            }
            Event::Delete(object) => {
                shared.watch_event(watched, false);
                if let Some(key) = object_key(&object)
                    && let Some(old) = items.remove(&key)
                {
                    commit.change(&shared, &items, &key, Some(&old), None);
                    shrink_after_deletes!(items);
                }
            }
        }
    }
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            matches!(e, kube::Error::Api(status) if status.code == 404)
        }
        _ => false,
    }
}

/// Objects are keyed by UID: names can be reused by a new object, UIDs cannot.
fn object_key<K: Resource>(object: &K) -> Option<String> {
    object.meta().uid.clone()
}

fn project_pod(pod: &Pod) -> Option<(String, PodMeta)> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    let containers = status
        .into_iter()
        .flat_map(|s| {
            [
                &s.container_statuses,
                &s.init_container_statuses,
                &s.ephemeral_container_statuses,
            ]
        })
        .flatten()
        .flatten()
        .filter_map(|c| {
            let (_, id) = parse_container_status_id(c.container_id.as_deref()?).ok()?;
            Some(ContainerMeta {
                id,
                name: Arc::from(c.name.as_str()),
            })
        })
        .collect();
    let owner = controller_of(meta.owner_references.as_deref());
    let static_pod_hash = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATIC_POD_MIRROR_ANNOTATION))
        .map(|h| Arc::from(h.to_ascii_lowercase()));
    let value = PodMeta {
        uid: Arc::from(uid.as_str()),
        namespace: Arc::from(meta.namespace.as_deref().unwrap_or("default")),
        name: Arc::from(meta.name.as_deref().unwrap_or("")),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .map(Arc::from),
        labels: meta.labels.clone().unwrap_or_default(),
        ips,
        containers,
        owner,
        static_pod_hash,
    };
    Some((uid, value))
}

fn controller_of(references: Option<&[OwnerReference]>) -> Option<WorkloadRef> {
    references?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| WorkloadRef {
            kind: WorkloadKind::from_kind(&r.kind),
            name: Arc::from(r.name.as_str()),
        })
}

fn commit_pods(shared: &Shared, items: &HashMap<String, Arc<PodMeta>>) {
    let mut index = PodIndex::default();
    for pod in items.values() {
        index.by_uid.insert(Arc::clone(&pod.uid), Arc::clone(pod));
        if let Some(hash) = &pod.static_pod_hash {
            index.by_uid.insert(Arc::clone(hash), Arc::clone(pod));
        }
    }
    // Forget owners no local pod refers to any more; ask for the ones new pods name.
    let wanted: Vec<OwnerKey> = items
        .values()
        .filter_map(|pod| {
            let owner = pod.owner.as_ref()?;
            matches!(owner.kind, WorkloadKind::ReplicaSet | WorkloadKind::Job).then(|| OwnerKey {
                namespace: Arc::clone(&pod.namespace),
                kind: owner.kind.clone(),
                name: Arc::clone(&owner.name),
            })
        })
        .collect();
    {
        let wanted_set: HashSet<&OwnerKey> = wanted.iter().collect();
        let mut owners = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.retain(|key, _| wanted_set.contains(key));
    }
    for key in wanted {
        shared.request_owner(key);
    }
    *shared.pods.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
    shared.bump();
}

#[derive(PartialEq)]
struct ServiceMeta {
    namespace: Arc<str>,
    name: Arc<str>,
    cluster_ips: Vec<IpAddr>,
    external_name: Option<Arc<str>>,
}

/// A dual-stack field's values: the plural field (`clusterIPs`, `podCIDRs`) when the API
/// server filled it, else the older singular one.
fn plural_or_single<'a>(plural: Option<&'a Vec<String>>, single: Option<&'a str>) -> Vec<&'a str> {
    let mut values: Vec<&str> = plural.into_iter().flatten().map(String::as_str).collect();
    if values.is_empty()
        && let Some(value) = single
    {
        values.push(value);
    }
    values
}

fn project_service(service: &Service) -> Option<(String, ServiceMeta)> {
    let meta = &service.metadata;
    let uid = meta.uid.clone()?;
    let spec = service.spec.as_ref();
    let texts = plural_or_single(
        spec.and_then(|s| s.cluster_ips.as_ref()),
        spec.and_then(|s| s.cluster_ip.as_deref()),
    );
    // Headless Services say "None"; ExternalName ones have no cluster IP.
    let cluster_ips = texts.into_iter().filter_map(|t| t.parse().ok()).collect();
    Some((
        uid,
        ServiceMeta {
            namespace: Arc::from(meta.namespace.as_deref().unwrap_or("default")),
            name: Arc::from(meta.name.as_deref().unwrap_or("")),
            cluster_ips,
            external_name: spec
                .filter(|s| s.type_.as_deref() == Some("ExternalName"))
                .and_then(|s| s.external_name.as_deref())
                .map(|target| Arc::from(target.trim_end_matches('.').to_ascii_lowercase())),
        },
    ))
}

/// Updates the Service index in place. Readers hold a snapshot only for one lookup, so the
/// index is nearly always unshared here and `make_mut` copies nothing.
fn change_service(shared: &Shared, _: &str, old: Option<&ServiceMeta>, new: Option<&ServiceMeta>) {
    let mut services = shared.services.write().unwrap_or_else(|p| p.into_inner());
    let index = Arc::make_mut(&mut services);
    if let Some(old) = old {
        let key = (Arc::clone(&old.namespace), Arc::clone(&old.name));
        for ip in &old.cluster_ips {
            // Another Service may have taken the address meanwhile: leave its entry.
            if index
                .by_ip
                .get(ip)
                .is_some_and(|s| s.namespace == key.0 && s.name == key.1)
            {
                index.by_ip.remove(ip);
            }
        }
        index.external_names.remove(&key);
        index.names.remove(&key);
        if new.is_none() {
            shrink_after_deletes!(index.by_ip, index.names, index.external_names);
        }
    }
    if let Some(new) = new {
        let service_ref = ServiceRef {
            namespace: Arc::clone(&new.namespace),
            name: Arc::clone(&new.name),
        };
        for ip in &new.cluster_ips {
            index.by_ip.insert(*ip, service_ref.clone());
        }
        let key = (Arc::clone(&new.namespace), Arc::clone(&new.name));
        if let Some(target) = &new.external_name {
            index.external_names.insert(key.clone(), Arc::clone(target));
        }
        index.names.insert(key);
    }
    drop(services);
    // Service addresses stand for the Service networks only where the API has no ServiceCIDR.
    if shared
        .service_cidrs
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        shared.networks_changed();
    }
}

/// A Node as far as the agent reads it: its pod CIDRs and InternalIPs. Every Node status
/// update (conditions, the images list of tens of entries, capacity) arrives whole; decoding
/// into this type skips what is not read instead of building it, so a heartbeat costs a
/// parse, not the allocation of a full `Node`.
#[derive(Clone, Debug, Deserialize)]
struct NodeNetworks {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: NodeNetworkSpec,
    #[serde(default)]
    status: NodeNetworkStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeNetworkSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeNetworkStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Clone, Debug, Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// The API's Node resource, read as [`NodeNetworks`].
impl k8s_openapi::Resource for NodeNetworks {
    const API_VERSION: &'static str = Node::API_VERSION;
    const GROUP: &'static str = Node::GROUP;
    const KIND: &'static str = Node::KIND;
    const VERSION: &'static str = Node::VERSION;
    const URL_PATH_SEGMENT: &'static str = Node::URL_PATH_SEGMENT;
    type Scope = <Node as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for NodeNetworks {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn project_node(node: &NodeNetworks) -> Option<(String, Vec<IpNet>)> {
    let uid = node.metadata.uid.clone()?;
    let cidrs = plural_or_single(node.spec.pod_cidrs.as_ref(), node.spec.pod_cidr.as_deref());
    let mut nets: Vec<IpNet> = cidrs.into_iter().filter_map(|c| c.parse().ok()).collect();
    nets.extend(
        node.status
            .addresses
            .iter()
            .filter(|a| a.kind == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .map(IpNet::from),
    );
    Some((uid, nets))
}

/// A Node's or a ServiceCIDR's networks, by the object's key.
fn change_networks(map: &RwLock<HashMap<String, Vec<IpNet>>>, key: &str, new: Option<&Vec<IpNet>>) {
    let mut map = map.write().unwrap_or_else(|p| p.into_inner());
    match new {
        Some(nets) => map.insert(key.to_owned(), nets.clone()),
        None => map.remove(key),
    };
    shrink_after_deletes!(map);
}

fn change_node(shared: &Shared, key: &str, _: Option<&Vec<IpNet>>, new: Option<&Vec<IpNet>>) {
    change_networks(&shared.node_networks, key, new);
    shared.networks_changed();
}

fn project_service_cidr(cidr: &ServiceCIDR) -> Option<(String, Vec<IpNet>)> {
    let uid = cidr.metadata.uid.clone()?;
    let nets = cidr
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    Some((uid, nets))
}

fn change_service_cidr(
    shared: &Shared,
    key: &str,
    _: Option<&Vec<IpNet>>,
    new: Option<&Vec<IpNet>>,
) {
    change_networks(&shared.service_cidrs, key, new);
    shared.networks_changed();
}

/// Fetches owners' owners one at a time (a handful per node), retrying failures later.
async fn run_owner_fetcher(
    shared: Arc<Shared>,
    client: Client,
    mut queue: mpsc::Receiver<OwnerKey>,
) {
    while let Some(key) = queue.recv().await {
        let fetched = tokio::time::timeout(
            shared.config.owner_request_timeout,
            fetch_owner_parent(&client, &key),
        )
        .await;
        let entry = match fetched {
            Ok(Ok(parent)) => OwnerEntry::Resolved {
                parent,
                at: Instant::now(),
            },
            Ok(Err(error)) => {
                tracing::debug!(?key, %error, "owner lookup failed");
                OwnerEntry::Failed {
                    retry_at: Instant::now() + shared.config.owner_retry,
                }
            }
            Err(_) => OwnerEntry::Failed {
                retry_at: Instant::now() + shared.config.owner_retry,
            },
        };
        let retry = matches!(entry, OwnerEntry::Failed { .. });
        {
            let mut owners = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
            // Only owners some local pod still names are kept.
            if let Some(slot) = owners.get_mut(&key) {
                let keep_stale = retry && matches!(slot, OwnerEntry::Resolved { .. });
                if !keep_stale {
                    *slot = entry;
                }
            }
        }
        shared.bump();
        if retry {
            let shared = Arc::clone(&shared);
            let delay = shared.config.owner_retry;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let still_wanted = shared
                    .owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&key);
                if still_wanted {
                    shared.request_owner(key);
                }
            });
        }
    }
}

async fn fetch_owner_parent(
    client: &Client,
    key: &OwnerKey,
) -> Result<Option<WorkloadRef>, kube::Error> {
    let references = match key.kind {
        WorkloadKind::ReplicaSet => Api::<ReplicaSet>::namespaced(client.clone(), &key.namespace)
            .get_opt(&key.name)
            .await?
            .and_then(|rs| rs.metadata.owner_references),
        WorkloadKind::Job => Api::<Job>::namespaced(client.clone(), &key.namespace)
            .get_opt(&key.name)
            .await?
            .and_then(|job| job.metadata.owner_references),
        _ => None,
    };
    Ok(controller_of(references.as_deref()))
}

/// The kinds of API object observer reads, for [`project_api_json`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiObjectKind {
    Pod,
    Service,
    Node,
    ServiceCidr,
}

/// Decodes one API object from the JSON the API server sends and runs it through the same
/// projection the watches use. Returns whether the object was kept (an object without UID
/// is not). Exposed so that the decoding of what the API sends can be fuzzed as a whole.
pub fn project_api_json(kind: ApiObjectKind, json: &[u8]) -> Result<bool, serde_json::Error> {
    Ok(match kind {
        ApiObjectKind::Pod => project_pod(&serde_json::from_slice(json)?).is_some(),
        ApiObjectKind::Service => project_service(&serde_json::from_slice(json)?).is_some(),
        ApiObjectKind::Node => project_node(&serde_json::from_slice(json)?).is_some(),
        ApiObjectKind::ServiceCidr => {
            project_service_cidr(&serde_json::from_slice(json)?).is_some()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_map_to_watched_resources() {
        assert_eq!(Watched::of_path("/api/v1/pods"), Some(Watched::Pods));
        assert_eq!(
            Watched::of_path("/apis/networking.k8s.io/v1/servicecidrs"),
            Some(Watched::ServiceCidrs)
        );
        assert_eq!(
            Watched::of_path("/apis/apps/v1/namespaces/a/replicasets/x"),
            None
        );
        assert_eq!(
            Watched::of_path("/api/v1/namespaces/a/pods/pods"),
            Some(Watched::Pods)
        );
    }

    #[test]
    fn pod_projection_reads_real_shapes() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c8f6d-x2x7k",
                "namespace": "shop",
                "uid": "3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c",
                "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6d"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6d",
                    "uid": "8e2c1c3a-0000-4000-8000-000000000001",
                    "controller": true, "blockOwnerDeletion": true
                }]
            },
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "web:1"}]},
            "status": {
                "phase": "Running",
                "podIP": "198.18.1.7",
                "podIPs": [{"ip": "198.18.1.7"}],
                "containerStatuses": [{
                    "name": "app", "image": "web:1", "imageID": "sha256:00", "ready": true,
                    "restartCount": 0,
                    "containerID": "containerd://a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
                }, {
                    "name": "waiting", "image": "x", "imageID": "", "ready": false, "restartCount": 0
                }]
            }
        }))
        .unwrap();
        let (key, meta) = project_pod(&pod).unwrap();
        assert_eq!(key, "3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c");
        assert_eq!(&*meta.namespace, "shop");
        assert_eq!(meta.ips, ["198.18.1.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(meta.containers.len(), 1);
        assert_eq!(&*meta.containers[0].name, "app");
        assert_eq!(
            meta.owner,
            Some(WorkloadRef {
                kind: WorkloadKind::ReplicaSet,
                name: Arc::from("web-7d4b9c8f6d")
            })
        );
    }

    #[test]
    fn a_node_is_read_for_its_pod_cidrs_and_internal_ips_only() {
        let node = crate::kube_standin::objects::node("n1", "198.18.7.0/24", "198.18.0.7");
        let read: NodeNetworks = serde_json::from_value(node).unwrap();
        let (uid, nets) = project_node(&read).unwrap();
        assert_eq!(uid, "node-n1");
        let expected: Vec<IpNet> = vec![
            "198.18.7.0/24".parse().unwrap(),
            "198.18.0.7/32".parse().unwrap(),
        ];
        assert_eq!(nets, expected);
        // A Node without spec or status (a fresh registration) has no networks yet.
        let bare: NodeNetworks = serde_json::from_str(r#"{"metadata": {"uid": "u"}}"#).unwrap();
        assert_eq!(project_node(&bare).unwrap().1, Vec::<IpNet>::new());
    }

    #[test]
    fn non_controller_owner_is_not_the_workload() {
        let refs = [OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "x".into(),
            uid: "u".into(),
            controller: None,
            block_owner_deletion: None,
        }];
        assert_eq!(controller_of(Some(&refs)), None);
    }
}
