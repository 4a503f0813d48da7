//! A stand-in Kubernetes API server, for the tests and the benchmark: no real API server can
//! run where they run, so this one speaks the API server's real HTTP wire protocol for what
//! the agent asks of it, and kube-rs's own client talks to it unchanged:
//!
//! - lists as JSON with `metadata.resourceVersion`, paginated by `limit` and `continue` (an
//!   expired continue token answers 410 Gone, as after etcd compaction);
//! - `?watch=true` streams of newline-delimited watch events, resumed from the
//!   `resourceVersion` the client asks for out of a bounded history (older than the history:
//!   an `ERROR` event carrying 410 Expired), with `BOOKMARK` events when the client sends
//!   `allowWatchBookmarks=true`;
//! - the field selector `spec.nodeName=` on Pods, on lists and watches;
//! - `get` of ReplicaSets and Jobs by name, 404 Status bodies for anything else (ServiceCIDRs
//!   too, unless enabled, as on Kubernetes before 1.33);
//! - faults on demand: broken JSON, a watch ended by 410, every connection dropped.
//!
//! It counts the bytes it sends per collection, which is what the agent receives.
//! Where it is simpler than the real server: later pages of a paginated list are served from
//! the current state rather than a snapshot (the watch from the list's resourceVersion then
//! replays what changed meanwhile, so a client ends in the same state), and watches are not
//! closed after their `timeoutSeconds`.
//!
//! [`cluster`] fills it with a simulated large cluster and churns it.
pub mod cluster;
pub mod objects;

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};

pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const NODES: &str = "/api/v1/nodes";
pub const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
/// Every collection served, by its API path.
pub const COLLECTIONS: [&str; 4] = [PODS, SERVICES, NODES, SERVICE_CIDRS];

/// `(apiVersion, kind)` of one object of `collection`.
fn object_kind(collection: &str) -> (&'static str, &'static str) {
    match collection {
        PODS => ("v1", "Pod"),
        SERVICES => ("v1", "Service"),
        NODES => ("v1", "Node"),
        _ => ("networking.k8s.io/v1", "ServiceCIDR"),
    }
}

/// An object as stored: its JSON with the resourceVersion stamped, and the node it is bound
/// to (for the `spec.nodeName` selector).
struct Stored {
    json: Bytes,
    node: Option<String>,
}

/// One change, kept for watches that resume from an earlier resourceVersion.
struct Change {
    resource_version: u64,
    collection: &'static str,
    node: Option<String>,
    line: Bytes,
}

struct Watcher {
    collection: &'static str,
    /// The node of a `spec.nodeName=` field selector.
    node: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watcher {
    fn wants(&self, collection: &str, node: Option<&str>) -> bool {
        self.collection == collection && (self.node.is_none() || self.node.as_deref() == node)
    }
}

/// What the stand-in serves; shared with the test or benchmark that changes it.
pub struct ApiState {
    resource_version: u64,
    /// Collection path -> objects by uid.
    collections: BTreeMap<&'static str, BTreeMap<String, Stored>>,
    /// `namespace/name` -> object, for the on-demand gets of owners.
    pub replicasets: BTreeMap<String, Value>,
    pub jobs: BTreeMap<String, Value>,
    /// Whether `networking.k8s.io/v1` ServiceCIDRs exist (Kubernetes 1.33 and later).
    pub service_cidr_api: bool,
    watchers: Vec<Watcher>,
    /// Every request line received (`GET /api/v1/pods?...`).
    requests: Vec<String>,
    /// Collections answered with broken JSON (200 OK, cut mid-object), as a faulty proxy or
    /// API server might.
    pub garbage: Vec<&'static str>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Watches and continue tokens from before this resourceVersion are expired (410).
    oldest_resumable: u64,
    bytes_sent: BTreeMap<&'static str, u64>,
}

impl Default for ApiState {
    fn default() -> Self {
        ApiState {
            resource_version: 0,
            collections: BTreeMap::new(),
            replicasets: BTreeMap::new(),
            jobs: BTreeMap::new(),
            service_cidr_api: false,
            watchers: Vec::new(),
            requests: Vec::new(),
            garbage: Vec::new(),
            history: VecDeque::new(),
            // The API server's watch cache holds the last few thousand changes.
            history_limit: 10_000,
            oldest_resumable: 0,
            bytes_sent: BTreeMap::new(),
        }
    }
}

/// A Status body, as the API server returns with errors.
pub fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn watch_line(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

impl ApiState {
    pub fn new() -> Self {
        ApiState::default()
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    fn next_rv(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Stores an object (stamping a new resourceVersion) and, with `notify`, tells the open
    /// watches (ADDED or MODIFIED). Without it the change is one a watch missed.
    pub fn upsert(&mut self, collection: &'static str, mut object: Value, notify: bool) {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid = object["metadata"]["uid"]
            .as_str()
            .expect("an object with metadata.uid")
            .to_owned();
        let node = object["spec"]["nodeName"].as_str().map(str::to_owned);
        let json = Bytes::from(object.to_string());
        let existed = self
            .collections
            .entry(collection)
            .or_default()
            .insert(
                uid,
                Stored {
                    json: json.clone(),
                    node: node.clone(),
                },
            )
            .is_some();
        if notify {
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            self.notify(collection, rv, node, watch_line(kind, &json));
        }
    }

    /// Removes an object; with `notify`, open watches get a DELETED event.
    pub fn delete(&mut self, collection: &'static str, uid: &str, notify: bool) {
        let rv = self.next_rv();
        let Some(stored) = self.collections.entry(collection).or_default().remove(uid) else {
            return;
        };
        if notify {
            let mut object: Value = serde_json::from_slice(&stored.json).expect("stored JSON");
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let line = watch_line("DELETED", object.to_string().as_bytes());
            self.notify(collection, rv, stored.node, line);
        }
    }

    /// The object `uid` of `collection`, as last stored.
    pub fn get(&self, collection: &str, uid: &str) -> Option<Value> {
        let stored = self.collections.get(collection)?.get(uid)?;
        serde_json::from_slice(&stored.json).ok()
    }

    /// Every object of `collection`, as last stored.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        self.collections
            .get(collection)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter_map(|stored| serde_json::from_slice(&stored.json).ok())
            .collect()
    }

    /// How many objects `collection` holds.
    pub fn len(&self, collection: &str) -> usize {
        self.collections.get(collection).map_or(0, BTreeMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.collections.values().all(BTreeMap::is_empty)
    }

    fn notify(&mut self, collection: &'static str, rv: u64, node: Option<String>, line: Bytes) {
        let mut sent = 0;
        self.watchers.retain(|w| {
            if !w.wants(collection, node.as_deref()) {
                return !w.tx.is_closed();
            }
            sent += line.len() as u64;
            w.tx.send(line.clone()).is_ok()
        });
        *self.bytes_sent.entry(collection).or_default() += sent;
        self.history.push_back(Change {
            resource_version: rv,
            collection,
            node,
            line,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_resumable = dropped.resource_version;
            }
        }
    }

    /// Forgets the change history, as etcd compaction does: every open watch ends with an
    /// ERROR event carrying 410 Expired, and continue tokens and resourceVersions from before
    /// now answer 410 too. The client must list again.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest_resumable = self.next_rv();
        for collection in COLLECTIONS {
            self.expire_watches(collection);
        }
    }

    /// Ends every open watch of `collection` with an ERROR event carrying 410 Gone, as the
    /// API server does when the watch's resourceVersion fell out of its window.
    pub fn expire_watches(&mut self, collection: &'static str) {
        let gone = status_body(410, "Expired", "too old resource version: 12 (4711)");
        let line = watch_line("ERROR", gone.to_string().as_bytes());
        let mut sent = 0;
        self.watchers.retain(|w| {
            if w.collection == collection {
                sent += line.len() as u64;
                let _ = w.tx.send(line.clone());
                false // dropping the sender ends the stream after the event
            } else {
                true
            }
        });
        *self.bytes_sent.entry(collection).or_default() += sent;
    }

    /// Sends a line that is not JSON to every open watch of `collection`, then ends them.
    pub fn garbage_to_watches(&mut self, collection: &'static str) {
        let line =
            Bytes::from_static(b"{\"type\": \"ADDED\", \"object\": {\"metadata\": \x00\xff]]\n");
        self.watchers.retain(|w| {
            if w.collection == collection {
                let _ = w.tx.send(line.clone());
                false
            } else {
                true
            }
        });
    }

    /// A BOOKMARK event (the current resourceVersion, no object) to every open watch that
    /// asked for them.
    pub fn send_bookmarks(&mut self) {
        let rv = self.resource_version.to_string();
        let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let (api_version, kind) = object_kind(w.collection);
            let object = json!({
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv,
                             "annotations": {"k8s.io/initial-events-end": "false"}}
            });
            let line = watch_line("BOOKMARK", object.to_string().as_bytes());
            *sent.entry(w.collection).or_default() += line.len() as u64;
            w.tx.send(line).is_ok()
        });
        for (collection, bytes) in sent {
            *self.bytes_sent.entry(collection).or_default() += bytes;
        }
    }

    /// Whether a watch of `collection` is open.
    pub fn is_watching(&self, collection: &str) -> bool {
        self.watchers
            .iter()
            .any(|w| w.collection == collection && !w.tx.is_closed())
    }

    /// Bytes of response bodies sent for `collection` (lists and watch events).
    pub fn bytes_sent(&self, collection: &str) -> u64 {
        self.bytes_sent.get(collection).copied().unwrap_or(0)
    }

    /// Every request line received for `collection` (`GET /api/v1/pods?...`).
    pub fn requests_to(&self, collection: &str) -> Vec<String> {
        self.requests
            .iter()
            .filter(|r| r.split(['?', ' ']).nth(1) == Some(collection))
            .cloned()
            .collect()
    }

    fn list(
        &mut self,
        collection: &'static str,
        node: Option<&str>,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        // A continue token: `<resourceVersion of the first page>/<last uid sent>`.
        let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let parsed = token
                    .split_once('/')
                    .and_then(|(rv, key)| Some((rv.parse::<u64>().ok()?, key.to_owned())));
                match parsed {
                    Some((rv, _)) if rv < self.oldest_resumable => {
                        return json_response(
                            StatusCode::GONE,
                            &status_body(
                                410,
                                "Expired",
                                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                            ),
                        );
                    }
                    Some((rv, key)) => (rv, Some(key)),
                    None => {
                        return json_response(
                            StatusCode::BAD_REQUEST,
                            &status_body(400, "BadRequest", "invalid continue token"),
                        );
                    }
                }
            }
            None => (self.resource_version, None),
        };
        let objects = self.collections.entry(collection).or_default();
        let range = match &after {
            Some(key) => objects.range::<String, _>((
                std::ops::Bound::Excluded(key.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => objects.range::<String, _>(..),
        };
        let mut matching = range.filter(|(_, s)| node.is_none() || s.node.as_deref() == node);
        let mut body = Vec::new();
        let (api_version, kind) = object_kind(collection);
        let mut last = None;
        let mut first = true;
        body.extend_from_slice(b",\"items\":[");
        for (uid, stored) in matching.by_ref().take(limit) {
            if !first {
                body.push(b',');
            }
            first = false;
            body.extend_from_slice(&stored.json);
            last = Some(uid.clone());
        }
        body.extend_from_slice(b"]}");
        let remaining = matching.count();
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if remaining > 0
            && let Some(last) = last
        {
            metadata["continue"] = json!(format!("{list_rv}/{last}"));
            metadata["remainingItemCount"] = json!(remaining);
        }
        let mut head = format!(
            "{{\"apiVersion\":\"{api_version}\",\"kind\":\"{kind}List\",\"metadata\":{metadata}"
        )
        .into_bytes();
        head.extend_from_slice(&body);
        *self.bytes_sent.entry(collection).or_default() += head.len() as u64;
        bytes_response(StatusCode::OK, Bytes::from(head))
    }

    fn watch(
        &mut self,
        collection: &'static str,
        node: Option<String>,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let from = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse::<u64>().ok())
            .filter(|rv| *rv > 0);
        let watcher = Watcher {
            collection,
            node,
            bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
            tx,
        };
        let mut sent = 0;
        match from {
            Some(rv) if rv < self.oldest_resumable => {
                let gone = status_body(
                    410,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", self.oldest_resumable),
                );
                let line = watch_line("ERROR", gone.to_string().as_bytes());
                sent += line.len() as u64;
                let _ = watcher.tx.send(line);
                // The watcher is not kept: the stream ends after the event.
            }
            Some(rv) => {
                for change in self.history.iter().filter(|c| {
                    c.resource_version > rv && watcher.wants(c.collection, c.node.as_deref())
                }) {
                    sent += change.line.len() as u64;
                    let _ = watcher.tx.send(change.line.clone());
                }
                self.watchers.push(watcher);
            }
            None => self.watchers.push(watcher),
        }
        *self.bytes_sent.entry(collection).or_default() += sent;
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let line = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("a valid response")
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn bytes_response(code: StatusCode, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(body).boxed())
        .expect("a valid response")
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(code, Bytes::from(value.to_string()))
}

fn not_found() -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &status_body(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    )
}

fn lock(state: &Mutex<ApiState>) -> MutexGuard<'_, ApiState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn handle<B>(state: &Mutex<ApiState>, request: &Request<B>) -> Response<Body> {
    let mut api = lock(state);
    let path = request.uri().path().to_owned();
    api.requests
        .push(format!("{} {}", request.method(), request.uri()));
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(url_pairs)
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(collection) = COLLECTIONS.into_iter().find(|c| *c == path) {
        if collection == SERVICE_CIDRS && !api.service_cidr_api {
            return not_found();
        }
        let node = query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        if query.get("watch").map(String::as_str) == Some("true") {
            return api.watch(collection, node, &query);
        }
        if api.garbage.contains(&collection) {
            return bytes_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"apiVersion\": \"v1\", \"items\": [{\"metadata\": "),
            );
        }
        return api.list(collection, node.as_deref(), &query);
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
    not_found()
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
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
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

/// How often open watches that asked for them get a BOOKMARK; the API server sends one
/// about every minute.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(60);

/// A running stand-in on the current tokio runtime. Stopping it closes the listener and
/// every open connection (the client sees its watches drop); it can start again on the
/// same address with the same state.
pub struct StandIn {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    /// Serves `state` on `addr` (port 0: a free one), with a BOOKMARK to the watches that
    /// ask for them every `bookmark_every`.
    pub async fn start(
        state: Arc<Mutex<ApiState>>,
        addr: SocketAddr,
        bookmark_every: Duration,
    ) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let serving = Arc::clone(&state);
        let tasks = tokio::spawn(async move {
            let mut open = JoinSet::new();
            let bookmarks = Arc::clone(&serving);
            open.spawn(async move {
                let mut tick = tokio::time::interval(bookmark_every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    lock(&bookmarks).send_bookmarks();
                }
            });
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
        Ok(StandIn {
            state,
            addr,
            tasks: Some(tasks),
        })
    }

    pub fn stop(&mut self) {
        if let Some(task) = self.tasks.take() {
            task.abort();
        }
        // Open watch senders would otherwise keep streams alive in the state.
        lock(&self.state).watchers.clear();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A kubeconfig whose current context is the stand-in at `addr`, without credentials.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: standin\n\
         clusters: [{{name: standin, cluster: {{server: \"http://{addr}\"}}}}]\n\
         contexts: [{{name: standin, context: {{cluster: standin, user: nobody}}}}]\n\
         users: [{{name: nobody, user: {{}}}}]\n"
    )
}

/// The stand-in on a thread and runtime of its own, for callers without a runtime (the
/// privileged tests and the benchmark run the real agent against it). It writes a
/// kubeconfig for itself, removed with the stand-in when dropped.
pub struct BackgroundStandIn {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundStandIn {
    /// Serves `state` on a free loopback port; its kubeconfig goes to `kubeconfig_path`.
    pub fn start(
        state: Arc<Mutex<ApiState>>,
        bookmark_every: Duration,
        kubeconfig_path: &Path,
    ) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let serving = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("kube-standin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
                    match StandIn::start(serving, local, bookmark_every).await {
                        Ok(server) => {
                            let _ = ready_tx.send(Ok(server.addr()));
                            let _ = stopped.await;
                            drop(server);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let addr = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the stand-in's thread ended before serving"))??;
        std::fs::write(kubeconfig_path, kubeconfig(addr))?;
        Ok(BackgroundStandIn {
            state,
            addr,
            kubeconfig: kubeconfig_path.to_owned(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> &Arc<Mutex<ApiState>> {
        &self.state
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BackgroundStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(state: &Mutex<ApiState>, uri: &str) -> (StatusCode, Value) {
        let request = Request::get(uri).body(()).unwrap();
        let response = handle(state, &request);
        let status = response.status();
        let body = futures::executor::block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn pod(uid: &str, node: &str) -> Value {
        json!({"metadata": {"uid": uid, "name": uid, "namespace": "ns"}, "spec": {"nodeName": node}})
    }

    #[test]
    fn lists_page_with_continue_tokens_and_expire_after_compaction() {
        let state = Mutex::new(ApiState::new());
        for i in 0..5 {
            lock(&state).upsert(PODS, pod(&format!("p{i}"), "a"), true);
        }
        let (_, first) = get(&state, "/api/v1/pods?limit=2");
        assert_eq!(first["items"].as_array().unwrap().len(), 2);
        assert_eq!(first["metadata"]["remainingItemCount"], 3);
        let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
        let (_, second) = get(&state, &format!("/api/v1/pods?limit=2&continue={token}"));
        assert_eq!(second["items"][0]["metadata"]["uid"], "p2");
        assert_eq!(
            second["metadata"]["resourceVersion"],
            first["metadata"]["resourceVersion"]
        );

        lock(&state).compact();
        let (status, gone) = get(&state, &format!("/api/v1/pods?limit=2&continue={token}"));
        assert_eq!(
            (status, gone["code"].as_u64()),
            (StatusCode::GONE, Some(410))
        );
    }

    #[test]
    fn the_node_selector_filters_lists_and_bytes_are_counted() {
        let state = Mutex::new(ApiState::new());
        lock(&state).upsert(PODS, pod("p1", "a"), true);
        lock(&state).upsert(PODS, pod("p2", "b"), true);
        let (_, list) = get(&state, "/api/v1/pods?fieldSelector=spec.nodeName%3Db");
        let uids: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["uid"].as_str().unwrap())
            .collect();
        assert_eq!(uids, ["p2"]);
        assert!(lock(&state).bytes_sent(PODS) > 0);
        assert_eq!(lock(&state).bytes_sent(NODES), 0);
    }
}
