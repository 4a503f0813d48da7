//! A pod's resolver configuration, read the way glibc reads it: the search list and `ndots`
//! decide which names the pod's queries walk through.
use std::{
    collections::HashMap,
    io::Read,
    net::IpAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    error::{Chain, PathIoError},
    scope::ScopeKey,
};

/// glibc's defaults and caps (resolv.h: RES_MAXNDOTS, RES_MAXRETRANS, RES_MAXRETRY, MAXNS).
pub const DEFAULT_NDOTS: u8 = 1;
pub const MAX_NDOTS: u8 = 15;
pub const DEFAULT_TIMEOUT_SECS: u8 = 5;
pub const MAX_TIMEOUT_SECS: u8 = 30;
pub const DEFAULT_ATTEMPTS: u8 = 2;
pub const MAX_ATTEMPTS: u8 = 5;
pub const MAX_NAMESERVERS: usize = 3;
/// glibc dropped the historical six-domain / 256-byte limit; observer keeps every domain
/// but bounds the list's total length so a hostile file cannot grow memory without end.
pub const MAX_SEARCH_TOTAL_BYTES: usize = 4096;
/// Larger files are refused outright: real ones are a few hundred bytes.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
const MAX_DOMAIN_BYTES: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvConf {
    /// In use order, at most [`MAX_NAMESERVERS`] (glibc ignores the rest).
    pub nameservers: Vec<IpAddr>,
    /// Lower case, without trailing dot, in order.
    pub search: Vec<String>,
    pub ndots: u8,
    pub timeout_secs: u8,
    pub attempts: u8,
    /// Other `options` flags as written (`rotate`, `edns0`, `single-request`, `use-vc`...).
    pub flags: Vec<String>,
    /// What glibc would silently skip or clamp, kept so it can be counted and shown.
    pub issues: Vec<ResolvConfIssue>,
}

impl Default for ResolvConf {
    fn default() -> Self {
        ResolvConf {
            nameservers: Vec::new(),
            search: Vec::new(),
            ndots: DEFAULT_NDOTS,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            attempts: DEFAULT_ATTEMPTS,
            flags: Vec::new(),
            issues: Vec::new(),
        }
    }
}

/// A line glibc tolerates but that did not mean what its author likely intended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvConfIssue {
    BadNameserver {
        line: usize,
        value: String,
    },
    /// More than [`MAX_NAMESERVERS`]: glibc uses only the first three.
    ExtraNameserver {
        line: usize,
        value: IpAddr,
    },
    /// A numeric option whose value glibc reads with `atoi` (non-numeric means 0) or clamps.
    OptionValueAdjusted {
        line: usize,
        option: String,
        written: String,
        used: u8,
    },
    BadSearchDomain {
        line: usize,
        value: String,
    },
    /// The search list passed [`MAX_SEARCH_TOTAL_BYTES`]; later domains were dropped.
    SearchListTruncated {
        line: usize,
        dropped: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ResolvConfError {
    #[error("resolv.conf is {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("resolv.conf contains a NUL byte at offset {offset}: not a text file")]
    Binary { offset: usize },
    #[error("process {pid} no longer belongs to {scope}: its pid was reused")]
    NotAMember { pid: u32, scope: String },
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Parses resolv.conf by glibc's rules: a keyword starts the line and is followed by a blank;
/// lines starting with `#` or `;` are comments; the last `search` or `domain` line wins;
/// `options` lines accumulate; `ndots` is capped at 15.
pub fn parse_resolv_conf(bytes: &[u8]) -> Result<ResolvConf, ResolvConfError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(ResolvConfError::TooLarge {
            len: bytes.len(),
            max: MAX_FILE_BYTES,
        });
    }
    if let Some(offset) = bytes.iter().position(|b| *b == 0) {
        return Err(ResolvConfError::Binary { offset });
    }
    let text = String::from_utf8_lossy(bytes);
    let mut conf = ResolvConf::default();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let Some((keyword, rest)) = split_keyword(line) else {
            continue;
        };
        match keyword {
            "nameserver" => parse_nameserver(&mut conf, line_no, rest),
            "search" => conf.search = parse_search(&mut conf.issues, line_no, rest),
            "domain" => {
                // `domain` sets a one-element search list from its first word.
                let first = rest.split_whitespace().next().unwrap_or("");
                conf.search = parse_search(&mut conf.issues, line_no, first);
            }
            "options" => {
                for option in rest.split_whitespace() {
                    parse_option(&mut conf, line_no, option);
                }
            }
            _ => {}
        }
    }
    Ok(conf)
}

/// glibc matches a keyword only at the very start of a line, followed by a space or tab.
fn split_keyword(line: &str) -> Option<(&str, &str)> {
    if line.starts_with('#') || line.starts_with(';') {
        return None;
    }
    let end = line.find([' ', '\t'])?;
    Some((&line[..end], &line[end..]))
}

fn parse_nameserver(conf: &mut ResolvConf, line: usize, rest: &str) {
    let Some(word) = rest.split_whitespace().next() else {
        conf.issues.push(ResolvConfIssue::BadNameserver {
            line,
            value: String::new(),
        });
        return;
    };
    // A link-local IPv6 server carries its interface: `fe80::1%eth0`.
    let address = word.split_once('%').map_or(word, |(addr, _)| addr);
    match address.parse::<IpAddr>() {
        Ok(ip) if conf.nameservers.len() < MAX_NAMESERVERS => conf.nameservers.push(ip),
        Ok(ip) => conf
            .issues
            .push(ResolvConfIssue::ExtraNameserver { line, value: ip }),
        Err(_) => conf.issues.push(ResolvConfIssue::BadNameserver {
            line,
            value: bounded(word),
        }),
    }
}

fn parse_search(issues: &mut Vec<ResolvConfIssue>, line: usize, rest: &str) -> Vec<String> {
    let mut search = Vec::new();
    let mut total = 0usize;
    let words: Vec<&str> = rest.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        let domain = word.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty()
            || domain.len() > MAX_DOMAIN_BYTES
            || domain
                .split('.')
                .any(|label| label.is_empty() || label.len() > 63)
        {
            issues.push(ResolvConfIssue::BadSearchDomain {
                line,
                value: bounded(word),
            });
            continue;
        }
        if total + domain.len() > MAX_SEARCH_TOTAL_BYTES {
            issues.push(ResolvConfIssue::SearchListTruncated {
                line,
                dropped: words.len() - i,
            });
            break;
        }
        total += domain.len();
        search.push(domain);
    }
    search
}

fn parse_option(conf: &mut ResolvConf, line: usize, option: &str) {
    let numeric = [
        ("ndots:", MAX_NDOTS),
        ("timeout:", MAX_TIMEOUT_SECS),
        ("attempts:", MAX_ATTEMPTS),
    ];
    for (prefix, cap) in numeric {
        if let Some(value) = option.strip_prefix(prefix) {
            let used = glibc_atoi_capped(value, cap);
            if value.parse::<u8>().ok() != Some(used) {
                conf.issues.push(ResolvConfIssue::OptionValueAdjusted {
                    line,
                    option: prefix.trim_end_matches(':').to_owned(),
                    written: bounded(value),
                    used,
                });
            }
            match prefix {
                "ndots:" => conf.ndots = used,
                "timeout:" => conf.timeout_secs = used,
                _ => conf.attempts = used,
            }
            return;
        }
    }
    if !conf.flags.iter().any(|f| f == option) {
        conf.flags.push(bounded(option));
    }
}

/// `atoi` then `min(cap)`: leading digits only, anything else reads as 0. Negative values are
/// read as 0 here (glibc's bitfield would wrap them; no real file writes one).
fn glibc_atoi_capped(text: &str, cap: u8) -> u8 {
    let digits: &str = {
        let end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        &text[..end]
    };
    if digits.is_empty() {
        return 0;
    }
    // Any number with more digits than u32 holds is over the cap anyway.
    digits
        .parse::<u32>()
        .map_or(cap, |n| u8::try_from(n.min(u32::from(cap))).unwrap_or(cap))
}

fn bounded(text: &str) -> String {
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Reads `<proc_root>/<pid>/root/etc/resolv.conf`: the file as the process sees it inside its
/// own mount namespace.
pub fn read_resolv_conf_of_pid(
    proc_root: &std::path::Path,
    pid: u32,
) -> Result<ResolvConf, ResolvConfError> {
    read_file_bounded(&proc_root.join(pid.to_string()).join("root/etc/resolv.conf"))
        .and_then(|bytes| parse_resolv_conf(&bytes))
}

/// As [`read_resolv_conf_of_pid`], but only while `pid` is still a member of `scope`: a pid
/// remembered for a pod may have exited and been reused by a process elsewhere, whose
/// resolv.conf is not the pod's. Both files are read through one open handle on
/// `/proc/<pid>`, which stays bound to the process it was opened for: if that process exits,
/// reads through it fail instead of reaching a newcomer with the same pid.
pub fn read_resolv_conf_of_member(
    proc_root: &std::path::Path,
    pid: u32,
    scope: &ScopeKey,
) -> Result<ResolvConf, ResolvConfError> {
    let dir = proc_root.join(pid.to_string());
    let handle = std::fs::File::open(&dir).map_err(PathIoError::at("open", dir.clone()))?;
    let base = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let cgroups = read_file_bounded(&base.join("cgroup"))?;
    if !member_of(&String::from_utf8_lossy(&cgroups), scope) {
        return Err(ResolvConfError::NotAMember {
            pid,
            scope: scope.to_string(),
        });
    }
    let bytes = read_file_bounded(&base.join("root/etc/resolv.conf"))?;
    drop(handle);
    parse_resolv_conf(&bytes)
}

/// Whether a process's `/proc/<pid>/cgroup` puts it in `scope`, by its cgroup2 line
/// (`0::<path>`). The path may be relative to the agent's cgroup namespace (`/../..`), so the
/// pod is recognised by its UID segment as the kubelet writes it under either driver
/// (`pod<uid>`, or `pod<uid with underscores>.slice`), not by parsing the whole path.
fn member_of(cgroup_file: &str, scope: &ScopeKey) -> bool {
    let Some(path) = cgroup_file.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let is_pod_segment = |segment: &str, uid: &str| {
        let Some(rest) = segment
            .strip_suffix(".slice")
            .unwrap_or(segment)
            .rsplit_once("pod")
            .map(|(_, rest)| rest)
        else {
            return false;
        };
        rest.len() == uid.len()
            && rest
                .bytes()
                .zip(uid.bytes())
                .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
    };
    match scope {
        ScopeKey::Pod(uid) => path.split('/').any(|segment| is_pod_segment(segment, uid)),
        ScopeKey::Host(_) => !path
            .split('/')
            .any(|segment| segment.starts_with("kubepods")),
    }
}

fn read_file_bounded(path: &std::path::Path) -> Result<Vec<u8>, ResolvConfError> {
    let file = std::fs::File::open(path).map_err(PathIoError::at("open", path))?;
    let mut bytes = Vec::new();
    // One byte past the limit tells "too large" from "exactly at the limit".
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(PathIoError::at("read", path))?;
    Ok(bytes)
}

#[derive(Clone, Debug)]
pub struct ResolvCacheConfig {
    /// `/proc` normally; tests point it at a tree of their own.
    pub proc_root: PathBuf,
    /// A cached file is re-read at most this often (resolv.conf rarely changes).
    pub refresh_interval: Duration,
    /// Pids remembered per scope to read the file through when one exits.
    pub pids_per_scope: usize,
    /// Scopes cached at most; beyond that the stalest entry is evicted.
    pub max_scopes: usize,
}

impl Default for ResolvCacheConfig {
    fn default() -> Self {
        ResolvCacheConfig {
            proc_root: PathBuf::from("/proc"),
            refresh_interval: Duration::from_secs(60),
            pids_per_scope: 8,
            max_scopes: 65_536,
        }
    }
}

struct ScopeResolv {
    conf: Option<Arc<ResolvConf>>,
    read_at: Option<Instant>,
    /// Most recent first.
    pids: Vec<u32>,
    last_error: Option<Arc<str>>,
    /// When a member pid was last looked for (see [`ResolvCache::get_or_discover`]).
    discovered_at: Option<Instant>,
}

impl ScopeResolv {
    /// Members are looked for only while nothing was read and no member is known, and at most
    /// once per interval. A pod's first DNS messages name no process (DNS is captured without
    /// one), and a one-shot client may be gone by the time its events are read: its members
    /// let its first lookup be read with its own search list.
    fn discovery_due(&self, now: Instant) -> bool {
        self.conf.is_none()
            && self.pids.is_empty()
            && self
                .discovered_at
                .is_none_or(|at| now.duration_since(at) >= DISCOVERY_INTERVAL)
    }

    /// Adds the members `discover` names (none if it was used already); whether any is new.
    fn discover(
        &mut self,
        now: Instant,
        discover: Option<impl FnOnce() -> Vec<u32>>,
        max: usize,
    ) -> bool {
        self.discovered_at = Some(now);
        let Some(discover) = discover else {
            return false;
        };
        let mut new_pid = false;
        for pid in discover().into_iter().take(max) {
            new_pid |= self.remember(pid, false);
        }
        new_pid
    }

    /// Records a member pid, `first` as the most recent; whether it was not known (a process
    /// not seen before may read what the earlier ones could not).
    fn remember(&mut self, pid: u32, first: bool) -> bool {
        if self.pids.contains(&pid) {
            if first {
                self.pids.retain(|p| *p != pid);
                self.pids.insert(0, pid);
            }
            return false;
        }
        if first {
            self.pids.insert(0, pid);
        } else {
            self.pids.push(pid);
        }
        true
    }
}

/// How often a scope with no known member pid is searched for one.
const DISCOVERY_INTERVAL: Duration = Duration::from_millis(100);

/// Per-scope resolv.conf, read through any live process of the scope.
pub struct ResolvCache {
    config: ResolvCacheConfig,
    scopes: Mutex<HashMap<ScopeKey, ScopeResolv>>,
    /// A missing privilege affects every pod alike: said once, not once per pod.
    permission_warned: AtomicBool,
}

impl ResolvCache {
    pub fn new(config: ResolvCacheConfig) -> Self {
        ResolvCache {
            config,
            scopes: Mutex::new(HashMap::new()),
            permission_warned: AtomicBool::new(false),
        }
    }

    /// Records `pid` as a member of `scope` and returns the scope's resolver configuration,
    /// reading it when absent or older than the refresh interval. On a failed read the last
    /// good configuration is kept.
    pub fn get(&self, scope: &ScopeKey, pid: Option<u32>) -> Option<Arc<ResolvConf>> {
        self.get_or_discover(scope, pid, Vec::new)
    }

    /// As [`ResolvCache::get`]; when the scope has neither a configuration nor a live known
    /// pid (none was given, or the one given has already exited), `discover` may name some
    /// (members of its pod), best first.
    pub fn get_or_discover(
        &self,
        scope: &ScopeKey,
        pid: Option<u32>,
        discover: impl FnOnce() -> Vec<u32>,
    ) -> Option<Arc<ResolvConf>> {
        let now = Instant::now();
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        if !scopes.contains_key(scope) && scopes.len() >= self.config.max_scopes {
            evict_stalest(&mut scopes);
        }
        let entry = scopes.entry(scope.clone()).or_insert_with(|| ScopeResolv {
            conf: None,
            read_at: None,
            pids: Vec::new(),
            last_error: None,
            discovered_at: None,
        });
        let mut discover = Some(discover);
        let mut new_pid = false;
        if let Some(pid) = pid {
            new_pid = entry.remember(pid, true);
        } else if entry.discovery_due(now) {
            new_pid = entry.discover(now, discover.take(), self.config.pids_per_scope);
        }
        entry.pids.truncate(self.config.pids_per_scope);
        let fresh = entry
            .read_at
            .is_some_and(|at| now.duration_since(at) < self.config.refresh_interval)
            && !(new_pid && entry.conf.is_none());
        if fresh || entry.pids.is_empty() {
            return entry.conf.clone();
        }
        // Count the attempt even when every pid fails, so a dead scope is not re-read per event.
        entry.read_at = Some(now);
        let mut found = self.read_members(entry, scope);
        // A pod's first event may name a one-shot client (one lookup, one connect) that has
        // exited by the time it is read, while its DNS events, which name no process, wait
        // behind it: read through the pod's other members rather than wait a recheck.
        if found.is_none() && entry.discovery_due(now) {
            entry.discover(now, discover.take(), self.config.pids_per_scope);
            found = self.read_members(entry, scope);
        }
        if let Some(conf) = found {
            if entry.conf.as_deref() != Some(&conf) {
                entry.conf = Some(Arc::new(conf));
            }
            entry.last_error = None;
        }
        entry.conf.clone()
    }

    /// Reads the scope's resolv.conf through its first live member; forgets the members that
    /// are gone or now belong elsewhere.
    fn read_members(&self, entry: &mut ScopeResolv, scope: &ScopeKey) -> Option<ResolvConf> {
        let mut live = Vec::with_capacity(entry.pids.len());
        let mut found = None;
        for pid in entry.pids.iter().copied() {
            if found.is_some() {
                live.push(pid);
                continue;
            }
            match read_resolv_conf_of_member(&self.config.proc_root, pid, scope) {
                Ok(conf) => {
                    found = Some(conf);
                    live.push(pid);
                }
                Err(ResolvConfError::NotAMember { .. }) => {
                    // Its pid now names a process elsewhere: forget it, try the next one.
                }
                Err(ResolvConfError::Io(PathIoError { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound
                        || source.raw_os_error() == Some(libc::ESRCH) =>
                {
                    // The process exited: forget it and try the next one.
                }
                Err(e) => {
                    if let ResolvConfError::Io(PathIoError { source, .. }) = &e
                        && source.kind() == std::io::ErrorKind::PermissionDenied
                        && !self.permission_warned.swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "{}: reading another process's /proc/<pid>/root needs CAP_SYS_PTRACE; \
                             without it pods' search lists are inferred from their queries",
                            Chain(&e)
                        );
                    }
                    entry.last_error = Some(Arc::from(Chain(&e).to_string()));
                    live.push(pid);
                }
            }
        }
        entry.pids = live;
        found
    }

    /// The last read error of a scope, for diagnostics.
    pub fn last_error(&self, scope: &ScopeKey) -> Option<Arc<str>> {
        let scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        scopes.get(scope).and_then(|s| s.last_error.clone())
    }

    /// Drops a scope (its pod was deleted).
    pub fn forget(&self, scope: &ScopeKey) {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        scopes.remove(scope);
    }
}

fn evict_stalest(scopes: &mut HashMap<ScopeKey, ScopeResolv>) {
    if let Some(key) = scopes
        .iter()
        .min_by_key(|(_, s)| s.read_at)
        .map(|(k, _)| k.clone())
    {
        scopes.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET: &str = "\
search simple-web-app.svc.cluster.local svc.cluster.local cluster.local another-lab.com
nameserver 10.96.0.10
options ndots:5
";

    #[test]
    fn kubelet_generated_file() {
        let conf = parse_resolv_conf(KUBELET.as_bytes()).unwrap();
        assert_eq!(
            conf.search,
            [
                "simple-web-app.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "another-lab.com"
            ]
        );
        assert_eq!(conf.nameservers, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(conf.ndots, 5);
        assert_eq!(conf.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(conf.attempts, DEFAULT_ATTEMPTS);
        assert!(conf.issues.is_empty(), "{:?}", conf.issues);
    }

    #[test]
    fn systemd_resolved_stub_and_host_file() {
        let text = "\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
# Do not edit.
nameserver 127.0.0.53
options edns0 trust-ad
search corp.example.com.
";
        let conf = parse_resolv_conf(text.as_bytes()).unwrap();
        assert_eq!(conf.search, ["corp.example.com"]);
        assert_eq!(conf.flags, ["edns0", "trust-ad"]);
        assert_eq!(conf.ndots, DEFAULT_NDOTS);
    }

    #[test]
    fn last_search_or_domain_wins_and_options_accumulate() {
        let text = "\
search a.example b.example
domain only.example extra.example
options ndots:2 timeout:3
options attempts:4 rotate
nameserver 2001:db8::53
nameserver fe80::1%eth0
";
        let conf = parse_resolv_conf(text.as_bytes()).unwrap();
        assert_eq!(conf.search, ["only.example"]);
        assert_eq!((conf.ndots, conf.timeout_secs, conf.attempts), (2, 3, 4));
        assert_eq!(conf.flags, ["rotate"]);
        assert_eq!(conf.nameservers.len(), 2);
        let text2 = "domain x.example\nsearch Y.Example z.example\n";
        let conf2 = parse_resolv_conf(text2.as_bytes()).unwrap();
        assert_eq!(conf2.search, ["y.example", "z.example"]);
    }

    #[test]
    fn comments_and_keyword_rules() {
        let text = "\
; search semicolon.example
#nameserver 198.18.0.1
  search indented.example
search\tkept.example
searchx not.example
nameserver 198.18.0.53 # trailing words are ignored
";
        let conf = parse_resolv_conf(text.as_bytes()).unwrap();
        assert_eq!(conf.search, ["kept.example"]);
        assert_eq!(conf.nameservers, ["198.18.0.53".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn ndots_is_capped_and_atoi_like() {
        let conf = parse_resolv_conf(b"options ndots:99\n").unwrap();
        assert_eq!(conf.ndots, MAX_NDOTS);
        assert!(matches!(
            conf.issues.as_slice(),
            [ResolvConfIssue::OptionValueAdjusted { used: 15, .. }]
        ));
        assert_eq!(parse_resolv_conf(b"options ndots:abc\n").unwrap().ndots, 0);
        assert_eq!(parse_resolv_conf(b"options ndots:3x\n").unwrap().ndots, 3);
        assert_eq!(
            parse_resolv_conf(b"options ndots:99999999999999999999\n")
                .unwrap()
                .ndots,
            MAX_NDOTS
        );
        assert_eq!(
            parse_resolv_conf(b"options timeout:100 attempts:9\n")
                .unwrap()
                .timeout_secs,
            MAX_TIMEOUT_SECS
        );
    }

    #[test]
    fn more_than_six_search_domains_are_kept_but_total_is_bounded() {
        let domains: Vec<String> = (0..10).map(|i| format!("d{i}.example")).collect();
        let conf = parse_resolv_conf(format!("search {}\n", domains.join(" ")).as_bytes()).unwrap();
        assert_eq!(conf.search, domains);
        let huge: Vec<String> = (0..2000).map(|i| format!("domain{i}.example")).collect();
        let conf = parse_resolv_conf(format!("search {}\n", huge.join(" ")).as_bytes()).unwrap();
        let total: usize = conf.search.iter().map(String::len).sum();
        assert!(total <= MAX_SEARCH_TOTAL_BYTES);
        assert!(
            conf.issues
                .iter()
                .any(|i| matches!(i, ResolvConfIssue::SearchListTruncated { .. }))
        );
    }

    #[test]
    fn malformed_lines_become_issues() {
        let text = format!(
            "nameserver not-an-ip\nnameserver \nsearch ok.example bad..example {}\nnameserver 198.18.0.1\nnameserver 198.18.0.2\nnameserver 198.18.0.3\nnameserver 198.18.0.4\n",
            "x".repeat(300)
        );
        let conf = parse_resolv_conf(text.as_bytes()).unwrap();
        assert_eq!(conf.search, ["ok.example"]);
        assert_eq!(conf.nameservers.len(), MAX_NAMESERVERS);
        let bad_ns = conf
            .issues
            .iter()
            .filter(|i| matches!(i, ResolvConfIssue::BadNameserver { .. }))
            .count();
        let bad_search = conf
            .issues
            .iter()
            .filter(|i| matches!(i, ResolvConfIssue::BadSearchDomain { .. }))
            .count();
        assert_eq!((bad_ns, bad_search), (2, 2));
        assert!(
            conf.issues
                .iter()
                .any(|i| matches!(i, ResolvConfIssue::ExtraNameserver { line: 7, .. }))
        );
    }

    #[test]
    fn hard_errors() {
        assert!(matches!(
            parse_resolv_conf(&vec![b'#'; MAX_FILE_BYTES + 1]),
            Err(ResolvConfError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_resolv_conf(b"nameserver 1\0.2.3.4\n"),
            Err(ResolvConfError::Binary { offset: 12 })
        ));
        // Not UTF-8 and empty files are still files glibc reads.
        assert_eq!(parse_resolv_conf(b"").unwrap(), ResolvConf::default());
        let latin1 = parse_resolv_conf(b"search caf\xe9.example ok.example\n").unwrap();
        assert_eq!(latin1.search.len(), 2);
    }

    fn fake_proc(tag: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!(
            "observer-resolv-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        base
    }

    const POD_UID: &str = "3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c";
    const POD_CGROUP: &str = "0::/kubepods.slice/kubepods-burstable.slice/\
        kubepods-burstable-pod3f6a2b1c_9d4e_4f5a_8b7c_0d1e2f3a4b5c.slice/\
        cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";

    /// A fake `/proc/<pid>` of a process of the pod [`POD_UID`].
    fn write_pid_resolv(proc_root: &std::path::Path, pid: u32, text: &str) {
        write_pid_files(proc_root, pid, POD_CGROUP, text);
    }

    fn write_pid_files(proc_root: &std::path::Path, pid: u32, cgroup: &str, resolv: &str) {
        let dir = proc_root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("root/etc")).unwrap();
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        std::fs::write(dir.join("root/etc/resolv.conf"), resolv).unwrap();
    }

    #[test]
    fn cache_reads_through_another_pid_when_one_exits_and_refreshes_on_schedule() {
        let proc_root = fake_proc("cache");
        write_pid_resolv(&proc_root, 100, KUBELET);
        write_pid_resolv(&proc_root, 200, KUBELET);
        // Two caches, so that no assertion depends on how fast the test runs: one whose
        // entries stay fresh for the whole test, one that re-reads on every lookup.
        let with_refresh = |refresh_interval| {
            ResolvCache::new(ResolvCacheConfig {
                proc_root: proc_root.clone(),
                refresh_interval,
                ..ResolvCacheConfig::default()
            })
        };
        let cached = with_refresh(Duration::from_secs(3600));
        let rereading = with_refresh(Duration::ZERO);
        let scope = ScopeKey::Pod(Arc::from(POD_UID));
        for cache in [&cached, &rereading] {
            assert_eq!(cache.get(&scope, Some(200)).unwrap().ndots, 5);
            cache.get(&scope, Some(100));
        }
        // pid 100 (most recent) exits; the file changes; once due it is re-read via 200.
        std::fs::remove_dir_all(proc_root.join("100")).unwrap();
        write_pid_resolv(
            &proc_root,
            200,
            "search other.svc.cluster.local\noptions ndots:2\n",
        );
        assert_eq!(
            cached.get(&scope, None).unwrap().ndots,
            5,
            "cached until refresh"
        );
        let conf = rereading.get(&scope, None).unwrap();
        assert_eq!(conf.ndots, 2);
        assert_eq!(conf.search, ["other.svc.cluster.local"]);
        // Every pid gone: the last good configuration stays.
        std::fs::remove_dir_all(proc_root.join("200")).unwrap();
        assert_eq!(rereading.get(&scope, None).unwrap().ndots, 2);
        std::fs::remove_dir_all(&proc_root).unwrap();
    }

    #[test]
    fn a_first_event_naming_an_exited_process_reads_through_the_pods_other_members() {
        let proc_root = fake_proc("exited");
        // pid 100, a one-shot client, has exited; pid 200 is the pod's main process.
        write_pid_resolv(&proc_root, 200, KUBELET);
        let cache = ResolvCache::new(ResolvCacheConfig {
            proc_root: proc_root.clone(),
            refresh_interval: Duration::from_secs(3600),
            ..ResolvCacheConfig::default()
        });
        let pod = ScopeKey::Pod(Arc::from(POD_UID));
        let conf = cache.get_or_discover(&pod, Some(100), || vec![200]);
        assert_eq!(conf.map(|c| c.ndots), Some(5), "read through pid 200");
        // A live process named by the event is read itself: the members are not listed.
        let other = ScopeKey::Pod(Arc::from("7c7c7c7c-0000-4000-8000-000000000002"));
        write_pid_files(
            &proc_root,
            300,
            "0::/kubepods/besteffort/pod7c7c7c7c-0000-4000-8000-000000000002/abc\n",
            KUBELET,
        );
        let conf = cache.get_or_discover(&other, Some(300), || {
            panic!("members listed although the event's process was read")
        });
        assert_eq!(conf.map(|c| c.ndots), Some(5));
        std::fs::remove_dir_all(&proc_root).unwrap();
    }

    #[test]
    fn reads_this_process_through_real_proc() {
        let cache = ResolvCache::new(ResolvCacheConfig::default());
        let scope = ScopeKey::Host(1);
        let ours = read_resolv_conf_of_pid(std::path::Path::new("/proc"), std::process::id());
        let via_cache = cache.get(&scope, Some(std::process::id()));
        match ours {
            Ok(conf) => assert_eq!(via_cache.as_deref(), Some(&conf)),
            Err(e) => panic!("this machine's /etc/resolv.conf through /proc: {e}"),
        }
    }

    #[test]
    fn a_reused_pid_never_lends_another_pods_resolv_conf() {
        let proc_root = fake_proc("reuse");
        write_pid_resolv(&proc_root, 300, KUBELET);
        let cache = ResolvCache::new(ResolvCacheConfig {
            proc_root: proc_root.clone(),
            refresh_interval: Duration::from_millis(20),
            ..ResolvCacheConfig::default()
        });
        let pod = ScopeKey::Pod(Arc::from(POD_UID));
        assert_eq!(cache.get(&pod, Some(300)).unwrap().ndots, 5);
        // pid 300 exits and is reused by a process of another pod with another search list.
        write_pid_files(
            &proc_root,
            300,
            "0::/kubepods/besteffort/pod9a9a9a9a-0000-4000-8000-000000000001/abc\n",
            "search elsewhere.svc.cluster.local\noptions ndots:1\n",
        );
        std::thread::sleep(Duration::from_millis(30));
        let conf = cache.get(&pod, None).unwrap();
        assert_eq!(
            conf.ndots, 5,
            "the other pod's file was taken for this pod's"
        );
        // A new scope that names the reused pid first gets nothing from it either.
        let fresh = ScopeKey::Pod(Arc::from("7c7c7c7c-0000-4000-8000-000000000002"));
        assert_eq!(cache.get(&fresh, Some(300)), None);
        std::fs::remove_dir_all(&proc_root).unwrap();
    }

    #[test]
    fn membership_is_read_from_the_cgroup2_line_under_any_cgroup_namespace() {
        let pod = ScopeKey::Pod(Arc::from(POD_UID));
        let host = ScopeKey::Host(7);
        let systemd = POD_CGROUP;
        let cgroupfs =
            format!("12:memory:/whatever\n0::/kubepods/burstable/pod{POD_UID}/0123abcd\n");
        // Seen from inside a container's own cgroup namespace: relative to its root.
        let namespaced = "0::/../../kubepods-burstable-pod3f6a2b1c_9d4e_4f5a_8b7c_0d1e2f3a4b5c.slice/cri-containerd-ab.scope\n";
        for file in [systemd, cgroupfs.as_str(), namespaced] {
            assert!(member_of(file, &pod), "{file}");
            assert!(!member_of(file, &host), "{file}");
        }
        let other_pod = "0::/kubepods/pod3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5d/x\n";
        assert!(!member_of(other_pod, &pod));
        let longer_uid = "0::/kubepods/pod3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c0/x\n";
        assert!(!member_of(longer_uid, &pod));
        let node = "0::/system.slice/containerd.service\n";
        assert!(member_of(node, &host));
        assert!(!member_of(node, &pod));
        // cgroup v1 only: no way to tell, so no.
        assert!(!member_of("4:cpu:/kubepods/x\n", &pod));
        assert!(!member_of("", &host));
    }

    #[test]
    fn a_proc_handle_stays_bound_to_the_process_it_was_opened_for() {
        // What read_resolv_conf_of_member relies on: after the process exits, reads through
        // the handle fail, so a newcomer that reuses the pid is never reached.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let handle = std::fs::File::open(format!("/proc/{}", child.id())).unwrap();
        let base = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        assert!(std::fs::read(base.join("cgroup")).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(std::fs::read(base.join("cgroup")).is_err());
        assert!(std::fs::read(base.join("root/etc/resolv.conf")).is_err());
    }
}
