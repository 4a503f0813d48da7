//! The span export pipeline: `submit` (never blocks) -> bounded queue -> batches -> OTLP over
//! gRPC or HTTP/protobuf (or OTLP/JSON lines), with a timeout on every call, retries with
//! backoff on transient failures, and every dropped span counted.
use std::{fmt, io::Write, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse, trace_service_client::TraceServiceClient,
};
use prost::Message;
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::{
    Code,
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::{Enriched, ExportConfig, Metrics, OtlpProtocol, SpanBuilder, SpanSelection, WallClock};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP header {name:?}: not valid in gRPC metadata")]
    Header { name: String },
    #[error("loading native TLS roots for {endpoint:?}")]
    TlsRoots {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("opening span file {path:?}")]
    OpenFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Where spans go.
pub enum SpanSink {
    /// An OTLP gRPC collector base URL (`http://collector:4317`).
    Grpc(String),
    /// An OTLP HTTP traces URL (`http://collector:4318/v1/traces`).
    Http(String),
    /// One `ExportTraceServiceRequest` in OTLP/JSON per line.
    JsonLines(Box<dyn Write + Send>),
}

impl fmt::Debug for SpanSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpanSink::Grpc(url) => f.debug_tuple("Grpc").field(url).finish(),
            SpanSink::Http(url) => f.debug_tuple("Http").field(url).finish(),
            SpanSink::JsonLines(_) => f.write_str("JsonLines"),
        }
    }
}

impl SpanSink {
    /// The configured OTLP endpoint, else the JSON file, else `None` (no span export).
    pub fn from_config(config: &ExportConfig) -> Result<Option<Self>, ExportError> {
        if let Some(endpoint) = &config.endpoint {
            return Ok(Some(match config.protocol {
                OtlpProtocol::Grpc => SpanSink::Grpc(endpoint.clone()),
                OtlpProtocol::HttpProtobuf => SpanSink::Http(endpoint.clone()),
            }));
        }
        match &config.json_path {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ExportError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Some(SpanSink::JsonLines(Box::new(
                    std::io::BufWriter::new(file),
                ))))
            }
            None => Ok(None),
        }
    }
}

/// What `submit` did with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    Queued,
    /// The export policy (selection or sampling) left it out.
    NotSelected,
    /// The queue was full (the collector is slow or down): dropped and counted.
    Dropped,
}

/// Handle to the export task. Dropping it closes the queue: the task exports what is queued
/// (retries included) and ends; `shutdown` bounds that in time.
pub struct SpanExporter {
    queue: mpsc::Sender<Enriched>,
    selection: SpanSelection,
    sample_ratio: f64,
    metrics: Arc<Metrics>,
    worker: JoinHandle<()>,
}

impl fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanExporter")
            .field("selection", &self.selection)
            .field("sample_ratio", &self.sample_ratio)
            .finish_non_exhaustive()
    }
}

impl SpanExporter {
    /// Starts the export task on the current tokio runtime. Connections to the collector are
    /// made lazily: a collector that is down at start is not an error.
    pub fn start(
        config: &ExportConfig,
        sink: SpanSink,
        clock: WallClock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ExportError> {
        let transport = Transport::new(sink, config)?;
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));
        let worker = Worker {
            rx,
            transport,
            builder: SpanBuilder::new(clock, config.fallback_service_name.clone()),
            metrics: metrics.clone(),
            max_batch: config.max_batch.max(1),
            batch_interval: config.batch_interval,
            timeout: config.timeout,
            max_attempts: config.max_attempts.max(1),
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff.max(config.initial_backoff),
        };
        Ok(Self {
            queue,
            selection: config.selection,
            sample_ratio: config.sample_ratio,
            metrics,
            worker: tokio::spawn(worker.run()),
        })
    }

    /// Applies the export policy and queues the connection without waiting.
    pub fn submit(&self, enriched: &Enriched) -> Submit {
        if !self.selected(enriched) {
            return Submit::NotSelected;
        }
        match self.queue.try_send(enriched.clone()) {
            Ok(()) => Submit::Queued,
            Err(err) => {
                let reason = match err {
                    mpsc::error::TrySendError::Full(_) => "queue_full",
                    mpsc::error::TrySendError::Closed(_) => "stopped",
                };
                self.metrics
                    .spans_dropped(reason, span_count(std::slice::from_ref(enriched)));
                Submit::Dropped
            }
        }
    }

    fn selected(&self, enriched: &Enriched) -> bool {
        let record = &enriched.record;
        if record.flagged {
            return true;
        }
        let eligible = match self.selection {
            SpanSelection::Flagged => false,
            SpanSelection::Egress => record.egress,
            SpanSelection::All => true,
        };
        eligible
            && (self.sample_ratio >= 1.0
                || (self.sample_ratio > 0.0 && fastrand::f64() < self.sample_ratio))
    }

    /// Stops accepting connections, exports what is queued, waits at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let Self { queue, worker, .. } = self;
        drop(queue);
        let abort = worker.abort_handle();
        if tokio::time::timeout(grace, worker).await.is_err() {
            abort.abort();
        }
    }
}

fn span_count(batch: &[Enriched]) -> u64 {
    batch
        .iter()
        .map(|e| 1 + e.record.chain.as_ref().map_or(0, |c| c.queries.len()) as u64)
        .sum()
}

struct Worker {
    rx: mpsc::Receiver<Enriched>,
    transport: Transport,
    builder: SpanBuilder,
    metrics: Arc<Metrics>,
    max_batch: usize,
    batch_interval: Duration,
    timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Worker {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        loop {
            let Some(first) = self.rx.recv().await else {
                return;
            };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + self.batch_interval;
            let mut closed = false;
            while batch.len() < self.max_batch {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.export(&batch).await;
            batch.clear();
            if closed {
                return;
            }
        }
    }

    async fn export(&mut self, batch: &[Enriched]) {
        let spans = span_count(batch);
        let request = self.builder.request(batch);
        let mut backoff = self.initial_backoff;
        for attempt in 1..=self.max_attempts {
            let result = match tokio::time::timeout(
                self.timeout,
                self.transport.send(&request, self.timeout),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(Failure::Transient("timeout")),
            };
            match result {
                Ok(rejected) => {
                    let rejected = rejected.min(spans);
                    self.metrics.spans_exported(spans - rejected);
                    if rejected > 0 {
                        self.metrics.spans_dropped("rejected", rejected);
                    }
                    return;
                }
                Err(Failure::Permanent(reason)) => {
                    self.metrics.span_export_failure(reason);
                    self.metrics.spans_dropped("rejected", spans);
                    tracing::warn!(reason, spans, "OTLP export rejected; spans dropped");
                    return;
                }
                Err(Failure::Transient(reason)) => {
                    self.metrics.span_export_failure(reason);
                    if attempt == self.max_attempts {
                        self.metrics.spans_dropped("export_failed", spans);
                        tracing::warn!(reason, spans, attempt, "OTLP export failed; spans dropped");
                        return;
                    }
                    // Full jitter keeps agents on many nodes from retrying in lockstep.
                    let pause = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }
}

enum Failure {
    /// Worth retrying: the collector is down, overloaded, or slow.
    Transient(&'static str),
    /// The collector refused the data: retrying would fail the same way.
    Permanent(&'static str),
}

enum HttpClient {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
}

enum Transport {
    Grpc {
        client: TraceServiceClient<Channel>,
        metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    },
    Http {
        client: Box<HttpClient>,
        uri: http::Uri,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    Json(Box<dyn Write + Send>),
}

impl Transport {
    fn new(sink: SpanSink, config: &ExportConfig) -> Result<Self, ExportError> {
        let bad = |endpoint: &str, reason: String| ExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        match sink {
            SpanSink::Grpc(url) => {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| bad(&url, e.to_string()))?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout);
                if url.starts_with("https://") {
                    endpoint = endpoint
                        .tls_config(ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| bad(&url, e.to_string()))?;
                }
                let metadata = config
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let invalid = || ExportError::Header { name: k.clone() };
                        Ok((
                            k.parse::<AsciiMetadataKey>().map_err(|_| invalid())?,
                            v.parse::<AsciiMetadataValue>().map_err(|_| invalid())?,
                        ))
                    })
                    .collect::<Result<_, ExportError>>()?;
                Ok(Transport::Grpc {
                    client: TraceServiceClient::new(endpoint.connect_lazy()),
                    metadata,
                })
            }
            SpanSink::Http(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| bad(&url, e.to_string()))?;
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(config.timeout));
                let builder = Client::builder(TokioExecutor::new());
                let client = match uri.scheme_str() {
                    Some("http") => HttpClient::Plain(builder.build(http)),
                    Some("https") => {
                        http.enforce_http(false);
                        let tls = hyper_rustls::HttpsConnectorBuilder::new()
                            .with_native_roots()
                            .map_err(|source| ExportError::TlsRoots {
                                endpoint: url.clone(),
                                source,
                            })?
                            .https_or_http()
                            .enable_http1()
                            .wrap_connector(http);
                        HttpClient::Tls(builder.build(tls))
                    }
                    _ => return Err(bad(&url, "scheme must be http or https".to_owned())),
                };
                let headers = config
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let invalid = || bad(&url, format!("invalid header {k:?}"));
                        Ok((
                            http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| invalid())?,
                            http::HeaderValue::from_str(v).map_err(|_| invalid())?,
                        ))
                    })
                    .collect::<Result<_, ExportError>>()?;
                Ok(Transport::Http {
                    client: Box::new(client),
                    uri,
                    headers,
                })
            }
            SpanSink::JsonLines(writer) => Ok(Transport::Json(writer)),
        }
    }

    /// Sends one request; `Ok` carries the number of spans the collector rejected.
    async fn send(
        &mut self,
        request: &ExportTraceServiceRequest,
        timeout: Duration,
    ) -> Result<u64, Failure> {
        match self {
            Transport::Grpc { client, metadata } => {
                let mut req = tonic::Request::new(request.clone());
                req.set_timeout(timeout);
                for (k, v) in metadata.iter() {
                    req.metadata_mut().insert(k.clone(), v.clone());
                }
                match client.export(req).await {
                    Ok(response) => Ok(rejected_spans(response.get_ref())),
                    Err(status) => Err(grpc_failure(status.code())),
                }
            }
            Transport::Http {
                client,
                uri,
                headers,
            } => {
                let mut req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                for (k, v) in headers.iter() {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Full::new(Bytes::from(request.encode_to_vec())))
                    .map_err(|_| Failure::Permanent("rejected"))?;
                let response = match client.as_ref() {
                    HttpClient::Plain(c) => c.request(req).await,
                    HttpClient::Tls(c) => c.request(req).await,
                }
                .map_err(|_| Failure::Transient("unavailable"))?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|_| Failure::Transient("unavailable"))?
                    .to_bytes();
                if status.is_success() {
                    // A body that does not decode still means the data was accepted.
                    return Ok(ExportTraceServiceResponse::decode(body)
                        .map(|r| rejected_spans(&r))
                        .unwrap_or(0));
                }
                Err(http_failure(status))
            }
            Transport::Json(writer) => {
                let write = |w: &mut Box<dyn Write + Send>| -> std::io::Result<()> {
                    serde_json::to_writer(&mut *w, request)?;
                    w.write_all(b"\n")?;
                    w.flush()
                };
                // Local file: nothing to retry for.
                write(writer).map_err(|_| Failure::Permanent("io"))?;
                Ok(0)
            }
        }
    }
}

fn rejected_spans(response: &ExportTraceServiceResponse) -> u64 {
    response
        .partial_success
        .as_ref()
        .map_or(0, |p| p.rejected_spans.max(0) as u64)
}

/// The OTLP spec's retryable gRPC codes.
fn grpc_failure(code: Code) -> Failure {
    match code {
        Code::Unavailable => Failure::Transient("unavailable"),
        Code::DeadlineExceeded => Failure::Transient("timeout"),
        Code::ResourceExhausted => Failure::Transient("throttled"),
        Code::Cancelled | Code::Aborted | Code::OutOfRange | Code::DataLoss => {
            Failure::Transient("transient")
        }
        _ => Failure::Permanent("rejected"),
    }
}

/// The OTLP spec's retryable HTTP statuses.
fn http_failure(status: http::StatusCode) -> Failure {
    match status.as_u16() {
        429 => Failure::Transient("throttled"),
        502..=504 => Failure::Transient("unavailable"),
        _ => Failure::Permanent("rejected"),
    }
}
