//! The large-cluster phase: the real agent (`--kube auto`) against the stand-in API server
//! (`observer::kube_standin`) holding a simulated cluster of 5,000 Nodes, 150,000 Pods and
//! 20,000 Services, and against the same cluster at 1/10 with the same churn.
//!
//! Idle is the agent against an empty cluster (the API answers, nothing is in it), synced
//! and settled: what the agent costs without Kubernetes data. Loaded is the same agent
//! process's resident memory once synced with the cluster and settled.
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::bail;
use observer::kube_standin::{
    ApiState, BOOKMARK_EVERY, BackgroundStandIn, COLLECTIONS,
    cluster::{ChangeCounts, ChurnRates, ClusterShape, SimulatedCluster},
};
use serde::Serialize;

use super::{
    agent::AgentProcess,
    report::{Goal, Row},
};

const AGENT_NODE: &str = "bench-node";
/// How long the agent may take to list a cluster: generous, the machine is shared.
const SYNC_WITHIN: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize)]
pub struct ClusterRun {
    pub nodes: usize,
    pub pods: usize,
    pub services: usize,
    pub sync_secs: f64,
    pub rss_loaded_mib: f64,
    pub hwm_loaded_mib: f64,
    pub rss_after_churn_mib: f64,
    pub churn_secs: f64,
    pub changes: ChangeCounts,
    pub agent_cpu_percent: f64,
    /// Before the churn, synced, nothing changing.
    pub quiet_cpu_percent: f64,
    pub cpu_us_per_change: f64,
    /// Bytes the stand-in sent the agent, by collection, for the initial lists.
    pub list_bytes: u64,
    pub bytes_per_minute: f64,
    pub bytes_per_minute_by_collection: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct KubeCost {
    pub rss_idle_mib: f64,
    /// The 1/10 cluster, then the large one.
    pub runs: Vec<ClusterRun>,
    /// The large cluster with `--cluster-cidr` given (no Node watch).
    pub networks_given: ClusterRun,
}

/// The simulated cluster's networks (see `kube_standin::cluster`): Nodes, Services, pods.
const CLUSTER_NETWORKS: [&str; 3] = ["198.18.0.0/16", "198.19.0.0/16", "2001:db8::/32"];

/// Runs the phase: idle, then the 1/10 cluster, then the large one.
pub fn measure(agent_bin: &Path, out: &Path, quick: bool) -> anyhow::Result<KubeCost> {
    // The seconds after a sync are not quiet (the lists' memory handed back, owner fetches):
    // a quick run shortens the churn, not the settling.
    let settle = Duration::from_secs(5);
    let churn = Duration::from_secs(if quick { 15 } else { 30 });

    eprintln!("[bench] kube: the agent against an empty cluster (idle)");
    let empty = Arc::new(Mutex::new(ApiState::new()));
    let standin = BackgroundStandIn::start(empty, BOOKMARK_EVERY, &out.join("kubeconfig-idle"))?;
    let agent = AgentProcess::start_with_kube(
        agent_bin,
        standin.kubeconfig(),
        AGENT_NODE,
        &[],
        &out.join("agent-kube-idle.log"),
    )?;
    wait_synced(&agent)?;
    std::thread::sleep(settle);
    let rss_idle_mib = agent.rss_kib()?.0 as f64 / 1024.0;
    agent.stop()?;
    drop(standin);

    let mut runs = Vec::new();
    for factor in [0.1, 1.0] {
        let shape = ClusterShape::LARGE.scaled(factor);
        runs.push(cluster_run(agent_bin, out, shape, &[], settle, churn)?);
    }
    // The large cluster again, its networks given: no Node watch.
    let given = CLUSTER_NETWORKS.map(|n| ["--cluster-cidr".to_owned(), n.to_owned()]);
    let runs_given = cluster_run(
        agent_bin,
        out,
        ClusterShape::LARGE,
        given.as_flattened(),
        settle,
        churn,
    )?;
    Ok(KubeCost {
        rss_idle_mib,
        runs,
        networks_given: runs_given,
    })
}

fn cluster_run(
    agent_bin: &Path,
    out: &Path,
    shape: ClusterShape,
    agent_args: &[String],
    settle: Duration,
    churn: Duration,
) -> anyhow::Result<ClusterRun> {
    eprintln!(
        "[bench] kube: {} nodes, {} pods, {} services: building the cluster",
        shape.nodes, shape.pods, shape.services
    );
    let mut state = ApiState::new();
    let mut cluster = SimulatedCluster::populate(&mut state, shape, AGENT_NODE);
    let state = Arc::new(Mutex::new(state));
    let standin = BackgroundStandIn::start(
        Arc::clone(&state),
        BOOKMARK_EVERY,
        &out.join(format!("kubeconfig-{}", shape.nodes)),
    )?;
    let started = Instant::now();
    let agent = AgentProcess::start_with_kube(
        agent_bin,
        standin.kubeconfig(),
        AGENT_NODE,
        agent_args,
        &out.join(format!(
            "agent-kube-{}{}.log",
            shape.nodes,
            if agent_args.is_empty() { "" } else { "-given" }
        )),
    )?;
    wait_synced(&agent)?;
    let sync_secs = started.elapsed().as_secs_f64();
    // The agent's CPU without churn (its own timers, and whatever traffic the machine's
    // other processes make: the kernel programs see the whole node).
    let (quiet0, quiet_t) = (agent.cpu_seconds()?, Instant::now());
    std::thread::sleep(settle);
    let quiet_cpu_percent =
        (agent.cpu_seconds()? - quiet0) / quiet_t.elapsed().as_secs_f64() * 100.0;
    let (rss, hwm) = agent.rss_kib()?;
    let sent = |state: &Mutex<ApiState>| {
        let api = state.lock().unwrap_or_else(|p| p.into_inner());
        COLLECTIONS.map(|c| api.bytes_sent(c))
    };
    let before = sent(&state);
    let list_bytes = before.iter().sum();

    eprintln!(
        "[bench] kube: churn for {} s (200 pod, 50 service changes/s, {:.1} node status updates/s)",
        churn.as_secs(),
        ChurnRates::busy(shape).node_status_updates
    );
    let changes0 = cluster.changes;
    let cpu0 = agent.cpu_seconds()?;
    let t0 = Instant::now();
    churn_for(&state, &mut cluster, ChurnRates::busy(shape), churn);
    let churn_secs = t0.elapsed().as_secs_f64();
    let cpu = agent.cpu_seconds()? - cpu0;
    let after = sent(&state);
    let rss_after_churn_mib = agent.rss_kib()?.0 as f64 / 1024.0;
    agent.stop()?;
    let changes = ChangeCounts {
        pods: cluster.changes.pods - changes0.pods,
        services: cluster.changes.services - changes0.services,
        nodes: cluster.changes.nodes - changes0.nodes,
    };
    let per_minute = |i: usize| (after[i] - before[i]) as f64 / churn_secs * 60.0;
    Ok(ClusterRun {
        nodes: shape.nodes,
        pods: shape.pods,
        services: shape.services,
        sync_secs,
        rss_loaded_mib: rss as f64 / 1024.0,
        hwm_loaded_mib: hwm as f64 / 1024.0,
        rss_after_churn_mib,
        churn_secs,
        changes,
        agent_cpu_percent: cpu / churn_secs * 100.0,
        quiet_cpu_percent,
        cpu_us_per_change: cpu * 1e6 / changes.total().max(1) as f64,
        list_bytes,
        bytes_per_minute: (0..COLLECTIONS.len()).map(per_minute).sum(),
        bytes_per_minute_by_collection: COLLECTIONS
            .iter()
            .enumerate()
            .map(|(i, c)| ((*c).to_owned(), per_minute(i)))
            .collect(),
    })
}

/// Churns the cluster in steps of a tenth of a second, each as long as the time that
/// really passed, so that the rates hold even when a step runs late.
fn churn_for(
    state: &Mutex<ApiState>,
    cluster: &mut SimulatedCluster,
    rates: ChurnRates,
    duration: Duration,
) {
    let started = Instant::now();
    let mut last = started;
    while last.duration_since(started) < duration {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let step = now.duration_since(last).as_secs_f64();
        last = now;
        cluster.churn(
            &mut state.lock().unwrap_or_else(|p| p.into_inner()),
            rates,
            step,
        );
    }
}

/// Waits until the agent reports its Kubernetes data synced (`observer_enrichment_status`
/// in state `kube`).
fn wait_synced(agent: &AgentProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + SYNC_WITHIN;
    while agent.metric_with("observer_enrichment_status", &[("state", "kube")])? != 1.0 {
        if Instant::now() > deadline {
            bail!("the agent did not sync with the stand-in API server within {SYNC_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The phase's rows: memory, CPU, CPU per change at both sizes, bytes per minute.
pub fn rows(cost: &KubeCost) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(
        Row::new(
            "agent resident memory, kube idle (empty cluster)",
            cost.rss_idle_mib,
            "MiB",
            Goal::Below,
            48.0,
        )
        .note("VmRSS of `observer run --kube auto` synced with a stand-in API server holding no objects, settled"),
    );
    let labelled = cost.runs.iter().map(|run| (run, "")).chain([(
        &cost.networks_given,
        ", --cluster-cidr given (no Node watch)",
    )]);
    for (run, how) in labelled {
        let size = format!(
            "{} nodes / {} pods / {} services{how}",
            run.nodes, run.pods, run.services
        );
        rows.push(
            Row::new(
                &format!("agent memory above idle, {size}"),
                run.rss_loaded_mib - cost.rss_idle_mib,
                "MiB",
                Goal::AtMost,
                64.0,
            )
            .note(format!(
                "VmRSS {:.1} MiB once synced and settled (VmHWM {:.1} MiB, the initial lists included; VmRSS {:.1} MiB after the churn) less idle {:.1} MiB; synced {:.1} s after start; the lists were {:.1} MiB",
                run.rss_loaded_mib,
                run.hwm_loaded_mib,
                run.rss_after_churn_mib,
                cost.rss_idle_mib,
                run.sync_secs,
                run.list_bytes as f64 / 1048576.0
            )),
        );
        rows.push(
            Row::new(
                &format!("agent CPU during churn, {size}"),
                run.agent_cpu_percent,
                "% of a core",
                Goal::AtMost,
                2.0,
            )
            .note(format!(
                "utime+stime over {:.0} s of churn: {} pod, {} service, {} node changes cluster-wide (the agent hears its node's pods, every Service and Node); the same agent before the churn, nothing changing: {:.2} %",
                run.churn_secs, run.changes.pods, run.changes.services, run.changes.nodes, run.quiet_cpu_percent
            )),
        );
        let by: Vec<String> = run
            .bytes_per_minute_by_collection
            .iter()
            .filter(|(_, b)| *b > 0.0)
            .map(|(c, b)| format!("{c} {:.0} KiB", b / 1024.0))
            .collect();
        rows.push(
            Row::new(
                &format!("bytes from the API server per minute of churn, {size}"),
                run.bytes_per_minute / 1024.0,
                "KiB/min",
                Goal::AtMost,
                f64::INFINITY,
            )
            .note(format!(
                "response bytes the stand-in sent the agent (watch events, bookmarks, relists), reported: {}",
                by.join(", ")
            )),
        );
    }
    if let [small, large] = cost.runs.as_slice() {
        rows.push(
            Row::new(
                "agent CPU per cluster change, large cluster / 1/10 cluster",
                large.cpu_us_per_change / small.cpu_us_per_change,
                "ratio",
                Goal::AtMost,
                1.5,
            )
            .note(format!(
                "CPU during churn / changes made cluster-wide: {:.1} us per change with {} nodes, {:.1} us with {} (the same churn; a change costs the same whatever the cluster's size)",
                large.cpu_us_per_change, large.nodes, small.cpu_us_per_change, small.nodes
            )),
        );
    }
    rows
}
