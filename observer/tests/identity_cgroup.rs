//! cgroup id -> path -> pod on the real cgroup2 hierarchy: kubelet-shaped cgroups are created
//! under the cgroup2 mount (root needed), looked up by id, and removed when the test ends.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use observer::{
    identity::{
        CgroupCache, CgroupCacheConfig, CgroupDriver, CgroupOwner, ContainerRuntime, Identity,
        PodMember, QosClass, ResolvCache, ResolvCacheConfig, cgroup::find_cgroup2_mount,
        parse_cgroup_path,
    },
    scope::ScopeKey,
};

/// Directories created under the cgroup2 mount, removed deepest first on drop (also when a
/// test panics). Processes put in them are killed first, or rmdir would fail with EBUSY.
struct CgroupTree {
    mount: PathBuf,
    created: Vec<PathBuf>,
    children: Vec<Child>,
}

impl CgroupTree {
    fn new() -> Self {
        CgroupTree {
            mount: find_cgroup2_mount().expect("cgroup2 mount in /proc/self/mountinfo"),
            created: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Creates `rel` (and missing parents) under the mount; returns its cgroup id.
    fn create(&mut self, rel: &str) -> u64 {
        let mut path = self.mount.clone();
        for component in rel.split('/').filter(|c| !c.is_empty()) {
            path.push(component);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
                self.created.push(path.clone());
            }
        }
        std::fs::metadata(&path).unwrap().ino()
    }

    fn remove(&mut self, rel: &str) {
        let path = self.mount.join(rel.trim_start_matches('/'));
        std::fs::remove_dir(&path)
            .unwrap_or_else(|e| panic!("remove cgroup {}: {e}", path.display()));
        self.created.retain(|p| p != &path);
    }

    /// Starts a process that sleeps inside cgroup `rel`.
    fn spawn_in(&mut self, rel: &str) -> u32 {
        let child = Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        self.children.push(child);
        let procs = self
            .mount
            .join(rel.trim_start_matches('/'))
            .join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
        pid
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for path in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_dir(path) {
                eprintln!("leaving cgroup {}: {e}", path.display());
            }
        }
    }
}

/// A per-run value, so parallel runs never share cgroups or uids.
fn run_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:08x}{:08x}", std::process::id(), nanos as u32)
}

fn pod_uid(suffix: &str, n: u8) -> String {
    // 8-4-4-4-12 hex, unique per run.
    format!(
        "{}-{:04x}-4000-8000-{:012x}",
        &suffix[..8],
        n,
        u64::from_str_radix(&suffix[8..16], 16).unwrap()
    )
}

fn container_id(suffix: &str, n: u8) -> String {
    format!("{:0>62}{:02x}", suffix, n)
}

/// The kernel's own cgroup id of a directory: the 8-byte file handle `name_to_handle_at`
/// returns for cgroupfs, independent of the inode number the cache reads.
/// The cgroup of container `n` of pod `n`, as the kubelet's systemd driver names it for
/// containerd.
fn systemd_containerd_container(suffix: &str, n: u8) -> String {
    format!(
        "/observer-test-{suffix}/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
        pod_uid(suffix, n).replace('-', "_"),
        container_id(suffix, n)
    )
}

fn kernel_cgroup_id(path: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        handle_bytes: u32,
        handle_type: i32,
        id: [u8; 8],
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut handle = Handle {
        handle_bytes: 8,
        handle_type: 0,
        id: [0; 8],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `handle` is a file_handle header followed by the 8 bytes announced in
    // handle_bytes; the path is NUL-terminated; mount_id is a valid out pointer.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            (&mut handle as *mut Handle).cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "name_to_handle_at {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    u64::from_ne_bytes(handle.id)
}

#[test]
fn kubelet_shaped_cgroups_resolve_to_pod_and_container() {
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let base = format!("/observer-test-{suffix}");
    let uid_a = pod_uid(&suffix, 1);
    let uid_b = pod_uid(&suffix, 2);
    let cid_a = container_id(&suffix, 0xa1);
    let cid_b = container_id(&suffix, 0xb2);
    let systemd_container = format!(
        "{base}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid_a}.scope",
        uid_a.replace('-', "_")
    );
    let cgroupfs_container = format!("{base}/kubepods/besteffort/pod{uid_b}/{cid_b}");
    let host_cgroup = format!("{base}/system.slice/node-agent.service");
    let id_a = tree.create(&systemd_container);
    let id_b = tree.create(&cgroupfs_container);
    let id_host = tree.create(&host_cgroup);

    // The id the cache keys on (the inode number) is the kernel's cgroup id.
    assert_eq!(
        kernel_cgroup_id(&tree.mount.join(&systemd_container[1..])),
        id_a
    );

    let cache = CgroupCache::new(&tree.mount, CgroupCacheConfig::default());
    assert_eq!(
        cache.path_of(id_a).as_deref(),
        Some(systemd_container.as_str())
    );
    assert_eq!(
        cache.path_of(id_b).as_deref(),
        Some(cgroupfs_container.as_str())
    );

    let Ok(CgroupOwner::Pod(a)) = parse_cgroup_path(&cache.path_of(id_a).unwrap()) else {
        panic!("systemd path not a pod");
    };
    assert_eq!(a.uid.as_str(), uid_a);
    assert_eq!(
        (a.qos, a.driver),
        (QosClass::Burstable, CgroupDriver::Systemd)
    );
    assert_eq!(
        a.member,
        PodMember::Container {
            id: observer::identity::ContainerId::parse(&cid_a).unwrap(),
            runtime: ContainerRuntime::Containerd
        }
    );
    let Ok(CgroupOwner::Pod(b)) = parse_cgroup_path(&cache.path_of(id_b).unwrap()) else {
        panic!("cgroupfs path not a pod");
    };
    assert_eq!(
        (b.uid.as_str(), b.qos),
        (uid_b.as_str(), QosClass::BestEffort)
    );
    assert_eq!(b.container_id().unwrap().as_str(), cid_b);

    // Through the facade, in host mode: pods are keyed by uid, anything else by cgroup id.
    let identity = Identity::host_only(
        CgroupCache::new(&tree.mount, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
    );
    let resolved = identity.resolve(id_a, None);
    assert_eq!(resolved.scope, ScopeKey::Pod(Arc::from(uid_a.as_str())));
    assert_eq!(resolved.container_id().unwrap().as_str(), cid_a);
    assert_eq!(
        identity.resolve(id_host, None).scope,
        ScopeKey::Host(id_host)
    );
    assert_eq!(
        identity.status(),
        observer::identity::EnrichmentStatus::Disabled
    );
}

#[test]
fn refresh_on_miss_is_rate_limited_and_removed_cgroups_are_forgotten() {
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let base = format!("/observer-test-{suffix}");
    let uid = pod_uid(&suffix, 3);
    let pod = format!("{base}/kubepods/burstable/pod{uid}");
    tree.create(&pod);
    let interval = Duration::from_millis(300);
    let cache = CgroupCache::new(
        &tree.mount,
        CgroupCacheConfig {
            min_rescan_interval: interval,
            ..CgroupCacheConfig::default()
        },
    );
    cache.refresh();
    let scans_before = cache.stats().rescans;

    // A cgroup created after the scan is found by the rescan its first miss triggers...
    std::thread::sleep(interval);
    let first = format!("{pod}/{}", container_id(&suffix, 1));
    let first_id = tree.create(&first);
    assert_eq!(cache.path_of(first_id).as_deref(), Some(first.as_str()));
    assert_eq!(cache.stats().rescans, scans_before + 1);

    // ...but a burst of unknown ids right after does not rescan again.
    let second = format!("{pod}/{}", container_id(&suffix, 2));
    let second_id = tree.create(&second);
    for unknown in [second_id, u64::MAX, u64::MAX - 1, u64::MAX - 2] {
        assert_eq!(cache.path_of(unknown), None);
    }
    let stats = cache.stats();
    assert_eq!(stats.rescans, scans_before + 1);
    assert_eq!(stats.rate_limited_misses, 4);
    std::thread::sleep(interval);
    assert_eq!(cache.path_of(second_id).as_deref(), Some(second.as_str()));

    // A removed cgroup is gone after the next rescan.
    tree.remove(&first);
    std::thread::sleep(interval);
    cache.refresh();
    assert_eq!(cache.path_of(first_id), None);
    assert_eq!(cache.path_of(second_id).as_deref(), Some(second.as_str()));
}

#[test]
fn resolv_conf_is_read_through_a_process_in_the_pod() {
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let container = systemd_containerd_container(&suffix, 4);
    let id = tree.create(&container);
    let pid = tree.spawn_in(&container);
    let on_proc = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(on_proc.contains(&format!("0::{container}")), "{on_proc}");

    let identity = Identity::host_only(
        CgroupCache::new(&tree.mount, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
    );
    let resolved = identity.resolve(id, Some(pid));
    assert_eq!(
        resolved.scope,
        ScopeKey::Pod(Arc::from(pod_uid(&suffix, 4).as_str()))
    );
    let expected = observer::identity::parse_resolv_conf(
        &std::fs::read(format!("/proc/{pid}/root/etc/resolv.conf")).unwrap(),
    )
    .unwrap();
    assert_eq!(resolved.resolver.as_deref(), Some(&expected));
    // Later events without a pid still get the pod's resolver configuration.
    assert_eq!(
        identity.resolve(id, None).resolver.as_deref(),
        Some(&expected)
    );
}

#[test]
fn resolv_conf_is_found_from_the_cgroup_before_any_pid_is_reported() {
    // DNS events carry no pid: a pod's first lookup must still be read with its own
    // resolv.conf, through a process listed in the container cgroup.
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let container = systemd_containerd_container(&suffix, 5);
    let id = tree.create(&container);
    let pid = tree.spawn_in(&container);
    let identity = Identity::host_only(
        CgroupCache::new(&tree.mount, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
    );
    let expected = observer::identity::parse_resolv_conf(
        &std::fs::read(format!("/proc/{pid}/root/etc/resolv.conf")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        identity.resolve(id, None).resolver.as_deref(),
        Some(&expected)
    );
}

#[test]
fn resolv_conf_is_found_through_the_pod_when_the_named_process_has_exited() {
    // A one-shot client's connect can reach the agent before its lookup does, and it has
    // exited by then: the first read names a dead pid, and the pod's main process must still
    // give the pod's resolv.conf at once (a later event may be too late for the record).
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let container = systemd_containerd_container(&suffix, 9);
    let id = tree.create(&container);
    let main = tree.spawn_in(&container);
    let mut client = Command::new("true").spawn().expect("spawn true");
    let exited = client.id();
    client.wait().expect("the client exits");
    assert!(!Path::new(&format!("/proc/{exited}")).exists());
    let identity = Identity::host_only(
        CgroupCache::new(&tree.mount, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
    );
    let expected = observer::identity::parse_resolv_conf(
        &std::fs::read(format!("/proc/{main}/root/etc/resolv.conf")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        identity.resolve(id, Some(exited)).resolver.as_deref(),
        Some(&expected)
    );
}

#[test]
fn resolv_conf_is_found_through_another_container_of_the_pod() {
    // A one-shot client may exit before its lookup is read: the pod's main process in
    // another container shows the same resolv.conf. CRI-O's conmon monitor, though, runs in
    // the node's root: its resolv.conf is the node's and must never stand for the pod's.
    let suffix = run_suffix();
    let mut tree = CgroupTree::new();
    let uid = pod_uid(&suffix, 6);
    let pod_dir = format!(
        "/observer-test-{suffix}/kubepods.slice/kubepods-pod{}.slice",
        uid.replace('-', "_")
    );
    let client = format!("{pod_dir}/crio-{}.scope", container_id(&suffix, 6));
    let monitor = format!("{pod_dir}/crio-conmon-{}.scope", container_id(&suffix, 7));
    let main = format!("{pod_dir}/crio-{}.scope", container_id(&suffix, 8));
    let client_id = tree.create(&client);
    tree.create(&monitor);
    tree.create(&main);
    tree.spawn_in(&monitor);
    assert!(
        Path::new("/etc/resolv.conf").exists(),
        "this test needs the node's /etc/resolv.conf"
    );
    let identity = Identity::host_only(
        CgroupCache::new(&tree.mount, CgroupCacheConfig::default()),
        ResolvCache::new(ResolvCacheConfig::default()),
    );
    assert_eq!(
        identity.resolve(client_id, None).resolver,
        None,
        "conmon's resolv.conf was taken for the pod's"
    );

    let pid = tree.spawn_in(&main);
    // Discovery is retried after a short interval, not on every event.
    std::thread::sleep(Duration::from_millis(150));
    let expected = observer::identity::parse_resolv_conf(
        &std::fs::read(format!("/proc/{pid}/root/etc/resolv.conf")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        identity.resolve(client_id, None).resolver.as_deref(),
        Some(&expected)
    );
}
