//! The one reader of `/proc/self/mountinfo`, and the one rule for which cgroup2 mount observer
//! uses. The probes attach to that mount and identity walks it to map cgroup ids to pods: if
//! the two chose differently, ids seen by the kernel programs could never be found in the tree.
use std::{
    ffi::OsStr,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Component, Path, PathBuf},
};

/// This process's mount table.
pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of `/proc/<pid>/mountinfo`, the parts observer uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the mounted filesystem shown at the mount point (`/` for the whole of
    /// it). For cgroup2 it is relative to the reader's cgroup namespace, so a mount of a tree
    /// above that namespace shows as `/..`, `/../..`, ...
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses mountinfo text; malformed lines are skipped (the kernel writes this file).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ...`
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ').skip(3);
            let root = unescape(fields.next()?);
            let mount_point = unescape(fields.next()?);
            let fs_type = after.split(' ').next().filter(|t| !t.is_empty())?;
            Some(Mount {
                root,
                mount_point,
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, also tab, newline and backslash).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(value) = octal
            .map(|digits| {
                digits
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'))
            })
            .and_then(|value| u8::try_from(value).ok())
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// How far above the reader's cgroup namespace a mount's root is: `Some(0)` for `/`,
/// `Some(2)` for `/../..`; `None` for a root that names a directory (`/kubepods/...`), which
/// shows only part of the tree.
fn height_above_namespace(root: &Path) -> Option<usize> {
    let mut height = 0;
    for component in root.components() {
        match component {
            Component::RootDir => {}
            Component::ParentDir => height += 1,
            _ => return None,
        }
    }
    Some(height)
}

/// The cgroup2 mount observer attaches to and walks: the one showing the hierarchy from the
/// highest point this process can see (a host tree bind-mounted into a container in its own
/// cgroup namespace shows as `/../..` and wins over the container's own `/`); failing that,
/// the first cgroup2 mount.
pub fn cgroup2_root(mounts: &[Mount]) -> Option<PathBuf> {
    let cgroup2 = || mounts.iter().filter(|m| m.fs_type == "cgroup2");
    cgroup2()
        .filter_map(|m| Some((height_above_namespace(&m.root)?, m)))
        // The last of equal height: a later mount on the same point hides an earlier one.
        .max_by_key(|(height, _)| *height)
        .map(|(_, m)| m)
        .or_else(|| cgroup2().next())
        .map(|m| m.mount_point.clone())
}

/// This process's mounts, from [`SELF_MOUNTINFO`].
pub fn read_own() -> io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string(SELF_MOUNTINFO)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen(text: &str) -> Option<PathBuf> {
        cgroup2_root(&parse(text))
    }

    #[test]
    fn a_hybrid_host_uses_the_unified_mount() {
        assert_eq!(
            chosen(include_str!("testdata/mountinfo_hybrid.txt")),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn a_pure_cgroup2_host_uses_sys_fs_cgroup() {
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(chosen(pure), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn a_container_with_the_host_tree_mounted_uses_the_host_tree() {
        // containerd, private cgroup namespace: the container's own cgroup2 at /sys/fs/cgroup
        // (root `/` = its own cgroup), then the DaemonSet's hostPath of the host's tree at
        // /host/cgroup, seen from inside the namespace three levels above its root.
        let container = "\
1185 1175 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
1190 1175 0:27 /../../.. /host/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(chosen(container), Some(PathBuf::from("/host/cgroup")));
        // Without a cgroup namespace the runtime mounts only the container's directory.
        let no_namespace =
            "900 880 0:27 /kubepods/pod1/abc /sys/fs/cgroup ro,relatime - cgroup2 cgroup rw\n";
        assert_eq!(chosen(no_namespace), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn a_nested_cgroup_namespace_prefers_the_highest_root_over_a_subtree() {
        // A process in a cgroup namespace nested two deep, which inherited the host's mount
        // (shown as `/../..`), a subtree bind (named root), and mounted its own (`/`).
        let nested = "\
60 1 0:27 /../kubepods /mnt/pods rw - cgroup2 cgroup2 rw
61 1 0:27 /../.. /sys/fs/cgroup rw shared:1 master:2 - cgroup2 cgroup2 rw
62 1 0:27 / /mnt/own\\040ns rw - cgroup2 cgroup2 rw
";
        assert_eq!(chosen(nested), Some(PathBuf::from("/sys/fs/cgroup")));
        let own_only = "62 1 0:27 / /mnt/own\\040ns rw - cgroup2 cgroup2 rw\n";
        assert_eq!(chosen(own_only), Some(PathBuf::from("/mnt/own ns")));
    }

    #[test]
    fn malformed_lines_and_escapes() {
        let mounts = parse("garbage\n\n- -\n40 24 0:31 /a\\134b /mnt/x\\0 rw - cgroup2 none rw\n");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].root, PathBuf::from("/a\\b"));
        // A backslash not followed by three octal digits stays as written.
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/x\\0"));
        assert_eq!(chosen(""), None);
        assert_eq!(chosen("27 1 254:0 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount() {
        let mount = cgroup2_root(&read_own().expect("reading mountinfo")).expect("cgroup2");
        assert!(mount.join("cgroup.controllers").exists(), "{mount:?}");
    }
}
