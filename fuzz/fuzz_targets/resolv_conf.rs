//! resolv.conf files, read from pods' root filesystems (the pod controls them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::identity::{parse_resolv_conf, resolv::MAX_SEARCH_TOTAL_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = parse_resolv_conf(data) {
        let total: usize = conf.search.iter().map(|d| d.len() + 1).sum();
        assert!(
            total <= MAX_SEARCH_TOTAL_BYTES + 254,
            "search list of {total} bytes"
        );
        assert!(conf.ndots <= 15);
    }
});
