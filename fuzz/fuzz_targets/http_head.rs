//! The first-bytes and HTTP/1.1 head path of the transparent and explicit listeners: the
//! sniffer's verdict, then the smuggling check on what would be the request head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_sidecar::outbound::{check_head, sniff, Refusal, Sniffed};

fuzz_target!(|data: &[u8]| {
    if sniff(data) != Some(Sniffed::Http1) {
        return;
    }
    let end = data.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(data.len());
    let head = &data[..end];
    match check_head(head) {
        Ok(()) => {}
        Err(Refusal::LengthAndChunked) => {
            let text = String::from_utf8_lossy(head).to_ascii_lowercase();
            assert!(text.contains("content-length") && text.contains("transfer-encoding"));
        }
        Err(Refusal::ObsFold) => assert!(head.windows(2).any(|w| w == b"\n " || w == b"\n\t")),
        Err(Refusal::HeadTimeout) => unreachable!("check_head never times out"),
    }
});
