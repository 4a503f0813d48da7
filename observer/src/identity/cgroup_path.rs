//! What a cgroup v2 path says about the process inside it: which pod, which QoS class,
//! which container and runtime. Pure string parsing: the kubelet writes these paths for both
//! of its cgroup drivers, and nothing else on the node is needed to read them.
use std::{fmt, sync::Arc};

/// The kubelet's cgroup driver, as recognised from the path's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/...`
    Systemd,
    /// `kubepods/burstable/pod<uid>/<container id>`
    Cgroupfs,
}

/// A pod's QoS class, from the cgroup level the kubelet placed it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosClass {
    /// No QoS level in the path: guaranteed pods sit directly under `kubepods`.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

/// The container runtime that named the container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContainerRuntime {
    Containerd,
    CriO,
    Docker,
    /// The cgroupfs driver with containerd or Docker writes the bare id: the runtime is not
    /// in the path.
    Unknown,
}

impl ContainerRuntime {
    /// The scheme the kubelet uses in `status.containerStatuses[].containerID`.
    pub const fn scheme(self) -> Option<&'static str> {
        match self {
            ContainerRuntime::Containerd => Some("containerd"),
            ContainerRuntime::CriO => Some("cri-o"),
            ContainerRuntime::Docker => Some("docker"),
            ContainerRuntime::Unknown => None,
        }
    }
}

/// A container id as runtimes print it: 64 lower-case hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(Arc<str>);

impl ContainerId {
    /// Accepts exactly 64 hex digits (any case); stores lower case.
    pub fn parse(text: &str) -> Result<Self, CgroupPathError> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CgroupPathError::BadContainerId {
                value: truncate_for_error(text),
            });
        }
        Ok(ContainerId(Arc::from(text.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pod UID in the form the API server and `ScopeKey::Pod` use: dashed, lower case.
/// Static pods carry the kubelet's 32-hex config hash instead, kept as is (lower case).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(Arc<str>);

impl PodUid {
    /// Accepts `8-4-4-4-12` hex with dashes, the systemd driver's underscore form of it, or
    /// 32 hex digits (a static pod's config hash).
    pub fn parse(text: &str) -> Result<Self, CgroupPathError> {
        let dashed: String = text
            .chars()
            .map(|c| {
                if c == '_' {
                    '-'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        let bytes = dashed.as_bytes();
        let is_hex = |b: &u8| b.is_ascii_hexdigit();
        let valid = match bytes.len() {
            36 => bytes.iter().enumerate().all(|(i, b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    *b == b'-'
                } else {
                    is_hex(b)
                }
            }),
            32 => bytes.iter().all(is_hex),
            _ => false,
        };
        if !valid {
            return Err(CgroupPathError::MalformedPodUid {
                value: truncate_for_error(text),
            });
        }
        Ok(PodUid(Arc::from(dashed)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_arc(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What lives in a cgroup below a pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PodMember {
    /// The pod's own cgroup, with no container below it in the path.
    PodLevel,
    /// A container (including the pause/sandbox container, which only the API can tell apart).
    Container {
        id: ContainerId,
        runtime: ContainerRuntime,
    },
    /// CRI-O's `crio-conmon-<id>` monitor process: runtime plumbing, not the container.
    ConmonMonitor { id: ContainerId },
}

/// A cgroup that belongs to a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    pub uid: PodUid,
    pub qos: QosClass,
    pub driver: CgroupDriver,
    pub member: PodMember,
}

impl PodCgroup {
    /// The container's id when the cgroup is a container's (not conmon, not the pod level).
    pub fn container_id(&self) -> Option<&ContainerId> {
        match &self.member {
            PodMember::Container { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// The verdict on a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CgroupOwner {
    Pod(PodCgroup),
    /// Not under the kubelet's pod hierarchy (or the `kubepods` / QoS levels themselves).
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupPathError {
    #[error("malformed pod uid {value:?}")]
    MalformedPodUid { value: String },
    #[error("bad container id {value:?}: expected 64 hex digits")]
    BadContainerId { value: String },
    #[error("unexpected cgroup {component:?} under {parent:?} in the kubelet's pod hierarchy")]
    UnexpectedComponent { parent: String, component: String },
    #[error("container cgroup {component:?} is not named by a known runtime")]
    UnknownContainerCgroup { component: String },
}

/// Errors echo at most this much of the offending text (paths can be long, ids hostile).
const ERROR_ECHO_MAX: usize = 96;

fn truncate_for_error(text: &str) -> String {
    let mut end = text.len().min(ERROR_ECHO_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Reads a cgroup v2 path (relative to the cgroup2 mount, leading `/` optional) as written by
/// the kubelet with either driver. Paths outside `kubepods` are `Host`; paths inside it that
/// break the kubelet's naming are errors, so a surprise is reported rather than guessed at.
pub fn parse_cgroup_path(path: &str) -> Result<CgroupOwner, CgroupPathError> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // Nested setups (kind, kubelet in a container) put the kubelet's root below other levels,
    // and some name it `kubelet-kubepods.slice`: find the first `kubepods` level wherever it is.
    let Some(root_index) = components
        .iter()
        .position(|c| *c == "kubepods" || c.ends_with("kubepods.slice"))
    else {
        return Ok(CgroupOwner::Host);
    };
    let root = components[root_index];
    let rest = &components[root_index + 1..];
    match root.strip_suffix(".slice") {
        Some(prefix) => parse_systemd(prefix, root, rest),
        None => parse_cgroupfs(root, rest),
    }
}

fn parse_systemd(prefix: &str, root: &str, rest: &[&str]) -> Result<CgroupOwner, CgroupPathError> {
    let Some(first) = rest.first() else {
        return Ok(CgroupOwner::Host);
    };
    let unexpected = |parent: &str, component: &str| CgroupPathError::UnexpectedComponent {
        parent: truncate_for_error(parent),
        component: truncate_for_error(component),
    };
    let qos_of = |c: &str| {
        let level = c.strip_prefix(prefix)?.strip_suffix(".slice")?;
        match level {
            "-burstable" => Some(QosClass::Burstable),
            "-besteffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    };
    let (qos, pod_component, below) = if let Some(qos) = qos_of(first) {
        let Some(pod_component) = rest.get(1) else {
            return Ok(CgroupOwner::Host);
        };
        (qos, *pod_component, &rest[2..])
    } else {
        (QosClass::Guaranteed, *first, &rest[1..])
    };
    let qos_infix = match qos {
        QosClass::Guaranteed => "",
        QosClass::Burstable => "-burstable",
        QosClass::BestEffort => "-besteffort",
    };
    let uid_text = pod_component
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix(qos_infix))
        .and_then(|s| s.strip_prefix("-pod"))
        .and_then(|s| s.strip_suffix(".slice"))
        .ok_or_else(|| unexpected(root, pod_component))?;
    let uid = PodUid::parse(uid_text)?;
    let member = match below.first() {
        None => PodMember::PodLevel,
        Some(container) => {
            let Some(scope) = container.strip_suffix(".scope") else {
                return Err(unexpected(pod_component, container));
            };
            parse_container_component(scope)?
        }
    };
    Ok(CgroupOwner::Pod(PodCgroup {
        uid,
        qos,
        driver: CgroupDriver::Systemd,
        member,
    }))
}

fn parse_cgroupfs(root: &str, rest: &[&str]) -> Result<CgroupOwner, CgroupPathError> {
    let Some(first) = rest.first() else {
        return Ok(CgroupOwner::Host);
    };
    let (qos, pod_component, below) = match *first {
        "burstable" | "besteffort" => {
            let qos = if *first == "burstable" {
                QosClass::Burstable
            } else {
                QosClass::BestEffort
            };
            let Some(pod_component) = rest.get(1) else {
                return Ok(CgroupOwner::Host);
            };
            (qos, *pod_component, &rest[2..])
        }
        _ => (QosClass::Guaranteed, *first, &rest[1..]),
    };
    let uid_text =
        pod_component
            .strip_prefix("pod")
            .ok_or_else(|| CgroupPathError::UnexpectedComponent {
                parent: truncate_for_error(root),
                component: truncate_for_error(pod_component),
            })?;
    let uid = PodUid::parse(uid_text)?;
    let member = match below.first() {
        None => PodMember::PodLevel,
        Some(container) => parse_container_component(container)?,
    };
    Ok(CgroupOwner::Pod(PodCgroup {
        uid,
        qos,
        driver: CgroupDriver::Cgroupfs,
        member,
    }))
}

/// A container's cgroup name without `.scope`: `cri-containerd-<id>`, `crio-<id>`,
/// `crio-conmon-<id>`, `docker-<id>`, or a bare id (cgroupfs driver).
fn parse_container_component(name: &str) -> Result<PodMember, CgroupPathError> {
    if let Some(id) = name.strip_prefix("crio-conmon-") {
        return Ok(PodMember::ConmonMonitor {
            id: ContainerId::parse(id)?,
        });
    }
    let (runtime, id) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (ContainerRuntime::Containerd, id)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (ContainerRuntime::CriO, id)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (ContainerRuntime::Docker, id)
    } else if name.len() == 64 {
        (ContainerRuntime::Unknown, name)
    } else {
        return Err(CgroupPathError::UnknownContainerCgroup {
            component: truncate_for_error(name),
        });
    };
    Ok(PodMember::Container {
        id: ContainerId::parse(id)?,
        runtime,
    })
}

/// Splits `status.containerStatuses[].containerID` (`containerd://<id>`) into runtime and id.
pub fn parse_container_status_id(
    text: &str,
) -> Result<(ContainerRuntime, ContainerId), CgroupPathError> {
    let (scheme, id) = text
        .split_once("://")
        .ok_or_else(|| CgroupPathError::BadContainerId {
            value: truncate_for_error(text),
        })?;
    let runtime = match scheme {
        "containerd" => ContainerRuntime::Containerd,
        "cri-o" => ContainerRuntime::CriO,
        "docker" => ContainerRuntime::Docker,
        _ => ContainerRuntime::Unknown,
    };
    Ok((runtime, ContainerId::parse(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f6a2b1c-9d4e-4f5a-8b7c-0d1e2f3a4b5c";
    const UID_UNDERSCORE: &str = "3f6a2b1c_9d4e_4f5a_8b7c_0d1e2f3a4b5c";
    const CID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn pod(path: &str) -> PodCgroup {
        match parse_cgroup_path(path) {
            Ok(CgroupOwner::Pod(p)) => p,
            other => panic!("{path}: expected a pod, got {other:?}"),
        }
    }

    fn container(id: &str, runtime: ContainerRuntime) -> PodMember {
        PodMember::Container {
            id: ContainerId::parse(id).unwrap(),
            runtime,
        }
    }

    #[test]
    fn systemd_burstable_containerd() {
        let p = pod(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(p.uid.as_str(), UID);
        assert_eq!(p.qos, QosClass::Burstable);
        assert_eq!(p.driver, CgroupDriver::Systemd);
        assert_eq!(p.member, container(CID, ContainerRuntime::Containerd));
    }

    #[test]
    fn systemd_guaranteed_and_besteffort() {
        let g = pod(&format!(
            "kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(g.qos, QosClass::Guaranteed);
        assert_eq!(g.uid.as_str(), UID);
        let b = pod(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORE}.slice/crio-{CID}.scope"
        ));
        assert_eq!(b.qos, QosClass::BestEffort);
        assert_eq!(b.member, container(CID, ContainerRuntime::CriO));
    }

    #[test]
    fn crio_conmon_is_not_the_container() {
        let p = pod(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice/crio-conmon-{CID}.scope"
        ));
        assert_eq!(
            p.member,
            PodMember::ConmonMonitor {
                id: ContainerId::parse(CID).unwrap()
            }
        );
        assert_eq!(p.container_id(), None);
    }

    #[test]
    fn docker_systemd_and_pod_level() {
        let d = pod(&format!(
            "/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/docker-{CID}.scope"
        ));
        assert_eq!(d.member, container(CID, ContainerRuntime::Docker));
        let level = pod(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice"
        ));
        assert_eq!(level.member, PodMember::PodLevel);
    }

    #[test]
    fn systemd_nested_container_cgroup_still_the_container() {
        let p = pod(&format!(
            "/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/cri-containerd-{CID}.scope/init.scope"
        ));
        assert_eq!(p.member, container(CID, ContainerRuntime::Containerd));
    }

    #[test]
    fn kind_style_kubelet_slice() {
        let p = pod(&format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_UNDERSCORE}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(p.qos, QosClass::BestEffort);
        assert_eq!(p.uid.as_str(), UID);
    }

    #[test]
    fn cgroupfs_all_qos_levels() {
        let b = pod(&format!("/kubepods/burstable/pod{UID}/{CID}"));
        assert_eq!(
            (b.qos, b.driver),
            (QosClass::Burstable, CgroupDriver::Cgroupfs)
        );
        assert_eq!(b.member, container(CID, ContainerRuntime::Unknown));
        let g = pod(&format!("/kubepods/pod{UID}/{CID}"));
        assert_eq!(g.qos, QosClass::Guaranteed);
        let e = pod(&format!("/kubepods/besteffort/pod{UID}"));
        assert_eq!(
            (e.qos, e.member),
            (QosClass::BestEffort, PodMember::PodLevel)
        );
        let c = pod(&format!("/kubepods/burstable/pod{UID}/crio-{CID}"));
        assert_eq!(c.member, container(CID, ContainerRuntime::CriO));
    }

    #[test]
    fn static_pod_hash_uid() {
        let p = pod(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b0c6b5a8a4e5d0e9a2c1f1a3f5e4d3c.slice",
        );
        assert_eq!(p.uid.as_str(), "5b0c6b5a8a4e5d0e9a2c1f1a3f5e4d3c");
    }

    #[test]
    fn upper_case_is_lowered() {
        let p = pod(&format!(
            "/kubepods/pod{}/{}",
            UID.to_uppercase(),
            CID.to_uppercase()
        ));
        assert_eq!(p.uid.as_str(), UID);
        assert_eq!(p.container_id().unwrap().as_str(), CID);
    }

    #[test]
    fn host_paths() {
        for path in [
            "/",
            "",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/init.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/besteffort",
            "/kubepods",
            "/system.slice/kubelet.service",
        ] {
            assert_eq!(parse_cgroup_path(path), Ok(CgroupOwner::Host), "{path}");
        }
    }

    #[test]
    fn malformed_uids() {
        for path in [
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice"
                .to_string(),
            "/kubepods.slice/kubepods-pod3f6a2b1c_9d4e_4f5a_8b7c.slice".to_string(),
            format!("/kubepods/burstable/pod{}x/{CID}", &UID[..35]),
            "/kubepods/podzzzzzzzz-9d4e-4f5a-8b7c-0d1e2f3a4b5c".to_string(),
            // Dashes in the wrong places.
            "/kubepods/pod3f6a2b1c9-d4e-4f5a-8b7c-0d1e2f3a4b5c".to_string(),
        ] {
            assert!(
                matches!(
                    parse_cgroup_path(&path),
                    Err(CgroupPathError::MalformedPodUid { .. })
                ),
                "{path}: {:?}",
                parse_cgroup_path(&path)
            );
        }
    }

    #[test]
    fn bad_container_ids() {
        for path in [
            format!("/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/cri-containerd-xyz.scope"),
            format!(
                "/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/docker-{}.scope",
                &CID[..63]
            ),
            format!("/kubepods/pod{UID}/{}g", &CID[..63]),
        ] {
            assert!(
                matches!(
                    parse_cgroup_path(&path),
                    Err(CgroupPathError::BadContainerId { .. })
                ),
                "{path}: {:?}",
                parse_cgroup_path(&path)
            );
        }
    }

    #[test]
    fn unexpected_components() {
        let odd_pod = "/kubepods.slice/kubepods-burstable.slice/something-else.slice";
        assert!(matches!(
            parse_cgroup_path(odd_pod),
            Err(CgroupPathError::UnexpectedComponent { .. })
        ));
        let odd_container =
            format!("/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/runc-{CID}.scope");
        assert!(matches!(
            parse_cgroup_path(&odd_container),
            Err(CgroupPathError::UnknownContainerCgroup { .. })
        ));
        let not_scope = format!("/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/{CID}");
        assert!(matches!(
            parse_cgroup_path(&not_scope),
            Err(CgroupPathError::UnexpectedComponent { .. })
        ));
        let cgroupfs_odd = "/kubepods/burstable/notapod";
        assert!(matches!(
            parse_cgroup_path(cgroupfs_odd),
            Err(CgroupPathError::UnexpectedComponent { .. })
        ));
    }

    #[test]
    fn hostile_input_is_bounded_in_errors() {
        let long = format!("/kubepods/pod{}", "é".repeat(10_000));
        match parse_cgroup_path(&long) {
            Err(CgroupPathError::MalformedPodUid { value }) => {
                assert!(value.len() <= ERROR_ECHO_MAX)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn container_status_ids() {
        let (rt, id) = parse_container_status_id(&format!("containerd://{CID}")).unwrap();
        assert_eq!((rt, id.as_str()), (ContainerRuntime::Containerd, CID));
        let (rt, _) = parse_container_status_id(&format!("cri-o://{CID}")).unwrap();
        assert_eq!(rt, ContainerRuntime::CriO);
        assert!(parse_container_status_id(CID).is_err());
        assert!(parse_container_status_id("containerd://abc").is_err());
    }
}
