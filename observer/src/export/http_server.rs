//! `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1.
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};

use super::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the metrics listener on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What `/readyz` reports: ready once the probes are attached and span export is running.
/// Clones share state; the agent flips the flags as its stages come up or fail. Both health
/// endpoints also say where pod metadata comes from: degraded enrichment is worth seeing,
/// but never makes the agent unready, since observation goes on without it.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    probes_attached: Arc<AtomicBool>,
    export_running: Arc<AtomicBool>,
    enrichment: Arc<std::sync::Mutex<String>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_probes_attached(&self, attached: bool) {
        self.probes_attached.store(attached, Ordering::Relaxed);
    }

    pub fn set_export_running(&self, running: bool) {
        self.export_running.store(running, Ordering::Relaxed);
    }

    /// The enrichment status line, e.g. `kube`, `cgroup-only`, `degraded: <error>`.
    pub fn set_enrichment(&self, status: &str) {
        let mut current = self.enrichment.lock().unwrap_or_else(|p| p.into_inner());
        if *current != status {
            status.clone_into(&mut current);
        }
    }

    fn enrichment_line(&self) -> String {
        let current = self.enrichment.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_empty() {
            String::new()
        } else {
            format!("enrichment: {current}\n")
        }
    }

    pub fn is_ready(&self) -> bool {
        self.probes_attached.load(Ordering::Relaxed) && self.export_running.load(Ordering::Relaxed)
    }

    fn explain(&self) -> String {
        let mut missing = Vec::new();
        if !self.probes_attached.load(Ordering::Relaxed) {
            missing.push("probes not attached");
        }
        if !self.export_running.load(Ordering::Relaxed) {
            missing.push("export not running");
        }
        let first = if missing.is_empty() {
            "ready\n".to_owned()
        } else {
            format!("not ready: {}\n", missing.join(", "))
        };
        first + &self.enrichment_line()
    }
}

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve_http(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> Result<(std::net::SocketAddr, JoinHandle<()>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((
        local,
        tokio::spawn(accept_loop(listener, metrics, readiness)),
    ))
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>, readiness: Readiness) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    match req.uri().path() {
        "/metrics" => Response::builder()
            .header(CONTENT_TYPE, OPENMETRICS)
            .body(Full::new(Bytes::from(metrics.encode())))
            .unwrap_or_default(),
        "/healthz" => plain(
            StatusCode::OK,
            format!("ok\n{}", readiness.enrichment_line()),
        ),
        "/readyz" => {
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            plain(status, readiness.explain())
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
