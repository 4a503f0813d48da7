//! Shared pieces of the pod scenarios: the agent as they start it, the pod-side client
//! program, and readers for the agent's JSON records.
use std::time::{Duration, Instant};

use observer_tests::{Process, TestCommand, agent::Agent, agent::AgentSpec, exec::PYTHON3};
use serde_json::Value;

/// The pod-side program (glibc lookups and connects, reported as JSON).
const CLIENT: &str = include_str!("client.py");

/// The testbed's cluster networks: pods, services, DNS, in-cluster hosts.
pub const CLUSTER_CIDRS: [&str; 2] = ["198.18.0.0/15", "2001:db8:c::/64"];

/// The real agent, told the testbed's cluster networks, without Kubernetes, logging the
/// queries it gives up on (debug level of the agent module).
pub fn start_agent() -> Agent {
    let filter = "info,observer::agent=debug,observer::agent::identities=trace";
    let mut spec = AgentSpec::new()
        .args(["--kube", "off", "--log-level", filter])
        .env("RUST_LOG", filter);
    for cidr in CLUSTER_CIDRS {
        spec = spec.args(["--cluster-cidr", cidr]);
    }
    Agent::start(spec)
}

/// Runs the client program (`mode` and its arguments) through `command` (a pod's, a
/// container's or a namespace's, which decides netns, resolv.conf and cgroup); its one JSON
/// line, with the exit checked.
pub fn client(command: impl FnOnce(&std::path::Path) -> TestCommand, args: &[&str]) -> Value {
    // A hang guard: the client bounds its own waits; python starts slowly under TCG.
    client_with_timeout(command, args, Duration::from_secs(120))
}

pub fn client_with_timeout(
    command: impl FnOnce(&std::path::Path) -> TestCommand,
    args: &[&str],
    timeout: Duration,
) -> Value {
    client_report(spawn_client(command, args), args, timeout)
}

/// Starts the client program without waiting for it (see [`client`]).
pub fn spawn_client(
    command: impl FnOnce(&std::path::Path) -> TestCommand,
    args: &[&str],
) -> Process {
    let python = PYTHON3.path().expect("python3 (Debian package python3)");
    command(&python)
        .args(["-c", CLIENT])
        .args(args)
        .spawn()
        .expect("starting the client program")
}

/// Waits (bounded) for a client started with [`spawn_client`] and parses its JSON line.
pub fn client_report(process: Process, args: &[&str], timeout: Duration) -> Value {
    let out = process
        .wait_output(timeout)
        .expect("the client program finished in time")
        .check(&format!("client {args:?}"))
        .expect("the client program succeeded");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("client {args:?} printed {:?}: {e}", out.stdout))
}

/// A string field of a record (None when null or absent).
pub fn text<'a>(record: &'a Value, field: &str) -> Option<&'a str> {
    record[field].as_str()
}

/// The names of a record's search chain, in order, with their query types.
pub fn chain_names(record: &Value) -> Vec<(String, String)> {
    record["search_chain"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_owned(),
                        s["type"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `cgroup_id` has at least `count` records; returns them all.
pub fn wait_for_records(
    agent: &Agent,
    cgroup_id: u64,
    count: usize,
    within: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let records = agent.records_of_cgroup(cgroup_id);
        if records.len() >= count {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "cgroup {cgroup_id} has {} records, expected {count} within {within:?}:\n{}\nagent log:\n{}",
            records.len(),
            records
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
