//! Programs that do nothing, on the hooks observer uses. The cost benchmark attaches them
//! beside observer's own: their run time is what any program on those hooks costs (the
//! hook's call, bpf_stats' own clock reads), measured in the same run. The agent never
//! loads them.
use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};

#[cgroup_skb(ingress)]
pub fn baseline_skb_ingress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(egress)]
pub fn baseline_skb_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_sock_addr(connect4)]
pub fn baseline_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock(sock_release)]
pub fn baseline_sock_release(_ctx: SockContext) -> i32 {
    1
}
