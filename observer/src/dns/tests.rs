use observer_common::Direction;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    AnswerData, DnsParseErrorKind, QType, Rcode,
    build::{WireAnswer, query, response},
    parse,
    tcp::{StreamKey, TcpLimits, TcpReassembler, TcpSegment},
};

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| b.is_ascii_hexdigit())
        .map(|b| (b as char).to_digit(16).unwrap() as u8)
        .collect();
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

// glibc's A query for db.another-lab.com (RD, no EDNS), written out by hand from RFC 1035.
const GLIBC_QUERY_HEX: &str = "
    1234 0100 0001 0000 0000 0000
    02 6462 0b 616e6f746865722d6c6162 03 636f6d 00 0001 0001";
// The forwarder's answer: QR RD RA NOERROR, question echoed, one A with a pointer to the
// question name (c00c), TTL 300, 203.0.113.10.
const FORWARDER_ANSWER_HEX: &str = "
    1234 8180 0001 0001 0000 0000
    02 6462 0b 616e6f746865722d6c6162 03 636f6d 00 0001 0001
    c00c 0001 0001 0000012c 0004 cb00710a";

#[test]
fn builder_matches_hand_verified_fixtures() {
    assert_eq!(query(0x1234, "db.another-lab.com", 1), hex(GLIBC_QUERY_HEX));
    let built = response(
        0x1234,
        "db.another-lab.com",
        1,
        0,
        &[WireAnswer::Addr {
            owner: "db.another-lab.com".into(),
            ttl: 300,
            ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        }],
        None,
    );
    assert_eq!(built, hex(FORWARDER_ANSWER_HEX));
}

#[test]
fn parses_hand_verified_fixtures() {
    let q = parse(&hex(GLIBC_QUERY_HEX)).unwrap();
    assert_eq!(q.id, 0x1234);
    assert!(!q.is_response && !q.truncated);
    let question = q.question.as_ref().unwrap();
    assert_eq!(&*question.name, "db.another-lab.com");
    assert_eq!(question.qtype, QType::A);

    let r = parse(&hex(FORWARDER_ANSWER_HEX)).unwrap();
    assert!(r.is_response);
    assert_eq!(r.rcode, Rcode::NOERROR);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(&*r.answers[0].owner, "db.another-lab.com");
    assert_eq!(r.answers[0].ttl, 300);
    assert_eq!(
        r.answers[0].data,
        AnswerData::A(Ipv4Addr::new(203, 0, 113, 10))
    );
}

#[test]
fn parses_nxdomain_with_soa_cname_chain_and_aaaa() {
    let nx = parse(&response(
        7,
        "db.svc.cluster.local",
        28,
        3,
        &[],
        Some("cluster.local"),
    ))
    .unwrap();
    assert_eq!(nx.rcode, Rcode::NXDOMAIN);
    assert_eq!(nx.rcode.mnemonic(), "NXDOMAIN");
    assert!(nx.answers.is_empty(), "SOA in authority is not an answer");
    assert_eq!(nx.question.unwrap().qtype.mnemonic(), "AAAA");

    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let r = parse(&response(
        8,
        "WWW.Example.COM",
        28,
        0,
        &[
            WireAnswer::Cname {
                owner: "www.example.com".into(),
                ttl: 60,
                target: "edge.cdn.example.net".into(),
            },
            WireAnswer::Addr {
                owner: "edge.cdn.example.net".into(),
                ttl: 20,
                ip: IpAddr::V6(v6),
            },
        ],
        None,
    ))
    .unwrap();
    assert_eq!(&*r.question.as_ref().unwrap().name, "www.example.com");
    assert_eq!(
        r.answers[0].data,
        AnswerData::Cname("edge.cdn.example.net".into())
    );
    assert_eq!(
        r.addresses().collect::<Vec<_>>(),
        vec![(IpAddr::V6(v6), 20)]
    );
}

#[test]
fn truncation_flag_is_reported() {
    let mut bytes = response(9, "big.example.com", 1, 0, &[], None);
    bytes[2] |= 0x02;
    assert!(parse(&bytes).unwrap().truncated);
}

#[test]
fn hostile_messages_are_typed_errors() {
    let header = |qd: u16, an: u16| {
        let mut h = hex("abcd 8180");
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&an.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    };
    let mut loop_name = header(1, 0);
    loop_name.extend_from_slice(&hex("c00c 0001 0001"));
    let mut forward = header(1, 0);
    forward.extend_from_slice(&hex("c020 0001 0001 0000000000000000"));
    let mut long_name = header(1, 0);
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(&hex("00 0001 0001"));
    let mut huge_counts = header(1, 65535);
    huge_counts.extend_from_slice(&hex("00 0001 0001"));
    let mut bad_a = header(1, 1);
    bad_a.extend_from_slice(&hex("00 0001 0001 00 0001 0001 0000003c 0003 010203"));
    let full = hex(FORWARDER_ANSWER_HEX);
    let cases: Vec<(&str, Vec<u8>, DnsParseErrorKind)> = vec![
        ("zero length", vec![], DnsParseErrorKind::Empty),
        (
            "half a header",
            full[..7].to_vec(),
            DnsParseErrorKind::Truncated,
        ),
        (
            "cut in the answer",
            full[..full.len() - 3].to_vec(),
            DnsParseErrorKind::Truncated,
        ),
        ("compression loop", loop_name, DnsParseErrorKind::BadName),
        ("forward pointer", forward, DnsParseErrorKind::BadName),
        ("name over 255 bytes", long_name, DnsParseErrorKind::BadName),
        (
            "65535 answers in 17 bytes",
            huge_counts,
            DnsParseErrorKind::BadCounts,
        ),
        (
            "too many questions",
            header(9, 0),
            DnsParseErrorKind::BadCounts,
        ),
        ("A record of 3 bytes", bad_a, DnsParseErrorKind::BadRecord),
    ];
    for (what, bytes, kind) in cases {
        let err = parse(&bytes).expect_err(what);
        assert_eq!(err.kind, kind, "{what}: {err}");
    }
}

#[test]
fn answers_are_capped() {
    let answers: Vec<WireAnswer> = (0..100u8)
        .map(|i| WireAnswer::Addr {
            owner: "many.example.com".into(),
            ttl: 30,
            ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, i)),
        })
        .collect();
    let m = parse(&response(1, "many.example.com", 1, 0, &answers, None)).unwrap();
    assert_eq!(m.answers.len(), super::MAX_ANSWERS);
    assert!(m.answers_capped);
}

/// xorshift: deterministic noise without a dependency.
fn noise(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let seed = hex(FORWARDER_ANSWER_HEX);
    for round in 0..50_000 {
        let bytes: Vec<u8> = if round % 2 == 0 {
            let len = (noise(&mut s) % 600) as usize;
            (0..len).map(|_| noise(&mut s) as u8).collect()
        } else {
            let mut b = seed.clone();
            for _ in 0..(noise(&mut s) % 4 + 1) {
                let i = (noise(&mut s) as usize) % b.len();
                b[i] = noise(&mut s) as u8;
            }
            b.truncate((noise(&mut s) as usize) % (b.len() + 1));
            b
        };
        if let Ok(m) = parse(&bytes) {
            assert!(m.answers.len() <= super::MAX_ANSWERS);
        }
    }
}

// ---- TCP framing ----

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut v = (msg.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(msg);
    v
}

const KEY: StreamKey = StreamKey {
    socket_cookie: 42,
    direction: Direction::Ingress,
};

fn seg(seq: u32, payload: &[u8]) -> TcpSegment<'_> {
    TcpSegment {
        key: KEY,
        at: u64::from(seq),
        seq,
        wire_len: payload.len() as u32,
        payload,
    }
}

#[test]
fn tcp_framing_cases() {
    let m1 = response(1, "a.example.com", 1, 3, &[], None);
    let m2 = response(2, "b.example.com", 1, 3, &[], None);
    let m3 = response(3, "c.example.com", 1, 3, &[], None);
    let (f1, f2, f3) = (framed(&m1), framed(&m2), framed(&m3));
    let base = 1000u32;

    // Split across segments, in order.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    r.push(seg(base, &f1[..5]), &mut out);
    assert!(out.is_empty());
    r.push(seg(base + 5, &f1[5..]), &mut out);
    assert_eq!(out, vec![m1.clone()]);

    // Several messages coalesced in one segment, the last one split.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    let mut all = [f1.clone(), f2.clone(), f3.clone()].concat();
    let tail = all.split_off(f1.len() + f2.len() + 4);
    r.push(seg(base, &all), &mut out);
    assert_eq!(out, vec![m1.clone(), m2.clone()]);
    r.push(seg(base + all.len() as u32, &tail), &mut out);
    assert_eq!(out, vec![m1.clone(), m2.clone(), m3.clone()]);

    // Retransmitted segment: ignored, counted.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    r.push(seg(base, &f1), &mut out);
    r.push(seg(base, &f1), &mut out);
    assert_eq!(out, vec![m1.clone()]);
    assert_eq!(r.counters().duplicate_segments, 1);

    // Gap: the partial message is dropped; the next whole message resyncs.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    r.push(seg(base, &f1[..6]), &mut out);
    let lost = (f1.len() - 6) as u32;
    r.push(seg(base + 6 + lost + 3, &f2), &mut out);
    assert_eq!(out, vec![m2.clone()]);
    assert_eq!(r.counters().gaps, 1);

    // Capture cut: the message in the cut segment is lost and counted; the next segment
    // that starts a message is read.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    let both = [f1.clone(), f2.clone()].concat();
    let cut = TcpSegment {
        wire_len: both.len() as u32,
        payload: &both[..f1.len() + 5],
        ..seg(base, &both)
    };
    r.push(cut, &mut out);
    assert_eq!(out, vec![m1.clone()]);
    r.push(seg(base + both.len() as u32, &f3), &mut out);
    assert_eq!(out, vec![m1.clone(), m3.clone()]);
    assert_eq!(r.counters().cut_segments, 1);

    // After a gap, a segment that cannot start a message (its would-be length is shorter
    // than a header) is skipped rather than misread; the next message start resyncs.
    let mut r = TcpReassembler::new(TcpLimits::default());
    let mut out = Vec::new();
    r.push(seg(base, &f1[..6]), &mut out);
    let middle = [0u8, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
    r.push(seg(base + 100, &middle), &mut out);
    r.push(seg(base + 100 + middle.len() as u32, &f2), &mut out);
    assert_eq!(out, vec![m2.clone()]);
    assert_eq!(r.counters().unsynced_segments, 1);
    assert_eq!(r.counters().gaps, 1);
}

#[test]
fn tcp_caps_and_idle_eviction_are_counted() {
    let m = response(1, "a.example.com", 1, 3, &[], None);
    let f = framed(&m);
    let limits = TcpLimits {
        max_streams: 2,
        max_buffered_bytes: 64,
        idle_ns: 10,
    };
    let mut r = TcpReassembler::new(limits);
    let mut out = Vec::new();
    for cookie in 0..3u64 {
        let key = StreamKey {
            socket_cookie: cookie,
            direction: Direction::Egress,
        };
        r.push(
            TcpSegment {
                key,
                at: cookie,
                seq: 1,
                wire_len: 10,
                payload: &f[..10],
            },
            &mut out,
        );
    }
    assert_eq!(r.stream_count(), 2);
    assert_eq!(r.counters().streams_evicted_cap, 1);
    r.evict_idle(1000);
    assert_eq!(r.stream_count(), 0);
    assert_eq!(r.counters().streams_evicted_idle, 2);
    assert_eq!(r.buffered_bytes(), 0);

    // One stream trying to buffer more than the byte cap loses its partial message.
    let mut big = vec![0xff, 0xff];
    big.extend_from_slice(&m[..12]);
    big[2 + 4] = 0;
    big[2 + 5] = 1;
    let mut r = TcpReassembler::new(limits);
    r.push(seg(1, &[big.clone(), vec![0; 80]].concat()), &mut out);
    assert_eq!(r.buffered_bytes(), 0);
    assert_eq!(r.counters().streams_evicted_cap, 1);
}

/// Question names as a wire query carries them, read back by `parse`: the direct copy of
/// plain labels must give what hickory's escaping text form gives, for odd labels too.
#[test]
fn question_names_read_as_hickory_escapes_them() {
    let wire_name = |labels: &[&[u8]]| {
        let mut q = hex("abcd 0100 0001 0000 0000 0000");
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let cases: &[(&[&[u8]], &str)] = &[
        (&[b"DB", b"Another-Lab", b"com"], "db.another-lab.com"),
        (&[b"_http", b"_tcp", b"svc"], "_http._tcp.svc"),
        (&[b"-lead", b"x"], "\\-lead.x"),
        (&[b"*", b"wild"], "*.wild"),
        (&[b"a.b", b"c"], "a\\.b.c"),
        (&[b"sp ace", b"c"], "sp\\040ace.c"),
        (&[&[0xc3, 0xa9], b"c"], "\\303\\251.c"),
        (&[], ""),
    ];
    for (labels, want) in cases {
        let msg = parse(&wire_name(labels)).unwrap();
        assert_eq!(&*msg.question.unwrap().name, *want, "{labels:?}");
    }
}

// ---- hostile cases, one property each ----

fn header(flags: &str, qd: u16, an: u16, ar: u16) -> Vec<u8> {
    let mut h = hex(&format!("beef {flags}"));
    for n in [qd, an, 0, ar] {
        h.extend_from_slice(&n.to_be_bytes());
    }
    h
}

fn labels(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.push(p.len() as u8);
        out.extend_from_slice(p);
    }
    out.push(0);
    out
}

#[test]
fn names_at_the_255_byte_limit_pass_and_one_byte_more_fails() {
    let l63 = [b'a'; 63];
    // 3 x (1 + 63) + (1 + 61) + root = 255 wire bytes.
    let at_limit = labels(&[&l63, &l63, &l63, &[b'b'; 61]]);
    assert_eq!(at_limit.len(), 255);
    let mut ok = header("0100", 1, 0, 0);
    ok.extend_from_slice(&at_limit);
    ok.extend_from_slice(&hex("0001 0001"));
    let m = parse(&ok).expect("a 255-byte name is legal");
    assert_eq!(m.question.unwrap().name.len(), 253);

    let over = labels(&[&l63, &l63, &l63, &[b'b'; 62]]);
    let mut bad = header("0100", 1, 0, 0);
    bad.extend_from_slice(&over);
    bad.extend_from_slice(&hex("0001 0001"));
    assert_eq!(parse(&bad).unwrap_err().kind, DnsParseErrorKind::BadName);
}

#[test]
fn label_length_over_63_is_a_bad_name() {
    // 0x40 and 0x80 are the reserved label types: neither a length nor a pointer.
    for first in [0x40u8, 0x7f, 0x80, 0xbf] {
        let mut m = header("0100", 1, 0, 0);
        m.push(first);
        m.extend_from_slice(&[b'a'; 70]);
        m.extend_from_slice(&hex("00 0001 0001"));
        assert_eq!(
            parse(&m).unwrap_err().kind,
            DnsParseErrorKind::BadName,
            "label byte {first:#x}"
        );
    }
}

#[test]
fn escaped_and_non_utf8_labels_become_printable_text() {
    let mut m = header("0100", 1, 0, 0);
    m.extend_from_slice(&labels(&[b"a.b", &[0xff, 0x00, b' '], b"Example"]));
    m.extend_from_slice(&hex("0001 0001"));
    let name = parse(&m).unwrap().question.unwrap().name;
    // A dot inside a label must not read as a label boundary, raw bytes must not reach
    // logs or exporters unescaped.
    assert!(name.ends_with(".example"), "{name}");
    assert!(name.starts_with("a\\.b."), "{name}");
    assert!(name.is_ascii() && !name.contains('\0'), "{name:?}");
    assert_eq!(
        name.matches('.').count() - name.matches("\\.").count(),
        2,
        "{name}"
    );
}

#[test]
fn pointer_chains_and_self_loops_are_bad_names() {
    // Answer owner -> pointer to itself.
    let mut m = header("8180", 1, 1, 0);
    m.extend_from_slice(&labels(&[b"x"]));
    m.extend_from_slice(&hex("0001 0001"));
    let at = m.len() as u16;
    m.extend_from_slice(&(0xc000 | at).to_be_bytes());
    m.extend_from_slice(&hex("0001 0001 0000003c 0004 cb00710a"));
    assert_eq!(parse(&m).unwrap_err().kind, DnsParseErrorKind::BadName);
    // Two pointers pointing at each other.
    let mut m = header("8180", 1, 0, 0);
    m.extend_from_slice(&hex("c00e c00c 0001 0001"));
    assert_eq!(parse(&m).unwrap_err().kind, DnsParseErrorKind::BadName);
}

#[test]
fn every_prefix_of_a_real_answer_is_a_typed_error() {
    let full = hex(FORWARDER_ANSWER_HEX);
    for cut in 0..full.len() {
        let err = parse(&full[..cut]).expect_err("a cut message");
        assert!(
            matches!(
                err.kind,
                DnsParseErrorKind::Empty
                    | DnsParseErrorKind::Truncated
                    | DnsParseErrorKind::BadCounts
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn edns_opt_in_the_additional_section_is_ignored() {
    let mut m = hex(FORWARDER_ANSWER_HEX);
    m[11] = 1; // ARCOUNT
    // OPT: root owner, type 41, UDP size 1232, extended rcode/flags 0, one cookie option.
    m.extend_from_slice(&hex(
        "00 0029 04d0 00000000 000c 000a 0008 0102030405060708",
    ));
    let parsed = parse(&m).unwrap();
    assert_eq!(parsed.answers.len(), 1);
    assert_eq!(parsed.rcode, Rcode::NOERROR);
    assert_eq!(
        parsed.addresses().next(),
        Some((IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)), 300))
    );
}

#[test]
fn a_response_without_a_question_parses_with_none() {
    let mut m = header("8180", 0, 1, 0);
    m.extend_from_slice(&labels(&[b"db", b"another-lab", b"com"]));
    m.extend_from_slice(&hex("0001 0001 0000003c 0004 cb00710a"));
    let parsed = parse(&m).unwrap();
    assert!(parsed.is_response);
    assert_eq!(parsed.question, None);
    assert_eq!(parsed.answers.len(), 1);
}

#[test]
fn huge_answer_counts_allocate_nothing_before_the_check() {
    for an in [65535u16, 1000, 65] {
        let mut m = header("8180", 1, an, 0);
        m.extend_from_slice(&labels(&[b"x"]));
        m.extend_from_slice(&hex("0001 0001"));
        assert_eq!(
            parse(&m).unwrap_err().kind,
            DnsParseErrorKind::BadCounts,
            "{an} answers"
        );
    }
}

/// Every byte value inside a label, read directly or through hickory, gives the text that
/// hickory's own decoding gives.
#[test]
fn every_label_byte_reads_as_hickory_decodes_it() {
    use hickory_proto::{
        rr::Name,
        serialize::binary::{BinDecodable, BinDecoder},
    };
    for b in 0..=255u8 {
        let mut q = hex("abcd 0100 0001 0000 0000 0000");
        let name_wire = [3, b'x', b, b'Z', 1, b'c', 0];
        q.extend_from_slice(&name_wire);
        q.extend_from_slice(&[0, 1, 0, 1]);
        let want = super::escaped_name_text(&Name::read(&mut BinDecoder::new(&name_wire)).unwrap());
        let msg = parse(&q).unwrap();
        assert_eq!(*msg.question.unwrap().name, *want, "byte {b:#04x}");
    }
}

/// Names long enough to be judged eight bytes at a time, their last word overlapping the
/// one before it or not, plain or ending in a compression pointer: every byte value at
/// every place reads as hickory decodes it, dots between labels counted apart from a dot
/// inside one.
#[test]
fn every_byte_at_every_place_of_long_names_reads_as_hickory_decodes_it() {
    use hickory_proto::{
        rr::Name,
        serialize::binary::{BinDecodable, BinDecoder},
    };
    let hickory_text = |message: &[u8], at: usize| {
        let mut decoder = BinDecoder::new(message);
        decoder.read_slice(at).unwrap();
        super::escaped_name_text(&Name::read(&mut decoder).unwrap())
    };
    // A response whose question is `name` and whose one CNAME's target is `name`'s labels
    // followed by a pointer to the question.
    let message = |name: &[Vec<u8>]| {
        let mut m = hex("abcd 8180 0001 0001 0000 0000");
        let mut wire = Vec::new();
        for label in name {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label);
        }
        m.extend_from_slice(&wire);
        m.extend_from_slice(&[0, 0, 5, 0, 1]);
        let target_at = m.len() + 12;
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30]);
        m.extend_from_slice(&((wire.len() + 2) as u16).to_be_bytes());
        m.extend_from_slice(&wire);
        m.extend_from_slice(&[0xc0, 12]);
        (m, target_at)
    };
    let shapes: &[&[usize]] = &[
        &[7],
        &[8],
        &[9],
        &[3, 4],
        &[4, 4],
        &[15],
        &[16],
        &[5, 9, 3],
        &[20, 1],
    ];
    let mut checked = 0;
    for shape in shapes {
        let places: Vec<(usize, usize)> = shape
            .iter()
            .enumerate()
            .flat_map(|(label, &n)| (0..n).map(move |at| (label, at)))
            .collect();
        for &(label, at) in &places {
            for b in 0..=255u8 {
                let mut name: Vec<Vec<u8>> = shape
                    .iter()
                    .map(|&n| (0..n).map(|i| b"aZ9_x-"[i % 6]).collect())
                    .collect();
                name[label][at] = b;
                let (wire, target_at) = message(&name);
                let msg = parse(&wire).unwrap();
                let question = msg.question.unwrap().name;
                assert_eq!(*question, *hickory_text(&wire, 12), "{name:?}");
                let AnswerData::Cname(target) = &msg.answers[0].data else {
                    panic!("a CNAME: {:?}", msg.answers);
                };
                assert_eq!(**target, *hickory_text(&wire, target_at), "{name:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 20_000, "{checked} names");
}

/// Plain texts of every length up to 40 are read directly (not left to hickory), dots
/// counted once where the last word overlaps the one before it.
#[test]
fn plain_texts_of_every_length_are_lowered_in_place() {
    for len in 1..=40 {
        let text: Vec<u8> = (0..len).map(|i| b"Ab9_.X-z"[i % 8]).collect();
        let dots = text.iter().filter(|&&c| c == b'.').count();
        let mut lowered = text.clone();
        assert!(super::lower_plain(&mut lowered, dots), "length {len}");
        assert_eq!(lowered, text.to_ascii_lowercase(), "length {len}");
        if dots > 0 {
            assert!(
                !super::lower_plain(&mut text.clone(), dots - 1),
                "length {len}"
            );
            assert!(
                !super::lower_plain(&mut text.clone(), dots + 1),
                "length {len}"
            );
        }
    }
}
