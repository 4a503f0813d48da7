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
    /// Global: non-zero skips the server's side of UDP DNS exchanges in the kernel.
    pub const DNS_SKIP_SERVER_SIDE: &str = "DNS_SKIP_SERVER_SIDE";
    /// Per-CPU count of the UDP DNS messages skipped as the server's side.
    pub const DNS_SERVER_SIDE: &str = "DNS_SERVER_SIDE";
    /// Connects from connect(2) to their outcome, [`crate::ConnectSlot`]s the agent maps
    /// read-only to see the opens still waiting.
    pub const CONNECT_TRACK: &str = "CONNECT_TRACK";

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

/// Declares a byte-sized enum that crosses the kernel boundary: the kernel writes
/// `Variant as u8` into an event field, the agent reads it back with `TryFrom<u8>`, which
/// returns the unknown byte as its error instead of trusting it.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal,)+ }) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Lower-case name, for logs, labels and output fields.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl TryFrom<u8> for $name {
            type Error = u8;

            fn try_from(value: u8) -> Result<Self, u8> {
                match value {
                    $($value => Ok($name::$variant),)+
                    unknown => Err(unknown),
                }
            }
        }
    };
}

wire_enum! {
    /// `DnsEvent::family` and `ConnectEvent::family`.
    Family {
        Ipv4 = 4 => "ipv4",
        Ipv6 = 6 => "ipv6",
    }
}

wire_enum! {
    /// `DnsEvent::protocol`: IANA protocol numbers.
    Protocol {
        Tcp = 6 => "tcp",
        Udp = 17 => "udp",
    }
}

wire_enum! {
    /// `DnsEvent::direction`: which way a packet went, seen from the socket that owns it.
    Direction {
        /// Sent by the socket.
        Egress = 0 => "egress",
        /// Delivered to the socket.
        Ingress = 1 => "ingress",
    }
}

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

wire_enum! {
    /// `ConnectEvent::kind`.
    ConnectKind {
        Open = 1 => "open",
        Outcome = 2 => "outcome",
    }
}

wire_enum! {
    /// `ConnectEvent::outcome` (only meaningful for [`ConnectKind::Outcome`]).
    ConnectOutcome {
        None = 0 => "none",
        /// SYN_SENT -> ESTABLISHED.
        Established = 1 => "established",
        /// A RST answered the SYN (port closed).
        Refused = 2 => "refused",
        /// SYN_SENT -> CLOSE without a RST: timed out, unreachable, or abandoned by the caller.
        Timeout = 3 => "timeout",
    }
}

/// `ConnectEvent::flags`: `requested_*` holds the address passed to connect(2).
pub const CONNECT_FLAG_REQUESTED: u8 = 1 << 0;

/// A TCP active open and, once it has one, its outcome.
///
/// A connect answered or given up on crosses the ring once, as an outcome record that
/// carries its open (`timestamp_ns`, the tuple, who connected): one ring record per
/// connect, where a record costs more than anything else the programs do. A connect still
/// waiting is in its [`ConnectSlot`] (kind [`ConnectKind::Open`]), where the agent reads
/// it. A ring record of kind [`ConnectKind::Open`] is an open whose slot was taken over
/// before its outcome: the open is all that will be known of it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    /// `bpf_ktime_get_boot_ns()` when the SYN left: the open's time.
    pub timestamp_ns: u64,
    /// `bpf_ktime_get_boot_ns()` when the outcome was seen (kind Outcome only).
    pub ended_ns: u64,
    /// Opaque socket identity (the socket cookie). Never shown to users.
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

/// Slots of the `CONNECT_TRACK` array (a power of two), far above the connects awaiting
/// their outcome at once on a node.
pub const CONNECT_TRACK_SLOTS: u32 = 16384;

/// `ConnectSlot::phase`: the slot holds nothing (or a connect whose outcome was reported).
pub const SLOT_FREE: u8 = 0;
/// connect(2) was called; the SYN may never leave (a failed route lookup, a bad address).
pub const SLOT_REQUESTED: u8 = 1;
/// The SYN left: the open is complete in `event`, its outcome awaited.
pub const SLOT_OPEN: u8 = 2;

/// One slot of `CONNECT_TRACK`, chosen by socket cookie. The kernel writes `event` and
/// then `phase`; the agent reads `phase` and `event.sock_id`, copies the event, and reads
/// both again, keeping the copy only if neither moved.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectSlot {
    pub event: ConnectEvent,
    pub phase: u8,
    pub _pad: [u8; 7],
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
    // SAFETY: `DnsEvent` is `#[repr(C)]`, `Copy`, made of integers and integer arrays only
    // (padding spelled out as `_pad` fields, so no byte is uninitialised): every bit
    // pattern is a valid value, which is what `Pod` promises aya.
    unsafe impl aya::Pod for super::DnsEvent {}
    // SAFETY: as for `DnsEvent`: `#[repr(C)]`, `Copy`, integers and integer arrays with
    // explicit padding; every bit pattern is valid.
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
        assert_eq!(offset_of!(ConnectEvent, ended_ns), 8);
        assert_eq!(offset_of!(ConnectEvent, sock_id), 16);
        assert_eq!(offset_of!(ConnectEvent, cgroup_id), 24);
        assert_eq!(offset_of!(ConnectEvent, pid_tgid), 32);
        assert_eq!(offset_of!(ConnectEvent, src_addr), 40);
        assert_eq!(offset_of!(ConnectEvent, dst_addr), 56);
        assert_eq!(offset_of!(ConnectEvent, requested_addr), 72);
        assert_eq!(offset_of!(ConnectEvent, comm), 88);
        assert_eq!(offset_of!(ConnectEvent, src_port), 104);
        assert_eq!(offset_of!(ConnectEvent, requested_port), 108);
        assert_eq!(offset_of!(ConnectEvent, family), 110);
        assert_eq!(offset_of!(ConnectEvent, flags), 113);
        assert_eq!(size_of::<ConnectEvent>(), 120);
        // One slot per cache line.
        assert_eq!(size_of::<ConnectSlot>(), 128);
        assert_eq!(offset_of!(ConnectSlot, phase), 120);
        assert_eq!(align_of::<ConnectEvent>(), 8);
    }

    #[test]
    fn wire_enums_round_trip_and_refuse_unknown_bytes() {
        for value in 0..=u8::MAX {
            if let Ok(family) = Family::try_from(value) {
                assert_eq!(family as u8, value);
            }
            if let Ok(protocol) = Protocol::try_from(value) {
                assert_eq!(protocol as u8, value);
            }
            if let Ok(direction) = Direction::try_from(value) {
                assert_eq!(direction as u8, value);
            }
            if let Ok(kind) = ConnectKind::try_from(value) {
                assert_eq!(kind as u8, value);
            }
            if let Ok(outcome) = ConnectOutcome::try_from(value) {
                assert_eq!(outcome as u8, value);
            }
        }
        assert_eq!(Family::try_from(5), Err(5));
        assert_eq!(Protocol::try_from(1), Err(1));
        assert_eq!(Direction::try_from(2), Err(2));
        assert_eq!(ConnectKind::try_from(0), Err(0));
        assert_eq!(ConnectOutcome::try_from(4), Err(4));
        assert_eq!(Protocol::Tcp.as_str(), "tcp");
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
