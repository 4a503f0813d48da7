//! Which cgroups each scope has been seen in, so that a scope whose cgroups are all gone
//! (its pod deleted, its node process exited) can be forgotten everywhere.
use super::{FastMap, FastSet};
use crate::scope::ScopeKey;

#[derive(Default)]
pub struct ScopeCgroups {
    seen: FastMap<ScopeKey, FastSet<u64>>,
}

impl ScopeCgroups {
    pub fn note(&mut self, scope: &ScopeKey, cgroup_id: u64) {
        if let Some(ids) = self.seen.get_mut(scope) {
            ids.insert(cgroup_id);
        } else {
            self.seen
                .insert(scope.clone(), FastSet::from_iter([cgroup_id]));
        }
    }

    /// One cgroup the scope was seen in (the lowest id, so the answer is stable).
    pub fn any_cgroup(&self, scope: &ScopeKey) -> Option<u64> {
        self.seen.get(scope)?.iter().min().copied()
    }

    /// Drops cgroups that no longer exist and returns the scopes left with none.
    pub fn departed(&mut self, exists: impl Fn(u64) -> bool) -> Vec<ScopeKey> {
        let mut departed = Vec::new();
        self.seen.retain(|scope, ids| {
            ids.retain(|id| exists(*id));
            if ids.is_empty() {
                departed.push(scope.clone());
            }
            !ids.is_empty()
        });
        departed
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_scope_is_found_through_a_cgroup_it_was_seen_in() {
        let pod = ScopeKey::Pod(Arc::from("uid-1"));
        let mut scopes = ScopeCgroups::default();
        assert_eq!(scopes.any_cgroup(&pod), None);
        scopes.note(&pod, 11);
        scopes.note(&pod, 10);
        assert_eq!(scopes.any_cgroup(&pod), Some(10));
        assert_eq!(scopes.any_cgroup(&ScopeKey::Host(99)), None);
    }

    #[test]
    fn a_pod_departs_only_when_its_last_container_cgroup_is_gone() {
        let pod = ScopeKey::Pod(Arc::from("uid-1"));
        let host = ScopeKey::Host(99);
        let mut scopes = ScopeCgroups::default();
        scopes.note(&pod, 10); // app container
        scopes.note(&pod, 11); // sidecar
        scopes.note(&host, 99);
        assert!(
            scopes.departed(|id| id != 10).is_empty(),
            "the sidecar still lives"
        );
        assert_eq!(scopes.departed(|id| id == 99), vec![pod.clone()]);
        assert_eq!(scopes.len(), 1);
        assert_eq!(scopes.departed(|_| false), vec![host]);
        assert!(scopes.is_empty());
    }
}
