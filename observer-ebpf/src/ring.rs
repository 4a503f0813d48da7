//! Wakeup policy shared by the rings.
//!
//! Waking the reader costs an irq_work (a self-IPI, microseconds under virtualisation) per
//! event whenever the reader keeps up. Instead, records are submitted silently and the agent
//! polls on a short timer; the reader is woken early only when the backlog crosses an eighth
//! of the ring, so a burst is drained long before the ring fills. Waking on the crossing
//! alone (not on every record above it) keeps a sustained burst from paying per record.
//!
//! The threshold is a global the agent sets when it sizes the ring: asking the ring for its
//! size would cost a helper call per event.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::RingBuf,
};

/// Ring record header the kernel adds to each record.
const RECORD_HEADER: u64 = 8;

/// An eighth of each ring's size, in bytes; set by the agent at load time.
#[unsafe(no_mangle)]
static DNS_RING_WAKE_BYTES: u64 = (1 << 21) / 8;
#[unsafe(no_mangle)]
static CONNECT_RING_WAKE_BYTES: u64 = (1 << 19) / 8;

/// Which ring a record goes to, for its wakeup threshold.
#[derive(Clone, Copy)]
pub enum Ring {
    Dns,
    Connect,
}

/// Flags for submitting a record of `record_len` bytes that is already reserved.
#[inline(always)]
pub fn submit_flags(ring: &RingBuf, which: Ring, record_len: usize) -> u64 {
    let pending = ring.query(u64::from(BPF_RB_AVAIL_DATA));
    let threshold = unsafe {
        match which {
            Ring::Dns => read_volatile(&DNS_RING_WAKE_BYTES),
            Ring::Connect => read_volatile(&CONNECT_RING_WAKE_BYTES),
        }
    };
    // Two records wide: another CPU's reservation may land between ours and the query.
    let window = 2 * (record_len as u64 + RECORD_HEADER);
    if pending >= threshold && pending < threshold + window {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}
