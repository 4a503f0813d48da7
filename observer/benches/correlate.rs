//! Replays a synthetic node's traffic through the correlation core: 10k pods, each walking
//! its search list (NXDOMAIN pairs, then an external answer), resolving in-cluster
//! Services (A + AAAA), and connecting to what it resolved.
//!
//! Prints a summary (responses parsed and indexed per second, connects correlated per
//! second, peak RSS with 1M cached answers) and runs criterion groups for the same
//! operations. Use `cargo bench -p observer --bench correlate -- --quick`.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput};
use observer::{
    correlate::{
        ConnectOpen, ConnectOutcome, Correlator, CorrelatorConfig, Direction, ResolverConfig,
    },
    dns::build::{WireAnswer, query, response},
    record::Outcome,
    scope::ScopeKey,
};

/// The agent's allocator (see `main.rs`): the figures are the agent's.
#[global_allocator]
static ALLOCATOR: observer::agent::memory::Allocator = observer::agent::memory::Allocator;

const SCOPES: usize = 10_000;

/// Pods of the replayed stream: 10k, or `CORRELATE_SCOPES` (a few hundred fit in the
/// cache, which shows how much of the 10k figure is memory latency). The memory figure
/// always uses 10k.
fn stream_scopes() -> usize {
    std::env::var("CORRELATE_SCOPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SCOPES)
}
const MS: u64 = 1_000_000;

struct Wire {
    scope: ScopeKey,
    at: u64,
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
}

/// A message of the replayed stream; its wire bytes are `wire[bytes]` of the scenario.
struct Message {
    scope: ScopeKey,
    at: u64,
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    bytes: std::ops::Range<usize>,
}

struct Scenario {
    messages: Vec<Message>,
    /// Every message's wire bytes back to back, in stream order: the replay reads its
    /// input sequentially, as the agent reads a ring buffer, so that it measures the core
    /// rather than the scattered buffers of the generator.
    wire: Vec<u8>,
    responses: usize,
    /// (scope, destination) of every connect a pod makes after resolving.
    connects: Vec<(ScopeKey, SocketAddr)>,
}

/// Pod `i`'s scope key. One `Arc` per pod, shared by its configuration and its events: the
/// agent configures a scope with the key its identity gives the pod's events, so a lookup
/// there meets the same pointer, and the replay measures that.
fn scope_of(i: usize) -> ScopeKey {
    static KEYS: OnceLock<Vec<ScopeKey>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        (0..stream_scopes().max(SCOPES))
            .map(|i| ScopeKey::Pod(Arc::from(format!("0000-pod-{i:06}"))))
            .collect()
    });
    keys[i].clone()
}

fn resolver(i: usize) -> ResolverConfig {
    ResolverConfig {
        search: vec![
            format!("ns{}.svc.cluster.local", i % 500),
            "svc.cluster.local".into(),
            "cluster.local".into(),
            "corp.example".into(),
        ],
        ndots: 5,
    }
}

fn v4(i: usize, k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, (i >> 8) as u8, i as u8, k as u8))
}

fn v6(i: usize, k: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        i as u16,
        0,
        0,
        0,
        0,
        k as u16 + 1,
    ))
}

/// One pod's traffic: `walks` external names reached after three NXDOMAIN steps with
/// `per_family` A and AAAA records each, and `services` in-cluster names.
fn pod_traffic(
    i: usize,
    walks: usize,
    services: usize,
    per_family: usize,
    start: u64,
    out: &mut Vec<Wire>,
    connects: &mut Vec<(ScopeKey, SocketAddr)>,
) -> usize {
    let scope = scope_of(i);
    let client = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)),
        40000,
    );
    let server: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let cfg = resolver(i);
    let mut at = start;
    let mut id = 1u16;
    let mut responses = 0;
    let mut exchange = |name: &str, answers: Vec<WireAnswer>, nx: bool, out: &mut Vec<Wire>| {
        for qtype in [1u16, 28] {
            at += MS;
            out.push(Wire {
                scope: scope.clone(),
                at,
                direction: Direction::Egress,
                src: client,
                dst: server,
                bytes: query(id, name, qtype),
            });
            let fam: Vec<WireAnswer> = answers
                .iter()
                .filter(
                    |a| matches!(a, WireAnswer::Addr { ip, .. } if ip.is_ipv4() == (qtype == 1)),
                )
                .cloned()
                .collect();
            at += MS;
            let rcode = if nx { 3 } else { 0 };
            let soa = fam.is_empty().then_some("cluster.local");
            out.push(Wire {
                scope: scope.clone(),
                at,
                direction: Direction::Ingress,
                src: server,
                dst: client,
                bytes: response(id, name, qtype, rcode, &fam, soa),
            });
            responses += 1;
            id = id.wrapping_add(1);
        }
    };
    for w in 0..walks {
        let base = format!("ext{w}");
        for d in &cfg.search[..3] {
            exchange(&format!("{base}.{d}"), vec![], true, out);
        }
        let name = format!("{base}.corp.example");
        let mut answers = Vec::new();
        for k in 0..per_family {
            let k = w * per_family + k;
            answers.push(WireAnswer::Addr {
                owner: name.clone(),
                ttl: 300,
                ip: v4(i, k),
            });
            answers.push(WireAnswer::Addr {
                owner: name.clone(),
                ttl: 300,
                ip: v6(i, k),
            });
        }
        exchange(&name, answers, false, out);
        connects.push((scope.clone(), SocketAddr::new(v4(i, w * per_family), 443)));
    }
    for s in 0..services {
        let name = format!("svc{s}.{}", cfg.search[0]);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 96, (s >> 8) as u8, s as u8));
        exchange(
            &name,
            vec![WireAnswer::Addr {
                owner: name.clone(),
                ttl: 30,
                ip,
            }],
            false,
            out,
        );
        connects.push((scope.clone(), SocketAddr::new(ip, 8080)));
    }
    responses
}

fn scenario() -> Scenario {
    let mut messages = Vec::new();
    let mut connects = Vec::new();
    let mut responses = 0;
    for i in 0..stream_scopes() {
        responses += pod_traffic(i, 1, 2, 2, i as u64 * 1000, &mut messages, &mut connects);
    }
    // Interleave pods as a node would see them: sort by time.
    messages.sort_by_key(|m| m.at);
    let mut wire = Vec::with_capacity(messages.iter().map(|m| m.bytes.len()).sum());
    let messages = messages
        .into_iter()
        .map(|m| {
            let start = wire.len();
            wire.extend_from_slice(&m.bytes);
            Message {
                scope: m.scope,
                at: m.at,
                direction: m.direction,
                src: m.src,
                dst: m.dst,
                bytes: start..wire.len(),
            }
        })
        .collect();
    Scenario {
        messages,
        wire,
        responses,
        connects,
    }
}

fn configured() -> Correlator {
    let mut c = Correlator::new(CorrelatorConfig::default());
    for i in 0..stream_scopes() {
        c.set_resolver_config(&scope_of(i), &resolver(i)).unwrap();
    }
    c
}

fn replay(c: &mut Correlator, s: &Scenario) {
    replay_at(c, s, 0);
}

/// The stream again, `offset` ns later: a warm core sees the same pods resolve again.
fn replay_at(c: &mut Correlator, s: &Scenario, offset: u64) {
    for m in &s.messages {
        let bytes = &s.wire[m.bytes.clone()];
        let _ = c.observe_dns_wire(&m.scope, m.at + offset, m.direction, m.src, m.dst, bytes);
    }
}

/// Time between replays of the stream: past every chain's window and every answer's TTL
/// plus grace, so that `tick` frees the previous round before the next one starts.
const ROUND: u64 = 1_000_000 * MS;

fn connect_all(c: &mut Correlator, s: &Scenario, sock_base: u64, at: u64) -> usize {
    let mut joined = 0;
    for (n, (scope, dest)) in s.connects.iter().enumerate() {
        let sock_id = sock_base + n as u64;
        c.connect_open(ConnectOpen {
            scope: scope.clone(),
            sock_id,
            at,
            cgroup_id: 1,
            pid: 1,
            comm: "app".into(),
            destination: *dest,
            source: None,
        });
        let r = c.connect_outcome(ConnectOutcome {
            sock_id,
            at: at + MS,
            outcome: Outcome::Established,
            source: None,
        });
        joined += usize::from(r.is_some_and(|r| black_box(r).chain.is_some()));
    }
    joined
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// 1M cached answers: 10k pods x (5 external names x 8 A + 8 AAAA = 80, + 20 Services).
/// Generated pod by pod so that the wire bytes never pile up.
fn memory_summary() {
    let before = status_kib("VmRSS:");
    let mut c = configured();
    let mut buf = Vec::new();
    let mut connects = Vec::new();
    for i in 0..SCOPES {
        buf.clear();
        connects.clear();
        pod_traffic(i, 5, 20, 8, 0, &mut buf, &mut connects);
        for m in &buf {
            let _ = c.observe_dns_wire(&m.scope, m.at, m.direction, m.src, m.dst, &m.bytes);
        }
    }
    let peak = status_kib("VmHWM:");
    println!(
        "memory: {} cached answers in {} scopes, RSS before {:.1} MiB, peak {:.1} MiB (core ~{:.1} MiB, {:.0} B/answer)",
        c.cached_answers(),
        c.scope_count(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak - before) as f64 / 1024.0,
        (peak - before) as f64 * 1024.0 / c.cached_answers() as f64,
    );
    black_box(&c);
}

/// Rounds of each summary measurement (best kept: on a shared machine, the fastest round
/// is the one least slowed by others): `CORRELATE_ROUNDS=1` under callgrind.
fn rounds() -> u64 {
    std::env::var("CORRELATE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

// Separate, never inlined, so that an instruction profile (callgrind) shows each phase's
// inclusive cost under its own name.
#[inline(never)]
fn cold_replay(c: &mut Correlator, s: &Scenario) {
    replay(c, s)
}

#[inline(never)]
fn cold_connects(c: &mut Correlator, s: &Scenario) -> usize {
    connect_all(c, s, 1 << 32, 1_000 * MS)
}

#[inline(never)]
fn steady_tick(c: &mut Correlator, now: u64) {
    black_box(c.tick(now));
}

#[inline(never)]
fn steady_replay(c: &mut Correlator, s: &Scenario, base: u64) {
    replay_at(c, s, base)
}

#[inline(never)]
fn steady_connects_first(c: &mut Correlator, s: &Scenario, round: u64, base: u64) {
    connect_all(c, s, (2 * round) << 32, base + 1_000 * MS);
}

#[inline(never)]
fn steady_connects_again(c: &mut Correlator, s: &Scenario, round: u64, base: u64) {
    connect_all(c, s, (2 * round + 1) << 32, base + 1_001 * MS);
}

fn throughput_summary(s: &Scenario) {
    let t = Instant::now();
    let mut ok = 0;
    for m in &s.messages {
        ok += usize::from(observer::dns::parse(black_box(&s.wire[m.bytes.clone()])).is_ok());
    }
    println!(
        "parse only: {:.0} messages/s ({ok} ok)",
        s.messages.len() as f64 / t.elapsed().as_secs_f64()
    );
    let mut best_dns = f64::MAX;
    let mut best_conn = f64::MAX;
    for round in 0..rounds() {
        let mut c = configured();
        let t = Instant::now();
        cold_replay(&mut c, s);
        best_dns = best_dns.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let joined = cold_connects(&mut c, s);
        best_conn = best_conn.min(t.elapsed().as_secs_f64());
        if round == 0 {
            println!(
                "stream: {} scopes, {} messages ({} responses), {} connects ({} joined), {} answers cached",
                c.scope_count(),
                s.messages.len(),
                s.responses,
                s.connects.len(),
                joined,
                c.cached_answers()
            );
        }
    }
    println!(
        "dns cold: {:.0} responses parsed+indexed/s per core (with their queries: {:.0} messages/s; fresh core, every scope's maps grow from empty)",
        s.responses as f64 / best_dns,
        s.messages.len() as f64 / best_dns
    );
    println!(
        "connects cold: {:.0} correlated/s per core (first connect per chain: open + outcome + record, chain materialised)",
        s.connects.len() as f64 / best_conn
    );

    // Steady state: one warm core; each round `tick` frees the previous round's chains
    // and answers, then the same pods resolve again and connect twice (the second
    // connect finds the chain already materialised).
    let mut c = configured();
    replay(&mut c, s);
    connect_all(&mut c, s, 1 << 32, 1_000 * MS);
    let (mut best_dns, mut best_tick, mut best_first, mut best_again) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for round in 1..=rounds() {
        let base = round * ROUND;
        let t = Instant::now();
        steady_tick(&mut c, base);
        best_tick = best_tick.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        steady_replay(&mut c, s, base);
        best_dns = best_dns.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        steady_connects_first(&mut c, s, round, base);
        best_first = best_first.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        steady_connects_again(&mut c, s, round, base);
        best_again = best_again.min(t.elapsed().as_secs_f64());
    }
    println!(
        "dns steady: {:.0} responses parsed+indexed/s per core (warm core, same pods again; expiry by tick not included: {:.0} responses expired/s)",
        s.responses as f64 / best_dns,
        s.responses as f64 / best_tick
    );
    println!(
        "connects steady: {:.0} correlated/s per core first per chain (materialised), {:.0} with the chain already materialised",
        s.connects.len() as f64 / best_first,
        s.connects.len() as f64 / best_again
    );
    println!(
        "check: {} scopes, {} answers cached, {} chains started, {} connects joined",
        c.scope_count(),
        c.cached_answers(),
        c.counters().chains_started,
        c.counters().connects_joined
    );
}

fn criterion_groups(c: &mut Criterion, s: &Scenario) {
    let mut g = c.benchmark_group("correlate");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(s.responses as u64));
    g.bench_function("dns_stream_10k_scopes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut c = configured();
                let t = Instant::now();
                replay(&mut c, s);
                total += t.elapsed();
            }
            total
        })
    });
    g.throughput(Throughput::Elements(s.connects.len() as u64));
    let mut core = configured();
    replay(&mut core, s);
    let mut round = 0u64;
    g.bench_function("connects_10k_scopes", |b| {
        b.iter(|| {
            round += 1;
            connect_all(&mut core, s, round << 32, 1_000 * MS)
        })
    });
    g.finish();
}

fn main() {
    // `CORRELATE_MEMORY=0` skips the 1M-answer memory figure (slow under callgrind).
    if std::env::var("CORRELATE_MEMORY").as_deref() != Ok("0") {
        memory_summary();
    }
    let s = scenario();
    throughput_summary(&s);
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &s);
    c.final_summary();
}
