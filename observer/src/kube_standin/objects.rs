//! Objects in the shapes the API server returns them (every field a kubelet or controller
//! fills in that matters to size, not only the ones the agent reads).
use serde_json::{Value, json};

/// A Pod bound to `node`; `owner` is its controller `(apiVersion, kind, name)`, and each
/// container is `(name, container id)`.
pub fn pod(
    name: &str,
    namespace: &str,
    uid: &str,
    node: &str,
    ip: &str,
    owner: Option<(&str, &str, &str)>,
    containers: &[(&str, &str)],
) -> Value {
    let owner_refs: Vec<Value> = owner
        .into_iter()
        .map(|(api_version, kind, owner_name)| {
            json!({
                "apiVersion": api_version, "kind": kind, "name": owner_name,
                "uid": format!("{owner_name}-uid"), "controller": true, "blockOwnerDeletion": true
            })
        })
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(cname, cid)| {
            json!({
                "name": cname, "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.example/{cname}:1.4.2"),
                "imageID": format!("registry.example/{cname}@sha256:9b1c0e8f4a5d"),
                "containerID": format!("containerd://{cid}"),
                "state": {"running": {"startedAt": "2025-06-01T10:00:03Z"}}
            })
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(|(cname, _)| {
            json!({
                "name": cname, "image": format!("registry.example/{cname}:1.4.2"),
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "terminationMessagePath": "/dev/termination-log",
                "imagePullPolicy": "IfNotPresent"
            })
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid,
            "creationTimestamp": "2025-06-01T10:00:00Z",
            "labels": {"app": name.split('-').next().unwrap_or(name), "pod-template-hash": "7d4b9c8f6d"},
            "ownerReferences": owner_refs
        },
        "spec": {
            "nodeName": node, "containers": specs, "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ]
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable", "hostIP": "198.18.0.2",
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": "2025-06-01T10:00:00Z",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2025-06-01T10:00:00Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2025-06-01T10:00:04Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2025-06-01T10:00:04Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-06-01T10:00:00Z"}
            ],
            "containerStatuses": statuses
        }
    })
}

/// A ReplicaSet or Job owned by `owner` `(kind, name)`: what the agent fetches by name.
pub fn owned(
    kind: &str,
    api_version: &str,
    name: &str,
    namespace: &str,
    owner: (&str, &str),
) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("{name}-uid"),
            "resourceVersion": "7",
            "ownerReferences": [{
                "apiVersion": if owner.0 == "Deployment" { "apps/v1" } else { "batch/v1" },
                "kind": owner.0, "name": owner.1, "uid": format!("{}-uid", owner.1),
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {}
    })
}

/// A ClusterIP Service at `ip`; uid `svc-<namespace>-<name>`.
pub fn service(name: &str, namespace: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{namespace}-{name}"),
                     "creationTimestamp": "2025-06-01T09:00:00Z", "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name}, "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

/// A headless Service (`clusterIP: None`): cluster DNS answers with its pods' addresses.
pub fn headless_service(name: &str, namespace: &str) -> Value {
    let mut svc = service(name, namespace, "None");
    svc["spec"]["clusterIPs"] = json!(["None"]);
    svc
}

/// A Service of type ExternalName: cluster DNS answers `<name>.<namespace>.svc.<domain>`
/// with a CNAME to `target`.
pub fn external_name_service(name: &str, namespace: &str, target: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{namespace}-{name}")},
        "spec": {"type": "ExternalName", "externalName": target, "sessionAffinity": "None"},
        "status": {"loadBalancer": {}}
    })
}

/// How many images a node's status lists: the kubelet reports up to 50.
const NODE_IMAGES: usize = 40;

/// A Node as its kubelet reports it: addresses, conditions with heartbeats, capacity,
/// node info and the images it holds (the bulk of its size); uid `node-<name>`.
pub fn node(name: &str, pod_cidr: &str, internal_ip: &str) -> Value {
    let images: Vec<Value> = (0..NODE_IMAGES)
        .map(|i| {
            json!({
                "names": [
                    format!("registry.example/team-{}/service-{i}@sha256:{:064x}", i % 7, i * 7919 + 1),
                    format!("registry.example/team-{}/service-{i}:v1.{i}.3", i % 7)
                ],
                "sizeBytes": 50_000_000 + i * 1_234_567
            })
        })
        .collect();
    let condition = |kind: &str, status: &str, reason: &str| {
        json!({
            "type": kind, "status": status, "reason": reason,
            "message": format!("kubelet reports {kind} {status}"),
            "lastHeartbeatTime": "2025-06-01T10:00:00Z",
            "lastTransitionTime": "2025-06-01T08:00:00Z"
        })
    };
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": format!("node-{name}"),
            "creationTimestamp": "2025-06-01T08:00:00Z",
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "m5.2xlarge",
                "topology.kubernetes.io/region": "eu-west-1", "topology.kubernetes.io/zone": "eu-west-1a"
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"
            }
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr], "providerID": format!("aws:///eu-west-1a/i-{name}")},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name}
            ],
            "capacity": {"cpu": "8", "memory": "32386524Ki", "pods": "110", "ephemeral-storage": "104845292Ki"},
            "allocatable": {"cpu": "7910m", "memory": "31371740Ki", "pods": "110", "ephemeral-storage": "95551679124"},
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady")
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": format!("{:032x}", name.len() * 4_099), "systemUUID": "ec2f3b6a-0000-4000-8000-000000000000",
                "bootID": "5d0c7a1e-1111-4222-8333-444455556666", "kernelVersion": "6.1.0-27-cloud-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.33.1", "kubeProxyVersion": "v1.33.1",
                "operatingSystem": "linux", "architecture": "amd64"
            },
            "images": images
        }
    })
}

/// The ServiceCIDR `kubernetes` holding `cidr`.
pub fn service_cidr(cidr: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes", "uid": "servicecidr-kubernetes"},
        "spec": {"cidrs": [cidr]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "",
                                   "lastTransitionTime": "2025-06-01T09:00:00Z"}]}
    })
}
