//! The one place where observer's kernel programs and its agent agree on bytes.
//!
//! Every type here is `#[repr(C)]`, has no padding the compiler could fill with garbage
//! (explicit `_pad` fields instead), and is copied verbatim through a BPF ring buffer or
//! map. The layout tests at the bottom pin sizes and offsets: a change that moves a
//! field must change the tests too, on purpose.
#![no_std]

/// DNS payload bytes captured per message. Covers the usual EDNS buffer (1232 bytes)
/// and most answers over TCP; longer messages are cut and flagged [`DNS_FLAG_TRUNCATED`].
pub const DNS_PAYLOAD_MAX: usize = 2048;

/// Size of the port bitmap map: one byte per possible UDP/TCP port.
pub const DNS_PORT_SLOTS: u32 = 65536;

/// Names of the maps and programs, shared so that the loader never guesses.
pub mod names {
    pub const DNS_EVENTS: &str = "DNS_EVENTS";
    pub const CONNECT_EVENTS: &str = "CONNECT_EVENTS";
    pub const DNS_PORTS: &str = "DNS_PORTS";
    /// Globals: the lowest and highest configured DNS port.
    pub const DNS_PORT_MIN: &str = "DNS_PORT_MIN";
    pub const DNS_PORT_MAX: &str = "DNS_PORT_MAX";
    /// Globals: ring backlog, in bytes, above which the reader is woken early.
    pub const DNS_RING_WAKE_BYTES: &str = "DNS_RING_WAKE_BYTES";
    pub const CONNECT_RING_WAKE_BYTES: &str = "CONNECT_RING_WAKE_BYTES";
    pub const LOSS_COUNTERS: &str = "LOSS_COUNTERS";

    /// Programs, by function name in the kernel crate.
    pub const PROG_PACKET_INGRESS: &str = "packet_ingress";
    pub const PROG_PACKET_EGRESS: &str = "packet_egress";
    pub const PROG_CONNECT4: &str = "connect4";
    pub const PROG_CONNECT6: &str = "connect6";
    pub const PROG_CONNECT_RELEASE: &str = "connect_release";

    /// Empty programs on the same hooks, for the cost benchmark only (`ProbeOptions::baseline`).
    pub const PROG_BASELINE_SKB_INGRESS: &str = "baseline_skb_ingress";
    pub const PROG_BASELINE_SKB_EGRESS: &str = "baseline_skb_egress";
    pub const PROG_BASELINE_CONNECT4: &str = "baseline_connect4";
    pub const PROG_BASELINE_SOCK_RELEASE: &str = "baseline_sock_release";
}

/// `DnsEvent::family` and `ConnectEvent::family`.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// `DnsEvent::protocol`: IANA protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `DnsEvent::direction`, seen from the socket that owns the packet.
pub const DIRECTION_EGRESS: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;

/// `DnsEvent::flags`: the payload was longer than [`DNS_PAYLOAD_MAX`] and was cut.
pub const DNS_FLAG_TRUNCATED: u8 = 1 << 0;

/// A DNS message (UDP) or a DNS-port TCP segment's payload, seen by a socket on the node.
///
/// On the ring a record is only as long as it needs to be: the fields before `payload`
/// ([`DNS_EVENT_HEADER_LEN`] bytes) and then `captured_len` payload bytes. A typical answer
/// takes a tenth of the ring space a full-size record would.
///
/// Ports are in host byte order. IPv4 addresses sit in the first four bytes of the
/// 16-byte address fields; the rest is zero.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME nanoseconds.
    pub timestamp_ns: u64,
    /// cgroup v2 id of the socket's cgroup (the inode of its directory).
    pub cgroup_id: u64,
    /// Socket cookie: stable per socket, lets userspace reassemble TCP streams.
    pub socket_cookie: u64,
    /// TCP sequence number of the first payload byte; zero for UDP.
    pub tcp_seq: u32,
    /// Full L4 payload length on the wire (may exceed `captured_len`).
    pub payload_len: u32,
    /// Bytes of `payload` that are valid.
    pub captured_len: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub flags: u8,
    pub _pad: [u8; 4],
    pub payload: [u8; DNS_PAYLOAD_MAX],
}

/// Bytes of a [`DnsEvent`] before its payload: the fixed part of every DNS ring record.
pub const DNS_EVENT_HEADER_LEN: usize = core::mem::offset_of!(DnsEvent, payload);

/// `ConnectEvent::kind`.
pub const CONNECT_OPEN: u8 = 1;
pub const CONNECT_OUTCOME: u8 = 2;

/// `ConnectEvent::outcome` (only meaningful for [`CONNECT_OUTCOME`]).
pub const OUTCOME_NONE: u8 = 0;
/// SYN_SENT -> ESTABLISHED.
pub const OUTCOME_ESTABLISHED: u8 = 1;
/// A RST answered the SYN (port closed).
pub const OUTCOME_REFUSED: u8 = 2;
/// SYN_SENT -> CLOSE without a RST: timed out, unreachable, or abandoned by the caller.
pub const OUTCOME_TIMEOUT: u8 = 3;

/// `ConnectEvent::flags`: `requested_*` holds the address passed to connect(2).
pub const CONNECT_FLAG_REQUESTED: u8 = 1 << 0;

/// A TCP active open (kind [`CONNECT_OPEN`]) or its outcome (kind [`CONNECT_OUTCOME`]).
///
/// Open and outcome share `sock_id`; the kernel fills the outcome's cgroup, pid and
/// comm from the open so that each event stands on its own.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    /// `bpf_ktime_get_boot_ns()`.
    pub timestamp_ns: u64,
    /// Opaque socket identity joining open and outcome. Never shown to users.
    pub sock_id: u64,
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()` at the open: tgid in the high half.
    pub pid_tgid: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// What the application passed to connect(2), before any socket-level rewrite.
    pub requested_addr: [u8; 16],
    pub comm: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub requested_port: u16,
    pub family: u8,
    pub kind: u8,
    pub outcome: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Indexes into the per-CPU `LOSS_COUNTERS` array: what a program could not deliver.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCounter {
    /// The DNS ring was full; the event was dropped.
    DnsRingFull = 0,
    /// `bpf_skb_load_bytes` or a header read failed on a DNS-port packet.
    DnsReadError = 1,
    /// A DNS payload longer than [`DNS_PAYLOAD_MAX`] was cut (delivered, but incomplete).
    DnsCaptureCut = 2,
    /// The connect ring was full.
    ConnectRingFull = 3,
    /// The slot of a connect awaiting its outcome was taken by another; the outcome will be
    /// missing.
    ConnectTrackFull = 4,
}

impl LossCounter {
    pub const COUNT: u32 = 5;
    pub const ALL: [LossCounter; Self::COUNT as usize] = [
        LossCounter::DnsRingFull,
        LossCounter::DnsReadError,
        LossCounter::DnsCaptureCut,
        LossCounter::ConnectRingFull,
        LossCounter::ConnectTrackFull,
    ];

    /// Stable snake_case name, used in metrics labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            LossCounter::DnsRingFull => "dns_ring_full",
            LossCounter::DnsReadError => "dns_read_error",
            LossCounter::DnsCaptureCut => "dns_capture_cut",
            LossCounter::ConnectRingFull => "connect_ring_full",
            LossCounter::ConnectTrackFull => "connect_track_full",
        }
    }

    /// The kernel program family that counts it.
    pub const fn program(self) -> &'static str {
        match self {
            LossCounter::DnsRingFull | LossCounter::DnsReadError | LossCounter::DnsCaptureCut => {
                "dns"
            }
            _ => "connect",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid.
    unsafe impl aya::Pod for super::DnsEvent {}
    unsafe impl aya::Pod for super::ConnectEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn dns_event_layout() {
        assert_eq!(offset_of!(DnsEvent, timestamp_ns), 0);
        assert_eq!(offset_of!(DnsEvent, cgroup_id), 8);
        assert_eq!(offset_of!(DnsEvent, socket_cookie), 16);
        assert_eq!(offset_of!(DnsEvent, tcp_seq), 24);
        assert_eq!(offset_of!(DnsEvent, payload_len), 28);
        assert_eq!(offset_of!(DnsEvent, captured_len), 32);
        assert_eq!(offset_of!(DnsEvent, src_port), 36);
        assert_eq!(offset_of!(DnsEvent, dst_port), 38);
        assert_eq!(offset_of!(DnsEvent, src_addr), 40);
        assert_eq!(offset_of!(DnsEvent, dst_addr), 56);
        assert_eq!(offset_of!(DnsEvent, family), 72);
        assert_eq!(offset_of!(DnsEvent, flags), 75);
        assert_eq!(offset_of!(DnsEvent, payload), 80);
        assert_eq!(DNS_EVENT_HEADER_LEN, 80);
        assert_eq!(size_of::<DnsEvent>(), 80 + DNS_PAYLOAD_MAX);
        assert_eq!(align_of::<DnsEvent>(), 8);
    }

    #[test]
    fn connect_event_layout() {
        assert_eq!(offset_of!(ConnectEvent, timestamp_ns), 0);
        assert_eq!(offset_of!(ConnectEvent, sock_id), 8);
        assert_eq!(offset_of!(ConnectEvent, cgroup_id), 16);
        assert_eq!(offset_of!(ConnectEvent, pid_tgid), 24);
        assert_eq!(offset_of!(ConnectEvent, src_addr), 32);
        assert_eq!(offset_of!(ConnectEvent, dst_addr), 48);
        assert_eq!(offset_of!(ConnectEvent, requested_addr), 64);
        assert_eq!(offset_of!(ConnectEvent, comm), 80);
        assert_eq!(offset_of!(ConnectEvent, src_port), 96);
        assert_eq!(offset_of!(ConnectEvent, requested_port), 100);
        assert_eq!(offset_of!(ConnectEvent, family), 102);
        assert_eq!(offset_of!(ConnectEvent, flags), 105);
        assert_eq!(size_of::<ConnectEvent>(), 112);
        assert_eq!(align_of::<ConnectEvent>(), 8);
    }

    #[test]
    fn loss_counters_are_dense_and_named_uniquely() {
        for (i, c) in LossCounter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            for other in &LossCounter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
