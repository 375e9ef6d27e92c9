//! A process's current identity (certificate and key) and trust bundle, swapped atomically on
//! rotation so new handshakes use the new certificate while open connections keep theirs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::{Authority, IssuedCert, SpiffeId, TlsMetrics, TrustBundle, TrustError};

/// One issued identity, ready for rustls.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    /// When it was issued (rotation is planned from here).
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn new(id: SpiffeId, issued: IssuedCert, key_pkcs8_der: Vec<u8>) -> Result<Self, TrustError> {
        let key = CertifiedKey::from_der(
            issued.chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der)),
            &crate::crypto_provider(),
        )?;
        Ok(WorkloadCert {
            id,
            key: Arc::new(key),
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }
}

/// The identity and bundle of one process. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct CertStore {
    cert: Arc<ArcSwap<WorkloadCert>>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    metrics: TlsMetrics,
}

impl CertStore {
    pub fn new(cert: WorkloadCert, bundle: TrustBundle, metrics: TlsMetrics) -> Self {
        CertStore {
            cert: Arc::new(ArcSwap::from_pointee(cert)),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            metrics,
        }
    }

    /// A store holding a fresh key and a certificate for `id` that `ca` issues now for `ttl`:
    /// an identity a process issues to itself (a controller's), or a workload's in tests and
    /// benchmarks that stand one up without the CA service.
    pub fn issued_by(
        ca: &Authority,
        id: SpiffeId,
        ttl: Duration,
        bundle: TrustBundle,
        metrics: TlsMetrics,
    ) -> Result<Self, TrustError> {
        let (issued, key) = ca.issue_with_key(&id, SystemTime::now(), ttl)?;
        Ok(CertStore::new(WorkloadCert::new(id, issued, key)?, bundle, metrics))
    }

    pub fn current(&self) -> Arc<WorkloadCert> {
        self.cert.load_full()
    }

    pub fn id(&self) -> SpiffeId {
        self.cert.load().id.clone()
    }

    /// Installs a renewed certificate; handshakes from now on present it.
    pub fn rotate(&self, cert: WorkloadCert) {
        tracing::info!(id = %cert.id, "installed renewed certificate");
        self.cert.store(Arc::new(cert));
    }

    pub fn bundle(&self) -> &Arc<ArcSwap<TrustBundle>> {
        &self.bundle
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }
}
