//! resolv.conf files, read from pods' root filesystems (the pod controls them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::identity::{parse_resolv_conf, resolv::MAX_SEARCH_TOTAL_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = parse_resolv_conf(data) {
        // The bound is on the domains' bytes (what is kept), separators not counted.
        let total: usize = conf.search.iter().map(String::len).sum();
        assert!(
            total <= MAX_SEARCH_TOTAL_BYTES,
            "search list of {total} bytes"
        );
        assert!(conf.search.iter().all(|d| !d.is_empty() && d.len() <= 253));
        assert!(conf.ndots <= 15);
    }
});
