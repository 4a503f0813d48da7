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
    util::{Acceptor, BpfStats, median},
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
    /// sock_release), plus the packet programs' handshake work (`handshake_ns_per_connect`).
    /// The median over `connect_chunks`.
    pub connect_ns_per_connect: f64,
    pub connects: u64,
    /// Per program, over the connect phase: runs per connect and ns per run.
    pub connect_breakdown: BTreeMap<String, (f64, f64)>,
    /// The packet programs' handshake work (SYN, SYN-ACK), ns per connect: their run time
    /// over the connects, less the empty programs' on the same packets, less runs x their
    /// own work on a packet that is no handshake (non-DNS phase). The median over the chunks.
    pub handshake_ns_per_connect: f64,
    /// The same, for empty programs on the same hooks in the same phases: the floor any
    /// program there pays (the hook's call and bpf_stats' clock reads).
    pub non_dns_floor_ns_per_run: f64,
    pub dns_floor_ns_per_run: f64,
    pub connect_floor_ns_per_connect: f64,
    /// The connect phase, chunk by chunk.
    pub connect_chunks: Vec<ConnectChunk>,
    pub phases: BTreeMap<String, BTreeMap<String, ProgramDelta>>,
}

/// One chunk of the connect phase, measured on its own.
#[derive(Debug, Serialize, Clone)]
pub struct ConnectChunk {
    pub connects: u64,
    pub ns_per_connect: f64,
    pub handshake_ns_per_connect: f64,
    pub floor_ns_per_connect: f64,
}

/// Chunks of the connect phase.
const CONNECT_CHUNKS: u64 = 5;

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

    // In chunks, each measured on its own: the figures are the chunks' medians, so that a
    // burst of noise on this shared machine moves one chunk, not the result.
    eprintln!("[kernel] {connects} TCP connects on loopback, in {CONNECT_CHUNKS} chunks");
    let to = acceptor.addr();
    let own_per_packet = (non_dns_ns - non_dns_floor).max(0.0);
    let t = Instant::now();
    let mut made = 0u64;
    let mut chunks = Vec::new();
    let mut conn: BTreeMap<String, ProgramDelta> = BTreeMap::new();
    for _ in 0..CONNECT_CHUNKS {
        let s0 = snapshot(&probes)?;
        let mut chunk_made = 0u64;
        for _ in 0..connects / CONNECT_CHUNKS {
            if connect_once(to).is_ok() {
                chunk_made += 1;
            }
        }
        let d = delta(&s0, &snapshot(&probes)?);
        let time = |programs: &[&str]| -> f64 {
            programs.iter().map(|p| d[*p].run_time_ns).sum::<u64>() as f64
        };
        let packet_runs: u64 = packet_programs.iter().map(|p| d[*p].runs).sum();
        // The packet programs' time over the connects, less the empty programs' time on the
        // same packets (the floor, measured alongside) and less what any packet costs them
        // above that floor. Noise may make it negative: no negative work.
        let handshake =
            (time(&packet_programs) - time(&skb_floor) - packet_runs as f64 * own_per_packet)
                .max(0.0);
        let per = |ns: f64| ns / chunk_made.max(1) as f64;
        chunks.push(ConnectChunk {
            connects: chunk_made,
            ns_per_connect: per(time(&connect_programs) + handshake),
            handshake_ns_per_connect: per(handshake),
            floor_ns_per_connect: per(time(&connect_floor)),
        });
        made += chunk_made;
        for (name, x) in d {
            let sum = conn.entry(name).or_insert(ProgramDelta {
                runs: 0,
                run_time_ns: 0,
            });
            sum.runs += x.runs;
            sum.run_time_ns += x.run_time_ns;
        }
    }
    eprintln!(
        "[kernel] {made} connects in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(stats);
    let median_of = |f: fn(&ConnectChunk) -> f64| median(&chunks.iter().map(f).collect::<Vec<_>>());
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
        connect_ns_per_connect: median_of(|c| c.ns_per_connect),
        connects: made,
        connect_breakdown,
        handshake_ns_per_connect: median_of(|c| c.handshake_ns_per_connect),
        non_dns_floor_ns_per_run: non_dns_floor,
        dns_floor_ns_per_run: dns_floor,
        connect_floor_ns_per_connect: median_of(|c| c.floor_ns_per_connect),
        connect_chunks: chunks,
        phases,
    })
}
