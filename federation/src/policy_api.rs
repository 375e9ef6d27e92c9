//! `strait apply` and `strait delete` outside Kubernetes: the write side of routes and
//! policies, on the controller's mTLS port. Only the operator identity may call it
//! (`spiffe://<td>/ns/strait-system/sa/strait-operator`, issued by `strait up`). A request is
//! applied whole or not at all: any schema error refuses it, naming the document and the
//! field, and nothing is written. Accepted objects become files of the policy directory (one
//! per object, written aside and renamed), so they survive a restart of the controller.

use std::path::PathBuf;
use std::sync::Arc;

use strait_api::pb;
use strait_api::pb::policy_service_server::PolicyService;
use strait_api::transport::PeerInfo;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::objects::{parse_documents, Parsed};

/// The service account whose identity may write routes and policies.
pub const OPERATOR_SA: &str = "strait-operator";

pub struct PolicyApi {
    pub dir: Option<PathBuf>,
    /// Wakes the controller's loop so an apply reaches proxies and peers at once.
    pub changed: Arc<Notify>,
    /// Serialises writes (two applies of one object must not interleave).
    pub lock: tokio::sync::Mutex<()>,
    pub explain: Explainer,
}

/// What `Explain` needs: this cluster's sidecars (their admin addresses, from their Hello)
/// and a channel to each peer cluster's controller.
pub struct Explainer {
    pub cluster: String,
    pub xds: crate::xds::XdsServer,
    pub peers: std::collections::BTreeMap<String, tonic::transport::Channel>,
}

/// How long a sidecar (or a peer's controller) may take to explain.
const EXPLAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Explainer {
    /// Asks this cluster's sidecar `workload` for its `/explain` of the request.
    async fn local(&self, req: &pb::ExplainRequest) -> Result<String, Status> {
        let proxies = self.xds.proxies();
        let sidecars = || proxies.iter().filter(|p| p.kind == "sidecar");
        let proxy = sidecars().find(|p| p.node == req.workload).ok_or_else(|| {
            let known: Vec<&str> = sidecars().map(|p| p.node.as_str()).collect();
            Status::not_found(format!(
                "no sidecar {} in cluster {}; its sidecars: {}",
                req.workload,
                self.cluster,
                known.join(", ")
            ))
        })?;
        if proxy.admin.is_empty() {
            return Err(Status::failed_precondition(format!(
                "sidecar {} did not say its admin address (an older version?)",
                req.workload
            )));
        }
        let query = strait_api::admin::explain_query(&req.method, &req.url, &req.headers);
        let uri: hyper::Uri = format!("http://{}/explain?{query}", proxy.admin)
            .parse()
            .map_err(|e| Status::invalid_argument(format!("cannot build the request: {e}")))?;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let unavailable = |e: String| Status::unavailable(format!("sidecar {} at {}: {e}", req.workload, proxy.admin));
        let body = tokio::time::timeout(EXPLAIN_TIMEOUT, async {
            use http_body_util::BodyExt;
            let resp = client.get(uri).await.map_err(|e| unavailable(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).to_string();
            if !status.is_success() {
                return Err(Status::invalid_argument(text.trim().to_string()));
            }
            Ok(text)
        })
        .await
        .map_err(|_| unavailable(format!("no answer within {EXPLAIN_TIMEOUT:?}")))??;
        Ok(body)
    }

    /// Asks the controller of `req.cluster` (a peer).
    async fn remote(&self, req: pb::ExplainRequest) -> Result<String, Status> {
        let channel = self.peers.get(&req.cluster).cloned().ok_or_else(|| {
            let known: Vec<&str> = std::iter::once(self.cluster.as_str())
                .chain(self.peers.keys().map(String::as_str))
                .collect();
            Status::not_found(format!(
                "no cluster {} in this clusterset; its clusters: {}",
                req.cluster,
                known.join(", ")
            ))
        })?;
        let cluster = req.cluster.clone();
        let mut client = pb::policy_service_client::PolicyServiceClient::new(channel);
        let answer = tokio::time::timeout(EXPLAIN_TIMEOUT * 2, client.explain(req))
            .await
            .map_err(|_| Status::unavailable(format!("cluster {cluster}'s controller did not answer in time")))?
            .map_err(|e| Status::new(e.code(), format!("cluster {cluster}: {}", e.message())))?;
        Ok(answer.into_inner().json)
    }
}

fn file_name(p: &Parsed) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .collect()
    };
    format!(
        "{}.{}.{}.yaml",
        p.kind.to_ascii_lowercase(),
        clean(&p.namespace),
        clean(&p.name)
    )
}

impl PolicyApi {
    fn authorize<T>(&self, req: &Request<T>) -> Result<PathBuf, Status> {
        let id = PeerInfo::of(req).and_then(|p| p.identity.clone()).ok_or_else(|| {
            Status::unauthenticated("writing routes and policies needs the operator's client certificate")
        })?;
        if id.namespace() != Some(strait_api::SYSTEM_NAMESPACE) || id.service_account() != Some(OPERATOR_SA) {
            return Err(Status::permission_denied(format!(
                "{id} may not write routes or policies; only {}/{OPERATOR_SA} may (strait up writes its credentials)",
                strait_api::SYSTEM_NAMESPACE
            )));
        }
        self.dir.clone().ok_or_else(|| {
            Status::failed_precondition("this controller has no policy directory (routesDir in its config)")
        })
    }

    /// Explaining reads, never writes: the operator may ask, and so may a peer cluster's
    /// controller on the operator's behalf (for its own cluster only, see `explain`).
    fn may_explain<T>(&self, req: &Request<T>) -> Result<bool, Status> {
        let id = PeerInfo::of(req)
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| Status::unauthenticated("explaining needs the operator's client certificate"))?;
        let system = id.namespace() == Some(strait_api::SYSTEM_NAMESPACE);
        match id.service_account() {
            Some(OPERATOR_SA) if system => Ok(false),
            Some(strait_api::FEDERATION_SA) if system => Ok(true),
            _ => Err(Status::permission_denied(format!(
                "{id} may not ask for explanations; only {}/{OPERATOR_SA} may",
                strait_api::SYSTEM_NAMESPACE
            ))),
        }
    }

    fn parse(req: &pb::ApplyRequest) -> Result<Vec<Parsed>, Status> {
        let mut ok = vec![];
        let mut errors = vec![];
        for r in parse_documents(&req.yaml) {
            match r {
                Ok(p) => ok.push(p),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{}: nothing was applied:\n  {}",
                if req.source.is_empty() { "input" } else { &req.source },
                errors.join("\n  ")
            )));
        }
        if ok.is_empty() {
            return Err(Status::invalid_argument(
                "no objects in the input; expected HTTPRoute or TrafficPolicy documents",
            ));
        }
        Ok(ok)
    }
}

/// The stored version of an object, if any: (generation, created, spec, scope, locks).
fn stored(path: &std::path::Path) -> Option<Parsed> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_documents(&text).into_iter().find_map(Result::ok)
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let dir = self.authorize(&req)?;
        let req = req.into_inner();
        let objects = Self::parse(&req)?;
        let _guard = self.lock.lock().await;
        let mut results = vec![];
        let mut writes = vec![];
        for p in objects {
            let path = dir.join(file_name(&p));
            let before = stored(&path);
            let same = before
                .as_ref()
                .is_some_and(|b| b.spec == p.spec && b.cluster_scope == p.cluster_scope && b.locked == p.locked);
            let generation = match &before {
                Some(b) if same => b.generation.unwrap_or(1),
                Some(b) => b.generation.unwrap_or(1) + 1,
                None => 1,
            };
            let created = before
                .as_ref()
                .and_then(|b| b.created_unix_ms)
                .unwrap_or_else(|| strait_api::unix_ms(std::time::SystemTime::now()));
            let action = match (&before, same) {
                (None, _) => "created",
                (Some(_), true) => "unchanged",
                (Some(_), false) => "configured",
            };
            results.push(pb::ApplyResult {
                kind: p.kind.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: action.into(),
                generation,
            });
            if !same {
                writes.push((path, p.to_stored_yaml(generation, created)));
            }
        }
        if !req.dry_run {
            for (path, text) in writes {
                let tmp = path.with_extension("yaml.tmp");
                std::fs::write(&tmp, text)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| Status::internal(format!("cannot write {}: {e}", path.display())))?;
            }
            self.changed.notify_one();
        }
        Ok(Response::new(pb::ApplyResponse { results }))
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        let from_peer = self.may_explain(&req)?;
        let req = req.into_inner();
        if let Some(bad) = req.headers.iter().find(|h| !h.contains(':')) {
            return Err(Status::invalid_argument(format!("header {bad:?}: use 'name: value'")));
        }
        let json = if req.cluster == self.explain.cluster {
            self.explain.local(&req).await?
        } else if from_peer {
            // A peer asks only for its own peers' clusters; never forwarded twice.
            return Err(Status::not_found(format!(
                "this is cluster {}'s controller, not {}'s",
                self.explain.cluster, req.cluster
            )));
        } else {
            self.explain.remote(req).await?
        };
        Ok(Response::new(pb::ExplainResponse { json }))
    }

    async fn delete(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let dir = self.authorize(&req)?;
        let req = req.into_inner();
        let objects = Self::parse(&req)?;
        let _guard = self.lock.lock().await;
        let mut results = vec![];
        for p in objects {
            let path = dir.join(file_name(&p));
            let found = path.exists();
            if found && !req.dry_run {
                std::fs::remove_file(&path)
                    .map_err(|e| Status::internal(format!("cannot remove {}: {e}", path.display())))?;
            }
            results.push(pb::ApplyResult {
                kind: p.kind.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: if found { "deleted" } else { "not-found" }.into(),
                generation: 0,
            });
        }
        self.changed.notify_one();
        Ok(Response::new(pb::ApplyResponse { results }))
    }
}
