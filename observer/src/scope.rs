//! Whose traffic is it: the key that every per-pod structure is indexed by.
use std::{
    fmt,
    hash::{Hash, Hasher},
    sync::Arc,
};

/// All containers of a pod share one scope (a sidecar resolves, the app connects);
/// a process outside any pod is scoped by its own cgroup.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ScopeKey {
    /// A pod, by UID as the kubelet writes it (dashes, lower case).
    Pod(Arc<str>),
    /// A node process, by the cgroup v2 id of its cgroup.
    Host(u64),
}

/// The UID's bytes or the cgroup id alone: every event is looked up by its scope, and the
/// variant's tag and a string terminator would double the hasher's work. A UID and a
/// cgroup id may share a hash; equality still tells them apart.
impl Hash for ScopeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            ScopeKey::Pod(uid) => state.write(uid.as_bytes()),
            ScopeKey::Host(cgroup) => state.write_u64(*cgroup),
        }
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeKey::Pod(uid) => write!(f, "pod/{uid}"),
            ScopeKey::Host(cgroup) => write!(f, "host/cgroup:{cgroup}"),
        }
    }
}
