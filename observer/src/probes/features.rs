//! Kernel features the probes need, probed before loading: on a kernel that lacks one, the
//! agent refuses to start with a message naming the feature and the first kernel that has
//! it, instead of a verifier or attach error that names neither.
use std::{fmt, fs, io, os::fd::FromRawFd as _};

use aya::{maps::MapType, sys::is_map_supported};

use super::ProbeError;

const FILESYSTEMS: &str = "/proc/filesystems";

/// A kernel facility observer cannot run without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFeature {
    /// The unified cgroup hierarchy: the programs attach to a cgroup2 directory and pods are
    /// told apart by cgroup2 ids.
    Cgroup2,
    /// `BPF_MAP_TYPE_RINGBUF`: both event rings.
    RingBuffer,
    /// `cgroup/sock_release` programs: a connect's end when its socket is closed.
    SockRelease,
}

impl KernelFeature {
    pub const ALL: [Self; 3] = [Self::Cgroup2, Self::RingBuffer, Self::SockRelease];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cgroup2 => "the cgroup2 filesystem",
            Self::RingBuffer => "BPF ring buffer maps (BPF_MAP_TYPE_RINGBUF)",
            Self::SockRelease => "cgroup/sock_release programs (BPF_CGROUP_INET_SOCK_RELEASE)",
        }
    }

    /// The first Linux release that has the feature.
    pub fn min_kernel(self) -> &'static str {
        match self {
            Self::Cgroup2 => "4.5",
            Self::RingBuffer => "5.8",
            Self::SockRelease => "5.9",
        }
    }
}

impl fmt::Display for KernelFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux {}+)", self.name(), self.min_kernel())
    }
}

/// What probing the running kernel found, one answer per [`KernelFeature`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    pub cgroup2: bool,
    pub ring_buffer: bool,
    pub sock_release: bool,
}

impl KernelFeatures {
    /// Asks the running kernel (needs CAP_BPF or CAP_SYS_ADMIN for the BPF probes).
    pub fn probe() -> Result<Self, ProbeError> {
        let filesystems =
            fs::read_to_string(FILESYSTEMS).map_err(|source| ProbeError::ReadSystemFile {
                path: FILESYSTEMS.into(),
                source,
            })?;
        let ring_buffer =
            is_map_supported(MapType::RingBuf).map_err(|e| ProbeError::FeatureProbe {
                feature: KernelFeature::RingBuffer,
                source: e.io_error,
            })?;
        Ok(Self {
            cgroup2: has_cgroup2(&filesystems),
            ring_buffer,
            sock_release: sock_release_supported()?,
        })
    }

    pub fn has(&self, feature: KernelFeature) -> bool {
        match feature {
            KernelFeature::Cgroup2 => self.cgroup2,
            KernelFeature::RingBuffer => self.ring_buffer,
            KernelFeature::SockRelease => self.sock_release,
        }
    }

    pub fn missing(&self) -> Vec<KernelFeature> {
        KernelFeature::ALL
            .into_iter()
            .filter(|f| !self.has(*f))
            .collect()
    }

    /// `Ok` when every feature is there; otherwise the error naming what is missing.
    pub fn require_all(&self) -> Result<(), ProbeError> {
        let missing = self.missing();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ProbeError::MissingKernelFeatures { missing })
        }
    }
}

/// The newest first release among `features`: the kernel to upgrade to.
pub fn min_kernel_for(features: &[KernelFeature]) -> &'static str {
    features
        .iter()
        .map(|f| f.min_kernel())
        .max_by_key(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
        })
        .unwrap_or("")
}

/// Whether `/proc/filesystems` text lists cgroup2.
fn has_cgroup2(filesystems: &str) -> bool {
    filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("cgroup2"))
}

/// Loads the smallest `cgroup_sock` program with the sock_release attach type: kernels
/// before 5.9 reject that attach type with EINVAL. aya probes program types, not attach
/// types, so this asks the kernel directly.
fn sock_release_supported() -> Result<bool, ProbeError> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
    const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
    // r0 = 1 (keep the socket); exit.
    const PROGRAM: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    const LICENSE: &[u8] = b"GPL\0";

    /// The head of `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`
    /// (Linux 4.17); the kernel zero-fills the fields after it.
    #[repr(C, align(8))]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET_SOCK_RELEASE,
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size passed, and the
    // instructions and license it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us alone.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        Some(libc::EPERM) => Err(ProbeError::PermissionDenied {
            op: "probing kernel features",
            source: error,
        }),
        _ => Err(ProbeError::FeatureProbe {
            feature: KernelFeature::SockRelease,
            source: error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_PRESENT: KernelFeatures = KernelFeatures {
        cgroup2: true,
        ring_buffer: true,
        sock_release: true,
    };

    /// The refusal for `found`, as the agent prints it.
    fn refusal(found: KernelFeatures) -> String {
        found
            .require_all()
            .expect_err("a missing feature refuses to start")
            .to_string()
    }

    #[test]
    fn a_kernel_with_every_feature_is_accepted() {
        assert!(ALL_PRESENT.missing().is_empty());
        ALL_PRESENT.require_all().expect("nothing missing");
    }

    #[test]
    fn a_kernel_without_cgroup2_is_refused_naming_it_and_linux_4_5() {
        let found = KernelFeatures {
            cgroup2: false,
            ..ALL_PRESENT
        };
        assert_eq!(found.missing(), vec![KernelFeature::Cgroup2]);
        let message = refusal(found);
        assert!(
            message.contains("cgroup2 filesystem (Linux 4.5+)"),
            "{message}"
        );
        assert!(message.contains("Linux 4.5 or newer"), "{message}");
    }

    #[test]
    fn a_kernel_without_ring_buffers_is_refused_naming_them_and_linux_5_8() {
        let found = KernelFeatures {
            ring_buffer: false,
            ..ALL_PRESENT
        };
        assert_eq!(found.missing(), vec![KernelFeature::RingBuffer]);
        let message = refusal(found);
        assert!(
            message.contains("BPF_MAP_TYPE_RINGBUF) (Linux 5.8+)"),
            "{message}"
        );
        assert!(message.contains("Linux 5.8 or newer"), "{message}");
    }

    #[test]
    fn a_kernel_without_sock_release_is_refused_naming_it_and_linux_5_9() {
        let found = KernelFeatures {
            sock_release: false,
            ..ALL_PRESENT
        };
        assert_eq!(found.missing(), vec![KernelFeature::SockRelease]);
        let message = refusal(found);
        assert!(
            message.contains("cgroup/sock_release programs"),
            "{message}"
        );
        assert!(message.contains("Linux 5.9 or newer"), "{message}");
    }

    #[test]
    fn several_missing_features_name_each_and_the_newest_minimum() {
        let found = KernelFeatures {
            cgroup2: true,
            ring_buffer: false,
            sock_release: false,
        };
        let message = refusal(found);
        assert!(
            message.contains("RINGBUF") && message.contains("sock_release"),
            "{message}"
        );
        assert!(message.contains("Linux 5.9 or newer"), "{message}");
        assert_eq!(min_kernel_for(&KernelFeature::ALL), "5.9");
    }

    #[test]
    fn cgroup2_is_read_from_proc_filesystems() {
        assert!(has_cgroup2("nodev\tsysfs\nnodev\tcgroup\nnodev\tcgroup2\n"));
        assert!(!has_cgroup2("nodev\tsysfs\nnodev\tcgroup\n"));
        assert!(!has_cgroup2(""));
    }
}
