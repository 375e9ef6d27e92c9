use std::path::PathBuf;

/// Everything that can go wrong with identities, certificates and bundles.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("invalid trust domain {value:?}: {reason} (use lowercase letters, digits, '.', '-' and '_', e.g. \"cluster.local\")")]
    InvalidTrustDomain { value: String, reason: &'static str },
    #[error(
        "invalid SPIFFE ID {value:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    InvalidSpiffeId { value: String, reason: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM {what} found (expected a file written by `strait trust init`)")]
    MissingPem { path: PathBuf, what: &'static str },
    #[error("{what}: malformed PEM or DER: {detail}")]
    Malformed { what: String, detail: String },
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}
