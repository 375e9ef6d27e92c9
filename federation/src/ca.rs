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
    /// In Kubernetes mode: checks service-account tokens with TokenReview.
    reviewer: Option<kube::Client>,
    trust_domain: TrustDomain,
    tokens: HashMap<String, (String, String)>,
    max_ttl: Duration,
    bundle_pem: String,
    issued: IntCounterVec,
    /// What this cluster's gateways derive QUIC stateless-reset tokens from
    /// (`SignResponse.quic_reset_key`).
    quic_reset_key: [u8; 32],
}

/// What the CA key derives the gateways' QUIC stateless-reset key for.
const QUIC_RESET_PURPOSE: &str = "strait gateway QUIC stateless reset v1";

impl CaServer {
    pub fn new(
        authority: Arc<Authority>,
        tokens: &[JoinToken],
        reviewer: Option<kube::Client>,
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
            reviewer,
            quic_reset_key: authority.derive_secret(QUIC_RESET_PURPOSE),
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

impl CaServer {
    /// The namespace and service account the request's credential proves.
    async fn authenticate(&self, req: &pb::SignRequest) -> Result<Caller, Status> {
        if !req.service_account_token.is_empty() {
            let Some(client) = &self.reviewer else {
                return Err(Status::unauthenticated(
                    "this CA does not run in Kubernetes mode and cannot check service-account tokens; use a join token",
                ));
            };
            return review(client, &req.service_account_token).await;
        }
        self.tokens.get(&req.join_token).cloned().map(|(ns, sa)| Caller { ns, sa, pod: None }).ok_or_else(|| {
            Status::unauthenticated(
                "the join token is not known to this cluster's CA; use the token `strait up` or the operator gave this workload",
            )
        })
    }
}

/// Who asked for a certificate.
struct Caller {
    ns: String,
    sa: String,
    /// The pod a bound service-account token belongs to.
    pod: Option<String>,
}

/// The region and zone labels of the node `pod` runs on (what the EndpointSlice controller puts
/// on the pod's endpoints), so an injected sidecar knows its own zone without a flag.
async fn pod_locality(client: &kube::Client, ns: &str, pod: &str) -> Option<pb::Locality> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    let pod = kube::Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(pod)
        .await
        .ok()??;
    let node_name = pod.spec?.node_name?;
    let node = kube::Api::<Node>::all(client.clone())
        .get_opt(&node_name)
        .await
        .ok()??;
    let labels = node.metadata.labels.unwrap_or_default();
    let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let zone = label("topology.kubernetes.io/zone");
    (!zone.is_empty()).then(|| pb::Locality {
        cluster: String::new(),
        region: label("topology.kubernetes.io/region"),
        zone,
        subzone: label("topology.strait.dev/subzone"),
    })
}

/// Asks this cluster's API server whether the token is a valid service-account token for the
/// `strait` audience, and whose.
async fn review(client: &kube::Client, token: &str) -> Result<Caller, Status> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![strait_api::TOKEN_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let result = kube::Api::<TokenReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
    let status = result.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(format!(
            "the service-account token was refused by the API server: {}",
            status.error.unwrap_or_else(|| "not authenticated".into())
        )));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == strait_api::TOKEN_AUDIENCE)
    {
        return Err(Status::unauthenticated(format!(
            "the service-account token is not for audience {:?}; mount a projected token with that audience",
            strait_api::TOKEN_AUDIENCE
        )));
    }
    let user = status.user.unwrap_or_default();
    let pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first().cloned());
    let username = user.username.unwrap_or_default();
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Ok(Caller {
            ns: ns.to_string(),
            sa: sa.to_string(),
            pod,
        }),
        _ => Err(Status::unauthenticated(format!(
            "{username:?} is not a service account; only pods' service-account tokens are accepted"
        ))),
    }
}

#[tonic::async_trait]
impl CertificateService for CaServer {
    async fn sign(&self, req: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
        let req = req.into_inner();
        let Caller { ns, sa, pod } = match self.authenticate(&req).await {
            Ok(who) => who,
            Err(status) => {
                self.issued.with_label_values(&["unauthenticated"]).inc();
                tracing::warn!(reason = %status.message(), "refused a certificate request");
                return Err(status);
            }
        };
        let id = SpiffeId::workload(&self.trust_domain, &ns, &sa).map_err(|e| Status::internal(e.to_string()))?;
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
        let locality = match (&self.reviewer, &pod) {
            (Some(client), Some(pod)) => pod_locality(client, &ns, pod).await,
            _ => None,
        };
        self.issued.with_label_values(&["issued"]).inc();
        tracing::info!(%id, ttl = ?ttl, "issued workload certificate");
        Ok(Response::new(pb::SignResponse {
            spiffe_id: id.to_string(),
            chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
            bundle_pem: self.bundle_pem.clone(),
            not_before_unix_ms: strait_api::unix_ms(issued.not_before),
            not_after_unix_ms: strait_api::unix_ms(issued.not_after),
            locality,
            quic_reset_key: if ns == strait_api::SYSTEM_NAMESPACE && sa == strait_api::GATEWAY_SA {
                self.quic_reset_key.to_vec()
            } else {
                vec![]
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_gateways_are_given_the_quic_reset_key_and_every_ca_server_of_the_cluster_gives_the_same() {
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let now = SystemTime::now();
        let root = Authority::new_root(&td, now).unwrap();
        let east = Arc::new(root.new_intermediate("east", now).unwrap());
        let west = Arc::new(root.new_intermediate("west", now).unwrap());
        let token = |token: &str, namespace: &str, service_account: &str| JoinToken {
            token: token.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let tokens = [
            token("gateway", strait_api::SYSTEM_NAMESPACE, strait_api::GATEWAY_SA),
            token("app", "demo", "echo"),
        ];
        let reset_key = |ca: &Arc<Authority>, join_token: &str| {
            // A CA server of its own each time, as a restarted controller runs.
            let server = CaServer::new(
                ca.clone(),
                &tokens,
                None,
                Duration::from_secs(3600),
                String::new(),
                &Registry::new(),
            );
            let join_token = join_token.to_string();
            async move {
                let request = pb::SignRequest {
                    csr_der: strait_trust::KeyAndCsr::generate().unwrap().csr_der,
                    join_token,
                    ..Default::default()
                };
                server
                    .sign(Request::new(request))
                    .await
                    .unwrap()
                    .into_inner()
                    .quic_reset_key
            }
        };
        let key = reset_key(&east, "gateway").await;
        assert_eq!(key.len(), 32);
        assert_eq!(reset_key(&east, "gateway").await, key, "the same after a restart");
        // A restarted controller loads its CA from disk (`Authority::load`): the same key.
        let dir = std::env::temp_dir().join(format!("strait-ca-reset-{}", std::process::id()));
        east.write(&dir).unwrap();
        let reloaded = Arc::new(Authority::load(&dir, &td).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            reset_key(&reloaded, "gateway").await,
            key,
            "the same from the CA loaded again"
        );
        assert!(reset_key(&east, "app").await.is_empty(), "a workload is given none");
        assert_ne!(
            reset_key(&west, "gateway").await,
            key,
            "another cluster's CA derives another"
        );
    }
}
