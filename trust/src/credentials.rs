//! A credential on disk: `cert.pem` (the chain, leaf first), `key.pem` (PKCS#8) and
//! `bundle.pem` (the trust bundle). `strait up` writes the operator's this way, and the CLI
//! loads it to call a controller's write API over mTLS.

use std::path::Path;
use std::time::SystemTime;

use crate::bundle::{read_pem_certs, write_file};
use crate::ca::to_pem;
use crate::{peer_identity, Authority, CertStore, SpiffeId, TlsMetrics, TrustBundle, TrustError, WorkloadCert};

/// Issues `id` from `ca` for `ttl` and writes it with `bundle` into `dir`.
pub fn write_credentials(
    dir: &Path,
    ca: &Authority,
    id: &SpiffeId,
    ttl: std::time::Duration,
    bundle: &TrustBundle,
) -> Result<(), TrustError> {
    std::fs::create_dir_all(dir).map_err(|source| TrustError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (issued, key) = ca.issue_with_key(id, SystemTime::now(), ttl)?;
    let chain: String = issued.chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect();
    write_file(&dir.join("cert.pem"), chain.as_bytes(), false)?;
    write_file(&dir.join("key.pem"), to_pem("PRIVATE KEY", &key).as_bytes(), true)?;
    write_file(&dir.join("bundle.pem"), bundle.to_pem().as_bytes(), false)?;
    Ok(())
}

/// Loads a credential written by [`write_credentials`].
pub fn load_credentials(dir: &Path) -> Result<CertStore, TrustError> {
    let chain = read_pem_certs(&dir.join("cert.pem"))?;
    let key_path = dir.join("key.pem");
    let key_text = std::fs::read(&key_path).map_err(|source| TrustError::Read {
        path: key_path.clone(),
        source,
    })?;
    let key = pem::parse(&key_text).map_err(|e| TrustError::Malformed {
        what: key_path.display().to_string(),
        detail: e.to_string(),
    })?;
    let id = peer_identity(Some(&chain)).ok_or_else(|| TrustError::Malformed {
        what: dir.join("cert.pem").display().to_string(),
        detail: "the certificate carries no SPIFFE ID".into(),
    })?;
    let bundle = TrustBundle::load(&dir.join("bundle.pem"))?;
    let (not_before, not_after) = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, c)| {
            (
                c.validity().not_before.to_datetime().into(),
                c.validity().not_after.to_datetime().into(),
            )
        })
        .unwrap_or((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
    let issued = crate::IssuedCert {
        chain,
        not_before,
        not_after,
    };
    let cert = WorkloadCert::new(id, issued, key.contents().to_vec())?;
    Ok(CertStore::new(cert, bundle, TlsMetrics::unregistered()))
}
