//! TCP active opens, followed from connect(2) to their outcome with tracepoints only.
//!
//! `sys_enter_connect` remembers the address the application asked for (per thread, until
//! `sys_exit_connect`). `inet_sock_set_state` CLOSE -> SYN_SENT runs inside connect(2), in
//! the caller's context: that is the open, tracked by socket address. Later transitions run
//! in softirq context, where the current task is unrelated: they are joined to the open by
//! socket address only, and copy its identity from the tracking map.
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::{map, tracepoint},
    maps::{Array, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use observer_common::{
    CONNECT_FLAG_REQUESTED, CONNECT_OPEN, CONNECT_OUTCOME, ConnectEvent, FAMILY_IPV4, FAMILY_IPV6,
    LossCounter, OUTCOME_ESTABLISHED, OUTCOME_NONE, OUTCOME_REFUSED, OUTCOME_TIMEOUT,
    tracepoints::{
        inet_sock_set_state as state_tp, sys_enter_connect, tcp_receive_reset as rst_tp,
    },
};

use crate::{loss::count, ring::submit_flags};

/// Resized by the agent at load time.
#[map]
static CONNECT_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 19, 0);

/// Address passed to an in-flight connect(2), in a slot chosen by thread id. An array, not
/// a hash: a slot costs an index, where every hash-map insert and delete paid hundreds of
/// nanoseconds on each connect. Each slot names its thread (`pid_tgid`), so two threads
/// sharing a slot never take each other's address: the one overwritten loses only its
/// requested address, never gets a wrong one.
#[map]
static CONNECT_ARGS: Array<Requested> = Array::with_max_entries(CONNECT_ARG_SLOTS, 0);

/// A power of two, far above the connect(2) calls in flight at once on a node.
const CONNECT_ARG_SLOTS: u32 = 16384;

#[inline(always)]
fn arg_slot(pid_tgid: u64) -> u32 {
    (pid_tgid as u32) & (CONNECT_ARG_SLOTS - 1)
}

/// Opens awaiting their outcome, in a slot chosen by socket address (an array for the same
/// reason as [`CONNECT_ARGS`]). Each slot names its socket (`open.sock_id`, 0 when free).
/// An open whose slot holds another live open takes it over: the displaced connect loses
/// its outcome, and that is counted as `connect_track_full`.
#[map]
static CONNECT_TRACK: Array<Tracked> = Array::with_max_entries(CONNECT_TRACK_SLOTS, 0);

/// A power of two, far above the connects awaiting their outcome at once on a node.
const CONNECT_TRACK_SLOTS: u32 = 16384;

/// An open older than this waits for nothing any more (the kernel gives up on a SYN after
/// about two minutes): taking over its slot loses nothing.
const TRACK_STALE_NS: u64 = 300 * 1_000_000_000;

#[inline(always)]
fn track_slot(skaddr: u64) -> u32 {
    // Socket addresses share their low bits (slab alignment): mix, keep the top bits.
    (skaddr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CONNECT_TRACK_SLOTS.trailing_zeros()))
        as u32
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Requested {
    /// Whose address this is; 0 when the slot is free.
    pid_tgid: u64,
    addr: [u8; 16],
    port: u16,
    family: u8,
    _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Tracked {
    open: ConnectEvent,
    reset_seen: u8,
    _pad: [u8; 7],
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const SOCKADDR_IN_LEN: u64 = 16;
const SOCKADDR_IN6_LEN: u64 = 24;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

/// Tracepoint records are plain memory the program may read directly, at the offsets
/// the agent verified against the kernel's format files before attaching.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { ctx.as_ptr().cast::<u8>().add(offset).cast::<T>().read() }
}

#[tracepoint]
pub fn connect_enter(ctx: TracePointContext) -> u32 {
    remember_requested(&ctx);
    0
}

#[inline(always)]
fn remember_requested(ctx: &TracePointContext) {
    let uservaddr: u64 = field(ctx, sys_enter_connect::USERVADDR);
    let addrlen: u64 = field(ctx, sys_enter_connect::ADDRLEN);
    if uservaddr == 0 || addrlen < 2 {
        return;
    }
    // One read of the largest sockaddr the length allows: the family is its first field.
    let raw: [u8; 24] = if addrlen >= SOCKADDR_IN6_LEN {
        match unsafe { bpf_probe_read_user(uservaddr as *const [u8; 24]) } {
            Ok(raw) => raw,
            Err(_) => {
                count(LossCounter::ConnectReadError);
                return;
            }
        }
    } else if addrlen >= SOCKADDR_IN_LEN {
        match unsafe { bpf_probe_read_user(uservaddr as *const [u8; 16]) } {
            Ok(short) => {
                let mut raw = [0u8; 24];
                raw[..16].copy_from_slice(&short);
                raw
            }
            Err(_) => {
                count(LossCounter::ConnectReadError);
                return;
            }
        }
    } else {
        return;
    };
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut requested = Requested {
        pid_tgid,
        addr: [0; 16],
        port: u16::from_be_bytes([raw[2], raw[3]]),
        family: 0,
        _pad: [0; 5],
    };
    match family {
        // sockaddr_in: family, port (big endian), address.
        AF_INET => {
            requested.addr[..4].copy_from_slice(&raw[4..8]);
            requested.family = FAMILY_IPV4;
        }
        // sockaddr_in6: family, port, flowinfo, address.
        AF_INET6 if addrlen >= SOCKADDR_IN6_LEN => {
            requested.addr.copy_from_slice(&raw[8..24]);
            requested.family = FAMILY_IPV6;
        }
        _ => return,
    }
    if let Some(slot) = CONNECT_ARGS.get_ptr_mut(arg_slot(pid_tgid)) {
        unsafe { *slot = requested };
    }
}

#[tracepoint]
pub fn connect_exit(_ctx: TracePointContext) -> u32 {
    // Frees the thread's slot, so that a later connect made by the kernel in this thread's
    // context (no connect(2) of its own) never finds this call's address.
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = CONNECT_ARGS.get_ptr_mut(arg_slot(pid_tgid))
        && unsafe { (*slot).pid_tgid } == pid_tgid
    {
        unsafe { (*slot).pid_tgid = 0 };
    }
    0
}

#[tracepoint]
pub fn sock_set_state(ctx: TracePointContext) -> u32 {
    if field::<u16>(&ctx, state_tp::PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let old: i32 = field(&ctx, state_tp::OLDSTATE);
    let new: i32 = field(&ctx, state_tp::NEWSTATE);
    let skaddr: u64 = field(&ctx, state_tp::SKADDR);
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        open(&ctx, skaddr);
    } else if old == TCP_SYN_SENT || old == TCP_SYN_RECV {
        // SYN_SENT -> SYN_RECV (simultaneous open) keeps waiting.
        if new == TCP_ESTABLISHED || new == TCP_CLOSE {
            outcome(&ctx, skaddr, new == TCP_ESTABLISHED);
        }
    }
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = field(&ctx, rst_tp::SKADDR);
    // Only tracked sockets, i.e. opens still awaiting their outcome, are marked; the
    // CLOSE that follows the reset reports the refusal.
    if let Some(tracked) = CONNECT_TRACK.get_ptr_mut(track_slot(skaddr))
        && unsafe { (*tracked).open.sock_id } == skaddr
    {
        unsafe { (*tracked).reset_seen = 1 };
    }
    0
}

/// A 16-byte tracepoint array, read as two scalars: the verifier only accepts context
/// loads at constant offsets from the context pointer itself, not byte-wise copies.
#[inline(always)]
fn field16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let lo: u64 = field(ctx, offset);
    let hi: u64 = field(ctx, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_ne_bytes());
    out[8..].copy_from_slice(&hi.to_ne_bytes());
    out
}

#[inline(always)]
fn field4(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let v: u32 = field(ctx, offset);
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&v.to_ne_bytes());
    out
}

/// Family, ports and addresses as the tracepoint reports them now.
#[inline(always)]
fn fill_tuple(ctx: &TracePointContext, event: &mut ConnectEvent) -> bool {
    match field::<u16>(ctx, state_tp::FAMILY) {
        AF_INET => {
            event.family = FAMILY_IPV4;
            event.src_addr = field4(ctx, state_tp::SADDR);
            event.dst_addr = field4(ctx, state_tp::DADDR);
        }
        AF_INET6 => {
            event.family = FAMILY_IPV6;
            event.src_addr = field16(ctx, state_tp::SADDR_V6);
            event.dst_addr = field16(ctx, state_tp::DADDR_V6);
        }
        _ => return false,
    }
    // The tracepoint already converted the ports to host order.
    event.src_port = field(ctx, state_tp::SPORT);
    event.dst_port = field(ctx, state_tp::DPORT);
    true
}

#[inline(always)]
fn open(ctx: &TracePointContext, skaddr: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut tracked = Tracked {
        open: ConnectEvent {
            timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
            sock_id: skaddr,
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid_tgid,
            src_addr: [0; 16],
            dst_addr: [0; 16],
            requested_addr: [0; 16],
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            src_port: 0,
            dst_port: 0,
            requested_port: 0,
            family: 0,
            kind: CONNECT_OPEN,
            outcome: OUTCOME_NONE,
            flags: 0,
            _pad: [0; 6],
        },
        reset_seen: 0,
        _pad: [0; 7],
    };
    if !fill_tuple(ctx, &mut tracked.open) {
        return;
    }
    if let Some(requested) = CONNECT_ARGS.get(arg_slot(pid_tgid))
        && requested.pid_tgid == pid_tgid
        && requested.family == tracked.open.family
    {
        tracked.open.requested_addr = requested.addr;
        tracked.open.requested_port = requested.port;
        tracked.open.flags |= CONNECT_FLAG_REQUESTED;
    }
    if let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(skaddr)) {
        let (held, held_since) = unsafe { ((*slot).open.sock_id, (*slot).open.timestamp_ns) };
        if held != 0
            && held != skaddr
            && tracked.open.timestamp_ns.saturating_sub(held_since) < TRACK_STALE_NS
        {
            count(LossCounter::ConnectTrackFull);
            warn!(
                ctx,
                "connect tracking slot taken over: an outcome will be missing"
            );
        }
        unsafe { *slot = tracked };
    }
    if CONNECT_EVENTS
        .output::<ConnectEvent>(
            &tracked.open,
            submit_flags(&CONNECT_EVENTS, size_of::<ConnectEvent>()),
        )
        .is_err()
    {
        count(LossCounter::ConnectRingFull);
    }
}

/// Softirq context possible: everything about the caller comes from the tracked open.
#[inline(always)]
fn outcome(ctx: &TracePointContext, skaddr: u64, established: bool) {
    let Some(tracked) = CONNECT_TRACK.get_ptr_mut(track_slot(skaddr)) else {
        return;
    };
    if unsafe { (*tracked).open.sock_id } != skaddr {
        return;
    }
    let (mut event, reset_seen) = unsafe { ((*tracked).open, (*tracked).reset_seen) };
    unsafe { (*tracked).open.sock_id = 0 };
    event.timestamp_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.kind = CONNECT_OUTCOME;
    event.outcome = if established {
        OUTCOME_ESTABLISHED
    } else if reset_seen != 0 {
        OUTCOME_REFUSED
    } else {
        OUTCOME_TIMEOUT
    };
    // The source port is known by now; keep the open's tuple if the family looks wrong.
    let mut now = event;
    if fill_tuple(ctx, &mut now) {
        event = now;
    }
    if CONNECT_EVENTS
        .output::<ConnectEvent>(
            &event,
            submit_flags(&CONNECT_EVENTS, size_of::<ConnectEvent>()),
        )
        .is_err()
    {
        count(LossCounter::ConnectRingFull);
    }
}
