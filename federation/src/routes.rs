//! HTTPRoutes written to this controller: YAML files in its routes directory, each holding one
//! or more `HTTPRoute` objects (`gateway.networking.k8s.io/v1`). Every object is checked on
//! its own against the merged catalog: a bad one is reported with its field and fix (and keeps
//! serving its last good version, if it had one) while every other route serves. What passes
//! goes to this cluster's proxies as `route/<namespace>/<name>` resources.
//!
//! Not yet: distribution to peer clusters, `strait apply`, Kubernetes CRDs (issue "Traffic
//! policy as data").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use strait_api::pb;
use strait_api::routes::compile::{compile_route, BackendLookup, RouteError, Target};
use strait_api::routes::HttpRouteSpec;

use crate::catalog::MergedService;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Object {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)] // status written by other tools is ignored
    status: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
}

fn default_ns() -> String {
    "default".into()
}

/// One route's state: the spec as last read, its last good version, and its conditions.
#[derive(Clone, Debug)]
pub struct RouteState {
    pub namespace: String,
    pub name: String,
    pub file: PathBuf,
    pub created_unix_ms: i64,
    pub spec: Option<HttpRouteSpec>,
    pub good: Option<HttpRouteSpec>,
    pub errors: Vec<String>,
    /// (condition type, status, reason, message), Gateway API style.
    pub conditions: Vec<(String, bool, String, String)>,
}

#[derive(Default)]
pub struct RouteStore {
    dir: Option<PathBuf>,
    fingerprint: BTreeMap<PathBuf, crate::source::Fingerprint>,
    /// Problems of whole files (unreadable, not YAML, not an HTTPRoute).
    pub file_errors: BTreeMap<PathBuf, String>,
    /// By `<namespace>/<name>`.
    pub routes: BTreeMap<String, RouteState>,
}

impl RouteStore {
    pub fn new(dir: Option<&Path>) -> Self {
        RouteStore {
            dir: dir.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    /// Re-reads changed files; returns whether anything changed.
    pub fn poll(&mut self) -> bool {
        let Some(dir) = self.dir.clone() else { return false };
        let Ok(files) = crate::source::yaml_files(&dir) else {
            return false;
        };
        let mut present = vec![];
        let mut changed = false;
        for (path, fp) in files {
            present.push(path.clone());
            if self.fingerprint.get(&path) == Some(&fp) {
                continue;
            }
            self.fingerprint.insert(path.clone(), fp);
            changed = true;
            self.read(&path);
        }
        let gone: Vec<PathBuf> = self
            .fingerprint
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.fingerprint.remove(&path);
            self.file_errors.remove(&path);
            self.routes.retain(|_, r| r.file != path);
            changed = true;
        }
        changed
    }

    fn read(&mut self, path: &Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.file_errors.insert(path.to_path_buf(), format!("cannot read: {e}"));
                return;
            }
        };
        self.file_errors.remove(path);
        let mut seen = vec![];
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    self.file_errors
                        .insert(path.to_path_buf(), format!("document {i}: not YAML: {e}"));
                    return;
                }
            };
            let object: Object = match serde_path_to_error::deserialize(value) {
                Ok(o) => o,
                Err(e) => {
                    self.file_errors.insert(
                        path.to_path_buf(),
                        format!("document {i}: field `{}`: {}", e.path(), e.inner()),
                    );
                    continue;
                }
            };
            if object.kind != "HTTPRoute" || !object.api_version.starts_with("gateway.networking.k8s.io/") {
                self.file_errors.insert(
                    path.to_path_buf(),
                    format!(
                        "document {i}: {} {} is not an HTTPRoute (gateway.networking.k8s.io/v1)",
                        object.api_version, object.kind
                    ),
                );
                continue;
            }
            let key = format!("{}/{}", object.metadata.namespace, object.metadata.name);
            seen.push(key.clone());
            let spec: Result<HttpRouteSpec, String> = serde_path_to_error::deserialize(object.spec)
                .map_err(|e| format!("field `spec.{}`: {}", e.path(), e.inner()));
            let state = self.routes.entry(key).or_insert_with(|| RouteState {
                namespace: object.metadata.namespace.clone(),
                name: object.metadata.name.clone(),
                file: path.to_path_buf(),
                created_unix_ms: strait_api::unix_ms(SystemTime::now()),
                spec: None,
                good: None,
                errors: vec![],
                conditions: vec![],
            });
            state.file = path.to_path_buf();
            match spec {
                Ok(spec) => {
                    state.spec = Some(spec);
                    state.errors.clear();
                }
                Err(e) => {
                    // A schema error: refused as written; the last good version keeps serving.
                    state.spec = None;
                    state.errors = vec![e];
                }
            }
        }
        // Objects no longer in the file are gone.
        self.routes.retain(|k, r| r.file != path || seen.contains(k));
    }

    /// Checks every route against the catalog, updates conditions, and returns what proxies get.
    pub fn resources(&mut self, merged: &BTreeMap<String, MergedService>, cluster: &str) -> Vec<pb::HttpRoute> {
        let lookup = |t: &Target| match merged.get(&format!("{}/{}", t.namespace, t.name)) {
            None => BackendLookup::NoSuchService,
            Some(svc) => match t.port.map(|p| svc.ports.iter().find(|sp| sp.port == p as u32)) {
                Some(None) => BackendLookup::NoSuchPort,
                Some(Some(p)) if p.protocol.eq_ignore_ascii_case("tcp") => BackendLookup::NotHttp,
                _ => BackendLookup::Found,
            },
        };
        let mut out = vec![];
        for r in self.routes.values_mut() {
            let mut conditions = vec![];
            if let Some(spec) = &r.spec {
                let (compiled, errors) = compile_route(&r.namespace, &r.name, spec, &lookup);
                r.errors = errors.iter().map(RouteError::to_string).collect();
                if compiled.is_some() {
                    r.good = Some(spec.clone());
                }
                conditions = status(&errors);
            } else {
                conditions.push(("Accepted".into(), false, "UnsupportedValue".into(), r.errors.join("; ")));
            }
            if r.good.is_some() && conditions.iter().any(|c| c.0 == "Accepted" && !c.1) {
                if let Some(c) = conditions.iter_mut().find(|c| c.0 == "Accepted") {
                    c.3 = format!("{} (the last good version keeps serving)", c.3);
                }
            }
            r.conditions = conditions;
            if let Some(good) = &r.good {
                out.push(pb::HttpRoute {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    spec_json: serde_json::to_string(good).unwrap_or_default(),
                    created_unix_ms: r.created_unix_ms,
                    cluster: cluster.to_string(),
                });
            }
        }
        out
    }
}

/// Gateway API conditions from a route's errors.
fn status(errors: &[RouteError]) -> Vec<(String, bool, String, String)> {
    let mut out = vec![];
    for kind in ["Accepted", "ResolvedRefs"] {
        let mine: Vec<&RouteError> = errors.iter().filter(|e| e.condition().0 == kind).collect();
        out.push(match mine.first() {
            None => (kind.to_string(), true, kind.to_string(), String::new()),
            Some(first) => (
                kind.to_string(),
                false,
                first.condition().1.to_string(),
                mine.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
            ),
        });
    }
    out
}
