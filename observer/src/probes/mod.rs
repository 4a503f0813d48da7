//! The kernel side of observer, seen from the agent: load and attach the kernel programs,
//! read their rings, decode records into typed [`Event`]s, report what was lost.
//!
//! ```no_run
//! # async fn run() -> Result<(), observer::probes::ProbeError> {
//! use observer::probes::{ProbeOptions, Probes};
//! let mut probes = Probes::load(&ProbeOptions::default())?;
//! let mut events = probes.events()?;
//! while let Some(batch) = events.recv().await {
//!     for event in batch {
//!         println!("{event:?}");
//!     }
//! }
//! # Ok(()) }
//! ```
//! Dropping [`Probes`] detaches every program and stops the readers.
mod clock;
mod decode;
mod display;
mod features;
mod system;
mod waiting;

use std::{
    fs::File,
    io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program,
        ProgramError,
    },
};
use observer_common::{LossCounter, names};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};

pub use clock::{BootClock, boot_now_ns};
pub use decode::{
    Connect, ConnectOutcome, ConnectRecord, ConnectResult, DecodeError, Direction, DnsPacket,
    Event, Protocol, Ring, decode_connect, decode_dns,
};
pub use display::{describe, format_utc};
pub use features::{KernelFeature, KernelFeatures, min_kernel_for};
use waiting::{TrackSlots, WaitingOpens};

/// The kernel programs, built by build.rs for bpfel-unknown-none.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// Verbosity of the kernel programs' own diagnostics (aya-log), forwarded to `log`/`tracing`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelLogLevel {
    /// Log statements compiled in but disabled at load time; no log reader runs.
    Off,
    Error,
    #[default]
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` global (aya_log_common::Level, 0 = off).
    const fn aya_level(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Error => 1,
            KernelLogLevel::Warn => 2,
            KernelLogLevel::Info => 3,
            KernelLogLevel::Debug => 4,
            KernelLogLevel::Trace => 5,
        }
    }
}

/// How to load the probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Ports whose UDP datagrams and TCP segments (either direction, either end) are DNS.
    pub dns_ports: Vec<u16>,
    /// Size of the DNS ring in bytes: a power of two, multiple of the page size. A DNS
    /// record takes 88 bytes plus the captured message, rounded up to 8.
    pub dns_ring_bytes: u32,
    /// Size of the connect ring in bytes (same rules); records are 120 bytes.
    pub connect_ring_bytes: u32,
    /// Decoded events buffered between the ring readers and the consumer, rounded up to
    /// whole batches of [`EVENT_BATCH`]. When full, the readers wait, the rings fill, and
    /// the kernel counts what it drops.
    pub channel_capacity: usize,
    /// Longest a lone event waits in its ring before the reader picks it up (the kernel
    /// wakes the reader early once a backlog may have built).
    pub poll_interval: Duration,
    pub kernel_log: KernelLogLevel,
    /// cgroup2 directory to attach the programs to; `None`: the cgroup2 root found in
    /// /proc/self/mountinfo (sees every socket on the node).
    pub cgroup: Option<PathBuf>,
    /// Also attach empty programs on the same hooks (`baseline_*`), whose run time is the
    /// floor of any program there: the cost benchmark reports observer's work above it.
    /// The agent never sets it.
    pub baseline: bool,
    /// Deliver the server's side of UDP DNS exchanges too (queries received, responses
    /// sent). Off, the kernel counts them ([`Probes::dns_server_side_skipped`]) instead: the
    /// agent reads only the client's side, and a node's DNS server would otherwise double
    /// what crosses the ring. `observer events` turns it on to show every packet.
    pub dns_server_side: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            dns_ports: vec![53],
            dns_ring_bytes: 4 << 20,
            connect_ring_bytes: 2 << 20,
            channel_capacity: 4096,
            poll_interval: Duration::from_millis(20),
            kernel_log: KernelLogLevel::default(),
            cgroup: None,
            baseline: false,
            dns_server_side: false,
        }
    }
}

/// Why the probes could not be loaded, attached or read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "missing capabilities {}: run as root, or grant them (e.g. setcap or a privileged pod)",
        missing.join(", ")
    )]
    MissingCapabilities { missing: Vec<&'static str> },
    #[error(
        "permission denied while {op}: run as root or grant CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"
    )]
    PermissionDenied {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    ReadSystemFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "this kernel lacks {}: observer needs Linux {} or newer",
        missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        min_kernel_for(missing)
    )]
    MissingKernelFeatures { missing: Vec<KernelFeature> },
    #[error("probing the kernel for {}", feature.name())]
    FeatureProbe {
        feature: KernelFeature,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{ring} ring size {bytes} is not a power of two multiple of the page size")]
    InvalidRingSize { ring: &'static str, bytes: u32 },
    #[error("loading the kernel object")]
    LoadObject(#[source] EbpfError),
    #[error("the kernel object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    // The kernel's answer is part of the verdict, not a cause to walk: `reason`, not `source`.
    #[error("the verifier rejected {program}: {reason}\nverifier log:\n{log}")]
    Verifier {
        program: &'static str,
        reason: io::Error,
        log: String,
    },
    #[error("{op} {program}")]
    Program {
        op: &'static str,
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{op} map {map}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mapping map {map} into memory")]
    MapMemory {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("registering the {ring} ring with the tokio reactor (is a runtime running?)")]
    Register {
        ring: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the event stream was already taken")]
    EventsTaken,
}

/// Kernel-side losses, summed over CPUs, by [`LossCounter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounts([u64; LossCounter::COUNT as usize]);

impl LossCounts {
    pub fn get(&self, counter: LossCounter) -> u64 {
        self.0[counter as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = (LossCounter, u64)> + '_ {
        LossCounter::ALL.iter().map(|&c| (c, self.get(c)))
    }

    /// Everything that was dropped (a capture cut is delivered, so it is not counted).
    pub fn dropped(&self) -> u64 {
        self.iter()
            .filter(|(c, _)| *c != LossCounter::DnsCaptureCut)
            .map(|(_, n)| n)
            .sum()
    }
}

/// In-kernel run statistics of one program (only while `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

const PACKET_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (names::PROG_PACKET_INGRESS, CgroupSkbAttachType::Ingress),
    (names::PROG_PACKET_EGRESS, CgroupSkbAttachType::Egress),
];

/// Empty programs on the same hooks (`ProbeOptions::baseline`).
const BASELINE_PROGRAMS: [&str; 4] = [
    names::PROG_BASELINE_SKB_INGRESS,
    names::PROG_BASELINE_SKB_EGRESS,
    names::PROG_BASELINE_CONNECT4,
    names::PROG_BASELINE_SOCK_RELEASE,
];

/// connect(2) hooks for each family, then the socket-release hook (the packet programs
/// see the handshake itself).
const CONNECT_PROGRAMS: [&str; 3] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_CONNECT_RELEASE,
];

/// Loaded and attached kernel programs. Dropping it detaches them and stops the readers.
pub struct Probes {
    // Readers first: they are aborted before the programs and maps go away.
    readers: Vec<JoinHandle<()>>,
    ebpf: Ebpf,
    /// The `baseline_*` programs are attached too.
    baseline: bool,
    cgroup: PathBuf,
    channel_capacity: usize,
    poll_interval: Duration,
    kernel_log: KernelLogLevel,
    decode_errors: Arc<AtomicU64>,
    progress: RingProgress,
}

/// How far each ring reader has got: every event stamped before a ring's mark has already
/// been sent on the events channel. A consumer that reads [`RingProgress::horizon`] and then
/// empties the channel holds every event older than the horizon, from both rings, and can
/// put them in time order.
#[derive(Clone, Debug, Default)]
pub struct RingProgress {
    marks: Arc<[AtomicU64; Ring::COUNT]>,
}

impl RingProgress {
    /// Allowance for an event stamped just before a drain began but committed to its ring
    /// just after (a program runs for microseconds, without preemption).
    const COMMIT_SLACK_NS: u64 = 5_000_000;

    fn advance(&self, ring: Ring, drained_from: crate::record::BootNs) {
        self.marks[ring.index()].fetch_max(drained_from, Ordering::Release);
    }

    /// The kernel time before which both rings have been fully delivered (0 until both
    /// readers have drained once).
    pub fn horizon(&self) -> crate::record::BootNs {
        let dns = self.marks[Ring::Dns.index()].load(Ordering::Acquire);
        let connect = self.marks[Ring::Connect.index()].load(Ordering::Acquire);
        dns.min(connect).saturating_sub(Self::COMMIT_SLACK_NS)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
        // `ebpf` drops next: each program's links are detached, then programs and maps
        // are closed.
    }
}

fn valid_ring_size(bytes: u32) -> bool {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u32::try_from(page).unwrap_or(4096);
    bytes.is_power_of_two() && bytes >= page && bytes.is_multiple_of(page)
}

fn is_permission(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EPERM)
}

fn load_error(program: &'static str, source: ProgramError) -> ProbeError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if is_permission(&io_error) {
                ProbeError::PermissionDenied {
                    op: "loading a program",
                    source: io_error,
                }
            } else {
                ProbeError::Verifier {
                    program,
                    reason: io_error,
                    log: verifier_log.to_string(),
                }
            }
        }
        source => ProbeError::Program {
            op: "loading",
            program,
            source,
        },
    }
}

fn attach_error(program: &'static str, source: ProgramError) -> ProbeError {
    if let ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }) = &source
        && is_permission(io_error)
    {
        let ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }) = source else {
            unreachable!("matched just above")
        };
        return ProbeError::PermissionDenied {
            op: "attaching a program",
            source: io_error,
        };
    }
    ProbeError::Program {
        op: "attaching",
        program,
        source,
    }
}

impl Probes {
    /// Loads the kernel programs and attaches them: DNS on the cgroup2 root (or
    /// `options.cgroup`), connects on the same cgroup. No runtime needed; see [`Probes::events`].
    pub fn load(options: &ProbeOptions) -> Result<Self, ProbeError> {
        for (ring, bytes) in [
            (names::DNS_EVENTS, options.dns_ring_bytes),
            (names::CONNECT_EVENTS, options.connect_ring_bytes),
        ] {
            if !valid_ring_size(bytes) {
                return Err(ProbeError::InvalidRingSize { ring, bytes });
            }
        }
        let mounts = system::read_mounts()?;
        system::check_capabilities()?;
        KernelFeatures::probe()?.require_all()?;
        let cgroup = match &options.cgroup {
            Some(path) => path.clone(),
            None => crate::mountinfo::cgroup2_root(&mounts).ok_or(ProbeError::NoCgroup2Mount)?,
        };

        let log_level = options.kernel_log.aya_level();
        // No port at all: an empty range, nothing is DNS.
        let port_min: u16 = options.dns_ports.iter().copied().min().unwrap_or(1);
        let port_max: u16 = options.dns_ports.iter().copied().max().unwrap_or(0);
        // The kernel programs wake the reader early once the CPUs together may have filled
        // an eighth of a ring: each CPU wakes it after its share.
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, source)| ProbeError::ReadSystemFile {
                path: path.into(),
                source,
            })?
            .max(1) as u64;
        let dns_wake = (u64::from(options.dns_ring_bytes) / 8 / cpus).max(1);
        let connect_wake = (u64::from(options.connect_ring_bytes) / 8 / cpus).max(1);
        let skip_server_side = u8::from(!options.dns_server_side);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::DNS_EVENTS, options.dns_ring_bytes)
            .map_max_entries(names::CONNECT_EVENTS, options.connect_ring_bytes)
            .override_global(aya_log::LEVEL, &log_level, false)
            .override_global(names::DNS_PORT_MIN, &port_min, true)
            .override_global(names::DNS_PORT_MAX, &port_max, true)
            .override_global(names::DNS_RING_WAKE_BYTES, &dns_wake, true)
            .override_global(names::CONNECT_RING_WAKE_BYTES, &connect_wake, true)
            .override_global(names::DNS_SKIP_SERVER_SIDE, &skip_server_side, true)
            .load(KERNEL_OBJECT)
            .map_err(|e| match e {
                EbpfError::MapError(MapError::CreateError { io_error, .. })
                    if is_permission(&io_error) =>
                {
                    ProbeError::PermissionDenied {
                        op: "creating maps",
                        source: io_error,
                    }
                }
                e => ProbeError::LoadObject(e),
            })?;

        configure_dns_ports(&mut ebpf, &options.dns_ports)?;

        let cgroup_dir = File::open(&cgroup).map_err(|source| ProbeError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        for (name, attach_type) in PACKET_PROGRAMS {
            let program: &mut CgroupSkb = typed(&mut ebpf, name)?;
            program.load().map_err(|e| load_error(name, e))?;
            // Single: a bpf_link per program. Several agents (or tests) can still attach
            // their own links to the same cgroup at once.
            program
                .attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, e))?;
        }
        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let program: &mut CgroupSockAddr = typed(&mut ebpf, name)?;
            program.load().map_err(|e| load_error(name, e))?;
            program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, e))?;
        }
        let name = names::PROG_CONNECT_RELEASE;
        let program: &mut CgroupSock = typed(&mut ebpf, name)?;
        program.load().map_err(|e| load_error(name, e))?;
        program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, e))?;
        if options.baseline {
            attach_baseline(&mut ebpf, &cgroup_dir)?;
        }

        Ok(Self {
            readers: Vec::new(),
            ebpf,
            baseline: options.baseline,
            cgroup,
            channel_capacity: options.channel_capacity.max(1),
            poll_interval: options.poll_interval.max(Duration::from_millis(1)),
            kernel_log: options.kernel_log,
            decode_errors: Arc::new(AtomicU64::new(0)),
            progress: RingProgress::default(),
        })
    }

    /// How far the ring readers have delivered (see [`RingProgress`]).
    pub fn progress(&self) -> RingProgress {
        self.progress.clone()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    /// Starts the ring readers and returns the decoded events in batches of up to
    /// [`EVENT_BATCH`], oldest first per ring. Must be called within a tokio runtime, once.
    /// The stream ends when [`Probes`] drops.
    pub fn events(&mut self) -> Result<mpsc::Receiver<Vec<Event>>, ProbeError> {
        let dns = self.take_ring(Ring::Dns)?;
        let connect = self.take_ring(Ring::Connect)?;
        let slots = self.track_slots()?;
        let (tx, rx) = mpsc::channel(self.channel_capacity.div_ceil(EVENT_BATCH));
        self.readers.push(tokio::spawn(read_ring(
            dns,
            RingDecoder::Dns,
            self.poll_interval,
            tx.clone(),
            self.decode_errors.clone(),
            self.progress.clone(),
        )));
        self.readers.push(tokio::spawn(read_ring(
            connect,
            RingDecoder::Connect {
                slots,
                waiting: WaitingOpens::default(),
                scanned_at: None,
            },
            self.poll_interval,
            tx,
            self.decode_errors.clone(),
            self.progress.clone(),
        )));
        if self.kernel_log != KernelLogLevel::Off {
            self.start_kernel_log();
        }
        Ok(rx)
    }

    /// The connect tracking slots, mapped for the connect ring's reader.
    fn track_slots(&self) -> Result<TrackSlots, ProbeError> {
        let name = names::CONNECT_TRACK;
        let missing = ProbeError::Missing { kind: "map", name };
        let Some(aya::maps::Map::Array(data)) = self.ebpf.map(name) else {
            return Err(missing);
        };
        TrackSlots::map(data).map_err(|source| ProbeError::MapMemory { map: name, source })
    }

    fn take_ring(&mut self, ring: Ring) -> Result<AsyncFd<RingBuf<MapData>>, ProbeError> {
        let name = ring.name();
        let map = self.ebpf.take_map(name).ok_or(ProbeError::EventsTaken)?;
        let ring_buf = RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            op: "opening",
            map: name,
            source,
        })?;
        // SAFETY: the ring owns its map fd and keeps it open, unchanged, for as long as the
        // AsyncFd (which owns the ring) lives.
        unsafe { AsyncFd::register_with_interest(ring_buf, Interest::READABLE) }.map_err(|e| {
            let (_, source) = e.into_parts();
            ProbeError::Register { ring: name, source }
        })
    }

    fn start_kernel_log(&mut self) {
        // The object has no log map when no program logs: nothing to read then.
        let Ok(logger) = aya_log::EbpfLogger::init(&mut self.ebpf) else {
            return;
        };
        // SAFETY: the logger owns its ring's fd for its whole life.
        let Ok(mut logger) =
            (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
        else {
            return;
        };
        self.readers.push(tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }));
    }

    /// Kernel-side losses so far, summed over CPUs.
    pub fn loss_counters(&self) -> Result<LossCounts, ProbeError> {
        let mut totals = LossCounts::default();
        for counter in LossCounter::ALL {
            totals.0[counter as usize] =
                self.per_cpu_total(names::LOSS_COUNTERS, counter as u32)?;
        }
        Ok(totals)
    }

    /// UDP DNS messages the kernel skipped as the server's side of an exchange (see
    /// [`ProbeOptions::dns_server_side`]), all CPUs.
    pub fn dns_server_side_skipped(&self) -> Result<u64, ProbeError> {
        self.per_cpu_total(names::DNS_SERVER_SIDE, 0)
    }

    /// Slot `index` of the per-CPU counter map `name`, summed over the CPUs.
    fn per_cpu_total(&self, name: &'static str, index: u32) -> Result<u64, ProbeError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(ProbeError::Missing { kind: "map", name })?;
        let counters = PerCpuArray::<_, u64>::try_from(map).map_err(|source| ProbeError::Map {
            op: "opening",
            map: name,
            source,
        })?;
        let per_cpu = counters.get(&index, 0).map_err(|source| ProbeError::Map {
            op: "reading",
            map: name,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Ring records the agent could not decode (a kernel/agent mismatch; should stay 0).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }

    /// Run time and count of every program; the kernel fills them only while
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, ProbeError> {
        let baseline: &[&'static str] = if self.baseline {
            &BASELINE_PROGRAMS
        } else {
            &[]
        };
        PACKET_PROGRAMS
            .iter()
            .map(|(name, _)| *name)
            .chain(CONNECT_PROGRAMS)
            .chain(baseline.iter().copied())
            .map(|name| {
                let program = self.ebpf.program(name).ok_or(ProbeError::Missing {
                    kind: "program",
                    name,
                })?;
                let info = program.info().map_err(|source| ProbeError::Program {
                    op: "querying",
                    program: name,
                    source,
                })?;
                Ok(ProgramStats {
                    program: name,
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
}

/// Loads and attaches the empty `baseline_*` programs beside observer's own.
fn attach_baseline(ebpf: &mut Ebpf, cgroup_dir: &File) -> Result<(), ProbeError> {
    for (name, attach_type) in [
        (
            names::PROG_BASELINE_SKB_INGRESS,
            CgroupSkbAttachType::Ingress,
        ),
        (names::PROG_BASELINE_SKB_EGRESS, CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = typed(ebpf, name)?;
        program.load().map_err(|e| load_error(name, e))?;
        program
            .attach(cgroup_dir, attach_type, CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, e))?;
    }
    let name = names::PROG_BASELINE_CONNECT4;
    let program: &mut CgroupSockAddr = typed(ebpf, name)?;
    program.load().map_err(|e| load_error(name, e))?;
    program
        .attach(cgroup_dir, CgroupAttachMode::Single)
        .map_err(|e| attach_error(name, e))?;
    let name = names::PROG_BASELINE_SOCK_RELEASE;
    let program: &mut CgroupSock = typed(ebpf, name)?;
    program.load().map_err(|e| load_error(name, e))?;
    program
        .attach(cgroup_dir, CgroupAttachMode::Single)
        .map_err(|e| attach_error(name, e))?;
    Ok(())
}

/// The program `name` of the object, as its expected type.
fn typed<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program {
            op: "typing",
            program: name,
            source,
        })
}

fn configure_dns_ports(ebpf: &mut Ebpf, ports: &[u16]) -> Result<(), ProbeError> {
    let name = names::DNS_PORTS;
    let map = ebpf
        .map_mut(name)
        .ok_or(ProbeError::Missing { kind: "map", name })?;
    let mut slots = Array::<_, u8>::try_from(map).map_err(|source| ProbeError::Map {
        op: "opening",
        map: name,
        source,
    })?;
    for &port in ports {
        slots
            .set(u32::from(port), 1, 0)
            .map_err(|source| ProbeError::Map {
                op: "writing",
                map: name,
                source,
            })?;
    }
    Ok(())
}

/// Turns one ring's records into events.
enum RingDecoder {
    Dns,
    /// The connect ring, with the slots where connects wait for their outcome.
    Connect {
        slots: TrackSlots,
        waiting: WaitingOpens,
        /// When the slots were last read.
        scanned_at: Option<crate::record::BootNs>,
    },
}

/// How often the connect tracking slots are read. Reading them is a pass over 2 MiB, too
/// dear for every poll of an idle agent; a hanging connect is seen within this, and the
/// connect ring's progress mark waits for it, so events leave the reorder stage up to this
/// much later than with the ring alone.
const SLOT_SCAN_INTERVAL_NS: u64 = 100_000_000;

impl RingDecoder {
    fn ring(&self) -> Ring {
        match self {
            RingDecoder::Dns => Ring::Dns,
            RingDecoder::Connect { .. } => Ring::Connect,
        }
    }

    /// Before a drain that began at `now`: the opens waiting in their slots, when it is
    /// time to read them. Returns the time before which this drain will have delivered
    /// every event of its ring. For the connect ring that is the last reading of the slots:
    /// an open stamped before it was waiting then (and was delivered), or had ended, and its
    /// record is in the ring, drained after the slots were read.
    fn before_drain(
        &mut self,
        now: crate::record::BootNs,
        batch: &mut Vec<Event>,
    ) -> crate::record::BootNs {
        let RingDecoder::Connect {
            slots,
            waiting,
            scanned_at,
        } = self
        else {
            return now;
        };
        let due = scanned_at.is_none_or(|at| now.saturating_sub(at) >= SLOT_SCAN_INTERVAL_NS);
        if due {
            *scanned_at = Some(now);
            let mut opens = Vec::new();
            slots.for_each_open(|raw| {
                // A slot the kernel was rewriting as it was read: the next scan finds it.
                if let Ok(ConnectRecord::Open(open)) = decode::decode_connect_event(raw) {
                    opens.push(open);
                }
            });
            waiting.scanned(opens, batch);
        }
        scanned_at.unwrap_or(now)
    }

    fn decode(&mut self, bytes: &[u8], batch: &mut Vec<Event>) -> Result<(), DecodeError> {
        match self {
            RingDecoder::Dns => batch.push(Event::Dns(decode_dns(bytes)?)),
            RingDecoder::Connect { waiting, .. } => waiting.record(decode_connect(bytes)?, batch),
        }
        Ok(())
    }
}

/// Most events the ring readers hand the consumer at once: a channel send is an atomic
/// handoff and a wakeup of the consumer's task, which sent per event were a tenth of the
/// agent's CPU under a DNS flood.
pub const EVENT_BATCH: usize = 256;

/// Drains the ring on every wakeup and every `poll` interval: the kernel programs wake the
/// reader only once a backlog builds (waking per event costs more than the event), so the
/// interval bounds the latency of a lone event. Decoding happens before any await so ring
/// items never outlive a drain. Backpressure from a full channel leaves records in the
/// ring, where the kernel counts what no longer fits.
async fn read_ring(
    mut fd: AsyncFd<RingBuf<MapData>>,
    mut decoder: RingDecoder,
    poll: Duration,
    tx: mpsc::Sender<Vec<Event>>,
    decode_errors: Arc<AtomicU64>,
    progress: RingProgress,
) {
    let ring = decoder.ring();
    let mut batch = Vec::new();
    loop {
        let woken = tokio::time::timeout(poll, fd.readable_mut()).await;
        // Read before draining: whatever was stamped earlier is in the ring by now, or
        // waiting in its slot.
        let complete_before = boot_now_ns()
            .ok()
            .map(|now| decoder.before_drain(now, &mut batch));
        match woken {
            Ok(Ok(mut guard)) => {
                drain(
                    guard.get_inner_mut(),
                    &mut decoder,
                    &mut batch,
                    &decode_errors,
                );
                guard.clear_ready();
            }
            Ok(Err(error)) => {
                tracing::error!(ring = ring.name(), %error, "ring reader stopped");
                return;
            }
            Err(_elapsed) => drain(fd.get_mut(), &mut decoder, &mut batch, &decode_errors),
        }
        let mut drained = batch.drain(..);
        loop {
            let events: Vec<Event> = drained.by_ref().take(EVENT_BATCH).collect();
            if events.is_empty() {
                break;
            }
            if tx.send(events).await.is_err() {
                return;
            }
        }
        // Only once this drain's events are on the channel.
        if let Some(at) = complete_before {
            progress.advance(ring, at);
        }
    }
}

fn drain(
    ring_buf: &mut RingBuf<MapData>,
    decoder: &mut RingDecoder,
    batch: &mut Vec<Event>,
    decode_errors: &AtomicU64,
) {
    while let Some(item) = ring_buf.next() {
        if let Err(error) = decoder.decode(&item, batch)
            && decode_errors.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(ring = decoder.ring().name(), %error, "undecodable ring record");
        }
    }
}
