//! DNS over TCP framing: arbitrary segments (streams, sequence numbers, wire lengths, cut
//! captures) fed to the reassembler, whose bounds must hold whatever arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::correlate::Direction;
use observer::dns::{
    self,
    tcp::{StreamKey, TcpLimits, TcpReassembler, TcpSegment},
};

const LIMITS: TcpLimits = TcpLimits {
    max_streams: 4,
    max_buffered_bytes: 8192,
    idle_ns: 1_000,
};

fuzz_target!(|data: &[u8]| {
    let mut reassembler = TcpReassembler::new(LIMITS);
    let mut out = Vec::new();
    let mut rest = data;
    let mut seq_base = [0u32; 16];
    let mut at = 0u64;
    // Each segment: a control byte (stream, direction, how the sequence moves), a length
    // byte, an extra-wire-length byte (a cut capture), then the payload.
    while let [control, len, extra, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let stream = usize::from(control & 0x07);
        let direction = if control & 0x08 == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let slot = stream * 2 + usize::from(control & 0x08 != 0);
        let seq = match control >> 4 {
            // Retransmit from the start of the previous segment.
            0 => seq_base[slot].wrapping_sub(len as u32),
            // A hole.
            1 => seq_base[slot].wrapping_add(u32::from(*extra) + 1),
            // Far away (a new stream reusing a cookie, or garbage).
            2 => u32::from(*extra) << 24,
            _ => seq_base[slot],
        };
        let cut = if control >> 4 == 3 {
            u32::from(*extra)
        } else {
            0
        };
        let wire_len = len as u32 + cut;
        at += u64::from(*extra) * 10;
        reassembler.push(
            TcpSegment {
                key: StreamKey {
                    socket_cookie: stream as u64,
                    direction,
                },
                at,
                seq,
                wire_len,
                payload,
            },
            &mut out,
        );
        seq_base[slot] = seq.wrapping_add(wire_len);
        assert!(reassembler.stream_count() <= LIMITS.max_streams);
        assert!(reassembler.buffered_bytes() <= LIMITS.max_buffered_bytes);
        for message in out.drain(..) {
            assert!(message.len() <= usize::from(u16::MAX));
            let _ = dns::parse(&message);
        }
        if control & 0x80 != 0 && control & 0x40 != 0 {
            reassembler.evict_idle(at);
        }
    }
    let _ = reassembler.counters();
});
