//! The correlation core driven by arbitrary sequences of DNS messages, connects, outcomes,
//! identity updates and clock ticks, with small caps so that every bound is reached. After
//! every step the core's invariants must hold (totals, queues, scope bookkeeping) and every
//! structure must be within its memory bound: `Correlator::check_invariants` says which.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use observer::{
    correlate::{
        ConnectOpen, ConnectOutcome, CoreLimits, Correlator, CorrelatorConfig, Direction,
        DnsObservation, ResolverConfig,
    },
    dns::{Answer, AnswerData, DnsMessage, QType, Question, Rcode},
    record::Outcome,
    scope::ScopeKey,
};

/// A resolv.conf search walk and the names around it, so that chains form and escape.
const NAMES: [&str; 9] = [
    "db",
    "db.shop.svc.cluster.local",
    "db.svc.cluster.local",
    "db.cluster.local",
    "db.another-lab.com",
    "api.example.com",
    "api.example.com.shop.svc.cluster.local",
    "web.shop.svc.cluster.local",
    "cdn.example.net",
];
const SEARCH: [&str; 4] = [
    "shop.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
const SCOPES: usize = 6;
const SECOND: u64 = 1_000_000_000;

fn limits() -> CoreLimits {
    CoreLimits {
        max_scopes: 4,
        max_answers_total: 24,
        max_answers_per_scope: 10,
        max_pending_total: 12,
        max_pending_per_scope: 6,
        max_open_connects_total: 10,
        max_open_connects_per_scope: 5,
        max_chains_per_scope: 6,
        max_open_chains_per_scope: 3,
        max_drift_entries: 6,
        max_cname_hops: 4,
    }
}

fn scope(index: usize) -> ScopeKey {
    if index == SCOPES - 1 {
        ScopeKey::Host(1)
    } else {
        ScopeKey::Pod(Arc::from(format!("pod-{index}")))
    }
}

/// Cluster (198.18/15) and outside (203.0.113/24) addresses, v4 and v6.
fn address(u: &mut Unstructured) -> Result<IpAddr> {
    let host: u8 = u.int_in_range(1..=6)?;
    Ok(match u.int_in_range(0..=2)? {
        0 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, host)),
        1 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, host)),
        _ => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(host))),
    })
}

fn name(u: &mut Unstructured) -> Result<Arc<str>> {
    Ok(Arc::from(*u.choose(&NAMES)?))
}

fn qtype(u: &mut Unstructured) -> Result<QType> {
    Ok(*u.choose(&[QType::A, QType::AAAA, QType::A, QType(16)])?)
}

fn ttl(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0..=3)? {
        0 => 0,
        1 => u.int_in_range(1..=30)?,
        2 => u.int_in_range(30..=3600)?,
        // Long TTLs keep evicted chains' expiries far off.
        _ => u.int_in_range(3600..=u32::MAX)?,
    })
}

fn message(u: &mut Unstructured, is_response: bool) -> Result<DnsMessage> {
    let question = if u.ratio(1, 16)? {
        None
    } else {
        Some(Question {
            name: name(u)?,
            qtype: qtype(u)?,
        })
    };
    let mut answers = Vec::new();
    if is_response {
        for _ in 0..u.int_in_range(0..=4)? {
            let owner = match (&question, u.ratio(3, 4)?) {
                (Some(q), true) => q.name.clone(),
                _ => name(u)?,
            };
            let data = match u.int_in_range(0..=3)? {
                0 => AnswerData::Cname(name(u)?),
                _ => match address(u)? {
                    IpAddr::V4(v4) => AnswerData::A(v4),
                    IpAddr::V6(v6) => AnswerData::Aaaa(v6),
                },
            };
            answers.push(Answer {
                owner,
                ttl: ttl(u)?,
                data,
            });
        }
    }
    Ok(DnsMessage {
        id: u.int_in_range(0..=7)?,
        is_response,
        opcode: if u.ratio(1, 32)? { 4 } else { 0 },
        truncated: u.ratio(1, 16)?,
        rcode: *u.choose(&[
            Rcode::NOERROR,
            Rcode::NXDOMAIN,
            Rcode::NXDOMAIN,
            Rcode::SERVFAIL,
        ])?,
        question,
        answers,
        answers_capped: u.ratio(1, 16)?,
    })
}

fn step(core: &mut Correlator, u: &mut Unstructured, now: &mut u64) -> Result<()> {
    let key = scope(u.int_in_range(0..=SCOPES - 1)?);
    let client = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
        u.int_in_range(40000..=40002)?,
    );
    let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)), 53);
    match u.int_in_range(0..=11)? {
        0..=2 => {
            // Queries sent, responses received, and now and then the server's own side.
            let (direction, is_response) =
                *u.choose(&[(Direction::Egress, false), (Direction::Ingress, true)])?;
            let (direction, is_response) = if u.ratio(1, 20)? {
                (direction, !is_response)
            } else {
                (direction, is_response)
            };
            let (src, dst) = match direction {
                Direction::Egress => (client, server),
                Direction::Ingress => (server, client),
            };
            core.observe_dns(DnsObservation {
                scope: key,
                at: *now,
                direction,
                src,
                dst,
                message: message(u, is_response)?,
            });
        }
        3 | 4 => core.connect_open(ConnectOpen {
            scope: key,
            sock_id: u.int_in_range(0..=15)?,
            at: *now,
            cgroup_id: 7,
            pid: 42,
            comm: "app".into(),
            destination: SocketAddr::new(address(u)?, 5432),
            source: None,
        }),
        5 => {
            let outcome = *u.choose(&[Outcome::Established, Outcome::Refused, Outcome::Timeout])?;
            core.connect_outcome(ConnectOutcome {
                sock_id: u.int_in_range(0..=15)?,
                at: *now,
                outcome,
                source: Some(client),
            });
        }
        6..=8 => {
            // Mostly small steps; sometimes past every timeout at once.
            *now += match u.int_in_range(0..=7)? {
                7 => u.int_in_range(1..=100_000)? * SECOND,
                _ => u.int_in_range(0..=20_000)? * 1_000_000,
            };
            core.tick(*now);
        }
        9 => {
            let mut search = Vec::new();
            for domain in SEARCH {
                if u.arbitrary()? {
                    search.push(domain.to_owned());
                }
            }
            let _ = core.set_resolver_config(
                &key,
                &ResolverConfig {
                    search,
                    ndots: u.int_in_range(0..=6)?,
                },
            );
        }
        10 => {
            let _ = core.set_drift_key(&key, u.choose(&["shop/db", "shop/web"])?);
        }
        _ => core.remove_scope(&key),
    }
    *now += u64::from(u.int_in_range(0u16..=500)?) * 1_000;
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut core = Correlator::new(CorrelatorConfig {
        cluster_networks: vec!["198.18.0.0/15".parse().unwrap()],
        limits: limits(),
        ..CorrelatorConfig::default()
    });
    let mut now = 100 * SECOND;
    for _ in 0..512 {
        if u.is_empty() || step(&mut core, &mut u, &mut now).is_err() {
            break;
        }
        if let Err(broken) = core.check_invariants() {
            panic!("{broken}");
        }
    }
});
