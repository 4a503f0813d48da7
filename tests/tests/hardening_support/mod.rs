//! Helpers of the hardening tests: the motivating story's testbed, a DNS "server" in the
//! testbed that answers with crafted bytes, the agent started by hand (to SIGKILL it), and
//! the kernel's view of which programs exist and what is attached to the cgroup2 root.
#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer_tests::{
    DnsConfig, DnsServer, Host, Pod, PodSpec, Process, TcpServer, Testbed,
    agent::{free_local_port, http_get, observer_bin},
};

pub const SEARCH: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
pub const DB_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// The motivating story: `db` escapes through the search domain another-lab.com.
pub struct Story {
    pub tb: Testbed,
    pub dns: DnsServer,
    pub db: Host,
    pub listener: TcpServer,
    pub web: Pod,
}

impl Story {
    pub fn new() -> Story {
        let tb = Testbed::new().expect("building the testbed (these tests must run as root)");
        let db = tb
            .add_external_host_at("db", DB_ADDR)
            .expect("external host db");
        let listener = db.listen_tcp(5432).expect("listening on db:5432");
        let dns = tb
            .start_dns(
                DnsConfig::dnsmasq()
                    .local_zone("another-lab.com")
                    .record("db.another-lab.com", DB_ADDR),
            )
            .expect("dnsmasq");
        let web = tb
            .add_pod(PodSpec::new("web").search(SEARCH).ndots(5))
            .expect("pod web");
        Story {
            tb,
            dns,
            db,
            listener,
            web,
        }
    }

    /// The pod connects to `db` through glibc and its search list.
    pub fn connect_db(&self) {
        let report = self
            .web
            .connect_tcp(
                "db",
                5432,
                observer_tests::Family::V4,
                Duration::from_secs(5),
            )
            .expect("running the connect in the pod");
        assert!(
            matches!(
                report.outcome,
                observer_tests::ConnectOutcome::Connected { .. }
            ),
            "db:5432 through the search list: {:?}",
            report.outcome
        );
    }

    pub fn web_cgroup(&self) -> u64 {
        self.web.cgroup().container.id()
    }
}

/// A UDP "DNS server" on port 53 of a host the test controls, answering each query with the
/// crafted message its first label asks for (`loop`, `cut`, `counts`, `noquestion`,
/// `random`); anything else gets no answer. It echoes the query id so that the bytes look
/// like a response to the client's query.
const HOSTILE_SERVER: &str = r#"
import os, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    if len(data) < 14:
        continue
    qid, n = data[:2], data[12]
    label = data[13:13 + n]
    end = data.find(b"\0", 12)
    question = data[12:end + 5] if end > 0 else b""
    if label == b"loop":
        # The question's name is a pointer to itself.
        resp = qid + b"\x81\x80" + struct.pack(">HHHH", 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    elif label == b"cut":
        full = qid + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0) + question \
            + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x0a"
        resp = full[:-3]
    elif label == b"counts":
        resp = qid + b"\x81\x80" + struct.pack(">HHHH", 1, 65535, 0, 0) + question
    elif label == b"noquestion":
        resp = qid + b"\x81\x80" + struct.pack(">HHHH", 0, 1, 0, 0) \
            + b"\x01x\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x0a"
    elif label == b"random":
        resp = qid + os.urandom(60)
    else:
        continue
    s.sendto(resp, peer)
"#;

/// From a pod: `rounds` queries of each hostile kind to the server, then random datagrams to
/// its port 53 for `flood_secs` seconds (at most `flood_max`). Prints one JSON line.
const HOSTILE_CLIENT: &str = r#"
import json, os, socket, struct, sys, time
server, rounds, flood_secs, flood_max = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def query(i, name):
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0\x00\x01\x00\x01"
answered = {}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
i = 1
for kind in ["loop", "cut", "counts", "noquestion", "random"]:
    answered[kind] = 0
    for _ in range(rounds):
        s.sendto(query(i, kind + ".evil.test"), (server, 53)); i += 1
        try:
            s.recvfrom(4096); answered[kind] += 1
        except socket.timeout:
            pass
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, start = 0, time.monotonic()
while time.monotonic() - start < flood_secs and sent < flood_max:
    flood.sendto(os.urandom(int.from_bytes(os.urandom(2), "big") % 600), (server, 53))
    sent += 1
    if sent % 200 == 0:
        time.sleep(0.02)
print(json.dumps({"answered": answered, "flood_sent": sent}), flush=True)
"#;

pub struct HostileServer {
    pub host: Host,
    _process: Process,
}

impl HostileServer {
    pub fn start(tb: &Testbed) -> HostileServer {
        let host = tb.add_cluster_host("evil").expect("cluster host evil");
        let process = host
            .command("python3")
            .args(["-u", "-c", HOSTILE_SERVER])
            .spawn()
            .expect("starting the hostile DNS server");
        let listening = eventually(Duration::from_secs(10), || {
            host.command("ss")
                .args(["-uln"])
                .output()
                .is_ok_and(|o| o.stdout.contains(":53 "))
        });
        assert!(listening, "the hostile DNS server did not bind port 53");
        HostileServer {
            host,
            _process: process,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host.ipv4().into(), 53)
    }
}

/// What the hostile client saw.
pub struct HostileRun {
    pub answered: serde_json::Value,
    pub flood_sent: u64,
}

pub fn run_hostile_client(
    pod: &Pod,
    server: SocketAddr,
    rounds: u32,
    flood: Duration,
) -> HostileRun {
    let out = pod
        .command("python3")
        .args([
            "-c".to_owned(),
            HOSTILE_CLIENT.to_owned(),
            server.ip().to_string(),
            rounds.to_string(),
            flood.as_secs_f64().to_string(),
            "20000".to_owned(),
        ])
        .timeout(flood + Duration::from_secs(60))
        .output()
        .expect("running the hostile client in the pod");
    let line =
        out.stdout.lines().last().unwrap_or_else(|| {
            panic!("the hostile client printed nothing; stderr: {}", out.stderr)
        });
    let v: serde_json::Value = serde_json::from_str(line).expect("the client's JSON line");
    HostileRun {
        answered: v["answered"].clone(),
        flood_sent: v["flood_sent"].as_u64().expect("flood_sent"),
    }
}

/// The agent started by hand, so that a test can SIGKILL it (the harness only stops it
/// with SIGTERM).
pub struct RawAgent {
    pub child: Child,
    pub metrics_addr: SocketAddr,
}

impl RawAgent {
    pub fn start() -> RawAgent {
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_local_port())
            .parse()
            .expect("addr");
        let child = Command::new(observer_bin())
            .args(["run", "--output", "none", "--kube", "off", "--metrics-addr"])
            .arg(metrics_addr.to_string())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the agent");
        let mut agent = RawAgent {
            child,
            metrics_addr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait().expect("try_wait") {
                panic!("the agent exited before it was ready: {status}");
            }
            if http_get(agent.metrics_addr, "/readyz").is_ok_and(|(code, _)| code == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent was not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no handler runs, nothing is detached by the agent itself.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the agent");
    }
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ids of the bpf programs a process holds open (from its fd table).
pub fn program_ids_of(pid: u32) -> Vec<u32> {
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&fd_dir).expect("fd dir").flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = std::fs::read_to_string(
            Path::new(&format!("/proc/{pid}/fdinfo")).join(entry.file_name()),
        )
        .unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the kernel still has a program with this id (BPF_PROG_GET_FD_BY_ID).
pub fn program_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<GetFdById>()` bytes of a live, initialised struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const GetFdById,
            size_of::<GetFdById>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fd the call above just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// Program ids attached to the cgroup2 root (bpftool's view of the kernel's attach lists).
pub fn attached_to_cgroup_root() -> Vec<u32> {
    let root = observer_tests::cgroup2_mount().expect("finding the cgroup2 mount");
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&root)
        .output()
        .expect("running bpftool (package bpftool)");
    assert!(out.status.success(), "bpftool cgroup show: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let mut ids: Vec<u32> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64().map(|id| id as u32))
        .collect();
    ids.sort_unstable();
    ids
}

/// Polls `cond` until it holds or `within` passes.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
