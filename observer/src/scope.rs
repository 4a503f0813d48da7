//! Whose traffic is it: the key that every per-pod structure is indexed by.
use std::{fmt, sync::Arc};

/// All containers of a pod share one scope (a sidecar resolves, the app connects);
/// a process outside any pod is scoped by its own cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKey {
    /// A pod, by UID as the kubelet writes it (dashes, lower case).
    Pod(Arc<str>),
    /// A node process, by the cgroup v2 id of its cgroup.
    Host(u64),
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeKey::Pod(uid) => write!(f, "pod/{uid}"),
            ScopeKey::Host(cgroup) => write!(f, "host/cgroup:{cgroup}"),
        }
    }
}
