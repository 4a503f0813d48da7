//! The maps and sets looked up for every event (by cgroup id, socket, scope, name, address).
//! Their keys come from pods (names, addresses, ids they chose), so the hasher is seeded at
//! random per map: several times cheaper per lookup than the standard library's SipHash,
//! without letting a pod pick colliding keys.
use std::collections::{HashMap, HashSet};

pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
