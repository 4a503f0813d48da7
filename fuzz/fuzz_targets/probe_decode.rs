//! Kernel ring records: the agent decodes whatever bytes a ring hands it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use observer::probes::{ConnectRecord, decode_connect, decode_dns};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = decode_dns(data) {
        assert!(packet.payload.len() <= packet.payload_len as usize);
        assert!(packet.payload.len() <= 2048);
        let _ = observer::dns::parse(&packet.payload);
    }
    match decode_connect(data) {
        Ok(ConnectRecord::Open(c)) => assert!(c.comm.len() <= 16 * 3),
        Ok(ConnectRecord::Ended { open, outcome }) => {
            assert!(open.comm.len() <= 16 * 3);
            assert_eq!(open.sock_id, outcome.connect.sock_id);
        }
        Err(_) => {}
    }
});
