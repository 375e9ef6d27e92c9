//! The protocol sniffer: the first bytes of every intercepted connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_sidecar::outbound::{sniff, Sniffed};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let verdict = sniff(data);
    // A verdict never changes when more bytes arrive (the sniffer only waits while unsure).
    if let Some(v) = verdict {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\r\nmore");
        assert_eq!(sniff(&more), Some(v));
    }
    if verdict == Some(Sniffed::H2) {
        assert!(data.starts_with(PREFACE));
    }
    if data.is_empty() {
        assert_eq!(verdict, None);
    }
});
