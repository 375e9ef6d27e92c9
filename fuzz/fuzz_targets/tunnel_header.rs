//! The tunnel header decoder: what a gateway reads first from every stream a peer opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_api::pb;
use strait_api::tunnel::{read_header, HeaderError, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let req: Result<pb::TunnelRequest, HeaderError> = futures::executor::block_on(read_header(&mut input));
    if let Err(HeaderError::TooLong(n)) = &req {
        assert!(*n > MAX_HEADER_LEN);
    }
    let mut input = data;
    let _: Result<pb::TunnelResponse, HeaderError> = futures::executor::block_on(read_header(&mut input));
});
