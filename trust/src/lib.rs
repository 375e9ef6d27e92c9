//! Identities and keys for Strait.
//!
//! Every proxy, gateway and controller in a mesh holds a short-lived X.509 certificate whose
//! only URI SAN is a SPIFFE ID (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`). One root per trust
//! domain signs one intermediate CA per cluster, which signs workload certificates. Peers are
//! verified by SPIFFE ID against the bundle of the trust domain their ID names, never by DNS
//! name. This crate holds the identity types, the CAs, trust bundles, the rustls verifiers and
//! the rotating certificate store the proxies use.

mod bundle;
mod ca;
mod credentials;
mod error;
mod identity;
mod metrics;
mod rotation;
mod store;
mod tls;
mod verify;

pub use bundle::TrustBundle;
pub use ca::{Authority, IssuedCert, KeyAndCsr, DEFAULT_WORKLOAD_TTL};
pub use credentials::{load_credentials, write_credentials};
pub use error::TrustError;
pub use identity::{SpiffeId, TrustDomain};
pub use metrics::TlsMetrics;
pub use rotation::{next_rotation, RotationPlan};
pub use store::{CertStore, WorkloadCert};
pub use tls::{
    client_config, server_config, ClientConfigs, ServerAuth, ALPN_H1, ALPN_H2, ALPN_TCP, ALPN_TUNNEL,
    RESUMPTION_MAX_AGE,
};
pub use verify::{peer_cluster, peer_identity, PeerPolicy, RefusalReason, SpiffeVerifier};

/// The crypto provider every Strait TLS config uses: one provider for the whole workspace.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
