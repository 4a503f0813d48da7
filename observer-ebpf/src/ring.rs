//! Wakeup policy shared by the rings.
//!
//! Waking the reader costs an irq_work (a self-IPI, microseconds under virtualisation) per
//! event whenever the reader keeps up. Instead, records are submitted silently and the agent
//! polls on a short timer; the reader is woken early only once a CPU has submitted its share
//! of an eighth of the ring since it last woke it. However the CPUs share a burst, the ring
//! holds at most an eighth of its size before some CPU wakes the reader, long before it
//! fills; a steady stream pays one wakeup per share, not one per record.
//!
//! The count is kept per CPU in a map whose lookup the kernel inlines: asking the ring for
//! its backlog instead would cost a helper call per record, and helper calls are dear.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::PerCpuArray,
};

/// Ring record header the kernel adds to each record.
const RECORD_HEADER: u64 = 8;

/// Each CPU's share of an eighth of each ring, in bytes; set by the agent at load time.
#[unsafe(no_mangle)]
static DNS_RING_WAKE_BYTES: u64 = (1 << 21) / 8;
#[unsafe(no_mangle)]
static CONNECT_RING_WAKE_BYTES: u64 = (1 << 21) / 8;

/// Bytes this CPU submitted to each ring (indexed by `Ring`) since it last woke the reader.
#[map]
static RING_UNWOKEN_BYTES: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Slots of each CPU's memory of the cgroups it recently sent DNS from (a power of two):
/// well above the pods of a node (110 by default), so that pods querying in turn rarely
/// share a slot, which would wake the reader on each of their queries.
const RECENT_CGROUP_SLOTS: u32 = 1024;

/// Per CPU, the cgroup id last seen in each slot (slot: the id's low bits).
#[map]
static RECENT_DNS_CGROUPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RECENT_CGROUP_SLOTS, 0);

/// Whether this CPU has not sent DNS from `cgroup_id` lately (and remembers it now). The
/// agent reads a new cgroup's identity, its pod's resolv.conf included, through processes
/// that still run: a one-shot process (one lookup, one connect, exit) is gone well within
/// the poll interval, so the first query of a cgroup wakes the reader at once. A pod that
/// keeps querying finds its slot set and pays nothing more; an array lookup is inlined.
#[inline(always)]
pub fn first_dns_from(cgroup_id: u64) -> bool {
    let slot = (cgroup_id as u32) & (RECENT_CGROUP_SLOTS - 1);
    let Some(seen) = RECENT_DNS_CGROUPS.get_ptr_mut(slot) else {
        return false;
    };
    // Per-CPU slot: no other program instance writes it concurrently.
    unsafe {
        if *seen == cgroup_id {
            false
        } else {
            *seen = cgroup_id;
            true
        }
    }
}

/// Which ring a record goes to, for its wakeup threshold.
#[derive(Clone, Copy)]
pub enum Ring {
    Dns = 0,
    Connect = 1,
}

/// Flags for submitting a record of `record_len` bytes to `which`.
#[inline(always)]
pub fn submit_flags(which: Ring, record_len: usize) -> u64 {
    submit_flags_waking(which, record_len, false)
}

/// As [`submit_flags`]; `wake_now` wakes the reader whatever the backlog.
#[inline(always)]
pub fn submit_flags_waking(which: Ring, record_len: usize, wake_now: bool) -> u64 {
    let Some(unwoken) = RING_UNWOKEN_BYTES.get_ptr_mut(which as u32) else {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    };
    let share = unsafe {
        match which {
            Ring::Dns => read_volatile(&DNS_RING_WAKE_BYTES),
            Ring::Connect => read_volatile(&CONNECT_RING_WAKE_BYTES),
        }
    };
    // Per-CPU slot: no other program instance writes it concurrently.
    let total = unsafe { *unwoken } + record_len as u64 + RECORD_HEADER;
    if wake_now || total >= share {
        unsafe { *unwoken = 0 };
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        unsafe { *unwoken = total };
        u64::from(BPF_RB_NO_WAKEUP)
    }
}
