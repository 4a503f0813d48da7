//! The export side: what observer tells people and machines about each correlated connection.
//!
//! Input is an [`Enriched`] record: a [`ConnectionRecord`] from the correlation core plus the
//! [`ExportIdentity`] of whoever opened it. From it come
//! - OpenTelemetry spans (one trace per connection, one child per DNS query) sent over OTLP
//!   ([`SpanExporter`]) or written as OTLP/JSON lines when no collector is configured,
//! - Prometheus metrics ([`Metrics`]) served with health endpoints ([`serve_http`]),
//! - one line per connection for people ([`TextWriter`]) or scripts ([`JsonWriter`]).
//!
//! Nothing here depends on the probes, the DNS parser or the identity module: they fill the
//! plain types below.

mod config;
mod exporter;
mod http_server;
mod metrics;
mod output;
mod redact;
mod spans;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::identity::WorkloadKind;
pub use config::{ConfigError, ExportConfig, OtlpProtocol, SpanSelection};
pub use exporter::{ExportError, SpanExporter, SpanSink, Submit};
pub use http_server::{Readiness, ServeError, serve_http};
pub use metrics::{EnrichmentState, Metrics, MetricsLimits, UnjoinedReason, UnmatchedReason};
pub use output::{JSON_FIELDS, JsonWriter, TextWriter, color_on};
pub use redact::{REDACTED_LABEL, RedactKeyError, RedactMode, Redactor};
pub use spans::{ExportTraceServiceRequest, SpanBuilder, fix, flag_message};

use crate::record::{BootNs, ConnectionRecord};

/// A correlated connection together with who opened it.
#[derive(Clone, Debug, PartialEq)]
pub struct Enriched {
    pub record: ConnectionRecord,
    pub identity: ExportIdentity,
}

/// What the exporters need to know about the opener of a connection. Every field is optional
/// because enrichment degrades: without the Kubernetes API only the pod UID (from the cgroup
/// path) is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportIdentity {
    /// The cluster's name, when the operator configured one.
    pub cluster: Option<String>,
    /// The node observer runs on.
    pub node: Option<String>,
    /// `None` for node processes (scope `Host`).
    pub pod: Option<PodIdentity>,
    pub container: Option<ContainerIdentity>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// Known from the cgroup path even without the Kubernetes API.
    pub uid: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The controller that owns the pod, walked up to the top (ReplicaSet -> Deployment).
    pub workload: Option<Workload>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerIdentity {
    /// Runtime id without the `containerd://` style prefix.
    pub id: Option<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
}

/// Turns kernel CLOCK_BOOTTIME stamps into wall-clock time: `unix = boot + offset`.
/// The probes module measures the offset; exporters only apply it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    pub boot_to_unix_offset_ns: i128,
}

impl WallClock {
    pub const fn new(boot_to_unix_offset_ns: i128) -> Self {
        Self {
            boot_to_unix_offset_ns,
        }
    }

    /// Nanoseconds since the Unix epoch, clamped into `u64` (OTLP's type).
    pub fn unix_ns(self, boot: BootNs) -> u64 {
        let unix = boot as i128 + self.boot_to_unix_offset_ns;
        unix.clamp(0, u64::MAX as i128) as u64
    }

    pub fn system_time(self, boot: BootNs) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_ns(boot))
    }
}

impl Enriched {
    /// The name people know this opener by in traces: workload, then pod, then the command of
    /// a node process. `None` when the pod is known only by UID.
    pub fn service_name(&self) -> Option<String> {
        match &self.identity.pod {
            Some(pod) => pod
                .workload
                .as_ref()
                .map(|w| w.name.clone())
                .or_else(|| pod.name.clone()),
            None => Some(format!("host:{}", self.record.comm)),
        }
    }

    /// `namespace/pod`, `pod/<uid>` or `host:<comm>[pid]`, for one-line output.
    pub fn who(&self) -> String {
        match &self.identity.pod {
            Some(PodIdentity {
                namespace: Some(ns),
                name: Some(name),
                ..
            }) => format!("{ns}/{name}"),
            Some(PodIdentity {
                namespace: Some(ns),
                uid,
                ..
            }) => format!("{ns}/pod/{uid}"),
            Some(pod) => format!("pod/{}", pod.uid),
            None => format!("host:{}[{}]", self.record.comm, self.record.pid),
        }
    }
}
