//! cgroup paths: read from the cgroup2 mount, named by the kubelet and container runtimes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::identity::{parse_cgroup_path, parse_container_status_id};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_cgroup_path(text);
    let _ = parse_container_status_id(text);
});
