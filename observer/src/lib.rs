//! observer's agent, as a library: the binary in `main.rs` wires these stages together.
//!
//! The pipeline reads left to right:
//! `probes` (kernel programs, rings, decoded events) -> `dns` (wire format) ->
//! `identity` (cgroup id -> pod, container, workload, resolv.conf) ->
//! `correlate` (pure: resolution chains joined to connects, classified) -> `record`s ->
//! `export` (OTLP spans, Prometheus metrics, text and JSON lines); `agent` runs them all.

pub mod agent;
pub mod cli;
pub mod correlate;
pub mod dns;
pub mod error;
pub mod export;
pub mod fast_hash;
pub mod identity;
/// A stand-in Kubernetes API server for the tests and benchmarks (see its module doc).
#[cfg(any(test, feature = "test-support"))]
pub mod kube_standin;
pub mod mountinfo;
pub mod networks;
pub mod probes;
pub mod record;
pub mod scope;
