//! The mini-cluster: a switch namespace routing between a cluster segment and an external
//! segment, a dns namespace, pods, hosts and cgroups; all removed on Drop.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use crate::{
    cgroup::{self, CgroupDir, CgroupDriver, KubeCgroup, QosClass},
    cleanup,
    dns::{self, DnsConfig, DnsServer},
    error::{Result, TestbedError, io_err},
    exec::{self, IP, Process},
    host::{Host, HostKind},
    names::RunId,
    netns::{self, NetNs},
    pod::{Pod, PodSpec},
};

/// The address plan. Every testbed has its own switch namespace, so parallel testbeds reuse
/// the same addresses without ever seeing each other.
pub mod plan {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The cluster segment (pods, DNS, in-cluster hosts): 198.18.0.0/16, 2001:db8:c::/64.
    pub const CLUSTER_V4_PREFIX_LEN: u8 = 16;
    /// The switch's address on the cluster segment: every cluster namespace's gateway.
    pub const CLUSTER_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const CLUSTER_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
    /// The cluster DNS server.
    pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
    pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x53);
    /// Pods get 198.18.1.N and 2001:db8:c::1:N (N written in decimal digits, e.g. ::1:12).
    pub const POD_V4_THIRD_OCTET: u8 = 1;
    /// In-cluster hosts get 198.18.2.N and 2001:db8:c::2:N.
    pub const CLUSTER_HOST_V4_THIRD_OCTET: u8 = 2;
    /// A ClusterIP-like range routed to the switch (nothing there unless a test adds it).
    pub const SERVICE_V4_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
    /// In the service range, silently dropped by the switch: connects time out.
    pub const UNANSWERED_CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 250);

    /// The external segment: 203.0.113.0/24, 2001:db8:e::/64.
    pub const EXTERNAL_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const EXTERNAL_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
    /// External hosts get 203.0.113.N (from .10 up unless chosen) and 2001:db8:e::N.
    pub const FIRST_EXTERNAL_HOST: u8 = 10;
    /// Outside the cluster, silently dropped by the switch: connects time out.
    pub const UNANSWERED_EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 250);
    pub const UNANSWERED_EXTERNAL_V6: Ipv6Addr =
        Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x250);
    /// Outside the cluster, unreachable: the switch answers a SYN with an ICMP error.
    pub const UNREACHABLE_EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 251);
    pub const UNREACHABLE_EXTERNAL_V6: Ipv6Addr =
        Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x251);

    /// `prefix::N` where N is written with the decimal digits of `n` (198.18.1.12 -> ::1:12).
    pub(crate) fn v6_with(base: Ipv6Addr, group7: u16, n: u8) -> Ipv6Addr {
        let mut s = base.segments();
        s[6] = group7;
        s[7] = u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits");
        Ipv6Addr::from(s)
    }
}

use plan::*;

const CLUSTER_BRIDGE: &str = "br-cluster";
const EXTERNAL_BRIDGE: &str = "br-external";

/// The mini-cluster. Build one per test; everything it made is removed when it drops (also
/// when the test panics). Methods take `&self`, so a test can share it across threads.
#[derive(Debug)]
pub struct Testbed {
    run: RunId,
    cgroup_root: PathBuf,
    state_dir: PathBuf,
    switch: NetNs,
    dns_netns: NetNs,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    namespaces: Vec<String>,
    etc_netns: Vec<PathBuf>,
    /// Relative cgroup dirs to remove with everything below them.
    cgroups: Vec<String>,
    processes: Vec<Process>,
    dns: Option<DnsServer>,
    names: HashSet<String>,
    used_external: HashSet<u8>,
    next_pod: u8,
    next_cluster_host: u8,
    created_system_slice: bool,
}

/// Whether this process made system.slice (only then is it ours to remove when empty).
static SYSTEM_SLICE_EXISTED: OnceLock<bool> = OnceLock::new();

/// Fails with a clear error unless the effective uid is 0.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(TestbedError::NotRoot { euid })
    }
}

impl Testbed {
    /// Builds the switch (bridges, forwarding, unanswered addresses) and the dns namespace.
    /// Leftovers of killed runs are removed first. Fails (never skips) when not root or when
    /// a needed program is missing (the error names its Debian package).
    pub fn new() -> Result<Self> {
        require_root()?;
        IP.path()?;
        if let Err(e) = cleanup::cleanup_leftovers() {
            eprintln!("observer testbed: cleaning leftovers of earlier runs: {e:?}");
        }
        let cgroup_root = cgroup::cgroup2_mount()?;
        SYSTEM_SLICE_EXISTED.get_or_init(|| cgroup_root.join("system.slice").exists());
        let run = RunId::new();
        let state_dir = std::env::temp_dir().join(run.long_name(""));
        std::fs::create_dir_all(&state_dir).map_err(io_err("mkdir", &state_dir))?;
        let switch_name = run.netns("sw");
        let testbed = Self {
            cgroup_root,
            state_dir,
            switch: NetNs::named(switch_name.clone()),
            dns_netns: NetNs::named(run.netns("dns")),
            inner: Mutex::new(Inner {
                next_pod: 1,
                next_cluster_host: 1,
                ..Inner::default()
            }),
            run,
        };
        testbed.new_netns(switch_name)?;
        testbed.build_switch()?;
        let dns_netns = testbed.new_netns(testbed.dns_netns.name().to_owned())?;
        testbed.attach_cluster(&dns_netns, "vdns", DNS_V4, DNS_V6)?;
        Ok(testbed)
    }

    fn build_switch(&self) -> Result<()> {
        let sw = Some(self.switch.name());
        exec::ip_batch(
            sw,
            &[
                format!("link add {CLUSTER_BRIDGE} type bridge forward_delay 0"),
                format!("link add {EXTERNAL_BRIDGE} type bridge forward_delay 0"),
                format!(
                    "addr add {CLUSTER_GATEWAY_V4}/{CLUSTER_V4_PREFIX_LEN} dev {CLUSTER_BRIDGE}"
                ),
                format!("addr add {CLUSTER_GATEWAY_V6}/64 dev {CLUSTER_BRIDGE} nodad"),
                format!("addr add {EXTERNAL_GATEWAY_V4}/24 dev {EXTERNAL_BRIDGE}"),
                format!("addr add {EXTERNAL_GATEWAY_V6}/64 dev {EXTERNAL_BRIDGE} nodad"),
                format!("link set {CLUSTER_BRIDGE} up"),
                format!("link set {EXTERNAL_BRIDGE} up"),
                // Silently dropped (a blackhole route sends no ICMP): connects time out.
                format!("route add blackhole {UNANSWERED_EXTERNAL_V4}/32"),
                format!("route add blackhole {UNANSWERED_EXTERNAL_V6}/128"),
                format!("route add blackhole {UNANSWERED_CLUSTER_V4}/32"),
                // Answered with ICMP host/address unreachable: connects fail at once.
                format!("route add unreachable {UNREACHABLE_EXTERNAL_V4}/32"),
                format!("route add unreachable {UNREACHABLE_EXTERNAL_V6}/128"),
            ],
        )?;
        // The switch routes between the two segments. It has no other interface, so nothing
        // it forwards can leave the testbed.
        self.switch
            .run(|| -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            })?
            .map_err(|source| TestbedError::Netns {
                netns: self.switch.name().to_owned(),
                op: "enable forwarding",
                source,
            })
    }

    fn new_netns(&self, name: String) -> Result<NetNs> {
        // Registered before creation: a half-made namespace is still removed.
        self.lock().namespaces.push(name.clone());
        NetNs::create(name)
    }

    fn attach(
        &self,
        ns: &NetNs,
        veth: &str,
        bridge: &str,
        addrs: [String; 2],
        routes: &[String],
    ) -> Result<()> {
        exec::ip_batch(
            Some(self.switch.name()),
            &[
                format!(
                    "link add {veth} type veth peer name eth0 netns {}",
                    ns.name()
                ),
                format!("link set {veth} master {bridge} up"),
            ],
        )?;
        let mut lines = vec![
            format!("addr add {} dev eth0", addrs[0]),
            format!("addr add {} dev eth0 nodad", addrs[1]),
            "link set eth0 up".to_owned(),
        ];
        lines.extend(routes.iter().map(|r| format!("route add {r}")));
        exec::ip_batch(Some(ns.name()), &lines)
    }

    fn attach_cluster(&self, ns: &NetNs, veth: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
        self.attach(
            ns,
            veth,
            CLUSTER_BRIDGE,
            [format!("{v4}/{CLUSTER_V4_PREFIX_LEN}"), format!("{v6}/64")],
            &[
                format!("203.0.113.0/24 via {CLUSTER_GATEWAY_V4}"),
                format!("{SERVICE_V4_NET}/16 via {CLUSTER_GATEWAY_V4}"),
                format!("2001:db8:e::/64 via {CLUSTER_GATEWAY_V6}"),
            ],
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim_name(&self, name: &str) -> Result<()> {
        let valid = !name.is_empty()
            && name.len() <= 24
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(TestbedError::Invalid {
                what: "testbed name (1-24 of a-z, 0-9, -)",
                detail: name.to_owned(),
            });
        }
        if !self.lock().names.insert(name.to_owned()) {
            return Err(TestbedError::Invalid {
                what: "testbed name already used in this testbed",
                detail: name.to_owned(),
            });
        }
        Ok(())
    }

    /// This run's unique suffix (in every namespace, cgroup and directory name it makes).
    pub fn run_id(&self) -> &RunId {
        &self.run
    }

    /// The cgroup2 mount point.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// A directory for this run's files (removed on drop).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The namespace holding the bridges and routing between the segments.
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// The namespace the DNS server runs in (198.18.0.53, 2001:db8:c::53).
    pub fn dns_netns(&self) -> &NetNs {
        &self.dns_netns
    }

    /// Network namespaces made so far (switch and dns included).
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.clone()
    }

    /// Cgroup directories made so far (absolute; each removed with its subtree on drop).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.lock()
            .cgroups
            .iter()
            .map(|c| self.cgroup_root.join(c))
            .collect()
    }

    /// Starts the cluster DNS server in the dns namespace (at most one per testbed).
    pub fn start_dns(&self, config: DnsConfig) -> Result<DnsServer> {
        if self.lock().dns.is_some() {
            return Err(TestbedError::Invalid {
                what: "DNS server",
                detail: "this testbed already runs one".into(),
            });
        }
        let (server, process) =
            dns::start(&self.dns_netns, &self.state_dir, DNS_V4, DNS_V6, config)?;
        let mut inner = self.lock();
        inner.processes.push(process);
        inner.dns = Some(server.clone());
        Ok(server)
    }

    /// The running DNS server, if started.
    pub fn dns(&self) -> Option<DnsServer> {
        self.lock().dns.clone()
    }

    /// A pod: network namespace on the cluster segment, `/etc/netns/<ns>/resolv.conf` (the
    /// testbed's DNS server unless the spec names nameservers), kubelet-shaped cgroups, and a main process that runs in the container until teardown.
    pub fn add_pod(&self, spec: PodSpec) -> Result<Pod> {
        self.claim_name(&spec.name)?;
        let n = {
            let mut inner = self.lock();
            let n = inner.next_pod;
            inner.next_pod = n
                .checked_add(1)
                .filter(|n| *n <= 251)
                .ok_or(TestbedError::AddressesExhausted { what: "pod" })?;
            n
        };
        let ipv4 = Ipv4Addr::new(198, 18, POD_V4_THIRD_OCTET, n);
        let ipv6 = v6_with(CLUSTER_GATEWAY_V6, 1, n);
        let netns = self.new_netns(self.run.netns(&format!("p-{}", spec.name)))?;
        self.attach_cluster(&netns, &format!("vp{n}"), ipv4, ipv6)?;

        let mut resolv = spec.resolv.clone();
        if resolv.nameservers.is_empty() {
            resolv.nameservers.push(IpAddr::V4(DNS_V4));
        }
        let etc = Path::new("/etc/netns").join(netns.name());
        self.lock().etc_netns.push(etc.clone());
        std::fs::create_dir_all(&etc).map_err(io_err("mkdir", &etc))?;
        let resolv_path = etc.join("resolv.conf");
        std::fs::write(&resolv_path, resolv.render()).map_err(io_err("write", &resolv_path))?;

        let cgroup = self.kube_cgroup_numbered(spec.driver, spec.qos, u32::from(n))?;
        let pod = Pod {
            host: Host {
                name: spec.name,
                kind: HostKind::Cluster,
                netns,
                ipv4,
                ipv6,
            },
            resolv,
            resolv_path,
            cgroup,
        };
        // A running container always has its main process; the lookups and connects tests
        // make come from short-lived processes beside it, as `kubectl exec` or a worker's
        // children would.
        let main = pod.command("sleep").arg("infinity").spawn()?;
        self.lock().processes.push(main);
        Ok(pod)
    }

    /// An in-cluster host (198.18.2.N, 2001:db8:c::2:N), e.g. a service backend.
    pub fn add_cluster_host(&self, name: &str) -> Result<Host> {
        self.claim_name(name)?;
        let n = {
            let mut inner = self.lock();
            let n = inner.next_cluster_host;
            inner.next_cluster_host =
                n.checked_add(1)
                    .filter(|n| *n <= 251)
                    .ok_or(TestbedError::AddressesExhausted {
                        what: "cluster host",
                    })?;
            n
        };
        let ipv4 = Ipv4Addr::new(198, 18, CLUSTER_HOST_V4_THIRD_OCTET, n);
        let ipv6 = v6_with(CLUSTER_GATEWAY_V6, 2, n);
        let netns = self.new_netns(self.run.netns(&format!("c-{name}")))?;
        self.attach_cluster(&netns, &format!("vc{n}"), ipv4, ipv6)?;
        Ok(Host {
            name: name.to_owned(),
            kind: HostKind::Cluster,
            netns,
            ipv4,
            ipv6,
        })
    }

    /// An external host at the next free 203.0.113.N (from .10) and 2001:db8:e::N.
    pub fn add_external_host(&self, name: &str) -> Result<Host> {
        let n = {
            let inner = self.lock();
            (FIRST_EXTERNAL_HOST..=249)
                .find(|n| !inner.used_external.contains(n))
                .ok_or(TestbedError::AddressesExhausted {
                    what: "external host",
                })?
        };
        self.add_external_host_at(name, Ipv4Addr::new(203, 0, 113, n))
    }

    /// An external host at a chosen 203.0.113.N (N in 2..=249) and 2001:db8:e::N.
    pub fn add_external_host_at(&self, name: &str, ipv4: Ipv4Addr) -> Result<Host> {
        let [a, b, c, n] = ipv4.octets();
        if [a, b, c] != [203, 0, 113] || !(2..=249).contains(&n) {
            return Err(TestbedError::Invalid {
                what: "external host address (203.0.113.2 - 203.0.113.249)",
                detail: ipv4.to_string(),
            });
        }
        if !self.lock().used_external.insert(n) {
            return Err(TestbedError::Invalid {
                what: "external host address already in use",
                detail: ipv4.to_string(),
            });
        }
        self.claim_name(name)?;
        let ipv6 = v6_with(EXTERNAL_GATEWAY_V6, 0, n);
        let netns = self.new_netns(self.run.netns(&format!("x-{name}")))?;
        self.attach(
            &netns,
            &format!("vx{n}"),
            EXTERNAL_BRIDGE,
            [format!("{ipv4}/24"), format!("{ipv6}/64")],
            &[
                format!("198.18.0.0/15 via {EXTERNAL_GATEWAY_V4}"),
                format!("2001:db8:c::/64 via {EXTERNAL_GATEWAY_V6}"),
            ],
        )?;
        Ok(Host {
            name: name.to_owned(),
            kind: HostKind::External,
            netns,
            ipv4,
            ipv6,
        })
    }

    /// Kubelet-shaped pod and container cgroups without a network namespace (for tests that
    /// only need pod identity).
    pub fn kube_cgroup(&self, driver: CgroupDriver, qos: QosClass) -> Result<KubeCgroup> {
        let n = {
            let mut inner = self.lock();
            let n = 1000 + inner.cgroups.len() as u32;
            inner.names.insert(format!("#cgroup{n}"));
            n
        };
        self.kube_cgroup_numbered(driver, qos, n)
    }

    fn kube_cgroup_numbered(
        &self,
        driver: CgroupDriver,
        qos: QosClass,
        n: u32,
    ) -> Result<KubeCgroup> {
        let pod_uid = self.run.pod_uid(n);
        let container_id = self.run.container_id();
        let (pod_rel, container_rel) = cgroup::kubelet_paths(driver, qos, &pod_uid, &container_id);
        self.lock().cgroups.push(pod_rel.clone());
        let pod = cgroup::create_dirs(&self.cgroup_root, &pod_rel)?;
        let container = cgroup::create_dirs(&self.cgroup_root, &container_rel)?;
        Ok(KubeCgroup {
            driver,
            qos,
            pod_uid,
            container_id,
            pod,
            container,
        })
    }

    /// Another container of `pod` (a sidecar): a container cgroup of its own beside the pod's
    /// first one, in the same pod directory (same pod UID), named as the kubelet and containerd
    /// name containers, sharing the pod's network namespace and resolv.conf. The returned
    /// [`Pod`] runs its processes in the new container; it is removed with the pod.
    pub fn add_sidecar(&self, pod: &Pod) -> Result<Pod> {
        let base = &pod.cgroup;
        let container_id = self.run.container_id();
        let (pod_rel, container_rel) =
            cgroup::kubelet_paths(base.driver, base.qos, &base.pod_uid, &container_id);
        if !self.lock().cgroups.contains(&pod_rel) {
            return Err(TestbedError::Invalid {
                what: "pod of this testbed",
                detail: pod.name.clone(),
            });
        }
        let container = cgroup::create_dirs(&self.cgroup_root, &container_rel)?;
        Ok(Pod {
            cgroup: KubeCgroup {
                container_id,
                container,
                ..base.clone()
            },
            ..pod.clone()
        })
    }

    /// A cgroup for a process that is not in any pod: `system.slice/observer-test-<suffix>-<name>.service`.
    pub fn host_cgroup(&self, name: &str) -> Result<CgroupDir> {
        let relative = format!("system.slice/{}.service", self.run.long_name(name));
        {
            let mut inner = self.lock();
            if inner.cgroups.contains(&relative) {
                return Err(TestbedError::Invalid {
                    what: "host cgroup name already used in this testbed",
                    detail: name.to_owned(),
                });
            }
            inner.cgroups.push(relative.clone());
            inner.created_system_slice = SYSTEM_SLICE_EXISTED.get() == Some(&false);
        }
        cgroup::create_dirs(&self.cgroup_root, &relative)
    }

    /// Tears everything down now and reports what could not be removed (Drop does the same
    /// silently, printing problems to stderr).
    pub fn close(mut self) -> Result<(), Vec<TestbedError>> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn teardown(&mut self) -> Vec<TestbedError> {
        let mut inner = std::mem::take(&mut *self.lock());
        let mut errors = Vec::new();
        for mut p in inner.processes.drain(..) {
            p.kill();
        }
        for relative in inner.cgroups.iter().rev() {
            if let Err(e) = cgroup::remove_tree(&self.cgroup_root, &self.cgroup_root.join(relative))
            {
                errors.push(e);
            }
            cgroup::remove_empty_shared_parents(&self.cgroup_root, relative);
        }
        if inner.created_system_slice {
            let _ = std::fs::remove_dir(self.cgroup_root.join("system.slice"));
        }
        // Pods and hosts first, the switch last.
        for ns in inner.namespaces.iter().rev() {
            if let Err(e) = netns::destroy(ns) {
                errors.push(e);
            }
        }
        for dir in &inner.etc_netns {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(io_err("remove", dir)(e));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.state_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(io_err("remove", &self.state_dir)(e));
        }
        errors
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("observer testbed {}: teardown: {e:?}", self.run.suffix());
        }
    }
}
