//! What the loader needs from the running system: the cgroup2 mount and capabilities.
use std::fs;

use super::ProbeError;
use crate::mountinfo::{self, Mount};

const STATUS: &str = "/proc/self/status";

pub(crate) fn read_mounts() -> Result<Vec<Mount>, ProbeError> {
    mountinfo::read_own().map_err(|source| ProbeError::ReadSystemFile {
        path: mountinfo::SELF_MOUNTINFO.into(),
        source,
    })
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
    #[test]
    fn capabilities_needed_by_the_probes() {
        let status = include_str!("../testdata/mountinfo_hybrid.txt");
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
