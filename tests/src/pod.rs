//! Pods: a network namespace with its own resolv.conf, and kubelet-shaped cgroups its
//! processes run in.
use std::{
    ffi::OsStr,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cgroup::{CgroupDriver, KubeCgroup, QosClass},
    error::{Result, TestbedError},
    exec::{CommandOutput, DEFAULT_TIMEOUT, PYTHON3},
    host::Host,
    netns::TestCommand,
    probe::{DnsProbe, ProbeReport},
};

/// A pod's /etc/resolv.conf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvConf {
    pub search: Vec<String>,
    /// Empty: the testbed's DNS server.
    pub nameservers: Vec<IpAddr>,
    /// Option words, e.g. `ndots:5`, `single-request`.
    pub options: Vec<String>,
}

impl Default for ResolvConf {
    /// The kubelet's default for a pod in namespace `default`: ndots 5 and the cluster search list.
    fn default() -> Self {
        Self {
            search: [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ]
            .map(String::from)
            .to_vec(),
            nameservers: Vec::new(),
            options: vec!["ndots:5".into()],
        }
    }
}

impl ResolvConf {
    pub fn render(&self) -> String {
        let mut text = String::new();
        if !self.search.is_empty() {
            let _ = writeln!(text, "search {}", self.search.join(" "));
        }
        for ns in &self.nameservers {
            let _ = writeln!(text, "nameserver {ns}");
        }
        if !self.options.is_empty() {
            let _ = writeln!(text, "options {}", self.options.join(" "));
        }
        text
    }
}

/// What to build for a pod.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Short name (letters, digits, `-`), part of the namespace name.
    pub name: String,
    pub resolv: ResolvConf,
    pub driver: CgroupDriver,
    pub qos: QosClass,
}

impl PodSpec {
    /// A burstable pod under the systemd driver with the kubelet's default resolv.conf.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            resolv: ResolvConf::default(),
            driver: CgroupDriver::Systemd,
            qos: QosClass::Burstable,
        }
    }

    pub fn search<I, S>(mut self, domains: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.resolv.search = domains.into_iter().map(Into::into).collect();
        self
    }

    /// Replaces any `ndots:` option.
    pub fn ndots(mut self, n: u8) -> Self {
        self.resolv.options.retain(|o| !o.starts_with("ndots:"));
        self.resolv.options.push(format!("ndots:{n}"));
        self
    }

    pub fn option(mut self, option: &str) -> Self {
        self.resolv.options.push(option.to_owned());
        self
    }

    pub fn nameserver(mut self, addr: impl Into<IpAddr>) -> Self {
        self.resolv.nameservers.push(addr.into());
        self
    }

    pub fn driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    pub fn qos(mut self, qos: QosClass) -> Self {
        self.qos = qos;
        self
    }
}

/// Which address family a connect may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

impl Family {
    fn as_arg(self) -> &'static str {
        match self {
            Family::Any => "any",
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
}

/// How a connect attempt from a pod ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected; `peer` is the address connected to, `local` the pod's side.
    Connected {
        peer: SocketAddr,
        local: SocketAddr,
    },
    Refused,
    TimedOut,
    /// getaddrinfo failed (e.g. every search-list name was NXDOMAIN).
    ResolveFailed(String),
    Failed(String),
}

/// One connect attempt, made by a process of its own inside the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectReport {
    /// The connecting process (its cgroup is the pod's container cgroup).
    pub pid: u32,
    pub outcome: ConnectOutcome,
}

// Real glibc resolution (getaddrinfo through the pod's resolv.conf), then connect. One line out.
const CONNECT_SCRIPT: &str = r#"
import os, socket, sys
host, port, timeout, fam = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
family = {"any": socket.AF_UNSPEC, "v4": socket.AF_INET, "v6": socket.AF_INET6}[fam]
print("pid", os.getpid(), flush=True)
try:
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
except socket.gaierror as e:
    print("resolve-failed", e); sys.exit(0)
err = None
for af, kind, proto, _, addr in infos:
    s = socket.socket(af, kind, proto)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        peer, local = s.getpeername(), s.getsockname()
        print("connected", peer[0], peer[1], local[0], local[1]); sys.exit(0)
    except ConnectionRefusedError:
        err = "refused"
    except (socket.timeout, TimeoutError):
        err = "timeout"
    except OSError as e:
        err = "failed %s" % e
    finally:
        s.close()
print(err)
"#;

// getaddrinfo only: the addresses glibc returned, one per line, after a pid line.
const RESOLVE_SCRIPT: &str = r#"
import os, socket, sys
family = {"any": socket.AF_UNSPEC, "v4": socket.AF_INET, "v6": socket.AF_INET6}[sys.argv[2]]
print("pid", os.getpid(), flush=True)
try:
    infos = socket.getaddrinfo(sys.argv[1], None, family, socket.SOCK_STREAM)
except socket.gaierror as e:
    print("resolve-failed", e); sys.exit(0)
for info in infos:
    print("addr", info[4][0])
"#;

/// One name resolution made by glibc in a process of its own inside the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveReport {
    pub pid: u32,
    /// Addresses in getaddrinfo's order; Err holds glibc's message when resolution failed.
    pub addrs: Result<Vec<IpAddr>, String>,
}

/// A pod (cheap to clone; the testbed removes it): a host of the cluster segment (its name,
/// network namespace and addresses, through `Deref`) with its own resolv.conf and cgroups.
#[derive(Clone, Debug)]
pub struct Pod {
    pub(crate) host: Host,
    pub(crate) resolv: ResolvConf,
    pub(crate) resolv_path: PathBuf,
    pub(crate) cgroup: KubeCgroup,
}

impl std::ops::Deref for Pod {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl Pod {
    pub fn resolv_conf(&self) -> &ResolvConf {
        &self.resolv
    }

    /// `/etc/netns/<netns>/resolv.conf`.
    pub fn resolv_conf_path(&self) -> &Path {
        &self.resolv_path
    }

    /// The pod's cgroups; its processes run in `cgroup().container`.
    pub fn cgroup(&self) -> &KubeCgroup {
        &self.cgroup
    }

    /// A program to run in the pod: its network namespace, its resolv.conf (through
    /// `ip netns exec`) and its container cgroup (joined before exec).
    pub fn command(&self, program: impl AsRef<OsStr>) -> TestCommand {
        self.netns
            .command(program)
            .in_cgroup(&self.cgroup.container)
    }

    /// Resolves `host` with glibc (search list, ndots) and connects to `port`, from a process
    /// of its own in the pod. `timeout` bounds each connect attempt.
    pub fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        family: Family,
        timeout: Duration,
    ) -> Result<ConnectReport> {
        let fam = family.as_arg();
        let out = self
            .command(PYTHON3.path()?)
            .args(["-c", CONNECT_SCRIPT, host, &port.to_string()])
            .arg(timeout.as_secs_f64().to_string())
            .arg(fam)
            // A hang guard on top of the script's own bounds: starting python in a guest
            // under TCG alone can take seconds.
            .timeout(timeout * 4 + DEFAULT_TIMEOUT)
            .output()?;
        let what = format!("connect to {host}:{port} from pod {}", self.name);
        let unexpected = || unexpected_output(&what, &out);
        let (pid, mut lines) = pid_then_lines(&out.stdout).ok_or_else(unexpected)?;
        let result = lines.next().ok_or_else(unexpected)?;
        let words: Vec<&str> = result.split_whitespace().collect();
        let outcome = match words.as_slice() {
            ["connected", peer, pport, local, lport] => {
                let addr = |a: &str, p: &str| -> Option<SocketAddr> {
                    Some(SocketAddr::new(a.parse().ok()?, p.parse().ok()?))
                };
                ConnectOutcome::Connected {
                    peer: addr(peer, pport).ok_or_else(unexpected)?,
                    local: addr(local, lport).ok_or_else(unexpected)?,
                }
            }
            ["refused"] => ConnectOutcome::Refused,
            ["timeout"] => ConnectOutcome::TimedOut,
            ["resolve-failed", ..] => ConnectOutcome::ResolveFailed(
                result.trim_start_matches("resolve-failed ").to_owned(),
            ),
            ["failed", ..] => {
                ConnectOutcome::Failed(result.trim_start_matches("failed ").to_owned())
            }
            _ => return Err(unexpected()),
        };
        Ok(ConnectReport { pid, outcome })
    }

    /// Resolves `host` with glibc's getaddrinfo (search list, ndots, A and AAAA in parallel
    /// unless resolv.conf says otherwise) in a process of its own in the pod; no connect.
    pub fn resolve(&self, host: &str, family: Family) -> Result<ResolveReport> {
        let out = self
            .command(PYTHON3.path()?)
            .args(["-c", RESOLVE_SCRIPT, host, family.as_arg()])
            .output()?;
        let what = format!("resolve {host} in pod {}", self.name);
        let unexpected = || unexpected_output(&what, &out);
        let (pid, lines) = pid_then_lines(&out.stdout).ok_or_else(unexpected)?;
        let rest: Vec<&str> = lines.collect();
        let addrs = match rest.first() {
            Some(l) if l.starts_with("resolve-failed") => {
                Err(l.trim_start_matches("resolve-failed ").to_owned())
            }
            _ => {
                let mut addrs = Vec::new();
                for l in rest {
                    let a = l.strip_prefix("addr ").and_then(|a| a.parse().ok());
                    let a: IpAddr = a.ok_or_else(unexpected)?;
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                Ok(addrs)
            }
        };
        Ok(ResolveReport { pid, addrs })
    }

    /// Sends one DNS query from the pod with the `dns-probe-client` binary (path from
    /// [`crate::dns_probe_client_bin!`]) and returns the exact bytes sent and received.
    pub fn dns_probe(&self, client_bin: &Path, probe: &DnsProbe) -> Result<ProbeReport> {
        let out = self
            .command(client_bin)
            .args(probe.args())
            .timeout(probe.timeout + DEFAULT_TIMEOUT)
            .output()?
            .check(&format!("dns-probe-client in pod {}", self.name))?;
        let mut report = ProbeReport::parse(&out.stdout)?;
        report.cgroup_id = crate::cgroup::cgroup2_mount()
            .ok()
            .and_then(|root| {
                std::fs::metadata(root.join(report.cgroup.trim_start_matches('/'))).ok()
            })
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        Ok(report)
    }
}

/// The scripts' output starts with `pid <pid>`: the pid, and the lines after it.
fn pid_then_lines(stdout: &str) -> Option<(u32, std::str::Lines<'_>)> {
    let mut lines = stdout.lines();
    let pid = lines.next()?.strip_prefix("pid ")?.parse().ok()?;
    Some((pid, lines))
}

/// The error for a script whose output is not what it prints.
fn unexpected_output(what: &str, out: &CommandOutput) -> TestbedError {
    TestbedError::UnexpectedOutput {
        what: what.to_owned(),
        output: format!("{}{}", out.stdout, out.stderr),
    }
}
