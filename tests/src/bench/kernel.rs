//! In-kernel cost of observer's programs, from the kernel's own run-time statistics
//! (`kernel.bpf_stats_enabled`): run_time_ns / run_cnt, per program, over a phase of known
//! loopback traffic. The programs are loaded here, in this process, exactly as the agent
//! loads them; the events are drained and discarded so that the rings never fill.
use std::{
    collections::BTreeMap,
    net::{TcpListener, UdpSocket},
    time::Instant,
};

use observer::probes::{ProbeOptions, Probes, ProgramStats};
use observer_common::names;
use serde::Serialize;

use super::{
    load::{connect_once, query_set, response_set, udp_exchanges},
    util::{Acceptor, BpfStats},
};

#[derive(Debug, Serialize, Clone)]
pub struct ProgramDelta {
    pub runs: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct KernelCost {
    /// ns per cgroup_skb run for a packet that is not DNS.
    pub non_dns_ns_per_run: f64,
    pub non_dns_packets: u64,
    /// ns per cgroup_skb run that captured a DNS message.
    pub dns_ns_per_capture: f64,
    pub dns_messages: u64,
    /// What a connect adds, per connect: the connect programs' run time (connect4/6 and
    /// sock_release), plus the packet programs' run time over the connect phase above what
    /// the same packets cost when they are no handshake (runs x `non_dns_ns_per_run`).
    pub connect_ns_per_connect: f64,
    pub connects: u64,
    /// Per program, over the connect phase: runs per connect and ns per run.
    pub connect_breakdown: BTreeMap<String, (f64, f64)>,
    /// The packet programs' handshake work (SYN, SYN-ACK), ns per connect: their run time
    /// over the connect phase less runs x `non_dns_ns_per_run`.
    pub handshake_ns_per_connect: f64,
    /// The same, for empty programs on the same hooks in the same phases: the floor any
    /// program there pays (the hook's call and bpf_stats' clock reads).
    pub non_dns_floor_ns_per_run: f64,
    pub dns_floor_ns_per_run: f64,
    pub connect_floor_ns_per_connect: f64,
    pub phases: BTreeMap<String, BTreeMap<String, ProgramDelta>>,
}

fn snapshot(probes: &Probes) -> anyhow::Result<BTreeMap<&'static str, ProgramStats>> {
    Ok(probes
        .program_stats()?
        .into_iter()
        .map(|s| (s.program, s))
        .collect())
}

fn delta(
    before: &BTreeMap<&'static str, ProgramStats>,
    after: &BTreeMap<&'static str, ProgramStats>,
) -> BTreeMap<String, ProgramDelta> {
    after
        .iter()
        .map(|(name, a)| {
            let b = &before[name];
            (
                (*name).to_owned(),
                ProgramDelta {
                    runs: a.run_count - b.run_count,
                    run_time_ns: a.run_time_ns - b.run_time_ns,
                },
            )
        })
        .collect()
}

fn per_run(d: &BTreeMap<String, ProgramDelta>, programs: &[&str]) -> f64 {
    let (t, n) = programs.iter().fold((0u64, 0u64), |(t, n), p| {
        let x = &d[*p];
        (t + x.run_time_ns, n + x.runs)
    });
    t as f64 / n.max(1) as f64
}

pub fn measure(quick: bool) -> anyhow::Result<KernelCost> {
    let (packets, exchanges, connects) = if quick {
        (50_000u64, 10_000u64, 5_000u64)
    } else {
        (200_000, 40_000, 20_000)
    };
    // The DNS phase talks to a port of its own, declared a DNS port, so that no real
    // resolver on this machine is involved.
    let dns_server = UdpSocket::bind("127.0.0.1:0")?;
    let dns_client = UdpSocket::bind("127.0.0.1:0")?;
    let dns_port = dns_server.local_addr()?.port();
    let plain_a = UdpSocket::bind("127.0.0.1:0")?;
    let plain_b = UdpSocket::bind("127.0.0.1:0")?;
    let acceptor = Acceptor::serve(TcpListener::bind("127.0.0.1:0")?)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let options = ProbeOptions {
        dns_ports: vec![53, dns_port],
        baseline: true,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::load(&options)?;
    {
        let _enter = runtime.enter();
        let mut events = probes.events()?;
        runtime.spawn(async move { while events.recv().await.is_some() {} });
    }
    let stats = BpfStats::enable()?;
    let packet_programs = [names::PROG_PACKET_INGRESS, names::PROG_PACKET_EGRESS];
    let skb_floor = [
        names::PROG_BASELINE_SKB_INGRESS,
        names::PROG_BASELINE_SKB_EGRESS,
    ];
    let connect_floor = [
        names::PROG_BASELINE_CONNECT4,
        names::PROG_BASELINE_SOCK_RELEASE,
    ];
    let connect_programs = [
        names::PROG_CONNECT4,
        names::PROG_CONNECT6,
        names::PROG_CONNECT_RELEASE,
    ];
    let mut phases = BTreeMap::new();

    eprintln!("[kernel] {packets} non-DNS UDP datagrams on loopback");
    let payload = vec![vec![0x5au8; 64]];
    let s0 = snapshot(&probes)?;
    udp_exchanges(&plain_a, &plain_b, packets / 2, &payload, &payload)?;
    let non_dns = delta(&s0, &snapshot(&probes)?);
    let non_dns_ns = per_run(&non_dns, &packet_programs);
    let non_dns_floor = per_run(&non_dns, &skb_floor);
    phases.insert("non_dns".to_owned(), non_dns);

    eprintln!("[kernel] {exchanges} DNS exchanges (query + response) on loopback");
    let s0 = snapshot(&probes)?;
    udp_exchanges(
        &dns_client,
        &dns_server,
        exchanges,
        &query_set(),
        &response_set(),
    )?;
    let dns = delta(&s0, &snapshot(&probes)?);
    let dns_ns = per_run(&dns, &packet_programs);
    let dns_floor = per_run(&dns, &skb_floor);
    phases.insert("dns".to_owned(), dns);

    eprintln!("[kernel] {connects} TCP connects on loopback");
    let to = acceptor.addr();
    let s0 = snapshot(&probes)?;
    let t = Instant::now();
    let mut made = 0u64;
    for _ in 0..connects {
        if connect_once(to).is_ok() {
            made += 1;
        }
    }
    let conn = delta(&s0, &snapshot(&probes)?);
    eprintln!(
        "[kernel] {made} connects in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(stats);
    let programs: u64 = connect_programs.iter().map(|p| conn[*p].run_time_ns).sum();
    let floor: u64 = connect_floor.iter().map(|p| conn[*p].run_time_ns).sum();
    let (packet_time, packet_runs) = packet_programs.iter().fold((0u64, 0u64), |(t, n), p| {
        (t + conn[*p].run_time_ns, n + conn[*p].runs)
    });
    // Noise may put a phase's per-packet time below the non-DNS phase's: no negative work.
    let handshake = (packet_time as f64 - packet_runs as f64 * non_dns_ns).max(0.0);
    let connect_breakdown = connect_programs
        .iter()
        .chain(&packet_programs)
        .map(|p| {
            let d = &conn[*p];
            (
                (*p).to_owned(),
                (
                    d.runs as f64 / made.max(1) as f64,
                    d.run_time_ns as f64 / d.runs.max(1) as f64,
                ),
            )
        })
        .collect();
    phases.insert("connect".to_owned(), conn);
    drop(probes);
    runtime.shutdown_background();
    Ok(KernelCost {
        non_dns_ns_per_run: non_dns_ns,
        non_dns_packets: packets,
        dns_ns_per_capture: dns_ns,
        dns_messages: exchanges * 2,
        connect_ns_per_connect: (programs as f64 + handshake) / made.max(1) as f64,
        connects: made,
        connect_breakdown,
        handshake_ns_per_connect: handshake / made.max(1) as f64,
        non_dns_floor_ns_per_run: non_dns_floor,
        dns_floor_ns_per_run: dns_floor,
        connect_floor_ns_per_connect: floor as f64 / made.max(1) as f64,
        phases,
    })
}
