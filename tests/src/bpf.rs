//! The kernel's view of bpf objects, for tests that check what observer loads, holds and
//! leaves behind: the bpf fds of a process, whether a program still exists, and what is
//! attached to the cgroup2 root.
use std::path::Path;

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

/// Program ids attached to the cgroup2 root, over every cgroup attach type.
///
/// Asked of the kernel directly (BPF_PROG_QUERY per attach type, with the query's fields
/// every kernel since 4.15 knows) rather than through bpftool: Debian's bpftool lists
/// nothing and exits 255 on 5.10, where it fails every query. Only cgroup attach types are
/// asked: for others (tcx, netkit) the same field is an interface index, not a cgroup. A
/// type the kernel does not know yet answers EINVAL and is passed over.
pub fn attached_to_cgroup_root() -> Vec<u32> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    /// The cgroup attach types of `enum bpf_attach_type` (uapi linux/bpf.h): inet
    /// ingress/egress, sock create, sock_ops, device, bind and connect (v4, v6), post_bind,
    /// UDP sendmsg, sysctl, UDP recvmsg, get/setsockopt, getpeername/getsockname,
    /// sock_release, and the unix-socket hooks of 6.7. LSM_CGROUP is left out, as bpftool
    /// does: observer attaches no LSM program.
    const CGROUP_ATTACH_TYPES: &[u32] = &[
        0, 1, 2, 3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 29, 30, 31, 32, 34, 49,
        50, 51, 52, 53,
    ];
    /// The query's part of `union bpf_attr` up to `prog_cnt`, which every kernel since 4.15
    /// understands; the padding after it must be zero.
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        padding: u32,
    }
    let root = crate::cgroup2_mount().expect("finding the cgroup2 mount");
    let dir =
        std::fs::File::open(&root).unwrap_or_else(|e| panic!("opening {}: {e}", root.display()));
    let mut ids = Vec::new();
    for &attach_type in CGROUP_ATTACH_TYPES {
        // Other tests' agents attach and detach at any time: a list that grew past the
        // buffer between two calls (ENOSPC) is asked for again with more room.
        let mut room = 64;
        loop {
            let mut buffer = vec![0u32; room];
            let mut query = Query {
                target_fd: dir.as_raw_fd() as u32,
                attach_type,
                query_flags: 0,
                attach_flags: 0,
                prog_ids: buffer.as_mut_ptr() as u64,
                prog_cnt: room as u32,
                padding: 0,
            };
            // SAFETY: bpf(2) reads `size_of::<Query>()` bytes of a live, initialised struct
            // and writes at most `prog_cnt` ids into `buffer`, which outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    &mut query as *mut Query,
                    size_of::<Query>(),
                )
            };
            if rc == 0 {
                ids.extend_from_slice(&buffer[..query.prog_cnt as usize]);
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINVAL) => break,
                Some(libc::ENOSPC) => room = query.prog_cnt as usize + 64,
                _ => panic!(
                    "BPF_PROG_QUERY of attach type {attach_type} on {}: {}",
                    root.display(),
                    std::io::Error::last_os_error()
                ),
            }
        }
    }
    ids.sort_unstable();
    ids
}
