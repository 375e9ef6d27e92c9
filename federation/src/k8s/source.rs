//! The Kubernetes catalog source: reflectors over this cluster's Services, EndpointSlices and
//! ServiceExports; an exported Service becomes a local service of the merge, with its
//! endpoints' zones and readiness from the EndpointSlices.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use strait_api::pb;
use strait_trust::{SpiffeId, TrustDomain};
use tokio::sync::Notify;

use super::crd::{Condition, LocalityPolicy, LocalityPolicyStatus, ServiceExport};
use crate::source::{LocalService, SourceError};

/// The one LocalityPolicy that applies.
pub const POLICY_NAME: &str = "default";

/// Annotation on a Service naming its endpoints' service account, for endpoints that are not
/// pods (an EndpointSlice written by hand); a pod's own service account always wins.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "strait.dev/service-account";

pub struct KubeSource {
    client: Client,
    policies: Store<LocalityPolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    exports: Store<ServiceExport>,
    pods: Store<Pod>,
    changed: Arc<Notify>,
    /// HTTPRoutes, GRPCRoutes and TrafficPolicies written in this cluster.
    pub objects: super::KubeObjects,
}

fn spawn_reflector<K>(api: Api<K>, changed: Arc<Notify>, what: &'static str) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(resource = what, error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    reader
}

impl KubeSource {
    /// Starts the watches; returns once every cache holds its first full list (or after
    /// `timeout`, with an error naming what is missing, e.g. the MCS CRDs).
    pub async fn start(client: Client, timeout: Duration) -> anyhow::Result<Self> {
        let changed = Arc::new(Notify::new());
        let source = KubeSource {
            client: client.clone(),
            policies: spawn_reflector(
                Api::<LocalityPolicy>::all(client.clone()),
                changed.clone(),
                "LocalityPolicy",
            ),
            services: spawn_reflector(Api::<Service>::all(client.clone()), changed.clone(), "Service"),
            slices: spawn_reflector(
                Api::<EndpointSlice>::all(client.clone()),
                changed.clone(),
                "EndpointSlice",
            ),
            exports: spawn_reflector(
                Api::<ServiceExport>::all(client.clone()),
                changed.clone(),
                "ServiceExport",
            ),
            pods: spawn_reflector(Api::<Pod>::all(client.clone()), changed.clone(), "Pod"),
            objects: super::KubeObjects::start(client, changed.clone()),
            changed,
        };
        let ready = async {
            let _ = source.services.wait_until_ready().await;
            let _ = source.slices.wait_until_ready().await;
            let _ = source.exports.wait_until_ready().await;
            let _ = source.policies.wait_until_ready().await;
            let _ = source.pods.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, ready).await.map_err(|_| {
            anyhow::anyhow!(
                "the Kubernetes caches did not fill within {timeout:?}: check the kubeconfig, RBAC, and that the \
                 ServiceExport CRD is installed (`strait install --crds | kubectl apply -f -`)"
            )
        })?;
        Ok(source)
    }

    /// Wakes when any watched object changed.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// The `default` LocalityPolicy, if there is one.
    pub fn locality_policy(&self) -> Option<Arc<LocalityPolicy>> {
        self.policies.get(&ObjectRef::new(POLICY_NAME))
    }

    /// Reports on a LocalityPolicy's status whether it was accepted (and why not).
    pub async fn report_policy(&self, generation: Option<i64>, error: Option<&str>) -> Result<(), kube::Error> {
        let condition = Condition {
            type_: "Accepted".into(),
            status: if error.is_none() { "True" } else { "False" }.into(),
            reason: Some(if error.is_none() { "Valid" } else { "Invalid" }.into()),
            message: error.map(|e| format!("{e}; the last good policy keeps serving")),
            last_transition_time: None,
        };
        let status = serde_json::json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "LocalityPolicy",
            "status": LocalityPolicyStatus { observed_generation: generation, conditions: vec![condition] },
        });
        Api::<LocalityPolicy>::all(self.client.clone())
            .patch_status(
                POLICY_NAME,
                &kube::api::PatchParams::apply(super::FIELD_MANAGER).force(),
                &kube::api::Patch::Apply(&status),
            )
            .await?;
        Ok(())
    }

    /// The MCS conditions of every ServiceExport in this cluster: `Valid` (is there a Service
    /// that can be exported) and `Conflict` (does it agree with the other clusters' exports; the
    /// merge decides, so every exporting cluster reports the same conflict).
    pub fn export_conditions(
        &self,
        merged: &crate::catalog::Merged,
        errors: &[SourceError],
    ) -> BTreeMap<String, Vec<Condition>> {
        let mut out = BTreeMap::new();
        for export in self.exports.state() {
            let (Some(name), Some(ns)) = (export.metadata.name.clone(), export.metadata.namespace.clone()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let file = format!("serviceexport/{key}");
            let invalid = errors.iter().find(|e| e.file.to_str() == Some(file.as_str()));
            let mut conditions = vec![Condition {
                type_: "Valid".into(),
                status: if invalid.is_none() { "True" } else { "False" }.into(),
                reason: Some(
                    if invalid.is_none() {
                        "ServiceExported"
                    } else {
                        "InvalidService"
                    }
                    .into(),
                ),
                message: invalid.map(|e| e.message.clone()),
                last_transition_time: None,
            }];
            if let Some(c) = merged
                .get(key.as_str())
                .and_then(|m| m.conditions.iter().find(|c| c.r#type == "Conflict"))
            {
                conditions.push(c.into());
            }
            out.insert(key, conditions);
        }
        out
    }

    /// This cluster's exported services.
    pub fn services(
        &self,
        cluster: &str,
        region: &str,
        td: &TrustDomain,
        _now: SystemTime,
    ) -> (BTreeMap<String, LocalService>, Vec<SourceError>) {
        let mut out = BTreeMap::new();
        let mut errors = vec![];
        let slices = self.slices.state();
        for export in self.exports.state() {
            let (Some(name), Some(ns)) = (export.metadata.name.clone(), export.metadata.namespace.clone()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let Some(svc) = self.services.get(&ObjectRef::new(&name).within(&ns)) else {
                errors.push(SourceError {
                    file: format!("serviceexport/{key}").into(),
                    message: format!("no Service {key} exists to export; create it or delete the ServiceExport"),
                });
                continue;
            };
            if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
                errors.push(SourceError {
                    file: format!("serviceexport/{key}").into(),
                    message: format!(
                        "Service {key} is of type ExternalName, which the MCS API does not export; \
                         export a ClusterIP or headless Service"
                    ),
                });
                continue;
            }
            let exported_at = export
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
                .unwrap_or_default();
            let service_sa = svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SERVICE_ACCOUNT_ANNOTATION).cloned())
                .unwrap_or_else(|| "default".into());
            // An endpoint's identity is its pod's service account (what the CA issues for).
            let identity_of = |target: Option<&k8s_openapi::api::core::v1::ObjectReference>| {
                let pod_sa = target
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| {
                        let pod_ns = t.namespace.as_deref().unwrap_or(ns.as_str());
                        self.pods.get(&ObjectRef::new(t.name.as_deref()?).within(pod_ns))
                    })
                    .and_then(|p| p.spec.as_ref()?.service_account_name.clone());
                let sa = pod_sa.unwrap_or_else(|| service_sa.clone());
                SpiffeId::workload(td, &ns, &sa)
                    .map(|i| i.to_string())
                    .unwrap_or_default()
            };
            let mut identities = vec![];
            let ports: Vec<pb::ServicePort> = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    let name = p.name.clone().unwrap_or_default();
                    let http = matches!(p.app_protocol.as_deref(), Some("http" | "http2" | "kubernetes.io/h2c"))
                        || name == "http"
                        || name.starts_with("http-");
                    pb::ServicePort {
                        name,
                        port: p.port as u32,
                        protocol: if http { "http" } else { "tcp" }.into(),
                    }
                })
                .collect();
            let mut endpoints = vec![];
            for slice in slices.iter().filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name.as_str())
            }) {
                let Some(port) = slice.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port) else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    let identity = identity_of(ep.target_ref.as_ref());
                    if !identities.contains(&identity) {
                        identities.push(identity.clone());
                    }
                    for addr in &ep.addresses {
                        let address = match addr.parse::<std::net::IpAddr>() {
                            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                            _ => format!("{addr}:{port}"),
                        };
                        endpoints.push(pb::Endpoint {
                            address,
                            workload: ep
                                .target_ref
                                .as_ref()
                                .and_then(|t| t.name.clone())
                                .or_else(|| ep.hostname.clone())
                                .unwrap_or_else(|| addr.clone()),
                            locality: Some(pb::Locality {
                                cluster: cluster.into(),
                                region: region.into(),
                                zone: ep.zone.clone().unwrap_or_default(),
                                subzone: String::new(),
                            }),
                            identity: identity.clone(),
                            ready,
                            labels: Default::default(),
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            if identities.is_empty() {
                identities.push(identity_of(None));
            }
            identities.sort();
            out.insert(
                key,
                LocalService {
                    service: std::sync::Arc::new(pb::ExportedService {
                        name,
                        namespace: ns,
                        ports,
                        endpoints,
                        exported_at_unix_ms: exported_at,
                        identities,
                    }),
                    exported: true,
                },
            );
        }
        (out, errors)
    }
}
