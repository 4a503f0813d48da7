//! The real kernel programs, loaded into this kernel, watching real traffic of testbed pods:
//! what they deliver is compared byte for byte with what the pod's client really sent and
//! received. Privileged: fails (never skips) unless run as root.
//!
//! The programs attached to the cgroup2 root see the whole machine, so every assertion is
//! about events of the test's own cgroups (a pod's container cgroup id).
mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use observer::probes::{
    Connect, ConnectResult, Direction, DnsPacket, Event, ProbeOptions, Probes, Protocol,
};
use observer_common::LossCounter;
use observer_tests::{
    CLOSED_PORT, ConnectOutcome, DnsConfig, DnsProbe, Family, Host, Pod, PodSpec, ProbeReport,
    TestCommand, Transport,
    bpf::{BpfFds, bpf_fds, program_exists},
    dns_probe_client_bin,
    exec::{DNSMASQ, PYTHON3, Process},
    plan,
    probe::qtype,
};
use support::{
    Capture, EchoServer, dns_packets, exclusive, flow, opens, outcomes, reassemble, same_endpoint,
    tcp_framed, testbed,
};

const API_NAME: &str = "api.default.svc.cluster.local";
const API_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 7);
const API_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0x2, 0x7);
/// A name with this many A records answers more than the 2048 captured bytes over TCP.
const MANY_NAME: &str = "many.default.svc.cluster.local";
const MANY_RECORDS: u8 = 200;
/// Hang guard for events that must come: generous, since guests under TCG run ~10x slower.
const EVENT_WAIT: Duration = Duration::from_secs(60);
const CAPTURE_MAX: usize = observer_common::DNS_PAYLOAD_MAX;

fn dns_config() -> DnsConfig {
    let mut config = DnsConfig::dnsmasq()
        .record(API_NAME, API_V4)
        .record(API_NAME, API_V6);
    for n in 1..=MANY_RECORDS {
        config = config.record(MANY_NAME, Ipv4Addr::new(198, 18, 100, n));
    }
    config
}

fn server_v4() -> SocketAddr {
    SocketAddr::new(plan::DNS_V4.into(), 53)
}

fn server_v6() -> SocketAddr {
    SocketAddr::new(plan::DNS_V6.into(), 53)
}

fn probe(pod: &Pod, server: SocketAddr, name: &str, transport: Transport) -> ProbeReport {
    let mut probe = DnsProbe::new(server, name, qtype::A, transport);
    // A hang guard, not a bound: every probe here must be answered, and a large TCP answer
    // takes seconds in a guest under TCG.
    probe.timeout = Duration::from_secs(30);
    let report = pod
        .dns_probe(dns_probe_client_bin!(), &probe)
        .expect("dns-probe-client");
    assert_eq!(report.error, None, "the DNS exchange failed: {report:?}");
    report
}

/// The captured exchange of one probe report: every packet of its flow in each direction.
struct Exchange<'a> {
    egress: Vec<&'a DnsPacket>,
    ingress: Vec<&'a DnsPacket>,
}

fn exchange<'a>(events: &'a [Event], report: &ProbeReport) -> Exchange<'a> {
    let protocol = match report.transport {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    Exchange {
        egress: flow(
            events,
            Direction::Egress,
            protocol,
            report.local,
            report.server,
        ),
        ingress: flow(
            events,
            Direction::Ingress,
            protocol,
            report.server,
            report.local,
        ),
    }
}

/// The bytes on the wire: the message itself over UDP, length prefix + message over TCP.
fn wire(report: &ProbeReport, message: &[u8]) -> Vec<u8> {
    match report.transport {
        Transport::Udp => message.to_vec(),
        Transport::Tcp => tcp_framed(message),
    }
}

fn stream_of(report: &ProbeReport, packets: &[&DnsPacket]) -> Option<Vec<u8>> {
    match report.transport {
        Transport::Udp => packets.first().map(|p| p.payload.to_vec()),
        Transport::Tcp => reassemble(packets),
    }
}

/// Waits for the kernel's view of `report`'s exchange and checks it against the client's
/// own bytes: exact query and response, the pod's cgroup, the 4-tuple, protocol, direction.
fn assert_exchange_captured(capture: &Capture, report: &ProbeReport, cgroup: u64) {
    let response = report.response.clone().expect("a response");
    let (query_wire, response_wire) = (wire(report, &report.query), wire(report, &response));
    let events = capture.wait_for(
        &format!("the exchange of {report:?}"),
        EVENT_WAIT,
        |events| {
            let x = exchange(events, report);
            stream_of(report, &x.egress).as_ref() == Some(&query_wire)
                && stream_of(report, &x.ingress).as_ref() == Some(&response_wire)
        },
    );
    let x = exchange(&events, report);
    let all: Vec<&DnsPacket> = x.egress.iter().chain(&x.ingress).copied().collect();
    for p in &all {
        assert_eq!(p.cgroup_id, cgroup, "the pod container's cgroup: {p:?}");
        assert!(!p.truncated, "{p:?}");
        assert_eq!(p.payload_len as usize, p.payload.len(), "{p:?}");
        assert_eq!(
            p.socket_cookie, all[0].socket_cookie,
            "one client socket for the whole exchange"
        );
    }
    match report.transport {
        Transport::Udp => {
            assert_eq!(x.egress.len(), 1, "one query datagram: {:#?}", x.egress);
            assert_eq!(
                x.ingress.len(),
                1,
                "one response datagram: {:#?}",
                x.ingress
            );
            assert!(all.iter().all(|p| p.tcp_seq.is_none()));
        }
        Transport::Tcp => assert!(all.iter().all(|p| p.tcp_seq.is_some())),
    }
}

fn kernel_test_pod(tb: &observer_tests::Testbed, name: &str) -> (Pod, u64) {
    let pod = tb.add_pod(PodSpec::new(name)).expect("pod");
    let cgroup = pod.cgroup().container.id();
    (pod, cgroup)
}

#[test]
fn udp_dns_over_ipv4_and_ipv6_is_delivered_byte_exact() {
    let tb = testbed();
    tb.start_dns(dns_config()).expect("dnsmasq");
    let (pod, cgroup) = kernel_test_pod(&tb, "udp");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    for server in [server_v4(), server_v6()] {
        let report = probe(&pod, server, API_NAME, Transport::Udp);
        assert_eq!(report.cgroup_id, Some(cgroup));
        assert_exchange_captured(&capture, &report, cgroup);
    }
    assert_eq!(capture_decode_errors(capture), 0);
}

#[test]
fn tcp_dns_over_ipv4_and_ipv6_reassembles_to_the_exact_bytes() {
    let tb = testbed();
    tb.start_dns(dns_config()).expect("dnsmasq");
    let (pod, cgroup) = kernel_test_pod(&tb, "tcp");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    for server in [server_v4(), server_v6()] {
        let report = probe(&pod, server, API_NAME, Transport::Tcp);
        assert_exchange_captured(&capture, &report, cgroup);
    }
    assert_eq!(capture_decode_errors(capture), 0);
}

fn capture_decode_errors(mut capture: Capture) -> u64 {
    capture.probes().decode_errors()
}

#[test]
fn a_response_over_the_capture_size_is_cut_flagged_and_counted() {
    let tb = testbed();
    tb.start_dns(dns_config()).expect("dnsmasq");
    let (pod, cgroup) = kernel_test_pod(&tb, "big");
    let mut capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let cut_before = capture
        .probes()
        .loss_counters()
        .expect("loss counters")
        .get(LossCounter::DnsCaptureCut);

    let report = probe(&pod, server_v4(), MANY_NAME, Transport::Tcp);
    let response = tcp_framed(report.response.as_deref().expect("response"));
    assert!(
        response.len() > CAPTURE_MAX,
        "the answer must exceed the capture size: {} bytes",
        response.len()
    );
    // The kernel sees the response as one or more segments; those longer than the capture
    // size arrive cut. Done when the segments cover the whole response.
    let covered = |events: &[Event]| -> u64 {
        let x = exchange(events, &report);
        let mut seqs: Vec<(u32, u32)> = x
            .ingress
            .iter()
            .map(|p| (p.tcp_seq.unwrap_or(0), p.payload_len))
            .collect();
        seqs.sort();
        seqs.dedup();
        seqs.iter().map(|(_, len)| u64::from(*len)).sum()
    };
    let events = capture.wait_for("the large response", EVENT_WAIT, |events| {
        covered(events) >= response.len() as u64
    });
    let x = exchange(&events, &report);
    let base = x
        .ingress
        .iter()
        .filter_map(|p| p.tcp_seq)
        .min_by_key(|s| s.wrapping_sub(x.ingress[0].tcp_seq.unwrap_or(0)) as i32)
        .expect("segments have sequence numbers");
    let cut: Vec<&&DnsPacket> = x.ingress.iter().filter(|p| p.truncated).collect();
    assert!(
        !cut.is_empty(),
        "a segment longer than {CAPTURE_MAX} bytes is delivered cut and flagged; segments: {:#?}",
        x.ingress
            .iter()
            .map(|p| (p.tcp_seq, p.payload_len, p.payload.len(), p.truncated))
            .collect::<Vec<_>>()
    );
    for p in &x.ingress {
        assert_eq!(p.cgroup_id, cgroup);
        let offset = p.tcp_seq.expect("tcp").wrapping_sub(base) as usize;
        let full = &response[offset..offset + p.payload_len as usize];
        if p.truncated {
            assert!(p.payload_len as usize > CAPTURE_MAX, "{p:?}");
            assert_eq!(p.payload.len(), CAPTURE_MAX, "cut at the capture size");
            assert_eq!(
                &p.payload[..],
                &full[..CAPTURE_MAX],
                "the first bytes, exact"
            );
        } else {
            assert_eq!(&p.payload[..], full);
        }
    }
    if x.ingress.len() == 1 {
        assert_eq!(
            x.ingress[0].payload_len as usize,
            response.len(),
            "payload_len is the whole segment's length"
        );
    }
    let cut_after = capture
        .probes()
        .loss_counters()
        .expect("loss counters")
        .get(LossCounter::DnsCaptureCut);
    assert!(
        cut_after >= cut_before + cut.len() as u64,
        "DnsCaptureCut rose from {cut_before} to {cut_after}, {} cut segments seen",
        cut.len()
    );
}

/// The open and its single outcome for the connect made by `pid`, checked field by field.
fn assert_connect(
    events: &[Event],
    pid: u32,
    cgroup: u64,
    target: SocketAddr,
    result: ConnectResult,
    local: Option<SocketAddr>,
) {
    let comm = python_comm();
    let mine: Vec<_> = opens(events).filter(|c| c.pid == pid).collect();
    assert_eq!(mine.len(), 1, "one open by pid {pid}: {events:#?}");
    let open = mine[0];
    assert_eq!(open.cgroup_id, cgroup, "{open:?}");
    assert_eq!(open.comm, comm, "{open:?}");
    assert!(same_endpoint(open.destination, target), "{open:?}");
    assert_eq!(
        open.requested.map(|r| (r.ip(), r.port())),
        Some((target.ip(), target.port()))
    );
    let ends: Vec<_> = outcomes(events)
        .filter(|o| o.connect.sock_id == open.sock_id && o.connect.pid == pid)
        .collect();
    assert_eq!(ends.len(), 1, "exactly one outcome for {open:?}: {ends:#?}");
    let end = ends[0];
    assert_eq!(end.result, result, "{end:?}");
    assert_eq!(end.connect.cgroup_id, cgroup);
    assert_eq!(end.connect.comm, comm);
    assert!(same_endpoint(end.connect.destination, target), "{end:?}");
    assert_eq!(end.connect.requested, open.requested);
    assert_eq!(
        end.connect.source.ip(),
        open.source.ip(),
        "{open:?} {end:?}"
    );
    assert_ne!(
        end.connect.source.port(),
        0,
        "the outcome knows the source port"
    );
    if let Some(local) = local {
        assert!(
            same_endpoint(end.connect.source, local),
            "{end:?} vs {local}"
        );
    }
}

/// The kernel names a process after the file it executed (not a symlink's target).
fn python_comm() -> String {
    let path = PYTHON3.path().expect("python3");
    let name = path.file_name().expect("file name").to_string_lossy();
    name.chars().take(15).collect()
}

/// A refused connect to a closed port, whose outcome is waited for: the connect ring is in
/// order, so anything earlier connects produced has arrived by then.
fn connect_marker(capture: &Capture, pod: &Pod, host: &Host) {
    let report = pod
        .connect_tcp(
            &host.ipv4().to_string(),
            CLOSED_PORT,
            Family::V4,
            Duration::from_secs(2),
        )
        .expect("marker connect");
    capture.wait_for("the marker connect's outcome", EVENT_WAIT, |events| {
        outcomes(events).any(|o| o.connect.pid == report.pid)
    });
}

#[test]
fn established_connects_over_ipv4_and_ipv6_have_one_open_and_one_outcome() {
    let tb = testbed();
    let ext = tb.add_external_host("web").expect("external host");
    let _listener = ext.listen_tcp(8080).expect("listener");
    let (pod, cgroup) = kernel_test_pod(&tb, "conn");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let mut made = Vec::new();
    for (addr, family) in [
        (IpAddr::V4(ext.ipv4()), Family::V4),
        (IpAddr::V6(ext.ipv6()), Family::V6),
    ] {
        let report = pod
            .connect_tcp(&addr.to_string(), 8080, family, Duration::from_secs(3))
            .expect("connect");
        let ConnectOutcome::Connected { local, peer } = report.outcome else {
            panic!("{report:?}");
        };
        made.push((report.pid, SocketAddr::new(addr, 8080), local));
        assert!(same_endpoint(peer, SocketAddr::new(addr, 8080)));
    }
    // Teardown of the connections above (FIN, TIME_WAIT) must not add outcomes.
    connect_marker(&capture, &pod, &ext);
    let events = capture.events();
    for (pid, target, local) in made {
        assert_connect(
            &events,
            pid,
            cgroup,
            target,
            ConnectResult::Established,
            Some(local),
        );
    }
}

#[test]
fn refused_and_unanswered_connects_end_refused_and_timeout() {
    let tb = testbed();
    let ext = tb.add_external_host("closed").expect("external host");
    let (pod, cgroup) = kernel_test_pod(&tb, "fail");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let cases = [
        (
            IpAddr::V4(ext.ipv4()),
            CLOSED_PORT,
            Family::V4,
            ConnectResult::Refused,
        ),
        (
            IpAddr::V6(ext.ipv6()),
            CLOSED_PORT,
            Family::V6,
            ConnectResult::Refused,
        ),
        (
            IpAddr::V4(plan::UNANSWERED_EXTERNAL_V4),
            80,
            Family::V4,
            ConnectResult::Timeout,
        ),
        (
            IpAddr::V6(plan::UNANSWERED_EXTERNAL_V6),
            80,
            Family::V6,
            ConnectResult::Timeout,
        ),
        // Waited for past the kernel's first SYN retransmit (after 1 s): a retransmitted SYN
        // is no second open.
        (
            IpAddr::V4(plan::UNANSWERED_EXTERNAL_V4),
            81,
            Family::V4,
            ConnectResult::Timeout,
        ),
    ];
    let mut made = Vec::new();
    for (addr, port, family, expected) in cases {
        // Unanswered connects end at the application's timeout; refused ones need none.
        let timeout = match (expected, port) {
            (ConnectResult::Timeout, 81) => Duration::from_millis(1500),
            (ConnectResult::Timeout, _) => Duration::from_millis(300),
            _ => Duration::from_secs(3),
        };
        let report = pod
            .connect_tcp(&addr.to_string(), port, family, timeout)
            .expect("connect");
        let seen = match report.outcome {
            ConnectOutcome::Refused => ConnectResult::Refused,
            ConnectOutcome::TimedOut => ConnectResult::Timeout,
            other => panic!("{addr}:{port}: {other:?}"),
        };
        assert_eq!(seen, expected, "what the application saw for {addr}:{port}");
        made.push((report.pid, SocketAddr::new(addr, port), expected));
    }
    connect_marker(&capture, &pod, &ext);
    let events = capture.events();
    for (pid, target, expected) in made {
        assert_connect(&events, pid, cgroup, target, expected, None);
    }
}

/// A connect crosses the ring once, when it ends; until then the agent reads it from its
/// tracking slot. So a connect that hangs is seen while it hangs, and once it ends it still
/// has exactly one open.
#[test]
fn a_connect_that_hangs_is_seen_while_it_hangs() {
    let tb = testbed();
    let ext = tb.add_external_host("marker").expect("external host");
    let (pod, cgroup) = kernel_test_pod(&tb, "hang");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let target = SocketAddr::new(IpAddr::V4(plan::UNANSWERED_EXTERNAL_V4), 82);
    let is_target = |c: &Connect| same_endpoint(c.destination, target);
    let open = std::thread::scope(|scope| {
        // Far longer than the test takes: the wait ends when the process is killed below.
        let client = scope.spawn(|| {
            pod.connect_tcp(
                &target.ip().to_string(),
                target.port(),
                Family::V4,
                Duration::from_secs(120),
            )
        });
        capture.wait_for(
            "the open of the connect still waiting",
            EVENT_WAIT,
            |events| opens(events).any(is_target),
        );
        let events = capture.events();
        let open = opens(&events)
            .find(|c| is_target(c))
            .cloned()
            .expect("open");
        assert!(!client.is_finished(), "the application still waits");
        assert!(
            outcomes(&events).all(|o| o.connect.sock_id != open.sock_id),
            "no outcome while it waits: {events:#?}"
        );
        // Closing the socket ends the wait unanswered.
        // SAFETY: kill(2) on the pid of the pod's own client process.
        assert_eq!(unsafe { libc::kill(open.pid as i32, libc::SIGKILL) }, 0);
        let _ = client.join();
        open
    });
    connect_marker(&capture, &pod, &ext);
    let events = capture.events();
    assert_connect(
        &events,
        open.pid,
        cgroup,
        target,
        ConnectResult::Timeout,
        None,
    );
}

#[test]
fn a_connect_ended_by_an_icmp_error_ends_timeout() {
    let tb = testbed();
    let ext = tb.add_external_host("marker").expect("external host");
    let (pod, cgroup) = kernel_test_pod(&tb, "icmp");
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let mut made = Vec::new();
    for (addr, family) in [
        (IpAddr::V4(plan::UNREACHABLE_EXTERNAL_V4), Family::V4),
        (IpAddr::V6(plan::UNREACHABLE_EXTERNAL_V6), Family::V6),
    ] {
        let report = pod
            .connect_tcp(&addr.to_string(), 80, family, Duration::from_secs(3))
            .expect("connect");
        // The kernel ends the open on the ICMP error; the application sees it at once.
        match &report.outcome {
            ConnectOutcome::Failed(why)
                if why.contains("unreachable") || why.contains("No route") => {}
            other => panic!("{addr}: the application saw {other:?}"),
        }
        made.push((report.pid, SocketAddr::new(addr, 80)));
    }
    connect_marker(&capture, &pod, &ext);
    let events = capture.events();
    for (pid, target) in made {
        assert_connect(&events, pid, cgroup, target, ConnectResult::Timeout, None);
    }
}

/// A second, real DNS server (dnsmasq) on `port` of an in-cluster host, answering `name`.
fn dnsmasq_on_port(host: &Host, port: u16, name: &str, answer: Ipv4Addr) -> Process {
    dnsmasq_answering(
        host.command(DNSMASQ.path().expect("dnsmasq")),
        host,
        port,
        name,
        answer,
    )
}

/// dnsmasq run by `command` (in a host, or in a pod's cgroup), listening on `host`'s address.
fn dnsmasq_answering(
    command: TestCommand,
    host: &Host,
    port: u16,
    name: &str,
    answer: Ipv4Addr,
) -> Process {
    command
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file",
            "--user=root",
            "--group=root",
            "--bind-interfaces",
        ])
        .arg(format!("--listen-address={}", host.ipv4()))
        .arg(format!("--port={port}"))
        .arg(format!("--address=/{name}/{answer}"))
        .spawn()
        .expect("second dnsmasq")
}

/// Probes `server` for `name` until it answers (dnsmasq needs a moment to bind).
fn wait_answering(pod: &Pod, server: SocketAddr, name: &str) {
    for _ in 0..40 {
        let mut p = DnsProbe::new(server, name, qtype::A, Transport::Udp);
        p.timeout = Duration::from_millis(100);
        let r = pod.dns_probe(dns_probe_client_bin!(), &p).expect("probe");
        if r.response.is_some() {
            return;
        }
    }
    panic!("the DNS server at {server} never answered {name}");
}

/// A pod that runs a DNS server (as CoreDNS or a node-local cache does) sees each lookup
/// reversed: the query arrives, the response leaves. The agent reads only the client's
/// side, so over UDP the programs count the server's and keep it off the ring; loaded to
/// show every packet (`observer events`), they deliver it.
#[test]
fn the_dns_servers_side_is_counted_in_the_kernel_not_delivered() {
    let tb = testbed();
    let (server_pod, server_cgroup) = kernel_test_pod(&tb, "dns-server");
    let (client, client_cgroup) = kernel_test_pod(&tb, "dns-client");
    let _server = dnsmasq_answering(
        server_pod.command(DNSMASQ.path().expect("dnsmasq")),
        &server_pod,
        53,
        "served.test",
        API_V4,
    );
    let server = SocketAddr::new(server_pod.ipv4().into(), 53);
    wait_answering(&client, server, "served.test");
    let server_side = |events: &[Event]| {
        dns_packets(events)
            .filter(|p| p.cgroup_id == server_cgroup)
            .count()
    };

    let mut capture = Capture::start(ProbeOptions::default(), [client_cgroup, server_cgroup]);
    let skipped_before = capture.probes().dns_server_side_skipped().expect("counter");
    let exchange = probe(&client, server, "served.test", Transport::Udp);
    // The client's side arrives whole, as ever.
    assert_exchange_captured(&capture, &exchange, client_cgroup);
    let skipped = capture.probes().dns_server_side_skipped().expect("counter") - skipped_before;
    // The server's two packets ran the programs before the client's response did, so they
    // are counted by now; other DNS servers on the machine may add to the count.
    assert!(skipped >= 2, "{skipped} server-side messages counted");
    assert_eq!(server_side(&capture.events()), 0, "{:#?}", capture.events());
    drop(capture);

    let capture = Capture::start(
        ProbeOptions {
            dns_server_side: true,
            ..ProbeOptions::default()
        },
        [client_cgroup, server_cgroup],
    );
    let exchange = probe(&client, server, "served.test", Transport::Udp);
    assert_exchange_captured(&capture, &exchange, client_cgroup);
    let events = capture.events();
    let delivered: Vec<_> = dns_packets(&events)
        .filter(|p| p.cgroup_id == server_cgroup)
        .map(|p| p.direction)
        .collect();
    assert_eq!(
        delivered,
        [Direction::Ingress, Direction::Egress],
        "the server's query in, response out: {events:#?}"
    );
}

#[test]
fn dns_ports_are_configurable() {
    const ALT_PORT: u16 = 5353;
    let tb = testbed();
    let dns = tb.start_dns(dns_config()).expect("dnsmasq");
    let alt_host = tb.add_cluster_host("alt-dns").expect("cluster host");
    let _alt_dns = dnsmasq_on_port(&alt_host, ALT_PORT, "alt.test", API_V4);
    let alt_server = SocketAddr::new(alt_host.ipv4().into(), ALT_PORT);
    let (pod, cgroup) = kernel_test_pod(&tb, "ports");

    // These exchanges are not captured: the programs are not loaded yet.
    wait_answering(&pod, alt_server, "alt.test");

    let capture = Capture::start(
        ProbeOptions {
            dns_ports: vec![ALT_PORT],
            ..ProbeOptions::default()
        },
        [cgroup],
    );
    let on_53 = probe(&pod, dns.socket_addr(), API_NAME, Transport::Udp);
    let on_alt = probe(&pod, alt_server, "alt.test", Transport::Udp);
    // The DNS ring is in order: once the later exchange on the configured port arrived,
    // anything the port-53 exchange produced would have arrived before it.
    assert_exchange_captured(&capture, &on_alt, cgroup);
    let on_alt_tcp = probe(&pod, alt_server, "alt.test", Transport::Tcp);
    assert_exchange_captured(&capture, &on_alt_tcp, cgroup);
    let events = capture.events();
    let port_53: Vec<_> = dns_packets(&events)
        .filter(|p| p.source.port() == 53 || p.destination.port() == 53)
        .collect();
    assert!(
        port_53.is_empty(),
        "port 53 is not a DNS port in this load, yet {on_53:?} was captured: {port_53:#?}"
    );
    assert!(
        dns_packets(&events)
            .all(|p| p.source.port() == ALT_PORT || p.destination.port() == ALT_PORT),
        "{events:#?}"
    );
}

/// Fetches the same bytes through the testbed: DNS answers over UDP and TCP (a small and a
/// multi-segment one, fixed message ids), and a payload echoed by an external host.
fn transfer(pod: &Pod, echo_host: &Host) -> (Vec<Vec<u8>>, String) {
    let mut answers = Vec::new();
    for (name, transport) in [
        (API_NAME, Transport::Udp),
        (API_NAME, Transport::Tcp),
        (MANY_NAME, Transport::Tcp),
    ] {
        let mut p = DnsProbe::new(server_v4(), name, qtype::A, transport);
        p.id = Some(0x5eed);
        // A hang guard: every query here is answered (slowly in a guest under TCG).
        p.timeout = Duration::from_secs(30);
        let r = pod.dns_probe(dns_probe_client_bin!(), &p).expect("probe");
        let Some(answer) = r.response.clone() else {
            panic!("{name} over {transport:?}: {r:?}");
        };
        answers.push(answer);
    }
    let out = pod
        .command(PYTHON3.path().expect("python3"))
        .args(["-c", support::ECHO_CLIENT])
        .arg(echo_host.ipv4().to_string())
        .args(["7000", "300000"])
        .output()
        .expect("echo client")
        .check("echo client")
        .expect("echo client succeeded");
    let words: Vec<&str> = out.stdout.split_whitespace().collect();
    let [sent, received, length] = words.as_slice() else {
        panic!("echo client printed {:?}", out.stdout);
    };
    assert_eq!(sent, received, "the echo came back whole ({length} bytes)");
    (answers, (*received).to_owned())
}

#[test]
fn traffic_is_byte_identical_with_and_without_the_programs() {
    let tb = testbed();
    tb.start_dns(dns_config()).expect("dnsmasq");
    let ext = tb.add_external_host("echo").expect("external host");
    let _echo = EchoServer::start(&ext, 7000);
    let (pod, cgroup) = kernel_test_pod(&tb, "same");

    let _alone = exclusive();
    let without = transfer(&pod, &ext);
    let capture = Capture::start(ProbeOptions::default(), [cgroup]);
    let with = transfer(&pod, &ext);
    assert_eq!(without, with, "the programs changed bytes on the wire");
    // They did watch that traffic: DNS both ways, and the echo connect established.
    let events = capture.wait_for("the transfer's events", EVENT_WAIT, |events| {
        let dns = dns_packets(events).count();
        let established = outcomes(events).any(|o| {
            o.result == ConnectResult::Established
                && o.connect.destination.ip() == IpAddr::V4(ext.ipv4())
        });
        dns >= 6 && established
    });
    assert!(dns_packets(&events).any(|p| p.direction == Direction::Ingress));
    assert!(dns_packets(&events).any(|p| p.direction == Direction::Egress));
}

// Sends N queries over one UDP socket, one at a time, each waiting (bounded) for its answer.
const FLOOD_SCRIPT: &str = r#"
import socket, struct, sys
server, port, n, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
qname = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10.0)
s.connect((server, port))
answered = 0
for i in range(n):
    s.send(struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1))
    try:
        while True:
            if s.recv(4096)[:2] == struct.pack(">H", i):
                answered += 1
                break
    except socket.timeout:
        pass
print(n, answered)
"#;

#[test]
fn a_full_ring_counts_what_it_drops_and_never_drops_traffic() {
    const FLOOD: u64 = 300;
    let tb = testbed();
    tb.start_dns(dns_config()).expect("dnsmasq");
    let (pod, cgroup) = kernel_test_pod(&tb, "flood");
    // One page. A DNS record is its 80-byte header plus the message (about 40 bytes here),
    // plus 8 bytes of ring header, rounded up to 8: a few dozen fit, far fewer than the flood.
    let mut capture = Capture::load(
        ProbeOptions {
            dns_ring_bytes: 4096,
            ..ProbeOptions::default()
        },
        [cgroup],
    );
    let out = pod
        .command(PYTHON3.path().expect("python3"))
        .args(["-c", FLOOD_SCRIPT, &plan::DNS_V4.to_string(), "53"])
        .arg(FLOOD.to_string())
        .arg(API_NAME)
        .output()
        .expect("flood")
        .check("flood")
        .expect("flood succeeded");
    let counts: Vec<u64> = out
        .stdout
        .split_whitespace()
        .map(|w| w.parse().expect("a count"))
        .collect();
    let [sent, answered] = counts[..] else {
        panic!("flood printed {:?}", out.stdout);
    };
    assert_eq!(sent, FLOOD);
    assert_eq!(answered, FLOOD, "a full ring never drops traffic");

    // Nothing has read the ring yet. Every DNS packet the programs saw until now is either
    // in the ring or counted. Our pod alone sent FLOOD queries and received `answered`
    // responses, all on port 53; other traffic of the machine can only add to the count.
    let losses = capture.probes().loss_counters().expect("loss counters");
    let counted_at = observer::probes::boot_now_ns().expect("CLOCK_BOOTTIME");
    let progress = capture.probes().progress();
    capture.read();
    // Done when the readers have put on the channel every record committed before the
    // counters were read (their progress mark passed that moment), and the channel's last
    // events reached the capture.
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    while progress.horizon() < counted_at {
        assert!(
            std::time::Instant::now() < deadline,
            "the ring readers never caught up with the moment the counters were read"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    capture.wait_quiet(Duration::from_millis(200), Duration::from_secs(3));
    let delivered_total = capture.total_dns_events();
    let events = capture.events();
    let delivered_ours = dns_packets(&events).count() as u64;
    let ring_bytes_ours: usize = dns_packets(&events)
        .map(|p| (8 + observer_common::DNS_EVENT_HEADER_LEN + p.payload.len()).next_multiple_of(8))
        .sum();
    let ring_full = losses.get(LossCounter::DnsRingFull);
    let read_errors = losses.get(LossCounter::DnsReadError);
    let ours_seen = sent + answered;
    // Records take the ring space of their own length, not of the largest capture.
    assert!(
        delivered_ours > 1,
        "a one-page ring held only {delivered_ours} of our records"
    );
    assert!(
        ring_bytes_ours <= 4096,
        "{delivered_ours} records of {ring_bytes_ours} bytes out of a 4096-byte ring"
    );
    assert!(delivered_ours < ours_seen);
    assert_eq!(read_errors, 0);
    // delivered_total covers everything that sat in the ring when the counters were read.
    assert!(
        ring_full + delivered_total >= ours_seen,
        "{ours_seen} DNS packets of our pod alone, {delivered_total} delivered in total, \
         yet only {ring_full} counted as dropped for a full ring"
    );
    assert_eq!(capture.probes().decode_errors(), 0);
}

#[test]
fn dropping_the_probes_detaches_everything() {
    let tb = testbed();
    let dns = tb.start_dns(dns_config()).expect("dnsmasq");
    let (pod, cgroup) = kernel_test_pod(&tb, "detach");
    let _alone = exclusive();
    let before = bpf_fds("self").kinds;
    assert!(
        before.is_empty(),
        "no bpf objects before loading: {before:?}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut first = Probes::load(&ProbeOptions::default()).expect("first load");
    let mut first_events = {
        let _enter = runtime.enter();
        first.events().expect("events")
    };
    let BpfFds {
        kinds: loaded,
        program_ids: prog_ids,
    } = bpf_fds("self");
    // Packet ingress and egress, connect4, connect6, sock_release.
    assert_eq!(prog_ids.len(), 5, "five programs: {loaded:?}");
    assert_eq!(
        loaded.iter().filter(|k| *k == "bpf_link").count(),
        5,
        "a bpf_link per attached program: {loaded:?}"
    );

    let seen = |events: &mut tokio::sync::mpsc::Receiver<Vec<Event>>, report: &ProbeReport| {
        runtime.block_on(async {
            tokio::time::timeout(EVENT_WAIT, async {
                while let Some(batch) = events.recv().await {
                    if batch.iter().any(|e| {
                        matches!(e, Event::Dns(p)
                            if p.cgroup_id == cgroup && same_endpoint(p.source, report.local))
                    }) {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false)
        })
    };
    let r1 = probe(&pod, dns.socket_addr(), API_NAME, Transport::Udp);
    assert!(seen(&mut first_events, &r1), "the first load captures");

    drop(first);
    let ended = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), async {
            while first_events.recv().await.is_some() {}
        })
        .await
    });
    assert!(ended.is_ok(), "the event stream ends when the probes drop");
    // The readers are aborted on drop and release their ring fds as the runtime gets to them.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut after = bpf_fds("self").kinds;
    while !after.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        after = bpf_fds("self").kinds;
    }
    assert!(
        after.is_empty(),
        "bpf objects left in the process: {after:?}"
    );
    // Nothing else holds them (no pin, no attachment left): the kernel frees the programs.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut alive: Vec<u32> = prog_ids.clone();
    while !alive.is_empty() && std::time::Instant::now() < deadline {
        alive.retain(|id| program_exists(*id));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive.is_empty(), "programs still in the kernel: {alive:?}");

    let mut second = Probes::load(&ProbeOptions::default()).expect("second load");
    let mut second_events = {
        let _enter = runtime.enter();
        second.events().expect("events")
    };
    let r2 = probe(&pod, dns.socket_addr(), API_NAME, Transport::Udp);
    assert!(
        seen(&mut second_events, &r2),
        "a second load attaches and captures"
    );
    drop(second);
}

fn run_agent_with(setpriv_args: &[&str]) -> observer_tests::CommandOutput {
    TestCommand::new("/usr/bin/setpriv")
        .args(setpriv_args)
        .arg(observer_tests::agent::observer_bin())
        .args(["events", "--ring-size-kib", "64"])
        // What a user sees by default (the test runner's environment may ask for backtraces).
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        // A hang guard: the agent refuses by itself (a debug build under TCG takes seconds).
        .timeout(Duration::from_secs(120))
        .output()
        .expect("run the agent under setpriv (util-linux)")
}

fn assert_clean_refusal(out: &observer_tests::CommandOutput, names: &[&str], absent: &[&str]) {
    assert!(!out.success(), "the agent must fail: {out:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for name in names {
        assert!(
            out.stderr.contains(name),
            "stderr names {name}: {}",
            out.stderr
        );
    }
    for name in absent {
        assert!(
            !out.stderr.contains(name),
            "stderr must not name {name}: {}",
            out.stderr
        );
    }
    assert!(
        out.stderr.contains("missing capabilities"),
        "{}",
        out.stderr
    );
    for panic_sign in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!out.stderr.contains(panic_sign), "no panic: {}", out.stderr);
    }
}

#[test]
fn without_privileges_the_agent_names_the_missing_capabilities() {
    observer_tests::require_root().expect("these tests run as root");
    // An unprivileged user: no capabilities at all.
    let nobody = run_agent_with(&["--reuid=65534", "--regid=65534", "--clear-groups"]);
    assert_clean_refusal(&nobody, &["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"], &[]);
    // Root without CAP_NET_ADMIN: exactly that one is named.
    let no_net_admin = run_agent_with(&["--inh-caps=-net_admin", "--bounding-set=-net_admin"]);
    assert_clean_refusal(
        &no_net_admin,
        &["CAP_NET_ADMIN"],
        &["CAP_BPF", "CAP_PERFMON"],
    );
}

/// The probe the agent runs before loading finds every feature it needs on this kernel
/// (the matrix's kernels are all new enough), so a refusal can only mean a kernel lacks one.
#[test]
fn the_start_up_feature_probe_finds_everything_on_this_kernel() {
    let found = observer::probes::KernelFeatures::probe().expect("probing the running kernel");
    assert_eq!(found.missing(), Vec::new(), "{found:?}");
}
