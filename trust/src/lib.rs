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
///
/// ring's suites, with TLS 1.3's mandatory AES-128-GCM/SHA-256 preferred over ring's first
/// choice, AES-256-GCM/SHA-384 (both sides prefer it, so it is what every Strait connection
/// negotiates; a peer that offers only the others still gets them). SHA-384 runs ring's
/// portable SHA-512 code, SHA-256 the CPU's SHA extensions where it has them: in a resumed
/// inner handshake the key schedule's hashing was a twentieth of the caller's CPU, and AES-128
/// takes ten rounds a block where AES-256 takes fourteen (README, "Scale and performance").
/// BoringSSL (Envoy) and Go's crypto/tls prefer the same suite.
///
/// Key exchange: P-256 (secp256r1) before ring's first choice, X25519. Every new connection,
/// resumed or not, makes one exchange on each side (rustls resumes with PSK and (EC)DHE, its
/// only mode), and both are on the way to its first byte. ring's P-256 is assembly; its X25519
/// field arithmetic is C, compiled at the release profile's `opt-level = "s"`: a key pair and
/// agreement took 40 us with P-256 against 75 with X25519 (README, "P-256 for the key
/// exchange"). A rustls server takes the group the client lists first among those it supports,
/// so the client's list decides (a peer that sends only an X25519 share still gets X25519,
/// without a retry). Built once; every config shares it.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<std::sync::Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            // A stable sort: the preferred suite first, the others in ring's order.
            provider
                .cipher_suites
                .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            provider
                .kx_groups
                .sort_by_key(|group| group.name() != rustls::NamedGroup::secp256r1);
            std::sync::Arc::new(provider)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_provider_prefers_p256_and_keeps_every_group_ring_offers() {
        let groups = |p: &rustls::crypto::CryptoProvider| p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>();
        let (ours, ring) = (
            groups(&super::crypto_provider()),
            groups(&rustls::crypto::ring::default_provider()),
        );
        assert_eq!(ours[0], rustls::NamedGroup::secp256r1);
        assert_ne!(
            ring[0], ours[0],
            "ring's own first choice differs (else this ordering is moot)"
        );
        let rest = |v: &[rustls::NamedGroup]| {
            v.iter()
                .copied()
                .filter(|g| *g != rustls::NamedGroup::secp256r1)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rest(&ours),
            rest(&ring),
            "the other groups as ring orders them: {ours:?}"
        );
        assert_eq!(ours.len(), ring.len());
    }

    #[test]
    fn the_provider_prefers_aes_128_gcm_and_keeps_every_suite_ring_offers() {
        let suites = |p: &rustls::crypto::CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
        let ours = suites(&super::crypto_provider());
        let ring = suites(&rustls::crypto::ring::default_provider());
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_ne!(
            ring[0], ours[0],
            "ring's own first choice differs (else this ordering is moot)"
        );
        let sorted = |mut v: Vec<rustls::CipherSuite>| {
            v.sort_by_key(|s| u16::from(*s));
            v
        };
        assert_eq!(
            sorted(ours.clone()),
            sorted(ring),
            "the same suites as ring's default: {ours:?}"
        );
    }
}
