//! A real OTLP trace receiver for tests: the OTLP gRPC `TraceService` (tonic) and OTLP/HTTP
//! (`POST /v1/traces`, protobuf bodies), both on 127.0.0.1 with ports from the kernel. It keeps
//! every request it accepted, and can be told to fail (gRPC UNAVAILABLE, HTTP 503) or to answer
//! slowly, then to recover, so retries and counted drops can be tested against the wire.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use prost::Message;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// Largest HTTP body accepted, as a collector would bound it.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Grpc,
    Http,
}

/// One accepted export request.
#[derive(Clone, Debug)]
pub struct Received {
    pub via: Via,
    /// Request headers (gRPC metadata), names lower case.
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub request: ExportTraceServiceRequest,
}

impl Received {
    pub fn span_count(&self) -> usize {
        count_spans(&self.request)
    }
}

pub fn count_spans(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum()
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    failing: AtomicBool,
    delay_ms: AtomicU64,
    refused: AtomicUsize,
    arrived: Notify,
}

impl Shared {
    /// `Err` when told to fail; the request is then not kept.
    async fn accept(&self, received: Received) -> Result<(), ()> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(());
        }
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(received);
        self.arrived.notify_waiters();
        Ok(())
    }
}

/// A non-blocking listener on 127.0.0.1 of the calling thread's network namespace, with a
/// port from the kernel.
pub fn bind_loopback() -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub struct OtlpReceiver {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds both servers on 127.0.0.1 and starts serving on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(bind_loopback()?, bind_loopback()?).await
    }

    /// As [`OtlpReceiver::start`], on listeners the caller bound (e.g. inside the network
    /// namespace where the agent runs, with [`bind_loopback`]).
    pub async fn start_on(
        grpc: std::net::TcpListener,
        http: std::net::TcpListener,
    ) -> std::io::Result<Self> {
        let grpc_listener = TcpListener::from_std(grpc)?;
        let http_listener = TcpListener::from_std(http)?;
        let shared = Arc::new(Shared::default());
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let service = TraceServiceServer::new(GrpcTraces {
            shared: shared.clone(),
        });
        let grpc = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                panic!("OTLP gRPC test receiver stopped: {err}");
            }
        });
        let http = tokio::spawn(serve_http(http_listener, shared.clone()));
        Ok(Self {
            shared,
            grpc_addr,
            http_addr,
            tasks: vec![grpc, http],
        })
    }

    /// `http://127.0.0.1:<port>`: what `OTEL_EXPORTER_OTLP_ENDPOINT` holds for gRPC.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://127.0.0.1:<port>`: the OTLP/HTTP base URL (exporters append `/v1/traces`).
    pub fn http_base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn http_traces_url(&self) -> String {
        format!("http://{}/v1/traces", self.http_addr)
    }

    /// While failing, gRPC answers UNAVAILABLE and HTTP answers 503 (both retryable in OTLP).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Delays every answer, to make exporters hit their timeouts.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests answered with a failure so far.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn span_count(&self) -> usize {
        self.received().iter().map(Received::span_count).sum()
    }

    /// Waits until at least `spans` spans arrived; `None` if they did not within `within`.
    pub async fn wait_for_spans(&self, spans: usize, within: Duration) -> Option<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let arrived = self.shared.arrived.notified();
            let received = self.received();
            if received.iter().map(Received::span_count).sum::<usize>() >= spans {
                return Some(received);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

struct GrpcTraces {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let content_type = request
            .metadata()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let received = Received {
            via: Via::Grpc,
            headers,
            content_type,
            request: request.into_inner(),
        };
        match self.shared.accept(received).await {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(()) => Err(tonic::Status::unavailable("test receiver told to fail")),
        }
    }
}

async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle_http(req, &shared).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle_http(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.uri().path() != "/v1/traces" {
        return status(StatusCode::NOT_FOUND);
    }
    if req.method() != hyper::Method::POST {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if content_type.as_deref() != Some("application/x-protobuf") {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
        return status(StatusCode::PAYLOAD_TOO_LARGE);
    };
    let Ok(request) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let received = Received {
        via: Via::Http,
        headers,
        content_type,
        request,
    };
    match shared.accept(received).await {
        Ok(()) => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(
                ExportTraceServiceResponse::default().encode_to_vec(),
            )))
            .unwrap_or_default(),
        Err(()) => status(StatusCode::SERVICE_UNAVAILABLE),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}
