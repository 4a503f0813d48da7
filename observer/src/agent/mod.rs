//! `observer run`: the agent that wires probes, identity, correlation and export.
//!
//! One task owns the correlation core and every per-event decision, so the core stays a
//! plain single-threaded value; the exporters and the HTTP server run beside it. Identity's
//! filesystem reads run on a thread of their own (`identities`): that task never waits on
//! them.
pub mod config;
pub mod enrich;
pub mod identities;
pub mod memory;
pub mod parking;
pub mod reorder;
pub mod responses;
pub mod scopes;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    correlate::{self, Correlator, CorrelatorConfig, ResolverConfig},
    dns::{
        self,
        tcp::{StreamKey, TcpLimits, TcpReassembler, TcpSegment},
    },
    export::{
        Enriched, EnrichmentState, ExportConfig, ExportIdentity, JsonWriter, Metrics, PodIdentity,
        Readiness, Redactor, SpanExporter, SpanSink, TextWriter, UnjoinedReason, UnmatchedReason,
        WallClock, color_on, serve_http,
    },
    fast_hash::{FastMap, FastSet},
    identity::{EnrichmentStatus, Identity, IdentityConfig, WorkloadIdentity},
    probes::{BootClock, DnsPacket, Event, ProbeOptions, Probes, Protocol, Ring},
    record::{BootNs, ConnectionRecord},
    scope::ScopeKey,
};
use config::{OutputFormat, Settings};
use enrich::NodeFacts;
use identities::{Identities, Update};
use parking::{Parking, ParkingLimits};
use reorder::Reorder;
use responses::ResponseTally;
use scopes::ScopeCgroups;

/// How often counters are published, unanswered queries collected, caches refreshed.
const TICK: Duration = Duration::from_secs(1);
/// How long the exporter may take to flush on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the cgroup cache and the cluster networks are refreshed.
const REFRESH: Duration = Duration::from_secs(30);
/// How often events whose kernel time both ring readers have passed are released, in
/// order, to the core: about the rings' poll interval.
const RELEASE: Duration = Duration::from_millis(20);
/// Events held for reordering at most; past it the oldest go through unordered.
const REORDER_CAPACITY: usize = 65_536;
/// How long, and how many, events of a new cgroup wait for its identity: generous, as a
/// late but right record is worth more than a prompt one without its pod or search list.
const IDENTITY_WAIT: ParkingLimits = ParkingLimits {
    max_wait_ns: 60_000_000_000,
    per_cgroup: 4096,
    total: 65_536,
};

/// Run the agent until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut probes = tokio::task::block_in_place(|| {
        Probes::load(&ProbeOptions {
            dns_ports: settings.dns_ports.clone(),
            dns_ring_bytes: settings
                .ring_size_kib
                .map_or(ProbeOptions::default().dns_ring_bytes, |k| {
                    k.next_power_of_two().max(4) * 1024
                }),
            ..ProbeOptions::default()
        })
    })
    .context("loading the kernel programs")?;
    let events = probes.events().context("reading the kernel rings")?;

    let identity = Identity::start(IdentityConfig {
        kube_mode: settings.kube,
        node_name: settings.node_name.clone(),
        cluster_networks_given: !settings.cluster_cidrs.is_empty(),
        ..IdentityConfig::default()
    })
    .await
    .context("starting pod identity")?;
    let (identities, identity_updates) =
        Identities::start(identity).context("starting the identity worker")?;

    let boot = BootClock::new().context("reading the system clocks")?;
    let wall = WallClock::new(boot.offset_ns());
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::new();
    let (metrics_addr, _server) =
        serve_http(settings.metrics_addr, metrics.clone(), readiness.clone())
            .await
            .with_context(|| format!("serving metrics on {}", settings.metrics_addr))?;
    tracing::info!(%metrics_addr, "serving /metrics, /healthz and /readyz");

    let export_config = export_config(&settings)?;
    let exporter = match SpanSink::from_config(&export_config).context("configuring span export")? {
        Some(sink) => {
            tracing::info!(sink = %sink_name(&sink), "exporting spans");
            Some(SpanExporter::start(
                &export_config,
                sink,
                wall,
                metrics.clone(),
            )?)
        }
        None => {
            tracing::info!(
                "no OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) and no --spans-file: spans are not exported"
            );
            None
        }
    };

    let redactor = Redactor::new(settings.redact_names, &settings.cluster_domain)?;
    let mut agent = Agent {
        redactor,
        core: Correlator::new(CorrelatorConfig {
            cluster_domain: settings.cluster_domain.clone(),
            cluster_networks: cluster_networks(&settings, identities.shared()),
            ..CorrelatorConfig::default()
        }),
        tcp: TcpReassembler::new(TcpLimits::default()),
        identities,
        parking: Parking::new(IDENTITY_WAIT),
        node: NodeFacts {
            cluster: settings.cluster_name.clone(),
            node: settings.node_name.clone(),
            cluster_domain: settings.cluster_domain.clone(),
        },
        configured: FastSet::default(),
        scope_cgroups: ScopeCgroups::default(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        exporter,
        output: Output::new(settings.output, wall),
        settings,
        messages: Vec::new(),
        reorder: Reorder::new(REORDER_CAPACITY),
        horizon: 0,
        ready: Vec::new(),
        responses: ResponseTally::default(),
    };
    // Loading parsed the kernel's BTF and the programs' ELF: megabytes freed since.
    memory::release_freed();
    readiness.set_probes_attached(true);
    readiness.set_export_running(true);
    tracing::info!(cgroup = %probes.cgroup().display(), "observing");

    let result = agent.event_loop(events, identity_updates, &probes).await;

    // Detach first: nothing new arrives while the last spans are flushed.
    readiness.set_probes_attached(false);
    let losses = probes.loss_counters().ok();
    drop(probes);
    tracing::info!("kernel programs detached");
    if let Some(exporter) = agent.exporter.take() {
        exporter.shutdown(SHUTDOWN_GRACE).await;
    }
    agent.output.flush();
    if let Some(losses) = losses {
        for (counter, n) in losses.iter().filter(|(_, n)| *n > 0) {
            tracing::warn!(
                counter = counter.name(),
                lost = n,
                "kernel events not delivered"
            );
        }
    }
    result
}

fn export_config(settings: &Settings) -> anyhow::Result<ExportConfig> {
    let mut config =
        ExportConfig::from_env().context("reading the OTEL_EXPORTER_OTLP_* variables")?;
    config.selection = settings.export;
    config.sample_ratio = settings.sample_ratio;
    if settings.spans_file.is_some() {
        config.json_path = settings.spans_file.clone();
    }
    Ok(config)
}

fn sink_name(sink: &SpanSink) -> String {
    match sink {
        SpanSink::Grpc(url) => format!("OTLP gRPC {url}"),
        SpanSink::Http(url) => format!("OTLP HTTP {url}"),
        SpanSink::JsonLines(_) => "JSON lines file".into(),
    }
}

/// Configured networks merged with those Kubernetes reports; the core's defaults (the
/// private ranges) when neither says anything.
fn cluster_networks(settings: &Settings, identity: &Identity) -> Vec<ipnet::IpNet> {
    let mut nets = settings.cluster_cidrs.clone();
    nets.extend(identity.cluster_networks());
    nets.sort();
    nets.dedup();
    if nets.is_empty() {
        CorrelatorConfig::default().cluster_networks
    } else {
        nets
    }
}

/// Standard output, written in blocks: one write per release of events (every 20 ms at
/// most) rather than one per connection.
type Stdout = std::io::BufWriter<std::io::Stdout>;

const STDOUT_BUFFER: usize = 64 * 1024;

/// Where correlated connections are printed.
enum Output {
    Text(TextWriter<Stdout>),
    Json(JsonWriter<Stdout>),
    None,
}

impl Output {
    fn new(format: OutputFormat, wall: WallClock) -> Output {
        let stdout = || std::io::BufWriter::with_capacity(STDOUT_BUFFER, std::io::stdout());
        match format {
            OutputFormat::Text => {
                Output::Text(TextWriter::new(stdout(), wall, color_on(std::io::stdout())))
            }
            OutputFormat::Json => Output::Json(JsonWriter::new(stdout(), wall)),
            OutputFormat::None => Output::None,
        }
    }

    fn write(&mut self, record: &Enriched) {
        let written = match self {
            Output::Text(w) => w.write(record).map(|_| ()),
            Output::Json(w) => w.write(record),
            Output::None => Ok(()),
        };
        if let Err(e) = written {
            // A closed stdout (a pipe whose reader left) must not stop observation.
            tracing::debug!(error = %e, "writing a connection to standard output");
        }
    }

    fn flush(&mut self) {
        let flushed = match self {
            Output::Text(w) => w.flush(),
            Output::Json(w) => w.flush(),
            Output::None => Ok(()),
        };
        if let Err(e) = flushed {
            tracing::debug!(error = %e, "flushing standard output");
        }
    }
}

struct Agent {
    /// Applied to every record before it is counted, exported or printed.
    redactor: Redactor,
    core: Correlator,
    tcp: TcpReassembler,
    /// The loop's snapshot of identities, filled by the identity worker.
    identities: Identities,
    /// Events of cgroups whose identity the worker has not answered yet.
    parking: Parking<Event>,
    node: NodeFacts,
    /// Scopes whose resolver config and drift key were handed to the core.
    configured: FastSet<ScopeKey>,
    /// cgroups seen per scope: a scope whose cgroups are all gone (the pod was deleted, the
    /// node process exited) is forgotten by the core and identity.
    scope_cgroups: ScopeCgroups,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    exporter: Option<SpanExporter>,
    output: Output,
    settings: Settings,
    /// Reused buffer for messages reassembled from TCP.
    messages: Vec<Vec<u8>>,
    reorder: Reorder<Event, { Ring::COUNT }>,
    /// Reused buffer for events leaving the reorder stage.
    ready: Vec<Event>,
    /// Kernel time up to which every event has been handed to the core: the core's clock.
    horizon: BootNs,
    /// Pod-side DNS responses not yet added to the metrics (at each tick).
    responses: ResponseTally,
}

impl Agent {
    async fn event_loop(
        &mut self,
        mut events: mpsc::Receiver<Vec<Event>>,
        mut identity_updates: mpsc::Receiver<Update>,
        probes: &Probes,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut release = tokio::time::interval(RELEASE);
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let progress = probes.progress();
        let mut last_refresh = Instant::now();
        // Both listeners live as long as the loop: one created anew on each turn would miss
        // a signal that arrived while the loop was busy handling events.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the SIGINT handler")?;
        loop {
            // The readers send events in batches (`probes::EVENT_BATCH`): one turn of the
            // loop per batch, so that the timers and signals still get their turn under a
            // flood without being polled for every event.
            tokio::select! {
                batch = events.recv() => {
                    let Some(batch) = batch else {
                        anyhow::bail!("the kernel ring readers stopped");
                    };
                    for event in batch {
                        self.hold(event);
                    }
                }
                update = identity_updates.recv() => match update {
                    Some(update) => self.identity_update(update),
                    None => anyhow::bail!("the identity worker stopped"),
                },
                _ = release.tick() => {
                    // The horizon first, then the channel: every event older than the horizon
                    // was sent before it was published, so it is in hand after the drain.
                    let horizon = progress.horizon();
                    while let Ok(batch) = events.try_recv() {
                        for event in batch {
                            self.hold(event);
                        }
                    }
                    self.release(horizon);
                    self.output.flush();
                }
                _ = tick.tick() => {
                    // The core's clock is the horizon, not the wall clock: an agent running
                    // behind must not call a query unanswered whose answer it has not read yet.
                    if self.horizon > 0 {
                        self.tick(self.horizon, probes);
                    }
                    if last_refresh.elapsed() >= REFRESH {
                        last_refresh = Instant::now();
                        self.refresh();
                    }
                }
                _ = interrupt.recv() => {
                    tracing::info!("interrupted: detaching");
                    break;
                }
                _ = terminate.recv() => {
                    tracing::info!("terminated: detaching");
                    break;
                }
            }
        }
        self.drain();
        Ok(())
    }

    /// Keeps an event until both rings have been read past its time. Its cgroup's identity
    /// is asked for now: events wait in the reorder stage, and a short-lived process (one
    /// lookup, one connect) may have exited by the time they leave it. The worker reads the
    /// cgroup's members from the first DNS packet on, while the lookup is still in flight.
    fn hold(&mut self, event: Event) {
        let pid = match &event {
            Event::Dns(_) => None,
            Event::ConnectOpen(open) => Some(open.pid),
            Event::ConnectOutcome(outcome) => Some(outcome.connect.pid),
        };
        self.identities.ask(event.cgroup_id(), pid);
        let mut ready = std::mem::take(&mut self.ready);
        self.reorder
            .push(event.ring().index(), event.timestamp(), event, &mut ready);
        self.handle_all(&mut ready);
        self.ready = ready;
    }

    fn release(&mut self, horizon: BootNs) {
        let mut ready = std::mem::take(&mut self.ready);
        self.reorder.release(horizon, &mut ready);
        self.handle_all(&mut ready);
        self.ready = ready;
        self.horizon = self.horizon.max(horizon);
        for (cgroup_id, events) in self.parking.expire(self.horizon) {
            self.handle_without_identity(cgroup_id, events, "waited too long");
        }
    }

    /// Whatever is still waiting for order or identity is handled before the agent stops.
    fn drain(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        self.reorder.drain(&mut ready);
        self.handle_all(&mut ready);
        for (cgroup_id, events) in self.parking.drain() {
            self.handle_without_identity(cgroup_id, events, "the agent stops");
        }
        self.publish_dns_responses();
    }

    fn handle_all(&mut self, ready: &mut Vec<Event>) {
        for event in ready.drain(..) {
            self.dispatch(event);
        }
    }

    /// Hands an event in order to the core, or parks it while its cgroup's identity is
    /// awaited (behind any earlier event of the cgroup still waiting).
    fn dispatch(&mut self, event: Event) {
        let cgroup_id = event.cgroup_id();
        if !self.parking.is_waiting(cgroup_id) && self.identities.get(cgroup_id).is_some() {
            self.handle(event);
            return;
        }
        if let Some(given_up) = self.parking.park(cgroup_id, event.timestamp(), event) {
            self.handle_without_identity(cgroup_id, given_up, "too many events waiting");
        }
    }

    /// A cgroup's parked events, in order, handed on with whatever identity is known of it
    /// (an unknown node cgroup if none): the wait for its identity is given up.
    fn handle_without_identity(&mut self, cgroup_id: u64, events: Vec<Event>, why: &str) {
        tracing::debug!(
            cgroup_id,
            events = events.len(),
            why,
            "identity still unknown: events handled without it"
        );
        self.identities.give_up(cgroup_id);
        events.into_iter().for_each(|event| self.handle(event));
    }

    fn identity_update(&mut self, update: Update) {
        match update {
            Update::Resolved(who) => {
                let cgroup_id = who.cgroup_id;
                self.identities.landed(who);
                for event in self.parking.resolved(cgroup_id) {
                    self.handle(event);
                }
            }
            Update::Gone(gone) => {
                let gone: HashSet<u64> = gone.into_iter().collect();
                self.identities.remove(&gone);
                for scope in self.scope_cgroups.departed(|id| !gone.contains(&id)) {
                    tracing::debug!(%scope, "every cgroup of the scope is gone: forgetting it");
                    self.configured.remove(&scope);
                    self.core.remove_scope(&scope);
                    self.identities.forget(&scope);
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Dns(packet) => self.dns(packet),
            Event::ConnectOpen(open) => {
                let who = self.who(open.cgroup_id);
                self.core.connect_open(correlate::ConnectOpen {
                    scope: who.scope.clone(),
                    sock_id: open.sock_id,
                    at: open.timestamp,
                    cgroup_id: open.cgroup_id,
                    pid: open.pid,
                    comm: open.comm,
                    // What the application asked for is what a DNS answer named.
                    destination: open.requested.unwrap_or(open.destination),
                    source: (open.source.port() != 0).then_some(open.source),
                });
            }
            Event::ConnectOutcome(outcome) => {
                let record = self.core.connect_outcome(correlate::ConnectOutcome {
                    sock_id: outcome.connect.sock_id,
                    at: outcome.connect.timestamp,
                    outcome: outcome.result.into(),
                    source: (outcome.connect.source.port() != 0).then_some(outcome.connect.source),
                });
                if let Some(record) = record {
                    self.emit(record);
                }
            }
        }
    }

    /// Identity of a cgroup from the snapshot, handing the core the pod's resolv.conf and
    /// drift key the first time the scope is seen with them.
    fn who(&mut self, cgroup_id: u64) -> Arc<WorkloadIdentity> {
        let who = self.identities.or_unknown(cgroup_id);
        if who.cgroup_path.is_some() {
            self.scope_cgroups.note(&who.scope, cgroup_id);
        }
        if !self.configured.contains(&who.scope)
            && let Some(resolver) = &who.resolver
        {
            let config = ResolverConfig {
                search: resolver.search.clone(),
                ndots: resolver.ndots,
            };
            let drift = enrich::drift_key(&who);
            let accepted = self.core.set_resolver_config(&who.scope, &config).is_ok()
                && drift.is_none_or(|key| self.core.set_drift_key(&who.scope, &key).is_ok());
            if accepted {
                self.configured.insert(who.scope.clone());
            }
        }
        who
    }

    fn dns(&mut self, packet: DnsPacket) {
        let direction = packet.direction;
        // A node's DNS server (CoreDNS, a node-local cache) sees every exchange reversed. The
        // kernel programs skip its UDP side before the ring; should one get here (programs
        // loaded to deliver it), the header alone tells it, so it costs neither a parse nor
        // an identity.
        if packet.protocol == Protocol::Udp && is_server_side(direction, &packet.payload) {
            self.core.count_server_side();
            return;
        }
        let who = self.who(packet.cgroup_id);
        match packet.protocol {
            Protocol::Udp => {
                if packet.truncated {
                    // A cut UDP message would parse as malformed: count it for what it is.
                    self.metrics.observe_dns_parse_error("capture_cut");
                    return;
                }
                let payload = packet.payload.clone();
                self.dns_message(&who, &packet, direction, &payload);
            }
            Protocol::Tcp => {
                let Some(seq) = packet.tcp_seq else { return };
                let mut messages = std::mem::take(&mut self.messages);
                self.tcp.push(
                    TcpSegment {
                        key: StreamKey {
                            socket_cookie: packet.socket_cookie,
                            direction,
                        },
                        at: packet.timestamp,
                        seq,
                        wire_len: packet.payload_len,
                        payload: &packet.payload,
                    },
                    &mut messages,
                );
                for message in messages.drain(..) {
                    self.dns_message(&who, &packet, direction, &message);
                }
                self.messages = messages;
            }
        }
    }

    fn dns_message(
        &mut self,
        who: &Arc<WorkloadIdentity>,
        packet: &DnsPacket,
        direction: correlate::Direction,
        bytes: &[u8],
    ) {
        if is_server_side(direction, bytes) {
            self.core.count_server_side();
            return;
        }
        let message = match dns::parse(bytes) {
            Ok(message) => message,
            Err(e) => {
                self.core.count_parse_error(e.kind);
                self.metrics.observe_dns_parse_error(e.kind.as_str());
                return;
            }
        };
        if message.is_response && direction == correlate::Direction::Ingress {
            // Only a pod is expected to ask the cluster's DNS; a node process may not.
            let outside = matches!(who.scope, ScopeKey::Pod(_))
                && self
                    .core
                    .cluster_networks()
                    .dns_server_outside(packet.source.ip());
            if let Some(earlier) = self.responses.count(who, message.rcode, outside) {
                self.publish_responses(&earlier);
            }
        }
        self.core.observe_dns(correlate::DnsObservation {
            scope: who.scope.clone(),
            at: packet.timestamp,
            direction,
            src: packet.source,
            dst: packet.destination,
            message,
        });
    }

    fn emit(&mut self, mut record: ConnectionRecord) {
        // Before redaction: the Service's names are compared in clear.
        let identity = self.identities.shared();
        enrich::declare_egress(&mut record, &self.node.cluster_domain, |namespace, name| {
            identity.external_name(namespace, name)
        });
        self.redactor.record(&mut record);
        let who = self.identities.or_unknown(record.cgroup_id);
        let enriched = Enriched {
            identity: enrich::export_identity(&who, &self.node),
            record,
        };
        self.metrics.observe_connection(&enriched);
        if let Some(exporter) = &self.exporter {
            exporter.submit(&enriched);
        }
        self.output.write(&enriched);
    }

    fn tick(&mut self, now: BootNs, probes: &Probes) {
        self.publish_dns_responses();
        for unanswered in self.core.tick(now) {
            let identity = self.scope_identity(&unanswered.scope);
            self.metrics.observe_unanswered_query(&identity, "");
            let name = self.redactor.name(&unanswered.name, None);
            tracing::debug!(%name, qtype = %unanswered.qtype, scope = %unanswered.scope, "DNS query never answered");
        }
        self.tcp.evict_idle(now);
        match probes.loss_counters() {
            Ok(losses) => {
                for (counter, total) in losses.iter() {
                    self.metrics
                        .set_kernel_events_lost(counter.program(), counter.name(), total);
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "reading the kernel loss counters")
            }
        }
        // UDP ones are skipped in the kernel; a TCP stream's are told apart here.
        match probes.dns_server_side_skipped() {
            Ok(skipped) => self.metrics.set_dns_server_side_messages(
                skipped + self.core.counters().dns_server_side_ignored,
            ),
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "reading the kernel's server-side DNS count")
            }
        }
        publish_core_counters(&self.metrics, self.core.counters());
        // Events the reorder stage had to let through out of order because it was full.
        self.metrics
            .set_core_evictions("reorder_forced", self.reorder.forced);
        // DNS-over-TCP messages lost in reassembly would otherwise be lost silently.
        let tcp = self.tcp.counters();
        for (kind, total) in [
            ("tcp_gaps", tcp.gaps),
            ("tcp_cut_segments", tcp.cut_segments),
            ("tcp_unsynced_segments", tcp.unsynced_segments),
            ("tcp_bad_lengths", tcp.bad_lengths),
            ("tcp_streams_evicted_cap", tcp.streams_evicted_cap),
            ("tcp_streams_evicted_idle", tcp.streams_evicted_idle),
        ] {
            self.metrics.set_core_evictions(kind, total);
        }
        for (kind, total) in [
            ("identity_wait_expired", self.parking.expired),
            ("identity_wait_full", self.parking.overflowed),
            (
                "identity_requests_dropped",
                self.identities.requests_dropped,
            ),
        ] {
            self.metrics.set_core_evictions(kind, total);
        }
        let status = self.identities.shared().status();
        self.readiness.set_enrichment(&match &status {
            EnrichmentStatus::Disabled => "cgroup-only (no Kubernetes API)".to_owned(),
            EnrichmentStatus::Syncing => "syncing with the Kubernetes API".to_owned(),
            EnrichmentStatus::Ready => "kube".to_owned(),
            EnrichmentStatus::Degraded { since, last_error } => format!(
                "degraded since {}: {last_error}",
                humantime::format_rfc3339_seconds(*since)
            ),
        });
        self.metrics.set_enrichment_state(match status {
            EnrichmentStatus::Disabled => EnrichmentState::CgroupOnly,
            EnrichmentStatus::Ready => EnrichmentState::Kube,
            EnrichmentStatus::Syncing | EnrichmentStatus::Degraded { .. } => {
                EnrichmentState::Degraded
            }
        });
    }

    /// Adds the DNS responses tallied since the last tick to the metrics: a scrape sees
    /// counts at most one tick old.
    fn publish_dns_responses(&mut self) {
        let mut responses = std::mem::take(&mut self.responses);
        for pending in responses.drain() {
            self.publish_responses(&pending);
        }
        self.responses = responses;
    }

    fn publish_responses(&self, pending: &responses::Pending) {
        let identity = enrich::export_identity(&pending.who, &self.node);
        self.metrics
            .observe_dns_responses(&identity, "", &pending.rcode.mnemonic(), pending.count);
        if pending.outside {
            self.metrics
                .observe_external_dns_responses(&identity, pending.count);
        }
    }

    /// Export identity of a whole scope (no single container): for per-scope metrics.
    /// Identity of a scope for what has no event of its own (an unanswered query): a pod
    /// is resolved through a cgroup it was seen in, so its namespace and workload label the
    /// series as they label its connections; only a pod never seen in a cgroup is known by
    /// UID alone.
    fn scope_identity(&self, scope: &ScopeKey) -> ExportIdentity {
        let cgroup = match scope {
            ScopeKey::Host(cgroup) => *cgroup,
            ScopeKey::Pod(uid) => match self.scope_cgroups.any_cgroup(scope) {
                Some(cgroup) => cgroup,
                None => {
                    return ExportIdentity {
                        cluster: self.node.cluster.clone(),
                        node: self.node.node.clone(),
                        pod: Some(PodIdentity {
                            uid: uid.to_string(),
                            ..PodIdentity::default()
                        }),
                        container: None,
                    };
                }
            },
        };
        enrich::export_identity(&self.identities.or_unknown(cgroup), &self.node)
    }

    fn refresh(&mut self) {
        memory::release_freed();
        // The walk runs on the worker; the cgroups it finds gone come back as an update.
        self.identities.refresh();
        let networks = cluster_networks(&self.settings, self.identities.shared());
        if networks != self.core.config().cluster_networks {
            tracing::info!(?networks, "cluster networks changed");
            self.core.set_cluster_networks(networks);
        }
    }
}

fn publish_core_counters(metrics: &Metrics, c: &correlate::CoreCounters) {
    for (kind, total) in [
        ("queries_evicted_cap", c.queries_evicted_cap),
        ("queries_dropped_cap", c.queries_dropped_cap),
        ("chains_evicted_cap", c.chains_evicted_cap),
        ("answers_evicted_scope_cap", c.answers_evicted_scope_cap),
        ("answers_evicted_total_cap", c.answers_evicted_total_cap),
        ("answers_dropped_cap", c.answers_dropped_cap),
        ("connects_evicted_cap", c.connects_evicted_cap),
        ("connects_dropped_cap", c.connects_dropped_cap),
        ("connects_expired", c.connects_expired),
        ("scopes_refused", c.scopes_refused),
        ("drift_entries_dropped", c.drift_entries_dropped),
        ("responses_answers_capped", c.responses_answers_capped),
    ] {
        metrics.set_core_evictions(kind, total);
    }
    for (reason, total) in [
        (UnmatchedReason::NoQuery, c.responses_unmatched),
        (UnmatchedReason::OtherQuestion, c.responses_mismatched),
        (UnmatchedReason::ChainEvicted, c.responses_orphaned),
    ] {
        metrics.set_unmatched_responses(reason, total);
    }
    for (reason, total) in [
        (UnjoinedReason::AnswerExpired, c.connects_answer_expired),
        (UnjoinedReason::AnswerEvicted, c.connects_answer_evicted),
        (UnjoinedReason::OutcomeWithoutOpen, c.outcomes_unmatched),
    ] {
        metrics.set_unjoined_connects(reason, total);
    }
}

/// A query received or a response sent: the server's socket, not a client's lookup.
fn is_server_side(direction: correlate::Direction, message: &[u8]) -> bool {
    match dns::is_response(message) {
        Some(response) => response != (direction == correlate::Direction::Ingress),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use correlate::Direction::{Egress, Ingress};

    #[test]
    fn the_servers_side_is_told_from_the_header_alone() {
        let query = dns::build::query(7, "db.another-lab.com.", 1);
        let response = dns::build::response(7, "db.another-lab.com.", 1, 3, &[], None);
        // A client sends queries and receives responses.
        assert!(!is_server_side(Egress, &query));
        assert!(!is_server_side(Ingress, &response));
        // A server receives queries and sends responses.
        assert!(is_server_side(Ingress, &query));
        assert!(is_server_side(Egress, &response));
        // Too short for a header: left to the parser, which counts it.
        assert!(!is_server_side(Ingress, &query[..11]));
        assert!(!is_server_side(Egress, &[]));
    }
}
