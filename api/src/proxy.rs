//! What every proxy (sidecar or gateway) does before it serves: obtain its certificate from the
//! cluster CA, keep it renewed, and subscribe to the controller's config stream.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use strait_trust::{CertStore, SpiffeId, TlsMetrics, TrustBundle, TrustDomain, TrustError};
use tokio::sync::watch;

use crate::certs::CertClient;
use crate::pb;
use crate::snapshot::Snapshot;
use crate::xds::{XdsClient, XdsMetrics};

/// How a proxy reaches and authenticates to its cluster's controller.
#[derive(Clone, Debug)]
pub struct ControllerLink {
    /// `host:port` of the controller's gRPC port (a name such as
    /// `strait-federation.strait-system.svc:15012` in Kubernetes).
    pub controller: String,
    pub trust_domain: TrustDomain,
    pub bundle: TrustBundle,
    pub credential: crate::certs::Credential,
    pub cert_ttl: Option<Duration>,
}

impl ControllerLink {
    /// Gets the first certificate (waiting for the controller if it is not up yet), starts its
    /// renewal and the config stream that publishes snapshots on `config`. Also returns what
    /// the CA said beside the certificate (the workload's locality, a gateway's reset key).
    pub async fn connect(
        &self,
        hello: pb::Hello,
        registry: &Registry,
        config: watch::Sender<Arc<Snapshot>>,
    ) -> Result<(CertStore, crate::certs::Granted), TrustError> {
        let cert_client = CertClient {
            ca_addr: self.controller.clone(),
            credential: self.credential.clone(),
            trust_domain: self.trust_domain.clone(),
            ttl: self.cert_ttl,
            bundle: self.bundle.clone(),
            metrics: TlsMetrics::new(registry),
        };
        let (store, granted) = cert_client.bootstrap().await;
        cert_client.spawn_rotation(store.clone());
        let xds = XdsClient {
            controller: self.controller.clone(),
            controller_id: SpiffeId::workload(&self.trust_domain, crate::SYSTEM_NAMESPACE, crate::FEDERATION_SA)?,
            hello,
            store: store.clone(),
            metrics: XdsMetrics::new(registry),
        };
        tokio::spawn(xds.run(config));
        Ok((store, granted))
    }
}
