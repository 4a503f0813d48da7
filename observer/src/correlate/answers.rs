//! The answer index of a scope: address -> the chain whose answer named it, until the
//! TTL plus grace; capped per scope and in total by evicting the scope's oldest chains.
use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
};

use super::{
    CoreCounters, CoreLimits,
    scope::{Scope, evict_oldest_chain},
};
use crate::record::BootNs;

/// Where an address was learned: one chain, until `expires_s` (TTL) plus grace.
/// Kept to 12 bytes: with its address, an index entry takes 32 bytes rather than 40, and
/// a node caches a million of them.
#[derive(Clone, Copy, Debug)]
pub(super) struct AnswerRef {
    pub(super) slot: u32,
    pub(super) generation: u32,
    /// When the TTL runs out, in whole seconds of boot time, rounded up (u32 seconds
    /// last 136 years; the grace period dwarfs the rounding).
    pub(super) expires_s: u32,
}

impl AnswerRef {
    pub(super) fn expires_at(&self) -> BootNs {
        u64::from(self.expires_s) * 1_000_000_000
    }
}

/// An address as an index key: IPv4 as its v4-mapped IPv6 form, 16 plain bytes. With
/// alignment 1 (`IpAddr` has a tag), an index entry takes 28 bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct AddrKey(pub(super) [u8; 16]);

/// Compared as one number too: a byte array's equality is a call to `memcmp`, and every
/// connect and indexed answer compares a key.
impl PartialEq for AddrKey {
    fn eq(&self, other: &Self) -> bool {
        u128::from_ne_bytes(self.0) == u128::from_ne_bytes(other.0)
    }
}

impl Eq for AddrKey {}

/// The 16 bytes as one number: the hasher folds it in one step, where a byte array
/// would be hashed as a slice (its length, then its bytes).
impl Hash for AddrKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_ne_bytes(self.0));
    }
}

/// `::ffff:0:0/96`, where IPv4 addresses sit in IPv6.
const V4_MAPPED_PREFIX: u128 = 0xffff_0000_0000;

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        AddrKey(match ip {
            // The v4-mapped form's bytes, built as one number: `to_ipv6_mapped().octets()`
            // assembled them a byte at a time (about 60 instructions per connect).
            IpAddr::V4(v4) => (V4_MAPPED_PREFIX | u128::from(v4.to_bits())).to_be_bytes(),
            IpAddr::V6(v6) => v6.octets(),
        })
    }
}

pub(super) fn seconds_up(at: BootNs) -> u32 {
    u32::try_from(at.div_ceil(1_000_000_000)).unwrap_or(u32::MAX)
}

/// Indexes one address of a scope's answer; the most recent answer for an address wins.
/// Caps make room by evicting the scope's oldest chain (never the one being indexed).
pub(super) fn index_answer(
    scope: &mut Scope,
    answers_total: &mut usize,
    counters: &mut CoreCounters,
    limits: &CoreLimits,
    ip: IpAddr,
    answer: AnswerRef,
) {
    let key = AddrKey::from(ip);
    if let Some(existing) = scope.index.get_mut(&key) {
        *existing = answer;
        return;
    }
    while scope.index.len() >= limits.max_answers_per_scope
        || *answers_total >= limits.max_answers_total
    {
        let scope_full = scope.index.len() >= limits.max_answers_per_scope;
        let removed = evict_oldest_chain(scope, Some((answer.slot, answer.generation)));
        if removed.chains == 0 {
            counters.answers_dropped_cap += 1;
            return;
        }
        *answers_total -= removed.answers;
        counters.chains_evicted_cap += u64::from(removed.chains);
        if scope_full {
            counters.answers_evicted_scope_cap += removed.answers as u64;
        } else {
            counters.answers_evicted_total_cap += removed.answers as u64;
        }
    }
    scope.index.insert(key, answer);
    *answers_total += 1;
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn a_v4_key_is_its_v4_mapped_form() {
        for v4 in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(10, 96, 0, 10),
            Ipv4Addr::new(203, 1, 2, 255),
            Ipv4Addr::BROADCAST,
        ] {
            let mapped = v4.to_ipv6_mapped();
            assert_eq!(AddrKey::from(IpAddr::V4(v4)).0, mapped.octets());
            assert_eq!(
                AddrKey::from(IpAddr::V4(v4)),
                AddrKey::from(IpAddr::V6(mapped))
            );
        }
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(AddrKey::from(IpAddr::V6(v6)).0, v6.octets());
    }
}
