//! What the loader needs from the running system: the cgroup2 mount and capabilities.
use std::{
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::ProbeError;

pub(crate) const MOUNTINFO: &str = "/proc/self/mountinfo";
const STATUS: &str = "/proc/self/status";

/// One line of `/proc/<pid>/mountinfo`, the parts observer uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Path inside the mounted filesystem that is mounted here (`/` for the whole of it).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..=i + 3]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Parses mountinfo text; malformed lines are skipped (the kernel writes this file).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let fs_type = after.split(' ').next()?;
            Some(Mount {
                root: unescape(fields.get(3)?),
                mount_point: unescape(fields.get(4)?),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The cgroup2 mount to attach to: the one showing the whole hierarchy if there is one.
pub fn cgroup2_root(mounts: &[Mount]) -> Option<PathBuf> {
    let cgroup2 = || mounts.iter().filter(|m| m.fs_type == "cgroup2");
    cgroup2()
        .find(|m| m.root == Path::new("/"))
        .or_else(|| cgroup2().next())
        .map(|m| m.mount_point.clone())
}

pub(crate) fn read_mounts() -> Result<Vec<Mount>, ProbeError> {
    let text = fs::read_to_string(MOUNTINFO).map_err(|source| ProbeError::ReadSystemFile {
        path: MOUNTINFO.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Capabilities the probes need that the effective set lacks, by name.
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    // Kernels before CAP_BPF/CAP_PERFMON accept CAP_SYS_ADMIN in their place.
    if !has(CAP_BPF) && !admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// `CapEff` from `/proc/<pid>/status` text.
pub fn parse_effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

pub(crate) fn check_capabilities() -> Result<(), ProbeError> {
    let status = fs::read_to_string(STATUS).map_err(|source| ProbeError::ReadSystemFile {
        path: STATUS.into(),
        source,
    })?;
    let effective =
        parse_effective_capabilities(&status).ok_or_else(|| ProbeError::ReadSystemFile {
            path: STATUS.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no CapEff line"),
        })?;
    let missing = missing_capabilities(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::MissingCapabilities { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const MOUNTINFO_HYBRID: &str = include_str!("testdata/mountinfo.txt");

    #[test]
    fn finds_cgroup2_in_a_hybrid_mountinfo() {
        let mounts = parse_mountinfo(MOUNTINFO_HYBRID);
        assert_eq!(
            cgroup2_root(&mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_a_whole_cgroup2_hierarchy_and_unescapes_paths() {
        let text = "\
50 1 0:40 /kubepods /host\\040cg rw - cgroup2 cgroup2 rw
51 1 0:40 / /sys/fs/cgroup rw shared:1 - cgroup2 cgroup2 rw
garbage line
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/host cg"));
        assert_eq!(cgroup2_root(&mounts), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_root(&parse_mountinfo("")), None);
    }

    #[test]
    fn capabilities_needed_by_the_probes() {
        let status = include_str!("testdata/mountinfo.txt");
        assert_eq!(parse_effective_capabilities(status), None);
        let root = parse_effective_capabilities("CapInh:\t0\nCapEff:\t000001fffeffffff\n").unwrap();
        assert!(missing_capabilities(root).is_empty());
        assert_eq!(
            missing_capabilities(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        let bpf_only = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(bpf_only).is_empty());
        // Kernels older than CAP_BPF and CAP_PERFMON accept CAP_SYS_ADMIN for both.
        let admin = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(admin).is_empty());
    }
}
