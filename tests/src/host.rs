//! Hosts that are not pods: in-cluster services and machines outside the cluster, with TCP
//! listeners that record who connected.
use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    error::{Result, TestbedError, io_err},
    netns::{NetNs, TestCommand},
};

/// Which side of the cluster boundary a host is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// 198.18.2.0/24 and 2001:db8:c::2:0/112: an in-cluster service backend.
    Cluster,
    /// 203.0.113.0/24 and 2001:db8:e::/64: outside the cluster.
    External,
}

/// A port nothing ever listens on in testbed hosts: connecting to it is refused (RST).
pub const CLOSED_PORT: u16 = 9;

/// A host in its own network namespace (cheap to clone; the testbed removes it).
#[derive(Clone, Debug)]
pub struct Host {
    pub(crate) name: String,
    pub(crate) kind: HostKind,
    pub(crate) netns: NetNs,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> HostKind {
        self.kind
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// A program to run on this host (see [`NetNs::command`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> TestCommand {
        self.netns.command(program)
    }

    /// Listens on `port` on all of this host's addresses (IPv4 and IPv6). Every accepted
    /// connection is recorded, sent one line (`<host name>\n`) and closed. Stops when dropped.
    pub fn listen_tcp(&self, port: u16) -> Result<TcpServer> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let listener = self
            .netns
            .run(|| TcpListener::bind(addr))?
            .map_err(|source| TestbedError::Netns {
                netns: self.netns.name().to_owned(),
                op: "bind a TCP listener",
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking on listener in", self.netns.path()))?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{}\n", self.name);
        let thread = {
            let accepted = Arc::clone(&accepted);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                            accepted.lock().expect("accepted lock").push(peer);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.write_all(greeting.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Ok(TcpServer {
            host: self.name.clone(),
            port,
            accepted,
            stop,
            thread: Some(thread),
        })
    }
}

/// A TCP listener on a host; records each peer that connected.
#[derive(Debug)]
pub struct TcpServer {
    host: String,
    port: u16,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Peers (client address and port, IPv4 shown as IPv4) accepted so far, in order.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().expect("accepted lock").clone()
    }

    /// Waits until a connection from `from` (any port) was accepted.
    pub fn wait_for_peer(&self, from: IpAddr, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.accepted().into_iter().find(|p| p.ip() == from) {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!(
                        "a connection from {from} to {}:{} (accepted: {:?})",
                        self.host,
                        self.port,
                        self.accepted()
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
