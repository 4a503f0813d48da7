//! observer's testbed: a mini-cluster on one machine for the privileged integration tests.
//!
//! A [`Testbed`] builds, inside network namespaces only, a switch namespace that routes between
//! a cluster segment (198.18.0.0/16, 2001:db8:c::/64) and an external segment (203.0.113.0/24,
//! 2001:db8:e::/64); a dns namespace where a real dnsmasq serves the cluster ([`DnsServer`]);
//! pods ([`Pod`]) with their own resolv.conf and kubelet-shaped cgroups; hosts ([`Host`]) with
//! TCP listeners. Every name carries a per-run suffix, and everything is removed when the
//! testbed drops, also on panic. See the book (docs/), "The testbed".
pub mod agent;
pub mod bpf;
pub mod cgroup;
pub mod cleanup;
pub mod dashboard;
pub mod deploy_files;
pub mod dns;
pub mod error;
pub mod exec;
pub mod host;
pub mod kube_api;
pub mod names;
pub mod netns;
pub mod otlp;
pub mod pod;
pub mod probe;
pub mod prometheus;
pub mod story;
pub mod testbed;
pub mod traces;

pub use cgroup::{CgroupDir, CgroupDriver, KubeCgroup, QosClass, cgroup_of_pid, cgroup2_mount};
pub use cleanup::{LeftoverReport, cleanup_leftovers};
pub use dns::{DnsConfig, DnsRecord, DnsServer, DnsServerKind, LoggedQuery, QueryOutcome};
pub use error::{Result, TestbedError};
pub use exec::{CommandOutput, Process, REQUIRED_PACKAGES};
pub use host::{CLOSED_PORT, Host, HostKind, TcpServer};
pub use names::RunId;
pub use netns::{NetNs, TestCommand};
pub use pod::{ConnectOutcome, ConnectReport, Family, Pod, PodSpec, ResolvConf, ResolveReport};
pub use probe::{DnsProbe, ProbeReport, Transport};
pub use testbed::{Testbed, plan, require_root};
