//! Line output: `--output text` for people, `--output json` for scripts.
use std::{
    borrow::Cow,
    io::{self, IsTerminal, Write},
};

use serde::Serialize;

use super::{
    Enriched, WallClock, Workload,
    spans::{fix, flag_message, pod_namespace},
};
use crate::record::{Outcome, Rcode};

/// Colour only on a terminal, and never when `NO_COLOR` is set to something.
/// The same rule for the connections on standard output and the logs on standard error.
pub fn color_on(stream: impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

const RESET: &str = "\x1b[0m";
const RED_BOLD: &str = "\x1b[1;31m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const MAGENTA: &str = "\x1b[35m";
const DIM: &str = "\x1b[2m";

/// One line per egress or flagged connection:
/// `<time> ns/pod db -> db.another-lab.com (via search domain another-lab.com, 3 NXDOMAIN) -> 203.0.113.10:5432 established EGRESS FLAGGED`.
#[derive(Debug)]
pub struct TextWriter<W> {
    out: W,
    clock: WallClock,
    color: bool,
}

impl<W: Write> TextWriter<W> {
    pub fn new(out: W, clock: WallClock, color: bool) -> Self {
        Self { out, clock, color }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Writes the line if the connection is egress or flagged; `Ok(false)` when it is not.
    pub fn write(&mut self, enriched: &Enriched) -> io::Result<bool> {
        let record = &enriched.record;
        if !(record.egress || record.flagged || record.drift) {
            return Ok(false);
        }
        let paint = |code: &str, text: &str| {
            if self.color {
                format!("{code}{text}{RESET}")
            } else {
                text.to_owned()
            }
        };
        let time = humantime::format_rfc3339_millis(self.clock.system_time(record.outcome_at));
        let mut line = format!("{} {}", paint(DIM, &time.to_string()), enriched.who());
        if let Some(chain) = &record.chain {
            let asked = chain.query_name.trim_end_matches('.');
            line.push(' ');
            line.push_str(asked);
            if asked != &*chain.server_address {
                line.push_str(" -> ");
                line.push_str(&chain.server_address);
            }
            let mut notes = Vec::new();
            if let Some(domain) = &chain.search_domain {
                notes.push(format!("via search domain {domain}"));
            }
            if !chain.cname_chain.is_empty() {
                notes.push(format!("CNAME {}", chain.cname_chain.join(" -> ")));
            }
            if chain.wasted_queries > 0 {
                let all_nxdomain = chain
                    .queries
                    .iter()
                    .filter(|q| q.name != chain.server_address)
                    .all(|q| q.rcode == Some(Rcode::NXDOMAIN));
                let what = if all_nxdomain { "NXDOMAIN" } else { "wasted" };
                notes.push(format!("{} {what}", chain.wasted_queries));
            }
            if let Some(server) = chain.answered_by().filter(|_| record.dns_from_outside) {
                notes.push(format!("DNS from {server}, outside the cluster"));
            }
            if !notes.is_empty() {
                line.push_str(&format!(" ({})", notes.join(", ")));
            }
            line.push_str(" ->");
        }
        line.push(' ');
        line.push_str(&record.destination.to_string());
        line.push(' ');
        let outcome = record.outcome.as_str();
        if record.outcome == Outcome::Established {
            line.push_str(outcome);
        } else {
            line.push_str(&paint(RED, outcome));
        }
        if record.egress {
            line.push(' ');
            line.push_str(&paint(YELLOW, "EGRESS"));
        }
        if record.flagged {
            line.push(' ');
            line.push_str(&paint(RED_BOLD, "FLAGGED"));
        }
        if record.drift {
            line.push(' ');
            line.push_str(&paint(MAGENTA, "DRIFT"));
        }
        if let Some(fix) = fix(record, pod_namespace(enriched)) {
            line.push_str(": ");
            line.push_str(&fix);
        }
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(true)
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// One JSON object per correlated connection per line (fields: [`JSON_FIELDS`], which the book's output page is generated from).
#[derive(Debug)]
pub struct JsonWriter<W> {
    out: W,
    clock: WallClock,
}

#[derive(Serialize)]
struct JsonPod<'a> {
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    uid: &'a str,
}

#[derive(Serialize)]
struct JsonAddress {
    address: String,
    port: u16,
}

#[derive(Serialize)]
struct JsonQuery<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    qtype: Cow<'static, str>,
    rcode: Option<Cow<'static, str>>,
}

#[derive(Serialize)]
struct JsonWorkload<'a> {
    kind: &'a str,
    name: &'a str,
}

/// Every field of a `--output json` line, in the order written, with what it means. The
/// book's JSON table is generated from this list and from serialized records (`cargo xtask
/// docs`); a test fails when a field is missing here or listed but not written.
pub const JSON_FIELDS: &[(&str, &str)] = &[
    ("time", "RFC 3339 (UTC, ns) of the connect outcome"),
    (
        "pod",
        "the pod; null for node processes; `namespace` and `name` null when only the UID is known",
    ),
    ("container_id", "runtime container id"),
    ("cgroup_id", "cgroup v2 id of the socket's owner"),
    ("pid", "the process that connected"),
    ("comm", "its command name"),
    ("destination", "the address the application connected to"),
    ("outcome", "`established`, `refused`, `timeout`, `reset`"),
    (
        "query_name",
        "what the application asked for, as it asked (`db`)",
    ),
    (
        "server_address",
        "the name whose answer held the destination",
    ),
    (
        "resolution",
        "`in-cluster`, `search-escape`, `external`, `cname-escape`, `declared-egress` (an ExternalName Service declares the CNAME; needs the Kubernetes API), `none`",
    ),
    (
        "search_chain",
        "every query in the order sent; `rcode` null when unanswered",
    ),
    ("egress", "the destination is outside every cluster network"),
    (
        "flagged",
        "egress reached through a search-domain escape or a CNAME out of the cluster domain",
    ),
    (
        "drift",
        "this workload resolved the same name in-cluster before, and outside now",
    ),
    (
        "workload",
        "the pod's top controller (`Deployment`, `StatefulSet`, ...)",
    ),
    (
        "container_name",
        "the container's name, from the Kubernetes API",
    ),
    ("node", "the node observer runs on"),
    ("source", "the socket's own address, when known"),
    (
        "search_domain",
        "the search domain that completed the name, if one did",
    ),
    (
        "cname_chain",
        "CNAME targets followed from `server_address`",
    ),
    (
        "wasted_queries",
        "names tried without an address before the answer (A/AAAA pairs count once)",
    ),
    (
        "message",
        "why the connection stands out (flagged, drifted, or queries wasted on the search list) and what would end it; the span status says the same for flagged and drifted connections",
    ),
    (
        "dns_server",
        "the DNS server whose answer held the destination",
    ),
    (
        "dns_from_outside",
        "that server is outside the cluster networks (not the node's own or a node-local cache): the pod bypasses cluster DNS",
    ),
];

#[derive(Serialize)]
struct JsonConnection<'a> {
    time: String,
    pod: Option<JsonPod<'a>>,
    container_id: Option<&'a str>,
    cgroup_id: u64,
    pid: u32,
    comm: &'a str,
    destination: JsonAddress,
    outcome: &'static str,
    query_name: Option<&'a str>,
    server_address: Option<&'a str>,
    resolution: &'static str,
    search_chain: Vec<JsonQuery<'a>>,
    egress: bool,
    flagged: bool,
    drift: bool,
    // Additions beyond the fixed fields.
    workload: Option<JsonWorkload<'a>>,
    container_name: Option<&'a str>,
    node: Option<&'a str>,
    source: Option<JsonAddress>,
    search_domain: Option<&'a str>,
    cname_chain: Vec<&'a str>,
    wasted_queries: u32,
    message: Option<String>,
    dns_server: Option<String>,
    dns_from_outside: bool,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(out: W, clock: WallClock) -> Self {
        Self { out, clock }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn write(&mut self, enriched: &Enriched) -> io::Result<()> {
        let record = &enriched.record;
        let id = &enriched.identity;
        let chain = record.chain.as_ref();
        let container = id.container.as_ref();
        let line = JsonConnection {
            time: humantime::format_rfc3339_nanos(self.clock.system_time(record.outcome_at))
                .to_string(),
            pod: id.pod.as_ref().map(|p| JsonPod {
                namespace: p.namespace.as_deref(),
                name: p.name.as_deref(),
                uid: &p.uid,
            }),
            container_id: container.and_then(|c| c.id.as_deref()),
            cgroup_id: record.cgroup_id,
            pid: record.pid,
            comm: &record.comm,
            destination: JsonAddress {
                address: record.destination.ip().to_string(),
                port: record.destination.port(),
            },
            outcome: record.outcome.as_str(),
            query_name: chain.map(|c| &*c.query_name),
            server_address: chain.map(|c| &*c.server_address),
            resolution: record.resolution.as_str(),
            search_chain: chain.map_or_else(Vec::new, |c| {
                c.queries
                    .iter()
                    .map(|q| JsonQuery {
                        name: &q.name,
                        qtype: q.qtype.mnemonic(),
                        rcode: q.rcode.map(Rcode::mnemonic),
                    })
                    .collect()
            }),
            egress: record.egress,
            flagged: record.flagged,
            drift: record.drift,
            workload: id.pod.as_ref().and_then(|p| p.workload.as_ref()).map(
                |Workload { kind, name }| JsonWorkload {
                    kind: kind.as_str(),
                    name,
                },
            ),
            container_name: container.and_then(|c| c.name.as_deref()),
            node: id.node.as_deref(),
            source: record.source.map(|s| JsonAddress {
                address: s.ip().to_string(),
                port: s.port(),
            }),
            search_domain: chain.and_then(|c| c.search_domain.as_deref()),
            cname_chain: chain
                .map_or_else(Vec::new, |c| c.cname_chain.iter().map(|t| &**t).collect()),
            wasted_queries: chain.map_or(0, |c| c.wasted_queries),
            message: flag_message(record, pod_namespace(enriched)),
            dns_server: chain.and_then(|c| c.answered_by()).map(|ip| ip.to_string()),
            dns_from_outside: record.dns_from_outside,
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}
