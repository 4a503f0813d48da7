//! Names that carry the run they belong to.
//!
//! Every namespace, cgroup and state directory the testbed makes embeds the creating process's
//! pid, so a later run can tell a leftover of a killed run (pid gone) from a live run's object
//! (pid alive) and remove only the former.
use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU32, Ordering},
};

/// Prefix of every network namespace name (`ip netns list`) the testbed creates.
pub const NETNS_PREFIX: &str = "obt-";
/// Prefix of the host-process cgroups and state directories the testbed creates.
pub const LONG_PREFIX: &str = "observer-test-";
/// First group of every pod UID (and first 8 hex digits of every container id) the testbed
/// makes up: recognisable in leftovers, never produced by a real kubelet's random UUIDs by design
/// of this project (a collision would only make the cleanup skip or check a live pid).
pub const UID_MARKER: &str = "0b5e77e5";

static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

pub(crate) fn random_u64() -> u64 {
    // std's hasher keys are random per RandomState; enough for unique test names.
    let mut h = RandomState::new().build_hasher();
    h.write_u32(NEXT_RUN.load(Ordering::Relaxed));
    h.finish()
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ASCII")
}

/// The per-testbed unique suffix, `<pid base36>-<random><counter>`, e.g. `2ho3k-q7x20`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunId {
    pid: u32,
    suffix: String,
    counter: u32,
}

impl RunId {
    pub fn new() -> Self {
        let pid = std::process::id();
        let counter = NEXT_RUN.fetch_add(1, Ordering::Relaxed);
        let random = base36(random_u64() % 36u64.pow(4));
        let suffix = format!(
            "{}-{random:0>4}{}",
            base36(pid.into()),
            base36(counter.into())
        );
        Self {
            pid,
            suffix,
            counter,
        }
    }

    /// The suffix every name of this run carries.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// `obt-<suffix>-<role>`: a network namespace name.
    pub fn netns(&self, role: &str) -> String {
        format!("{NETNS_PREFIX}{}-{role}", self.suffix)
    }

    /// `observer-test-<suffix>[-<name>]`.
    pub fn long_name(&self, name: &str) -> String {
        if name.is_empty() {
            format!("{LONG_PREFIX}{}", self.suffix)
        } else {
            format!("{LONG_PREFIX}{}-{name}", self.suffix)
        }
    }

    /// A kubelet-shaped pod UID (8-4-4-4-12 hex) that encodes this run's pid.
    pub fn pod_uid(&self, n: u32) -> String {
        let r = random_u64();
        format!(
            "{UID_MARKER}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (self.pid >> 12) & 0xffff,
            self.pid & 0xfff,
            r & 0xfff,
            ((u64::from(self.counter) & 0xffff) << 32)
                | (u64::from(n) << 16)
                | ((r >> 16) & 0xffff)
        )
    }

    /// A 64-hex container id that starts with the marker and this run's pid.
    pub fn container_id(&self) -> String {
        format!(
            "{UID_MARKER}{:08x}{:016x}{:016x}{:016x}",
            self.pid,
            random_u64(),
            random_u64(),
            random_u64()
        )
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_base36(s: &str) -> Option<u32> {
    u32::from_str_radix(s, 36).ok()
}

/// The pid of the run that made a network namespace / state directory / host cgroup name.
pub fn pid_of_name(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(NETNS_PREFIX)
        .or_else(|| name.strip_prefix(LONG_PREFIX))?;
    parse_base36(rest.split('-').next()?)
}

/// The pid of the run that made a pod UID or container id (either `-` or `_` separated).
pub fn pid_of_uid(uid: &str) -> Option<u32> {
    let uid = uid.replace('_', "-");
    if let Some(rest) = uid.strip_prefix(&format!("{UID_MARKER}-")) {
        let mut groups = rest.split('-');
        let high = u32::from_str_radix(groups.next()?, 16).ok()?;
        let low = u32::from_str_radix(groups.next()?.get(1..)?, 16).ok()?;
        return Some((high << 12) | low);
    }
    let rest = uid.strip_prefix(UID_MARKER)?;
    u32::from_str_radix(rest.get(..8)?, 16).ok()
}

/// Whether a process with this pid exists now.
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_the_pid() {
        let run = RunId::new();
        let pid = std::process::id();
        assert_eq!(pid_of_name(&run.netns("pod-web")), Some(pid));
        assert_eq!(pid_of_name(&run.long_name("host")), Some(pid));
        let uid = run.pod_uid(3);
        assert_eq!(uid.len(), 36);
        assert_eq!(pid_of_uid(&uid), Some(pid));
        assert_eq!(pid_of_uid(&uid.replace('-', "_")), Some(pid));
        let id = run.container_id();
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(pid_of_uid(&id), Some(pid));
    }

    #[test]
    fn runs_differ() {
        assert_ne!(RunId::new().suffix(), RunId::new().suffix());
    }

    #[test]
    fn foreign_names_have_no_pid() {
        assert_eq!(pid_of_name("cni-1234"), None);
        assert_eq!(pid_of_uid("8f1c2d3e-0000-4000-8000-000000000000"), None);
    }
}
