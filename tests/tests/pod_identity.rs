//! Pod identity end to end: processes in kubelet-shaped cgroups make real DNS queries and
//! connects, the real kernel programs report them with a cgroup id, and observer's identity
//! (host mode, on the real cgroup2 mount) turns that id back into the testbed's pod, container
//! and QoS class, and reads the pod's resolv.conf through a pid the kernel reported.
//! Privileged: fails (never skips) unless run as root.
mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use observer::{
    identity::{
        CgroupDriver as IdDriver, ContainerRuntime, Identity, IdentityConfig, KubeMode, PodMember,
        QosClass as IdQos, WorkloadIdentity,
    },
    probes::{Direction, Event, ProbeOptions},
    scope::ScopeKey,
};
use observer_tests::{
    CgroupDriver, ConnectOutcome, DnsConfig, DnsProbe, Family, Host, KubeCgroup, Pod, PodSpec,
    ProbeReport, QosClass, Transport, dns_probe_client_bin, exec::PYTHON3, plan, probe::qtype,
};
use support::{Capture, dns_packets, opens, outcomes, same_endpoint, testbed};

/// Hang guard for events that must come: generous, since guests under TCG run ~10x slower.
const EVENT_WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 8443;
const NAME: &str = "api.default.svc.cluster.local";

fn host_mode_identity() -> Identity {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(Identity::start(IdentityConfig {
            kube_mode: KubeMode::Off,
            ..IdentityConfig::default()
        }))
        .expect("identity in host mode")
}

fn dns_probe(pod: &Pod) -> ProbeReport {
    let probe = DnsProbe::new(
        SocketAddr::new(plan::DNS_V4.into(), 53),
        NAME,
        qtype::A,
        Transport::Udp,
    );
    let report = pod
        .dns_probe(dns_probe_client_bin!(), &probe)
        .expect("dns-probe-client");
    assert!(report.response.is_some(), "{report:?}");
    report
}

fn connect(pod: &Pod, host: &Host) -> u32 {
    let report = pod
        .connect_tcp(
            &host.ipv4().to_string(),
            PORT,
            Family::V4,
            Duration::from_secs(3),
        )
        .expect("connect");
    assert!(
        matches!(report.outcome, ConnectOutcome::Connected { .. }),
        "{report:?}"
    );
    report.pid
}

/// Waits for the DNS exchange of `report` (both ways) and the open and outcome of `pid`'s
/// connect, all in `cgroup`; returns those events.
fn wait_for_traffic(capture: &Capture, cgroup: u64, report: &ProbeReport, pid: u32) -> Vec<Event> {
    let events = capture.wait_for(
        &format!("DNS and connect events of cgroup {cgroup}"),
        EVENT_WAIT,
        |events| {
            let dns = dns_packets(events)
                .filter(|p| p.cgroup_id == cgroup)
                .filter(|p| {
                    same_endpoint(p.source, report.local)
                        || same_endpoint(p.destination, report.local)
                })
                .count();
            let open = opens(events).any(|c| c.pid == pid);
            let outcome = outcomes(events).any(|o| o.connect.pid == pid);
            dns >= 2 && open && outcome
        },
    );
    events
        .into_iter()
        .filter(|e| e.cgroup_id() == cgroup)
        .collect()
}

fn expected_qos(qos: QosClass) -> IdQos {
    match qos {
        QosClass::Guaranteed => IdQos::Guaranteed,
        QosClass::Burstable => IdQos::Burstable,
        QosClass::BestEffort => IdQos::BestEffort,
    }
}

/// The identity of an event's cgroup is the testbed's pod and container.
fn assert_pod_identity(identity: &WorkloadIdentity, cgroup: &KubeCgroup) {
    assert_eq!(
        identity.scope,
        ScopeKey::Pod(Arc::from(cgroup.pod_uid.as_str())),
        "{identity:#?}"
    );
    assert_eq!(
        identity.cgroup_path.as_deref(),
        Some(cgroup.container.relative())
    );
    let pod = identity.pod_cgroup.as_ref().expect("a pod cgroup");
    assert_eq!(pod.uid.as_str(), cgroup.pod_uid);
    assert_eq!(pod.qos, expected_qos(cgroup.qos), "{identity:#?}");
    let (driver, runtime) = match cgroup.driver {
        CgroupDriver::Systemd => (IdDriver::Systemd, ContainerRuntime::Containerd),
        // The cgroupfs driver writes the bare id: the runtime is not in the path.
        CgroupDriver::Cgroupfs => (IdDriver::Cgroupfs, ContainerRuntime::Unknown),
    };
    assert_eq!(pod.driver, driver);
    match &pod.member {
        PodMember::Container { id, runtime: seen } => {
            assert_eq!(id.as_str(), cgroup.container_id);
            assert_eq!(*seen, runtime);
        }
        other => panic!("a container, not {other:?}"),
    }
    assert_eq!(
        identity.container_id().map(|c| c.as_str()),
        Some(cgroup.container_id.as_str())
    );
    assert_eq!(identity.cgroup_error, None);
}

#[test]
fn pods_of_both_drivers_and_every_qos_class_resolve_from_kernel_cgroup_ids() {
    let tb = testbed();
    tb.start_dns(DnsConfig::dnsmasq().record(NAME, std::net::Ipv4Addr::new(198, 18, 2, 7)))
        .expect("dnsmasq");
    let svc = tb.add_cluster_host("svc").expect("cluster host");
    let _listener = svc.listen_tcp(PORT).expect("listener");
    let mut pods = Vec::new();
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        for qos in [
            QosClass::Burstable,
            QosClass::Guaranteed,
            QosClass::BestEffort,
        ] {
            let name = format!("p{}", pods.len());
            pods.push(
                tb.add_pod(PodSpec::new(&name).driver(driver).qos(qos))
                    .expect("pod"),
            );
        }
    }
    let capture = Capture::start(
        ProbeOptions::default(),
        pods.iter().map(|p| p.cgroup().container.id()),
    );
    let mut traffic = Vec::new();
    for pod in &pods {
        let report = dns_probe(pod);
        let pid = connect(pod, &svc);
        traffic.push((pod, report, pid));
    }
    let identity = host_mode_identity();
    for (pod, report, pid) in traffic {
        let cgroup = pod.cgroup();
        let events = wait_for_traffic(&capture, cgroup.container.id(), &report, pid);
        for event in &events {
            let pid = match event {
                Event::ConnectOpen(c) => Some(c.pid),
                Event::ConnectOutcome(o) => Some(o.connect.pid),
                Event::Dns(_) => None,
            };
            let resolved = identity.resolve(event.cgroup_id(), pid);
            assert_pod_identity(&resolved, cgroup);
        }
        assert!(
            dns_packets(&events).any(|p| p.direction == Direction::Ingress),
            "the response delivered to the pod carries the pod's cgroup too"
        );
    }
}

#[test]
fn containers_of_a_pod_share_its_scope_and_host_processes_keep_their_own() {
    let tb = testbed();
    tb.start_dns(DnsConfig::dnsmasq().record(NAME, std::net::Ipv4Addr::new(198, 18, 2, 7)))
        .expect("dnsmasq");
    let svc = tb.add_cluster_host("svc").expect("cluster host");
    let _listener = svc.listen_tcp(PORT).expect("listener");
    let app = tb
        .add_pod(PodSpec::new("app").driver(CgroupDriver::Cgroupfs))
        .expect("pod");
    let sidecar = tb.add_sidecar(&app).expect("sidecar container");
    let host = tb.host_cgroup("node-agent").expect("host cgroup");
    assert_ne!(sidecar.cgroup().container.id(), app.cgroup().container.id());
    assert_eq!(sidecar.cgroup().pod, app.cgroup().pod);

    let capture = Capture::start(
        ProbeOptions::default(),
        [
            app.cgroup().container.id(),
            sidecar.cgroup().container.id(),
            host.id(),
        ],
    );
    // The sidecar resolves and connects, the app too; a node process (its own cgroup
    // outside kubepods, run in the pod's network namespace to reach the testbed) as well.
    let app_traffic = (dns_probe(&app), connect(&app, &svc));
    let sidecar_traffic = (dns_probe(&sidecar), connect(&sidecar, &svc));
    let host_report = ProbeReport::parse(
        &app.netns()
            .command(dns_probe_client_bin!())
            .args([
                "--server",
                &SocketAddr::new(plan::DNS_V4.into(), 53).to_string(),
                "--name",
                NAME,
            ])
            .in_cgroup(&host)
            .output()
            .expect("host process")
            .check("dns-probe-client in the host cgroup")
            .expect("host process succeeded")
            .stdout,
    )
    .expect("report");
    assert_eq!(host_report.cgroup, host.relative());

    let identity = host_mode_identity();
    let mut pod_scopes = Vec::new();
    for (pod, (report, pid)) in [(&app, app_traffic), (&sidecar, sidecar_traffic)] {
        let events = wait_for_traffic(&capture, pod.cgroup().container.id(), &report, pid);
        for event in &events {
            let resolved = identity.resolve(event.cgroup_id(), None);
            assert_pod_identity(&resolved, pod.cgroup());
            pod_scopes.push(resolved.scope.clone());
        }
    }
    pod_scopes.dedup();
    assert_eq!(
        pod_scopes,
        vec![ScopeKey::Pod(Arc::from(app.cgroup().pod_uid.as_str()))],
        "app and sidecar are one scope"
    );

    let host_events = capture.wait_for("the host process's DNS", EVENT_WAIT, |events| {
        dns_packets(events)
            .filter(|p| p.cgroup_id == host.id())
            .count()
            >= 2
    });
    for p in dns_packets(&host_events).filter(|p| p.cgroup_id == host.id()) {
        let resolved = identity.resolve(p.cgroup_id, None);
        assert_eq!(resolved.scope, ScopeKey::Host(host.id()), "{resolved:#?}");
        assert_eq!(resolved.pod_cgroup, None);
        assert_eq!(resolved.cgroup_error, None);
        assert_eq!(resolved.cgroup_path.as_deref(), Some(host.relative()));
    }
}

// Connects and then stays alive, so its /proc/<pid>/root is there to read.
const CONNECT_AND_WAIT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
time.sleep(30)
"#;

#[test]
fn the_pods_resolv_conf_is_read_through_a_pid_the_kernel_reported() {
    let tb = testbed();
    let svc = tb.add_cluster_host("svc").expect("cluster host");
    let _listener = svc.listen_tcp(PORT).expect("listener");
    let search = [
        "simple-web-app.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        "another-lab.com",
    ];
    let pod = tb
        .add_pod(
            PodSpec::new("resolv")
                .search(search)
                .ndots(3)
                .option("timeout:2"),
        )
        .expect("pod");
    let cgroup = pod.cgroup().container.id();
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let _process = pod
        .command(PYTHON3.path().expect("python3"))
        .args(["-c", CONNECT_AND_WAIT, &svc.ipv4().to_string()])
        .arg(PORT.to_string())
        .spawn()
        .expect("process in the pod");
    let events = capture.wait_for("the pod's connect", EVENT_WAIT, |events| {
        opens(events).next().is_some()
    });
    let pid = opens(&events).next().expect("an open").pid;

    // What the process sees is the pod's file, bind-mounted by `ip netns exec` in its own
    // mount namespace, not the node's /etc/resolv.conf.
    let through_proc = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf"))
        .expect("resolv.conf through /proc/<pid>/root");
    assert_eq!(through_proc, pod.resolv_conf().render());
    let node = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert_ne!(node, through_proc, "the node's own file differs");

    let identity = host_mode_identity();
    let resolved = identity.resolve(cgroup, Some(pid));
    assert_pod_identity(&resolved, pod.cgroup());
    let resolver = resolved.resolver.as_ref().expect("the pod's resolv.conf");
    assert_eq!(resolver.search, search.map(String::from).to_vec());
    assert_eq!(resolver.ndots, 3);
    assert_eq!(resolver.timeout_secs, 2);
    assert_eq!(
        resolver.nameservers,
        vec![std::net::IpAddr::V4(plan::DNS_V4)]
    );
    assert!(resolver.issues.is_empty(), "{:?}", resolver.issues);
}
