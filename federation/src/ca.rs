//! The cluster's CA endpoint: checks the caller's credential, then signs its CSR for the
//! identity that credential proves, never for what the CSR asks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, Opts, Registry};
use strait_api::pb;
use strait_api::pb::certificate_service_server::CertificateService;
use strait_trust::{Authority, SpiffeId, TrustDomain};
use tonic::{Request, Response, Status};

use crate::config::JoinToken;

pub struct CaServer {
    authority: Arc<Authority>,
    trust_domain: TrustDomain,
    tokens: HashMap<String, (String, String)>,
    max_ttl: Duration,
    bundle_pem: String,
    issued: IntCounterVec,
}

impl CaServer {
    pub fn new(
        authority: Arc<Authority>,
        tokens: &[JoinToken],
        max_ttl: Duration,
        bundle_pem: String,
        registry: &Registry,
    ) -> Self {
        let issued = IntCounterVec::new(
            Opts::new("strait_ca_requests_total", "Certificate signing requests, by result"),
            &["result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(issued.clone()));
        CaServer {
            trust_domain: authority.trust_domain().clone(),
            authority,
            tokens: tokens
                .iter()
                .map(|t| (t.token.clone(), (t.namespace.clone(), t.service_account.clone())))
                .collect(),
            max_ttl,
            bundle_pem,
            issued,
        }
    }
}

#[tonic::async_trait]
impl CertificateService for CaServer {
    async fn sign(&self, req: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
        let req = req.into_inner();
        let Some((ns, sa)) = self.tokens.get(&req.join_token) else {
            self.issued.with_label_values(&["unauthenticated"]).inc();
            return Err(Status::unauthenticated(
                "the join token is not known to this cluster's CA; use the token `strait up` or the operator gave this workload",
            ));
        };
        let id = SpiffeId::workload(&self.trust_domain, ns, sa).map_err(|e| Status::internal(e.to_string()))?;
        let ttl = match req.ttl_seconds {
            0 => self.max_ttl,
            s => Duration::from_secs(s).min(self.max_ttl),
        };
        let issued = self
            .authority
            .sign_csr(&req.csr_der, &id, SystemTime::now(), ttl)
            .map_err(|e| {
                self.issued.with_label_values(&["bad_csr"]).inc();
                Status::invalid_argument(e.to_string())
            })?;
        self.issued.with_label_values(&["issued"]).inc();
        tracing::info!(%id, ttl = ?ttl, "issued workload certificate");
        Ok(Response::new(pb::SignResponse {
            spiffe_id: id.to_string(),
            chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
            bundle_pem: self.bundle_pem.clone(),
            not_before_unix_ms: strait_api::unix_ms(issued.not_before),
            not_after_unix_ms: strait_api::unix_ms(issued.not_after),
        }))
    }
}
