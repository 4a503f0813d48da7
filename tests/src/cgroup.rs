//! Kubelet-shaped cgroup2 directories, and the host-process cgroup beside them.
use std::{
    io::ErrorKind,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use observer::identity::{CgroupDriver, QosClass};

use crate::error::{Result, TestbedError, io_err};

/// The cgroup2 mount point, by the agent's own rule (on hybrid hosts it is not
/// /sys/fs/cgroup): the testbed builds its pods where the agent looks.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = observer::mountinfo::read_own()
        .map_err(io_err("read", observer::mountinfo::SELF_MOUNTINFO))?;
    observer::mountinfo::cgroup2_root(&mounts).ok_or(TestbedError::NoCgroup2)
}

/// The cgroup2 path of a process as the kernel reports it (`0::<path>` in /proc/<pid>/cgroup).
pub fn cgroup_of_pid(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or(TestbedError::UnexpectedOutput {
            what: path,
            output: text,
        })
}

/// One cgroup2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    path: PathBuf,
    relative: String,
    id: u64,
}

impl CgroupDir {
    fn open(root: &Path, relative: &str) -> Result<Self> {
        let path = root.join(relative.trim_start_matches('/'));
        let id = std::fs::metadata(&path)
            .map_err(io_err("stat", &path))?
            .ino();
        Ok(Self {
            path,
            relative: format!("/{}", relative.trim_start_matches('/')),
            id,
        })
    }

    /// Absolute directory path under the cgroup2 mount.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as /proc/<pid>/cgroup shows it, e.g. `/kubepods.slice/.../cri-containerd-<id>.scope`.
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// The cgroup id: the directory's inode number, what `bpf_get_current_cgroup_id()` and
    /// `bpf_skb_cgroup_id()` return for tasks and sockets in it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pids currently in this cgroup.
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path)
    }

    /// Moves a process into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let path = self.path.join("cgroup.procs");
        std::fs::write(&path, pid.to_string()).map_err(io_err("write", &path))
    }
}

fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// The directory the kubelet puts a pod of `qos` under; guaranteed pods sit directly under
/// kubepods (no class directory).
fn qos_dir(qos: QosClass) -> Option<&'static str> {
    match qos {
        QosClass::Guaranteed => None,
        QosClass::Burstable => Some("burstable"),
        QosClass::BestEffort => Some("besteffort"),
    }
}

/// Relative paths (from the cgroup2 root) of a pod's directory and its container's directory,
/// exactly as the kubelet and containerd name them.
pub fn kubelet_paths(
    driver: CgroupDriver,
    qos: QosClass,
    pod_uid: &str,
    container_id: &str,
) -> (String, String) {
    match driver {
        CgroupDriver::Systemd => {
            let uid = pod_uid.replace('-', "_");
            let pod = match qos_dir(qos) {
                None => format!("kubepods.slice/kubepods-pod{uid}.slice"),
                Some(q) => {
                    format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice")
                }
            };
            let container = format!("{pod}/cri-containerd-{container_id}.scope");
            (pod, container)
        }
        CgroupDriver::Cgroupfs => {
            let pod = match qos_dir(qos) {
                None => format!("kubepods/pod{pod_uid}"),
                Some(q) => format!("kubepods/{q}/pod{pod_uid}"),
            };
            let container = format!("{pod}/{container_id}");
            (pod, container)
        }
    }
}

/// A pod's cgroups as the kubelet would have made them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeCgroup {
    pub driver: CgroupDriver,
    pub qos: QosClass,
    /// The pod UID with dashes (as the API server has it).
    pub pod_uid: String,
    /// 64 hex digits.
    pub container_id: String,
    /// The pod-level directory.
    pub pod: CgroupDir,
    /// The container's directory, where the pod's processes live.
    pub container: CgroupDir,
}

/// Parent directories shared by every run's pods; removed when empty, never otherwise.
pub(crate) fn is_shared_kube_dir(relative: &str) -> bool {
    matches!(
        relative.trim_matches('/'),
        "kubepods.slice"
            | "kubepods.slice/kubepods-burstable.slice"
            | "kubepods.slice/kubepods-besteffort.slice"
            | "kubepods"
            | "kubepods/burstable"
            | "kubepods/besteffort"
    )
}

/// mkdir -p that survives another run removing an empty shared parent at the same moment.
pub(crate) fn create_dirs(root: &Path, relative: &str) -> Result<CgroupDir> {
    let path = root.join(relative);
    let mut last = None;
    for _ in 0..20 {
        match std::fs::create_dir_all(&path) {
            Ok(()) => return CgroupDir::open(root, relative),
            Err(e) if e.kind() == ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(io_err("mkdir", &path)(e)),
        }
    }
    Err(io_err("mkdir", &path)(last.expect("loop ran")))
}

/// Empties a cgroup (kill its processes, wait, move any straggler to the root) and removes it
/// and its descendants, bottom-up.
pub(crate) fn remove_tree(root: &Path, dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(()); // already gone
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(root, &entry.path())?;
        }
    }
    empty(root, dir);
    let mut result = Ok(());
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => result = Err(io_err("rmdir", dir)(e)),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    result
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn empty(root: &Path, dir: &Path) {
    if !populated(dir) {
        return;
    }
    // cgroup.kill (Linux 5.14+) kills every process atomically, also ones forking right now.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in read_procs(dir).unwrap_or_default() {
            // SAFETY: kill(2) on a pid found in a cgroup this testbed created.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while populated(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for pid in read_procs(dir).unwrap_or_default() {
        let _ = std::fs::write(root.join("cgroup.procs"), pid.to_string());
    }
}

/// Removes `relative`'s shared kubelet ancestors that are now empty (another run may still use
/// them: then rmdir fails and they stay).
pub(crate) fn remove_empty_shared_parents(root: &Path, relative: &str) {
    let mut rel = Path::new(relative.trim_start_matches('/'));
    while let Some(parent) = rel.parent() {
        if parent.as_os_str().is_empty() {
            break;
        }
        if is_shared_kube_dir(&parent.to_string_lossy()) {
            let _ = std::fs::remove_dir(root.join(parent));
        }
        rel = parent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b5e77e5-0001-4002-8003-000000000004";

    #[test]
    fn systemd_paths_match_the_kubelet() {
        let (pod, c) = kubelet_paths(CgroupDriver::Systemd, QosClass::Burstable, UID, "ab");
        assert_eq!(
            pod,
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b5e77e5_0001_4002_8003_000000000004.slice"
        );
        assert_eq!(c, format!("{pod}/cri-containerd-ab.scope"));
        let (pod, _) = kubelet_paths(CgroupDriver::Systemd, QosClass::Guaranteed, UID, "ab");
        assert_eq!(
            pod,
            "kubepods.slice/kubepods-pod0b5e77e5_0001_4002_8003_000000000004.slice"
        );
    }

    #[test]
    fn cgroupfs_paths_match_the_kubelet() {
        let (pod, c) = kubelet_paths(CgroupDriver::Cgroupfs, QosClass::BestEffort, UID, "ab");
        assert_eq!(pod, format!("kubepods/besteffort/pod{UID}"));
        assert_eq!(c, format!("{pod}/ab"));
        let (pod, _) = kubelet_paths(CgroupDriver::Cgroupfs, QosClass::Guaranteed, UID, "ab");
        assert_eq!(pod, format!("kubepods/pod{UID}"));
    }
}
