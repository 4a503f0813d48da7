//! DNS capture: DNS-port UDP datagrams and TCP segments, found by `packet`, copied whole
//! into the `DNS_EVENTS` ring.
use core::{
    ffi::c_void,
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes,
    },
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use observer_common::{
    DNS_EVENT_HEADER_LEN, DNS_FLAG_TRUNCATED, DNS_PAYLOAD_MAX, DNS_PORT_SLOTS, Direction, DnsEvent,
    Family, LossCounter, Protocol,
};

use crate::{
    loss::count,
    mem::put_ipv4,
    packet::{Packet, load, read},
    ring::{Ring, first_dns_from, submit_flags_waking},
};

/// Resized by the agent at load time.
#[map]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Where a record is assembled before it is copied to the ring at its real length: the
/// ring cannot reserve a length that is known only at run time.
#[map]
static DNS_SCRATCH: PerCpuArray<DnsEvent> = PerCpuArray::with_max_entries(1, 0);

/// One byte per port: non-zero means "DNS is spoken on this port". Filled by the agent.
#[map]
static DNS_PORTS: Array<u8> = Array::with_max_entries(DNS_PORT_SLOTS, 0);

const PAYLOAD_MAX: u32 = DNS_PAYLOAD_MAX as u32;
// The length mask below relies on it.
const _: () = assert!(PAYLOAD_MAX.is_power_of_two());

/// The lowest and highest DNS port, set by the agent at load time. Read-only data, so the
/// verifier knows them as constants: the ports of most packets fall outside the range and
/// never reach the map.
#[unsafe(no_mangle)]
static DNS_PORT_MIN: u16 = 0;
#[unsafe(no_mangle)]
static DNS_PORT_MAX: u16 = u16::MAX;

/// Non-zero: the server's side of a UDP exchange (a query received, a response sent) is
/// counted in `DNS_SERVER_SIDE` and never crosses the ring. A node's DNS server (CoreDNS, a
/// node-local cache) sees every lookup of the node reversed; the agent only reads the
/// client's side, so copying the server's would double the ring traffic for nothing.
/// Read-only data, set by the agent at load time.
#[unsafe(no_mangle)]
static DNS_SKIP_SERVER_SIDE: u8 = 0;

/// Per-CPU count of the UDP messages skipped as the server's side.
#[map]
static DNS_SERVER_SIDE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Offset of the flags byte holding QR in the DNS header.
const DNS_FLAGS_OFFSET: u32 = 2;
/// A DNS header's length: anything shorter goes to the agent, which reports it malformed.
const DNS_HEADER_LEN: u32 = 12;

#[inline(always)]
pub fn is_dns_port(port: u16) -> bool {
    let (min, max) = unsafe { (read_volatile(&DNS_PORT_MIN), read_volatile(&DNS_PORT_MAX)) };
    port >= min
        && port <= max
        && DNS_PORTS
            .get(u32::from(port))
            .is_some_and(|slot| *slot != 0)
}

/// A query arriving or a response leaving: the server's socket. Read from the header's QR
/// bit; a header that cannot be read is left to the agent.
#[inline(always)]
fn is_server_side(skb: *mut __sk_buff, direction: Direction, payload_offset: u32) -> bool {
    // Through the helper: the verifier cannot bound a direct read at this variable offset.
    let Some(flags) = load::<u8>(skb, payload_offset + DNS_FLAGS_OFFSET) else {
        return false;
    };
    let is_response = flags & 0x80 != 0;
    match direction {
        Direction::Ingress => !is_response,
        Direction::Egress => is_response,
    }
}

/// The slow path, for DNS-port packets only.
#[inline(always)]
pub fn capture(skb: *mut __sk_buff, packet: Packet) {
    let skb_len = unsafe { (*skb).len };
    let (header_len, tcp_seq) = if packet.protocol == Protocol::Tcp as u8 {
        let Some(tcp) = read::<[u8; 13]>(skb, packet.l4_offset) else {
            count(LossCounter::DnsReadError);
            return;
        };
        (
            u32::from(tcp[12] >> 4) * 4,
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        )
    } else {
        (8, 0)
    };
    let payload_offset = packet.l4_offset + header_len;
    // Handshakes and bare ACKs carry nothing to parse.
    if skb_len <= payload_offset {
        return;
    }
    let payload_len = skb_len - payload_offset;
    if packet.protocol == Protocol::Udp as u8
        && payload_len >= DNS_HEADER_LEN
        && unsafe { read_volatile(&DNS_SKIP_SERVER_SIDE) } != 0
        && is_server_side(skb, packet.direction, payload_offset)
    {
        if let Some(slot) = DNS_SERVER_SIDE.get_ptr_mut(0) {
            // Per-CPU slot: no other program instance writes it concurrently.
            unsafe { *slot += 1 };
        }
        return;
    }
    let cut = payload_len > PAYLOAD_MAX;
    let captured_len = if cut { PAYLOAD_MAX } else { payload_len };

    let Some(event) = DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let addresses_read = unsafe {
        if packet.family == Family::Ipv4 {
            match read::<[u32; 2]>(skb, 12) {
                Some([src, dst]) => {
                    put_ipv4(addr_of_mut!((*event).src_addr), src);
                    put_ipv4(addr_of_mut!((*event).dst_addr), dst);
                    true
                }
                None => false,
            }
        } else {
            // src_addr and dst_addr are adjacent, as in the IPv6 header.
            bpf_skb_load_bytes(
                skb as *const c_void,
                8,
                addr_of_mut!((*event).src_addr).cast(),
                32,
            ) == 0
        }
    };
    if !addresses_read {
        count(LossCounter::DnsReadError);
        return;
    }

    // The verifier must see a length in [1, PAYLOAD_MAX]. LLVM would fold any re-check of
    // `captured_len` into the comparisons above and lose the bound on the register passed
    // to the helper, so read it back through memory and mask: identity for 1..=PAYLOAD_MAX.
    let laundered = unsafe { read_volatile(&captured_len) };
    let read_len = (laundered.wrapping_sub(1) & (PAYLOAD_MAX - 1)) + 1;
    let payload_read = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            payload_offset,
            addr_of_mut!((*event).payload).cast(),
            read_len,
        )
    };
    if payload_read != 0 {
        count(LossCounter::DnsReadError);
        return;
    }
    if cut {
        count(LossCounter::DnsCaptureCut);
    }

    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    // The sender of an outgoing message runs now; the agent learns of a new cgroup at once
    // so that it can read the cgroup's resolv.conf through it (see `first_dns_from`).
    let wake_now = packet.direction == Direction::Egress && first_dns_from(cgroup_id);
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = cgroup_id;
        (*event).socket_cookie = bpf_get_socket_cookie(skb.cast());
        (*event).tcp_seq = tcp_seq;
        (*event).payload_len = payload_len;
        (*event).captured_len = captured_len;
        (*event).src_port = packet.src_port;
        (*event).dst_port = packet.dst_port;
        (*event).family = packet.family as u8;
        (*event).protocol = packet.protocol;
        (*event).direction = packet.direction as u8;
        (*event).flags = if cut { DNS_FLAG_TRUNCATED } else { 0 };
        (*event)._pad = [0; 4];
    }
    // `read_len` is the verifier-bounded twin of `captured_len`: the record ends there.
    let record_len = DNS_EVENT_HEADER_LEN + read_len as usize;
    // SAFETY: `event` points to a whole DnsEvent in the scratch map, and record_len is at
    // most its size.
    let record = unsafe { core::slice::from_raw_parts(event.cast::<u8>(), record_len) };
    if DNS_EVENTS
        .output::<[u8]>(record, submit_flags_waking(Ring::Dns, record_len, wake_now))
        .is_err()
    {
        count(LossCounter::DnsRingFull);
    }
}
