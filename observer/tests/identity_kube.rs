//! Identity from the Kubernetes API, driven through kube-rs's real client against a stand-in
//! API server that speaks the API's HTTP wire protocol: JSON lists with
//! `metadata.resourceVersion`, `?watch=true` streams of newline-delimited watch events,
//! `ERROR` events carrying a 410 Status, 404 Status bodies, and dropped connections.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use observer::{
    identity::{
        CgroupCache, CgroupCacheConfig, EnrichmentStatus, Identity, KubeIdentity, KubeWatchConfig,
        ResolvCache, ResolvCacheConfig, WorkloadKind,
    },
    scope::ScopeKey,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The stand-in API server.

#[derive(Default)]
struct ApiState {
    resource_version: u64,
    /// Collection path (`/api/v1/pods`) -> objects by uid.
    collections: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// `namespace/name` -> object, for the on-demand gets of owners.
    replicasets: BTreeMap<String, Value>,
    jobs: BTreeMap<String, Value>,
    service_cidr_api: bool,
    /// Open watch streams per collection, with the field selector they asked for.
    watchers: Vec<(&'static str, Option<String>, mpsc::UnboundedSender<Bytes>)>,
    /// Every request line received (`GET /api/v1/pods?...`).
    requests: Vec<String>,
    /// Collections answered with broken JSON (200 OK, cut mid-object), as a faulty proxy or
    /// API server might.
    garbage: Vec<&'static str>,
}

const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const NODES: &str = "/api/v1/nodes";
const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";

fn list_kind(collection: &str) -> (&'static str, &'static str) {
    match collection {
        PODS => ("v1", "PodList"),
        SERVICES => ("v1", "ServiceList"),
        NODES => ("v1", "NodeList"),
        _ => ("networking.k8s.io/v1", "ServiceCIDRList"),
    }
}

fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    match selector.and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(node) => object["spec"]["nodeName"] == node,
        None => true,
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

impl ApiState {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Stores an object (stamping a new resourceVersion) and tells the open watches.
    fn upsert(&mut self, collection: &'static str, mut object: Value, notify: bool) {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv);
        let uid = object["metadata"]["uid"].as_str().unwrap().to_owned();
        let existed = self
            .collections
            .entry(collection)
            .or_default()
            .insert(uid, object.clone())
            .is_some();
        if notify {
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            self.notify(collection, kind, &object);
        }
    }

    fn delete(&mut self, collection: &'static str, uid: &str, notify: bool) {
        let rv = self.next_rv();
        let Some(mut object) = self.collections.entry(collection).or_default().remove(uid) else {
            return;
        };
        object["metadata"]["resourceVersion"] = json!(rv);
        if notify {
            self.notify(collection, "DELETED", &object);
        }
    }

    fn notify(&mut self, collection: &'static str, kind: &str, object: &Value) {
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
        self.watchers.retain(|(c, selector, tx)| {
            if *c != collection || !matches_selector(object, selector.as_deref()) {
                return !tx.is_closed();
            }
            tx.send(line.clone()).is_ok()
        });
    }

    /// Ends every open watch of `collection` with an ERROR event carrying 410 Gone, as the
    /// API server does when the watch's resourceVersion fell out of its window.
    fn expire_watches(&mut self, collection: &'static str) {
        let gone = status_body(410, "Expired", "too old resource version: 12 (4711)");
        let line = Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": gone})));
        self.watchers.retain(|(c, _, tx)| {
            if *c == collection {
                let _ = tx.send(line.clone());
                false // dropping the sender ends the stream after the event
            } else {
                true
            }
        });
    }

    /// Sends a line that is not JSON to every open watch of `collection`, then ends them.
    fn garbage_to_watches(&mut self, collection: &'static str) {
        let line =
            Bytes::from_static(b"{\"type\": \"ADDED\", \"object\": {\"metadata\": \x00\xff]]\n");
        self.watchers.retain(|(c, _, tx)| {
            if *c == collection {
                let _ = tx.send(line.clone());
                false
            } else {
                true
            }
        });
    }

    fn requests_to(&self, collection: &str) -> Vec<String> {
        self.requests
            .iter()
            .filter(|r| r.split(['?', ' ']).nth(1) == Some(collection))
            .cloned()
            .collect()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn handle(
    state: &Arc<Mutex<ApiState>>,
    request: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    let mut api = state.lock().unwrap();
    let path = request.uri().path().to_owned();
    api.requests
        .push(format!("{} {}", request.method(), request.uri()));
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<BTreeMap<String, String>>()
        })
        .unwrap_or_default();
    let collection = [PODS, SERVICES, NODES, SERVICE_CIDRS]
        .into_iter()
        .find(|c| *c == path);
    if let Some(collection) = collection {
        if collection == SERVICE_CIDRS && !api.service_cidr_api {
            return json_response(
                StatusCode::NOT_FOUND,
                &status_body(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        let selector = query.get("fieldSelector").cloned();
        if query.get("watch").map(String::as_str) == Some("true") {
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            api.watchers.push((collection, selector, tx));
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                let line = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(line)), rx))
            });
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
        }
        if api.garbage.contains(&collection) {
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(
                    Full::new(Bytes::from_static(
                        b"{\"apiVersion\": \"v1\", \"items\": [{\"metadata\": ",
                    ))
                    .boxed(),
                )
                .unwrap();
        }
        let (api_version, kind) = list_kind(collection);
        let items: Vec<Value> = api
            .collections
            .get(collection)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches_selector(o, selector.as_deref()))
            .cloned()
            .collect();
        let list = json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": api.resource_version.to_string()},
            "items": items
        });
        return json_response(StatusCode::OK, &list);
    }
    // Owner gets: /apis/apps/v1/namespaces/<ns>/replicasets/<name>, .../batch/v1/.../jobs/<name>
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["apis", group, "v1", "namespaces", ns, resource, name] = parts.as_slice() {
        let key = format!("{ns}/{name}");
        let found = match (*group, *resource) {
            ("apps", "replicasets") => api.replicasets.get(&key),
            ("batch", "jobs") => api.jobs.get(&key),
            _ => None,
        };
        return match found {
            Some(object) => json_response(StatusCode::OK, object),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status_body(404, "NotFound", &format!("{resource} \"{name}\" not found")),
            ),
        };
    }
    json_response(
        StatusCode::NOT_FOUND,
        &status_body(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    )
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len() + 1
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running stand-in. Stopping it closes the listener and every open connection (the
/// client sees its watches drop); it can start again on the same port with the same state.
struct StandIn {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
    connections: Option<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    async fn start(state: Arc<Mutex<ApiState>>, addr: SocketAddr) -> StandIn {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind stand-in API server");
        let addr = listener.local_addr().unwrap();
        let serving = Arc::clone(&state);
        let connections = tokio::spawn(async move {
            let mut open = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&serving);
                open.spawn(async move {
                    let service = service_fn(move |request| {
                        let response = handle(&state, &request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // `open` is dropped with this task: aborting it aborts every connection.
        });
        StandIn {
            state,
            addr,
            connections: Some(connections),
        }
    }

    fn stop(&mut self) {
        if let Some(task) = self.connections.take() {
            task.abort();
        }
        // Open watch senders would otherwise keep streams alive in the state.
        self.state.lock().unwrap().watchers.clear();
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Objects in the shapes the API server returns.

fn pod(
    name: &str,
    namespace: &str,
    uid: &str,
    node: &str,
    ip: &str,
    owner: Option<(&str, &str, &str)>,
    containers: &[(&str, &str)],
) -> Value {
    let owner_refs: Vec<Value> = owner
        .into_iter()
        .map(|(api_version, kind, owner_name)| {
            json!({
                "apiVersion": api_version, "kind": kind, "name": owner_name,
                "uid": format!("{owner_name}-uid"), "controller": true, "blockOwnerDeletion": true
            })
        })
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(cname, cid)| {
            json!({
                "name": cname, "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.example/{cname}:1.4.2"),
                "imageID": format!("registry.example/{cname}@sha256:9b1c0e8f4a5d"),
                "containerID": format!("containerd://{cid}"),
                "state": {"running": {"startedAt": "2025-06-01T10:00:03Z"}}
            })
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(
            |(cname, _)| json!({"name": cname, "image": format!("registry.example/{cname}:1.4.2")}),
        )
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid,
            "creationTimestamp": "2025-06-01T10:00:00Z",
            "labels": {"app": name.split('-').next().unwrap()},
            "ownerReferences": owner_refs
        },
        "spec": {
            "nodeName": node, "containers": specs, "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default"
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable", "hostIP": "198.18.0.2",
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": "2025-06-01T10:00:00Z",
            "containerStatuses": statuses
        }
    })
}

fn owned(kind: &str, api_version: &str, name: &str, namespace: &str, owner: (&str, &str)) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("{name}-uid"),
            "resourceVersion": "7",
            "ownerReferences": [{
                "apiVersion": if owner.0 == "Deployment" { "apps/v1" } else { "batch/v1" },
                "kind": owner.0, "name": owner.1, "uid": format!("{}-uid", owner.1),
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {}
    })
}

fn service(name: &str, namespace: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{namespace}-{name}")},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name}, "sessionAffinity": "None"
        },
        "status": {"loadBalancer": {}}
    })
}

fn node(name: &str, pod_cidr: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("node-{name}"), "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        }
    })
}

fn service_cidr(cidr: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes", "uid": "servicecidr-kubernetes"},
        "spec": {"cidrs": [cidr]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "",
                                   "lastTransitionTime": "2025-06-01T09:00:00Z"}]}
    })
}

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
    let mut api = ApiState {
        service_cidr_api,
        ..ApiState::default()
    };
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
    let api = state.lock().unwrap();
    api.watchers
        .iter()
        .any(|(c, _, tx)| *c == collection && !tx.is_closed())
        .then_some(())
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
    let server = StandIn::start(Arc::clone(&state), localhost()).await;
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
    let server = StandIn::start(Arc::clone(&state), localhost()).await;
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
    let mut server = StandIn::start(Arc::clone(&state), localhost()).await;
    let addr = server.addr;
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
    let _server = StandIn::start(Arc::clone(&state), addr).await;
    eventually("ready again", || {
        (identity.status() == EnrichmentStatus::Ready).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_without_service_cidr_is_not_an_error() {
    let state = cluster_state(false);
    let server = StandIn::start(Arc::clone(&state), localhost()).await;
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
    let server = StandIn::start(Arc::clone(&state), localhost()).await;
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
    let server = StandIn::start(Arc::clone(&state), localhost()).await;
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
