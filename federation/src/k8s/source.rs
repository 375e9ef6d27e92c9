//! The Kubernetes catalog source: reflectors over this cluster's Services, EndpointSlices and
//! ServiceExports; an exported Service becomes a local service of the merge, with its
//! endpoints' zones and readiness from the EndpointSlices.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    local: LocalObjects,
    changed: Arc<Notify>,
    /// Counts the changes to the objects [`KubeSource::services`] reads (Services,
    /// EndpointSlices, ServiceExports, Pods): what it returns is the same while this is.
    changes: Arc<AtomicU64>,
    /// HTTPRoutes, GRPCRoutes and TrafficPolicies written in this cluster.
    pub objects: super::KubeObjects,
}

/// The objects this cluster's services are built from (Services, EndpointSlices,
/// ServiceExports and Pods, each a reflector's store), and what was last built from them.
struct LocalObjects {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    exports: Store<ServiceExport>,
    pods: Store<Pod>,
    /// Counts the Pods created or deleted and the service accounts changed (an endpoint's
    /// identity is its pod's account; a pod's status is not read).
    pod_changes: Arc<AtomicU64>,
    /// Each exported service as last built, with what it was built from: a service whose
    /// ServiceExport, Service and EndpointSlices have the resource versions they had (and no
    /// Pod changed) is the same `Arc` as before, not built again from thousands of endpoints.
    built: HashMap<String, (BuiltFrom, LocalService)>,
}

impl LocalObjects {
    /// This cluster's exported services, and the problems of those that cannot be.
    fn services(
        &mut self,
        cluster: &str,
        region: &str,
        td: &TrustDomain,
    ) -> (BTreeMap<String, LocalService>, Vec<SourceError>) {
        let mut out = BTreeMap::new();
        let mut errors = vec![];
        // Read before the stores: a Pod change after this read is a new count next time.
        let pods = self.pod_changes.load(Ordering::Acquire);
        let last = std::mem::take(&mut self.built);
        let mut built = HashMap::with_capacity(last.len());
        // Each Service's EndpointSlices, by namespace and the `kubernetes.io/service-name`
        // label, found in one walk over the slices (not one walk per export).
        let all_slices = self.slices.state();
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &all_slices {
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"));
            if let (Some(ns), Some(service)) = (slice.metadata.namespace.as_deref(), owner) {
                slices.entry((ns, service.as_str())).or_default().push(slice);
            }
        }
        // By name: the store lists in no set order, and what a service was built from is
        // compared as a list.
        for own in slices.values_mut() {
            own.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
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
            let own_slices = slices
                .get(&(ns.as_str(), name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let from = BuiltFrom {
                export: export.metadata.resource_version.clone(),
                service: svc.metadata.resource_version.clone(),
                slices: own_slices
                    .iter()
                    .map(|s| (s.metadata.name.clone(), s.metadata.resource_version.clone()))
                    .collect(),
                pods,
            };
            if let Some((_, local)) = last.get(&key).filter(|(f, _)| *f == from) {
                built.insert(key.clone(), (from, local.clone()));
                out.insert(key, local.clone());
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
            for slice in own_slices {
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
            let mut local = LocalService {
                service: std::sync::Arc::new(pb::ExportedService {
                    name,
                    namespace: ns,
                    ports,
                    endpoints,
                    exported_at_unix_ms: exported_at,
                    identities,
                }),
                exported: true,
            };
            // Built again but the same (its ServiceExport's status was written, say): the `Arc`
            // of before, which the catalog and the merge still hold and compare by pointer.
            if let Some((_, before)) = last.get(&key).filter(|(_, before)| *before == local) {
                local = before.clone();
            }
            built.insert(key.clone(), (from, local.clone()));
            out.insert(key, local);
        }
        // What is no longer exported is forgotten with the last call's map.
        self.built = built;
        (out, errors)
    }
}

/// What one exported service was built from: the resource versions of its ServiceExport,
/// Service and EndpointSlices (by name), and the count of Pod changes.
#[derive(Debug, PartialEq)]
struct BuiltFrom {
    export: Option<String>,
    service: Option<String>,
    slices: Vec<(Option<String>, Option<String>)>,
    pods: u64,
}

/// Pods' service accounts as the catalog reads them (an endpoint's identity is its pod's
/// account): [`PodAccounts::observe`] says whether a watch event changed one, so a pod's status
/// updates (most of a busy cluster's Pod events) do not rebuild the catalog.
#[derive(Default)]
struct PodAccounts {
    known: HashMap<(String, String), Option<String>>,
    /// The accounts listed since a relist began (`Init`), which the store takes at `InitDone`.
    relist: HashMap<(String, String), Option<String>>,
}

impl PodAccounts {
    fn key(pod: &Pod) -> (String, String) {
        (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        )
    }

    fn account(pod: &Pod) -> Option<String> {
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone())
    }

    /// Whether the store, once it has applied `event`, holds a pod or an account it did not.
    fn observe(&mut self, event: &watcher::Event<Pod>) -> bool {
        match event {
            watcher::Event::Apply(pod) => {
                let account = Self::account(pod);
                self.known.insert(Self::key(pod), account.clone()) != Some(account)
            }
            watcher::Event::Delete(pod) => {
                self.known.remove(&Self::key(pod));
                true
            }
            watcher::Event::Init => {
                self.relist.clear();
                false
            }
            watcher::Event::InitApply(pod) => {
                self.relist.insert(Self::key(pod), Self::account(pod));
                false
            }
            watcher::Event::InitDone => {
                let changed = self.relist != self.known;
                self.known = std::mem::take(&mut self.relist);
                changed
            }
        }
    }
}

/// Starts a reflector of `api`; each change it applies to the store that `counts` says matters
/// bumps every one of `counters` and then wakes `changed`, so a loop woken by it and reading a
/// counter after sees the store as changed.
fn spawn_reflector<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    counters: &[&Arc<AtomicU64>],
    mut counts: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
    what: &'static str,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let counters: Vec<Arc<AtomicU64>> = counters.iter().map(|c| Arc::clone(c)).collect();
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // The store already holds this event (`reflect` applies it before passing it on).
                Ok(event) => {
                    if counts(&event) {
                        for c in &counters {
                            c.fetch_add(1, Ordering::Release);
                        }
                        changed.notify_one()
                    }
                }
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
        let changes = Arc::new(AtomicU64::new(0));
        let pod_changes = Arc::new(AtomicU64::new(0));
        let source = KubeSource {
            client: client.clone(),
            policies: spawn_reflector(
                Api::<LocalityPolicy>::all(client.clone()),
                changed.clone(),
                &[],
                |_| true,
                "LocalityPolicy",
            ),
            local: LocalObjects {
                services: spawn_reflector(
                    Api::<Service>::all(client.clone()),
                    changed.clone(),
                    &[&changes],
                    |_| true,
                    "Service",
                ),
                slices: spawn_reflector(
                    Api::<EndpointSlice>::all(client.clone()),
                    changed.clone(),
                    &[&changes],
                    |_| true,
                    "EndpointSlice",
                ),
                exports: spawn_reflector(
                    Api::<ServiceExport>::all(client.clone()),
                    changed.clone(),
                    &[&changes],
                    |_| true,
                    "ServiceExport",
                ),
                pods: spawn_reflector(
                    Api::<Pod>::all(client.clone()),
                    changed.clone(),
                    &[&changes, &pod_changes],
                    {
                        let mut accounts = PodAccounts::default();
                        move |event: &watcher::Event<Pod>| accounts.observe(event)
                    },
                    "Pod",
                ),
                pod_changes,
                built: HashMap::new(),
            },
            objects: super::KubeObjects::start(client, changed.clone()),
            changed,
            changes,
        };
        let ready = async {
            let _ = source.local.services.wait_until_ready().await;
            let _ = source.local.slices.wait_until_ready().await;
            let _ = source.local.exports.wait_until_ready().await;
            let _ = source.policies.wait_until_ready().await;
            let _ = source.local.pods.wait_until_ready().await;
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

    /// How many changes to the objects [`KubeSource::services`] reads have reached their
    /// caches. Read it before calling `services`: a change after the read shows as a new count
    /// at the next pass, so none is missed (at worst one is built twice).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
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
        for export in self.local.exports.state() {
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

    /// This cluster's exported services. A service built before from the same objects (see
    /// [`BuiltFrom`]) is the same `Arc` as then.
    pub fn services(
        &mut self,
        cluster: &str,
        region: &str,
        td: &TrustDomain,
        _now: SystemTime,
    ) -> (BTreeMap<String, LocalService>, Vec<SourceError>) {
        self.local.services(cluster, region, td)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use serde_json::json;

    /// Stores written by hand, as a reflector writes them.
    struct Objects {
        services: Writer<Service>,
        slices: Writer<EndpointSlice>,
        exports: Writer<ServiceExport>,
        pods: Writer<Pod>,
        local: LocalObjects,
    }

    fn objects() -> Objects {
        let (services, services_w) = reflector::store();
        let (slices, slices_w) = reflector::store();
        let (exports, exports_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        Objects {
            services: services_w,
            slices: slices_w,
            exports: exports_w,
            pods: pods_w,
            local: LocalObjects {
                services,
                slices,
                exports,
                pods,
                pod_changes: Arc::new(AtomicU64::new(0)),
                built: HashMap::new(),
            },
        }
    }

    fn apply<K: serde::de::DeserializeOwned>(value: serde_json::Value) -> watcher::Event<K> {
        watcher::Event::Apply(serde_json::from_value(value).unwrap())
    }

    fn service(name: &str, rv: &str) -> watcher::Event<Service> {
        apply(
            json!({"metadata": {"name": name, "namespace": "sim", "resourceVersion": rv},
            "spec": {"ports": [{"name": "http", "port": 80}]}}),
        )
    }

    fn export(name: &str, rv: &str) -> watcher::Event<ServiceExport> {
        apply(
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": name, "namespace": "sim", "resourceVersion": rv}, "spec": {}}),
        )
    }

    fn slice(name: &str, rv: &str, address: &str, pod: Option<&str>) -> watcher::Event<EndpointSlice> {
        let target = pod.map(|p| json!({"kind": "Pod", "name": p, "namespace": "sim"}));
        apply(
            json!({"metadata": {"name": format!("{name}-1"), "namespace": "sim", "resourceVersion": rv,
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [address], "zone": "z1", "targetRef": target}]}),
        )
    }

    fn pod(name: &str, account: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "sim"},
            "spec": {"serviceAccountName": account, "containers": []}, "status": {"phase": phase}}))
        .unwrap()
    }

    #[test]
    fn only_pods_coming_going_or_changing_account_count() {
        let mut accounts = PodAccounts::default();
        let mut seen = |e: watcher::Event<Pod>| accounts.observe(&e);
        assert!(seen(watcher::Event::Apply(pod("a", "ledger", "Pending"))), "a new pod");
        assert!(
            !seen(watcher::Event::Apply(pod("a", "ledger", "Running"))),
            "its status alone"
        );
        assert!(
            seen(watcher::Event::Apply(pod("a", "billing", "Running"))),
            "another account"
        );
        assert!(seen(watcher::Event::Apply(pod("b", "ledger", "Running"))));
        assert!(
            seen(watcher::Event::Delete(pod("b", "ledger", "Running"))),
            "a pod gone"
        );
        // A relist counts once, at its end, and only if it found something else.
        assert!(!seen(watcher::Event::Init));
        assert!(!seen(watcher::Event::InitApply(pod("a", "billing", "Succeeded"))));
        assert!(!seen(watcher::Event::InitDone), "the same pods and accounts");
        assert!(!seen(watcher::Event::Init));
        assert!(
            seen(watcher::Event::InitDone),
            "a pod missing from the relist was deleted"
        );
        assert!(
            seen(watcher::Event::Apply(pod("a", "billing", "Running"))),
            "and is new again"
        );
    }

    #[test]
    fn a_service_is_built_again_only_when_its_objects_change() {
        let mut o = objects();
        let td: TrustDomain = "mesh.local".parse().unwrap();
        for name in ["a", "b"] {
            o.services.apply_watcher_event(&service(name, "1"));
            o.exports.apply_watcher_event(&export(name, "1"));
            o.slices
                .apply_watcher_event(&slice(name, "1", "10.0.0.1", Some(&format!("{name}-pod"))));
        }
        let build = |o: &mut Objects| o.local.services("east", "us-east", &td).0;
        let first = build(&mut o);
        assert_eq!(first["sim/a"].service.endpoints[0].address, "10.0.0.1:8080");
        assert_eq!(
            first["sim/a"].service.endpoints[0].identity,
            "spiffe://mesh.local/ns/sim/sa/default"
        );
        // Nothing changed: the very same exports.
        let again = build(&mut o);
        assert!(Arc::ptr_eq(&first["sim/a"].service, &again["sim/a"].service));
        assert!(Arc::ptr_eq(&first["sim/b"].service, &again["sim/b"].service));
        // b's EndpointSlice moves an endpoint: b is built again, a is not.
        o.slices
            .apply_watcher_event(&slice("b", "2", "10.0.0.2", Some("b-pod")));
        let moved = build(&mut o);
        assert!(Arc::ptr_eq(&first["sim/a"].service, &moved["sim/a"].service));
        assert_eq!(moved["sim/b"].service.endpoints[0].address, "10.0.0.2:8080");
        // A new resource version with the same content (a status written): built again, and
        // the same `Arc` as before, which the catalog compares by pointer.
        o.exports.apply_watcher_event(&export("a", "2"));
        let restamped = build(&mut o);
        assert!(Arc::ptr_eq(&first["sim/a"].service, &restamped["sim/a"].service));
        // A Pod change (its service account is the endpoint's identity) reaches every service
        // whose endpoints it backs.
        o.pods.apply_watcher_event(&apply(
            json!({"metadata": {"name": "a-pod", "namespace": "sim", "resourceVersion": "1"},
            "spec": {"serviceAccountName": "ledger", "containers": []}}),
        ));
        o.local.pod_changes.fetch_add(1, Ordering::Release);
        let pod = build(&mut o);
        assert_eq!(
            pod["sim/a"].service.endpoints[0].identity,
            "spiffe://mesh.local/ns/sim/sa/ledger"
        );
        assert!(Arc::ptr_eq(&moved["sim/b"].service, &pod["sim/b"].service));
        // An export gone is gone from the map and from what is remembered.
        o.exports.apply_watcher_event(&watcher::Event::Delete(
            serde_json::from_value(json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "b", "namespace": "sim"}, "spec": {}}))
            .unwrap(),
        ));
        let gone = build(&mut o);
        assert!(!gone.contains_key("sim/b"));
        assert_eq!(o.local.built.len(), 1);
    }
}
