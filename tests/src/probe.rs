//! One DNS query with known bytes: the request side of `dns-probe-client`, and its report.
use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TestbedError};

/// Path of the `dns-probe-client` binary built with this package. Expands to `env!` and so
/// works in this package's integration tests (and benches), where cargo sets it.
#[macro_export]
macro_rules! dns_probe_client_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_dns-probe-client"))
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

/// Record types by number (the wire value).
pub mod qtype {
    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
}

/// One query to send.
#[derive(Clone, Debug)]
pub struct DnsProbe {
    pub server: SocketAddr,
    pub transport: Transport,
    pub name: String,
    pub qtype: u16,
    /// Message id (random if None).
    pub id: Option<u16>,
    /// Send these bytes verbatim instead of a query built from name/qtype (e.g. malformed input).
    pub raw: Option<Vec<u8>>,
    pub timeout: Duration,
}

impl DnsProbe {
    pub fn new(server: SocketAddr, name: &str, qtype: u16, transport: Transport) -> Self {
        Self {
            server,
            transport,
            name: name.to_owned(),
            qtype,
            id: None,
            raw: None,
            timeout: Duration::from_secs(3),
        }
    }

    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--server".to_owned(),
            self.server.to_string(),
            "--transport".into(),
            match self.transport {
                Transport::Udp => "udp".into(),
                Transport::Tcp => "tcp".into(),
            },
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string(),
        ];
        match &self.raw {
            Some(raw) => args.extend(["--raw-hex".into(), to_hex(raw)]),
            None => {
                args.extend(["--name".into(), self.name.clone()]);
                args.extend(["--qtype".into(), self.qtype.to_string()]);
                if let Some(id) = self.id {
                    args.extend(["--id".into(), id.to_string()]);
                }
            }
        }
        args
    }
}

/// What `dns-probe-client` printed: who sent, what exactly went out and came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub pid: u32,
    /// The client's cgroup2 path as /proc/self/cgroup showed it.
    pub cgroup: String,
    /// That cgroup's id (directory inode), filled in by [`crate::Pod::dns_probe`].
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    pub transport: Transport,
    pub server: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
    /// The DNS message sent (without the TCP length prefix).
    #[serde(with = "hex_bytes")]
    pub query: Vec<u8>,
    /// The DNS message received (without the TCP length prefix); None if none came.
    #[serde(with = "hex_opt")]
    pub response: Option<Vec<u8>>,
    /// Why no response came (timeout, refused, ...).
    pub error: Option<String>,
}

impl ProbeReport {
    pub fn parse(stdout: &str) -> Result<Self> {
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).map_err(|e| TestbedError::UnexpectedOutput {
            what: format!("dns-probe-client report ({e})"),
            output: stdout.to_owned(),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }
}

/// A standard query (RD set) for `name`/`qtype`, class IN.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(17 + name.len());
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| *l <= 63)
            .ok_or_else(|| TestbedError::Invalid {
                what: "DNS label longer than 63 bytes",
                detail: label.to_owned(),
            })?;
        msg.push(len);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.push(0);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    Ok(msg)
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Result<Vec<u8>> {
    let invalid = || TestbedError::Invalid {
        what: "hex string",
        detail: text.to_owned(),
    };
    if !text.len().is_multiple_of(2) {
        return Err(invalid());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(invalid)
        })
        .collect()
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        super::from_hex(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&super::to_hex(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| super::from_hex(&h).map_err(D::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_bytes_are_the_wire_format() {
        let q = encode_query(0x1234, "db.cluster.local.", qtype::AAAA).unwrap();
        assert_eq!(to_hex(&q[..12]), "123401000001000000000000");
        assert_eq!(&q[12..], b"\x02db\x07cluster\x05local\x00\x00\x1c\x00\x01");
        assert!(encode_query(1, &"a".repeat(64), qtype::A).is_err());
    }

    #[test]
    fn reports_round_trip() {
        let r = ProbeReport {
            pid: 7,
            cgroup: "/kubepods/pod1/abc".into(),
            cgroup_id: None,
            transport: Transport::Tcp,
            server: "198.18.0.53:53".parse().unwrap(),
            local: "198.18.1.1:40000".parse().unwrap(),
            query: vec![1, 2, 0xff],
            response: None,
            error: Some("timeout".into()),
        };
        assert_eq!(ProbeReport::parse(&r.to_json()).unwrap(), r);
        assert!(from_hex("0g").is_err());
        assert!(from_hex("abc").is_err());
    }
}
