//! rustls configurations for every Strait connection: TLS 1.3 only, a certificate resolved from
//! the rotating [`CertStore`] at each handshake, and peers verified by SPIFFE ID.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use arc_swap::ArcSwap;

use crate::{CertStore, PeerPolicy, SpiffeVerifier, TlsMetrics, TrustBundle, TrustError};

/// ALPN of the east-west QUIC tunnel.
pub const ALPN_TUNNEL: &[u8] = b"strait/1";
/// ALPN of sidecar-to-sidecar HTTP (HTTP/2 inside mTLS).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of sidecar-to-sidecar opaque TCP inside mTLS.
pub const ALPN_TCP: &[u8] = b"strait-tcp/1";

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerAuth {
    RequireClientCert,
    /// Only for the CA endpoint, where workloads come before their first certificate.
    OptionalClientCert,
}

#[derive(Debug)]
struct StoreResolver(CertStore);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config presenting the store's identity and verifying clients by SPIFFE ID.
pub fn server_config(
    store: &CertStore,
    policy: PeerPolicy,
    auth: ServerAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TrustError> {
    let mut verifier = SpiffeVerifier::new(store.bundle().clone(), policy, store.metrics().clone());
    if auth == ServerAuth::OptionalClientCert {
        verifier = verifier.allow_anonymous_clients();
    }
    let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver(store.clone())));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config presenting the store's identity (when `store` is given) and accepting only
/// servers the policy allows.
pub fn client_config(
    store: Option<&CertStore>,
    bundle: &Arc<ArcSwap<TrustBundle>>,
    metrics: &TlsMetrics,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TrustError> {
    let verifier = SpiffeVerifier::new(bundle.clone(), policy, metrics.clone());
    let builder = ClientConfig::builder_with_provider(crate::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(Arc::new(StoreResolver(store.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
