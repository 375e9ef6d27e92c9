//! Routes and policies as Kubernetes objects: `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`) and `TrafficPolicy` (`policy.strait.dev/v1alpha1`) in
//! this cluster's API server are objects written here, like `strait apply`'s files. Each is
//! read untyped (one malformed object never stops the watch of its kind) and checked by the
//! same code; its status says, Gateway API style, how every cluster enforces it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde_json::json;
use strait_api::pb;
use tokio::sync::Notify;

use crate::objects::{key, parse_kube, Parsed, Summary, AUTHORIZATION_POLICY, GRPC_ROUTE, HTTP_ROUTE, TRAFFIC_POLICY};

/// The controller name routes' `status.parents` carry.
pub const CONTROLLER_NAME: &str = "strait.dev/federation-controller";

struct Kind {
    kind: &'static str,
    resource: ApiResource,
    store: Store<DynamicObject>,
}

pub struct KubeObjects {
    client: Client,
    kinds: Vec<Kind>,
    /// The last status written per object, and when each condition last changed.
    written: Mutex<HashMap<String, serde_json::Value>>,
    transitions: Mutex<HashMap<(String, String, String), String>>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

impl KubeObjects {
    /// Starts the watches. They do not hold up the controller: a kind whose CRD is missing is
    /// retried with backoff (and logged) until it appears.
    pub fn start(client: Client, changed: Arc<Notify>) -> Self {
        let kinds = [
            (
                HTTP_ROUTE,
                resource("gateway.networking.k8s.io", "v1", HTTP_ROUTE, "httproutes"),
            ),
            (
                GRPC_ROUTE,
                resource("gateway.networking.k8s.io", "v1", GRPC_ROUTE, "grpcroutes"),
            ),
            (
                TRAFFIC_POLICY,
                resource("policy.strait.dev", "v1alpha1", TRAFFIC_POLICY, "trafficpolicies"),
            ),
            (
                AUTHORIZATION_POLICY,
                resource(
                    "policy.strait.dev",
                    "v1alpha1",
                    AUTHORIZATION_POLICY,
                    "authorizationpolicies",
                ),
            ),
        ]
        .into_iter()
        .map(|(kind, resource)| {
            let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
            let store = writer.as_reader();
            let stream = watcher(
                Api::<DynamicObject>::all_with(client.clone(), &resource),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer);
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(_) => changed.notify_one(),
                        Err(e) => tracing::warn!(resource = kind, error = %e, "watch failed; retrying with backoff"),
                    }
                }
            });
            Kind { kind, resource, store }
        })
        .collect();
        KubeObjects {
            client,
            kinds,
            written: Mutex::default(),
            transitions: Mutex::default(),
        }
    }

    /// Every object of the watched kinds: its key, what parsing made of it, its creation time.
    pub fn objects(&self) -> Vec<(String, Result<Parsed, String>, i64)> {
        let mut out = vec![];
        for k in &self.kinds {
            for o in k.store.state() {
                let m = &o.metadata;
                let ns = m.namespace.clone().unwrap_or_else(|| "default".into());
                let name = m.name.clone().unwrap_or_default();
                let created = m
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.as_millisecond())
                    .unwrap_or_default();
                let spec = o.data.get("spec").cloned().unwrap_or_else(|| json!({}));
                let parsed = parse_kube(
                    &k.resource.api_version,
                    k.kind,
                    &ns,
                    &name,
                    m.labels.clone().unwrap_or_default(),
                    m.annotations.clone().unwrap_or_default(),
                    m.generation,
                    spec,
                );
                out.push((key(k.kind, &ns, &name), parsed, created));
            }
        }
        out
    }

    fn transition(&self, k: &str, c: &pb::Condition) -> String {
        let now = || {
            time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
        };
        let Ok(mut t) = self.transitions.lock() else {
            return now();
        };
        let entry = (k.to_string(), c.r#type.clone(), format!("{}/{}", c.status, c.reason));
        if let Some(at) = t.get(&entry) {
            return at.clone();
        }
        t.retain(|(key, kind, _), _| !(key == k && *kind == c.r#type));
        let at = now();
        t.insert(entry, at.clone());
        at
    }

    /// Writes each object's status (only when it changed): its conditions here, plus an
    /// `Applied` condition that says in how many clusters and proxies its current generation
    /// is enforced and names those that do not.
    pub async fn write_statuses(&self, statuses: &BTreeMap<String, (Vec<pb::Condition>, Summary)>) {
        for k in &self.kinds {
            for o in k.store.state() {
                let ns = o.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                let name = o.metadata.name.clone().unwrap_or_default();
                let object_key = key(k.kind, &ns, &name);
                let Some((conditions, summary)) = statuses.get(&object_key) else {
                    continue;
                };
                let generation = o.metadata.generation;
                let mut all = conditions.clone();
                let everywhere = summary.missing.is_empty() && summary.proxies_acked >= summary.proxies_total;
                all.push(pb::Condition {
                    r#type: "Applied".into(),
                    status: if everywhere { "True" } else { "False" }.into(),
                    reason: if everywhere { "Applied" } else { "Pending" }.into(),
                    message: applied_message(summary),
                });
                let metav1: Vec<serde_json::Value> = all
                    .iter()
                    .map(|c| {
                        json!({
                            "type": c.r#type,
                            "status": c.status,
                            "reason": if c.reason.is_empty() { c.r#type.clone() } else { c.reason.clone() },
                            "message": c.message,
                            "lastTransitionTime": self.transition(&object_key, c),
                            "observedGeneration": generation,
                        })
                    })
                    .collect();
                let status = if k.kind == TRAFFIC_POLICY || k.kind == AUTHORIZATION_POLICY {
                    json!({
                        "observedGeneration": generation,
                        "conditions": metav1,
                        "clusters": summary.reports.iter().map(|r| json!({
                            "cluster": r.cluster,
                            "generation": r.generation as i64,
                            "accepted": r.conditions.iter().any(|c| c.r#type == "Accepted" && c.status == "True"),
                            "message": r.conditions.iter().filter(|c| c.status == "False" || c.r#type == "Conflict").map(|c| c.message.clone()).collect::<Vec<_>>().join("; "),
                            "proxiesAcked": r.proxies_acked as i64,
                            "proxiesTotal": r.proxies_total as i64,
                        })).collect::<Vec<_>>(),
                    })
                } else {
                    let parents: Vec<serde_json::Value> = o
                        .data
                        .pointer("/spec/parentRefs")
                        .and_then(|p| p.as_array())
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| json!({"parentRef": p, "controllerName": CONTROLLER_NAME, "conditions": metav1}))
                        .collect();
                    json!({ "parents": parents })
                };
                if self.written.lock().ok().and_then(|w| w.get(&object_key).cloned()) == Some(status.clone()) {
                    continue;
                }
                let patch = json!({
                    "apiVersion": k.resource.api_version,
                    "kind": k.kind,
                    "status": status,
                });
                let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &k.resource);
                match api
                    .patch_status(
                        &name,
                        &PatchParams::apply(super::FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        if let Ok(mut w) = self.written.lock() {
                            w.insert(object_key, status);
                        }
                    }
                    Err(e) => tracing::warn!(object = %object_key, error = %e, "cannot write status yet; retrying"),
                }
            }
        }
    }
}

/// "applied in 2/3 clusters (not yet: central); 4/6 proxies acknowledged generation 3".
pub fn applied_message(s: &Summary) -> String {
    let mut m = format!("applied in {}/{} clusters", s.applied.len(), s.expected);
    if !s.missing.is_empty() {
        m.push_str(&format!(" (not yet: {})", s.missing.join(", ")));
    }
    m.push_str(&format!(
        "; {}/{} proxies acknowledged generation {}",
        s.proxies_acked, s.proxies_total, s.generation
    ));
    if !s.pending.is_empty() {
        m.push_str(&format!(" (not yet: {})", s.pending.join(", ")));
    }
    m
}
