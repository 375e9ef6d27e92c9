//! Writes the merged catalog into this cluster as ServiceImports (server-side apply, one field
//! manager), and removes the ones it owns that left the catalog. It writes only what changed
//! since the last successful write, so a restart or a resync does not storm the API server,
//! and it makes again only the imports of services the merge changed, so a change costs the
//! same whatever the size of the catalog.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use super::crd::{
    ClusterStatus, Condition, ServiceExport, ServiceImport, ServiceImportSpec, ServiceImportStatus, ServicePort,
};
use super::{FIELD_MANAGER, MANAGED_BY};
use crate::catalog::MergedService;

pub struct ImportWriter {
    client: Client,
    /// What was last written, by `<ns>/<name>`.
    written: HashMap<String, Written>,
    synced_once: bool,
    /// The ServiceExport conditions last written, by `<ns>/<name>`: as wanted (shared with the
    /// source, which gives the same `Arc` while they stay the same) and as stamped.
    export_status: HashMap<String, (Arc<[Condition]>, Vec<Condition>)>,
}

/// One ServiceImport as last written, and the merged service it was made from: none for one a
/// restart found already written. A service that is still that `Arc` is not made again.
struct Written {
    import: (ServiceImportSpec, ServiceImportStatus),
    from: Option<Arc<MergedService>>,
}

fn desired(svc: &MergedService) -> (ServiceImportSpec, ServiceImportStatus) {
    let spec = ServiceImportSpec {
        type_: "ClusterSetIP".into(),
        ips: vec![svc.clusterset_ip.to_string()],
        ports: svc
            .ports
            .iter()
            .map(|p| ServicePort {
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                protocol: "TCP".into(),
                app_protocol: (p.protocol == "http").then(|| "http".to_string()),
                port: p.port as i32,
            })
            .collect(),
        session_affinity: None,
    };
    let status = ServiceImportStatus {
        clusters: svc
            .clusters
            .iter()
            .map(|c| ClusterStatus { cluster: c.clone() })
            .collect(),
        conditions: svc.conditions.iter().map(Condition::from).collect(),
    };
    (spec, status)
}

impl ImportWriter {
    pub fn new(client: Client) -> Self {
        ImportWriter {
            client,
            written: HashMap::new(),
            synced_once: false,
            export_status: HashMap::new(),
        }
    }

    /// Makes this cluster's ServiceImports match `merged`. Namespaces for which `exists` says
    /// no get no import (MCS namespace sameness), and what was written in one is forgotten (its
    /// imports went with it): call this again when the namespaces change.
    pub async fn sync(
        &mut self,
        merged: &crate::catalog::Merged,
        exists: impl Fn(&str) -> bool,
    ) -> Result<(), kube::Error> {
        self.written
            .retain(|key, _| key.split_once('/').is_some_and(|(ns, _)| exists(ns)));
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if !self.synced_once {
            // After a restart, what is already in the API server counts as written: unchanged
            // imports are not applied again (no resync storm).
            let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
            for import in Api::<ServiceImport>::all(self.client.clone())
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
            {
                if let Some(ns) = import.namespace() {
                    let key = format!("{ns}/{}", import.name_any());
                    let import = (import.spec.clone(), import.status.clone().unwrap_or_default());
                    self.written.insert(key, Written { import, from: None });
                }
            }
        }
        for (key, svc) in merged {
            let before = self.written.get_mut(&**key);
            if before
                .as_ref()
                .is_some_and(|w| w.from.as_ref().is_some_and(|f| Arc::ptr_eq(f, svc)))
                || !exists(&svc.namespace)
            {
                continue;
            }
            let want = desired(svc);
            if let Some(w) = before.filter(|w| w.import == want) {
                w.from = Some(svc.clone());
                continue;
            }
            let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), &svc.namespace);
            let mut object = ServiceImport::new(&svc.name, want.0.clone());
            object.metadata.labels = Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into());
            api.patch(&svc.name, &params, &Patch::Apply(&object)).await?;
            let status = serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceImport",
                "status": want.1,
            });
            api.patch_status(&svc.name, &params, &Patch::Apply(&status)).await?;
            tracing::info!(import = %key, ip = %svc.clusterset_ip, clusters = ?svc.clusters, "ServiceImport written");
            self.written.insert(
                key.to_string(),
                Written {
                    import: want,
                    from: Some(svc.clone()),
                },
            );
        }
        // Remove imports of ours that left the catalog (also ones left from before a restart,
        // which the first sync seeded into `written`).
        let stale: Vec<(String, String)> = self
            .written
            .keys()
            .filter(|k| !merged.contains_key(k.as_str()))
            .filter_map(|k| k.split_once('/').map(|(ns, n)| (ns.to_string(), n.to_string())))
            .collect();
        for (ns, name) in stale {
            let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), &ns);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(import = %format!("{ns}/{name}"), "ServiceImport removed"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
            self.written.remove(&format!("{ns}/{name}"));
        }
        self.synced_once = true;
        Ok(())
    }

    /// Writes the conditions of this cluster's ServiceExports (what changed since the last
    /// write). A condition keeps its lastTransitionTime while its status stays the same.
    pub async fn sync_export_status(&mut self, wanted: &BTreeMap<String, Arc<[Condition]>>) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second);
        let now = now.map(|t| t.to_string()).unwrap_or_default();
        let same = |a: &Condition, b: &Condition| {
            (&a.type_, &a.status, &a.reason, &a.message) == (&b.type_, &b.status, &b.reason, &b.message)
        };
        for (key, conditions) in wanted {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            match self.export_status.get_mut(key) {
                Some((w, _)) if Arc::ptr_eq(w, conditions) => continue,
                Some((w, stamped))
                    if stamped.len() == conditions.len()
                        && stamped.iter().zip(conditions.iter()).all(|(a, c)| same(a, c)) =>
                {
                    *w = conditions.clone();
                    continue;
                }
                _ => {}
            }
            let before = self.export_status.get(key).map(|(_, stamped)| stamped);
            let stamped: Vec<Condition> = conditions
                .iter()
                .map(|c| {
                    let kept = before
                        .and_then(|b| b.iter().find(|p| p.type_ == c.type_ && p.status == c.status))
                        .and_then(|p| p.last_transition_time.clone());
                    Condition {
                        last_transition_time: Some(kept.unwrap_or_else(|| now.clone())),
                        ..c.clone()
                    }
                })
                .collect();
            let status = serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "status": {"conditions": stamped},
            });
            let api: Api<ServiceExport> = Api::namespaced(self.client.clone(), ns);
            match api
                .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&status))
                .await
            {
                Ok(_) => {}
                // Deleted meanwhile: the next round no longer lists it.
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e),
            }
            self.export_status.insert(key.clone(), (conditions.clone(), stamped));
        }
        self.export_status.retain(|k, _| wanted.contains_key(k));
        Ok(())
    }
}
