//! Config-resource conversion: any config update a controller (or something posing as one)
//! sends is checked field by field; a bad resource is rejected by name, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strait_api::pb;
use strait_api::snapshot::{convert, Resources};

fuzz_target!(|data: &[u8]| {
    if let Ok(res) = pb::Resource::decode(data) {
        let _ = convert(&res);
    }
    if let Ok(update) = pb::ConfigUpdate::decode(data) {
        let (resources, rejected) = Resources::default().apply(&update);
        for r in &rejected {
            assert!(!r.error.is_empty(), "a rejection names its reason");
        }
        let snap = resources.snapshot(update.version);
        for svc in snap.services.values() {
            let _ = svc.host();
        }
    }
});
