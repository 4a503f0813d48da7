//! Queries waiting for their response, per scope: keyed by what the response will carry
//! reversed, in send order (which is deadline order: the timeout is uniform).
use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{FastMap, scope::Scope};
use crate::record::BootNs;

/// A query waiting for its response, keyed by what the response will carry reversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PendingKey {
    pub(super) id: u16,
    pub(super) client: SocketAddr,
    pub(super) server: SocketAddr,
}

/// Hashed on every query and response: packed into as few words as the addresses allow
/// (one for IPv4 on both ends) rather than field by field.
impl Hash for PendingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let ports = u128::from(self.id)
            | u128::from(self.client.port()) << 16
            | u128::from(self.server.port()) << 32;
        match (self.client.ip(), self.server.ip()) {
            (IpAddr::V4(c), IpAddr::V4(s)) => state
                .write_u128(ports | u128::from(c.to_bits()) << 48 | u128::from(s.to_bits()) << 80),
            (c, s) => {
                state.write_u128(ports | 1 << 127);
                for ip in [c, s] {
                    match ip {
                        IpAddr::V4(v4) => state.write_u32(v4.to_bits()),
                        IpAddr::V6(v6) => state.write_u128(v6.to_bits()),
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Pending {
    pub(super) slot: u32,
    pub(super) generation: u32,
    pub(super) step: u16,
    pub(super) query: u16,
    pub(super) name: Arc<str>,
    pub(super) qtype: u16,
    pub(super) sent_at: BootNs,
    pub(super) deadline: BootNs,
}

pub(super) fn pop_oldest_pending(scope: &mut Scope) -> Option<Pending> {
    let key = scope
        .pending_order
        .pop_oldest(|k, d| is_pending(&scope.pending, k, d))?;
    scope.pending.remove(&key)
}

/// Whether a queued `(deadline, key)` is still the scope's pending query.
pub(super) fn is_pending(
    pending: &FastMap<PendingKey, Pending>,
    key: &PendingKey,
    deadline: BootNs,
) -> bool {
    pending.get(key).is_some_and(|p| p.deadline == deadline)
}
