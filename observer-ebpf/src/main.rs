//! observer's kernel programs.
//!
//! - `packet`: cgroup_skb ingress/egress on the cgroup2 root, where every packet is sorted:
//!   DNS-port packets go to `dns`, TCP handshake segments to `connect`.
//! - `dns`: copies DNS-port UDP datagrams and TCP segments into the `DNS_EVENTS` ring.
//! - `connect`: cgroup connect4/connect6 and sock_release programs, with the handshake
//!   segments, follow each TCP active open from connect(2) to its outcome and report both
//!   into the `CONNECT_EVENTS` ring.
//! - `baseline`: empty programs on the same hooks, for the cost benchmark only.
//!
//! Every program fails open: packets always pass, and whatever cannot be delivered is
//! counted in `LOSS_COUNTERS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod baseline;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod loss;
#[cfg(target_arch = "bpf")]
mod mem;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod ring;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Any reachable panic fails verification; this handler only satisfies the linker.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
