//! Helpers of the hardening tests: a DNS "server" in the testbed that answers with crafted
//! bytes, and the client that sends it queries and floods it.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use observer_tests::{Host, Pod, Process, Testbed};

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
        let listening = eventually(Duration::from_secs(60), || {
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
