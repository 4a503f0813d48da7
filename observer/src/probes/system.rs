//! What the loader needs from the running system: mounts (cgroup2, tracefs), capabilities,
//! and the tracepoint format files whose offsets the kernel programs assume.
use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use observer_common::tracepoints::Tracepoint;

use super::ProbeError;

pub(crate) const MOUNTINFO: &str = "/proc/self/mountinfo";
const STATUS: &str = "/proc/self/status";
/// Where tracefs is mounted when nothing has mounted it yet.
pub(crate) const TRACEFS_DEFAULT: &str = "/sys/kernel/tracing";
const TRACEFS_LEGACY: &str = "/sys/kernel/debug/tracing";

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

/// Finds tracefs, mounting it at its usual place when nothing has.
pub(crate) fn ensure_tracefs(mounts: &[Mount]) -> Result<PathBuf, ProbeError> {
    let tracefs = |path: &str| {
        mounts
            .iter()
            .any(|m| m.fs_type == "tracefs" && m.mount_point == Path::new(path))
    };
    if tracefs(TRACEFS_DEFAULT) {
        return Ok(TRACEFS_DEFAULT.into());
    }
    if tracefs(TRACEFS_LEGACY) {
        return Ok(TRACEFS_LEGACY.into());
    }
    mount_tracefs(Path::new(TRACEFS_DEFAULT))?;
    Ok(TRACEFS_DEFAULT.into())
}

fn mount_tracefs(target: &Path) -> Result<(), ProbeError> {
    let failed = |source| ProbeError::TracefsUnavailable {
        path: target.to_owned(),
        source,
    };
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // `data` may be null for tracefs.
    let ret = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target_c.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Capabilities the probes need that the effective set lacks, by name.
pub fn missing_capabilities(effective: u64, need_mount: bool) -> Vec<&'static str> {
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
    if need_mount && !admin {
        missing.push("CAP_SYS_ADMIN");
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

pub(crate) fn check_capabilities(need_mount: bool) -> Result<(), ProbeError> {
    let status = fs::read_to_string(STATUS).map_err(|source| ProbeError::ReadSystemFile {
        path: STATUS.into(),
        source,
    })?;
    let effective =
        parse_effective_capabilities(&status).ok_or_else(|| ProbeError::ReadSystemFile {
            path: STATUS.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no CapEff line"),
        })?;
    let missing = missing_capabilities(effective, need_mount);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::MissingCapabilities { missing })
    }
}

/// One `field:` line of a tracepoint format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Why a tracepoint format file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("line {line}: {reason}")]
    BadField { line: usize, reason: &'static str },
    #[error("no fields")]
    NoFields,
}

/// The declared name in `unsigned short common_type`, `__u8 saddr[4]`, `struct sockaddr * uservaddr`.
fn declared_name(declaration: &str) -> Option<&str> {
    let last = declaration.split_whitespace().last()?;
    let name = last.trim_start_matches('*');
    let name = name.split('[').next()?;
    (!name.is_empty()).then_some(name)
}

/// Parses `events/<category>/<name>/format`.
pub fn parse_format(text: &str) -> Result<Vec<FormatField>, FormatError> {
    let mut fields = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let Some(rest) = line.trim_start().strip_prefix("field:") else {
            continue;
        };
        let bad = |reason| FormatError::BadField {
            line: line_no,
            reason,
        };
        let mut parts = rest.split(';').map(str::trim);
        let declaration = parts.next().ok_or(bad("empty field"))?;
        let name = declared_name(declaration).ok_or(bad("no field name"))?;
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(v.parse().map_err(|_| bad("offset is not a number"))?);
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.parse().map_err(|_| bad("size is not a number"))?);
            }
        }
        fields.push(FormatField {
            name: name.to_owned(),
            offset: offset.ok_or(bad("no offset"))?,
            size: size.ok_or(bad("no size"))?,
        });
    }
    if fields.is_empty() {
        return Err(FormatError::NoFields);
    }
    Ok(fields)
}

/// Compares what the kernel programs assume about one tracepoint with its format file text.
pub fn check_layout(assumed: &Tracepoint, format: &str) -> Result<(), LayoutError> {
    let fields = parse_format(format).map_err(|source| LayoutError::Format {
        tracepoint: format!("{}/{}", assumed.category, assumed.name),
        source,
    })?;
    for want in assumed.fields {
        let found = fields.iter().find(|f| f.name == want.name);
        if found.is_none_or(|f| f.offset != want.offset || f.size != want.size) {
            return Err(LayoutError::Mismatch {
                tracepoint: format!("{}/{}", assumed.category, assumed.name),
                field: want.name,
                expected_offset: want.offset,
                expected_size: want.size,
                found: found.map(|f| (f.offset, f.size)),
            });
        }
    }
    Ok(())
}

/// A tracepoint on this kernel does not look the way the kernel programs read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("tracepoint {tracepoint}: unreadable format file: {source}")]
    Format {
        tracepoint: String,
        source: FormatError,
    },
    #[error(
        "tracepoint {tracepoint}: field `{field}` expected at offset {expected_offset} size {expected_size}, kernel has {}",
        match found { Some((o, s)) => format!("offset {o} size {s}"), None => "no such field".to_owned() }
    )]
    Mismatch {
        tracepoint: String,
        field: &'static str,
        expected_offset: usize,
        expected_size: usize,
        found: Option<(usize, usize)>,
    },
}

/// Checks every tracepoint the programs read against this kernel's format files.
pub(crate) fn verify_tracepoints(tracefs: &Path, assumed: &[Tracepoint]) -> Result<(), ProbeError> {
    for tracepoint in assumed {
        let path = tracefs
            .join("events")
            .join(tracepoint.category)
            .join(tracepoint.name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| ProbeError::ReadSystemFile {
            path: path.clone(),
            source,
        })?;
        check_layout(tracepoint, &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::tracepoints::{ASSUMED, Field};

    const SET_STATE: &str = include_str!("testdata/inet_sock_set_state.format");
    const ENTER_CONNECT: &str = include_str!("testdata/sys_enter_connect.format");
    const EXIT_CONNECT: &str = include_str!("testdata/sys_exit_connect.format");
    const RESET: &str = include_str!("testdata/tcp_receive_reset.format");
    const MOUNTINFO_HYBRID: &str = include_str!("testdata/mountinfo.txt");

    fn fixture(name: &str) -> &'static str {
        match name {
            "inet_sock_set_state" => SET_STATE,
            "sys_enter_connect" => ENTER_CONNECT,
            "sys_exit_connect" => EXIT_CONNECT,
            "tcp_receive_reset" => RESET,
            other => panic!("no fixture for {other}"),
        }
    }

    #[test]
    fn parses_fields_of_a_real_format_file() {
        let fields = parse_format(SET_STATE).unwrap();
        let get = |n: &str| fields.iter().find(|f| f.name == n).unwrap();
        assert_eq!(fields[0].name, "common_type");
        assert_eq!((get("skaddr").offset, get("skaddr").size), (8, 8));
        assert_eq!((get("saddr").offset, get("saddr").size), (32, 4));
        assert_eq!((get("daddr_v6").offset, get("daddr_v6").size), (56, 16));
        let enter = parse_format(ENTER_CONNECT).unwrap();
        assert!(
            enter
                .iter()
                .any(|f| f.name == "uservaddr" && f.offset == 24 && f.size == 8)
        );
    }

    #[test]
    fn programs_match_this_kernels_format_files() {
        for tracepoint in ASSUMED {
            check_layout(tracepoint, fixture(tracepoint.name)).unwrap();
        }
    }

    #[test]
    fn a_moved_field_is_reported_with_both_layouts() {
        let moved = SET_STATE.replace("offset:20;", "offset:22;");
        let err = check_layout(
            ASSUMED
                .iter()
                .find(|t| t.name == "inet_sock_set_state")
                .unwrap(),
            &moved,
        )
        .unwrap_err();
        assert_eq!(
            err,
            LayoutError::Mismatch {
                tracepoint: "sock/inet_sock_set_state".into(),
                field: "newstate",
                expected_offset: 20,
                expected_size: 4,
                found: Some((22, 4)),
            }
        );
        assert!(err.to_string().contains("kernel has offset 22 size 4"));
    }

    #[test]
    fn a_missing_field_is_reported() {
        let assumed = Tracepoint {
            category: "tcp",
            name: "tcp_receive_reset",
            fields: &[Field {
                name: "oldstate",
                offset: 16,
                size: 4,
            }],
        };
        assert!(matches!(
            check_layout(&assumed, RESET),
            Err(LayoutError::Mismatch { found: None, .. })
        ));
    }

    #[test]
    fn malformed_format_files_are_errors_not_panics() {
        assert_eq!(parse_format(""), Err(FormatError::NoFields));
        assert_eq!(
            parse_format("name: x\nformat:\n"),
            Err(FormatError::NoFields)
        );
        assert!(matches!(
            parse_format("\tfield:int x;\toffset:abc;\tsize:4;"),
            Err(FormatError::BadField { line: 1, .. })
        ));
        assert!(matches!(
            parse_format("\tfield:int x;\tsize:4;"),
            Err(FormatError::BadField { line: 1, .. })
        ));
        assert!(matches!(
            parse_format("\tfield:;offset:0;size:4;"),
            Err(FormatError::BadField { .. })
        ));
    }

    #[test]
    fn finds_cgroup2_and_tracefs_in_a_hybrid_mountinfo() {
        let mounts = parse_mountinfo(MOUNTINFO_HYBRID);
        assert_eq!(
            cgroup2_root(&mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert!(
            mounts
                .iter()
                .any(|m| m.fs_type == "tracefs" && m.mount_point == Path::new(TRACEFS_DEFAULT))
        );
        assert_eq!(ensure_tracefs(&mounts).unwrap(), Path::new(TRACEFS_DEFAULT));
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
        assert!(missing_capabilities(root, true).is_empty());
        assert_eq!(
            missing_capabilities(0, true),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        let bpf_only = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(bpf_only, false).is_empty());
        assert_eq!(missing_capabilities(bpf_only, true), vec!["CAP_SYS_ADMIN"]);
    }
}
