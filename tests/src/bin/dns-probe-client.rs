//! Sends one DNS query over UDP or TCP and prints, as one JSON line, exactly which bytes went
//! out and came back, with this process's pid and cgroup: tests compare them with what the
//! kernel programs captured.
//!
//! dns-probe-client --server ADDR:PORT [--transport udp|tcp] [--timeout-ms N]
//!                  (--name NAME [--qtype N] [--id N] | --raw-hex HEX)
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use observer_tests::{
    ProbeReport, Transport, cgroup_of_pid,
    probe::{encode_query, from_hex, qtype},
};

struct Args {
    server: SocketAddr,
    transport: Transport,
    timeout: Duration,
    query: Vec<u8>,
}

fn parse_args() -> Result<Args, String> {
    let mut server = None;
    let mut transport = Transport::Udp;
    let mut timeout = Duration::from_secs(3);
    let (mut name, mut qtype, mut id, mut raw) = (None, qtype::A, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => server = Some(value()?.parse().map_err(|e| format!("--server: {e}"))?),
            "--transport" => {
                transport = match value()?.as_str() {
                    "udp" => Transport::Udp,
                    "tcp" => Transport::Tcp,
                    other => return Err(format!("--transport {other}: udp or tcp")),
                }
            }
            "--timeout-ms" => {
                timeout = Duration::from_millis(
                    value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?,
                )
            }
            "--name" => name = Some(value()?),
            "--qtype" => qtype = value()?.parse().map_err(|e| format!("--qtype: {e}"))?,
            "--id" => id = Some(value()?.parse::<u16>().map_err(|e| format!("--id: {e}"))?),
            "--raw-hex" => raw = Some(from_hex(&value()?).map_err(|e| e.to_string())?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let server = server.ok_or("--server is required")?;
    let query = match (raw, name) {
        (Some(raw), _) => raw,
        (None, Some(name)) => {
            // Pid and clock bits: distinct ids for back-to-back probes without an RNG.
            let id = id.unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                (std::process::id() ^ nanos) as u16
            });
            encode_query(id, &name, qtype).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("--name or --raw-hex is required".into()),
    };
    Ok(Args {
        server,
        transport,
        timeout,
        query,
    })
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    }
}

/// Returns the local address and the response (or why none came).
fn exchange(args: &Args) -> (SocketAddr, Result<Vec<u8>, String>) {
    let mut local = unspecified(args.server);
    let result = (|| match args.transport {
        Transport::Udp => {
            let sock = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
            sock.connect(args.server)
                .map_err(|e| format!("connect: {e}"))?;
            local = sock.local_addr().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(args.timeout))
                .map_err(|e| e.to_string())?;
            sock.send(&args.query).map_err(|e| format!("send: {e}"))?;
            let mut buf = vec![0u8; 65535];
            let n = sock.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
            buf.truncate(n);
            Ok(buf)
        }
        Transport::Tcp => {
            let mut stream = TcpStream::connect_timeout(&args.server, args.timeout)
                .map_err(|e| format!("connect: {e}"))?;
            local = stream.local_addr().map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(args.timeout))
                .map_err(|e| e.to_string())?;
            let len =
                u16::try_from(args.query.len()).map_err(|_| "query longer than 65535 bytes")?;
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&args.query);
            stream
                .write_all(&framed)
                .map_err(|e| format!("send: {e}"))?;
            let mut len = [0u8; 2];
            stream
                .read_exact(&mut len)
                .map_err(|e| format!("recv length: {e}"))?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream
                .read_exact(&mut buf)
                .map_err(|e| format!("recv: {e}"))?;
            Ok(buf)
        }
    })();
    (local, result)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dns-probe-client: {e}");
            return ExitCode::from(2);
        }
    };
    let (local, result) = exchange(&args);
    let report = ProbeReport {
        pid: std::process::id(),
        cgroup: cgroup_of_pid(std::process::id()).unwrap_or_default(),
        cgroup_id: None,
        transport: args.transport,
        server: args.server,
        local,
        query: args.query,
        response: result.as_ref().ok().cloned(),
        error: result.err(),
    };
    println!("{}", report.to_json());
    ExitCode::SUCCESS
}
