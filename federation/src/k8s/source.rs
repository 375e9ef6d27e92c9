//! The Kubernetes catalog source: reflectors over this cluster's Services, EndpointSlices and
//! ServiceExports; an exported Service becomes a local service of the merge, with its
//! endpoints' zones and readiness from the EndpointSlices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use strait_api::pb;
use strait_trust::{SpiffeId, TrustDomain};
use tokio::sync::Notify;

use super::crd::{Condition, LocalityPolicy, LocalityPolicyStatus, ServiceExport};
use crate::source::{LocalService, LocalUpdate, SourceError};

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
    /// This cluster's namespaces (a service is imported only where its namespace exists), and
    /// a count of their changes.
    namespaces: Store<Namespace>,
    namespace_changes: Arc<AtomicU64>,
    /// Each ServiceExport's conditions as last made, with what they were made from (the merged
    /// service and the export's problem): the same `Arc` while those are the same.
    conditions: HashMap<String, MadeConditions>,
    /// HTTPRoutes, GRPCRoutes and TrafficPolicies written in this cluster.
    pub objects: super::KubeObjects,
}

/// One ServiceExport's conditions and what they were made from.
struct MadeConditions {
    merged: Option<Arc<crate::catalog::MergedService>>,
    invalid: Option<String>,
    conditions: Arc<[Condition]>,
}

/// The objects this cluster's services are built from (Services, EndpointSlices,
/// ServiceExports and Pods, each a reflector's store), and what changed among them since the
/// catalog was last built.
struct LocalObjects {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    exports: Store<ServiceExport>,
    pods: Store<Pod>,
    /// Kept by the watches' event handlers (see [`Touched`]).
    touched: Arc<Mutex<Touched>>,
    /// The problems of the exports that cannot be built, by `<ns>/<name>`.
    errors: BTreeMap<String, SourceError>,
}

/// What changed among the watched objects since the catalog was last built, kept by the
/// reflectors' event handlers (each runs after its store applied the event): the services to
/// build again, and which EndpointSlices each service has, so that a change costs the services
/// it touched, not a walk over every export and slice of the cluster.
struct Touched {
    /// Build every service again: at the start, and after a watch listed everything again
    /// (what was deleted meanwhile is gone without an event).
    all: bool,
    /// `<ns>/<name>` of the services whose Service, ServiceExport or EndpointSlices changed.
    services: BTreeSet<String>,
    /// Pods (namespace, name) that came, went or changed service account: the services whose
    /// endpoints they back are found when the catalog is built.
    pods: BTreeSet<(String, String)>,
    /// Each EndpointSlice's service (`kubernetes.io/service-name`), and each service's slices by
    /// name; made again from the store when everything is built.
    slice_owner: HashMap<(String, String), String>,
    slices_of: HashMap<String, BTreeSet<String>>,
    /// Which Pod events count (see [`PodAccounts`]).
    accounts: PodAccounts,
}

impl Default for Touched {
    fn default() -> Self {
        Touched {
            all: true,
            services: BTreeSet::new(),
            pods: BTreeSet::new(),
            slice_owner: HashMap::new(),
            slices_of: HashMap::new(),
            accounts: PodAccounts::default(),
        }
    }
}

fn key_of(meta: &kube::api::ObjectMeta) -> Option<String> {
    Some(format!("{}/{}", meta.namespace.as_deref()?, meta.name.as_deref()?))
}

impl Touched {
    /// A watch's event handler: `note` on the shared state; returns whether the event counts.
    fn handler<K: 'static>(
        touched: &Arc<Mutex<Self>>,
        note: fn(&mut Self, &watcher::Event<K>) -> bool,
    ) -> impl FnMut(&watcher::Event<K>) -> bool + Send + 'static {
        let touched = touched.clone();
        move |event| {
            note(
                &mut touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                event,
            )
        }
    }

    /// A Service's or ServiceExport's event: the service of that name.
    fn named<K: kube::Resource>(&mut self, event: &watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                self.services.extend(key_of(o.meta()));
                true
            }
            _ => self.relist(event),
        }
    }

    /// An EndpointSlice's event: the service it belongs to, and the one it left if its label
    /// changed.
    fn slice(&mut self, event: &watcher::Event<EndpointSlice>) -> bool {
        match event {
            watcher::Event::Apply(s) => self.set_owner(s, Self::owner(s)),
            watcher::Event::Delete(s) => self.set_owner(s, None),
            _ => return self.relist(event),
        }
        true
    }

    /// A Pod's event, when it changed what the catalog reads of the pod ([`PodAccounts`]).
    fn pod(&mut self, event: &watcher::Event<Pod>) -> bool {
        if !self.accounts.observe(event) {
            return false;
        }
        match event {
            watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                self.pods.insert(PodAccounts::key(p));
            }
            _ => self.all = true,
        }
        true
    }

    /// A relist's events: the end of one (the store replaced whole) touches everything.
    fn relist<K>(&mut self, event: &watcher::Event<K>) -> bool {
        let done = matches!(event, watcher::Event::InitDone);
        self.all |= done;
        done
    }

    fn owner(slice: &EndpointSlice) -> Option<String> {
        let service = slice.metadata.labels.as_ref()?.get("kubernetes.io/service-name")?;
        Some(format!("{}/{service}", slice.metadata.namespace.as_deref()?))
    }

    fn set_owner(&mut self, slice: &EndpointSlice, owner: Option<String>) {
        let (Some(ns), Some(name)) = (slice.metadata.namespace.clone(), slice.metadata.name.clone()) else {
            return;
        };
        let before = match &owner {
            Some(o) => self.slice_owner.insert((ns, name.clone()), o.clone()),
            None => self.slice_owner.remove(&(ns, name.clone())),
        };
        if let Some(b) = before {
            if let Some(names) = self.slices_of.get_mut(&b) {
                names.remove(&name);
                if names.is_empty() {
                    self.slices_of.remove(&b);
                }
            }
            self.services.insert(b);
        }
        if let Some(o) = owner {
            self.slices_of.entry(o.clone()).or_default().insert(name);
            self.services.insert(o);
        }
    }

    /// Makes the slice index again from every slice in the store.
    fn index(&mut self, slices: &Store<EndpointSlice>) {
        self.slice_owner.clear();
        self.slices_of.clear();
        for slice in slices.state() {
            let owner = Self::owner(&slice);
            self.set_owner(&slice, owner);
        }
        self.services.clear();
    }
}

/// Whether an endpoint of `slice` is one of `pods` (namespace, name).
fn names_a_pod(slice: &EndpointSlice, pods: &BTreeSet<(String, String)>) -> bool {
    slice.endpoints.iter().filter_map(|ep| ep.target_ref.as_ref()).any(|t| {
        let ns = t.namespace.as_deref().or(slice.metadata.namespace.as_deref());
        t.kind.as_deref() == Some("Pod")
            && pods
                .iter()
                .any(|(pod_ns, pod)| t.name.as_deref() == Some(pod.as_str()) && ns == Some(pod_ns.as_str()))
    })
}

impl LocalObjects {
    fn new(
        services: Store<Service>,
        slices: Store<EndpointSlice>,
        exports: Store<ServiceExport>,
        pods: Store<Pod>,
        touched: Arc<Mutex<Touched>>,
    ) -> Self {
        LocalObjects {
            services,
            slices,
            exports,
            pods,
            touched,
            errors: BTreeMap::new(),
        }
    }

    /// The exported services that changed since the last call (every one at the first, and
    /// after a watch listed everything again), and the problems of those that cannot be.
    fn services(&mut self, cluster: &str, region: &str, td: &TrustDomain) -> (LocalUpdate, Vec<SourceError>) {
        let (all, wanted) = {
            let mut touched = self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let all = std::mem::take(&mut touched.all);
            let pods = std::mem::take(&mut touched.pods);
            let keys: BTreeSet<String> = if all {
                touched.index(&self.slices);
                self.exports
                    .state()
                    .iter()
                    .filter_map(|e| key_of(&e.metadata))
                    .collect()
            } else {
                let mut keys = std::mem::take(&mut touched.services);
                // The services whose endpoints a changed Pod backs (rare: a pod's first and
                // last events, or a new service account).
                if !pods.is_empty() {
                    for slice in self.slices.state().iter().filter(|s| names_a_pod(s, &pods)) {
                        keys.extend(Touched::owner(slice));
                    }
                }
                keys
            };
            let wanted: Vec<(String, Vec<String>)> = keys
                .into_iter()
                .map(|k| {
                    let slices = touched
                        .slices_of
                        .get(&k)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default();
                    (k, slices)
                })
                .collect();
            (all, wanted)
        };
        if all {
            self.errors.clear();
        }
        let mut out = BTreeMap::new();
        for (key, slices) in wanted {
            self.errors.remove(&key);
            let built = match self.build(&key, &slices, cluster, region, td) {
                Ok(b) => b,
                Err(message) => {
                    self.errors.insert(
                        key.clone(),
                        SourceError {
                            file: format!("serviceexport/{key}").into(),
                            message,
                        },
                    );
                    None
                }
            };
            out.insert(key, built);
        }
        let update = if all {
            LocalUpdate::All(out.into_iter().filter_map(|(k, s)| Some((k, s?))).collect())
        } else {
            LocalUpdate::Changed(out)
        };
        (update, self.errors.values().cloned().collect())
    }

    /// Service `key` from its ServiceExport, its Service and its EndpointSlices (named, in name
    /// order): `None` when it is not exported, an error when it cannot be.
    fn build(
        &self,
        key: &str,
        slice_names: &[String],
        cluster: &str,
        region: &str,
        td: &TrustDomain,
    ) -> Result<Option<LocalService>, String> {
        let Some((ns, name)) = key.split_once('/') else {
            return Ok(None);
        };
        let Some(export) = self.exports.get(&ObjectRef::new(name).within(ns)) else {
            return Ok(None);
        };
        let Some(svc) = self.services.get(&ObjectRef::new(name).within(ns)) else {
            return Err(format!(
                "no Service {key} exists to export; create it or delete the ServiceExport"
            ));
        };
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return Err(format!(
                "Service {key} is of type ExternalName, which the MCS API does not export; \
                 export a ClusterIP or headless Service"
            ));
        }
        let own_slices: Vec<Arc<EndpointSlice>> = slice_names
            .iter()
            .filter_map(|n| self.slices.get(&ObjectRef::new(n).within(ns)))
            .collect();
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
                    let pod_ns = t.namespace.as_deref().unwrap_or(ns);
                    self.pods.get(&ObjectRef::new(t.name.as_deref()?).within(pod_ns))
                })
                .and_then(|p| p.spec.as_ref()?.service_account_name.clone());
            let sa = pod_sa.unwrap_or_else(|| service_sa.clone());
            SpiffeId::workload(td, ns, &sa)
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
        let local = LocalService {
            service: std::sync::Arc::new(pb::ExportedService {
                name: name.to_string(),
                namespace: ns.to_string(),
                ports,
                endpoints,
                exported_at_unix_ms: exported_at,
                identities,
            }),
            exported: true,
        };
        Ok(Some(local))
    }
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
/// bumps `counter` (if any) and then wakes `changed`, so a loop woken by it and reading the
/// counter after sees the store as changed.
fn spawn_reflector<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    counter: Option<&Arc<AtomicU64>>,
    mut counts: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
    what: &'static str,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let counter = counter.cloned();
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
                        if let Some(c) = &counter {
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
        let touched = Arc::new(Mutex::new(Touched::default()));
        let namespace_changes = Arc::new(AtomicU64::new(0));
        let source = KubeSource {
            client: client.clone(),
            policies: spawn_reflector(
                Api::<LocalityPolicy>::all(client.clone()),
                changed.clone(),
                None,
                |_| true,
                "LocalityPolicy",
            ),
            local: LocalObjects::new(
                spawn_reflector(
                    Api::<Service>::all(client.clone()),
                    changed.clone(),
                    Some(&changes),
                    Touched::handler(&touched, Touched::named),
                    "Service",
                ),
                spawn_reflector(
                    Api::<EndpointSlice>::all(client.clone()),
                    changed.clone(),
                    Some(&changes),
                    Touched::handler(&touched, Touched::slice),
                    "EndpointSlice",
                ),
                spawn_reflector(
                    Api::<ServiceExport>::all(client.clone()),
                    changed.clone(),
                    Some(&changes),
                    Touched::handler(&touched, Touched::named),
                    "ServiceExport",
                ),
                spawn_reflector(
                    Api::<Pod>::all(client.clone()),
                    changed.clone(),
                    Some(&changes),
                    Touched::handler(&touched, Touched::pod),
                    "Pod",
                ),
                touched,
            ),
            namespaces: spawn_reflector(
                Api::<Namespace>::all(client.clone()),
                changed.clone(),
                Some(&namespace_changes),
                |_| true,
                "Namespace",
            ),
            namespace_changes,
            conditions: HashMap::new(),
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
            let _ = source.namespaces.wait_until_ready().await;
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

    /// How many changes to this cluster's namespaces have reached their cache.
    pub fn namespace_changes(&self) -> u64 {
        self.namespace_changes.load(Ordering::Acquire)
    }

    /// Whether namespace `name` exists in this cluster.
    pub fn namespace_exists(&self, name: &str) -> bool {
        self.namespaces.get(&ObjectRef::new(name)).is_some()
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
    /// merge decides, so every exporting cluster reports the same conflict). An export whose
    /// merged service (by pointer) and problem are what they were gets the same `Arc` as then.
    pub fn export_conditions(
        &mut self,
        merged: &crate::catalog::Merged,
        errors: &[SourceError],
    ) -> BTreeMap<String, Arc<[Condition]>> {
        let mut out = BTreeMap::new();
        let last = std::mem::take(&mut self.conditions);
        for export in self.local.exports.state() {
            let (Some(name), Some(ns)) = (export.metadata.name.as_deref(), export.metadata.namespace.as_deref()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let invalid = errors
                .iter()
                .find(|e| e.file.to_str().and_then(|f| f.strip_prefix("serviceexport/")) == Some(key.as_str()))
                .map(|e| e.message.clone());
            let service = merged.get(key.as_str());
            let made = match last.get(&key) {
                Some(m)
                    if m.invalid == invalid
                        && match (&m.merged, service) {
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            (None, None) => true,
                            _ => false,
                        } =>
                {
                    m.conditions.clone()
                }
                _ => {
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
                        message: invalid.clone(),
                        last_transition_time: None,
                    }];
                    if let Some(c) = service.and_then(|m| m.conditions.iter().find(|c| c.r#type == "Conflict")) {
                        conditions.push(c.into());
                    }
                    conditions.into()
                }
            };
            self.conditions.insert(
                key.clone(),
                MadeConditions {
                    merged: service.cloned(),
                    invalid,
                    conditions: made.clone(),
                },
            );
            out.insert(key, made);
        }
        out
    }

    /// This cluster's exported services that changed since the last call (every one at the
    /// first), and the problems of every export that cannot be.
    pub fn services(
        &mut self,
        cluster: &str,
        region: &str,
        td: &TrustDomain,
        _now: SystemTime,
    ) -> (LocalUpdate, Vec<SourceError>) {
        self.local.services(cluster, region, td)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::LocalCatalog;
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
            local: LocalObjects::new(
                services,
                slices,
                exports,
                pods,
                Arc::new(Mutex::new(Touched::default())),
            ),
        }
    }

    impl Objects {
        /// Each event as a reflector passes it on: applied to its store, then to the handler.
        fn service(&mut self, e: watcher::Event<Service>) {
            self.services.apply_watcher_event(&e);
            self.local.touched.lock().unwrap().named(&e);
        }
        fn export(&mut self, e: watcher::Event<ServiceExport>) {
            self.exports.apply_watcher_event(&e);
            self.local.touched.lock().unwrap().named(&e);
        }
        fn slice(&mut self, e: watcher::Event<EndpointSlice>) {
            self.slices.apply_watcher_event(&e);
            self.local.touched.lock().unwrap().slice(&e);
        }
        fn pod(&mut self, e: watcher::Event<Pod>) {
            self.pods.apply_watcher_event(&e);
            self.local.touched.lock().unwrap().pod(&e);
        }
        /// What the source returns, applied to `catalog`: the keys it built and what changed.
        fn build(&mut self, catalog: &mut LocalCatalog) -> (Vec<String>, crate::catalog::Touched, Vec<SourceError>) {
            let td: TrustDomain = "mesh.local".parse().unwrap();
            let (update, errors) = self.local.services("east", "us-east", &td);
            let built = match &update {
                LocalUpdate::All(m) => m.keys().cloned().collect(),
                LocalUpdate::Changed(m) => m.keys().cloned().collect(),
            };
            (built, catalog.apply(update), errors)
        }
    }

    fn keys(keys: &[&str]) -> crate::catalog::Touched {
        crate::catalog::Touched::Keys(keys.iter().map(|k| Arc::from(*k)).collect())
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
        slice_of(name, name, rv, address, pod)
    }

    /// Slice `<name>-1`, of service `service`.
    fn slice_of(
        name: &str,
        service: &str,
        rv: &str,
        address: &str,
        pod: Option<&str>,
    ) -> watcher::Event<EndpointSlice> {
        let target = pod.map(|p| json!({"kind": "Pod", "name": p, "namespace": "sim"}));
        apply(
            json!({"metadata": {"name": format!("{name}-1"), "namespace": "sim", "resourceVersion": rv,
                "labels": {"kubernetes.io/service-name": service}},
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
    fn only_the_services_an_event_touches_are_built_again() {
        let mut o = objects();
        let mut catalog = LocalCatalog::default();
        for name in ["a", "b"] {
            o.service(service(name, "1"));
            o.export(export(name, "1"));
            o.slice(slice(name, "1", "10.0.0.1", Some(&format!("{name}-pod"))));
        }
        let (built, changed, _) = o.build(&mut catalog);
        assert_eq!(built, ["sim/a", "sim/b"], "everything at the first call");
        assert_eq!(changed, keys(&["sim/a", "sim/b"]));
        let first = catalog.clone();
        assert_eq!(first.all["sim/a"].endpoints[0].address, "10.0.0.1:8080");
        assert_eq!(
            first.all["sim/a"].endpoints[0].identity,
            "spiffe://mesh.local/ns/sim/sa/default"
        );
        assert!(Arc::ptr_eq(&first.all["sim/a"], &first.exported["sim/a"]));
        // Nothing changed: nothing built, the very same catalog.
        let (built, changed, _) = o.build(&mut catalog);
        assert!(built.is_empty());
        assert_eq!(changed, keys(&[]));
        assert!(Arc::ptr_eq(&first.all, &catalog.all) && Arc::ptr_eq(&first.exported, &catalog.exported));
        // b's EndpointSlice moves an endpoint: b alone is built again.
        o.slice(slice("b", "2", "10.0.0.2", Some("b-pod")));
        let (built, changed, _) = o.build(&mut catalog);
        assert_eq!((built, changed), (vec!["sim/b".to_string()], keys(&["sim/b"])));
        assert!(Arc::ptr_eq(&first.all["sim/a"], &catalog.all["sim/a"]));
        assert_eq!(catalog.all["sim/b"].endpoints[0].address, "10.0.0.2:8080");
        assert_eq!(catalog.exported["sim/b"].endpoints[0].address, "10.0.0.2:8080");
        // A new resource version with the same content (its status written): built again, and
        // it is the same `Arc` as before, which everything after compares by pointer.
        o.export(export("a", "2"));
        let (built, changed, _) = o.build(&mut catalog);
        assert_eq!((built, changed), (vec!["sim/a".to_string()], keys(&[])));
        assert!(Arc::ptr_eq(&first.all["sim/a"], &catalog.all["sim/a"]));
        // A Pod's service account is its endpoints' identity: the service it backs is built
        // again; its status changing alone builds nothing.
        o.pod(apply(json!({"metadata": {"name": "a-pod", "namespace": "sim"},
            "spec": {"serviceAccountName": "ledger", "containers": []}})));
        let (built, _, _) = o.build(&mut catalog);
        assert_eq!(built, ["sim/a"]);
        assert_eq!(
            catalog.all["sim/a"].endpoints[0].identity,
            "spiffe://mesh.local/ns/sim/sa/ledger"
        );
        o.pod(watcher::Event::Apply(pod("a-pod", "ledger", "Running")));
        assert!(o.build(&mut catalog).0.is_empty());
        // A slice that moves to another service (its label): both are built again.
        o.slice(slice_of("a", "b", "3", "10.0.0.3", None));
        let (built, changed, _) = o.build(&mut catalog);
        assert_eq!(
            (built, changed),
            (
                vec!["sim/a".to_string(), "sim/b".to_string()],
                keys(&["sim/a", "sim/b"])
            )
        );
        assert!(catalog.all["sim/a"].endpoints.is_empty());
        assert_eq!(catalog.all["sim/b"].endpoints.len(), 2);
        // A Service gone while its export stays: reported, and out of the catalog.
        o.service(watcher::Event::Delete(
            serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "sim"}})).unwrap(),
        ));
        let (_, changed, errors) = o.build(&mut catalog);
        assert_eq!(changed, keys(&["sim/a"]));
        assert!(!catalog.all.contains_key("sim/a"));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("no Service sim/a exists"), "{errors:?}");
        // An export gone: out of the catalog and of what peers get.
        o.export(watcher::Event::Delete(
            serde_json::from_value(json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "b", "namespace": "sim"}, "spec": {}}))
            .unwrap(),
        ));
        let (_, changed, errors) = o.build(&mut catalog);
        assert_eq!(changed, keys(&["sim/b"]));
        assert!(!catalog.all.contains_key("sim/b") && !catalog.exported.contains_key("sim/b"));
        assert_eq!(errors.len(), 1, "a's problem is still reported");
        // A watch that listed everything again: everything built again, from the store alone.
        o.service(service("a", "5"));
        o.local
            .touched
            .lock()
            .unwrap()
            .named(&watcher::Event::<Service>::InitDone);
        let (built, changed, errors) = o.build(&mut catalog);
        assert_eq!((built, changed), (vec!["sim/a".to_string()], keys(&["sim/a"])));
        assert!(errors.is_empty());
        assert_eq!(
            catalog.all["sim/a"].endpoints.len(),
            0,
            "a has no slice since its slice moved to b"
        );
    }
}
