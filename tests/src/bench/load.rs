//! Load generators. All of them are bounded in count and in time, and only talk to
//! loopback or to testbed addresses of the namespace they run in.
use std::{
    io::{self, Read},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use observer::dns::build::{WireAnswer, query, response};
use serde::Serialize;

use super::util::{Acceptor, own_cpu_seconds};

/// The name every benchmark DNS message asks for.
pub const BENCH_NAME: &str = "api.bench.svc.cluster.local";

/// One client connect, the way a short-lived client does it: connect, wait for the
/// server to close, close.
pub fn connect_once(to: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 16];
    while stream.read(&mut buf)? > 0 {}
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct LoopReport {
    pub connects: u64,
    pub errors: u64,
    pub secs: f64,
    pub cpu_secs: f64,
}

/// Connects as fast as one thread can, for `secs` or `max` connects.
pub fn connect_loop(to: SocketAddr, secs: f64, max: u64) -> LoopReport {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let (mut connects, mut errors) = (0, 0);
    while connects + errors < max && start.elapsed() < limit {
        match connect_once(to) {
            Ok(()) => connects += 1,
            Err(_) => errors += 1,
        }
        // A refused or timed-out destination must not turn into a busy loop.
        if errors > 1000 && errors > connects {
            break;
        }
    }
    LoopReport {
        connects,
        errors,
        secs: start.elapsed().as_secs_f64(),
        cpu_secs: own_cpu_seconds(),
    }
}

/// DNS responses as a resolver sends them (one A answer, varying ids).
pub fn response_set() -> Vec<Vec<u8>> {
    (0..256u16)
        .map(|id| {
            response(
                id,
                BENCH_NAME,
                1,
                0,
                &[WireAnswer::Addr {
                    owner: BENCH_NAME.to_owned(),
                    ttl: 30,
                    ip: Ipv4Addr::new(198, 19, 0, 10).into(),
                }],
                None,
            )
        })
        .collect()
}

pub fn query_set() -> Vec<Vec<u8>> {
    (0..256u16).map(|id| query(id, BENCH_NAME, 1)).collect()
}

#[derive(Debug, Serialize)]
pub struct PacedReport {
    pub dns_rate_target: u64,
    pub connect_rate_target: u64,
    pub dns_responses_sent: u64,
    pub dns_responses_received: u64,
    pub connects: u64,
    pub connect_errors: u64,
    pub secs: f64,
    /// CPU the generator itself used (all its threads), to compare with the agent's.
    pub cpu_secs: f64,
}

/// Calls `step` so that `done` follows `rate` per second, in 1 ms slices, for `secs`.
/// Returns when the time is up; never catches up more than 10 ms of backlog at once.
fn paced(rate: u64, secs: f64, stop: &AtomicBool, mut step: impl FnMut() -> bool) {
    if rate == 0 {
        return;
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut done = 0u64;
    while start.elapsed() < limit && !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let burst = (rate / 100).max(1);
        let mut n = due.saturating_sub(done).min(burst);
        if due > done + burst {
            // Behind by more than the burst: drop the backlog rather than burst forever.
            done = due - burst;
        }
        while n > 0 {
            if !step() {
                return;
            }
            done += 1;
            n -= 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Sustained mixed load on this namespace's loopback: DNS responses sent from port 53 to a
/// client socket, and TCP connects to a local acceptor, each at its own rate.
pub fn paced_load(dns_rate: u64, connect_rate: u64, secs: f64) -> io::Result<PacedReport> {
    let server = UdpSocket::bind("127.0.0.1:53")?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    server.connect(client.local_addr()?)?;
    let acceptor = Acceptor::serve(TcpListener::bind("127.0.0.1:0")?)?;
    let to = acceptor.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match client.recv(&mut buf) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        })
    };
    let start = Instant::now();
    let connector = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut ok, mut err) = (0u64, 0u64);
            paced(connect_rate, secs, &stop, || {
                match connect_once(to) {
                    Ok(()) => ok += 1,
                    Err(_) => err += 1,
                }
                true
            });
            (ok, err)
        })
    };
    let responses = response_set();
    let mut sent = 0u64;
    paced(dns_rate, secs, &stop, || {
        let bytes = &responses[sent as usize % responses.len()];
        if server.send(bytes).is_ok() {
            sent += 1;
        }
        true
    });
    let (connects, connect_errors) = connector.join().unwrap_or((0, 0));
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    Ok(PacedReport {
        dns_rate_target: dns_rate,
        connect_rate_target: connect_rate,
        dns_responses_sent: sent,
        dns_responses_received: received.load(Ordering::Relaxed),
        connects,
        connect_errors,
        secs,
        cpu_secs: own_cpu_seconds(),
    })
}

/// `count` request/reply exchanges between two UDP sockets of this namespace: `a` sends
/// `request`, `b` answers with `reply`. Every datagram passes one egress and one ingress
/// cgroup program run.
pub fn udp_exchanges(
    a: &UdpSocket,
    b: &UdpSocket,
    count: u64,
    request: &[Vec<u8>],
    reply: &[Vec<u8>],
) -> io::Result<u64> {
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    a.set_read_timeout(Some(Duration::from_secs(1)))?;
    b.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 4096];
    let mut done = 0;
    for i in 0..count as usize {
        a.send(&request[i % request.len()])?;
        b.recv(&mut buf)?;
        b.send(&reply[i % reply.len()])?;
        a.recv(&mut buf)?;
        done += 1;
    }
    Ok(done)
}
