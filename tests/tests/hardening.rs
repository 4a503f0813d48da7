//! Hardening, end to end through the real agent (`observer run`) in the testbed, as root:
//! hostile DNS and a flood of garbage on port 53 are counted and change nothing else; the
//! agent killed with SIGKILL leaves no program behind and a restart attaches once; a cgroup
//! removed while its events are in flight costs no panic and no record; names can be hashed;
//! the default log carries no names.
mod hardening_support;

use std::time::Duration;

use hardening_support::{HostileServer, eventually, run_hostile_client};
use observer_tests::{
    CgroupDriver, Family, QosClass,
    agent::{Agent, AgentSpec, http_get, metric_sum},
    bpf::{attached_to_cgroup_root, program_exists, program_ids_of},
    story::{EXTERNAL_DB, Story},
};
use serde_json::Value;

const RECORD_WAIT: Duration = Duration::from_secs(120);

fn agent_for(story: &Story, extra: &[&str]) -> Agent {
    let _ = story;
    Agent::start(
        AgentSpec::new()
            .args(["--cluster-cidr", "198.18.0.0/15"])
            .args(extra.iter().copied()),
    )
}

fn parse_errors(agent: &Agent, kind: &str) -> f64 {
    metric_sum(
        &agent.metrics(),
        "observer_dns_parse_errors_total",
        &[("kind", kind)],
    )
}

/// The port-53 flood saturates both cores and every agent on the machine: the other tests
/// of this file never run beside it, so that what they assert is not the flood's doing.
static FLOOD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside_no_flood() -> std::sync::RwLockReadGuard<'static, ()> {
    FLOOD.read().unwrap_or_else(|p| p.into_inner())
}

fn is_story_record(r: &Value, cgroup: u64) -> bool {
    r["cgroup_id"].as_u64() == Some(cgroup) && r["destination"]["port"].as_u64() == Some(5432)
}

#[test]
fn hostile_dns_is_counted_and_the_agent_keeps_classifying() {
    let _alone = FLOOD.write().unwrap_or_else(|p| p.into_inner());
    let story = Story::new();
    let evil = HostileServer::start(&story.tb);
    let agent = agent_for(&story, &[]);
    let before: Vec<f64> = ["bad_name", "truncated", "bad_counts"]
        .iter()
        .map(|k| parse_errors(&agent, k))
        .collect();

    let run = run_hostile_client(&story.pod, evil.addr(), 5, Duration::from_secs(3));
    // Every crafted answer reached the client: the kernel programs never drop traffic.
    for kind in ["loop", "cut", "counts", "noquestion", "random"] {
        assert_eq!(run.answered[kind], 5, "{kind} answers: {:?}", run.answered);
    }
    assert!(
        run.flood_sent > 1000,
        "flood of {} datagrams",
        run.flood_sent
    );

    // Each crafted answer crosses two sockets, but only the pod's ingress is parsed: the
    // server's egress is a response sent, told from its header as the server's side of the
    // exchange and skipped unparsed. Five answers of a kind, five parse errors.
    let expect = |i: usize, kind: &str| {
        let grew = eventually(RECORD_WAIT, || {
            parse_errors(&agent, kind) - before[i] >= 5.0
        });
        assert!(
            grew,
            "{kind} parse errors rose by {} (expected >= 5); metrics:\n{}",
            parse_errors(&agent, kind) - before[i],
            agent.metrics()
        );
    };
    expect(0, "bad_name");
    expect(1, "truncated");
    expect(2, "bad_counts");
    let metrics = agent.metrics();
    let counted: f64 = ["empty", "truncated", "bad_counts", "bad_name", "bad_record"]
        .iter()
        .map(|k| metric_sum(&metrics, "observer_dns_parse_errors_total", &[("kind", k)]))
        .sum();
    let lost = metric_sum(&metrics, "observer_kernel_events_lost_total", &[]);
    eprintln!(
        "flood: {} datagrams sent; parse errors counted {counted}, kernel events lost {lost}",
        run.flood_sent
    );

    for path in ["/healthz", "/readyz"] {
        let (code, body) = http_get(agent.metrics_addr(), path).expect(path);
        assert_eq!(code, 200, "{path} after hostile input: {body}");
    }

    // The seed story is still classified exactly.
    story.connect_family("db", Family::V4, EXTERNAL_DB.into());
    let cgroup = story.cgroup_id();
    let record = agent.wait_for_record(RECORD_WAIT, |r| is_story_record(r, cgroup));
    assert_eq!(record["resolution"], "search-escape", "{record}");
    assert_eq!(record["query_name"], "db", "{record}");
    assert_eq!(record["server_address"], "db.another-lab.com", "{record}");
    assert_eq!(record["search_domain"], "another-lab.com", "{record}");
    assert_eq!(record["wasted_queries"], 3, "{record}");
    assert_eq!(record["flagged"], true, "{record}");

    // At the default log level the log carries no DNS names and no payload bytes.
    let log = agent.stderr();
    for secret in [
        "another-lab",
        "simple-web-app",
        "evil.test",
        "noquestion",
        "db.",
        "\\x",
        "payload",
    ] {
        assert!(
            !log.contains(secret),
            "the default log mentions {secret:?}:\n{log}"
        );
    }
    let status = agent.stop();
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn sigkill_leaves_no_program_attached_and_a_restart_attaches_once() {
    let _shared = beside_no_flood();
    let first = Agent::start(AgentSpec::new().args(["--output", "none"]));
    let first_ids = program_ids_of(first.pid());
    assert_eq!(first_ids.len(), 5, "five programs loaded: {first_ids:?}");
    let attached = attached_to_cgroup_root();
    let first_cgroup: Vec<u32> = first_ids
        .iter()
        .copied()
        .filter(|id| attached.contains(id))
        .collect();
    // Every program is a cgroup program: packet ingress and egress, connect4, connect6,
    // sock_release.
    assert_eq!(
        first_cgroup.len(),
        5,
        "all five programs on the cgroup2 root: {attached:?}"
    );

    first.kill();
    // The kernel drops the links with the process's fds: nothing stays attached or loaded.
    let gone = eventually(Duration::from_secs(60), || {
        first_ids.iter().all(|id| !program_exists(*id))
    });
    let still: Vec<u32> = first_ids
        .iter()
        .copied()
        .filter(|id| program_exists(*id))
        .collect();
    assert!(gone, "programs left in the kernel after SIGKILL: {still:?}");
    let attached = attached_to_cgroup_root();
    assert!(
        first_cgroup.iter().all(|id| !attached.contains(id)),
        "still attached to the cgroup2 root after SIGKILL: {attached:?}"
    );

    let second = Agent::start(AgentSpec::new().args(["--output", "none"]));
    let second_ids = program_ids_of(second.pid());
    assert_eq!(
        second_ids.len(),
        5,
        "five programs after restart: {second_ids:?}"
    );
    let attached = attached_to_cgroup_root();
    for id in second_ids.iter().filter(|id| attached.contains(id)) {
        assert_eq!(
            attached.iter().filter(|a| *a == id).count(),
            1,
            "program {id} attached more than once: {attached:?}"
        );
    }
    assert_eq!(
        second_ids.iter().filter(|id| attached.contains(id)).count(),
        5,
        "the restarted agent attaches its five programs once: {attached:?}"
    );
    let (code, _) = http_get(second.metrics_addr(), "/readyz").expect("/readyz");
    assert_eq!(code, 200);
    drop(second);
}

#[test]
fn a_cgroup_removed_while_its_events_are_in_flight_costs_nothing() {
    let _shared = beside_no_flood();
    let story = Story::new();
    let agent = agent_for(&story, &[]);
    let cgroup = story
        .tb
        .kube_cgroup(CgroupDriver::Systemd, QosClass::Burstable)
        .expect("pod-shaped cgroup");
    let id = cgroup.container.id();
    let svc = story.tb.add_cluster_host("short").expect("cluster host");
    // Connect, exit, and remove the container's and the pod's cgroup at once: the agent reads
    // the connect from its ring and resolves the cgroup after it is gone.
    let out = svc
        .command("python3")
        .args([
            "-c",
            "import socket; s = socket.create_connection(('203.0.113.10', 5432), 5); s.close()",
        ])
        .in_cgroup(&cgroup.container)
        .output()
        .expect("connect from a short-lived cgroup");
    assert!(out.success(), "connect: {}", out.stderr);
    std::fs::remove_dir(cgroup.container.path()).expect("removing the container cgroup");
    std::fs::remove_dir(cgroup.pod.path()).expect("removing the pod cgroup");

    let record = agent.wait_for_record(RECORD_WAIT, |r| r["cgroup_id"].as_u64() == Some(id));
    assert_eq!(record["outcome"], "established", "{record}");
    assert_eq!(record["destination"]["address"], "203.0.113.10", "{record}");
    for path in ["/healthz", "/readyz"] {
        let (code, body) = http_get(agent.metrics_addr(), path).expect(path);
        assert_eq!(code, 200, "{path}: {body}");
    }
    // Still classifying after the vanished scope.
    story.connect_family("db", Family::V4, EXTERNAL_DB.into());
    let cgroup_web = story.cgroup_id();
    let record = agent.wait_for_record(RECORD_WAIT, |r| is_story_record(r, cgroup_web));
    assert_eq!(
        record["resolution"],
        "search-escape",
        "{record}\nkernel events lost: {}, let through out of order: {}\nagent log:\n{}",
        metric_sum(&agent.metrics(), "observer_kernel_events_lost_total", &[]),
        metric_sum(
            &agent.metrics(),
            "observer_core_evictions_total",
            &[("kind", "reorder_forced")]
        ),
        agent.stderr()
    );
    let status = agent.stop();
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn hashed_names_stay_joinable_and_never_leave_the_agent_in_clear() {
    let _shared = beside_no_flood();
    let story = Story::new();
    let agent = agent_for(&story, &["--redact-names", "hash"]);
    story.connect_family("db", Family::V4, EXTERNAL_DB.into());
    let cgroup = story.cgroup_id();
    let record = agent.wait_for_record(RECORD_WAIT, |r| is_story_record(r, cgroup));
    let query = record["query_name"]
        .as_str()
        .expect("query_name")
        .to_owned();
    assert!(
        query.starts_with('h') && query.len() == 13 && query != "db",
        "{record}"
    );
    assert_eq!(record["resolution"], "search-escape", "{record}");
    assert_eq!(
        record["server_address"],
        format!("{query}.another-lab.com"),
        "{record}"
    );
    assert_eq!(record["search_domain"], "another-lab.com", "{record}");
    assert_eq!(record["wasted_queries"], 3, "{record}");
    let chain: Vec<&str> = record["search_chain"]
        .as_array()
        .expect("search_chain")
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert!(
        chain
            .iter()
            .all(|n| n.starts_with(&format!("{query}.")) && !n.contains("simple-web-app")),
        "{chain:?}"
    );
    let message = record["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            "{query} resolved through search domain another-lab.com"
        )) && !message.contains("db "),
        "{message}"
    );
    let metrics = agent.metrics();
    assert!(
        !metrics.contains("\"db\"") && !metrics.contains("\"db.another-lab.com\""),
        "a clear name in /metrics:\n{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "observer_flagged_connections_total",
            &[("query_name", &query), ("search_domain", "another-lab.com")]
        ) >= 1.0,
        "the flagged connection is counted under its hashed name:\n{metrics}"
    );
    let status = agent.stop();
    assert!(status.success(), "exit after SIGTERM: {status}");
}
