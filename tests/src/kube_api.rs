//! A stand-in Kubernetes API server for the real agent (`--kube auto` with a kubeconfig that
//! points here): it speaks the API's HTTP wire protocol for the collections the agent watches
//! (JSON lists with `metadata.resourceVersion`, `?watch=true` streams held open), serving the
//! Services a test gives it and no Pods or Nodes; ServiceCIDR answers 404 as on Kubernetes
//! before 1.33. No real API server can run here; this one exists so that a privileged test can
//! show what the agent does with Services it learns from the API (ExternalName targets).
//! It serves on a loopback port from a thread of its own and stops when dropped.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::oneshot;

type Body = BoxBody<Bytes, Infallible>;

/// A Service of type ExternalName: cluster DNS answers `<name>.<namespace>.svc.<domain>`
/// with a CNAME to `target`.
pub fn external_name_service(name: &str, namespace: &str, target: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": namespace,
            "uid": format!("svc-{namespace}-{name}"), "resourceVersion": "1"
        },
        "spec": {"type": "ExternalName", "externalName": target}
    })
}

/// The running stand-in; its kubeconfig file is removed on drop.
pub struct KubeApi {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeApi {
    /// Serves `services` on a free loopback port; writes a kubeconfig for it named after
    /// `tag` (a test's run id) in the temporary directory.
    pub fn start(services: Vec<Value>, tag: &str) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let kubeconfig = std::env::temp_dir().join(format!("observer-kubeconfig-{tag}"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: standin\n\
                 clusters: [{{name: standin, cluster: {{server: \"http://{addr}\"}}}}]\n\
                 contexts: [{{name: standin, context: {{cluster: standin, user: nobody}}}}]\n\
                 users: [{{name: nobody, user: {{}}}}]\n"
            ),
        )?;
        let services = Arc::new(services);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let services = Arc::clone(&services);
                            tokio::spawn(async move {
                                let service = service_fn(move |request| {
                                    let response = handle(&services, &request);
                                    async move { Ok::<_, Infallible>(response) }
                                });
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        Ok(Self {
            addr,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for KubeApi {
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

fn handle(services: &[Value], request: &Request<hyper::body::Incoming>) -> Response<Body> {
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == "watch=true"));
    let (kind, items) = match request.uri().path() {
        "/api/v1/pods" => ("PodList", Vec::new()),
        "/api/v1/services" => ("ServiceList", services.to_vec()),
        "/api/v1/nodes" => ("NodeList", Vec::new()),
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({
                    "apiVersion": "v1", "kind": "Status", "status": "Failure",
                    "reason": "NotFound", "code": 404,
                    "message": "the server could not find the requested resource"
                }),
            );
        }
    };
    if watch {
        // Nothing ever changes: the watch stays open without events.
        let body = StreamBody::new(tokio_stream::pending::<Result<Frame<Bytes>, Infallible>>());
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .expect("a valid response");
    }
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1", "kind": kind,
            "metadata": {"resourceVersion": "1"},
            "items": items
        }),
    )
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a valid response")
}
