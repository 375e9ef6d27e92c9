//! Trust bundles: the roots of every trust domain a proxy accepts, keyed by trust domain.
//!
//! A bundle may hold several roots per domain (root rotation) and several domains (federation).
//! Strait roots carry the URI SAN `spiffe://<trust-domain>`, so a PEM file of roots describes
//! itself; [`TrustBundle::add_root`] maps foreign roots explicitly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::{TrustDomain, TrustError};

#[derive(Clone, Default)]
pub struct TrustBundle {
    domains: BTreeMap<TrustDomain, Domain>,
}

#[derive(Clone)]
struct Domain {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.domains.iter().map(|(td, d)| (td.as_str(), d.roots.len())))
            .finish()
    }
}

impl TrustBundle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a root for a trust domain.
    pub fn add_root(&mut self, td: &TrustDomain, root: CertificateDer<'static>) -> Result<(), TrustError> {
        let entry = self.domains.entry(td.clone()).or_insert_with(|| Domain {
            roots: vec![],
            store: Arc::new(RootCertStore::empty()),
        });
        if entry.roots.contains(&root) {
            return Ok(());
        }
        let mut store = (*entry.store).clone();
        store.add(root.clone()).map_err(|e| TrustError::Malformed {
            what: format!("root certificate for trust domain {td}"),
            detail: e.to_string(),
        })?;
        entry.roots.push(root);
        entry.store = Arc::new(store);
        Ok(())
    }

    /// Parses PEM roots; each must name its trust domain in a `spiffe://<td>` URI SAN.
    pub fn from_pem(what: &str, pem_text: &[u8]) -> Result<Self, TrustError> {
        let mut bundle = TrustBundle::new();
        for der in parse_pem_certs(what, pem_text)? {
            let td = root_trust_domain(&der).ok_or_else(|| TrustError::Malformed {
                what: what.to_string(),
                detail: "a root has no spiffe://<trust-domain> URI SAN; add it with `strait trust init` or name its trust domain explicitly".into(),
            })?;
            bundle.add_root(&td, der)?;
        }
        if bundle.domains.is_empty() {
            return Err(TrustError::Malformed {
                what: what.to_string(),
                detail: "no certificates in bundle".into(),
            });
        }
        Ok(bundle)
    }

    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let text = std::fs::read(path).map_err(|source| TrustError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&path.display().to_string(), &text)
    }

    /// Merges another bundle into this one (federation, or a rotated root).
    pub fn merge(&mut self, other: &TrustBundle) -> Result<(), TrustError> {
        for (td, d) in &other.domains {
            for r in &d.roots {
                self.add_root(td, r.clone())?;
            }
        }
        Ok(())
    }

    /// The roots of one trust domain, if the bundle knows it.
    pub fn roots_for(&self, td: &TrustDomain) -> Option<&Arc<RootCertStore>> {
        self.domains.get(td).map(|d| &d.store)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.domains.keys()
    }

    /// All roots as PEM, for shipping in the config stream or writing to disk.
    pub fn to_pem(&self) -> String {
        self.domains
            .values()
            .flat_map(|d| d.roots.iter())
            .map(|r| crate::ca::to_pem("CERTIFICATE", r))
            .collect()
    }
}

/// The trust domain a Strait root names in its `spiffe://<td>` URI SAN.
fn root_trust_domain(der: &CertificateDer<'_>) -> Option<TrustDomain> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("spiffe://")?.trim_end_matches('/').parse().ok(),
        _ => None,
    })
}

pub(crate) fn parse_pem_certs(what: &str, text: &[u8]) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let mut reader = std::io::BufReader::new(text);
    rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Malformed {
            what: what.to_string(),
            detail: e.to_string(),
        })
}

pub(crate) fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let text = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = parse_pem_certs(&path.display().to_string(), &text)?;
    if certs.is_empty() {
        return Err(TrustError::MissingPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Writes a file; secrets are created readable by the owner only.
pub(crate) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TrustError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TrustError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(contents).map_err(err)
}
