//! Peer verification by SPIFFE ID.
//!
//! A peer certificate is accepted only if it carries exactly one URI SAN, that SAN is a valid
//! SPIFFE ID, the bundle knows the ID's trust domain, and the chain verifies to a root of *that*
//! trust domain within its validity period. Callers may further require one of a set of IDs.
//! Every refusal is logged with its reason and counted in [`TlsMetrics`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{SpiffeId, TlsMetrics, TrustBundle};

/// Why a peer was refused; the label of the handshake-failure metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    Malformed,
    NoSpiffeId,
    MultipleUriSans,
    UnknownTrustDomain,
    Expired,
    NotYetValid,
    UntrustedChain,
    UnexpectedIdentity,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Malformed => "malformed_certificate",
            RefusalReason::NoSpiffeId => "no_spiffe_id",
            RefusalReason::MultipleUriSans => "multiple_uri_sans",
            RefusalReason::UnknownTrustDomain => "unknown_trust_domain",
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::UntrustedChain => "untrusted_chain",
            RefusalReason::UnexpectedIdentity => "unexpected_identity",
        }
    }
}

#[derive(Debug)]
struct Refusal {
    reason: RefusalReason,
    detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer refused ({}): {}", self.reason.as_str(), self.detail)
    }
}

impl std::error::Error for Refusal {}

/// Which identities a verifier accepts beyond "valid in the bundle".
#[derive(Clone, Debug)]
pub enum PeerPolicy {
    /// Any SPIFFE ID whose trust domain is in the bundle.
    AnyInBundle,
    /// Exactly one of these IDs.
    OneOf(Vec<SpiffeId>),
}

/// Verifies peers by SPIFFE ID, on the client side and the server side of a handshake.
#[derive(Debug)]
pub struct SpiffeVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    metrics: TlsMetrics,
    client_auth_mandatory: bool,
}

impl SpiffeVerifier {
    pub fn new(bundle: Arc<ArcSwap<TrustBundle>>, policy: PeerPolicy, metrics: TlsMetrics) -> Self {
        SpiffeVerifier {
            bundle,
            policy,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            metrics,
            client_auth_mandatory: true,
        }
    }

    /// Lets a server accept clients without a certificate (only the CA's certificate-signing
    /// endpoint does this: a workload has no certificate before its first one).
    pub fn allow_anonymous_clients(mut self) -> Self {
        self.client_auth_mandatory = false;
        self
    }

    /// Verifies a presented chain and returns the peer's SPIFFE ID.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        self.check(end_entity, intermediates, now).map_err(|refusal| {
            self.metrics.handshake_failure(refusal.reason.as_str());
            tracing::warn!(reason = refusal.reason.as_str(), detail = %refusal.detail, "refused TLS peer");
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(refusal))))
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Refusal> {
        let id = single_spiffe_id(end_entity)?;
        let bundle = self.bundle.load();
        let roots = bundle.roots_for(id.trust_domain()).ok_or_else(|| Refusal {
            reason: RefusalReason::UnknownTrustDomain,
            detail: format!(
                "{id}: trust domain {} is not in the trust bundle (known: {})",
                id.trust_domain(),
                bundle
                    .trust_domains()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let parsed = ParsedCertificate::try_from(end_entity).map_err(|e| Refusal {
            reason: RefusalReason::Malformed,
            detail: e.to_string(),
        })?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, roots, intermediates, now, self.algs.all)
            .map_err(|e| {
                let reason = match &e {
                    rustls::Error::InvalidCertificate(
                        CertificateError::Expired | CertificateError::ExpiredContext { .. },
                    ) => RefusalReason::Expired,
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                    ) => RefusalReason::NotYetValid,
                    _ => RefusalReason::UntrustedChain,
                };
                Refusal {
                    reason,
                    detail: format!("{id}: {e}"),
                }
            })?;
        if let PeerPolicy::OneOf(allowed) = &self.policy {
            if !allowed.contains(&id) {
                return Err(Refusal {
                    reason: RefusalReason::UnexpectedIdentity,
                    detail: format!(
                        "{id} is not one of the expected identities ({})",
                        allowed.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        Ok(id)
    }
}

/// The one SPIFFE ID in a certificate; anything but exactly one URI SAN is refused.
fn single_spiffe_id(der: &CertificateDer<'_>) -> Result<SpiffeId, Refusal> {
    let malformed = |detail: String| Refusal {
        reason: RefusalReason::Malformed,
        detail,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| malformed(e.to_string()))?
        .ok_or_else(|| Refusal {
            reason: RefusalReason::NoSpiffeId,
            detail: "the certificate has no subject alternative name".into(),
        })?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(Refusal {
            reason: RefusalReason::NoSpiffeId,
            detail: "the certificate has no URI SAN".into(),
        }),
        [one] => one.parse().map_err(|e: crate::TrustError| Refusal {
            reason: RefusalReason::NoSpiffeId,
            detail: e.to_string(),
        }),
        many => Err(Refusal {
            reason: RefusalReason::MultipleUriSans,
            detail: format!(
                "the certificate carries {} URI SANs ({}); exactly one is allowed",
                many.len(),
                many.join(", ")
            ),
        }),
    }
}

/// The SPIFFE ID of a peer whose chain a [`SpiffeVerifier`] accepted.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    single_spiffe_id(certs?.first()?).ok()
}

/// The cluster whose intermediate CA issued a verified peer's certificate (its issuer's common
/// name, `Strait intermediate CA for cluster <name>`). Only meaningful after the chain was
/// verified: only the trust domain's root signs intermediates.
pub fn peer_cluster(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let cn = cert.issuer().iter_common_name().next()?.as_str().ok()?.to_string();
    cn.strip_prefix(crate::ca::INTERMEDIATE_CN_PREFIX).map(str::to_string)
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
