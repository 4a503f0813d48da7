//! DNS over TCP: reassembles the 2-byte-length-prefixed messages of each stream from the
//! segments the kernel captured.
//!
//! Pure and bounded: timestamps are inputs, streams and buffered bytes are capped, and
//! every loss (gap, capture cut, eviction, garbage length) is counted in [`TcpCounters`].
//! After a loss the stream waits for a segment that plausibly starts a message (length
//! prefix then a header with one question and the QUERY opcode) and resumes there.
use std::collections::{BTreeSet, HashMap};

use observer_common::Direction;

use crate::record::BootNs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub socket_cookie: u64,
    pub direction: Direction,
}

/// One captured TCP segment carrying DNS-port payload.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment<'a> {
    pub key: StreamKey,
    pub at: BootNs,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    /// Payload bytes on the wire; more than `payload.len()` when the capture cut it.
    pub wire_len: u32,
    /// The captured bytes.
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    pub max_streams: usize,
    /// Bytes buffered across all streams (partial messages).
    pub max_buffered_bytes: usize,
    /// A stream with no segment for this long is dropped by [`TcpReassembler::evict_idle`].
    pub idle_ns: u64,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            max_streams: 4096,
            max_buffered_bytes: 16 << 20,
            idle_ns: 60_000_000_000,
        }
    }
}

/// Counters of everything the reassembler did not turn into a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub messages: u64,
    /// Segments wholly before the next expected byte (retransmits).
    pub duplicate_segments: u64,
    /// A segment after a hole: the partial message was dropped.
    pub gaps: u64,
    /// Segments cut by the capture: the message they carried is lost.
    pub cut_segments: u64,
    /// Segments skipped while waiting for a message start after a loss.
    pub unsynced_segments: u64,
    /// A zero or sub-header length prefix: the stream is not DNS-framed as expected.
    pub bad_lengths: u64,
    pub streams_evicted_cap: u64,
    pub streams_evicted_idle: u64,
    /// Partial-message bytes dropped by evictions.
    pub bytes_dropped: u64,
}

#[derive(Debug)]
struct Stream {
    /// Sequence number expected next.
    next_seq: u32,
    /// Bytes of the message being assembled, length prefix included.
    buf: Vec<u8>,
    /// The next byte is known to be a message boundary or inside `buf`'s message.
    synced: bool,
    last_seen: BootNs,
}

#[derive(Debug)]
pub struct TcpReassembler {
    limits: TcpLimits,
    streams: HashMap<StreamKey, Stream>,
    /// (last_seen, key) of every stream: the LRU order.
    by_age: BTreeSet<(BootNs, StreamKey)>,
    buffered: usize,
    counters: TcpCounters,
}

const DNS_HEADER_LEN: usize = 12;

impl TcpReassembler {
    pub fn new(limits: TcpLimits) -> Self {
        Self {
            limits,
            streams: HashMap::new(),
            by_age: BTreeSet::new(),
            buffered: 0,
            counters: TcpCounters::default(),
        }
    }

    pub fn counters(&self) -> TcpCounters {
        self.counters
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Feeds one segment; complete messages (without their length prefix) are appended
    /// to `out` in stream order.
    pub fn push(&mut self, seg: TcpSegment<'_>, out: &mut Vec<Vec<u8>>) {
        let captured = seg.payload.len().min(seg.wire_len as usize);
        let cut = captured < seg.wire_len as usize;
        let payload = &seg.payload[..captured];

        let mut stream = match self.streams.remove(&seg.key) {
            Some(s) => {
                self.by_age.remove(&(s.last_seen, seg.key));
                s
            }
            None => {
                if self.streams.len() >= self.limits.max_streams {
                    self.evict_oldest();
                }
                Stream {
                    next_seq: seg.seq,
                    buf: Vec::new(),
                    // A stream first seen here starts at a message when the segment looks
                    // like one; otherwise it waits.
                    synced: plausible_start(payload),
                    last_seen: seg.at,
                }
            }
        };
        stream.last_seen = seg.at;
        let before = stream.buf.len();
        self.feed(&mut stream, seg.seq, seg.wire_len, payload, cut, out);
        self.buffered = self.buffered - before + stream.buf.len();
        self.by_age.insert((stream.last_seen, seg.key));
        self.streams.insert(seg.key, stream);
        while self.buffered > self.limits.max_buffered_bytes && !self.streams.is_empty() {
            self.evict_oldest();
        }
    }

    fn feed(
        &mut self,
        stream: &mut Stream,
        seq: u32,
        wire_len: u32,
        payload: &[u8],
        cut: bool,
        out: &mut Vec<Vec<u8>>,
    ) {
        let end = seq.wrapping_add(wire_len);
        let offset = seq.wrapping_sub(stream.next_seq) as i32;
        let mut payload = payload;
        if offset < 0 {
            // Starts before what we have: a retransmit, maybe with new bytes at its end.
            let already = offset.unsigned_abs() as usize;
            if end.wrapping_sub(stream.next_seq) as i32 <= 0 {
                self.counters.duplicate_segments += 1;
                return;
            }
            payload = payload.get(already..).unwrap_or(&[]);
        } else if offset > 0 {
            self.counters.gaps += 1;
            self.counters.bytes_dropped += stream.buf.len() as u64;
            stream.buf.clear();
            stream.synced = plausible_start(payload);
        } else if !stream.synced {
            stream.synced = plausible_start(payload);
        }
        stream.next_seq = end;

        if !stream.synced {
            self.counters.unsynced_segments += 1;
            return;
        }
        stream.buf.extend_from_slice(payload);
        self.drain(stream, out);
        if cut {
            // The bytes past the capture are gone: whatever message they belonged to is
            // lost, and the next segment may or may not start a message.
            self.counters.cut_segments += 1;
            self.counters.bytes_dropped += stream.buf.len() as u64;
            stream.buf.clear();
            stream.synced = false;
        }
    }

    fn drain(&mut self, stream: &mut Stream, out: &mut Vec<Vec<u8>>) {
        let mut start = 0;
        loop {
            let rest = &stream.buf[start..];
            if rest.len() < 2 {
                break;
            }
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            if len < DNS_HEADER_LEN {
                self.counters.bad_lengths += 1;
                self.counters.bytes_dropped += rest.len() as u64;
                start = stream.buf.len();
                stream.synced = false;
                break;
            }
            if rest.len() < 2 + len {
                break;
            }
            out.push(rest[2..2 + len].to_vec());
            self.counters.messages += 1;
            start += 2 + len;
        }
        stream.buf.drain(..start);
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.by_age.pop_first() {
            if let Some(s) = self.streams.remove(&key) {
                self.buffered -= s.buf.len();
                self.counters.bytes_dropped += s.buf.len() as u64;
            }
            self.counters.streams_evicted_cap += 1;
        }
    }

    /// Drops streams idle for longer than the limit; cost proportional to those dropped.
    pub fn evict_idle(&mut self, now: BootNs) {
        while let Some(&(last_seen, key)) = self.by_age.first() {
            if now.saturating_sub(last_seen) < self.limits.idle_ns {
                break;
            }
            self.by_age.pop_first();
            if let Some(s) = self.streams.remove(&key) {
                self.buffered -= s.buf.len();
                self.counters.bytes_dropped += s.buf.len() as u64;
            }
            self.counters.streams_evicted_idle += 1;
        }
    }

    /// The socket closed: forget its streams.
    pub fn close(&mut self, socket_cookie: u64) {
        for direction in [Direction::Egress, Direction::Ingress] {
            let key = StreamKey {
                socket_cookie,
                direction,
            };
            if let Some(s) = self.streams.remove(&key) {
                self.by_age.remove(&(s.last_seen, key));
                self.buffered -= s.buf.len();
            }
        }
    }
}

/// A length prefix then a DNS header with the QUERY opcode and exactly one question:
/// what a stub resolver or forwarder writes at a message boundary. Only the bytes present
/// are checked, so that a first segment carrying just the prefix still counts.
fn plausible_start(payload: &[u8]) -> bool {
    if payload.len() < 2 {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    let header = &payload[2..];
    let opcode_ok = header.get(2).is_none_or(|b| (b >> 3) & 0x0f == 0);
    let qdcount_ok = match (header.get(4), header.get(5)) {
        (Some(hi), Some(lo)) => u16::from_be_bytes([*hi, *lo]) == 1,
        _ => true,
    };
    len >= DNS_HEADER_LEN && opcode_ok && qdcount_ok
}
