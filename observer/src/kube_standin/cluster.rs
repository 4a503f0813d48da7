//! A simulated large cluster in the stand-in API server, and its churn.
//!
//! Addresses are only strings in API objects (nothing is ever sent to them): Node
//! InternalIPs in 198.18.0.0/16, Service cluster IPs in 198.19.0.0/16 (the ServiceCIDR), and
//! pod CIDRs of 2001:db8::/32, since 5,000 nodes' pod ranges do not fit in IPv4 test ranges.
use std::net::Ipv4Addr;

use serde_json::json;

use super::{
    ApiState, NODES, PODS, SERVICE_CIDRS, SERVICES,
    objects::{external_name_service, headless_service, node, owned, pod, service, service_cidr},
};

/// How big the cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterShape {
    pub nodes: usize,
    pub pods: usize,
    /// Pods bound to the agent's own node (of `pods`).
    pub pods_on_agent_node: usize,
    pub services: usize,
}

impl ClusterShape {
    /// Kubernetes' documented limits for one cluster, and a full node (110 pods, the
    /// kubelet's default maximum).
    pub const LARGE: ClusterShape = ClusterShape {
        nodes: 5_000,
        pods: 150_000,
        pods_on_agent_node: 110,
        services: 20_000,
    };

    /// The same cluster `factor` times as large; the agent's own node stays as full.
    pub fn scaled(self, factor: f64) -> ClusterShape {
        let scale = |n: usize| ((n as f64 * factor).round() as usize).max(1);
        ClusterShape {
            nodes: scale(self.nodes),
            pods: scale(self.pods).max(self.pods_on_agent_node),
            pods_on_agent_node: self.pods_on_agent_node,
            services: scale(self.services),
        }
    }
}

/// Changes per second, cluster-wide.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChurnRates {
    pub pod_changes: f64,
    pub service_changes: f64,
    pub node_status_updates: f64,
}

impl ChurnRates {
    /// A busy large cluster: 200 Pod and 50 Service changes per second, and every Node's
    /// status at the kubelet's rate (with node leases the kubelet posts its status every
    /// 5 minutes when nothing changes).
    pub fn busy(shape: ClusterShape) -> ChurnRates {
        ChurnRates {
            pod_changes: 200.0,
            service_changes: 50.0,
            node_status_updates: shape.nodes as f64 / 300.0,
        }
    }
}

/// Changes made so far, by collection (a Service recreated elsewhere counts two: its
/// deletion and its creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChangeCounts {
    pub pods: u64,
    pub services: u64,
    pub nodes: u64,
}

impl ChangeCounts {
    pub fn total(&self) -> u64 {
        self.pods + self.services + self.nodes
    }
}

/// The cluster as the churn sees it: what exists, to pick from.
pub struct SimulatedCluster {
    agent_node: String,
    node_names: Vec<String>,
    pod_uids: Vec<String>,
    /// `(uid, namespace, name)` of each Service.
    services: Vec<(String, String, String)>,
    next_id: u64,
    next_service_ip: u32,
    rng: fastrand::Rng,
    /// Fractions of a change carried from one churn step to the next.
    owed: [f64; 3],
    pub changes: ChangeCounts,
}

/// Namespaces the pods and Services are spread over.
const NAMESPACES: u64 = 500;
/// Pods per Deployment.
const REPLICAS: u64 = 10;
pub const SERVICE_NETWORK: &str = "198.19.0.0/16";

impl SimulatedCluster {
    /// Fills `state` (without telling any watch) with a cluster of `shape` whose first node
    /// is `agent_node`.
    pub fn populate(state: &mut ApiState, shape: ClusterShape, agent_node: &str) -> Self {
        let mut cluster = SimulatedCluster {
            agent_node: agent_node.to_owned(),
            node_names: Vec::with_capacity(shape.nodes),
            pod_uids: Vec::with_capacity(shape.pods),
            services: Vec::with_capacity(shape.services),
            next_id: 0,
            next_service_ip: 1,
            rng: fastrand::Rng::with_seed(17),
            owed: [0.0; 3],
            changes: ChangeCounts::default(),
        };
        for i in 0..shape.nodes {
            let name = if i == 0 {
                agent_node.to_owned()
            } else {
                format!("node-{i:05}")
            };
            state.upsert(NODES, node_object(i, &name), false);
            cluster.node_names.push(name);
        }
        for i in 0..shape.pods {
            let node = if i < shape.pods_on_agent_node {
                0
            } else {
                1 + i % shape.nodes.saturating_sub(1).max(1)
            };
            cluster.add_pod(state, node.min(shape.nodes - 1), false);
        }
        state.service_cidr_api = true;
        state.upsert(SERVICE_CIDRS, service_cidr(SERVICE_NETWORK), false);
        for _ in 0..shape.services {
            cluster.add_service(state, false);
        }
        cluster
    }

    pub fn agent_node(&self) -> &str {
        &self.agent_node
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn add_pod(&mut self, state: &mut ApiState, node_index: usize, notify: bool) {
        let id = self.id();
        let namespace = format!("ns-{}", id % NAMESPACES);
        let deployment = format!("app-{}", id / REPLICAS);
        let replicaset = format!("{deployment}-5d8f9c7b6");
        let name = format!("{replicaset}-{id:05x}");
        let uid = format!("{id:08x}-0000-4000-8000-{id:012x}");
        let node_name = self.node_names[node_index].clone();
        let ip = format!("2001:db8:0:{node_index:x}::{:x}", id & 0xffff);
        let container = format!("{id:064x}");
        state.upsert(
            PODS,
            pod(
                &name,
                &namespace,
                &uid,
                &node_name,
                &ip,
                Some(("apps/v1", "ReplicaSet", &replicaset)),
                &[("app", &container)],
            ),
            notify,
        );
        if node_name == self.agent_node {
            state.replicasets.insert(
                format!("{namespace}/{replicaset}"),
                owned(
                    "ReplicaSet",
                    "apps/v1",
                    &replicaset,
                    &namespace,
                    ("Deployment", &deployment),
                ),
            );
        }
        self.pod_uids.push(uid);
    }

    fn add_service(&mut self, state: &mut ApiState, notify: bool) {
        let id = self.id();
        let namespace = format!("ns-{}", id % NAMESPACES);
        let name = format!("svc-{id}");
        let mut object = match id % 10 {
            // One in ten headless, one in ten ExternalName, the rest with a cluster IP.
            0 => headless_service(&name, &namespace),
            1 => external_name_service(&name, &namespace, &format!("{name}.vendor.example")),
            _ => service(&name, &namespace, &self.service_ip().to_string()),
        };
        let uid = format!("svc-{id:08x}");
        object["metadata"]["uid"] = json!(uid);
        state.upsert(SERVICES, object, notify);
        self.services.push((uid, namespace, name));
    }

    /// The next cluster IP of the ServiceCIDR, wrapping within it.
    fn service_ip(&mut self) -> Ipv4Addr {
        let n = self.next_service_ip;
        self.next_service_ip = if n >= 0xfffe { 1 } else { n + 1 };
        Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8)
    }

    /// Makes the changes `rates` call for over `seconds`, telling the open watches.
    pub fn churn(&mut self, state: &mut ApiState, rates: ChurnRates, seconds: f64) {
        let due = |owed: &mut f64, rate: f64| {
            *owed += rate * seconds;
            let n = owed.floor();
            *owed -= n;
            n as u64
        };
        for _ in 0..due(&mut self.owed[0], rates.pod_changes) {
            self.change_pod(state);
        }
        for _ in 0..due(&mut self.owed[1], rates.service_changes) {
            self.change_service(state);
        }
        for _ in 0..due(&mut self.owed[2], rates.node_status_updates) {
            self.node_status(state);
        }
    }

    /// A pod created, updated (a container restarted) or deleted, one in three each.
    fn change_pod(&mut self, state: &mut ApiState) {
        self.changes.pods += 1;
        match self.rng.u8(0..3) {
            0 if !self.pod_uids.is_empty() => {
                let uid = self
                    .pod_uids
                    .swap_remove(self.rng.usize(..self.pod_uids.len()));
                state.delete(PODS, &uid, true);
            }
            1 if !self.pod_uids.is_empty() => {
                let uid = &self.pod_uids[self.rng.usize(..self.pod_uids.len())];
                if let Some(mut object) = state.get(PODS, uid) {
                    let restarts = &mut object["status"]["containerStatuses"][0]["restartCount"];
                    *restarts = json!(restarts.as_u64().unwrap_or(0) + 1);
                    state.upsert(PODS, object, true);
                }
            }
            _ => {
                let node = self.rng.usize(..self.node_names.len());
                self.add_pod(state, node, true);
            }
        }
    }

    /// A Service updated (its annotations), recreated under another cluster IP, deleted or
    /// created.
    fn change_service(&mut self, state: &mut ApiState) {
        self.changes.services += 1;
        let pick = self.rng.u8(0..10);
        if self.services.is_empty() || pick >= 8 {
            self.add_service(state, true);
            return;
        }
        let index = self.rng.usize(..self.services.len());
        match pick {
            0..=3 => {
                let uid = &self.services[index].0;
                if let Some(mut object) = state.get(SERVICES, uid) {
                    object["metadata"]["annotations"] =
                        json!({"deploy.example/revision": self.next_id.to_string()});
                    state.upsert(SERVICES, object, true);
                }
                self.next_id += 1;
            }
            4..=5 => {
                // Deleted and created again under the same name: a new uid and address.
                let (uid, namespace, name) = self.services.swap_remove(index);
                state.delete(SERVICES, &uid, true);
                let id = self.id();
                let new_uid = format!("svc-{id:08x}");
                let mut object = service(&name, &namespace, &self.service_ip().to_string());
                object["metadata"]["uid"] = json!(new_uid);
                state.upsert(SERVICES, object, true);
                self.services.push((new_uid, namespace, name));
                self.changes.services += 1;
            }
            _ => {
                let (uid, ..) = self.services.swap_remove(index);
                state.delete(SERVICES, &uid, true);
            }
        }
    }

    /// A Node's kubelet posts its status: new heartbeat times, nothing else changed.
    fn node_status(&mut self, state: &mut ApiState) {
        self.changes.nodes += 1;
        let index = self.rng.usize(..self.node_names.len());
        let uid = format!("node-{}", self.node_names[index]);
        if let Some(mut object) = state.get(NODES, &uid) {
            let beat = format!(
                "2025-06-01T10:{:02}:{:02}Z",
                self.next_id / 60 % 60,
                self.next_id % 60
            );
            self.next_id += 1;
            if let Some(conditions) = object["status"]["conditions"].as_array_mut() {
                for condition in conditions {
                    condition["lastHeartbeatTime"] = json!(beat);
                }
            }
            state.upsert(NODES, object, true);
        }
    }
}

fn node_object(index: usize, name: &str) -> serde_json::Value {
    let internal_ip = Ipv4Addr::new(198, 18, (index / 250) as u8, (index % 250 + 1) as u8);
    node(
        name,
        &format!("2001:db8:0:{index:x}::/64"),
        &internal_ip.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_has_its_shape_and_churns_at_its_rates() {
        let shape = ClusterShape::LARGE.scaled(0.01);
        let mut state = ApiState::new();
        let mut cluster = SimulatedCluster::populate(&mut state, shape, "node-a");
        assert_eq!(state.len(NODES), 50);
        assert_eq!(state.len(PODS), 1_500);
        assert_eq!(state.len(SERVICES), 200);
        let rates = ChurnRates::busy(shape);
        for _ in 0..100 {
            cluster.churn(&mut state, rates, 0.1);
        }
        let made = cluster.changes;
        assert_eq!(made.pods, 2_000);
        assert!(made.services >= 500, "{made:?}");
        assert_eq!(made.nodes, 1);
    }
}
