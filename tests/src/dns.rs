//! The cluster's DNS server: a real dnsmasq in the testbed's dns namespace, configured per test,
//! whose records can change at run time and whose query log the test reads back.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    error::{Result, TestbedError, io_err},
    exec::{DNSMASQ, Process},
    netns::NetNs,
};

/// Which DNS server program serves the cluster. One kind today; the enum is where another
/// (unbound, for CNAME chains and other behaviours dnsmasq lacks) goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsServerKind {
    #[default]
    Dnsmasq,
}

/// One address record (A for IPv4, AAAA for IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRecord {
    pub name: String,
    pub addr: IpAddr,
}

/// What the DNS server answers. Names inside a local zone that have no record get NXDOMAIN;
/// names outside every local zone get REFUSED (there is no upstream).
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub kind: DnsServerKind,
    pub local_zones: Vec<String>,
    pub records: Vec<DnsRecord>,
    /// `(domain, addr)`: the domain and every name below it answer `addr`.
    pub wildcards: Vec<(String, IpAddr)>,
    /// `(alias, target)`: alias answers a CNAME to target (target must have records).
    pub cnames: Vec<(String, String)>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            kind: DnsServerKind::Dnsmasq,
            local_zones: vec!["cluster.local".into()],
            records: Vec::new(),
            wildcards: Vec::new(),
            cnames: Vec::new(),
        }
    }
}

impl DnsConfig {
    /// dnsmasq, authoritative-ish for `cluster.local` (NXDOMAIN for unknown names there).
    pub fn dnsmasq() -> Self {
        Self::default()
    }

    /// Another zone answered only from this config's records (unknown names: NXDOMAIN).
    pub fn local_zone(mut self, zone: &str) -> Self {
        self.local_zones.push(zone.trim_matches('.').to_owned());
        self
    }

    pub fn record(mut self, name: &str, addr: impl Into<IpAddr>) -> Self {
        self.records.push(DnsRecord {
            name: name.trim_end_matches('.').to_owned(),
            addr: addr.into(),
        });
        self
    }

    pub fn wildcard(mut self, domain: &str, addr: impl Into<IpAddr>) -> Self {
        self.wildcards
            .push((domain.trim_matches('.').to_owned(), addr.into()));
        self
    }

    pub fn cname(mut self, alias: &str, target: &str) -> Self {
        self.cnames.push((
            alias.trim_end_matches('.').to_owned(),
            target.trim_end_matches('.').to_owned(),
        ));
        self
    }
}

/// A running DNS server (cheap to clone). The testbed stops it when it drops.
#[derive(Clone, Debug)]
pub struct DnsServer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    kind: DnsServerKind,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    pid: u32,
    hosts_path: PathBuf,
    log_path: PathBuf,
    records: Mutex<Vec<DnsRecord>>,
}

/// Hang guard for dnsmasq's (re)load: the wait ends with its log line, which a guest under
/// TCG on a busy machine can take well over ten seconds to reach.
const START_TIMEOUT: Duration = crate::exec::DEFAULT_TIMEOUT;

/// The TTL of the testbed DNS server's answers, CoreDNS's default for Services.
const CLUSTER_DNS_TTL_SECS: u32 = 30;

/// Starts the server `config.kind` names (today dnsmasq, the only kind) in `netns`.
pub(crate) fn start(
    netns: &NetNs,
    state_dir: &Path,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    config: DnsConfig,
) -> Result<(DnsServer, Process)> {
    // A new kind of server makes this pattern refutable: the compiler asks for its start.
    let DnsServerKind::Dnsmasq = config.kind;
    let program = DNSMASQ.path()?;
    let hosts_path = state_dir.join("dns-hosts");
    let log_path = state_dir.join("dns-queries.log");
    write_hosts(&hosts_path, &config.records)?;
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--pid-file".into(),
        "--user=root".into(),
        "--group=root".into(),
        // Binds exactly the listen addresses (and watches for them, unlike --bind-interfaces).
        "--bind-dynamic".into(),
        format!("--listen-address={ipv4}"),
        format!("--listen-address={ipv6}"),
        "--log-queries=extra".into(),
        format!("--log-facility={}", log_path.display()),
        format!("--addn-hosts={}", hosts_path.display()),
        // dnsmasq answers its own records with TTL 0 by default; a cluster DNS gives Services
        // 30 s (CoreDNS's default). With TTL 0, observer keeps an answer only its grace
        // beyond the lookup, which a slow guest can outlast between a lookup and its connect.
        format!("--local-ttl={CLUSTER_DNS_TTL_SECS}"),
    ];
    args.extend(config.local_zones.iter().map(|z| format!("--local=/{z}/")));
    args.extend(
        config
            .wildcards
            .iter()
            .map(|(d, a)| format!("--address=/{d}/{a}")),
    );
    args.extend(
        config
            .cnames
            .iter()
            .map(|(alias, target)| format!("--cname={alias},{target}")),
    );
    let process = netns.command(program).args(&args).spawn()?;
    let server = DnsServer {
        shared: Arc::new(Shared {
            kind: config.kind,
            ipv4,
            ipv6,
            pid: process.pid(),
            hosts_path,
            log_path,
            records: Mutex::new(config.records),
        }),
    };
    let mut process = process;
    server.wait_for_reloads(1, START_TIMEOUT, Some(&mut process))?;
    Ok((server, process))
}

fn write_hosts(path: &Path, records: &[DnsRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        let _ = writeln!(text, "{} {}", r.addr, r.name);
    }
    // Written whole then renamed, so a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))
}

impl DnsServer {
    pub fn kind(&self) -> DnsServerKind {
        self.shared.kind
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.shared.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.shared.ipv6
    }

    /// `ipv4:53`, where pods send their queries.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.shared.ipv4.into(), 53)
    }

    /// The server process's pid. It answers UDP itself; each TCP connection is answered by a
    /// child it forks (another pid, same network namespace).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The records served now (from the config plus run-time changes).
    pub fn records(&self) -> Vec<DnsRecord> {
        self.shared.records.lock().expect("records lock").clone()
    }

    /// Adds an A/AAAA record and returns once the server has reloaded it.
    pub fn add_record(&self, name: &str, addr: impl Into<IpAddr>) -> Result<()> {
        let mut records = self.shared.records.lock().expect("records lock");
        records.push(DnsRecord {
            name: name.trim_end_matches('.').to_owned(),
            addr: addr.into(),
        });
        self.reload(&records)
    }

    /// Removes every record of `name` and returns once the server has reloaded.
    pub fn remove_record(&self, name: &str) -> Result<()> {
        let mut records = self.shared.records.lock().expect("records lock");
        let name = name.trim_end_matches('.');
        records.retain(|r| !r.name.eq_ignore_ascii_case(name));
        self.reload(&records)
    }

    fn reload(&self, records: &[DnsRecord]) -> Result<()> {
        let before = self.reload_count()?;
        write_hosts(&self.shared.hosts_path, records)?;
        // SAFETY: kill(2) on our own child's pid; SIGHUP makes dnsmasq re-read its hosts files.
        if unsafe { libc::kill(self.shared.pid as libc::pid_t, libc::SIGHUP) } != 0 {
            return Err(io_err("SIGHUP dnsmasq for", &self.shared.hosts_path)(
                std::io::Error::last_os_error(),
            ));
        }
        self.wait_for_reloads(before + 1, START_TIMEOUT, None)
    }

    fn reload_count(&self) -> Result<usize> {
        let needle = format!("read {}", self.shared.hosts_path.display());
        Ok(self.raw_log()?.matches(&needle).count())
    }

    fn wait_for_reloads(
        &self,
        count: usize,
        timeout: Duration,
        mut process: Option<&mut Process>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.reload_count().unwrap_or(0) >= count {
                return Ok(());
            }
            if let Some(p) = process.as_deref_mut()
                && p.has_exited()
            {
                return Err(TestbedError::UnexpectedOutput {
                    what: "dnsmasq exited while starting; its log".into(),
                    output: self.raw_log().unwrap_or_default(),
                });
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!("dnsmasq (re)loading {}", self.shared.hosts_path.display()),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Path of the server's log (queries and replies, one line each).
    pub fn log_path(&self) -> &Path {
        &self.shared.log_path
    }

    /// The whole log as text.
    pub fn raw_log(&self) -> Result<String> {
        match std::fs::read_to_string(&self.shared.log_path) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_err("read", &self.shared.log_path)(e)),
        }
    }

    /// Every query the server logged so far, in arrival order, each with its outcome.
    pub fn queries(&self) -> Result<Vec<LoggedQuery>> {
        Ok(parse_dnsmasq_log(&self.raw_log()?))
    }

    /// Polls the log until `done` holds for the queries logged so far (or fails after
    /// `timeout`); returns those queries. The log is written a moment after the answer is sent.
    pub fn wait_for_queries(
        &self,
        timeout: Duration,
        done: impl Fn(&[LoggedQuery]) -> bool,
    ) -> Result<Vec<LoggedQuery>> {
        let deadline = Instant::now() + timeout;
        loop {
            let queries = self.queries()?;
            if done(&queries) {
                return Ok(queries);
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!(
                        "waiting for queries in {}; logged so far: {queries:#?}",
                        self.shared.log_path.display()
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One query as the DNS server logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedQuery {
    /// The server's serial for this query (pairs the query with its reply lines).
    pub serial: u64,
    pub client: SocketAddr,
    /// `A`, `AAAA`, ...
    pub qtype: String,
    pub name: String,
    pub outcome: QueryOutcome,
}

/// What the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryOutcome {
    /// Addresses, after following any CNAMEs.
    Answer(Vec<IpAddr>),
    NxDomain,
    /// REFUSED: the name is outside every local zone and there is no upstream.
    Refused,
    /// The name exists but has no record of this type.
    NoData,
    /// A reply the log parser does not classify (the log's words).
    Other(String),
    /// No reply logged (yet).
    Pending,
}

/// Parses dnsmasq's `--log-queries=extra` lines:
/// `<date> dnsmasq[pid]: <serial> <client>/<port> query[A] <name> from <client>` and
/// `... <serial> <client>/<port> <source> <name> is <value>`.
pub fn parse_dnsmasq_log(log: &str) -> Vec<LoggedQuery> {
    let mut queries: Vec<LoggedQuery> = Vec::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("]: ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [serial, client, kind, name, tail @ ..] = words.as_slice() else {
            continue;
        };
        let Ok(serial) = serial.parse::<u64>() else {
            continue;
        };
        let Some(client) = parse_client(client) else {
            continue;
        };
        if let Some(qtype) = kind
            .strip_prefix("query[")
            .and_then(|k| k.strip_suffix(']'))
        {
            queries.push(LoggedQuery {
                serial,
                client,
                qtype: qtype.to_owned(),
                name: (*name).to_owned(),
                outcome: QueryOutcome::Pending,
            });
            continue;
        }
        let ["is", value, ..] = tail else { continue };
        let Some(query) = queries
            .iter_mut()
            .rev()
            .find(|q| q.serial == serial && q.client == client)
        else {
            continue;
        };
        query.outcome = match (
            std::mem::replace(&mut query.outcome, QueryOutcome::Pending),
            *value,
        ) {
            (_, "NXDOMAIN") => QueryOutcome::NxDomain,
            (_, "REFUSED") => QueryOutcome::Refused,
            (_, v) if v.starts_with("NODATA") => QueryOutcome::NoData,
            (previous, "<CNAME>") => previous,
            (previous, v) => match (previous, v.parse::<IpAddr>()) {
                (QueryOutcome::Answer(mut addrs), Ok(a)) => {
                    addrs.push(a);
                    QueryOutcome::Answer(addrs)
                }
                (_, Ok(a)) => QueryOutcome::Answer(vec![a]),
                (_, Err(_)) => QueryOutcome::Other(v.to_owned()),
            },
        };
    }
    queries
}

fn parse_client(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.rsplit_once('/')?;
    Some(SocketAddr::new(addr.parse().ok()?, port.parse().ok()?))
}

/// A resolver outside the cluster: dnsmasq on `host` (an external host), answering `address`
/// for `domain` and every name below it, as a pod with a hard-coded nameserver would use.
/// Returned once it listens on port 53; stops when the process drops.
pub fn start_outside_resolver(
    host: &crate::Host,
    domain: &str,
    address: IpAddr,
) -> Result<Process> {
    let program = DNSMASQ.path()?;
    let process = host
        .command(program)
        .args([
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--pid-file".to_owned(),
            "--user=root".to_owned(),
            "--group=root".to_owned(),
            "--bind-dynamic".to_owned(),
            format!("--listen-address={}", host.ipv4()),
            format!("--address=/{domain}/{address}"),
        ])
        .spawn()?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let listening = host.command("ss").args(["-Hlun", "sport = :53"]).output()?;
        if !listening.stdout.trim().is_empty() {
            return Ok(process);
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: format!("dnsmasq listening on {}:53", host.ipv4()),
                after: START_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_search_walk() {
        let log = "\
Nov 25 02:40:01 dnsmasq[12]: started, version 2.90 cachesize 150
Nov 25 02:40:01 dnsmasq[12]: 1 198.18.1.1/40000 query[A] db.svc.cluster.local from 198.18.1.1
Nov 25 02:40:01 dnsmasq[12]: 2 198.18.1.1/40000 query[AAAA] db.svc.cluster.local from 198.18.1.1
Nov 25 02:40:01 dnsmasq[12]: 1 198.18.1.1/40000 config db.svc.cluster.local is NXDOMAIN
Nov 25 02:40:01 dnsmasq[12]: 2 198.18.1.1/40000 config db.svc.cluster.local is NXDOMAIN
Nov 25 02:40:01 dnsmasq[12]: 3 198.18.1.1/40001 query[A] db.another-lab.com from 198.18.1.1
Nov 25 02:40:01 dnsmasq[12]: 3 198.18.1.1/40001 /tmp/x/dns-hosts db.another-lab.com is 203.0.113.10
Nov 25 02:40:01 dnsmasq[12]: 4 198.18.1.1/40001 query[AAAA] db.another-lab.com from 198.18.1.1
Nov 25 02:40:01 dnsmasq[12]: 4 198.18.1.1/40001 config db.another-lab.com is NODATA-IPv6
Nov 25 02:40:01 dnsmasq[12]: 5 2001:db8:c::1:1/40002 query[A] web from 2001:db8:c::1:1
Nov 25 02:40:07 dnsmasq[615]: 109 198.18.1.1/57493 query[A] www.example.org from 198.18.1.1
Nov 25 02:40:07 dnsmasq[615]: 109 198.18.1.1/57493 config error is REFUSED (EDE: not ready)
";
        let q = parse_dnsmasq_log(log);
        assert_eq!(q.len(), 6);
        assert_eq!(q[5].outcome, QueryOutcome::Refused);
        assert_eq!(q[0].name, "db.svc.cluster.local");
        assert_eq!(q[0].qtype, "A");
        assert_eq!(q[0].outcome, QueryOutcome::NxDomain);
        assert_eq!(
            q[2].outcome,
            QueryOutcome::Answer(vec!["203.0.113.10".parse().unwrap()])
        );
        assert_eq!(q[3].outcome, QueryOutcome::NoData);
        assert_eq!(q[4].client, "[2001:db8:c::1:1]:40002".parse().unwrap());
        assert_eq!(q[4].outcome, QueryOutcome::Pending);
    }
}
