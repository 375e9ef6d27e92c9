//! Config-resource conversion: any config update a controller (or something posing as one)
//! sends is checked field by field; a bad resource is rejected by name, never a panic. An
//! update applied to the previous snapshot in place gives what a snapshot built anew gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strait_api::pb;
use strait_api::snapshot::{convert, Resources, Snapshot};

/// What a snapshot maps, by service key.
fn shape(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s.services.iter().map(|(k, v)| format!("svc {k} {v:?}")).collect();
    out.extend(s.by_host.iter().map(|(h, v)| format!("host {h} {}", v.key())));
    out.extend(s.by_ip.iter().map(|(ip, v)| format!("ip {ip} {}", v.key())));
    out.extend(s.endpoints().map(|(a, v, i)| format!("ep {a} {} {i}", v.key())));
    out.extend(s.routes.keys().map(|k| format!("route {k}")));
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    if let Ok(res) = pb::Resource::decode(data) {
        let _ = convert(&res);
    }
    if let Ok(update) = pb::ConfigUpdate::decode(data) {
        let mut resources = Resources::default();
        let (snap, rejected) = resources.update(&Snapshot::default(), update.clone());
        for r in &rejected {
            assert!(!r.error.is_empty(), "a rejection names its reason");
        }
        for svc in snap.services.values() {
            let _ = svc.host();
        }
        // The same resources again as an incremental update, on top of that snapshot.
        let again = pb::ConfigUpdate {
            full: false,
            version: update.version.wrapping_add(1),
            ..update
        };
        let version = again.version;
        let (next, _) = resources.update(&snap, again);
        assert_eq!(shape(&next), shape(&resources.snapshot(version)));
    }
});
