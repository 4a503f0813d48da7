//! The `observer` command line, in the library so that the book's settings page can be
//! generated from the same clap definitions the binary parses (`cargo xtask docs`).
use clap::{Parser, Subcommand};

use crate::agent::config::RunArgs;

/// `observer --version` and the first log line: the release and the git commit it was built
/// from (build.rs; "unknown" for a tree without git history).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OBSERVER_GIT_COMMIT"),
    ")"
);

/// eBPF network flow observer for Kubernetes.
#[derive(Parser)]
#[command(name = "observer", version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: observe DNS and connects, correlate, print, export spans and metrics.
    Run(RunArgs),
    /// Print decoded kernel events live, one line each (debugging).
    Events(EventsArgs),
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Port carrying DNS (UDP and TCP, either end); repeat for several.
    #[arg(long = "dns-port", default_values_t = [53], value_name = "PORT")]
    pub dns_ports: Vec<u16>,
    /// Only print events of this cgroup v2 id (the inode number of the cgroup's directory,
    /// `stat -c %i`); repeat for several.
    #[arg(long = "cgroup-id", value_name = "ID")]
    pub cgroup_ids: Vec<u64>,
    /// Size of each kernel ring (DNS and connect) in KiB: a power of two, at least a page
    /// [default: DNS 4096, connect 2048].
    #[arg(long = "ring-size-kib", value_name = "KIB")]
    pub ring_size_kib: Option<u32>,
}
