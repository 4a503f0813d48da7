//! Ring records -> typed events. Takes bytes, returns a value or a [`DecodeError`]; never
//! panics on what the kernel (or a corrupted buffer) hands it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use compact_str::CompactString;
use observer_common::{
    CONNECT_FLAG_REQUESTED, ConnectEvent, ConnectKind, DNS_EVENT_HEADER_LEN, DNS_FLAG_TRUNCATED,
    DNS_PAYLOAD_MAX, DnsEvent, Family,
};
pub use observer_common::{Direction, Protocol};

use crate::record::{BootNs, Outcome};

/// One DNS-port UDP datagram or TCP segment with payload, as a socket on the node saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPacket {
    pub timestamp: BootNs,
    /// cgroup v2 id of the socket's cgroup.
    pub cgroup_id: u64,
    /// Stable per socket: groups the segments of one TCP stream, or a UDP socket's queries.
    pub socket_cookie: u64,
    pub direction: Direction,
    pub protocol: Protocol,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Sequence number of the first payload byte (TCP only).
    pub tcp_seq: Option<u32>,
    /// Full L4 payload length on the wire; `payload` may be shorter when `truncated`.
    pub payload_len: u32,
    pub payload: Bytes,
    /// The payload was longer than the capture limit and was cut.
    pub truncated: bool,
}

/// A TCP active open, or the identity part of its outcome.
///
/// Addresses of IPv6 sockets talking to IPv4 peers (`::ffff:a.b.c.d`) are given as IPv4,
/// so they compare equal to DNS A answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub timestamp: BootNs,
    /// Joins an open to its outcome; meaningless outside that (a kernel address, reused).
    pub sock_id: u64,
    /// cgroup v2 id of the process that called connect(2).
    pub cgroup_id: u64,
    /// Process id (the thread group id).
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    pub comm: CompactString,
    /// At the open the kernel may not have picked the source port yet: port 0 then.
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The address passed to connect(2), before any socket-level rewrite; `None` when the
    /// open did not come through connect(2) (io_uring, TCP fast open) or was not readable.
    pub requested: Option<SocketAddr>,
}

/// How a TCP active open ended, as the kernel programs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectResult {
    Established,
    /// A RST answered the SYN.
    Refused,
    /// Closed before establishment without a RST: timed out, unreachable, or abandoned.
    Timeout,
}

impl ConnectResult {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnectResult::Established => Outcome::Established.as_str(),
            ConnectResult::Refused => Outcome::Refused.as_str(),
            ConnectResult::Timeout => Outcome::Timeout.as_str(),
        }
    }
}

impl From<ConnectResult> for Outcome {
    fn from(result: ConnectResult) -> Self {
        match result {
            ConnectResult::Established => Outcome::Established,
            ConnectResult::Refused => Outcome::Refused,
            ConnectResult::Timeout => Outcome::Timeout,
        }
    }
}

/// The outcome of the open with the same `connect.sock_id`; identity fields are the open's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOutcome {
    pub connect: Connect,
    pub result: ConnectResult,
}

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Dns(DnsPacket),
    ConnectOpen(Connect),
    ConnectOutcome(ConnectOutcome),
}

impl Event {
    pub fn cgroup_id(&self) -> u64 {
        match self {
            Event::Dns(p) => p.cgroup_id,
            Event::ConnectOpen(c) => c.cgroup_id,
            Event::ConnectOutcome(o) => o.connect.cgroup_id,
        }
    }

    /// The ring the event came from (opens read from their slots count as the connect
    /// ring's).
    pub fn ring(&self) -> Ring {
        match self {
            Event::Dns(_) => Ring::Dns,
            Event::ConnectOpen(_) | Event::ConnectOutcome(_) => Ring::Connect,
        }
    }

    pub fn timestamp(&self) -> BootNs {
        match self {
            Event::Dns(p) => p.timestamp,
            Event::ConnectOpen(c) => c.timestamp,
            Event::ConnectOutcome(o) => o.connect.timestamp,
        }
    }
}

/// Why a ring record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{record} record is {actual} bytes, expected {expected}")]
    WrongSize {
        record: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{record} record has unknown address family {family}")]
    UnknownFamily { record: &'static str, family: u8 },
    #[error("DNS record has unknown protocol {0}")]
    UnknownProtocol(u8),
    #[error("DNS record has unknown direction {0}")]
    UnknownDirection(u8),
    #[error(
        "DNS record claims {captured} captured bytes of a {payload} byte payload (limit {limit})"
    )]
    BadCaptureLength {
        captured: u32,
        payload: u32,
        limit: usize,
    },
    #[error("connect record has unknown kind {0}")]
    UnknownKind(u8),
    #[error("connect outcome record has unknown outcome {0}")]
    UnknownOutcome(u8),
}

const DNS_RECORD: &str = "DNS";
const CONNECT_RECORD: &str = "connect";

/// Copies a `#[repr(C)]` record out of ring bytes of exactly its size.
fn read_record<T: aya::Pod>(record: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::WrongSize {
            record,
            expected,
            actual: bytes.len(),
        });
    }
    // SAFETY: the length was checked, `read_unaligned` has no alignment requirement, and
    // `T: Pod` (plain `#[repr(C)]` integers and byte arrays) is valid for any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn ip(record: &'static str, family: u8, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match Family::try_from(family) {
        Ok(Family::Ipv4) => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        Ok(Family::Ipv6) => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
        Err(family) => Err(DecodeError::UnknownFamily { record, family }),
    }
}

/// Decodes one `DNS_EVENTS` ring record: a [`DnsEvent`] cut right after its captured
/// payload bytes.
pub fn decode_dns(bytes: &[u8]) -> Result<DnsPacket, DecodeError> {
    let Some(header) = bytes.get(..DNS_EVENT_HEADER_LEN) else {
        return Err(DecodeError::WrongSize {
            record: DNS_RECORD,
            expected: DNS_EVENT_HEADER_LEN,
            actual: bytes.len(),
        });
    };
    // SAFETY: `DnsEvent: Pod` is valid as all zeroes; only its header bytes are written
    // below, its payload field is never read.
    let mut raw: DnsEvent = unsafe { std::mem::zeroed() };
    // SAFETY: `header` is DNS_EVENT_HEADER_LEN bytes, the offset of `payload` within `raw`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            header.as_ptr(),
            (&mut raw as *mut DnsEvent).cast::<u8>(),
            DNS_EVENT_HEADER_LEN,
        );
    }
    let protocol = Protocol::try_from(raw.protocol).map_err(DecodeError::UnknownProtocol)?;
    let direction = Direction::try_from(raw.direction).map_err(DecodeError::UnknownDirection)?;
    let captured = raw.captured_len as usize;
    if captured > DNS_PAYLOAD_MAX || raw.captured_len > raw.payload_len {
        return Err(DecodeError::BadCaptureLength {
            captured: raw.captured_len,
            payload: raw.payload_len,
            limit: DNS_PAYLOAD_MAX,
        });
    }
    if bytes.len() != DNS_EVENT_HEADER_LEN + captured {
        return Err(DecodeError::WrongSize {
            record: DNS_RECORD,
            expected: DNS_EVENT_HEADER_LEN + captured,
            actual: bytes.len(),
        });
    }
    Ok(DnsPacket {
        timestamp: raw.timestamp_ns,
        cgroup_id: raw.cgroup_id,
        socket_cookie: raw.socket_cookie,
        direction,
        protocol,
        source: SocketAddr::new(ip(DNS_RECORD, raw.family, &raw.src_addr)?, raw.src_port),
        destination: SocketAddr::new(ip(DNS_RECORD, raw.family, &raw.dst_addr)?, raw.dst_port),
        tcp_seq: (protocol == Protocol::Tcp).then_some(raw.tcp_seq),
        payload_len: raw.payload_len,
        payload: Bytes::copy_from_slice(&bytes[DNS_EVENT_HEADER_LEN..]),
        truncated: raw.flags & DNS_FLAG_TRUNCATED != 0,
    })
}

fn comm(raw: &[u8; 16]) -> CompactString {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    CompactString::from_utf8_lossy(&raw[..end])
}

fn connect_addr(family: u8, raw: &[u8; 16], port: u16) -> Result<SocketAddr, DecodeError> {
    Ok(SocketAddr::new(
        ip(CONNECT_RECORD, family, raw)?.to_canonical(),
        port,
    ))
}

/// What one connect ring record, or one open slot of `CONNECT_TRACK`, says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectRecord {
    /// An open without its outcome: still waiting (read from its slot), or given up on by
    /// its slot (a ring record; no outcome follows).
    Open(Connect),
    /// A connect that ended: its open, stamped when the SYN left, and its outcome, stamped
    /// when it was seen.
    Ended {
        open: Connect,
        outcome: ConnectOutcome,
    },
}

/// Decodes one `CONNECT_EVENTS` ring record.
pub fn decode_connect(bytes: &[u8]) -> Result<ConnectRecord, DecodeError> {
    decode_connect_event(&read_record(CONNECT_RECORD, bytes)?)
}

/// Decodes a connect record already copied out of the kernel's memory.
pub fn decode_connect_event(raw: &ConnectEvent) -> Result<ConnectRecord, DecodeError> {
    let requested = if raw.flags & CONNECT_FLAG_REQUESTED != 0 {
        Some(connect_addr(
            raw.family,
            &raw.requested_addr,
            raw.requested_port,
        )?)
    } else {
        None
    };
    let open = Connect {
        timestamp: raw.timestamp_ns,
        sock_id: raw.sock_id,
        cgroup_id: raw.cgroup_id,
        pid: (raw.pid_tgid >> 32) as u32,
        tid: raw.pid_tgid as u32,
        comm: comm(&raw.comm),
        source: connect_addr(raw.family, &raw.src_addr, raw.src_port)?,
        destination: connect_addr(raw.family, &raw.dst_addr, raw.dst_port)?,
        requested,
    };
    match ConnectKind::try_from(raw.kind).map_err(DecodeError::UnknownKind)? {
        ConnectKind::Open => Ok(ConnectRecord::Open(open)),
        ConnectKind::Outcome => {
            use observer_common::ConnectOutcome as Wire;
            let result = match Wire::try_from(raw.outcome) {
                Ok(Wire::Established) => ConnectResult::Established,
                Ok(Wire::Refused) => ConnectResult::Refused,
                Ok(Wire::Timeout) => ConnectResult::Timeout,
                Ok(Wire::None) | Err(_) => return Err(DecodeError::UnknownOutcome(raw.outcome)),
            };
            let connect = Connect {
                timestamp: raw.ended_ns,
                ..open.clone()
            };
            Ok(ConnectRecord::Ended {
                open,
                outcome: ConnectOutcome { connect, result },
            })
        }
    }
}

/// Which ring a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    Dns,
    Connect,
}

impl Ring {
    pub const COUNT: usize = 2;

    /// A dense index, for per-ring state kept in arrays.
    pub const fn index(self) -> usize {
        match self {
            Ring::Dns => 0,
            Ring::Connect => 1,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Ring::Dns => observer_common::names::DNS_EVENTS,
            Ring::Connect => observer_common::names::CONNECT_EVENTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::ConnectOutcome as Wire;

    fn as_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
        // SAFETY: Pod types have no padding the layout tests would not catch, and are
        // read here only as initialised bytes of a live value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    /// A DNS event as the kernel puts it on the ring: cut after its captured bytes (or after
    /// the whole payload field when `captured_len` claims more than it holds).
    fn dns_record(event: &DnsEvent) -> Vec<u8> {
        let mut bytes = as_bytes(event);
        bytes.truncate(DNS_EVENT_HEADER_LEN + event.captured_len as usize);
        bytes
    }

    fn dns_event() -> DnsEvent {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[198, 18, 0, 5]);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[198, 18, 0, 2]);
        let mut payload = [0xAAu8; DNS_PAYLOAD_MAX];
        payload[..4].copy_from_slice(&[0x12, 0x34, 0x01, 0x00]);
        DnsEvent {
            timestamp_ns: 42,
            cgroup_id: 7,
            socket_cookie: 99,
            tcp_seq: 1234,
            payload_len: 4,
            captured_len: 4,
            src_port: 40000,
            dst_port: 53,
            src_addr: src,
            dst_addr: dst,
            family: Family::Ipv4 as u8,
            protocol: Protocol::Udp as u8,
            direction: Direction::Egress as u8,
            flags: 0,
            _pad: [0; 4],
            payload,
        }
    }

    fn connect_event(kind: u8, outcome: u8) -> ConnectEvent {
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[203, 0, 113, 10]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        ConnectEvent {
            timestamp_ns: 5,
            ended_ns: 9,
            sock_id: 0xffff_8880_0000_1000,
            cgroup_id: 11,
            pid_tgid: (300u64 << 32) | 301,
            src_addr: [0; 16],
            dst_addr: dst,
            requested_addr: dst,
            comm,
            src_port: 0,
            dst_port: 5432,
            requested_port: 5432,
            family: Family::Ipv4 as u8,
            kind,
            outcome,
            flags: CONNECT_FLAG_REQUESTED,
            _pad: [0; 6],
        }
    }

    #[test]
    fn decodes_a_udp_query() {
        let packet = decode_dns(&dns_record(&dns_event())).unwrap();
        assert_eq!(packet.source, "198.18.0.5:40000".parse().unwrap());
        assert_eq!(packet.destination, "198.18.0.2:53".parse().unwrap());
        assert_eq!(packet.direction, Direction::Egress);
        assert_eq!(packet.protocol, Protocol::Udp);
        assert_eq!(packet.tcp_seq, None);
        assert_eq!(&packet.payload[..], &[0x12, 0x34, 0x01, 0x00]);
        assert!(!packet.truncated);
        assert_eq!((packet.cgroup_id, packet.socket_cookie), (7, 99));
    }

    #[test]
    fn decodes_a_truncated_tcp_segment_over_ipv6() {
        let mut raw = dns_event();
        raw.family = Family::Ipv6 as u8;
        raw.protocol = Protocol::Tcp as u8;
        raw.direction = Direction::Ingress as u8;
        raw.src_addr = "2001:db8::53".parse::<Ipv6Addr>().unwrap().octets();
        raw.payload_len = 5000;
        raw.captured_len = DNS_PAYLOAD_MAX as u32;
        raw.flags = DNS_FLAG_TRUNCATED;
        let packet = decode_dns(&dns_record(&raw)).unwrap();
        assert_eq!(packet.source, "[2001:db8::53]:40000".parse().unwrap());
        assert_eq!(packet.tcp_seq, Some(1234));
        assert_eq!(packet.payload.len(), DNS_PAYLOAD_MAX);
        assert_eq!(packet.payload_len, 5000);
        assert!(packet.truncated);
        assert_eq!(packet.direction, Direction::Ingress);
    }

    #[test]
    fn rejects_malformed_dns_records() {
        let good = dns_record(&dns_event());
        assert_eq!(
            decode_dns(&good[..good.len() - 1]),
            Err(DecodeError::WrongSize {
                record: "DNS",
                expected: good.len(),
                actual: good.len() - 1
            })
        );
        assert!(matches!(
            decode_dns(&[]),
            Err(DecodeError::WrongSize { actual: 0, .. })
        ));

        let mut raw = dns_event();
        raw.family = 9;
        assert_eq!(
            decode_dns(&dns_record(&raw)),
            Err(DecodeError::UnknownFamily {
                record: "DNS",
                family: 9
            })
        );

        let mut raw = dns_event();
        raw.protocol = 1;
        assert_eq!(
            decode_dns(&dns_record(&raw)),
            Err(DecodeError::UnknownProtocol(1))
        );

        let mut raw = dns_event();
        raw.direction = 2;
        assert_eq!(
            decode_dns(&dns_record(&raw)),
            Err(DecodeError::UnknownDirection(2))
        );

        let mut raw = dns_event();
        raw.captured_len = DNS_PAYLOAD_MAX as u32 + 1;
        raw.payload_len = u32::MAX;
        assert!(matches!(
            decode_dns(&dns_record(&raw)),
            Err(DecodeError::BadCaptureLength { .. })
        ));

        let mut raw = dns_event();
        raw.captured_len = 10;
        raw.payload_len = 4;
        assert!(matches!(
            decode_dns(&dns_record(&raw)),
            Err(DecodeError::BadCaptureLength { .. })
        ));
    }

    #[test]
    fn decodes_an_open_with_its_requested_address() {
        let event = decode_connect(&as_bytes(&connect_event(
            ConnectKind::Open as u8,
            Wire::None as u8,
        )))
        .unwrap();
        let ConnectRecord::Open(open) = event else {
            panic!("expected an open, got {event:?}");
        };
        assert_eq!(open.timestamp, 5);
        assert_eq!((open.pid, open.tid), (300, 301));
        assert_eq!(open.comm, "curl");
        assert_eq!(open.destination, "203.0.113.10:5432".parse().unwrap());
        assert_eq!(open.requested, Some("203.0.113.10:5432".parse().unwrap()));
        assert_eq!(open.source, "0.0.0.0:0".parse().unwrap());
    }

    #[test]
    fn decodes_each_outcome() {
        for (raw, result) in [
            (Wire::Established as u8, ConnectResult::Established),
            (Wire::Refused as u8, ConnectResult::Refused),
            (Wire::Timeout as u8, ConnectResult::Timeout),
        ] {
            let event =
                decode_connect(&as_bytes(&connect_event(ConnectKind::Outcome as u8, raw))).unwrap();
            let ConnectRecord::Ended { open, outcome } = event else {
                panic!("expected an ended connect, got {event:?}");
            };
            assert_eq!(outcome.result, result);
            assert_eq!(outcome.connect.cgroup_id, 11);
            // One record, two times: the SYN's and the outcome's.
            assert_eq!((open.timestamp, outcome.connect.timestamp), (5, 9));
            assert_eq!(open.sock_id, outcome.connect.sock_id);
            assert_eq!(open.destination, outcome.connect.destination);
        }
    }

    #[test]
    fn maps_v4_mapped_ipv6_connects_to_ipv4_and_omits_unset_request() {
        let mut raw = connect_event(ConnectKind::Open as u8, Wire::None as u8);
        raw.family = Family::Ipv6 as u8;
        raw.dst_addr = "::ffff:203.0.113.10".parse::<Ipv6Addr>().unwrap().octets();
        raw.flags = 0;
        let Ok(ConnectRecord::Open(open)) = decode_connect(&as_bytes(&raw)) else {
            panic!("expected an open");
        };
        assert_eq!(open.destination, "203.0.113.10:5432".parse().unwrap());
        assert_eq!(open.requested, None);
    }

    #[test]
    fn rejects_malformed_connect_records() {
        let good = as_bytes(&connect_event(ConnectKind::Open as u8, Wire::None as u8));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode_connect(&long),
            Err(DecodeError::WrongSize {
                record: "connect",
                ..
            })
        ));
        assert_eq!(
            decode_connect(&as_bytes(&connect_event(9, Wire::None as u8))),
            Err(DecodeError::UnknownKind(9))
        );
        assert_eq!(
            decode_connect(&as_bytes(&connect_event(
                ConnectKind::Outcome as u8,
                Wire::None as u8
            ))),
            Err(DecodeError::UnknownOutcome(Wire::None as u8))
        );
        let mut raw = connect_event(ConnectKind::Open as u8, Wire::None as u8);
        raw.family = 0;
        assert_eq!(
            decode_connect(&as_bytes(&raw)),
            Err(DecodeError::UnknownFamily {
                record: "connect",
                family: 0
            })
        );
    }

    #[test]
    fn comm_without_nul_uses_all_bytes_and_tolerates_bad_utf8() {
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
        let mut raw = [0u8; 16];
        raw[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(comm(&raw), "a\u{fffd}b");
    }

    #[test]
    fn a_record_of_one_ring_is_refused_by_the_other() {
        let dns = dns_record(&dns_event());
        assert!(matches!(
            decode_connect(&dns),
            Err(DecodeError::WrongSize { .. })
        ));
        // A record must end where its captured bytes end: not shorter, not padded.
        let padded = as_bytes(&dns_event());
        assert!(matches!(
            decode_dns(&padded),
            Err(DecodeError::WrongSize { expected: 84, .. })
        ));
    }
}
