//! Removal of what killed runs left behind. Only names carrying the testbed's prefixes and the
//! pid of a process that no longer exists are touched, so live runs (other test binaries running
//! in parallel) are never disturbed.
use std::path::{Path, PathBuf};

use crate::{
    cgroup,
    error::Result,
    exec,
    names::{LONG_PREFIX, NETNS_PREFIX, UID_MARKER, pid_alive, pid_of_name, pid_of_uid},
    netns,
};

/// What [`cleanup_leftovers`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftoverReport {
    pub namespaces: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
}

fn dead(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| !pid_alive(p))
}

/// Removes namespaces, /etc/netns dirs, cgroups and state dirs of testbeds whose process died.
pub fn cleanup_leftovers() -> Result<LeftoverReport> {
    let mut report = LeftoverReport::default();
    let listing = exec::ip(None, &["netns", "list"])?.stdout;
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with(NETNS_PREFIX) && dead(pid_of_name(name)) && netns::destroy(name).is_ok()
        {
            report.namespaces.push(name.to_owned());
        }
    }
    let dirs = [Path::new("/etc/netns").to_owned(), std::env::temp_dir()];
    for dir in dirs {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(NETNS_PREFIX) || name.starts_with(LONG_PREFIX);
            if ours && dead(pid_of_name(&name)) && std::fs::remove_dir_all(entry.path()).is_ok() {
                report.files.push(entry.path());
            }
        }
    }
    if let Ok(root) = cgroup::cgroup2_mount() {
        for top in ["kubepods.slice", "kubepods", "system.slice"] {
            collect_cgroups(&root.join(top), 3, &mut report.cgroups);
        }
        for dir in &report.cgroups {
            let _ = cgroup::remove_tree(&root, dir);
            if let Ok(relative) = dir.strip_prefix(&root) {
                cgroup::remove_empty_shared_parents(&root, &relative.to_string_lossy());
            }
        }
    }
    Ok(report)
}

/// Pod cgroups whose UID, and host cgroups whose name, carry a dead testbed pid.
fn collect_cgroups(dir: &Path, depth: u8, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = if let Some(at) = name.find(&format!("pod{UID_MARKER}")) {
            pid_of_uid(name[at + 3..].trim_end_matches(".slice"))
        } else if name.starts_with(LONG_PREFIX) {
            pid_of_name(&name)
        } else {
            if depth > 1 {
                collect_cgroups(&entry.path(), depth - 1, found);
            }
            continue;
        };
        if dead(pid) {
            found.push(entry.path());
        }
    }
}
