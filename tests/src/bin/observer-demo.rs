//! `cargo xtask demo`: the motivating incident, end to end, in one command.
//!
//! Builds a small cluster with the testbed (a cluster DNS server, a pod whose resolv.conf is
//! what a kubelet writes, a database host outside the cluster), starts the real agent, lets
//! the pod connect to `db` (which escapes through the search domain another-lab.com), shows
//! what observer saw, then adds the missing Service record and shows the healthy connection
//! beside the first one. Everything is torn down at the end, also on Ctrl-C or SIGTERM.
//!
//! Usage: `observer-demo [--agent <observer binary>] [--spans-file <path>]` (as root).
use std::{
    io::{BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use observer::error::{Chain, PathIoError};
use observer_tests::{
    ConnectOutcome, DnsConfig, DnsServer, Family, PodSpec, QueryOutcome, Testbed, TestbedError,
    agent::{free_local_port, http_get},
    require_root,
};
use serde_json::Value;

const NAMESPACE: &str = "simple-web-app";
const POD_NAME: &str = "web-7d9f8b6c5-x2x7k";
const SEARCH: [&str; 4] = [
    "simple-web-app.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "another-lab.com",
];
const EXTERNAL_DB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DB_PORT: u16 = 5432;
const SERVICE_NAME: &str = "db.simple-web-app.svc.cluster.local";
const ESCAPED_NAME: &str = "db.another-lab.com";
const CLUSTER_CIDRS: [&str; 2] = ["198.18.0.0/15", "2001:db8:c::/64"];

// The waits below are hang guards: each ends as soon as what it waits for happens, so they
// are sized for the slowest place the demo runs (a guest under TCG, about ten times slower).
const AGENT_READY_WITHIN: Duration = Duration::from_secs(180);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent prints a connection once its outcome is known (plus a 100 ms reordering window).
const LINE_WITHIN: Duration = Duration::from_secs(120);
/// Spans are written in batches at least every 2 s; later on a machine busy with other traffic.
const SPANS_WITHIN: Duration = Duration::from_secs(120);
const AGENT_STOP_WITHIN: Duration = Duration::from_secs(60);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error(
        "the demo builds network namespaces and loads eBPF programs: run `cargo xtask demo` as root"
    )]
    NotRoot,
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error(
        "the agent binary {path} is missing: build it with `cargo build -p observer --bin observer` (`cargo xtask demo` does)"
    )]
    AgentMissing { path: PathBuf },
    #[error("starting the agent {path}")]
    AgentStart {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent exited ({status}); its log:\n{log}")]
    AgentExited { status: ExitStatus, log: String },
    #[error("{what} within {after:?}; the agent's log:\n{log}")]
    Timeout {
        what: String,
        after: Duration,
        log: String,
    },
    #[error("{what}: {detail}")]
    Unexpected { what: &'static str, detail: String },
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("usage: observer-demo [--agent <observer binary>] [--spans-file <path>] ({0})")]
    Usage(String),
    #[error("interrupted")]
    Interrupted,
}

type Result<T, E = DemoError> = std::result::Result<T, E>;

fn main() -> ExitCode {
    install_signal_handlers();
    let style = Style::detect();
    let outcome = Options::parse().and_then(|options| demo(&style, &options));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(DemoError::Interrupted) => {
            println!(
                "\n{}",
                style.bold("Interrupted: everything the demo made is removed.")
            );
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\n{} {}", style.red("observer-demo failed:"), Chain(&e));
            ExitCode::FAILURE
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM only set a flag: every wait checks it, so the demo unwinds through its
/// normal teardown (agent stopped, testbed removed) instead of dying with things left behind.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then the fields we use).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(DemoError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps in small steps so that Ctrl-C is honoured at once.
fn pause(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
    }
    check_interrupted()
}

struct Options {
    agent: PathBuf,
    spans_file: PathBuf,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut agent = None;
        let mut spans_file = None;
        let mut args = std::env::args_os().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| DemoError::Usage(format!("{name} takes a path")))
            };
            match arg.to_str() {
                Some("--agent") => agent = Some(value("--agent")?),
                Some("--spans-file") => spans_file = Some(value("--spans-file")?),
                Some("-h" | "--help") => {
                    println!(
                        "observer-demo: the search-domain escape, reproduced and observed (as root)\n\n\
                         usage: observer-demo [--agent <observer binary>] [--spans-file <path>]\n\n\
                         --agent       the agent (default: $OBSERVER_BIN, else `observer` beside this program)\n\
                         --spans-file  where spans go when OTEL_EXPORTER_OTLP_ENDPOINT is not set\n\
                         \x20             (default: observer-demo-spans.jsonl in the temp directory)"
                    );
                    std::process::exit(0);
                }
                _ => return Err(DemoError::Usage(format!("unknown argument {arg:?}"))),
            }
        }
        let agent = match agent.or_else(|| std::env::var_os("OBSERVER_BIN").map(PathBuf::from)) {
            Some(path) => path,
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("observer")))
                .ok_or_else(|| DemoError::Usage("cannot find the agent: pass --agent".into()))?,
        };
        let spans_file =
            spans_file.unwrap_or_else(|| std::env::temp_dir().join("observer-demo-spans.jsonl"));
        Ok(Options { agent, spans_file })
    }
}

/// Colour only on a terminal, and never when NO_COLOR is set to something.
struct Style {
    color: bool,
}

impl Style {
    fn detect() -> Style {
        Style {
            color: std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
    fn red(&self, t: &str) -> String {
        self.paint("1;31", t)
    }
    fn yellow(&self, t: &str) -> String {
        self.paint("33", t)
    }
    fn green(&self, t: &str) -> String {
        self.paint("32", t)
    }
    fn cyan(&self, t: &str) -> String {
        self.paint("36", t)
    }

    /// The agent's own line, with its tags painted as the agent paints them on a terminal.
    fn agent_line(&self, line: &str) -> String {
        line.replace(" EGRESS", &format!(" {}", self.yellow("EGRESS")))
            .replace(" FLAGGED", &format!(" {}", self.red("FLAGGED")))
    }

    fn step(&self, n: u8, title: &str) {
        println!("\n{} {}", self.cyan(&format!("[{n}/4]")), self.bold(title));
    }
}

/// Where the agent's spans go: the person's collector, or a file the demo reads back.
enum SpanDestination {
    Otlp(String),
    File(PathBuf),
}

fn demo(style: &Style, options: &Options) -> Result<()> {
    let started = Instant::now();
    require_root().map_err(|_| DemoError::NotRoot)?;
    // Absolute: a bare relative name would be looked up in PATH when started.
    let agent_path = std::fs::canonicalize(&options.agent)
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| DemoError::AgentMissing {
            path: options.agent.clone(),
        })?;
    println!(
        "{}",
        style.bold(
            "observer demo: a pod asks for `db` and leaves the cluster without anyone noticing"
        )
    );

    style.step(
        1,
        "Building a small cluster (network namespaces, a real DNS server, a kubelet-shaped pod)",
    );
    let tb = Testbed::new()?;
    check_interrupted()?;
    let outside = tb.add_external_host_at("db", EXTERNAL_DB)?;
    let _outside_listener = outside.listen_tcp(DB_PORT)?;
    let in_cluster = tb.add_cluster_host("postgres")?;
    let _in_cluster_listener = in_cluster.listen_tcp(DB_PORT)?;
    let dns = tb.start_dns(
        DnsConfig::dnsmasq()
            .local_zone("another-lab.com")
            .record(ESCAPED_NAME, outside.ipv4()),
    )?;
    check_interrupted()?;
    let pod = tb.add_pod(PodSpec::new(POD_NAME).search(SEARCH).ndots(5))?;
    let uid = pod.cgroup().pod_uid.clone();
    let row = |what: &str, addr: String, note: &str| {
        println!("  {:<19} {:<18} {}", what, addr, style.dim(note));
    };
    row(
        "cluster DNS",
        dns.ipv4().to_string(),
        "dnsmasq: cluster.local, and another-lab.com (the company's zone)",
    );
    row(
        "pod",
        pod.ipv4().to_string(),
        &format!("{NAMESPACE}/{POD_NAME} (uid {uid})"),
    );
    row(
        "postgres",
        format!("{}:{DB_PORT}", in_cluster.ipv4()),
        "the in-cluster database; its Service `db` has no DNS record yet",
    );
    row(
        "db.another-lab.com",
        format!("{}:{DB_PORT}", outside.ipv4()),
        "a database outside the cluster",
    );
    println!("  the pod's /etc/resolv.conf, as the kubelet writes it:");
    let resolv = std::fs::read_to_string(pod.resolv_conf_path())
        .map_err(PathIoError::at("read", pod.resolv_conf_path()))?;
    for line in resolv.lines() {
        println!("    {}", style.dim(line));
    }

    style.step(2, "Starting the observer agent");
    let spans = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => SpanDestination::Otlp(endpoint),
        _ => {
            // The agent appends: each demo run starts with a file of its own spans only.
            std::fs::write(&options.spans_file, "")
                .map_err(PathIoError::at("create", options.spans_file.clone()))?;
            SpanDestination::File(options.spans_file.clone())
        }
    };
    let mut span_reader = SpanReader::default();
    let metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_local_port()));
    let mut args: Vec<String> = vec!["run".into(), "--kube".into(), "off".into()];
    for cidr in CLUSTER_CIDRS {
        args.extend(["--cluster-cidr".into(), cidr.into()]);
    }
    args.extend(["--output".into(), "text".into()]);
    // Every connection becomes a span, so the healthy one can be shown beside the flagged one.
    args.extend(["--export".into(), "all".into()]);
    args.extend(["--metrics-addr".into(), metrics_addr.to_string()]);
    if let SpanDestination::File(path) = &spans {
        args.extend(["--spans-file".into(), path.display().to_string()]);
    }
    println!("  {}", style.dim(&format!("$ observer {}", args.join(" "))));
    let mut agent = AgentProcess::start(&agent_path, &args, metrics_addr)?;
    println!(
        "  ready in {:.1} s: eBPF programs attached to every cgroup on this machine; metrics on http://{metrics_addr}/metrics",
        agent.started.elapsed().as_secs_f64()
    );
    match &spans {
        SpanDestination::Otlp(endpoint) => {
            println!("  spans go to {endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)")
        }
        SpanDestination::File(path) => println!(
            "  spans go to {} {}",
            path.display(),
            style.dim(
                "(set OTEL_EXPORTER_OTLP_ENDPOINT to send them to Jaeger or any OTLP collector)"
            )
        ),
    }

    style.step(3, "The app in the pod connects to `db`, port 5432");
    println!(
        "  {}",
        style
            .dim("glibc's getaddrinfo walks the search list: `db` has fewer than 5 dots (ndots:5)")
    );
    let first = connect(&pod, "db")?;
    println!("  connected to {first}");
    let flagged_line = agent.wait_for_line(&format!("{uid} "), ESCAPED_NAME)?;
    println!("\n  observer printed:");
    println!("    {}", style.agent_line(&flagged_line));
    let flagged_view = evidence(
        &mut span_reader,
        &spans,
        &agent,
        &dns,
        pod.ipv4(),
        &uid,
        first,
    )?;
    println!(
        "\n  the resolution chain observer joined to that connection ({}):",
        flagged_view.source
    );
    print_chain(style, &flagged_view.chain);
    let message = flagged_view.message.clone().unwrap_or_else(|| {
        format!("db resolved through search domain another-lab.com to {EXTERNAL_DB}, outside the cluster")
    });
    println!("\n  {} {}", style.red("What it found:"), message);
    println!(
        "  Your pod asked for `db`, meaning the database of its own namespace. There is no Service `db`\n  \
         in {NAMESPACE}, so glibc tried every search domain: three NXDOMAIN pairs inside the cluster,\n  \
         then another-lab.com, which had a `db`. The connection worked, so nothing failed and nobody\n  \
         noticed: your pod resolved `db` through search domain another-lab.com and connected out of\n  \
         the cluster, to a database that is not the one you meant."
    );

    style.step(
        4,
        "The fix: create the Service `db` in simple-web-app, then connect again",
    );
    dns.add_record(SERVICE_NAME, in_cluster.ipv4())?;
    println!(
        "  cluster DNS now answers {SERVICE_NAME} -> {}",
        in_cluster.ipv4()
    );
    check_interrupted()?;
    let second = connect(&pod, "db")?;
    println!("  connected to {second}");
    let healthy_view = evidence(
        &mut span_reader,
        &spans,
        &agent,
        &dns,
        pod.ipv4(),
        &uid,
        second,
    )?;
    println!(
        "  observer printed nothing new: `--output text` lists only connections that leave the cluster, are\n  \
         flagged, or drifted. Its verdict on this one ({}):",
        healthy_view.source
    );
    print_chain(style, &healthy_view.chain);

    println!("\n{}", style.bold("Before and after"));
    side_by_side(style, &flagged_view, &healthy_view);
    println!();
    println!(
        "  {}  db -> {} -> {} {}",
        style.red("FLAGGED"),
        flagged_view.answered_by,
        flagged_view.destination,
        flagged_view.verdict()
    );
    println!(
        "  {}  db -> {} -> {} {}",
        style.green("healthy"),
        healthy_view.answered_by,
        healthy_view.destination,
        healthy_view.verdict()
    );
    if flagged_view.flagged != Some(true) {
        return Err(DemoError::Unexpected {
            what: "observer did not flag the escaped connection",
            detail: format!("{flagged_view:?}"),
        });
    }
    if healthy_view.egress != Some(false) || healthy_view.flagged != Some(false) {
        return Err(DemoError::Unexpected {
            what: "observer did not report the in-cluster connection as in-cluster and unflagged",
            detail: format!("{healthy_view:?}"),
        });
    }

    println!("\n{}", style.bold("Where to look next"));
    match &spans {
        SpanDestination::Otlp(endpoint) => println!(
            "  traces: sent to {endpoint}. In Jaeger, pick service `observer` and search by tag\n  \
             observer.flagged=true: one trace per connection, one child span per DNS query."
        ),
        SpanDestination::File(path) => {
            let traces = std::fs::read_to_string(path)
                .map(|t| t.matches("\"parentSpanId\":\"\"").count())
                .unwrap_or(0);
            println!(
                "  traces: {traces} in {} (OTLP/JSON, one export request per line), e.g.\n    \
                 jq -c '.resourceSpans[].scopeSpans[].spans[] | select(.parentSpanId == \"\") | .name' {}",
                path.display(),
                path.display()
            );
        }
    }
    if let Ok(body) = agent.metrics() {
        let flagged_series: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("observer_flagged_connections_total{"))
            .collect();
        if !flagged_series.is_empty() {
            println!(
                "  metrics: what an alert rule sees ({}):",
                style.dim("increase(observer_flagged_connections_total[10m]) > 0")
            );
            for l in flagged_series {
                println!("    {}", style.dim(l));
            }
        }
    }
    let others = agent.lines().iter().filter(|l| !l.contains(&uid)).count();
    if others > 0 {
        println!(
            "  {}",
            style.dim(&format!(
                "(observer watches the whole machine: it also printed {others} line(s) for connections of other processes here)"
            ))
        );
    }

    println!("\n{}", style.bold("Cleaning up"));
    let status = agent.stop()?;
    println!("  agent stopped ({status})");
    let namespaces = tb.namespaces().len();
    let cgroups = tb.cgroup_dirs().len();
    if let Err(errors) = tb.close() {
        return Err(DemoError::Unexpected {
            what: "teardown left something behind",
            detail: errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    println!(
        "  removed {namespaces} network namespaces, {cgroups} pod cgroup(s), the DNS server and the hosts"
    );
    println!(
        "\n{} in {:.1} s.",
        style.bold("Done"),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn connect(pod: &observer_tests::Pod, name: &str) -> Result<SocketAddr> {
    check_interrupted()?;
    let report = pod.connect_tcp(name, DB_PORT, Family::Any, CONNECT_TIMEOUT);
    check_interrupted()?;
    match report?.outcome {
        ConnectOutcome::Connected { peer, .. } => Ok(peer),
        other => Err(DemoError::Unexpected {
            what: "the pod's connect to db",
            detail: format!("{other:?}"),
        }),
    }
}

/// One query of a resolution chain, as observer or the DNS server saw it.
#[derive(Clone, Debug)]
struct Query {
    qtype: String,
    name: String,
    rcode: String,
    answers: Vec<String>,
}

/// What is known about one connection.
#[derive(Clone, Debug)]
struct ConnectionView {
    source: &'static str,
    answered_by: String,
    destination: SocketAddr,
    resolution: Option<String>,
    search_domain: Option<String>,
    wasted: Option<i64>,
    egress: Option<bool>,
    flagged: Option<bool>,
    message: Option<String>,
    chain: Vec<Query>,
}

impl ConnectionView {
    fn verdict(&self) -> String {
        match (self.egress, self.flagged) {
            (Some(true), Some(true)) => {
                "outside the cluster, flagged (search-domain escape)".into()
            }
            (Some(true), _) => "outside the cluster".into(),
            (Some(false), _) => "in the cluster, not flagged".into(),
            _ => String::new(),
        }
    }
}

/// Observer's own account of a connection: its trace when spans go to the file. When they go
/// to the person's collector, the chain comes from the DNS server's log and the verdict from
/// the agent's metrics.
fn evidence(
    reader: &mut SpanReader,
    spans: &SpanDestination,
    agent: &AgentProcess,
    dns: &DnsServer,
    pod_ip: Ipv4Addr,
    uid: &str,
    destination: SocketAddr,
) -> Result<ConnectionView> {
    match spans {
        SpanDestination::File(path) => {
            let deadline = Instant::now() + SPANS_WITHIN;
            loop {
                check_interrupted()?;
                if let Some(view) = reader
                    .poll(path, uid)?
                    .iter()
                    .rev()
                    .find_map(|trace| trace.view(uid, destination))
                {
                    return Ok(view);
                }
                if Instant::now() >= deadline {
                    return Err(DemoError::Timeout {
                        what: format!(
                            "no span for the connection to {destination} in {}",
                            path.display()
                        ),
                        after: SPANS_WITHIN,
                        log: agent.log(),
                    });
                }
                pause(Duration::from_millis(100))?;
            }
        }
        SpanDestination::Otlp(_) => {
            let log = dns.queries()?;
            let client = IpAddr::V4(pod_ip);
            // The pod's queries since its last answered A lookup before this connect.
            let ours: Vec<_> = log.iter().filter(|q| q.client.ip() == client).collect();
            let start = ours
                .iter()
                .rposition(|q| q.name == "db.simple-web-app.svc.cluster.local" && q.qtype == "A")
                .unwrap_or(0);
            let chain: Vec<Query> = ours[start..]
                .iter()
                .map(|q| {
                    let (rcode, answers) = match &q.outcome {
                        QueryOutcome::Answer(addrs) => (
                            "NOERROR".to_owned(),
                            addrs.iter().map(ToString::to_string).collect(),
                        ),
                        QueryOutcome::NxDomain => ("NXDOMAIN".to_owned(), Vec::new()),
                        QueryOutcome::NoData => ("NOERROR".to_owned(), Vec::new()),
                        QueryOutcome::Refused => ("REFUSED".to_owned(), Vec::new()),
                        QueryOutcome::Other(words) => (words.clone(), Vec::new()),
                        QueryOutcome::Pending => ("(no response)".to_owned(), Vec::new()),
                    };
                    Query {
                        qtype: q.qtype.clone(),
                        name: q.name.clone(),
                        rcode,
                        answers,
                    }
                })
                .collect();
            let answered_by = chain
                .iter()
                .find(|q| q.answers.iter().any(|a| *a == destination.ip().to_string()))
                .map(|q| q.name.clone())
                .unwrap_or_default();
            let escaped = destination.ip() == IpAddr::V4(EXTERNAL_DB);
            let expected = if escaped {
                "search-escape"
            } else {
                "in-cluster"
            };
            // The agent counts the connection once its outcome is correlated: wait for it.
            let deadline = Instant::now() + LINE_WITHIN;
            let resolution = loop {
                let body = agent.metrics().unwrap_or_default();
                let counted = observer_tests::agent::metric_sum(
                    &body,
                    "observer_connections_total",
                    &[("resolution", expected), ("server_address", &answered_by)],
                ) > 0.0;
                if counted {
                    break Some(expected.to_owned());
                }
                if Instant::now() >= deadline {
                    break None;
                }
                pause(Duration::from_millis(50))?;
            };
            Ok(ConnectionView {
                source: "the cluster DNS server's log; observer's trace went to the collector",
                answered_by,
                destination,
                egress: resolution.as_ref().map(|_| escaped),
                flagged: resolution.as_ref().map(|r| r == "search-escape"),
                resolution,
                search_domain: None,
                wasted: None,
                message: None,
                chain,
            })
        }
    }
}

fn print_chain(style: &Style, chain: &[Query]) {
    for q in chain {
        let rcode = if q.rcode == "NXDOMAIN" {
            style.dim(&q.rcode)
        } else {
            q.rcode.clone()
        };
        let answers = if q.answers.is_empty() && q.rcode == "NOERROR" {
            style.dim("(no address)")
        } else {
            q.answers.join(", ")
        };
        println!(
            "    {:<5} {:<37} {}",
            q.qtype,
            q.name,
            format!("{rcode} {answers}").trim_end()
        );
    }
}

/// One connection's column in the side-by-side table, row by row.
fn column(v: &ConnectionView) -> [String; 8] {
    let text = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".into());
    [
        "db".into(),
        v.answered_by.clone(),
        text(&v.search_domain),
        v.chain.len().to_string(),
        v.wasted.map_or("-".into(), |w| w.to_string()),
        v.destination.to_string(),
        text(&v.resolution),
        format!("{} / {}", yes_no(v.egress), yes_no(v.flagged)),
    ]
}

fn side_by_side(style: &Style, before: &ConnectionView, after: &ConnectionView) {
    let labels = [
        "asked for",
        "answered by",
        "search domain",
        "DNS queries",
        "wasted lookups",
        "connected to",
        "resolution",
        "egress / flagged",
    ];
    let rows = labels.into_iter().zip(column(before)).zip(column(after));
    println!(
        "  {:<17} {:<38} {}",
        "",
        style.bold("before (no Service)"),
        style.bold("after (Service db)")
    );
    for ((what, b), a) in rows {
        println!("  {:<17} {:<38} {}", style.dim(what), b, a);
    }
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// One trace from the spans file: its root span and its DNS children, in order.
struct Trace {
    root: Value,
    children: Vec<Value>,
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn attr_str(span: &Value, key: &str) -> Option<String> {
    attr(span, key)?["stringValue"].as_str().map(str::to_owned)
}

fn attr_int(span: &Value, key: &str) -> Option<i64> {
    let v = &attr(span, key)?["intValue"];
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn attr_bool(span: &Value, key: &str) -> Option<bool> {
    attr(span, key)?["boolValue"].as_bool()
}

fn start_ns(span: &Value) -> u128 {
    span["startTimeUnixNano"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Trace {
    fn view(&self, uid: &str, destination: SocketAddr) -> Option<ConnectionView> {
        let root = &self.root;
        if attr_str(root, "k8s.pod.uid").as_deref() != Some(uid)
            || attr_str(root, "network.peer.address")? != destination.ip().to_string()
            || attr_int(root, "network.peer.port")? != i64::from(destination.port())
        {
            return None;
        }
        let chain = self
            .children
            .iter()
            .map(|s| Query {
                qtype: attr_str(s, "observer.dns.question.type").unwrap_or_default(),
                name: attr_str(s, "dns.question.name").unwrap_or_default(),
                rcode: attr_str(s, "observer.dns.response_code")
                    .unwrap_or_else(|| "(no response)".into()),
                answers: attr(s, "dns.answers")
                    .and_then(|v| v["arrayValue"]["values"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|v| v["stringValue"].as_str().map(str::to_owned))
                    .collect(),
            })
            .collect();
        Some(ConnectionView {
            source: "from its trace",
            answered_by: attr_str(root, "server.address").unwrap_or_else(|| "-".into()),
            destination,
            resolution: attr_str(root, "observer.resolution"),
            search_domain: attr_str(root, "observer.search_domain"),
            wasted: attr_int(root, "observer.dns.wasted_queries"),
            egress: attr_bool(root, "observer.egress"),
            flagged: attr_bool(root, "observer.flagged"),
            message: root["status"]["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(str::to_owned),
            chain,
        })
    }
}

/// Reads the spans file as the agent appends to it. The agent watches the whole machine, so
/// on a busy one the file grows fast: only new, whole lines are read, and only those naming
/// the demo's pod are parsed.
#[derive(Default)]
struct SpanReader {
    offset: u64,
    spans: Vec<Value>,
    traces: Vec<Trace>,
}

impl SpanReader {
    fn poll(&mut self, path: &Path, uid: &str) -> Result<&[Trace]> {
        let io = |op| PathIoError::at(op, path);
        let mut file = std::fs::File::open(path).map_err(io("open"))?;
        file.seek(SeekFrom::Start(self.offset))
            .map_err(io("seek"))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new).map_err(io("read"))?;
        // The last line may be half written: only whole lines are taken.
        let Some(end) = new.iter().rposition(|b| *b == b'\n') else {
            return Ok(&self.traces);
        };
        self.offset += end as u64 + 1;
        let mut found = false;
        for line in new[..end].split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if !line.contains(uid) {
                continue;
            }
            let Ok(request) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            for rs in request["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    self.spans
                        .extend(ss["spans"].as_array().into_iter().flatten().cloned());
                    found = true;
                }
            }
        }
        if found {
            self.traces = traces_of(&self.spans);
        }
        Ok(&self.traces)
    }
}

fn traces_of(spans: &[Value]) -> Vec<Trace> {
    let is_root = |s: &&Value| s["parentSpanId"].as_str().unwrap_or("").is_empty();
    spans
        .iter()
        .filter(is_root)
        .map(|root| {
            let mut children: Vec<Value> = spans
                .iter()
                .filter(|s| s["traceId"] == root["traceId"] && s["parentSpanId"] == root["spanId"])
                .cloned()
                .collect();
            children.sort_by_key(start_ns);
            Trace {
                root: root.clone(),
                children,
            }
        })
        .collect()
}

/// The agent as a child process: stdout lines and the log collected, stopped with SIGTERM.
struct AgentProcess {
    child: Option<Child>,
    metrics_addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl AgentProcess {
    fn start(program: &Path, args: &[String], metrics_addr: SocketAddr) -> Result<AgentProcess> {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches the demo, which stops
            // the agent in order (spans flushed) before removing the testbed.
            .process_group(0)
            .spawn()
            .map_err(|source| DemoError::AgentStart {
                path: program.to_owned(),
                source,
            })?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let out = Arc::clone(&lines);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                out.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let err = Arc::clone(&log);
        let err_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut agent = AgentProcess {
            child: Some(child),
            metrics_addr,
            lines,
            log,
            readers: vec![out_reader, err_reader],
            started,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + AGENT_READY_WITHIN;
        loop {
            check_interrupted()?;
            self.check_running()?;
            if http_get(self.metrics_addr, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: "the agent was not ready (GET /readyz)".into(),
                    after: AGENT_READY_WITHIN,
                    log: self.log(),
                });
            }
            pause(Duration::from_millis(50))?;
        }
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            // Let the reader finish collecting the log the agent wrote before exiting.
            std::thread::sleep(Duration::from_millis(100));
            return Err(DemoError::AgentExited {
                status,
                log: self.log(),
            });
        }
        Ok(())
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn log(&self) -> String {
        strip_ansi(&self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn metrics(&self) -> std::io::Result<String> {
        http_get(self.metrics_addr, "/metrics").map(|(_, body)| body)
    }

    /// Waits for a line of the agent's output containing both `who` and `what`.
    fn wait_for_line(&mut self, who: &str, what: &str) -> Result<String> {
        let deadline = Instant::now() + LINE_WITHIN;
        loop {
            check_interrupted()?;
            if let Some(line) = self
                .lines()
                .into_iter()
                .find(|l| l.contains(who) && l.contains(what))
            {
                return Ok(line);
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: format!("the agent printed no line for {who}-> {what}"),
                    after: LINE_WITHIN,
                    log: self.log(),
                });
            }
            pause(Duration::from_millis(50))?;
        }
    }

    /// SIGTERM, a bounded wait, then SIGKILL.
    fn stop(mut self) -> Result<ExitStatus> {
        let status = self.terminate();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status.ok_or_else(|| DemoError::Timeout {
            what: "the agent did not exit after SIGTERM (killed)".into(),
            after: AGENT_STOP_WITHIN,
            log: String::new(),
        })
    }

    /// The exit status, or None when it had to be killed.
    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + AGENT_STOP_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for AgentProcess {
    /// On an early return (error, Ctrl-C) the agent still stops before the testbed goes.
    fn drop(&mut self) {
        if self.child.is_some() && self.terminate().is_none() {
            eprintln!("observer-demo: the agent did not stop in time and was killed");
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
