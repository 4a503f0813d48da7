//! cgroup id -> cgroup v2 path. The kernel stamps events with a cgroup id, which is the inode
//! number of the cgroup's directory on the cgroup2 mount; walking that tree maps ids to paths.
use std::{
    collections::HashMap,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use crate::{error::PathIoError, mountinfo};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("no cgroup2 mount in {path}")]
    NoCgroup2Mount { path: PathBuf },
}

/// The cgroup2 mount of this process's mount namespace, by the rule the probes use too
/// ([`crate::mountinfo::cgroup2_root`]).
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(mountinfo::SELF_MOUNTINFO);
    let mounts = mountinfo::read_own().map_err(PathIoError::at("read", path.clone()))?;
    mountinfo::cgroup2_root(&mounts).ok_or(CgroupError::NoCgroup2Mount { path })
}

/// Bounds on one walk of the cgroup tree, so a pathological tree cannot stall the agent.
#[derive(Clone, Debug)]
pub struct CgroupCacheConfig {
    /// At most one rescan per this interval, however many unknown ids arrive.
    pub min_rescan_interval: Duration,
    pub max_depth: usize,
    pub max_entries: usize,
}

impl Default for CgroupCacheConfig {
    fn default() -> Self {
        CgroupCacheConfig {
            min_rescan_interval: Duration::from_secs(1),
            max_depth: 32,
            max_entries: 200_000,
        }
    }
}

/// Counters for the health endpoint and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCacheStats {
    pub rescans: u64,
    /// Misses that found the rescan budget spent and were answered "unknown" at once.
    pub rate_limited_misses: u64,
    /// Walks that hit `max_depth` / `max_entries` or an unreadable directory.
    pub truncated_scans: u64,
    pub known: usize,
}

/// cgroup id -> path relative to the cgroup2 mount (`/kubepods.slice/...`, `/` for the root).
/// A miss triggers a rescan of the whole tree, at most once per `min_rescan_interval`; each
/// rescan replaces the map, so removed cgroups are forgotten.
pub struct CgroupCache {
    root: PathBuf,
    config: CgroupCacheConfig,
    paths: RwLock<HashMap<u64, Arc<str>>>,
    scan: Mutex<ScanState>,
}

#[derive(Default)]
struct ScanState {
    last_scan: Option<Instant>,
    stats: CgroupCacheStats,
}

impl CgroupCache {
    /// `root` is the cgroup2 mount (see [`find_cgroup2_mount`]); tests pass their own tree.
    pub fn new(root: impl Into<PathBuf>, config: CgroupCacheConfig) -> Self {
        CgroupCache {
            root: root.into(),
            config,
            paths: RwLock::new(HashMap::new()),
            scan: Mutex::new(ScanState::default()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of cgroup `id`, rescanning on a miss unless a rescan ran too recently.
    pub fn path_of(&self, id: u64) -> Option<Arc<str>> {
        if let Some(path) = self.read_map().get(&id) {
            return Some(Arc::clone(path));
        }
        let mut scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have rescanned while this one waited for the lock.
        if let Some(path) = self.read_map().get(&id) {
            return Some(Arc::clone(path));
        }
        let now = Instant::now();
        if scan
            .last_scan
            .is_some_and(|last| now.duration_since(last) < self.config.min_rescan_interval)
        {
            scan.stats.rate_limited_misses += 1;
            return None;
        }
        self.rescan_locked(&mut scan, now);
        self.read_map().get(&id).cloned()
    }

    /// Whether the last walk found cgroup `id`; never walks.
    pub fn knows(&self, id: u64) -> bool {
        self.read_map().contains_key(&id)
    }

    /// How long a miss may have to wait for the next walk.
    pub fn min_rescan_interval(&self) -> Duration {
        self.config.min_rescan_interval
    }

    /// Walks the tree now, regardless of the rate limit (periodic housekeeping, startup).
    pub fn refresh(&self) {
        let mut scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        self.rescan_locked(&mut scan, Instant::now());
    }

    pub fn stats(&self) -> CgroupCacheStats {
        let scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        CgroupCacheStats {
            known: self.read_map().len(),
            ..scan.stats
        }
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<str>>> {
        self.paths.read().unwrap_or_else(|p| p.into_inner())
    }

    fn rescan_locked(&self, scan: &mut ScanState, now: Instant) {
        let (map, truncated) = walk_cgroup_tree(&self.root, &self.config);
        scan.last_scan = Some(now);
        scan.stats.rescans += 1;
        if truncated {
            scan.stats.truncated_scans += 1;
            tracing::warn!(root = %self.root.display(), "cgroup tree walk truncated");
        }
        *self.paths.write().unwrap_or_else(|p| p.into_inner()) = map;
    }
}

/// Returns the id -> relative path map and whether the walk was cut short.
fn walk_cgroup_tree(root: &Path, config: &CgroupCacheConfig) -> (HashMap<u64, Arc<str>>, bool) {
    let mut map = HashMap::new();
    let mut truncated = false;
    let Ok(root_meta) = std::fs::metadata(root) else {
        return (map, true);
    };
    map.insert(root_meta.ino(), Arc::from("/"));
    // Depth-first with an explicit stack: (absolute dir, relative path, depth).
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A cgroup removed mid-walk is normal; anything else marks the scan partial.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                truncated = true;
                continue;
            }
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if !file_type.is_dir() {
                continue;
            }
            if map.len() >= config.max_entries {
                return (map, true);
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let name = entry.file_name();
            let child_rel = format!("{rel}/{}", name.to_string_lossy());
            map.insert(meta.ino(), Arc::from(child_rel.as_str()));
            if depth + 1 < config.max_depth {
                stack.push((entry.path(), child_rel, depth + 1));
            } else {
                truncated = true;
            }
        }
    }
    (map, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_a_plain_directory_tree_with_bounds() {
        // The walk itself only needs directories and inode numbers: a temp tree shows the
        // bounds work without touching the real cgroup hierarchy.
        let base = std::env::temp_dir().join(format!("observer-cgwalk-{}", std::process::id()));
        let deep = base.join("a/b/c/d");
        std::fs::create_dir_all(&deep).unwrap();
        let cache = CgroupCache::new(&base, CgroupCacheConfig::default());
        let d_ino = std::fs::metadata(&deep).unwrap().ino();
        assert_eq!(cache.path_of(d_ino).as_deref(), Some("/a/b/c/d"));
        let limited = CgroupCacheConfig {
            max_depth: 2,
            ..CgroupCacheConfig::default()
        };
        let (map, truncated) = walk_cgroup_tree(&base, &limited);
        assert!(truncated);
        assert!(!map.contains_key(&d_ino));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
