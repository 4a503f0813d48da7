//! Kubernetes API objects (Pods, Services, Nodes, ServiceCIDRs) as JSON, through the
//! projection into observer's identity model. The first byte picks the kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::identity::kube::{ApiObjectKind, project_api_json};

fuzz_target!(|data: &[u8]| {
    let Some((kind, json)) = data.split_first() else {
        return;
    };
    let kind = match kind % 4 {
        0 => ApiObjectKind::Pod,
        1 => ApiObjectKind::Service,
        2 => ApiObjectKind::Node,
        _ => ApiObjectKind::ServiceCidr,
    };
    let _ = project_api_json(kind, json);
});
