//! What the gateway crate's tests share.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strait_trust::{Authority, CertStore, TlsMetrics, TrustBundle, TrustDomain};

pub(crate) const GATEWAY: &str = "spiffe://mesh.local/ns/strait-system/sa/gateway";

fn store(ca: &Authority, trust: &TrustBundle, id: &str) -> CertStore {
    let ttl = Duration::from_secs(3600);
    CertStore::issued_by(ca, id.parse().unwrap(), ttl, trust.clone(), TlsMetrics::unregistered()).unwrap()
}

/// The real gateway of cluster `east` with an empty catalog, listening on a free loopback port
/// once bound.
pub(crate) fn gateway(store: CertStore) -> Arc<crate::Gateway> {
    gateway_with_reset_key(store, None)
}

/// [`gateway`] whose QUIC endpoint keys its stateless resets with `quic_reset_key`.
pub(crate) fn gateway_with_reset_key(store: CertStore, quic_reset_key: Option<Vec<u8>>) -> Arc<crate::Gateway> {
    let (_config, rx) = tokio::sync::watch::channel(first_config());
    gateway_configured_by(store, rx, quic_reset_key)
}

/// A gateway's first config: version 1, no service.
pub(crate) fn first_config() -> Arc<strait_api::snapshot::Snapshot> {
    let mut config = strait_api::snapshot::Snapshot::default();
    config.version = 1;
    Arc::new(config)
}

/// [`gateway`] that takes its config from `config`.
pub(crate) fn gateway_configured_by(
    store: CertStore,
    config: tokio::sync::watch::Receiver<Arc<strait_api::snapshot::Snapshot>>,
    quic_reset_key: Option<Vec<u8>>,
) -> Arc<crate::Gateway> {
    let opts = crate::GatewayOptions {
        cluster: "east".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        connect_timeout: Duration::from_secs(1),
        quic_reset_key,
    };
    let metrics = crate::GatewayMetrics::new(&prometheus::Registry::new());
    Arc::new(crate::Gateway::new(opts, store, config, metrics))
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
