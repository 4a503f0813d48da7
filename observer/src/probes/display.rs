//! One human-readable line per event, for `observer events`.
use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{BootClock, Event};

/// `2026-05-20T10:11:12.123456Z`, UTC, without a date library.
pub fn format_utc(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Days since the epoch to a proleptic Gregorian date (H. Hinnant's civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// A short summary of a DNS message from its header: id and query/response.
fn dns_header(payload: &[u8]) -> String {
    match payload {
        [hi, lo, flags, ..] => {
            let id = u16::from_be_bytes([*hi, *lo]);
            let kind = if flags & 0x80 != 0 {
                "response"
            } else {
                "query"
            };
            format!(" id=0x{id:04x} {kind}")
        }
        _ => String::new(),
    }
}

/// One line describing `event`.
pub fn describe(event: &Event, clock: &BootClock) -> String {
    let mut line = format!(
        "{} cgroup={} ",
        format_utc(clock.to_system_time(event.timestamp())),
        event.cgroup_id()
    );
    match event {
        Event::Dns(p) => {
            let _ = write!(
                line,
                "dns {} {} {} -> {} len={}",
                p.direction.as_str(),
                p.protocol.as_str(),
                p.source,
                p.destination,
                p.payload_len
            );
            if p.truncated {
                let _ = write!(line, " captured={} truncated", p.payload.len());
            }
            if let Some(seq) = p.tcp_seq {
                let _ = write!(line, " seq={seq}");
            }
            // A TCP segment that starts a message begins with the 2-byte length prefix.
            let header = match p.tcp_seq {
                Some(_) => p.payload.get(2..).unwrap_or_default(),
                None => &p.payload[..],
            };
            line.push_str(&dns_header(header));
        }
        Event::ConnectOpen(c) => {
            let _ = write!(
                line,
                "connect open pid={} comm={} {} -> {}",
                c.pid, c.comm, c.source, c.destination
            );
            if let Some(requested) = c.requested {
                let _ = write!(line, " requested={requested}");
            }
        }
        Event::ConnectOutcome(o) => {
            let c = &o.connect;
            let _ = write!(
                line,
                "connect {} pid={} comm={} {} -> {}",
                o.result.as_str(),
                c.pid,
                c.comm,
                c.source,
                c.destination
            );
            if let Some(requested) = c.requested {
                let _ = write!(line, " requested={requested}");
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::probes::{Connect, ConnectOutcome, ConnectResult, Direction, DnsPacket, Protocol};

    #[test]
    fn formats_utc_dates() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_164_800_123_456); // leap day
        assert_eq!(format_utc(t), "2024-02-29T00:00:00.123456Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_868_799); // end of 2000-02-29
        assert_eq!(format_utc(t), "2000-02-29T23:59:59.000000Z");
    }

    #[test]
    fn describes_dns_and_connects() {
        let clock = BootClock::with_offset_ns(0);
        let dns = Event::Dns(DnsPacket {
            timestamp: 0,
            cgroup_id: 9,
            socket_cookie: 1,
            direction: Direction::Ingress,
            protocol: Protocol::Udp,
            source: "198.18.0.2:53".parse().unwrap(),
            destination: "198.18.0.5:40000".parse().unwrap(),
            tcp_seq: None,
            payload_len: 3000,
            payload: Bytes::from_static(&[0xab, 0xcd, 0x81, 0x80]),
            truncated: true,
        });
        assert_eq!(
            describe(&dns, &clock),
            "1970-01-01T00:00:00.000000Z cgroup=9 dns ingress udp 198.18.0.2:53 -> \
             198.18.0.5:40000 len=3000 captured=4 truncated id=0xabcd response"
        );
        let connect = Connect {
            timestamp: 0,
            sock_id: 1,
            cgroup_id: 9,
            pid: 10,
            tid: 11,
            comm: "curl".into(),
            source: "198.18.0.5:41000".parse().unwrap(),
            destination: "203.0.113.10:5432".parse().unwrap(),
            requested: Some("203.0.113.10:5432".parse().unwrap()),
        };
        let outcome = Event::ConnectOutcome(ConnectOutcome {
            connect,
            result: ConnectResult::Refused,
        });
        assert!(describe(&outcome, &clock).ends_with(
            "connect refused pid=10 comm=curl 198.18.0.5:41000 -> 203.0.113.10:5432 \
             requested=203.0.113.10:5432"
        ));
    }

    #[test]
    fn short_payloads_have_no_header_summary() {
        assert_eq!(dns_header(&[1, 2]), "");
        assert_eq!(dns_header(&[0, 1, 0]), " id=0x0001 query");
    }
}
