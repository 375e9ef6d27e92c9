//! Certificate authorities: the root of a trust domain, one intermediate per cluster, and the
//! issuing of short-lived workload certificates from CSRs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use crate::bundle::{read_pem_certs, write_file};
use crate::{SpiffeId, TrustDomain, TrustError};

/// How long a workload certificate lives unless configured otherwise.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Tolerate small clock differences between machines.
const BACKDATE: Duration = Duration::from_secs(60);

/// A CA key with its certificate and the chain above it (excluding the root).
pub struct Authority {
    trust_domain: TrustDomain,
    key: KeyPair,
    cert: CertificateDer<'static>,
    /// Certificates between this CA and the root, nearest first; empty for a root.
    parents: Vec<CertificateDer<'static>>,
    /// A root travels in trust bundles, never in the chains it issues.
    is_root: bool,
}

/// An intermediate CA's common name is this and its cluster's name.
pub(crate) const INTERMEDIATE_CN_PREFIX: &str = "Strait intermediate CA for cluster ";

/// A certificate chain issued to a workload (leaf first, root excluded) and its validity.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A fresh key pair and a CSR for it, made on the workload side so the key never leaves it.
pub struct KeyAndCsr {
    pub key_pkcs8_der: Vec<u8>,
    pub csr_der: Vec<u8>,
}

impl KeyAndCsr {
    /// The CSR names no identity: the CA decides it from the credential it checked.
    pub fn generate() -> Result<Self, TrustError> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::default();
        let csr = params.serialize_request(&key)?;
        Ok(KeyAndCsr {
            key_pkcs8_der: key.serialize_der(),
            csr_der: csr.der().to_vec(),
        })
    }
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // serial numbers are positive
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, now: SystemTime, ttl: Duration) {
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
}

impl Authority {
    /// Creates the self-signed root of a trust domain.
    pub fn new_root(trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, TrustError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Strait root CA for {trust_domain}"));
        params.distinguished_name.push(DnType::OrganizationName, "Strait");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.serial_number = Some(serial());
        validity(&mut params, now, ROOT_TTL);
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            key,
            cert: cert.der().clone(),
            parents: vec![],
            is_root: true,
        })
    }

    /// Creates an intermediate CA for one cluster, signed by this CA.
    pub fn new_intermediate(&self, cluster: &str, now: SystemTime) -> Result<Self, TrustError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{INTERMEDIATE_CN_PREFIX}{cluster}"));
        params.distinguished_name.push(DnType::OrganizationName, "Strait");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{}", self.trust_domain).try_into()?)];
        params.serial_number = Some(serial());
        validity(&mut params, now, INTERMEDIATE_TTL);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let mut parents = vec![self.cert.clone()];
        parents.extend(self.parents.iter().cloned());
        // The root is distributed in the bundle; a chain carries only what lies below it.
        parents.pop();
        Ok(Authority {
            trust_domain: self.trust_domain.clone(),
            key,
            cert: cert.der().clone(),
            parents,
            is_root: false,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, TrustError> {
        Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(TrustError::from)
    }

    /// A 32-byte secret for `purpose`, derived from this CA's key (HMAC-SHA256 keyed by it):
    /// the same for every process holding the key, and only for them.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key.serialize_der());
        let tag = ring::hmac::sign(&key, purpose.as_bytes());
        tag.as_ref().try_into().expect("SHA-256 is 32 bytes")
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This CA's own certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs a workload CSR. Only the CSR's public key is used: the identity is the one the caller
    /// authenticated, never what the CSR asks for.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedCert, TrustError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| TrustError::BadCsr(e.to_string()))?;
        let mut issued = self.issue_for_key(&csr.public_key, &[id.to_string()], now - BACKDATE, now + ttl)?;
        // Rotation is planned from the issue time; the backdating only absorbs clock skew.
        issued.not_before = now;
        Ok(issued)
    }

    /// Issues a workload certificate and key pair in one step (for a controller's or a gateway's
    /// own identity, which it issues to itself).
    pub fn issue_with_key(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<(IssuedCert, Vec<u8>), TrustError> {
        let (mut cert, key) = self.issue_custom(&[id.to_string()], now - BACKDATE, now + ttl)?;
        cert.not_before = now;
        Ok((cert, key))
    }

    /// Issues a serving certificate for DNS names and IP addresses (not a SPIFFE identity): for
    /// endpoints that clients outside the mesh verify by name, such as the admission webhook
    /// the Kubernetes API server calls. Returns the chain (leaf first) and the PKCS#8 key.
    pub fn issue_tls_server(
        &self,
        names: &[String],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<(IssuedCert, Vec<u8>), TrustError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(serial());
        validity(&mut params, now, ttl);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let mut chain = vec![cert.der().clone()];
        if !self.is_root {
            chain.push(self.cert.clone());
            chain.extend(self.parents.iter().cloned());
        }
        Ok((
            IssuedCert {
                chain,
                not_before: now,
                not_after: now + ttl,
            },
            key.serialize_der(),
        ))
    }

    /// Issues a certificate and key with arbitrary URI SANs and validity. Strait itself never
    /// issues more than one URI SAN; tests use this to build certificates a verifier must refuse.
    pub fn issue_custom(
        &self,
        uris: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(IssuedCert, Vec<u8>), TrustError> {
        let key = KeyPair::generate()?;
        let cert = self.issue_for_key(&key, uris, not_before, not_after)?;
        Ok((cert, key.serialize_der()))
    }

    /// Issues a certificate for a public key with the given URI SANs and validity.
    pub fn issue_for_key(
        &self,
        public_key: &impl PublicKeyData,
        uris: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, TrustError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI(u.clone().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        let mut chain = vec![cert.der().clone()];
        if !self.is_root {
            chain.push(self.cert.clone());
            chain.extend(self.parents.iter().cloned());
        }
        Ok(IssuedCert {
            chain,
            not_before,
            not_after,
        })
    }

    /// Writes `ca.pem` (this CA's cert followed by its parents), and `ca-key.pem`.
    pub fn write(&self, dir: &Path) -> Result<(), TrustError> {
        std::fs::create_dir_all(dir).map_err(|source| TrustError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut pem = to_pem("CERTIFICATE", &self.cert);
        for p in &self.parents {
            pem.push_str(&to_pem("CERTIFICATE", p));
        }
        write_file(&dir.join("ca.pem"), pem.as_bytes(), false)?;
        write_file(&dir.join("ca-key.pem"), self.key.serialize_pem().as_bytes(), true)?;
        Ok(())
    }

    /// Loads a CA written by [`Authority::write`].
    pub fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, TrustError> {
        let certs = read_pem_certs(&dir.join("ca.pem"))?;
        let key_path = dir.join("ca-key.pem");
        let key_pem = std::fs::read_to_string(&key_path).map_err(|source| TrustError::Read {
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TrustError::Malformed {
            what: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut certs = certs.into_iter();
        let cert = certs.next().ok_or(TrustError::MissingPem {
            path: dir.join("ca.pem"),
            what: "certificate",
        })?;
        let is_root = x509_parser::parse_x509_certificate(&cert)
            .map(|(_, c)| c.subject() == c.issuer())
            .map_err(|e| TrustError::Malformed {
                what: dir.join("ca.pem").display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            key,
            cert,
            parents: certs.collect(),
            is_root,
        })
    }
}

/// PEM-encodes one DER object.
pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}
