//! Every packet of every socket, at the cgroup2 root, with skb data starting at the IP
//! header. Two kinds matter, and everything else leaves after a few header reads:
//! - DNS-port packets, copied out whole (`dns`);
//! - the handshake segments of a TCP active open: the SYN that leaves, the SYN-ACK or reset
//!   that answers it (`connect`). These programs run for those packets anyway, so following
//!   the handshake here costs no program run of its own.
use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
};

use aya_ebpf::{
    bindings::__sk_buff, helpers::generated::bpf_skb_load_bytes, macros::cgroup_skb,
    programs::SkBuffContext,
};
use observer_common::{Direction, Family, Protocol};

use crate::{connect, dns};

/// cgroup_skb verdict: let the packet through. Observation never drops traffic.
const PASS: i32 = 1;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXTENSIONS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// The transport protocol bytes of the IP headers that can carry DNS.
const TCP: u8 = Protocol::Tcp as u8;
const UDP: u8 = Protocol::Udp as u8;

/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: u32 = 13;

#[cgroup_skb(ingress)]
pub fn packet_ingress(ctx: SkBuffContext) -> i32 {
    observe(ctx.skb.skb, Direction::Ingress);
    PASS
}

#[cgroup_skb(egress)]
pub fn packet_egress(ctx: SkBuffContext) -> i32 {
    observe(ctx.skb.skb, Direction::Egress);
    PASS
}

#[inline(always)]
pub fn load<T>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
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

/// Reads packet bytes directly when they sit in the linear part of the skb (the usual case
/// for headers), through the helper otherwise.
#[inline(always)]
pub fn read<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let data = unsafe { (*skb).data } as usize;
    let end = unsafe { (*skb).data_end } as usize;
    let at = data + offset as usize;
    if at + size_of::<T>() <= end {
        Some(unsafe { (at as *const T).read_unaligned() })
    } else {
        load(skb, offset)
    }
}

/// What the header walk learnt of a packet.
pub struct Packet {
    pub direction: Direction,
    pub family: Family,
    /// [`Protocol`] as a byte: the fast path compares it with header bytes.
    pub protocol: u8,
    pub l4_offset: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// The fast path: decide with as few reads as possible what this packet is.
#[inline(always)]
fn observe(skb: *mut __sk_buff, direction: Direction) {
    // Enough for the IPv4 protocol byte and the IPv6 next header.
    let Some(head) = read::<[u8; 12]>(skb, 0) else {
        return;
    };
    let (family, protocol, l4_offset) = match head[0] >> 4 {
        4 => {
            let fragment_offset = u16::from_be_bytes([head[6], head[7]]) & 0x1fff;
            let protocol = head[9];
            // Later fragments carry no transport header.
            if fragment_offset != 0 || (protocol != UDP && protocol != TCP) {
                return;
            }
            (Family::Ipv4, protocol, u32::from(head[0] & 0x0f) * 4)
        }
        6 => {
            let next = head[6];
            if next == UDP || next == TCP {
                (Family::Ipv6, next, 40)
            } else {
                match skip_ipv6_extensions(skb, next) {
                    Some((protocol, offset)) => (Family::Ipv6, protocol, offset),
                    None => return,
                }
            }
        }
        _ => return,
    };
    // A TCP header is read through its flags in the same read as the ports.
    let ports = if protocol == TCP {
        let Some(tcp) = read::<[u8; TCP_FLAGS_OFFSET as usize + 1]>(skb, l4_offset) else {
            return;
        };
        connect::handshake(skb, direction, tcp[TCP_FLAGS_OFFSET as usize]);
        [tcp[0], tcp[1], tcp[2], tcp[3]]
    } else {
        let Some(ports) = read::<[u8; 4]>(skb, l4_offset) else {
            return;
        };
        ports
    };
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    if !dns::is_dns_port(src_port) && !dns::is_dns_port(dst_port) {
        return;
    }
    dns::capture(
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
            UDP | TCP => return Some((next, offset)),
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
    (next == UDP || next == TCP).then_some((next, offset))
}
