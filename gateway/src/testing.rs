//! What the gateway crate's tests share.

use std::time::{Duration, SystemTime};

use strait_trust::{Authority, CertStore, TlsMetrics, TrustBundle, TrustDomain};

pub(crate) const GATEWAY: &str = "spiffe://mesh.local/ns/strait-system/sa/gateway";

fn store(ca: &Authority, trust: &TrustBundle, id: &str) -> CertStore {
    let ttl = Duration::from_secs(3600);
    CertStore::issued_by(ca, id.parse().unwrap(), ttl, trust.clone(), TlsMetrics::unregistered()).unwrap()
}

/// A gateway's store and a caller's under one trust domain.
pub(crate) fn gateway_and_caller() -> (CertStore, CertStore) {
    let td: TrustDomain = "mesh.local".parse().unwrap();
    let root = Authority::new_root(&td, SystemTime::now()).unwrap();
    let ca = root.new_intermediate("east", SystemTime::now()).unwrap();
    let mut trust = TrustBundle::new();
    trust.add_root(&td, root.cert().clone()).unwrap();
    (
        store(&ca, &trust, GATEWAY),
        store(&ca, &trust, "spiffe://mesh.local/ns/demo/sa/caller"),
    )
}
