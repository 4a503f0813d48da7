//! The testbed's own tests: the mini-cluster really behaves like the cluster of the motivating
//! incident. Privileged: they fail (never skip) when not run as root.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use observer_tests::{
    CLOSED_PORT, CgroupDriver, ConnectOutcome, DnsConfig, DnsProbe, Family, LoggedQuery, PodSpec,
    QosClass, QueryOutcome, TestCommand, Transport, cgroup_of_pid, dns_probe_client_bin, plan,
    probe::qtype,
    story::{CONNECT_TIMEOUT, Story, service_db, story_pod, testbed},
};

const LOG_WAIT: Duration = Duration::from_secs(5);

/// The names glibc asked for, with their outcome, for A queries only, in order.
fn a_queries(log: &[LoggedQuery]) -> Vec<(String, QueryOutcome)> {
    log.iter()
        .filter(|q| q.qtype == "A")
        .map(|q| (q.name.clone(), q.outcome.clone()))
        .collect()
}

#[test]
fn the_search_list_escape_reproduces() {
    let story = Story::new();
    let (db, dns, pod) = (&story.db, &story.dns, &story.pod);

    let report = pod
        .connect_tcp("db", 5432, Family::Any, CONNECT_TIMEOUT)
        .expect("connect helper");
    let ConnectOutcome::Connected { peer, local } = report.outcome else {
        panic!(
            "the pod did not connect: {report:?}; dns log:\n{}",
            dns.raw_log().unwrap()
        );
    };
    assert_eq!(peer.ip(), IpAddr::V4(db.ipv4()));
    assert_eq!(local.ip(), IpAddr::V4(pod.ipv4()));
    story
        .listener
        .wait_for_peer(pod.ipv4().into(), LOG_WAIT)
        .expect("the external host saw the pod");

    let log = dns
        .wait_for_queries(LOG_WAIT, |q| {
            q.iter().any(|q| {
                q.name == "db.another-lab.com" && matches!(q.outcome, QueryOutcome::Answer(_))
            })
        })
        .expect("query log");
    let nx = QueryOutcome::NxDomain;
    assert_eq!(
        a_queries(&log),
        vec![
            ("db.simple-web-app.svc.cluster.local".into(), nx.clone()),
            ("db.svc.cluster.local".into(), nx.clone()),
            ("db.cluster.local".into(), nx),
            (
                "db.another-lab.com".into(),
                QueryOutcome::Answer(vec![db.ipv4().into()])
            ),
        ],
        "full log: {log:#?}"
    );
    assert!(
        log.iter().all(|q| q.client.ip() == IpAddr::V4(pod.ipv4())),
        "every query came from the pod: {log:#?}"
    );
}

#[test]
fn a_record_added_at_run_time_keeps_the_pod_in_the_cluster() {
    let story = Story::new();
    // The Service's record comes at run time, below.
    let (in_cluster, cluster_listener) = service_db(&story.tb);
    let (external, external_listener) = (&story.db, &story.listener);
    let (dns, pod) = (&story.dns, &story.pod);

    let first = pod
        .connect_tcp("db", 5432, Family::V4, CONNECT_TIMEOUT)
        .expect("connect");
    assert!(
        matches!(first.outcome, ConnectOutcome::Connected { peer, .. } if peer.ip() == IpAddr::V4(external.ipv4())),
        "{first:?}"
    );

    dns.add_record("db.simple-web-app.svc.cluster.local", in_cluster.ipv4())
        .expect("add record");
    let second = pod
        .connect_tcp("db", 5432, Family::V4, CONNECT_TIMEOUT)
        .expect("connect");
    assert!(
        matches!(second.outcome, ConnectOutcome::Connected { peer, .. } if peer.ip() == IpAddr::V4(in_cluster.ipv4())),
        "{second:?}"
    );
    assert!(in_cluster.ipv4().octets()[..2] == [198, 18]);
    cluster_listener
        .wait_for_peer(pod.ipv4().into(), LOG_WAIT)
        .expect("in-cluster host saw the second connect");
    assert_eq!(
        external_listener.accepted().len(),
        1,
        "only the first connect left the cluster"
    );

    dns.remove_record("db.simple-web-app.svc.cluster.local")
        .expect("remove record");
    let third = pod
        .connect_tcp("db", 5432, Family::V4, CONNECT_TIMEOUT)
        .expect("connect");
    assert!(
        matches!(third.outcome, ConnectOutcome::Connected { peer, .. } if peer.ip() == IpAddr::V4(external.ipv4())),
        "after removing the record the name escapes again: {third:?}"
    );
}

#[test]
fn processes_land_in_kubelet_shaped_cgroups_of_both_drivers() {
    let tb = testbed();
    for (driver, qos, shape) in [
        (
            CgroupDriver::Systemd,
            QosClass::Burstable,
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
        ),
        (
            CgroupDriver::Systemd,
            QosClass::Guaranteed,
            "/kubepods.slice/kubepods-pod",
        ),
        (
            CgroupDriver::Cgroupfs,
            QosClass::BestEffort,
            "/kubepods/besteffort/pod",
        ),
        (
            CgroupDriver::Cgroupfs,
            QosClass::Guaranteed,
            "/kubepods/pod",
        ),
    ] {
        let pod = tb
            .add_pod(
                PodSpec::new(&format!("p-{}", tb.namespaces().len()))
                    .driver(driver)
                    .qos(qos),
            )
            .expect("pod");
        let cg = pod.cgroup();
        assert!(cg.container.relative().starts_with(shape), "{cg:?}");
        let uid_in_path = match driver {
            CgroupDriver::Systemd => cg.pod_uid.replace('-', "_"),
            CgroupDriver::Cgroupfs => cg.pod_uid.clone(),
        };
        assert!(cg.pod.relative().contains(&uid_in_path));
        assert!(cg.container.relative().ends_with(&match driver {
            CgroupDriver::Systemd => format!("cri-containerd-{}.scope", cg.container_id),
            CgroupDriver::Cgroupfs => cg.container_id.clone(),
        }));

        // The process reports its own cgroup and network namespace from inside the pod.
        let out = pod
            .command("sh")
            .args([
                "-c",
                "cat /proc/self/cgroup; readlink /proc/self/ns/net; echo $$",
            ])
            .output()
            .expect("run in pod")
            .check("sh in pod")
            .expect("sh succeeded");
        assert!(
            out.stdout
                .lines()
                .any(|l| l == format!("0::{}", cg.container.relative())),
            "{}",
            out.stdout
        );
        let inode = pod.netns().inode().expect("netns inode");
        assert!(
            out.stdout.contains(&format!("net:[{inode}]")),
            "{}",
            out.stdout
        );
        let pid: u32 = out.stdout.lines().last().unwrap().parse().unwrap();
        assert_eq!(pid, out.pid, "ip netns exec execs the program itself");

        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(cg.container.path()).unwrap().ino();
        assert_eq!(cg.container.id(), ino);
        assert_ne!(cg.container.id(), cg.pod.id());
    }

    // A long-running process outside any pod, in the host cgroup.
    let host = tb.host_cgroup("agent").expect("host cgroup");
    assert!(host.relative().starts_with("/system.slice/observer-test-"));
    let mut sleeper = TestCommand::new("sleep")
        .arg("30")
        .in_cgroup(&host)
        .spawn()
        .expect("spawn");
    assert_eq!(
        cgroup_of_pid(sleeper.pid()).expect("cgroup of pid"),
        host.relative()
    );
    assert_eq!(host.procs().unwrap(), vec![sleeper.pid()]);
    sleeper.kill();
}

#[test]
fn nothing_of_the_run_remains_after_drop() {
    let tb = testbed();
    let dns = tb.start_dns(DnsConfig::dnsmasq()).expect("dnsmasq");
    let pod = story_pod(&tb, "web");
    let ext = tb.add_external_host("ext").expect("external");
    let _listener = ext.listen_tcp(80).expect("listen");
    tb.host_cgroup("host").expect("host cgroup");
    tb.kube_cgroup(CgroupDriver::Cgroupfs, QosClass::Burstable)
        .expect("cgroup");
    // A process left running in the pod: the teardown must kill it to remove the cgroup.
    let stray = pod.command("sleep").arg("60").spawn().expect("spawn");
    std::mem::forget(stray);

    let suffix = tb.run_id().suffix().to_owned();
    let namespaces = tb.namespaces();
    let cgroups = tb.cgroup_dirs();
    let etc = pod.resolv_conf_path().parent().unwrap().to_owned();
    let state = tb.state_dir().to_owned();
    let dns_pid = dns.pid();
    assert_eq!(
        namespaces.len(),
        4,
        "switch, dns, pod, external: {namespaces:?}"
    );
    assert!(cgroups.iter().all(|c| c.exists()));
    assert!(etc.join("resolv.conf").exists());

    tb.close().expect("clean teardown");

    let listing = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!listing.contains(&suffix), "namespaces left: {listing}");
    for c in &cgroups {
        assert!(!c.exists(), "cgroup left: {}", c.display());
    }
    assert!(!etc.exists());
    assert!(!state.exists());
    assert!(
        !Path::new(&format!("/proc/{dns_pid}")).exists(),
        "dnsmasq still running"
    );
}

#[test]
fn ipv6_only_name_connects_over_ipv6() {
    let tb = testbed();
    let ext = tb.add_external_host("v6only").expect("external");
    let listener = ext.listen_tcp(443).expect("listen");
    let dns = tb
        .start_dns(
            DnsConfig::dnsmasq()
                .local_zone("example.test")
                .record("v6.example.test", ext.ipv6()),
        )
        .expect("dnsmasq");
    let pod = tb
        .add_pod(
            PodSpec::new("v6")
                .search(["default.svc.cluster.local"])
                .ndots(1),
        )
        .expect("pod");
    assert!(ext.ipv6().segments()[..3] == [0x2001, 0xdb8, 0xe]);

    let report = pod
        .connect_tcp("v6.example.test", 443, Family::Any, CONNECT_TIMEOUT)
        .expect("connect");
    match report.outcome {
        ConnectOutcome::Connected { peer, local } => {
            assert_eq!(peer.ip(), IpAddr::V6(ext.ipv6()));
            assert_eq!(local.ip(), IpAddr::V6(pod.ipv6()));
        }
        other => panic!("{other:?}; dns log:\n{}", dns.raw_log().unwrap()),
    }
    listener
        .wait_for_peer(pod.ipv6().into(), LOG_WAIT)
        .expect("external host saw the pod over IPv6");
    let resolved = pod
        .resolve("v6.example.test", Family::Any)
        .expect("resolve");
    assert_eq!(resolved.addrs, Ok(vec![IpAddr::V6(ext.ipv6())]));
    let unknown = pod
        .resolve("nothing.example.test", Family::Any)
        .expect("resolve");
    assert!(unknown.addrs.is_err(), "{unknown:?}");
    let log = dns.queries().unwrap();
    assert!(
        log.iter()
            .any(|q| q.name == "nothing.example.test" && q.outcome == QueryOutcome::NxDomain)
    );
    assert!(log.iter().any(|q| q.qtype == "AAAA"
        && q.name == "v6.example.test"
        && q.outcome == QueryOutcome::Answer(vec![ext.ipv6().into()])));
}

#[test]
fn refused_and_unanswered_connects_end_differently() {
    let tb = testbed();
    let ext = tb.add_external_host("closed").expect("external");
    let pod = tb.add_pod(PodSpec::new("client")).expect("pod");
    let refused = pod
        .connect_tcp(
            &ext.ipv4().to_string(),
            CLOSED_PORT,
            Family::V4,
            CONNECT_TIMEOUT,
        )
        .expect("connect");
    assert_eq!(refused.outcome, ConnectOutcome::Refused);
    for addr in [
        IpAddr::V4(plan::UNANSWERED_EXTERNAL_V4),
        IpAddr::V4(plan::UNANSWERED_CLUSTER_V4),
        IpAddr::V6(plan::UNANSWERED_EXTERNAL_V6),
    ] {
        let silent = pod
            .connect_tcp(
                &addr.to_string(),
                80,
                Family::Any,
                Duration::from_millis(500),
            )
            .expect("connect");
        assert_eq!(silent.outcome, ConnectOutcome::TimedOut, "{addr}");
    }
}

#[test]
fn probe_client_reports_the_exact_bytes_over_udp_and_tcp() {
    let tb = testbed();
    let dns = tb
        .start_dns(DnsConfig::dnsmasq().record(
            "api.default.svc.cluster.local",
            Ipv4Addr::new(198, 18, 2, 7),
        ))
        .expect("dnsmasq");
    let pod = tb
        .add_pod(PodSpec::new("probe").driver(CgroupDriver::Cgroupfs))
        .expect("pod");
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut probe = DnsProbe::new(
            dns.socket_addr(),
            "api.default.svc.cluster.local",
            qtype::A,
            transport,
        );
        probe.id = Some(0xbeef);
        let r = pod
            .dns_probe(dns_probe_client_bin!(), &probe)
            .expect("probe");
        assert_eq!(r.error, None);
        assert_eq!(r.cgroup, pod.cgroup().container.relative());
        assert_eq!(r.cgroup_id, Some(pod.cgroup().container.id()));
        assert_eq!(r.local.ip(), IpAddr::V4(pod.ipv4()));
        assert_eq!(&r.query[..2], &[0xbe, 0xef]);
        let resp = r.response.expect("response");
        assert_eq!(&resp[..2], &[0xbe, 0xef], "same id");
        assert_eq!(resp[3] & 0x0f, 0, "rcode NOERROR");
        assert_eq!(
            &resp[resp.len() - 4..],
            &[198, 18, 2, 7],
            "the A record's address ends the answer"
        );
        dns.wait_for_queries(LOG_WAIT, |q| {
            q.iter()
                .any(|q| q.client == r.local && q.name == "api.default.svc.cluster.local")
        })
        .expect("the server logged the probe from its source port");
    }
    let mut nx = DnsProbe::new(
        dns.socket_addr(),
        "nope.cluster.local",
        qtype::AAAA,
        Transport::Udp,
    );
    nx.id = Some(7);
    let r = pod.dns_probe(dns_probe_client_bin!(), &nx).expect("probe");
    assert_eq!(r.response.expect("response")[3] & 0x0f, 3, "NXDOMAIN");
}

#[test]
fn leftovers_of_a_killed_run_are_removed_and_live_runs_are_not() {
    use std::io::{BufRead, BufReader};
    let live = testbed();
    let live_pod = live.add_pod(PodSpec::new("live")).expect("pod");

    let mut holder = std::process::Command::new(env!("CARGO_BIN_EXE_testbed-hold"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start testbed-hold");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("testbed-hold report");
    let report: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("testbed-hold printed {line:?}: {e}"));
    holder.kill().unwrap(); // SIGKILL: no teardown runs
    holder.wait().unwrap();

    let strings = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let namespaces = strings("namespaces");
    let cgroups = strings("cgroups");
    let etc = report["etc_netns"].as_str().unwrap().to_owned();
    let state = report["state_dir"].as_str().unwrap().to_owned();
    assert!(Path::new(&format!("/run/netns/{}", namespaces[0])).exists());
    assert!(cgroups.iter().all(|c| Path::new(c).exists()));

    // Other tests of this binary start testbeds meanwhile, and each start cleans leftovers
    // too: whichever cleanup gets there first removes the dead run's pieces, so the test
    // checks what is left, not which call removed it.
    let removed = observer_tests::cleanup_leftovers().expect("cleanup");
    for ns in &namespaces {
        assert!(
            !Path::new(&format!("/run/netns/{ns}")).exists(),
            "{ns} left"
        );
    }
    let live_ns = live_pod.netns().name().to_owned();
    assert!(
        !removed.namespaces.contains(&live_ns),
        "a live run's namespace was removed: {removed:?}"
    );
    for c in &cgroups {
        assert!(!Path::new(c).exists(), "{c} left");
    }
    assert!(!Path::new(&etc).exists());
    assert!(!Path::new(&state).exists());

    // This process's testbed is alive: untouched.
    assert!(live_pod.netns().path().exists());
    assert!(live_pod.cgroup().container.path().exists());
    assert!(live_pod.resolv_conf_path().exists());
}
