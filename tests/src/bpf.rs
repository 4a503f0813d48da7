//! The kernel's view of bpf objects, for tests that check what observer loads, holds and
//! leaves behind: the bpf fds of a process, whether a program still exists, and what is
//! attached to the cgroup2 root.
use std::{path::Path, process::Command};

/// The bpf objects a process holds open: programs, maps, links, and the perf events that
/// tracepoint programs are attached through.
#[derive(Clone, Debug, Default)]
pub struct BpfFds {
    /// Anonymous inode kind of each such fd (`bpf-prog`, `bpf-map`, `bpf_link`,
    /// `[perf_event]`), in fd order.
    pub kinds: Vec<String>,
    /// The ids of the programs among them, in fd order.
    pub program_ids: Vec<u32>,
}

/// The bpf fds of `/proc/<proc>/fd` (`proc` is a pid or `self`).
pub fn bpf_fds(proc: &str) -> BpfFds {
    let fd_dir = format!("/proc/{proc}/fd");
    let fdinfo_dir = format!("/proc/{proc}/fdinfo");
    let mut fds = BpfFds::default();
    for entry in std::fs::read_dir(&fd_dir).expect("fd dir").flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let Some(kind) = target.strip_prefix("anon_inode:") else {
            continue;
        };
        if !matches!(kind, "bpf-prog" | "bpf-map" | "bpf_link" | "[perf_event]") {
            continue;
        }
        if kind == "bpf-prog" {
            let info = std::fs::read_to_string(Path::new(&fdinfo_dir).join(entry.file_name()))
                .unwrap_or_default();
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
            {
                fds.program_ids.push(id);
            }
        }
        fds.kinds.push(kind.to_owned());
    }
    fds
}

/// Ids of the bpf programs a process holds open, sorted, each once.
pub fn program_ids_of(pid: u32) -> Vec<u32> {
    let mut ids = bpf_fds(&pid.to_string()).program_ids;
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the kernel still has a program with this id (BPF_PROG_GET_FD_BY_ID).
pub fn program_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<GetFdById>()` bytes of a live, initialised struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const GetFdById,
            size_of::<GetFdById>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fd the call above just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// Program ids attached to the cgroup2 root (bpftool's view of the kernel's attach lists).
///
/// Other tests' agents attach and detach on the same root at any time, under bpftool's
/// listing: an output that does not parse is taken again a few times, then the test fails
/// with what bpftool said.
pub fn attached_to_cgroup_root() -> Vec<u32> {
    let root = crate::cgroup2_mount().expect("finding the cgroup2 mount");
    let mut attempt = 0;
    let v: serde_json::Value = loop {
        attempt += 1;
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&root)
            .output()
            .expect("running bpftool (package bpftool)");
        let parsed = if !out.status.success() {
            Err(format!("exit {}", out.status))
        } else if out.stdout.trim_ascii().is_empty() {
            // Nothing attached: bpftool prints no JSON at all, not an empty array.
            Ok(serde_json::Value::Array(Vec::new()))
        } else {
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
        };

        match parsed {
            Ok(v) => break v,
            Err(e) if attempt < 5 => {
                eprintln!("bpftool cgroup show, attempt {attempt}: {e}; taking it again");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("bpftool cgroup show: {e}: {out:?}"),
        }
    };
    let mut ids: Vec<u32> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64().map(|id| id as u32))
        .collect();
    ids.sort_unstable();
    ids
}
