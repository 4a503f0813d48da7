//! Identity from the Kubernetes API, driven through kube-rs's real client against the
//! stand-in API server (`observer::kube_standin`), which speaks the API's HTTP wire protocol:
//! paginated JSON lists, `?watch=true` streams of newline-delimited watch events resumed from
//! a resourceVersion, `ERROR` events carrying a 410 Status, 404 Status bodies, and dropped
//! connections.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use observer::{
    identity::{
        CgroupCache, CgroupCacheConfig, EnrichmentStatus, Identity, KubeIdentity, KubeWatchConfig,
        ResolvCache, ResolvCacheConfig, WorkloadKind,
    },
    kube_standin::{
        ApiState, BOOKMARK_EVERY, NODES, PODS, SERVICE_CIDRS, SERVICES, StandIn,
        cluster::{ChurnRates, ClusterShape, SimulatedCluster},
        objects::{node, owned, pod, service, service_cidr},
    },
    scope::ScopeKey,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(20);

const WEB_UID: &str = "3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c";
const JOB_UID: &str = "51c0a9e2-7b3d-4c1e-9f2a-6d8e0b4c2a17";
const OTHER_NODE_UID: &str = "0e9d8c7b-6a5f-4e3d-8c2b-1a0f9e8d7c6b";
const LATE_UID: &str = "7a7a7a7a-1b1b-4c2c-8d3d-4e4e4e4e4e4e";
const WEB_CID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const SIDECAR_CID: &str = "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
const JOB_CID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const LATE_CID: &str = "d00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00dd00d";

/// A bare pod (no owner) that arrives after the first list.
fn late_pod() -> Value {
    pod(
        "solo",
        "shop",
        LATE_UID,
        NODE,
        "198.18.1.11",
        None,
        &[("solo", LATE_CID)],
    )
}

fn cluster_state(service_cidr_api: bool) -> Arc<Mutex<ApiState>> {
    let mut api = ApiState::new();
    api.service_cidr_api = service_cidr_api;
    api.upsert(
        PODS,
        pod(
            "web-7d4b9c8f6d-x2x7k",
            "shop",
            WEB_UID,
            NODE,
            "198.18.1.7",
            Some(("apps/v1", "ReplicaSet", "web-7d4b9c8f6d")),
            &[("app", WEB_CID), ("proxy", SIDECAR_CID)],
        ),
        false,
    );
    api.upsert(
        PODS,
        pod(
            "report-28391520-q8w2z",
            "batch",
            JOB_UID,
            NODE,
            "198.18.1.9",
            Some(("batch/v1", "Job", "report-28391520")),
            &[("report", JOB_CID)],
        ),
        false,
    );
    api.upsert(
        PODS,
        pod(
            "web-7d4b9c8f6d-zzzzz",
            "shop",
            OTHER_NODE_UID,
            "node-b",
            "198.18.2.7",
            Some(("apps/v1", "ReplicaSet", "web-7d4b9c8f6d")),
            &[("app", LATE_CID)],
        ),
        false,
    );
    api.replicasets.insert(
        "shop/web-7d4b9c8f6d".into(),
        owned(
            "ReplicaSet",
            "apps/v1",
            "web-7d4b9c8f6d",
            "shop",
            ("Deployment", "web"),
        ),
    );
    api.jobs.insert(
        "batch/report-28391520".into(),
        owned(
            "Job",
            "batch/v1",
            "report-28391520",
            "batch",
            ("CronJob", "report"),
        ),
    );
    api.upsert(
        SERVICES,
        service("kubernetes", "default", "198.18.128.1"),
        false,
    );
    api.upsert(SERVICES, service("web", "shop", "198.18.128.20"), false);
    api.upsert(
        SERVICES,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ledger", "namespace": "shop", "uid": "svc-shop-ledger"},
            "spec": {"type": "ExternalName", "externalName": "Pg.Vendor.example."}
        }),
        false,
    );
    api.upsert(NODES, node(NODE, "198.18.1.0/24", "198.18.0.2"), false);
    api.upsert(NODES, node("node-b", "198.18.2.0/24", "198.18.0.3"), false);
    if service_cidr_api {
        api.upsert(SERVICE_CIDRS, service_cidr("198.18.128.0/20"), false);
    }
    Arc::new(Mutex::new(api))
}

// ---------------------------------------------------------------------------------------------
// The node side: a directory tree shaped like the kubelet's cgroups stands in for the cgroup2
// mount (the cache only reads directory names and inode numbers; identity_cgroup.rs covers the
// real hierarchy).

struct FakeCgroupRoot(PathBuf);

impl FakeCgroupRoot {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "observer-kube-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        FakeCgroupRoot(root)
    }

    fn container(&self, uid: &str, cid: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let path = self.0.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::metadata(&path).unwrap().ino()
    }
}

impl Drop for FakeCgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn identity_against(server: &StandIn, cgroups: &FakeCgroupRoot) -> Identity {
    let config = kube::Config::new(server.url().parse().unwrap());
    let kube = KubeIdentity::start(config, KubeWatchConfig::new(NODE)).expect("kube client");
    Identity::with_kube(
        CgroupCache::new(&cgroups.0, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
        Some(kube),
    )
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the agent holds a watch of `collection` open on the stand-in.
fn watching(state: &Mutex<ApiState>, collection: &str) -> Option<()> {
    state.lock().unwrap().is_watching(collection).then_some(())
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Whether any of `networks` holds the address `ip`.
fn contains(networks: &[ipnet::IpNet], ip: &str) -> bool {
    let ip: IpAddr = ip.parse().unwrap();
    networks.iter().any(|n| n.contains(&ip))
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_this_node_resolve_to_workloads_and_deleted_pods_disappear() {
    let state = cluster_state(true);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("pods");
    let web_cgroup = cgroups.container(WEB_UID, WEB_CID);
    let sidecar_cgroup = cgroups.container(WEB_UID, SIDECAR_CID);
    let job_cgroup = cgroups.container(JOB_UID, JOB_CID);
    let identity = identity_against(&server, &cgroups);

    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;

    // ReplicaSet -> Deployment, fetched on demand.
    let web = eventually("web's deployment", || {
        let id = identity.resolve(web_cgroup, None);
        (id.workload.as_ref()?.kind == WorkloadKind::Deployment).then_some(id)
    })
    .await;
    assert_eq!(web.scope, ScopeKey::Pod(Arc::from(WEB_UID)));
    let meta = web.pod.as_ref().unwrap();
    assert_eq!(
        (&*meta.namespace, &*meta.name),
        ("shop", "web-7d4b9c8f6d-x2x7k")
    );
    assert_eq!(meta.node.as_deref(), Some(NODE));
    assert_eq!(meta.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(meta.ips, ["198.18.1.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(&*web.workload.as_ref().unwrap().name, "web");
    assert_eq!(web.container_name.as_deref(), Some("app"));
    assert_eq!(
        identity
            .resolve(sidecar_cgroup, None)
            .container_name
            .as_deref(),
        Some("proxy")
    );

    // Job -> CronJob likewise.
    let job = eventually("the job's cronjob", || {
        let id = identity.resolve(job_cgroup, None);
        (id.workload.as_ref()?.kind == WorkloadKind::CronJob).then_some(id)
    })
    .await;
    assert_eq!(&*job.workload.as_ref().unwrap().name, "report");

    // Only this node's pods: the selector is on both the list and the watch requests.
    let kube = identity.kube().unwrap();
    assert!(kube.pod_by_uid(OTHER_NODE_UID).is_none());
    let pod_requests = state.lock().unwrap().requests_to(PODS);
    assert!(
        pod_requests.iter().any(|r| !r.contains("watch=true")),
        "{pod_requests:?}"
    );
    assert!(
        pod_requests.iter().any(|r| r.contains("watch=true")),
        "{pod_requests:?}"
    );
    for request in &pod_requests {
        assert!(
            request.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "pod request without the node selector: {request}"
        );
    }

    // Services and cluster networks.
    let svc = identity
        .service_for_ip("198.18.128.20".parse().unwrap())
        .unwrap();
    assert_eq!((&*svc.namespace, &*svc.name), ("shop", "web"));
    assert_eq!(
        identity.service_for_ip("203.0.113.10".parse().unwrap()),
        None
    );
    assert_eq!(identity.service_exists("shop", "web"), Some(true));
    assert_eq!(identity.service_exists("shop", "db"), Some(false));
    // An ExternalName Service declares its target (lower case, no trailing dot); a Service
    // with a cluster IP declares none.
    assert_eq!(
        identity.external_name("shop", "ledger").as_deref(),
        Some("pg.vendor.example")
    );
    assert_eq!(identity.external_name("shop", "web"), None);
    assert_eq!(identity.external_name("shop", "db"), None);
    let networks = identity.cluster_networks();
    for expected in [
        "198.18.1.0/24",
        "198.18.2.0/24",
        "198.18.128.0/20",
        "198.18.0.2/32",
    ] {
        let net: ipnet::IpNet = expected.parse().unwrap();
        assert!(
            networks.iter().any(|n| n.contains(&net)),
            "{expected} not in {networks:?}"
        );
    }
    assert!(!contains(&networks, "203.0.113.10"), "{networks:?}");

    // A DELETED event removes the pod; node identity still answers for its cgroup.
    state.lock().unwrap().delete(PODS, WEB_UID, true);
    eventually("web pod gone", || {
        kube.pod_by_uid(WEB_UID).is_none().then_some(())
    })
    .await;
    let after = identity.resolve(web_cgroup, None);
    assert_eq!(after.scope, ScopeKey::Pod(Arc::from(WEB_UID)));
    assert_eq!(after.container_id().unwrap().as_str(), WEB_CID);
    assert!(after.pod.is_none());

    // An ADDED event brings a new pod in.
    let late_cgroup = cgroups.container(LATE_UID, LATE_CID);
    state.lock().unwrap().upsert(PODS, late_pod(), true);
    let late = eventually("new pod", || {
        let id = identity.resolve(late_cgroup, None);
        id.pod.is_some().then_some(id)
    })
    .await;
    let workload = late.workload.clone().unwrap();
    assert_eq!(
        (workload.kind, &*workload.name),
        (WorkloadKind::Pod, "solo")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_watch_error_rebuilds_the_store_from_a_relist() {
    let state = cluster_state(true);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("gone");
    let identity = identity_against(&server, &cgroups);
    let kube = identity.kube().unwrap().clone();
    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
    assert!(kube.pod_by_uid(WEB_UID).is_some());
    let lists_before = list_requests(&state);

    // While the watch is "desynced", the cluster changes without the watch hearing of it,
    // then the server expires the watch with 410 Gone.
    {
        let mut api = state.lock().unwrap();
        api.delete(PODS, WEB_UID, false);
        api.upsert(PODS, late_pod(), false);
        api.expire_watches(PODS);
    }
    eventually("relisted store", || {
        (kube.pod_by_uid(LATE_UID).is_some() && kube.pod_by_uid(WEB_UID).is_none()).then_some(())
    })
    .await;
    assert!(
        list_requests(&state) > lists_before,
        "the store changed without a new list request"
    );
    eventually("ready after relist", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
}

fn list_requests(state: &Arc<Mutex<ApiState>>) -> usize {
    state
        .lock()
        .unwrap()
        .requests_to(PODS)
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_degrades_without_stopping_lookups_and_recovers() {
    let state = cluster_state(true);
    let mut server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let addr = server.addr();
    let cgroups = FakeCgroupRoot::new("outage");
    let web_cgroup = cgroups.container(WEB_UID, WEB_CID);
    let identity = identity_against(&server, &cgroups);
    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;

    server.stop();
    let degraded = eventually("degraded", || match identity.status() {
        EnrichmentStatus::Degraded { since, last_error } => Some((since, last_error)),
        _ => None,
    })
    .await;
    assert!(!degraded.1.is_empty());

    // Lookups keep answering, at once, from node identity (and what was last known).
    let started = Instant::now();
    let unknown_cgroup = cgroups.container(LATE_UID, LATE_CID);
    std::thread::sleep(Duration::from_millis(1100)); // past the cgroup rescan interval
    let resolved = identity.resolve(unknown_cgroup, None);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(resolved.scope, ScopeKey::Pod(Arc::from(LATE_UID)));
    assert_eq!(resolved.container_id().unwrap().as_str(), LATE_CID);
    assert!(resolved.pod.is_none());
    assert_eq!(
        identity.resolve(web_cgroup, None).scope,
        ScopeKey::Pod(Arc::from(WEB_UID))
    );

    // The server comes back on the same address with the same state: the watches resume
    // and the status returns to Ready without any object changing.
    let _server = StandIn::start(Arc::clone(&state), addr, BOOKMARK_EVERY)
        .await
        .unwrap();
    eventually("ready again", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_without_service_cidr_is_not_an_error() {
    let state = cluster_state(false);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("nocidr");
    let identity = identity_against(&server, &cgroups);
    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
    assert!(
        !state.lock().unwrap().requests_to(SERVICE_CIDRS).is_empty(),
        "ServiceCIDR was never asked for"
    );
    // Service networks come from the cluster IPs instead.
    let networks = identity.cluster_networks();
    assert!(contains(&networks, "198.18.128.20"), "{networks:?}");
    assert!(!contains(&networks, "198.18.130.1"), "{networks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_api_degrades_without_stopping_lookups_and_recovers() {
    // Lists of Pods come back cut mid-object (200 OK) from the start.
    let state = cluster_state(true);
    state.lock().unwrap().garbage.push(PODS);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("garbage");
    let web_cgroup = cgroups.container(WEB_UID, WEB_CID);
    let identity = identity_against(&server, &cgroups);
    let kube = identity.kube().unwrap().clone();
    let (_, last_error) = eventually("degraded by a broken list", || match identity.status() {
        EnrichmentStatus::Degraded { since, last_error } => Some((since, last_error)),
        _ => None,
    })
    .await;
    assert!(!last_error.is_empty());
    // Lookups answer at once from the node: pod UID and container id, no names.
    let started = Instant::now();
    let web = identity.resolve(web_cgroup, None);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(web.scope, ScopeKey::Pod(Arc::from(WEB_UID)));
    assert!(web.pod.is_none());

    // The API answers properly: the watcher's own retries fill the store.
    state.lock().unwrap().garbage.clear();
    eventually("pods listed", || kube.pod_by_uid(WEB_UID).map(|_| ())).await;
    eventually("ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;

    // A watch stream carries a line that is not JSON, and ends. Ready comes from the list:
    // the watch that follows it must be open before it can carry anything.
    eventually("watching pods", || watching(&state, PODS)).await;
    state.lock().unwrap().garbage_to_watches(PODS);
    eventually("degraded by a broken watch event", || {
        matches!(identity.status(), EnrichmentStatus::Degraded { .. }).then_some(())
    })
    .await;
    let web = identity.resolve(web_cgroup, None);
    assert_eq!(
        web.pod.as_ref().map(|p| &*p.name),
        Some("web-7d4b9c8f6d-x2x7k"),
        "what was known is kept"
    );
    // The watch comes back by itself and hears of new pods again.
    eventually("watching again", || watching(&state, PODS)).await;
    state.lock().unwrap().upsert(PODS, late_pod(), true);
    eventually("new pod seen", || kube.pod_by_uid(LATE_UID).map(|_| ())).await;
    eventually("ready again", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
}

/// The cluster-wide watches apply each change to the indexes it touches: a Service deleted
/// and recreated under another address moves, a Node's new pod CIDR joins the cluster
/// networks and a deleted Node's leaves them, and a relist after 410 Gone applies what
/// changed while the watch was broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_nodes_change_one_object_at_a_time() {
    // Without ServiceCIDRs, so that Service addresses stand for the Service networks too.
    let state = cluster_state(false);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("changes");
    let identity = identity_against(&server, &cgroups);
    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
    eventually("the Service watch open", || watching(&state, SERVICES)).await;
    eventually("the Node watch open", || watching(&state, NODES)).await;
    let web_svc = |ip: &str| {
        identity
            .service_for_ip(ip.parse().unwrap())
            .is_some_and(|s| (&*s.namespace, &*s.name) == ("shop", "web"))
    };
    assert!(web_svc("198.18.128.20"));

    // Deleted, then recreated (a new UID) at another address.
    state.lock().unwrap().delete(SERVICES, "svc-shop-web", true);
    eventually("web's Service gone", || {
        (identity
            .service_for_ip("198.18.128.20".parse().unwrap())
            .is_none()
            && identity.service_exists("shop", "web") == Some(false))
        .then_some(())
    })
    .await;
    assert!(!contains(&identity.cluster_networks(), "198.18.128.20"));
    // The other Services are untouched.
    assert_eq!(identity.service_exists("default", "kubernetes"), Some(true));
    assert!(
        identity
            .service_for_ip("198.18.128.1".parse().unwrap())
            .is_some()
    );
    let mut recreated = service("web", "shop", "198.18.128.30");
    recreated["metadata"]["uid"] = json!("svc-shop-web-2");
    state.lock().unwrap().upsert(SERVICES, recreated, true);
    eventually("web's Service at its new address", || {
        web_svc("198.18.128.30").then_some(())
    })
    .await;
    assert_eq!(identity.service_exists("shop", "web"), Some(true));
    let networks = identity.cluster_networks();
    assert!(contains(&networks, "198.18.128.30"), "{networks:?}");
    assert!(!contains(&networks, "198.18.128.20"), "{networks:?}");

    // A Node's status heartbeat leaves its networks as they were; a new pod CIDR joins them.
    {
        let mut api = state.lock().unwrap();
        let mut heartbeat = node("node-b", "198.18.2.0/24", "198.18.0.3");
        heartbeat["status"]["conditions"][0]["reason"] = json!("KubeletReadyAgain");
        api.upsert(NODES, heartbeat, true);
        api.upsert(NODES, node("node-c", "198.18.3.0/24", "198.18.0.4"), true);
    }
    eventually("node-c's pod CIDR", || {
        contains(&identity.cluster_networks(), "198.18.3.9").then_some(())
    })
    .await;
    assert!(contains(&identity.cluster_networks(), "198.18.2.9"));
    state.lock().unwrap().delete(NODES, "node-node-b", true);
    eventually("node-b's networks gone", || {
        let networks = identity.cluster_networks();
        (!contains(&networks, "198.18.2.9") && !contains(&networks, "198.18.0.3")).then_some(())
    })
    .await;
    assert!(contains(&identity.cluster_networks(), "198.18.1.9"));

    // While the watch is broken the Service moves back and another appears; a relist applies both.
    {
        let mut api = state.lock().unwrap();
        api.delete(SERVICES, "svc-shop-web-2", false);
        api.upsert(SERVICES, service("web", "shop", "198.18.128.20"), false);
        api.upsert(SERVICES, service("db", "shop", "198.18.128.40"), false);
        api.expire_watches(SERVICES);
    }
    eventually("the relisted Services", || {
        (web_svc("198.18.128.20")
            && identity
                .service_for_ip("198.18.128.30".parse().unwrap())
                .is_none()
            && identity.service_exists("shop", "db") == Some(true))
        .then_some(())
    })
    .await;
    let networks = identity.cluster_networks();
    assert!(contains(&networks, "198.18.128.40"), "{networks:?}");
    assert!(!contains(&networks, "198.18.128.30"), "{networks:?}");
}

/// Whether the agent's indexes hold exactly what the API server holds: this node's pods,
/// every Service by name and by cluster IP, ExternalName targets, every Node's networks.
fn agrees_with_the_api(identity: &Identity, state: &Mutex<ApiState>) -> Result<(), String> {
    let kube = identity.kube().unwrap();
    let api = state.lock().unwrap();
    let pods: Vec<Value> = api
        .objects(PODS)
        .into_iter()
        .filter(|p| p["spec"]["nodeName"] == NODE)
        .collect();
    for pod in &pods {
        let uid = pod["metadata"]["uid"].as_str().unwrap();
        if kube.pod_by_uid(uid).is_none() {
            return Err(format!("pod {uid} missing"));
        }
    }
    if kube.pods().len() != pods.len() {
        return Err(format!(
            "{} pods, the API has {}",
            kube.pods().len(),
            pods.len()
        ));
    }
    let services = api.objects(SERVICES);
    let mut addresses = 0;
    for svc in &services {
        let (ns, name) = (
            svc["metadata"]["namespace"].as_str().unwrap(),
            svc["metadata"]["name"].as_str().unwrap(),
        );
        if identity.service_exists(ns, name) != Some(true) {
            return Err(format!("Service {ns}/{name} missing"));
        }
        if let Some(ip) = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
        {
            addresses += 1;
            let found = identity.service_for_ip(ip);
            if found.as_ref().map(|s| (&*s.namespace, &*s.name)) != Some((ns, name)) {
                return Err(format!("{ip} gives {found:?}, not {ns}/{name}"));
            }
        }
        if let Some(target) = svc["spec"]["externalName"].as_str()
            && identity.external_name(ns, name).as_deref() != Some(target)
        {
            return Err(format!("{ns}/{name} has no ExternalName {target}"));
        }
    }
    let sizes = kube.index_sizes();
    if sizes.service_names.0 != services.len() || sizes.service_addresses.0 != addresses {
        return Err(format!(
            "{sizes:?} for {} Services with {addresses} addresses",
            services.len()
        ));
    }
    if sizes.node_networks.0 != api.len(NODES) {
        return Err(format!("{sizes:?} for {} Nodes", api.len(NODES)));
    }
    Ok(())
}

async fn wait_agreement(identity: &Identity, state: &Mutex<ApiState>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match agrees_with_the_api(identity, state) {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => {
                panic!("the agent never agreed with the API within {WAIT:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A cluster larger than one list page (kube-rs asks for 500 at a time) churns; midway the
/// API server compacts its history, so every watch ends with 410 Expired and must list
/// again. Every change made before, during and after the relist ends up in the indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_expired_mid_churn_resumes_without_a_gap() {
    let shape = ClusterShape {
        nodes: 10,
        pods: 300,
        pods_on_agent_node: 30,
        services: 700,
    };
    let mut api = ApiState::new();
    let mut cluster = SimulatedCluster::populate(&mut api, shape, NODE);
    let state = Arc::new(Mutex::new(api));
    let server = StandIn::start(Arc::clone(&state), localhost(), Duration::from_millis(200))
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("churn");
    let identity = identity_against(&server, &cgroups);
    wait_agreement(&identity, &state).await;
    let paged = state.lock().unwrap().requests_to(SERVICES);
    assert!(
        paged.iter().any(|r| r.contains("continue=")),
        "the Service list was not paginated: {paged:?}"
    );
    for collection in [PODS, SERVICES, NODES] {
        eventually("the watches open", || watching(&state, collection)).await;
    }
    let lists_before = list_requests(&state);

    // Bookmarks (every 200 ms here) keep the watch as it is: no new watch request, no error.
    let watch_requests = |collection| {
        let api = state.lock().unwrap();
        let requests = api.requests_to(collection);
        requests.iter().filter(|r| r.contains("watch=true")).count()
    };
    let watches_before = watch_requests(SERVICES);
    for _ in 0..2 {
        let sent = state.lock().unwrap().bytes_sent(SERVICES);
        eventually("a bookmark sent", || {
            (state.lock().unwrap().bytes_sent(SERVICES) > sent).then_some(())
        })
        .await;
    }
    assert_eq!(watch_requests(SERVICES), watches_before);
    assert_eq!(identity.status(), EnrichmentStatus::Ready);

    let rates = ChurnRates {
        pod_changes: 400.0,
        service_changes: 200.0,
        node_status_updates: 20.0,
    };
    for step in 0..40 {
        cluster.churn(&mut state.lock().unwrap(), rates, 0.05);
        if step == 20 {
            state.lock().unwrap().compact();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_agreement(&identity, &state).await;
    assert!(
        list_requests(&state) > lists_before,
        "the pods were not listed again after 410"
    );
    assert!(cluster.changes.services >= 400, "{:?}", cluster.changes);
}

/// After most Services are deleted at once (a namespace removed), the indexes give back the
/// room they took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_return_to_their_bound_after_a_mass_delete() {
    let state = cluster_state(false);
    let many = 3_000;
    {
        let mut api = state.lock().unwrap();
        for i in 0..many {
            let ip = format!("198.19.{}.{}", i / 250, i % 250 + 1);
            api.upsert(SERVICES, service(&format!("s{i}"), "gone", &ip), false);
        }
    }
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("massdelete");
    let identity = identity_against(&server, &cgroups);
    let kube = identity.kube().unwrap().clone();
    let full = eventually("every Service indexed", || {
        let sizes = kube.index_sizes();
        (sizes.service_names.0 >= many).then_some(sizes)
    })
    .await;
    assert!(full.service_addresses.1 >= many, "{full:?}");
    eventually("the Service watch open", || watching(&state, SERVICES)).await;

    {
        let mut api = state.lock().unwrap();
        for i in 0..many {
            api.delete(SERVICES, &format!("svc-gone-s{i}"), true);
        }
    }
    let after = eventually("the namespace's Services gone", || {
        let sizes = kube.index_sizes();
        (sizes.service_names.0 == 3).then_some(sizes)
    })
    .await;
    // The three Services of `cluster_state` are left; a table shrinks once it is more than
    // four times too large and above 64 entries.
    for (len, capacity) in [after.service_addresses, after.service_names] {
        assert!(capacity <= 64, "{after:?} after deleting {many}");
        assert!(len <= 3, "{after:?}");
    }
    assert!(
        identity
            .service_for_ip("198.19.0.1".parse().unwrap())
            .is_none()
    );
    assert_eq!(identity.service_exists("shop", "web"), Some(true));
}

/// A pod whose first packets come before the API server has it: node identity answers at
/// once (its UID and container, no names), and the names follow when the pod arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_known_to_the_api_after_its_first_packets_gets_its_identity() {
    let state = cluster_state(true);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let cgroups = FakeCgroupRoot::new("latepod");
    let late_cgroup = cgroups.container(LATE_UID, LATE_CID);
    let identity = identity_against(&server, &cgroups);
    eventually("enrichment ready", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
    eventually("the Pod watch open", || watching(&state, PODS)).await;
    let first = identity.resolve(late_cgroup, None);
    assert_eq!(first.scope, ScopeKey::Pod(Arc::from(LATE_UID)));
    assert_eq!(first.container_id().unwrap().as_str(), LATE_CID);
    assert!(first.pod.is_none(), "{first:?}");

    state.lock().unwrap().upsert(PODS, late_pod(), true);
    let later = eventually("the pod's names", || {
        let id = identity.resolve(late_cgroup, None);
        id.pod.is_some().then_some(id)
    })
    .await;
    assert_eq!(later.scope, first.scope);
    assert_eq!(&*later.pod.as_ref().unwrap().name, "solo");
    assert_eq!(later.container_name.as_deref(), Some("solo"));
}

/// With the cluster networks given (`--cluster-cidr`), Nodes are not watched at all: no
/// request for them, and enrichment is ready without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_not_watched_when_the_cluster_networks_are_given() {
    let state = cluster_state(true);
    let server = StandIn::start(Arc::clone(&state), localhost(), BOOKMARK_EVERY)
        .await
        .unwrap();
    let config = kube::Config::new(server.url().parse().unwrap());
    let watch = KubeWatchConfig {
        watch_nodes: false,
        ..KubeWatchConfig::new(NODE)
    };
    let kube = KubeIdentity::start(config, watch).expect("kube client");
    eventually("enrichment ready", || {
        (kube.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
    assert!(
        kube.service_for_ip("198.18.128.20".parse().unwrap())
            .is_some()
    );
    assert!(
        state.lock().unwrap().requests_to(NODES).is_empty(),
        "Nodes were asked for"
    );
    assert_eq!(kube.index_sizes().node_networks.0, 0);
}
