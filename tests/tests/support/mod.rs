//! Shared by the privileged kernel tests: the real probes loaded into this kernel, their
//! events collected (filtered on the test's own cgroups) with bounded waits, and the few
//! stream helpers that compare captured bytes with what a client really sent and received.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    cell::Cell,
    collections::HashSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use observer::probes::{
    Connect, ConnectOutcome, Direction, DnsPacket, Event, ProbeOptions, Probes, Protocol,
};
use observer_tests::Host;
pub use observer_tests::story::testbed;

/// Programs attached to the cgroup2 root see every test's traffic, and a test that compares
/// "with and without programs" or counts its own process's bpf objects needs no other test
/// of this binary to hold programs at the same time. Loading takes the shared side; such a
/// test takes the exclusive side.
static KERNEL: RwLock<()> = RwLock::new(());

thread_local! {
    static HOLDS_EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
}

/// While alive, no other test of this binary has (or loads) kernel programs.
pub struct Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>);

pub fn exclusive() -> Exclusive {
    let guard = KERNEL.write().unwrap_or_else(|p| p.into_inner());
    HOLDS_EXCLUSIVE.with(|h| h.set(true));
    Exclusive(guard)
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        HOLDS_EXCLUSIVE.with(|h| h.set(false));
    }
}

/// The real probes, with a reader that keeps every event of the watched cgroups.
pub struct Capture {
    // Dropped first: detaches the programs and ends the event stream.
    probes: Option<Probes>,
    runtime: tokio::runtime::Runtime,
    watched: Arc<Mutex<HashSet<u64>>>,
    ours: Arc<Mutex<Vec<Event>>>,
    /// Every event delivered, whatever its cgroup.
    total: Arc<AtomicU64>,
    total_dns: Arc<AtomicU64>,
    _shared: Option<RwLockReadGuard<'static, ()>>,
}

impl Capture {
    /// Loads and attaches the programs and starts reading at once.
    pub fn start(options: ProbeOptions, cgroups: impl IntoIterator<Item = u64>) -> Self {
        let mut capture = Self::load(options, cgroups);
        capture.read();
        capture
    }

    /// Loads and attaches the programs; nothing reads the rings until [`Capture::read`].
    pub fn load(options: ProbeOptions, cgroups: impl IntoIterator<Item = u64>) -> Self {
        let shared = if HOLDS_EXCLUSIVE.with(Cell::get) {
            None
        } else {
            Some(KERNEL.read().unwrap_or_else(|p| p.into_inner()))
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let probes = Probes::load(&options)
            .unwrap_or_else(|e| panic!("loading the kernel programs: {:?}", anyhow::Error::new(e)));
        Self {
            probes: Some(probes),
            runtime,
            watched: Arc::new(Mutex::new(cgroups.into_iter().collect())),
            ours: Arc::default(),
            total: Arc::default(),
            total_dns: Arc::default(),
            _shared: shared,
        }
    }

    /// Starts the ring readers; events of watched cgroups are kept.
    pub fn read(&mut self) {
        let _enter = self.runtime.enter();
        let mut rx = self.probes().events().expect("starting the ring readers");
        let (watched, ours) = (self.watched.clone(), self.ours.clone());
        let (total, total_dns) = (self.total.clone(), self.total_dns.clone());
        self.runtime.spawn(async move {
            while let Some(batch) = rx.recv().await {
                for event in batch {
                    total.fetch_add(1, Ordering::Relaxed);
                    if matches!(event, Event::Dns(_)) {
                        total_dns.fetch_add(1, Ordering::Relaxed);
                    }
                    if lock(&watched).contains(&event.cgroup_id()) {
                        lock(&ours).push(event);
                    }
                }
            }
        });
    }

    pub fn probes(&mut self) -> &mut Probes {
        self.probes.as_mut().expect("probes are loaded until drop")
    }

    pub fn watch(&self, cgroup: u64) {
        lock(&self.watched).insert(cgroup);
    }

    /// Events of the watched cgroups so far, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.ours).clone()
    }

    /// Events delivered so far from every cgroup of the machine.
    pub fn total_events(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn total_dns_events(&self) -> u64 {
        self.total_dns.load(Ordering::Relaxed)
    }

    /// Polls until `done` holds for the watched events (then returns them) or panics after
    /// `timeout`, showing what did arrive.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            if Instant::now() >= deadline {
                panic!("waited {timeout:?} for {what}; events of our cgroups: {events:#?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until no event (of any cgroup) arrived for `quiet`, at most `max`.
    pub fn wait_quiet(&self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut last = self.total_events();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.total_events();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Detaches the programs and returns what was collected.
    pub fn stop(mut self) -> Vec<Event> {
        self.probes.take();
        self.events()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.probes.take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn dns_packets(events: &[Event]) -> impl Iterator<Item = &DnsPacket> {
    events.iter().filter_map(|e| match e {
        Event::Dns(p) => Some(p),
        _ => None,
    })
}

pub fn opens(events: &[Event]) -> impl Iterator<Item = &Connect> {
    events.iter().filter_map(|e| match e {
        Event::ConnectOpen(c) => Some(c),
        _ => None,
    })
}

pub fn outcomes(events: &[Event]) -> impl Iterator<Item = &ConnectOutcome> {
    events.iter().filter_map(|e| match e {
        Event::ConnectOutcome(o) => Some(o),
        _ => None,
    })
}

/// Same address and port (IPv6 flow info and scope are not part of what the kernel reports).
pub fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

/// The DNS packets of one flow: `direction`, `protocol`, from `source` to `destination`.
pub fn flow(
    events: &[Event],
    direction: Direction,
    protocol: Protocol,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<&DnsPacket> {
    dns_packets(events)
        .filter(|p| {
            p.direction == direction
                && p.protocol == protocol
                && same_endpoint(p.source, source)
                && same_endpoint(p.destination, destination)
        })
        .collect()
}

/// TCP payload reassembled from captured segments by sequence number (retransmissions
/// overlap and are checked to agree). `None` while there is a gap or a segment was cut.
pub fn reassemble(segments: &[&DnsPacket]) -> Option<Vec<u8>> {
    let first = segments.first()?;
    let base = first.tcp_seq?;
    let mut placed: Vec<(u32, &[u8])> = segments
        .iter()
        .map(|s| Some((s.tcp_seq?.wrapping_sub(base), &s.payload[..])))
        .collect::<Option<_>>()?;
    // The first captured segment need not be the lowest (reordering): rebase on the lowest
    // offset, read as a signed distance.
    let lowest = placed.iter().map(|(o, _)| *o as i32).min()?;
    for (o, _) in &mut placed {
        *o = (*o as i32 - lowest) as u32;
    }
    placed.sort_by_key(|(o, _)| *o);
    if segments.iter().any(|s| s.truncated) {
        return None;
    }
    let mut stream = Vec::new();
    for (offset, bytes) in placed {
        let offset = offset as usize;
        if offset > stream.len() {
            return None;
        }
        let overlap = (stream.len() - offset).min(bytes.len());
        if stream[offset..offset + overlap] != bytes[..overlap] {
            panic!("a retransmitted segment at offset {offset} disagrees with the first copy");
        }
        stream.extend_from_slice(&bytes[overlap..]);
    }
    Some(stream)
}

/// A DNS message framed for TCP: two-byte length, then the message.
pub fn tcp_framed(message: &[u8]) -> Vec<u8> {
    let mut framed = u16::try_from(message.len())
        .expect("DNS message fits a TCP frame")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(message);
    framed
}

/// A TCP echo server on a host (both families): every connection gets back what it sends.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(host: &Host, port: u16) -> Self {
        let listener = host
            .netns()
            .run(|| TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)))
            .expect("entering the host's namespace")
            .expect("binding the echo listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            std::thread::spawn(move || echo(stream));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut stream: std::net::TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Real glibc name resolution is not needed here: a connect to a literal address, a
/// deterministic payload sent and read back, both hashed. Prints `<sent sha256> <received
/// sha256> <received length>`.
pub const ECHO_CLIENT: &str = r#"
import hashlib, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes((i * 7 + 3) % 251 for i in range(size))
s = socket.create_connection((host, port), timeout=10)
sender = threading.Thread(target=s.sendall, args=(data,))
sender.start()
got = bytearray()
while len(got) < size:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
sender.join()
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(bytes(got)).hexdigest(), len(got))
"#;
