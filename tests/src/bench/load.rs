//! Load generators. All of them are bounded in count and in time, and only talk to
//! loopback or to testbed addresses of the namespace they run in.
use std::{
    io::{self, Read},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use observer::dns::build::{WireAnswer, query, response};
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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
    /// Connects whose handshake completed (the SYN-ACK came back).
    pub connects: u64,
    /// Connects refused, failed to start, or left unanswered for `CONNECT_TIMEOUT`.
    pub connect_errors: u64,
    /// Connections the listener accepted: a cross-check of `connects`.
    pub connects_accepted: u64,
    pub secs: f64,
    /// CPU the generator itself used (all its threads), to compare with the agent's.
    pub cpu_secs: f64,
}

/// How long a connect may wait for its handshake before it counts as an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many connects in flight per connector thread: all threads' descriptors
/// together stay well under the default limit of 1024 open files.
const MAX_BATCH: u64 = 128;

/// Connector threads at most: each one carries up to this many connects/s.
const CONNECTORS_MAX: u64 = 4;
const CONNECTS_PER_CONNECTOR: u64 = 10_000;

/// Calls `step(n)` with the number of items due, so that the items done follow `rate` per
/// second, in ~1 ms slices, for `secs`. Returns when the time is up; never catches up more
/// than 10 ms of backlog at once.
fn paced(rate: u64, secs: f64, stop: &AtomicBool, mut step: impl FnMut(u64)) {
    if rate == 0 {
        return;
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let burst = (rate / 100).max(1);
    let mut done = 0u64;
    while start.elapsed() < limit && !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if due > done + burst {
            // Behind by more than the burst: drop the backlog rather than burst forever.
            done = due - burst;
        }
        let n = due.saturating_sub(done);
        if n > 0 {
            step(n);
            done += n;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A loopback listener for the paced connects. Its accept queue holds a whole burst (std's
/// 128 would drop SYNs while the acceptor catches up, and a dropped SYN waits a second for
/// its resend), and the connections it accepts inherit SO_LINGER 0 like the clients': which
/// side closes first, it resets, so no connection exchanges FINs or leaves a TIME_WAIT.
fn burst_listener() -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&SockAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Starts one client connect: a real connect(2) that sends the SYN, without waiting.
/// SO_LINGER 0 makes the close a reset: no FIN exchange and no TIME_WAIT, so the client's
/// ports are free again at once and never run out at tens of thousands of connects/s.
fn start_connect(to: &SockAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_linger(Some(Duration::ZERO))?;
    match socket.connect(to) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// `n` short-lived clients at once: starts every connect, waits until every handshake has
/// its answer, then closes them all (when the sockets drop). Returns (connected, failed).
fn connect_batch(to: &SockAddr, n: u64) -> (u64, u64) {
    let mut not_started = 0u64;
    let sockets: Vec<Socket> = (0..n)
        .filter_map(|_| start_connect(to).inspect_err(|_| not_started += 1).ok())
        .collect();
    let (connected, failed) = await_handshakes(&sockets);
    (connected, not_started + failed)
}

/// Waits until every started connect in `sockets` has its answer, `CONNECT_TIMEOUT` at
/// most. Returns (connected, failed); one left without an answer has failed.
fn await_handshakes(sockets: &[Socket]) -> (u64, u64) {
    let mut failed = 0u64;
    let mut polls: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    let mut pending = polls.len();
    let mut connected = 0u64;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let millis = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `polls` is a live array of pollfds whose length we pass.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, millis) };
        if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
        for (p, socket) in polls.iter_mut().zip(sockets) {
            if p.fd < 0 || p.revents == 0 {
                continue;
            }
            if handshake_completed(p.revents, socket) {
                connected += 1;
            } else {
                failed += 1;
            }
            // poll(2) skips negative descriptors: this socket has its answer.
            p.fd = -1;
            pending -= 1;
        }
    }
    failed += pending as u64;
    (connected, failed)
}

/// Whether a connect that poll(2) reported on got its SYN-ACK. Writable without an error:
/// it did. With an error, the socket's error says which: ECONNRESET or EPIPE only come to
/// a connection the handshake established (here: the server's reset, when its close came
/// first); a refused or unreachable SYN gets another.
fn handshake_completed(revents: libc::c_short, socket: &Socket) -> bool {
    if revents & (libc::POLLERR | libc::POLLHUP) == 0 {
        return true;
    }
    matches!(
        socket.take_error(),
        Ok(Some(e)) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE))
    )
}

/// Sustained mixed load on this namespace's loopback: DNS responses sent from port 53 to a
/// client socket, and TCP connects to a local acceptor, each at its own rate. The connects
/// are spread over connector threads, each starting the connects due in a slice together.
pub fn paced_load(dns_rate: u64, connect_rate: u64, secs: f64) -> io::Result<PacedReport> {
    let server = UdpSocket::bind("127.0.0.1:53")?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    server.connect(client.local_addr()?)?;
    let acceptor = Acceptor::serve(burst_listener()?)?;
    let to = SockAddr::from(acceptor.addr());

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
    let connectors = connect_rate
        .div_ceil(CONNECTS_PER_CONNECTOR)
        .clamp(1, CONNECTORS_MAX);
    let connectors: Vec<_> = (0..connectors)
        .map(|i| {
            // The rate split so that the threads' shares add up to it exactly.
            let rate = connect_rate / connectors + u64::from(i < connect_rate % connectors);
            let (stop, to) = (Arc::clone(&stop), to.clone());
            std::thread::spawn(move || {
                let (mut ok, mut err) = (0u64, 0u64);
                paced(rate, secs, &stop, |n| {
                    let mut n = n;
                    while n > 0 {
                        let batch = n.min(MAX_BATCH);
                        let (o, e) = connect_batch(&to, batch);
                        ok += o;
                        err += e;
                        n -= batch;
                    }
                });
                (ok, err)
            })
        })
        .collect();
    let responses = response_set();
    let mut sent = 0u64;
    paced(dns_rate, secs, &stop, |n| {
        for _ in 0..n {
            let bytes = &responses[sent as usize % responses.len()];
            if server.send(bytes).is_ok() {
                sent += 1;
            }
        }
    });
    let (mut connects, mut connect_errors) = (0, 0);
    for connector in connectors {
        let (ok, err) = connector.join().unwrap_or((0, 0));
        connects += ok;
        connect_errors += err;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // The acceptor takes the last batch's connections a little after their handshakes.
    let settle = Instant::now();
    while acceptor.accepted() < connects && settle.elapsed() < CONNECT_TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = receiver.join();
    Ok(PacedReport {
        dns_rate_target: dns_rate,
        connect_rate_target: connect_rate,
        dns_responses_sent: sent,
        dns_responses_received: received.load(Ordering::Relaxed),
        connects,
        connect_errors,
        connects_accepted: acceptor.accepted(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `socket` has an error or is hung up (poll(2) always reports those): the
    /// hang guard is generous, the wait ends on the event.
    fn wait_for_error(socket: &Socket) -> libc::c_short {
        let mut p = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, 30_000) };
        assert_eq!(ready, 1, "no error or hang-up on the socket within 30 s");
        p.revents
    }

    #[test]
    fn every_connect_of_a_batch_is_counted_and_accepted() {
        let acceptor = Acceptor::serve(burst_listener().unwrap()).unwrap();
        let to = SockAddr::from(acceptor.addr());
        assert_eq!(connect_batch(&to, 100), (100, 0));
        assert_eq!(connect_batch(&to, 28), (28, 0));
        let guard = Instant::now();
        while acceptor.accepted() < 128 {
            assert!(
                guard.elapsed() < Duration::from_secs(30),
                "the listener accepted {} of 128 connects",
                acceptor.accepted()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(acceptor.accepted(), 128);
    }

    #[test]
    fn a_connect_the_server_resets_after_its_handshake_was_made() {
        let listener = burst_listener().unwrap();
        let to = SockAddr::from(listener.local_addr().unwrap());
        let client = start_connect(&to).unwrap();
        // The accepted side inherits SO_LINGER 0: its close is a reset.
        drop(listener.accept().unwrap());
        assert_ne!(wait_for_error(&client) & libc::POLLERR, 0);
        assert_eq!(await_handshakes(&[client]), (1, 0));
    }

    #[test]
    fn a_refused_connect_fails() {
        let closed = SockAddr::from(burst_listener().unwrap().local_addr().unwrap());
        assert_eq!(connect_batch(&closed, 3), (0, 3));
    }
}
