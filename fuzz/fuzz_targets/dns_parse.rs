//! DNS messages as the kernel captured them (UDP payloads, TCP messages without prefix).
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::dns::{self, MAX_ANSWERS};

fuzz_target!(|data: &[u8]| {
    match dns::parse(data) {
        Ok(message) => {
            assert!(message.answers.len() <= MAX_ANSWERS);
            assert!(data.len() >= 12);
            if let Some(q) = &message.question {
                // Wire names are at most 255 bytes; their text adds escapes, not length
                // beyond four bytes per wire byte (`\DDD`).
                assert!(q.name.len() <= 4 * 255, "{} bytes of name", q.name.len());
            }
            let _ = dns::is_standard_query(&message);
            let _ = message.rcode.mnemonic();
        }
        Err(e) => {
            assert_eq!(e.len, data.len());
            assert!(e.offset <= data.len(), "{e}");
            let _ = e.kind.as_str();
        }
    }
});
