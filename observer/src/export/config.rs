//! Span export settings: the standard `OTEL_EXPORTER_OTLP_*` variables, overridable by the CLI.
use std::{path::PathBuf, time::Duration};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Which connections become traces (`--export`). Flagged connections are always exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanSelection {
    Flagged,
    // Every connection to a destination outside the cluster networks.
    Egress,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Everything the span exporter needs. `from_env` reads the standard variables; the CLI
/// overrides fields afterwards.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    /// Full URL the exporter sends to: for gRPC the collector's base URL, for HTTP the
    /// `/v1/traces` URL. `None`: no OTLP export (spans go to `json_path` if set).
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Sent with every export request (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// Bound on each export call.
    pub timeout: Duration,
    /// Fallback `service.name` for connections whose opener has no name yet (pod known only
    /// by UID); from `OTEL_SERVICE_NAME`.
    pub fallback_service_name: String,
    /// Where to write OTLP/JSON lines when `endpoint` is `None`.
    pub json_path: Option<PathBuf>,
    pub selection: SpanSelection,
    /// Fraction (0..=1) of selected, non-flagged connections that are exported.
    pub sample_ratio: f64,
    /// Connections waiting for export; beyond it new ones are dropped and counted.
    pub queue_capacity: usize,
    pub max_batch: usize,
    /// A partial batch is sent at most this long after its first connection arrived.
    pub batch_interval: Duration,
    /// Attempts per batch (first try included) on transient failures before it is dropped.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::HttpProtobuf,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            fallback_service_name: "observer".to_owned(),
            json_path: None,
            selection: SpanSelection::Egress,
            sample_ratio: 1.0,
            queue_capacity: 4096,
            max_batch: 512,
            batch_interval: Duration::from_secs(2),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl ExportConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the standard variables through `var`; trace-specific ones win over the generic.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut config = Self::default();

        let protocol_var = if get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        } else {
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        };
        if let Some(value) = get(protocol_var) {
            config.protocol = OtlpProtocol::parse(&value).ok_or(ConfigError::Invalid {
                var: protocol_var,
                value,
                reason: "expected grpc or http/protobuf",
            })?;
        }

        config.endpoint = if let Some(traces) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(traces.trim().to_owned())
        } else {
            get("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| signal_endpoint(base.trim(), config.protocol))
        };

        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(value) = get(name) {
                for (k, v) in parse_headers(name, &value)? {
                    config.headers.retain(|(existing, _)| *existing != k);
                    config.headers.push((k, v));
                }
            }
        }

        let timeout_var = if get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
        } else {
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        };
        if let Some(value) = get(timeout_var) {
            let ms: u64 = value.trim().parse().map_err(|_| ConfigError::Invalid {
                var: timeout_var,
                value: value.clone(),
                reason: "expected milliseconds",
            })?;
            config.timeout = Duration::from_millis(ms.max(1));
        }

        if let Some(name) = get("OTEL_SERVICE_NAME") {
            config.fallback_service_name = name.trim().to_owned();
        }
        Ok(config)
    }

    /// Points the exporter at `base` (a collector's base URL), adding `/v1/traces` for HTTP.
    pub fn with_base_endpoint(mut self, base: &str, protocol: OtlpProtocol) -> Self {
        self.protocol = protocol;
        self.endpoint = Some(signal_endpoint(base, protocol));
        self
    }
}

/// The OTLP spec: with the generic endpoint variable, HTTP exporters append the signal path.
fn signal_endpoint(base: &str, protocol: OtlpProtocol) -> String {
    match protocol {
        OtlpProtocol::Grpc => base.to_owned(),
        OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
    }
}

/// `k1=v1,k2=v2`, values percent-decoded (W3C baggage style, as the OTLP spec asks).
fn parse_headers(var: &'static str, value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let invalid = |reason| ConfigError::Invalid {
        var,
        value: value.to_owned(),
        reason,
    };
    let mut headers = Vec::new();
    for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or(invalid("expected key=value pairs"))?;
        let key = k.trim().to_ascii_lowercase();
        if key.is_empty() || http::HeaderName::from_bytes(key.as_bytes()).is_err() {
            return Err(invalid("invalid header name"));
        }
        let decoded = percent_decode(v.trim()).ok_or(invalid("invalid percent-encoding"))?;
        if http::HeaderValue::from_str(&decoded).is_err() {
            return Err(invalid("invalid header value"));
        }
        headers.push((key, decoded));
    }
    Ok(headers)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_endpoint_means_no_otlp_export() {
        assert_eq!(config(&[]).unwrap().endpoint, None);
    }

    #[test]
    fn generic_endpoint_gets_the_signal_path_for_http_only() {
        let http = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(http.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            http.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let grpc = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
        assert_eq!(grpc.endpoint.as_deref(), Some("http://collector:4317"));
    }

    #[test]
    fn traces_endpoint_is_used_as_is_and_wins() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:9999/custom"),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://b:9999/custom"));
    }

    #[test]
    fn headers_timeout_and_service_name() {
        let c = config(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc, x-tenant = lab",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "observer-node-1"),
        ])
        .unwrap();
        assert_eq!(
            c.headers,
            vec![
                ("authorization".to_owned(), "Bearer abc".to_owned()),
                ("x-tenant".to_owned(), "lab".to_owned())
            ]
        );
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.fallback_service_name, "observer-node-1");
    }

    #[test]
    fn bad_values_are_typed_errors() {
        assert!(matches!(
            config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Err(ConfigError::Invalid {
                var: "OTEL_EXPORTER_OTLP_PROTOCOL",
                ..
            })
        ));
        assert!(config(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]).is_err());
        assert!(config(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]).is_err());
        assert!(config(&[("OTEL_EXPORTER_OTLP_HEADERS", "a=%zz")]).is_err());
    }
}
