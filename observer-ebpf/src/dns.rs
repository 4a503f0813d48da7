//! DNS capture on the cgroup2 root: every socket's packets pass through here, with skb data
//! starting at the IP header.
use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, map},
    maps::{Array, PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use observer_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DNS_EVENT_HEADER_LEN, DNS_FLAG_TRUNCATED, DNS_PAYLOAD_MAX,
    DNS_PORT_SLOTS, DnsEvent, FAMILY_IPV4, FAMILY_IPV6, LossCounter, PROTO_TCP, PROTO_UDP,
};

use crate::{
    loss::count,
    ring::{Ring, submit_flags},
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

/// cgroup_skb verdict: let the packet through. Observation never drops traffic.
const PASS: i32 = 1;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXTENSIONS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

const PAYLOAD_MAX: u32 = DNS_PAYLOAD_MAX as u32;
// The length mask below relies on it.
const _: () = assert!(PAYLOAD_MAX.is_power_of_two());

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    observe(ctx.skb.skb, DIRECTION_INGRESS);
    PASS
}

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    observe(ctx.skb.skb, DIRECTION_EGRESS);
    PASS
}

#[inline(always)]
fn load<T>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let mut value = MaybeUninit::<T>::uninit();
    let ret = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            offset,
            value.as_mut_ptr().cast(),
            size_of::<T>() as u32,
        )
    };
    (ret == 0).then(|| unsafe { value.assume_init() })
}

/// The lowest and highest DNS port, set by the agent at load time. Read-only data, so the
/// verifier knows them as constants: the ports of most packets fall outside the range and
/// never reach the map.
#[unsafe(no_mangle)]
static DNS_PORT_MIN: u16 = 0;
#[unsafe(no_mangle)]
static DNS_PORT_MAX: u16 = u16::MAX;

#[inline(always)]
fn is_dns_port(port: u16) -> bool {
    let (min, max) = unsafe { (read_volatile(&DNS_PORT_MIN), read_volatile(&DNS_PORT_MAX)) };
    port >= min
        && port <= max
        && DNS_PORTS
            .get(u32::from(port))
            .is_some_and(|slot| *slot != 0)
}

/// Reads packet bytes directly when they sit in the linear part of the skb (the usual case
/// for headers), through the helper otherwise.
#[inline(always)]
fn read<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let data = unsafe { (*skb).data } as usize;
    let end = unsafe { (*skb).data_end } as usize;
    let at = data + offset as usize;
    if at + size_of::<T>() <= end {
        Some(unsafe { (at as *const T).read_unaligned() })
    } else {
        load(skb, offset)
    }
}

/// The fast path: decide with as few reads as possible whether this is a DNS packet.
#[inline(always)]
fn observe(skb: *mut __sk_buff, direction: u8) {
    // Enough for the IPv4 protocol byte and the IPv6 next header.
    let Some(head) = read::<[u8; 12]>(skb, 0) else {
        return;
    };
    let (family, protocol, l4_offset) = match head[0] >> 4 {
        4 => {
            let fragment_offset = u16::from_be_bytes([head[6], head[7]]) & 0x1fff;
            let protocol = head[9];
            // Later fragments carry no transport header.
            if fragment_offset != 0 || (protocol != PROTO_UDP && protocol != PROTO_TCP) {
                return;
            }
            (FAMILY_IPV4, protocol, u32::from(head[0] & 0x0f) * 4)
        }
        6 => {
            let next = head[6];
            if next == PROTO_UDP || next == PROTO_TCP {
                (FAMILY_IPV6, next, 40)
            } else {
                match skip_ipv6_extensions(skb, next) {
                    Some((protocol, offset)) => (FAMILY_IPV6, protocol, offset),
                    None => return,
                }
            }
        }
        _ => return,
    };
    let Some(ports) = read::<[u8; 4]>(skb, l4_offset) else {
        return;
    };
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    if !is_dns_port(src_port) && !is_dns_port(dst_port) {
        return;
    }
    capture(
        skb,
        Packet {
            direction,
            family,
            protocol,
            l4_offset,
            src_port,
            dst_port,
        },
    );
}

#[inline(always)]
fn skip_ipv6_extensions(skb: *mut __sk_buff, first: u8) -> Option<(u8, u32)> {
    let mut next = first;
    let mut offset = 40u32;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            PROTO_UDP | PROTO_TCP => return Some((next, offset)),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext = read::<[u8; 2]>(skb, offset)?;
                next = ext[0];
                offset += (u32::from(ext[1]) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let ext = read::<[u8; 4]>(skb, offset)?;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = ext[0];
                offset += 8;
            }
            IPV6_AUTH => {
                let ext = read::<[u8; 2]>(skb, offset)?;
                next = ext[0];
                offset += (u32::from(ext[1]) + 2) * 4;
            }
            _ => return None,
        }
    }
    (next == PROTO_UDP || next == PROTO_TCP).then_some((next, offset))
}

struct Packet {
    direction: u8,
    family: u8,
    protocol: u8,
    l4_offset: u32,
    src_port: u16,
    dst_port: u16,
}

/// The slow path, for DNS-port packets only.
#[inline(always)]
fn capture(skb: *mut __sk_buff, packet: Packet) {
    let skb_len = unsafe { (*skb).len };
    let (header_len, tcp_seq) = if packet.protocol == PROTO_TCP {
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
    let cut = payload_len > PAYLOAD_MAX;
    let captured_len = if cut { PAYLOAD_MAX } else { payload_len };

    let Some(event) = DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let addresses_read = unsafe {
        if packet.family == FAMILY_IPV4 {
            match read::<[u8; 8]>(skb, 12) {
                Some(a) => {
                    let mut src = [0u8; 16];
                    let mut dst = [0u8; 16];
                    src[..4].copy_from_slice(&a[..4]);
                    dst[..4].copy_from_slice(&a[4..]);
                    (*event).src_addr = src;
                    (*event).dst_addr = dst;
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

    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = bpf_skb_cgroup_id(skb);
        (*event).socket_cookie = bpf_get_socket_cookie(skb.cast());
        (*event).tcp_seq = tcp_seq;
        (*event).payload_len = payload_len;
        (*event).captured_len = captured_len;
        (*event).src_port = packet.src_port;
        (*event).dst_port = packet.dst_port;
        (*event).family = packet.family;
        (*event).protocol = packet.protocol;
        (*event).direction = packet.direction;
        (*event).flags = if cut { DNS_FLAG_TRUNCATED } else { 0 };
        (*event)._pad = [0; 4];
    }
    // `read_len` is the verifier-bounded twin of `captured_len`: the record ends there.
    let record_len = DNS_EVENT_HEADER_LEN + read_len as usize;
    // SAFETY: `event` points to a whole DnsEvent in the scratch map, and record_len is at
    // most its size.
    let record = unsafe { core::slice::from_raw_parts(event.cast::<u8>(), record_len) };
    if DNS_EVENTS
        .output::<[u8]>(record, submit_flags(&DNS_EVENTS, Ring::Dns, record_len))
        .is_err()
    {
        count(LossCounter::DnsRingFull);
    }
}
