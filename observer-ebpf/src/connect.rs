//! TCP active opens, followed from connect(2) to their outcome with cgroup programs only.
//!
//! - `connect4`/`connect6` (cgroup sock_addr) run inside connect(2), in the caller's context:
//!   they note who connects (cgroup, process) and the address the application asked for,
//!   straight from the call's own arguments.
//! - `connect_sock_ops` (cgroup sock_ops) runs when the SYN is about to leave: the socket's
//!   tuple is complete, and the open is reported. It then asks for state-change callbacks on
//!   that one socket, until its outcome, which may run in softirq context: everything about
//!   the caller comes from what connect4/6 noted.
//!
//! These hooks run only for TCP sockets and only around connects. The syscall and
//! state-change tracepoints they replace ran for every connect(2) of every protocol and for
//! every state change of every TCP socket, and a syscall tracepoint slows every syscall of
//! the node.
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        bpf_sock_addr, bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, RingBuf},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use observer_common::{
    CONNECT_FLAG_REQUESTED, CONNECT_OPEN, CONNECT_OUTCOME, ConnectEvent, FAMILY_IPV4, FAMILY_IPV6,
    LossCounter, OUTCOME_ESTABLISHED, OUTCOME_NONE, OUTCOME_REFUSED, OUTCOME_TIMEOUT,
};

use crate::{
    loss::count,
    ring::{Ring, submit_flags},
};

/// Resized by the agent at load time.
#[map]
static CONNECT_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 19, 0);

/// Connects from connect(2) to their outcome, in a slot chosen by socket cookie. An array,
/// not a hash: a slot costs an index, where every hash-map insert and delete paid hundreds
/// of nanoseconds on each connect. Each slot names its socket (`open.sock_id`, the socket
/// cookie, never reused while the node runs). An open whose slot holds another live open
/// takes it over: the displaced connect loses its outcome, and that is counted as
/// `connect_track_full`.
#[map]
static CONNECT_TRACK: Array<Tracked> = Array::with_max_entries(CONNECT_TRACK_SLOTS, 0);

/// A power of two, far above the connects awaiting their outcome at once on a node.
const CONNECT_TRACK_SLOTS: u32 = 16384;

/// An open older than this waits for nothing any more (the kernel gives up on a SYN after
/// about two minutes): taking over its slot loses nothing.
const TRACK_STALE_NS: u64 = 300 * 1_000_000_000;

/// Whether an open reported at `since` waits for nothing any more. Only asked when a slot is
/// contended, so the clock is read only then.
#[inline(always)]
fn stale(since: u64) -> bool {
    unsafe { bpf_ktime_get_boot_ns() }.saturating_sub(since) >= TRACK_STALE_NS
}

#[inline(always)]
fn track_slot(cookie: u64) -> u32 {
    // Cookies are consecutive: mix, keep the top bits.
    (cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CONNECT_TRACK_SLOTS.trailing_zeros()))
        as u32
}

/// What a slot holds.
const PHASE_FREE: u8 = 0;
/// connect(2) was called; the SYN may never leave (a failed route lookup, a bad address).
const PHASE_REQUESTED: u8 = 1;
/// The open was reported; its outcome is awaited.
const PHASE_OPEN: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Tracked {
    open: ConnectEvent,
    phase: u8,
    /// The state callbacks were switched on by this program (not already on for another
    /// program's sake), so they are switched off again at the outcome.
    state_cb_ours: u8,
    _pad: [u8; 6],
}

/// sock_addr verdict: let the connect proceed. Observation never refuses a connect.
const ALLOW: i32 = 1;
/// sock_ops verdict: success; the reply field is left to other programs.
const SOCK_OPS_OK: u32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_CLOSE: u32 = 7;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    requested(&ctx, FAMILY_IPV4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    requested(&ctx, FAMILY_IPV6);
    ALLOW
}

/// Notes the caller and the address it asked for, before any other program may rewrite it.
#[inline(always)]
fn requested(ctx: &SockAddrContext, family: u8) {
    let addr: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        return;
    }
    let mut requested_addr = [0u8; 16];
    if family == FAMILY_IPV4 {
        requested_addr[..4].copy_from_slice(&addr.user_ip4.to_ne_bytes());
    } else {
        requested_addr = ip6(&addr.user_ip6);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tracked = Tracked {
        open: ConnectEvent {
            // Set when the open is reported; a clock read here would be thrown away.
            timestamp_ns: 0,
            sock_id: cookie,
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid_tgid: bpf_get_current_pid_tgid(),
            src_addr: [0; 16],
            dst_addr: [0; 16],
            requested_addr,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            src_port: 0,
            dst_port: 0,
            // The context holds the port as it sits in the sockaddr: network order.
            requested_port: u16::from_be(addr.user_port as u16),
            family,
            kind: CONNECT_OPEN,
            outcome: OUTCOME_NONE,
            flags: CONNECT_FLAG_REQUESTED,
            _pad: [0; 6],
        },
        phase: PHASE_REQUESTED,
        state_cb_ours: 0,
        _pad: [0; 6],
    };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return;
    };
    let (phase, held) = unsafe { ((*slot).phase, (*slot).open.sock_id) };
    if phase == PHASE_OPEN && held != cookie && !stale(unsafe { (*slot).open.timestamp_ns }) {
        count(LossCounter::ConnectTrackFull);
        warn!(
            ctx,
            "connect tracking slot taken over: an outcome will be missing"
        );
    }
    unsafe { *slot = tracked };
}

#[sock_ops]
pub fn connect_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    match ops.op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => open(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            // SYN_SENT -> SYN_RECV (simultaneous open) keeps waiting.
            if (old == TCP_SYN_SENT || old == TCP_SYN_RECV)
                && (new == TCP_ESTABLISHED || new == TCP_CLOSE)
            {
                outcome(&ctx, new == TCP_ESTABLISHED);
            }
        }
        _ => {}
    }
    SOCK_OPS_OK
}

/// Family, ports and addresses of the socket as they are now.
#[inline(always)]
fn fill_tuple(ctx: &SockOpsContext, event: &mut ConnectEvent) -> bool {
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    match ops.family {
        AF_INET => {
            event.family = FAMILY_IPV4;
            event.src_addr = [0; 16];
            event.dst_addr = [0; 16];
            event.src_addr[..4].copy_from_slice(&ops.local_ip4.to_ne_bytes());
            event.dst_addr[..4].copy_from_slice(&ops.remote_ip4.to_ne_bytes());
        }
        AF_INET6 => {
            event.family = FAMILY_IPV6;
            event.src_addr = ip6(&ops.local_ip6);
            event.dst_addr = ip6(&ops.remote_ip6);
        }
        _ => return false,
    }
    // local_port is in host order; remote_port is the network-order port in a
    // network-order 32-bit word.
    event.src_port = ops.local_port as u16;
    event.dst_port = u32::from_be(ops.remote_port) as u16;
    true
}

/// An IPv6 address from a context field, in four 4-byte loads: the verifier refuses any
/// other access to these fields, and the compiler would merge plain reads into 8-byte ones.
#[inline(always)]
fn ip6(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        let word = unsafe { read_volatile(&words[i]) };
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// The SYN is about to leave: connect(2) chose the source, the tuple is final.
#[inline(always)]
fn open(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return;
    };
    // Only opens that came through connect(2) (or a fast-open send) are followed: one
    // made by the kernel itself belongs to no application.
    if unsafe { (*slot).open.sock_id != cookie || (*slot).phase != PHASE_REQUESTED } {
        return;
    }
    let mut event = unsafe { (*slot).open };
    let requested_family = event.family;
    if !fill_tuple(ctx, &mut event) {
        return;
    }
    if event.family != requested_family {
        event.flags &= !CONNECT_FLAG_REQUESTED;
    }
    event.timestamp_ns = unsafe { bpf_ktime_get_boot_ns() };
    let flags = ctx.cb_flags();
    let state_cb_ours = flags & BPF_SOCK_OPS_STATE_CB_FLAG == 0
        && ctx
            .set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .is_ok();
    unsafe {
        (*slot).open = event;
        (*slot).phase = PHASE_OPEN;
        (*slot).state_cb_ours = u8::from(state_cb_ours);
    }
    if CONNECT_EVENTS
        .output::<ConnectEvent>(
            &event,
            submit_flags(&CONNECT_EVENTS, Ring::Connect, size_of::<ConnectEvent>()),
        )
        .is_err()
    {
        count(LossCounter::ConnectRingFull);
    }
}

/// Softirq context possible: everything about the caller comes from the tracked open.
#[inline(always)]
fn outcome(ctx: &SockOpsContext, established: bool) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return;
    };
    if unsafe { (*slot).open.sock_id != cookie || (*slot).phase != PHASE_OPEN } {
        return;
    }
    let (mut event, state_cb_ours) = unsafe { ((*slot).open, (*slot).state_cb_ours) };
    unsafe { (*slot).phase = PHASE_FREE };
    if state_cb_ours != 0 {
        // Later state changes of this socket are of no interest: stop paying for them.
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    event.timestamp_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.kind = CONNECT_OUTCOME;
    event.outcome = if established {
        OUTCOME_ESTABLISHED
    } else if unsafe { (*ctx.ops).segs_in } != 0 {
        // A SYN_SENT socket closed by a segment from the peer: its reset.
        OUTCOME_REFUSED
    } else {
        // Closed with nothing received: the SYN went unanswered (or an ICMP error).
        OUTCOME_TIMEOUT
    };
    if CONNECT_EVENTS
        .output::<ConnectEvent>(
            &event,
            submit_flags(&CONNECT_EVENTS, Ring::Connect, size_of::<ConnectEvent>()),
        )
        .is_err()
    {
        count(LossCounter::ConnectRingFull);
    }
}
