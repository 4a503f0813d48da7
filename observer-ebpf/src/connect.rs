//! TCP active opens, followed from connect(2) to their outcome with cgroup programs only.
//!
//! - `connect4`/`connect6` (cgroup sock_addr) run inside connect(2), in the caller's context:
//!   they note who connects (cgroup, process) and the address the application asked for,
//!   straight from the call's own arguments.
//! - The packet programs (`packet`) see the handshake: the SYN leaving a socket in SYN_SENT
//!   completes the open in its slot (its tuple is final by then), and the SYN-ACK or reset
//!   that answers it reports open and outcome in one ring record. Those programs run for
//!   every packet anyway; a segment that is not a handshake segment costs them a compare of
//!   its flags, read with its ports.
//! - `connect_release` (cgroup sock_release) runs when a socket is closed: a TCP socket
//!   closed before any answer came (the application gave up, the kernel gave up on its SYNs,
//!   an ICMP error) reports the outcome `timeout`.
//!
//! A connect still waiting for its answer is seen by the agent in its slot: the agent maps
//! `CONNECT_TRACK` read-only and reads the open slots every 100 ms. So a connect that hangs
//! is seen while it hangs, and one that ends quickly costs one ring record, not two.
//!
//! The outcome may be seen in softirq context: everything about the caller comes from what
//! connect4/6 noted. A program run costs about 60 ns here before it does anything, and
//! every helper call is dear (see the book's performance page): this design runs one program
//! of its own per connect(2) and one per socket closed, where per-socket `sock_ops`
//! callbacks ran ten times for a loopback connect, and syscall and state-change tracepoints
//! ran for every connect(2) of every protocol and every state change of every TCP socket.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MMAPABLE, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, RingBuf},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use observer_common::{
    CONNECT_FLAG_REQUESTED, CONNECT_TRACK_SLOTS, ConnectEvent, ConnectKind, ConnectOutcome,
    ConnectSlot, Direction, Family, LossCounter, Protocol, SLOT_FREE, SLOT_OPEN, SLOT_REQUESTED,
};

use crate::{
    loss::count,
    mem::{put_ipv4, put_ipv6, zero16},
    ring::{Ring, submit_flags},
};

/// Resized by the agent at load time.
#[map]
static CONNECT_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Connects from connect(2) to their outcome, in a slot chosen by socket cookie. An array,
/// not a hash: a slot costs an index, where every hash-map insert and delete paid hundreds
/// of nanoseconds on each connect. Each slot names its socket (`event.sock_id`, the socket
/// cookie, never reused while the node runs). An open whose slot holds another live open
/// takes it over: the displaced open is reported on the ring as it stands, its outcome
/// will be missing, and that is counted as `connect_track_full`. Mappable: the agent reads
/// the opens still waiting straight from it.
#[map]
static CONNECT_TRACK: Array<ConnectSlot> =
    Array::with_max_entries(CONNECT_TRACK_SLOTS, BPF_F_MMAPABLE);

/// An open older than this waits for nothing any more (the kernel gives up on a SYN after
/// about two minutes): taking over its slot loses nothing.
const TRACK_STALE_NS: u64 = 300 * 1_000_000_000;

/// Whether an open reported at `since` waits for nothing any more. Only asked when a slot is
/// contended, so the clock is read only then.
#[inline(always)]
fn stale(since: u64) -> bool {
    unsafe { bpf_ktime_get_boot_ns() }.saturating_sub(since) >= TRACK_STALE_NS
}

/// A connect's slot: a page of slots chosen by hashing the cookie's high bits, the slot in
/// the page by its low bits. The kernel hands out cookies in per-CPU batches
/// (`gen_cookie_next`), so the next connects of one CPU take the next slots of the page it
/// touched a moment ago. A slot hashed from the whole cookie landed at random in the 2 MiB
/// array: a cache miss and often a TLB miss on every connect (`connect4` ~440 against
/// ~300 ns here). Pages, not whole batches, are hashed: the ranges of two CPUs' batches
/// would overlap half the time and stay in step for thousands of connects, and an open
/// waiting in one would lose its slot to the other (`connect_track_full`); two CPUs rarely
/// share a page at once.
#[inline(always)]
fn track_slot(cookie: u64) -> u32 {
    let page = ((cookie >> SLOTS_PER_PAGE_BITS).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32;
    ((page << SLOTS_PER_PAGE_BITS) | (cookie as u32 & ((1 << SLOTS_PER_PAGE_BITS) - 1)))
        & (CONNECT_TRACK_SLOTS - 1)
}

/// log2 of the slots in a 4 KiB page (`ConnectSlot` is 128 bytes).
const SLOTS_PER_PAGE_BITS: u32 = 5;

/// sock_addr verdict: let the connect proceed. Observation never refuses a connect.
const ALLOW: i32 = 1;
/// cgroup sock verdict: carry on.
const SOCK_OK: i32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = Protocol::Tcp as u32;

const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

/// TCP header flags.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    requested(&ctx, Family::Ipv4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    requested(&ctx, Family::Ipv6);
    ALLOW
}

/// Notes the caller and the address it asked for, before any other program may rewrite it.
/// Written field by field into the slot: a record built on the stack and copied would cost
/// byte-wise memset and memcpy calls (see `mem`).
#[inline(always)]
fn requested(ctx: &SockAddrContext, family: Family) {
    let addr: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return;
    };
    let (phase, held) = unsafe { ((*slot).phase, (*slot).event.sock_id) };
    if phase == SLOT_OPEN {
        // Never on the ring yet: report the open as it stands before its slot is reused.
        // Freed first, as in `answered`: an agent reading the slot meanwhile drops its copy.
        unsafe { write_volatile(addr_of_mut!((*slot).phase), SLOT_FREE) };
        report(unsafe { addr_of_mut!((*slot).event) });
        if held != cookie && !stale(unsafe { (*slot).event.timestamp_ns }) {
            count(LossCounter::ConnectTrackFull);
            warn!(
                ctx,
                "connect tracking slot taken over: an outcome will be missing"
            );
        }
    }
    unsafe {
        let open = addr_of_mut!((*slot).event);
        // Set when the SYN leaves; a clock read here would be thrown away.
        (*open).timestamp_ns = 0;
        (*open).ended_ns = 0;
        (*open).sock_id = cookie;
        (*open).cgroup_id = bpf_get_current_cgroup_id();
        (*open).pid_tgid = bpf_get_current_pid_tgid();
        zero16(addr_of_mut!((*open).src_addr));
        zero16(addr_of_mut!((*open).dst_addr));
        if family == Family::Ipv4 {
            put_ipv4(addr_of_mut!((*open).requested_addr), addr.user_ip4);
        } else {
            put_ipv6(addr_of_mut!((*open).requested_addr), ip6(&addr.user_ip6));
        }
        if bpf_get_current_comm(addr_of_mut!((*open).comm).cast(), 16) != 0 {
            zero16(addr_of_mut!((*open).comm));
        }
        (*open).src_port = 0;
        (*open).dst_port = 0;
        // The context holds the port as it sits in the sockaddr: network order.
        (*open).requested_port = u16::from_be(addr.user_port as u16);
        (*open).family = family as u8;
        (*open).kind = ConnectKind::Open as u8;
        (*open).outcome = ConnectOutcome::None as u8;
        (*open).flags = CONNECT_FLAG_REQUESTED;
        (*slot).phase = SLOT_REQUESTED;
    }
}

/// What a handshake segment says of the open it belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The SYN leaves: the open is complete.
    Syn,
    /// The answer arrives: the outcome is reported.
    Answer(ConnectOutcome),
}

/// Called by the packet programs for every TCP segment. Anything but the SYN of an active
/// open, or the SYN-ACK or reset answering it, returns after a few compares: the flags
/// first, the socket's state only for the handful of segments that carry SYN or RST.
#[inline(always)]
pub fn handshake(skb: *mut __sk_buff, direction: Direction, flags: u8) {
    let step = if direction == Direction::Egress {
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return;
        }
        Step::Syn
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        Step::Answer(ConnectOutcome::Established)
    } else if flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK {
        // In SYN_SENT the kernel heeds only a reset that acknowledges the SYN.
        Step::Answer(ConnectOutcome::Refused)
    } else {
        return;
    };
    // The packet's socket: cgroup programs run only for full sockets.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // Only an active open waiting for its answer: a SYN-ACK or reset reaching a socket in
    // any other state answers nothing followed here. A retransmitted SYN passes this test
    // and finds its open already complete (`opened`).
    if unsafe { read_volatile(&(*sk).state) } != TCP_SYN_SENT {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return;
    };
    match step {
        Step::Syn => opened(slot, cookie, sk),
        Step::Answer(outcome) => answered(slot, cookie, outcome),
    }
}

/// The SYN left: connect(2) chose the source, the tuple is final. The open stays in its
/// slot, where the agent sees it until its outcome reports both.
#[inline(always)]
fn opened(slot: *mut ConnectSlot, cookie: u64, sk: *mut bpf_sock) {
    // Only opens that came through connect(2) (or a fast-open send) are followed, and only
    // their first SYN: one made by the kernel itself belongs to no application.
    if unsafe { (*slot).event.sock_id != cookie || (*slot).phase != SLOT_REQUESTED } {
        return;
    }
    let open = unsafe { addr_of_mut!((*slot).event) };
    let requested_family = unsafe { (*open).family };
    if !fill_tuple(sk, open) {
        return;
    }
    unsafe {
        if (*open).family != requested_family {
            (*open).flags &= !CONNECT_FLAG_REQUESTED;
        }
        (*open).timestamp_ns = bpf_ktime_get_boot_ns();
        // Last: the agent reads a slot only once it says open.
        write_volatile(addr_of_mut!((*slot).phase), SLOT_OPEN);
    }
}

/// The open was answered, or given up on: its outcome ends its tracking. The slot's record
/// becomes the outcome in place, open included, and is reported from there.
#[inline(always)]
fn answered(slot: *mut ConnectSlot, cookie: u64, outcome: ConnectOutcome) {
    if unsafe { (*slot).event.sock_id != cookie || (*slot).phase != SLOT_OPEN } {
        return;
    }
    let event = unsafe { addr_of_mut!((*slot).event) };
    unsafe {
        // First: an agent reading the slot meanwhile sees it change and drops its copy.
        write_volatile(addr_of_mut!((*slot).phase), SLOT_FREE);
        (*event).ended_ns = bpf_ktime_get_boot_ns();
        (*event).kind = ConnectKind::Outcome as u8;
        (*event).outcome = outcome as u8;
    }
    report(event);
}

/// Copies the record to the ring straight from its slot.
#[inline(always)]
fn report(event: *const ConnectEvent) {
    if CONNECT_EVENTS
        .output::<ConnectEvent>(
            unsafe { &*event },
            submit_flags(Ring::Connect, size_of::<ConnectEvent>()),
        )
        .is_err()
    {
        count(LossCounter::ConnectRingFull);
    }
}

/// Family, ports and addresses of the socket as they are now, as the socket sees them: a
/// dual-stack socket reaching an IPv4 peer reports the v4-mapped IPv6 form, like the
/// address its connect(2) asked for. Writes nothing unless the family is IPv4 or IPv6.
#[inline(always)]
fn fill_tuple(sk: *mut bpf_sock, event: *mut ConnectEvent) -> bool {
    let sk: &bpf_sock = unsafe { &*sk };
    unsafe {
        match read_volatile(&sk.family) {
            AF_INET => {
                (*event).family = Family::Ipv4 as u8;
                put_ipv4(addr_of_mut!((*event).src_addr), read_volatile(&sk.src_ip4));
                put_ipv4(addr_of_mut!((*event).dst_addr), read_volatile(&sk.dst_ip4));
            }
            AF_INET6 => {
                (*event).family = Family::Ipv6 as u8;
                put_ipv6(addr_of_mut!((*event).src_addr), ip6(&sk.src_ip6));
                put_ipv6(addr_of_mut!((*event).dst_addr), ip6(&sk.dst_ip6));
            }
            _ => return false,
        }
        // src_port is in host order, dst_port in network order.
        (*event).src_port = read_volatile(&sk.src_port) as u16;
        (*event).dst_port = u16::from_be(read_volatile(&sk.dst_port));
    }
    true
}

/// An IPv6 address from a context field, in four 4-byte loads: the verifier refuses any
/// other access to these fields, and the compiler would merge plain reads into 8-byte ones.
#[inline(always)]
fn ip6(words: &[u32; 4]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        *word = unsafe { read_volatile(&words[i]) };
    }
    out
}

#[cgroup_sock(sock_release)]
pub fn connect_release(ctx: SockContext) -> i32 {
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    // Most sockets leave here: not TCP, or past their handshake.
    if unsafe { read_volatile(&sk.protocol) } != IPPROTO_TCP {
        return SOCK_OK;
    }
    let state = unsafe { read_volatile(&sk.state) };
    if state != TCP_SYN_SENT && state != TCP_CLOSE {
        return SOCK_OK;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(slot) = CONNECT_TRACK.get_ptr_mut(track_slot(cookie)) else {
        return SOCK_OK;
    };
    if unsafe { (*slot).event.sock_id } != cookie {
        return SOCK_OK;
    }
    match unsafe { (*slot).phase } {
        // Closed with no answer seen: the SYN went unanswered, an ICMP error ended it, or
        // the application stopped waiting.
        SLOT_OPEN => answered(slot, cookie, ConnectOutcome::Timeout),
        // connect(2) failed before any SYN left (no route, a bad address): nothing to report.
        SLOT_REQUESTED => unsafe { (*slot).phase = SLOT_FREE },
        _ => {}
    }
    SOCK_OK
}
