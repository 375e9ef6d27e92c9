//! Certificate bootstrap and rotation on the workload side.
//!
//! The workload makes its own key and a CSR, sends the CSR to its controller's CA with its
//! credential (a join token outside Kubernetes), and installs the chain it gets back. The key
//! never leaves the process. A background task renews at half-life; open connections keep the
//! certificate they were made with, new handshakes use the new one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use strait_trust::{
    next_rotation, CertStore, IssuedCert, KeyAndCsr, PeerPolicy, RotationPlan, SpiffeId, TlsMetrics, TrustBundle,
    TrustDomain, WorkloadCert,
};

use crate::pb;
use crate::pb::certificate_service_client::CertificateServiceClient;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the CA at {addr} refused the request: {status}")]
    Refused { addr: String, status: tonic::Status },
    #[error("the CA returned an unusable certificate: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Trust(#[from] strait_trust::TrustError),
    #[error("credential: {0}")]
    Credential(String),
}

/// What proves a workload's identity to its cluster's CA.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Outside Kubernetes: a token the CA was configured with, bound to one identity.
    JoinToken(String),
    /// In Kubernetes: a service-account token (audience `strait`), re-read at every renewal
    /// because the kubelet rotates projected tokens.
    ServiceAccountToken(std::path::PathBuf),
}

/// What the CA says beside a certificate.
#[derive(Clone, Debug, Default)]
pub struct Granted {
    /// Where it found the workload (Kubernetes: its node's region and zone), when it knows.
    pub locality: Option<pb::Locality>,
    /// To a gateway: the secret its QUIC endpoint derives stateless-reset tokens from, the
    /// same for every gateway of its cluster and across restarts.
    pub quic_reset_key: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct CertClient {
    /// `host:port` of the controller (its gRPC port).
    pub ca_addr: String,
    pub credential: Credential,
    pub trust_domain: TrustDomain,
    /// Requested lifetime; `None` takes the CA's default.
    pub ttl: Option<Duration>,
    pub bundle: TrustBundle,
    pub metrics: TlsMetrics,
}

impl CertClient {
    fn controller_id(&self) -> Result<SpiffeId, CertError> {
        Ok(SpiffeId::workload(
            &self.trust_domain,
            crate::SYSTEM_NAMESPACE,
            crate::FEDERATION_SA,
        )?)
    }

    /// One CSR round trip.
    pub async fn fetch(&self) -> Result<(WorkloadCert, TrustBundle), CertError> {
        self.fetch_granted().await.map(|(cert, bundle, _)| (cert, bundle))
    }

    /// One CSR round trip, with what the CA said beside the certificate.
    pub async fn fetch_granted(&self) -> Result<(WorkloadCert, TrustBundle, Granted), CertError> {
        let config = strait_trust::client_config(
            None,
            &Arc::new(ArcSwap::from_pointee(self.bundle.clone())),
            &self.metrics,
            PeerPolicy::OneOf(vec![self.controller_id()?]),
            &[strait_trust::ALPN_H2],
        )?;
        let channel = crate::transport::tls_channel(&self.ca_addr, Arc::new(config));
        let key = KeyAndCsr::generate()?;
        let mut request = pb::SignRequest {
            csr_der: key.csr_der,
            ttl_seconds: self.ttl.map(|t| t.as_secs()).unwrap_or_default(),
            ..Default::default()
        };
        match &self.credential {
            Credential::JoinToken(t) => request.join_token = t.clone(),
            Credential::ServiceAccountToken(path) => {
                request.service_account_token = std::fs::read_to_string(path)
                    .map_err(|e| CertError::Credential(format!("cannot read {}: {e}", path.display())))?
                    .trim()
                    .to_string()
            }
        }
        let resp = CertificateServiceClient::new(channel)
            .sign(request)
            .await
            .map_err(|status| CertError::Refused {
                addr: self.ca_addr.clone(),
                status,
            })?
            .into_inner();
        let id: SpiffeId = resp
            .spiffe_id
            .parse()
            .map_err(|e: strait_trust::TrustError| CertError::BadResponse(e.to_string()))?;
        if resp.chain_der.is_empty() {
            return Err(CertError::BadResponse("empty certificate chain".into()));
        }
        let issued = IssuedCert {
            chain: resp.chain_der.into_iter().map(CertificateDer::from).collect(),
            not_before: crate::from_unix_ms(resp.not_before_unix_ms),
            not_after: crate::from_unix_ms(resp.not_after_unix_ms),
        };
        let mut bundle = self.bundle.clone();
        if !resp.bundle_pem.is_empty() {
            bundle.merge(&TrustBundle::from_pem("CA response", resp.bundle_pem.as_bytes())?)?;
        }
        let granted = Granted {
            locality: resp.locality,
            quic_reset_key: (!resp.quic_reset_key.is_empty()).then_some(resp.quic_reset_key),
        };
        Ok((WorkloadCert::new(id, issued, key.key_pkcs8_der)?, bundle, granted))
    }

    /// Fetches the first certificate, retrying while the controller starts up; also returns
    /// what the CA said beside it.
    pub async fn bootstrap(&self) -> (CertStore, Granted) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.fetch_granted().await {
                Ok((cert, bundle, granted)) => {
                    tracing::info!(id = %cert.id, "obtained workload certificate");
                    return (CertStore::new(cert, bundle, self.metrics.clone()), granted);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot obtain a certificate yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Renews the store's certificate at half-life, forever.
    pub fn spawn_rotation(self, store: CertStore) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let cert = store.current();
                if let RotationPlan::RenewIn(wait) = next_rotation(cert.not_before, cert.not_after, SystemTime::now()) {
                    tokio::time::sleep(wait).await;
                }
                match self.fetch().await {
                    Ok((cert, _)) => store.rotate(cert),
                    Err(e) => {
                        tracing::warn!(error = %e, "certificate renewal failed; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    }
}
