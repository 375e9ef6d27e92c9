//! Routes and policies as data, for the whole clusterset.
//!
//! - **Authored here**: YAML files in this controller's policy directory (written by
//!   `strait apply` through [`crate::policy_api`], or by hand), each holding `HTTPRoute`
//!   (`gateway.networking.k8s.io/v1`) and `TrafficPolicy` (`policy.strait.dev/v1alpha1`)
//!   objects. A schema error refuses that one object (its last good version keeps serving).
//! - **Clusterset by default**: every object travels to every peer with the peering stream;
//!   one labelled `strait.dev/scope: cluster` stays here and overrides a clusterset object of
//!   the same kind, namespace and name in this cluster, except the fields that object locks
//!   (`strait.dev/locked-fields`). Two clusters writing one clusterset object: the oldest wins
//!   and a `Conflict` condition says so everywhere.
//! - **Checked here**: every cluster checks every object it enforces against its own merged
//!   catalog (a missing backend, a bad regex) and reports Gateway API conditions; the reports
//!   of every cluster travel back with peering, so any cluster shows where an object applies.
//!
//! The merge, the override and the checks are plain functions over plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use strait_api::authz::{compile_authz, AuthorizationPolicySpec, Scope};
use strait_api::pb;
use strait_api::routes::compile::{compile_route, BackendLookup, RouteError, Target};
use strait_api::routes::{grpc, GrpcRouteSpec, HttpRouteSpec};
use strait_api::traffic::{compile_policy, TargetLookup, TrafficPolicySpec};

pub const HTTP_ROUTE: &str = "HTTPRoute";
pub const GRPC_ROUTE: &str = "GRPCRoute";
pub const TRAFFIC_POLICY: &str = "TrafficPolicy";
pub const AUTHORIZATION_POLICY: &str = "AuthorizationPolicy";
pub const SCOPE_LABEL: &str = "strait.dev/scope";
pub const LOCKED_ANNOTATION: &str = "strait.dev/locked-fields";
const CREATED_ANNOTATION: &str = "strait.dev/created-unix-ms";

/// `Kind/namespace/name`.
pub fn key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

fn object_key(o: &pb::PolicyObject) -> String {
    key(&o.kind, &o.namespace, &o.name)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)] // status written by other tools is ignored
    status: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    generation: Option<u64>,
}

fn default_ns() -> String {
    "default".into()
}

/// One object of a YAML file, its schema checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub spec: serde_json::Value,
    pub cluster_scope: bool,
    pub locked: Vec<String>,
    pub generation: Option<u64>,
    pub created_unix_ms: Option<i64>,
}

impl Parsed {
    pub fn key(&self) -> String {
        key(&self.kind, &self.namespace, &self.name)
    }

    /// The document as `strait apply` stores it: the author's fields plus the bookkeeping
    /// (creation time and generation) that must survive a restart.
    pub fn to_stored_yaml(&self, generation: u64, created_unix_ms: i64) -> String {
        let api_version = if self.kind == TRAFFIC_POLICY || self.kind == AUTHORIZATION_POLICY {
            "policy.strait.dev/v1alpha1"
        } else {
            "gateway.networking.k8s.io/v1"
        };
        let mut labels = serde_json::Map::new();
        if self.cluster_scope {
            labels.insert(SCOPE_LABEL.into(), "cluster".into());
        }
        let mut annotations = serde_json::Map::new();
        annotations.insert(CREATED_ANNOTATION.into(), created_unix_ms.to_string().into());
        if !self.locked.is_empty() {
            annotations.insert(LOCKED_ANNOTATION.into(), self.locked.join(",").into());
        }
        let doc = serde_json::json!({
            "apiVersion": api_version,
            "kind": self.kind,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "generation": generation,
                "labels": labels,
                "annotations": annotations,
            },
            "spec": self.spec,
        });
        serde_yaml::to_string(&doc).unwrap_or_default()
    }
}

/// Checks a spec against its kind's schema, naming the first bad field.
pub fn check_schema(kind: &str, spec: &serde_json::Value) -> Result<(), String> {
    let named = |path: String, e: String| format!("field `spec.{path}`: {e}");
    match kind {
        HTTP_ROUTE => serde_path_to_error::deserialize::<_, HttpRouteSpec>(spec.clone())
            .map(|_| ())
            .map_err(|e| named(e.path().to_string(), e.inner().to_string())),
        TRAFFIC_POLICY => serde_path_to_error::deserialize::<_, TrafficPolicySpec>(spec.clone())
            .map(|_| ())
            .map_err(|e| named(e.path().to_string(), e.inner().to_string())),
        AUTHORIZATION_POLICY => serde_path_to_error::deserialize::<_, AuthorizationPolicySpec>(spec.clone())
            .map(|_| ())
            .map_err(|e| named(e.path().to_string(), e.inner().to_string())),
        GRPC_ROUTE => serde_path_to_error::deserialize::<_, GrpcRouteSpec>(spec.clone())
            .map_err(|e| named(e.path().to_string(), e.inner().to_string()))
            .and_then(|g| grpc::to_http(&g).map(|_| ())),
        other => Err(format!("kind {other} is not supported here")),
    }
}

/// Parses every document of a YAML text. Each entry is one object, or the error that refuses
/// it (with the document's index and the field).
pub fn parse_documents(text: &str) -> Vec<Result<Parsed, String>> {
    let mut out = vec![];
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(Err(format!("document {i}: not YAML: {e}")));
                break;
            }
        };
        let doc: Document = match serde_path_to_error::deserialize(value) {
            Ok(d) => d,
            Err(e) => {
                out.push(Err(format!("document {i}: field `{}`: {}", e.path(), e.inner())));
                continue;
            }
        };
        out.push(from_document(doc, &format!("document {i} ")));
    }
    out
}

/// Checks one object (apiVersion, kind, metadata, spec); errors start with `prefix`.
fn from_document(doc: Document, prefix: &str) -> Result<Parsed, String> {
    let supported = match doc.kind.as_str() {
        HTTP_ROUTE | GRPC_ROUTE => doc.api_version.starts_with("gateway.networking.k8s.io/"),
        TRAFFIC_POLICY | AUTHORIZATION_POLICY => doc.api_version == "policy.strait.dev/v1alpha1",
        _ => false,
    };
    if !supported {
        return Err(format!(
            "{prefix}{} {} is not supported; use HTTPRoute or GRPCRoute (gateway.networking.k8s.io/v1), TrafficPolicy or AuthorizationPolicy (policy.strait.dev/v1alpha1)",
            doc.api_version, doc.kind
        ));
    }
    let m = doc.metadata;
    let what = format!("{prefix}({} {}/{})", doc.kind, m.namespace, m.name);
    if m.name.is_empty() {
        return Err(format!("{what}: field `metadata.name` is required"));
    }
    let cluster_scope = match m.labels.get(SCOPE_LABEL).map(String::as_str) {
        None | Some("clusterset") => false,
        Some("cluster") => true,
        Some(other) => {
            return Err(format!(
                "{what}: label `metadata.labels.{SCOPE_LABEL}`: {other:?} is not a scope; use cluster (this cluster only) or leave it out (the whole clusterset)"
            ));
        }
    };
    let locked: Vec<String> = m
        .annotations
        .get(LOCKED_ANNOTATION)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if let Some(bad) = locked.iter().find(|p| !p.starts_with("spec.") || p.len() < 6) {
        return Err(format!(
            "{what}: annotation `metadata.annotations.{LOCKED_ANNOTATION}`: {bad:?} is not a field path; list paths like spec.retry,spec.rules separated by commas"
        ));
    }
    if let Err(e) = check_schema(&doc.kind, &doc.spec) {
        return Err(format!("{what}: {e}"));
    }
    Ok(Parsed {
        kind: doc.kind,
        namespace: m.namespace,
        name: m.name,
        spec: doc.spec,
        cluster_scope,
        locked,
        generation: m.generation,
        created_unix_ms: m.annotations.get(CREATED_ANNOTATION).and_then(|v| v.parse().ok()),
    })
}

/// An object read from the Kubernetes API (its `spec` as the API server stored it).
#[allow(clippy::too_many_arguments)]
pub fn parse_kube(
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    generation: Option<i64>,
    spec: serde_json::Value,
) -> Result<Parsed, String> {
    let doc = Document {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        metadata: Metadata {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels,
            annotations,
            generation: generation.map(|g| g.max(0) as u64),
        },
        spec,
        status: None,
    };
    from_document(doc, "")
}

/// One object written in this cluster.
#[derive(Clone, Debug)]
pub struct Authored {
    pub file: PathBuf,
    pub object: pb::PolicyObject,
    /// The schema error of the version in the file (the last good version keeps serving).
    pub error: Option<String>,
    /// Whether `object` holds a version that passed the schema.
    pub good: bool,
}

/// The objects written in this cluster: the YAML files of its policy directory.
#[derive(Default)]
pub struct ObjectStore {
    dir: Option<PathBuf>,
    cluster: String,
    fingerprint: BTreeMap<PathBuf, crate::source::Fingerprint>,
    /// Problems of whole files or of documents that name no object.
    pub file_errors: BTreeMap<PathBuf, Vec<String>>,
    /// By `Kind/namespace/name`.
    pub objects: BTreeMap<String, Authored>,
    /// A watch of the directory, when the kernel gives one: a poll lists the directory only
    /// when it saw a file change, and every [`crate::source::SAFETY_SCAN`] regardless.
    watch: Option<crate::source::DirWatch>,
    /// When the directory was last listed.
    listed: Option<std::time::Instant>,
}

impl ObjectStore {
    pub fn new(dir: Option<&Path>, cluster: &str) -> Self {
        ObjectStore {
            dir: dir.map(Path::to_path_buf),
            cluster: cluster.to_string(),
            watch: dir.and_then(|d| crate::source::DirWatch::new(d, "policy")),
            ..Default::default()
        }
    }

    /// The directory's watch, when a loop may wait on it instead of polling.
    pub fn waker(&self) -> Option<&crate::source::DirWatch> {
        self.watch.as_ref().filter(|w| w.wakes())
    }

    /// Whether the directory must be polled to see changes (it has no watch to wait on).
    pub fn polled(&self) -> bool {
        self.dir.is_some() && self.waker().is_none()
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Re-reads changed files; returns whether anything changed. With a watch, the directory
    /// is listed only when the watch saw a file change (or every
    /// [`crate::source::SAFETY_SCAN`]); without, on every poll.
    pub fn poll(&mut self) -> bool {
        use crate::source::Seen;
        let Some(dir) = self.dir.clone() else { return false };
        let due = self.listed.is_none_or(|at| at.elapsed() >= crate::source::SAFETY_SCAN);
        match self.watch.as_ref().map(|w| w.read()) {
            Some(Seen::Files(names)) if names.is_empty() && !due => return false,
            Some(Seen::Gone) => self.watch = None,
            _ => {}
        }
        self.listed = Some(std::time::Instant::now());
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
            let mtime = fp.0;
            self.fingerprint.insert(path.clone(), fp);
            changed = true;
            self.read(&path, mtime);
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
            self.objects.retain(|_, o| o.file != path);
            changed = true;
        }
        changed
    }

    fn read(&mut self, path: &Path, mtime: Option<SystemTime>) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.file_errors
                    .insert(path.to_path_buf(), vec![format!("cannot read: {e}")]);
                return;
            }
        };
        self.file_errors.remove(path);
        let mut seen = vec![];
        let mut errors = vec![];
        for parsed in parse_documents(&text) {
            let p = match parsed {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let k = p.key();
            seen.push(k.clone());
            let created = p
                .created_unix_ms
                .unwrap_or_else(|| strait_api::unix_ms(mtime.unwrap_or_else(SystemTime::now)));
            let spec_json = serde_json::to_string(&p.spec).unwrap_or_default();
            let previous = self.objects.get(&k);
            let generation = match (previous, p.generation) {
                (_, Some(g)) => g,
                (Some(prev), None) if prev.object.spec_json != spec_json => prev.object.generation + 1,
                (Some(prev), None) => prev.object.generation,
                (None, None) => 1,
            };
            self.objects.insert(
                k,
                Authored {
                    file: path.to_path_buf(),
                    object: pb::PolicyObject {
                        kind: p.kind,
                        namespace: p.namespace,
                        name: p.name,
                        spec_json,
                        created_unix_ms: created,
                        cluster: self.cluster.clone(),
                        generation,
                        locked_fields: p.locked,
                        cluster_scope: p.cluster_scope,
                    },
                    error: None,
                    good: true,
                },
            );
        }
        // A document refused by the schema: the object it names (if it can be told) keeps its
        // last good version and reports the error.
        let mut unnamed = vec![];
        for e in errors {
            let named = self
                .objects
                .iter_mut()
                .filter(|(k, o)| o.file == path && !seen.contains(k))
                .find(|(k, _)| {
                    let mut parts = k.splitn(3, '/');
                    let (kind, ns, name) = (parts.next(), parts.next(), parts.next());
                    matches!((kind, ns, name), (Some(kind), Some(ns), Some(name)) if e.contains(&format!("({kind} {ns}/{name})")))
                });
            match named {
                Some((k, o)) => {
                    o.error = Some(e);
                    seen.push(k.clone());
                }
                None => unnamed.push(e),
            }
        }
        if !unnamed.is_empty() {
            self.file_errors.insert(path.to_path_buf(), unnamed);
        }
        // Objects no longer in the file are gone.
        self.objects.retain(|k, o| o.file != path || seen.contains(k));
    }

    /// Replaces the objects read from the Kubernetes API (`Kind/ns/name` and what parsing
    /// made of each, with its creation time) with `objects`.
    pub fn set_kube(&mut self, objects: Vec<(String, Result<Parsed, String>, i64)>) {
        let keys: Vec<&String> = objects.iter().map(|(k, _, _)| k).collect();
        self.objects.retain(|k, a| !is_kube(&a.file) || keys.contains(&k));
        for (k, parsed, created) in &objects {
            let file = PathBuf::from(format!("{KUBE_PREFIX}{k}"));
            match parsed {
                Ok(p) => {
                    self.objects.insert(
                        k.clone(),
                        Authored {
                            file,
                            object: pb::PolicyObject {
                                kind: p.kind.clone(),
                                namespace: p.namespace.clone(),
                                name: p.name.clone(),
                                spec_json: serde_json::to_string(&p.spec).unwrap_or_default(),
                                created_unix_ms: *created,
                                cluster: self.cluster.clone(),
                                generation: p.generation.unwrap_or(1),
                                locked_fields: p.locked.clone(),
                                cluster_scope: p.cluster_scope,
                            },
                            error: None,
                            good: true,
                        },
                    );
                }
                Err(e) => {
                    let mut parts = k.splitn(3, '/');
                    let (kind, ns, name) = (
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                        parts.next().unwrap_or_default(),
                    );
                    let entry = self.objects.entry(k.clone()).or_insert_with(|| Authored {
                        file: file.clone(),
                        object: pb::PolicyObject {
                            kind: kind.into(),
                            namespace: ns.into(),
                            name: name.into(),
                            created_unix_ms: *created,
                            cluster: self.cluster.clone(),
                            ..Default::default()
                        },
                        error: None,
                        good: false,
                    });
                    entry.error = Some(e.clone());
                }
            }
        }
    }

    /// The clusterset objects peers get (each at its last good version).
    pub fn exported(&self) -> Vec<pb::PolicyObject> {
        self.objects
            .values()
            .filter(|a| a.good && !a.object.cluster_scope)
            .map(|a| a.object.clone())
            .collect()
    }
}

/// Objects from the Kubernetes API carry this "file" name prefix.
pub const KUBE_PREFIX: &str = "kubernetes:";

pub fn is_kube(file: &Path) -> bool {
    file.to_str().is_some_and(|f| f.starts_with(KUBE_PREFIX))
}

/// Where an object's current version stands across the clusterset, from every cluster's
/// report: the clusters that apply it, those that do not (yet), and this cluster's proxies
/// and the others' that acknowledged it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub origin: String,
    pub generation: u64,
    pub cluster_scope: bool,
    pub applied: Vec<String>,
    pub missing: Vec<String>,
    pub expected: usize,
    pub proxies_acked: u32,
    pub proxies_total: u32,
    pub pending: Vec<String>,
    /// Every cluster's report, this cluster's first.
    pub reports: Vec<pb::ObjectStatus>,
}

/// The summary of object `k` (its status here, what was written here, every peer's reports).
pub fn summarize(
    k: &str,
    own: Option<&pb::ObjectStatus>,
    authored: Option<&Authored>,
    cluster_scope: bool,
    peer_reports: &[&pb::ObjectStatus],
    expected: &[String],
    cluster: &str,
) -> Option<Summary> {
    let (origin, generation) = match (own, authored) {
        (Some(s), _) => (s.origin_cluster.clone(), s.generation),
        (None, Some(a)) => (cluster.to_string(), a.object.generation),
        (None, None) => return None,
    };
    let expected: Vec<String> = if cluster_scope {
        vec![cluster.to_string()]
    } else {
        expected.to_vec()
    };
    let reports: Vec<&pb::ObjectStatus> = own
        .into_iter()
        .chain(
            peer_reports
                .iter()
                .copied()
                .filter(|s| key(&s.kind, &s.namespace, &s.name) == k),
        )
        .collect();
    let current: Vec<&pb::ObjectStatus> = reports
        .iter()
        .copied()
        .filter(|s| {
            if cluster_scope {
                s.cluster == cluster
            } else {
                s.origin_cluster == origin && s.generation == generation
            }
        })
        .collect();
    let (applied, missing) = applied_in(current.iter().copied(), &expected);
    Some(Summary {
        proxies_acked: current
            .iter()
            .filter(|s| applied.contains(&s.cluster))
            .map(|s| s.proxies_acked)
            .sum(),
        proxies_total: current.iter().map(|s| s.proxies_total).sum(),
        pending: current
            .iter()
            .flat_map(|s| s.proxies_pending.iter().map(move |p| format!("{}/{p}", s.cluster)))
            .collect(),
        origin,
        generation,
        cluster_scope,
        applied,
        missing,
        expected: expected.len(),
        reports: reports.into_iter().cloned().collect(),
    })
}

/// What one cluster enforces for one `Kind/namespace/name`, before checking.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub object: pb::PolicyObject,
    /// Clusterset versions that lost to an older one: (cluster, created).
    pub conflicts: Vec<(String, i64)>,
    /// Set when a cluster-scoped object of this cluster overrides the clusterset one: its
    /// generation, and the locked fields kept from the clusterset version.
    pub overridden: Option<(u64, Vec<String>)>,
    /// Where the clusterset version came from (for an override).
    pub clusterset_origin: Option<String>,
}

/// The value at a dotted path (`spec.retry.attempts`) of a JSON object.
fn get_path<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(v, |v, p| v.get(p))
}

fn set_path(v: &mut serde_json::Value, path: &[&str], value: Option<serde_json::Value>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        if !cur.is_object() {
            return;
        }
        let map = cur.as_object_mut().expect("checked");
        cur = map.entry(p.to_string()).or_insert_with(|| serde_json::json!({}));
    }
    if let Some(map) = cur.as_object_mut() {
        match value {
            Some(v) => {
                map.insert(last.to_string(), v);
            }
            None => {
                map.remove(*last);
            }
        }
    }
}

/// A cluster override of a clusterset object, with the locked fields put back. Returns the
/// spec and the locked fields whose value the override had changed.
pub fn apply_locks(clusterset: &pb::PolicyObject, local: &pb::PolicyObject) -> (String, Vec<String>) {
    let (Ok(base), Ok(mut over)) = (
        serde_json::from_str::<serde_json::Value>(&clusterset.spec_json),
        serde_json::from_str::<serde_json::Value>(&local.spec_json),
    ) else {
        return (local.spec_json.clone(), vec![]);
    };
    let mut kept = vec![];
    for field in &clusterset.locked_fields {
        let path: Vec<&str> = field.trim_start_matches("spec.").split('.').collect();
        let want = get_path(&base, &path).cloned();
        if get_path(&over, &path) != want.as_ref() {
            kept.push(field.clone());
            set_path(&mut over, &path, want);
        }
    }
    (serde_json::to_string(&over).unwrap_or_default(), kept)
}

/// Merges this cluster's objects with its peers': for each `Kind/namespace/name` the oldest
/// clusterset version (ties: the cluster name), then this cluster's cluster-scoped override,
/// with the clusterset version's locked fields kept.
pub fn effective(own: &[pb::PolicyObject], peers: &[pb::PolicyObject]) -> BTreeMap<String, Effective> {
    let mut clusterset: BTreeMap<String, Vec<&pb::PolicyObject>> = BTreeMap::new();
    let mut overrides: BTreeMap<String, &pb::PolicyObject> = BTreeMap::new();
    for o in own.iter().chain(peers) {
        if o.cluster_scope {
            // Peers never send cluster-scoped objects; ignore one that claims to be.
            if own.iter().any(|x| std::ptr::eq(x, o)) {
                overrides.insert(object_key(o), o);
            }
        } else {
            clusterset.entry(object_key(o)).or_default().push(o);
        }
    }
    let mut out = BTreeMap::new();
    for (k, mut versions) in clusterset {
        versions.sort_by(|a, b| (a.created_unix_ms, &a.cluster).cmp(&(b.created_unix_ms, &b.cluster)));
        let winner = versions[0];
        let conflicts = versions[1..]
            .iter()
            .map(|o| (o.cluster.clone(), o.created_unix_ms))
            .collect();
        let mut e = Effective {
            object: winner.clone(),
            conflicts,
            overridden: None,
            clusterset_origin: None,
        };
        if let Some(local) = overrides.remove(&k) {
            let (spec, kept) = apply_locks(winner, local);
            e.clusterset_origin = Some(winner.cluster.clone());
            e.overridden = Some((local.generation, kept));
            e.object = pb::PolicyObject {
                spec_json: spec,
                ..local.clone()
            };
        }
        out.insert(k, e);
    }
    for (k, local) in overrides {
        out.insert(
            k,
            Effective {
                object: local.clone(),
                conflicts: vec![],
                overridden: None,
                clusterset_origin: None,
            },
        );
    }
    out
}

fn condition(kind: &str, ok: bool, reason: &str, message: impl Into<String>) -> pb::Condition {
    pb::Condition {
        r#type: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

/// Where each served object of one kind is enforced, by namespace, then name. An object not
/// listed is taken as enforced as served here in every cluster.
pub type Enforcement = BTreeMap<String, BTreeMap<String, Enforcing>>;

/// Where one served object is enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enforcing {
    /// The version served here: whose (its origin cluster) and which generation of it.
    pub origin: String,
    pub generation: u64,
    /// `None` when every cluster enforces that version. Otherwise each cluster known to enforce
    /// some version of the same origin, with the generation it enforces: this one, and each peer
    /// that reports serving it and has not overridden it. So a cluster-scoped object is enforced
    /// here alone, and a clusterset one is not (yet) known in a peer that has not reported it or
    /// serves its own override; a peer that serves an older generation (it has not taken the new
    /// one yet, or the new one failed its checks there) is listed with that generation.
    pub clusters: Option<BTreeMap<String, u64>>,
}

impl Enforcing {
    /// Whether `cluster` enforces the version served here.
    pub fn enforced_in(&self, cluster: &str) -> bool {
        self.clusters
            .as_ref()
            .is_none_or(|cs| cs.get(cluster) == Some(&self.generation))
    }
}

/// The [`Enforcement`] of every served object of `kind`, from this cluster's statuses (`own`)
/// and its peers' reports, over the clusters `expected` (this one and its peers).
pub fn enforcement(
    kind: &str,
    own: &BTreeMap<String, pb::ObjectStatus>,
    peer_reports: &[&pb::ObjectStatus],
    expected: &[String],
) -> Enforcement {
    let mut reports: BTreeMap<(&str, &str), Vec<&pb::ObjectStatus>> = BTreeMap::new();
    for r in peer_reports.iter().filter(|r| r.kind == kind && r.serving) {
        reports.entry((&r.namespace, &r.name)).or_default().push(r);
    }
    let overridden = |s: &pb::ObjectStatus| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "Overridden" && c.status == "True")
    };
    let mut out = Enforcement::new();
    for s in own.values().filter(|s| s.kind == kind && s.serving) {
        // The peers enforcing a version of the same origin (none where this cluster serves its
        // own override).
        let same_origin = || {
            reports
                .get(&(s.namespace.as_str(), s.name.as_str()))
                .into_iter()
                .flatten()
                .filter(|r| !overridden(s) && r.origin_cluster == s.origin_cluster && !overridden(r))
        };
        let everywhere = expected.iter().all(|c| {
            *c == s.cluster || same_origin().any(|r| r.cluster == *c && r.serving_generation == s.serving_generation)
        });
        // Each cluster's generation only where they differ (the merge loop asks every pass).
        let clusters = (!everywhere).then(|| {
            let mut clusters = BTreeMap::from([(s.cluster.clone(), s.serving_generation)]);
            clusters.extend(same_origin().map(|r| (r.cluster.clone(), r.serving_generation)));
            clusters
        });
        out.entry(s.namespace.clone()).or_default().insert(
            s.name.clone(),
            Enforcing {
                origin: s.origin_cluster.clone(),
                generation: s.serving_generation,
                clusters,
            },
        );
    }
    out
}

/// The checked state of the effective objects: what proxies get and every object's status in
/// this cluster (without proxy counts, which the caller adds).
#[derive(Default)]
pub struct Checked {
    pub routes: Vec<pb::HttpRoute>,
    pub policies: Vec<pb::TrafficPolicy>,
    pub authz: Vec<pb::AuthorizationPolicy>,
    pub statuses: BTreeMap<String, pb::ObjectStatus>,
}

/// Checks every effective object against the merged catalog. An object that fails serves its
/// last good version (`last_good`, updated here) and reports why; nothing else is affected.
pub fn check(
    effective: &BTreeMap<String, Effective>,
    merged: &crate::catalog::Merged,
    last_good: &mut BTreeMap<String, pb::PolicyObject>,
    cluster: &str,
) -> Checked {
    let lookup = |t: &Target| match merged.get(format!("{}/{}", t.namespace, t.name).as_str()) {
        None => BackendLookup::NoSuchService,
        Some(svc) => match t.port.map(|p| svc.ports.iter().find(|sp| sp.port == p as u32)) {
            Some(None) => BackendLookup::NoSuchPort,
            Some(Some(p)) if p.protocol.eq_ignore_ascii_case("tcp") => BackendLookup::NotHttp,
            _ => BackendLookup::Found,
        },
    };
    let target_lookup = |ns: &str, name: &str| {
        if merged.contains_key(format!("{ns}/{name}").as_str()) {
            TargetLookup::Found
        } else {
            TargetLookup::NotFound
        }
    };
    let mut out = Checked::default();
    last_good.retain(|k, _| effective.contains_key(k));
    for (k, e) in effective {
        let o = &e.object;
        let mut conditions = vec![];
        let accepted = match o.kind.as_str() {
            HTTP_ROUTE | GRPC_ROUTE => match route_spec(&o.kind, &o.spec_json) {
                Err(err) => {
                    conditions.push(condition("Accepted", false, "UnsupportedValue", err));
                    false
                }
                Ok(spec) => {
                    let (compiled, errors) = compile_route(&o.namespace, &o.name, &spec, &lookup);
                    for kind in ["Accepted", "ResolvedRefs"] {
                        let mine: Vec<&RouteError> = errors.iter().filter(|e| e.condition().0 == kind).collect();
                        conditions.push(match mine.first() {
                            None => condition(kind, true, kind, ""),
                            Some(first) => condition(
                                kind,
                                false,
                                first.condition().1,
                                mine.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
                            ),
                        });
                    }
                    compiled.is_some()
                }
            },
            TRAFFIC_POLICY => match serde_json::from_str::<TrafficPolicySpec>(&o.spec_json) {
                Err(err) => {
                    conditions.push(condition("Accepted", false, "Invalid", err.to_string()));
                    false
                }
                Ok(spec) => {
                    let (compiled, errors) = compile_policy(&o.namespace, &o.name, &spec, &target_lookup);
                    let (bad, unresolved): (Vec<_>, Vec<_>) = errors.iter().partition(|e| !e.unresolved);
                    let join = |v: &[&strait_api::traffic::PolicyError]| {
                        v.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
                    };
                    conditions.push(if bad.is_empty() {
                        condition("Accepted", true, "Accepted", "")
                    } else {
                        condition("Accepted", false, "Invalid", join(&bad))
                    });
                    conditions.push(if unresolved.is_empty() {
                        condition("ResolvedRefs", true, "ResolvedRefs", "")
                    } else {
                        condition("ResolvedRefs", false, "TargetNotFound", join(&unresolved))
                    });
                    compiled.is_some()
                }
            },
            AUTHORIZATION_POLICY => match serde_json::from_str::<AuthorizationPolicySpec>(&o.spec_json) {
                Err(err) => {
                    conditions.push(condition("Accepted", false, "Invalid", err.to_string()));
                    false
                }
                Ok(spec) => match compile_authz(&o.namespace, &o.name, &spec) {
                    Err(errors) => {
                        let text = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                        conditions.push(condition("Accepted", false, "Invalid", text));
                        false
                    }
                    Ok(compiled) => {
                        let missing: Vec<String> = match &compiled.scope {
                            Scope::Services(names) => names
                                .iter()
                                .filter(|n| !merged.contains_key(format!("{}/{n}", o.namespace).as_str()))
                                .map(|n| format!("service {}/{n} is not in the catalog of any cluster", o.namespace))
                                .collect(),
                            _ => vec![],
                        };
                        // HTTP attributes on a TCP service: a config error reported here, and
                        // enforced fail-closed (the policy serves: such a rule never allows TCP
                        // and a DENY one denies it).
                        let tcp: Vec<String> = match &compiled.scope {
                            Scope::Services(names) if compiled.has_http_rules() => names
                                .iter()
                                .filter(|n| {
                                    merged.get(format!("{}/{n}", o.namespace).as_str()).is_some_and(|svc| {
                                        svc.ports.iter().any(|p| p.protocol.eq_ignore_ascii_case("tcp"))
                                    })
                                })
                                .cloned()
                                .collect(),
                            _ => vec![],
                        };
                        conditions.push(if tcp.is_empty() {
                            condition("Accepted", true, "Accepted", "")
                        } else {
                            condition(
                                "Accepted",
                                false,
                                "HTTPRuleOnTCPPort",
                                format!(
                                    "rules name HTTP attributes (methods, paths, hosts, headers) but {} is TCP: they never allow it (fail closed); use ports and sources only",
                                    tcp.join(", ")
                                ),
                            )
                        });
                        conditions.push(if missing.is_empty() {
                            condition("ResolvedRefs", true, "ResolvedRefs", "")
                        } else {
                            condition("ResolvedRefs", false, "TargetNotFound", missing.join("; "))
                        });
                        // Served even when its targets are missing or TCP: an authorization
                        // policy that is not enforced would fail open.
                        if !missing.is_empty() || !tcp.is_empty() {
                            last_good.insert(k.clone(), o.clone());
                        }
                        missing.is_empty() && tcp.is_empty()
                    }
                },
            },
            other => {
                conditions.push(condition("Accepted", false, "Unsupported", format!("kind {other}")));
                false
            }
        };
        // A version with any error is not enforced (a backend or target missing included):
        // the last good version keeps serving, and Accepted says why it is not this one.
        let unresolved = conditions
            .iter()
            .find(|c| c.r#type == "ResolvedRefs" && c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone()));
        let accepted = accepted && unresolved.is_none();
        // An AuthorizationPolicy with a missing target or HTTP rules on TCP serves as written
        // (fail closed), so "the last good version keeps serving" would be wrong for it.
        let fail_closed = o.kind == AUTHORIZATION_POLICY && last_good.get(k) == Some(o);
        if let (Some((reason, message)), Some(c)) = (unresolved, conditions.iter_mut().find(|c| c.r#type == "Accepted"))
        {
            c.status = "False".into();
            c.reason = reason;
            c.message = message;
        }
        if accepted {
            last_good.insert(k.clone(), o.clone());
        } else if let (Some(good), Some(c), false) = (
            last_good.get(k),
            conditions.iter_mut().find(|c| c.r#type == "Accepted"),
            fail_closed,
        ) {
            c.message = format!(
                "{} (the last good version keeps serving: generation {} from {})",
                c.message, good.generation, good.cluster
            );
        }
        if !e.conflicts.is_empty() {
            let others: Vec<String> = e.conflicts.iter().map(|(c, _)| c.clone()).collect();
            conditions.push(condition(
                "Conflict",
                true,
                "OlderObjectWins",
                format!(
                    "also written in {}; the oldest version (from {}) is enforced everywhere",
                    others.join(", "),
                    e.clusterset_origin.as_deref().unwrap_or(&o.cluster)
                ),
            ));
        }
        if let Some((_, kept)) = &e.overridden {
            conditions.push(condition(
                "Overridden",
                true,
                "ClusterScopeOverride",
                if kept.is_empty() {
                    format!(
                        "this cluster's strait.dev/scope: cluster version overrides the clusterset one from {}",
                        e.clusterset_origin.as_deref().unwrap_or("?")
                    )
                } else {
                    format!(
                        "this cluster's version overrides the clusterset one from {}, except its locked fields {} (kept as the clusterset version has them)",
                        e.clusterset_origin.as_deref().unwrap_or("?"),
                        kept.join(", ")
                    )
                },
            ));
        }
        let serving = last_good.get(k);
        if let Some(good) = serving {
            match good.kind.as_str() {
                HTTP_ROUTE | GRPC_ROUTE => out.routes.push(pb::HttpRoute {
                    namespace: good.namespace.clone(),
                    name: good.name.clone(),
                    // Proxies get a GRPCRoute as the HTTPRoute that does the same.
                    spec_json: route_spec(&good.kind, &good.spec_json)
                        .ok()
                        .and_then(|s| serde_json::to_string(&s).ok())
                        .unwrap_or_default(),
                    created_unix_ms: good.created_unix_ms,
                    cluster: good.cluster.clone(),
                    kind: good.kind.clone(),
                }),
                AUTHORIZATION_POLICY => out.authz.push(pb::AuthorizationPolicy {
                    namespace: good.namespace.clone(),
                    name: good.name.clone(),
                    spec_json: good.spec_json.clone(),
                    created_unix_ms: good.created_unix_ms,
                    cluster: good.cluster.clone(),
                }),
                TRAFFIC_POLICY => out.policies.push(pb::TrafficPolicy {
                    namespace: good.namespace.clone(),
                    name: good.name.clone(),
                    spec_json: good.spec_json.clone(),
                    created_unix_ms: good.created_unix_ms,
                    cluster: good.cluster.clone(),
                }),
                _ => {}
            }
        }
        out.statuses.insert(
            k.clone(),
            pb::ObjectStatus {
                kind: o.kind.clone(),
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                origin_cluster: o.cluster.clone(),
                generation: o.generation,
                cluster: cluster.to_string(),
                conditions,
                proxies_acked: 0,
                proxies_total: 0,
                proxies_pending: vec![],
                serving: serving.is_some(),
                serving_generation: serving.map(|g| g.generation).unwrap_or_default(),
            },
        );
    }
    out
}

/// Statuses for objects authored here whose current version the schema refused (they never
/// reach the effective set in that version, so `check` cannot report them).
pub fn schema_statuses(store: &ObjectStore, cluster: &str, statuses: &mut BTreeMap<String, pb::ObjectStatus>) {
    for (k, a) in &store.objects {
        let Some(error) = &a.error else { continue };
        let status = statuses.entry(k.clone()).or_insert_with(|| pb::ObjectStatus {
            kind: a.object.kind.clone(),
            namespace: a.object.namespace.clone(),
            name: a.object.name.clone(),
            origin_cluster: cluster.to_string(),
            cluster: cluster.to_string(),
            ..Default::default()
        });
        status.conditions.retain(|c| c.r#type != "Accepted");
        status.conditions.insert(
            0,
            condition(
                "Accepted",
                false,
                "Invalid",
                format!("{error} (the last good version keeps serving)"),
            ),
        );
    }
}

/// An HTTPRoute's spec, or the HTTPRoute that does what a GRPCRoute's spec says.
fn route_spec(kind: &str, spec_json: &str) -> Result<HttpRouteSpec, String> {
    if kind == GRPC_ROUTE {
        let g: GrpcRouteSpec = serde_json::from_str(spec_json).map_err(|e| e.to_string())?;
        grpc::to_http(&g)
    } else {
        serde_json::from_str(spec_json).map_err(|e| e.to_string())
    }
}

/// Names of the resources proxies get for an object.
pub fn resource_name(kind: &str, namespace: &str, name: &str) -> String {
    match kind {
        HTTP_ROUTE => format!("route/{namespace}/{name}"),
        GRPC_ROUTE => format!("grpcroute/{namespace}/{name}"),
        AUTHORIZATION_POLICY => format!("authz/{namespace}/{name}"),
        _ => format!("trafficpolicy/{namespace}/{name}"),
    }
}

/// The clusters an object is applied in, of those expected, from every cluster's report.
pub fn applied_in<'a>(
    reports: impl Iterator<Item = &'a pb::ObjectStatus>,
    expected: &[String],
) -> (Vec<String>, Vec<String>) {
    let ok: BTreeSet<String> = reports
        .filter(|s| {
            s.serving
                && s.serving_generation == s.generation
                && s.conditions
                    .iter()
                    .any(|c| c.r#type == "Accepted" && c.status == "True")
        })
        .map(|s| s.cluster.clone())
        .collect();
    expected.iter().cloned().partition(|c| ok.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_enforced_where_peers_report_serving_the_same_version() {
        let status = |cluster: &str, name: &str, origin: &str, generation: u64, overridden: bool| pb::ObjectStatus {
            kind: AUTHORIZATION_POLICY.into(),
            namespace: "demo".into(),
            name: name.into(),
            origin_cluster: origin.into(),
            cluster: cluster.into(),
            serving: true,
            serving_generation: generation,
            conditions: if overridden {
                vec![condition("Overridden", true, "ClusterScopeOverride", "")]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let own: BTreeMap<String, pb::ObjectStatus> = [
            status("east", "everywhere", "west", 2, false),
            status("east", "behind", "east", 3, false),
            status("east", "overridden-there", "east", 1, false),
            status("east", "local", "east", 1, false),
            status("east", "overridden-here", "east", 4, true),
        ]
        .into_iter()
        .map(|s| (key(&s.kind, &s.namespace, &s.name), s))
        .collect();
        let mut not_served = status("central", "behind", "east", 3, false);
        not_served.serving = false;
        let mut a_route = status("west", "local", "east", 1, false);
        a_route.kind = HTTP_ROUTE.into();
        let peers = [
            status("west", "everywhere", "west", 2, false),
            status("central", "everywhere", "west", 2, false),
            // West serves an older good version; central none at all.
            status("west", "behind", "east", 2, false),
            not_served,
            status("west", "overridden-there", "west", 1, true),
            status("central", "overridden-there", "east", 1, false),
            // Another kind with the same name says nothing of the policy.
            a_route,
            status("west", "overridden-here", "west", 4, false),
        ];
        let reports: Vec<&pb::ObjectStatus> = peers.iter().collect();
        let expected = ["east".to_string(), "west".into(), "central".into()];
        let got = enforcement(AUTHORIZATION_POLICY, &own, &reports, &expected);
        let clusters = |name: &str| {
            let e = &got["demo"][name];
            let clusters = e.clusters.clone().map(|cs| cs.into_iter().collect::<Vec<_>>());
            (e.origin.as_str(), e.generation, clusters)
        };
        let at = |pairs: &[(&str, u64)]| Some(pairs.iter().map(|(c, g)| (c.to_string(), *g)).collect());
        assert_eq!(clusters("everywhere"), ("west", 2, None), "every cluster serves it");
        // West serves an older generation, central none: each listed as it is.
        assert_eq!(clusters("behind"), ("east", 3, at(&[("east", 3), ("west", 2)])));
        assert!(got["demo"]["behind"].enforced_in("east") && !got["demo"]["behind"].enforced_in("west"));
        assert_eq!(
            clusters("overridden-there"),
            ("east", 1, at(&[("central", 1), ("east", 1)]))
        );
        assert_eq!(clusters("local"), ("east", 1, at(&[("east", 1)])));
        assert_eq!(clusters("overridden-here"), ("east", 4, at(&[("east", 4)])));
        // Without peers (this cluster alone), everything is enforced everywhere.
        let alone = enforcement(AUTHORIZATION_POLICY, &own, &[], &expected[..1]);
        assert!(alone["demo"]
            .values()
            .all(|e| e.clusters.is_none() && e.enforced_in("west")));
    }

    fn obj(cluster: &str, created: i64, spec: serde_json::Value) -> pb::PolicyObject {
        pb::PolicyObject {
            kind: TRAFFIC_POLICY.into(),
            namespace: "demo".into(),
            name: "greeter".into(),
            spec_json: spec.to_string(),
            created_unix_ms: created,
            cluster: cluster.into(),
            generation: 1,
            ..Default::default()
        }
    }

    #[test]
    fn the_oldest_clusterset_version_wins_and_the_conflict_is_named() {
        let east = obj("east", 200, serde_json::json!({"a": 1}));
        let west = obj("west", 100, serde_json::json!({"a": 2}));
        let e = effective(std::slice::from_ref(&east), std::slice::from_ref(&west));
        let x = &e["TrafficPolicy/demo/greeter"];
        assert_eq!(x.object.cluster, "west");
        assert_eq!(x.conflicts, vec![("east".to_string(), 200)]);
        // The same answer from the other side.
        let e2 = effective(&[west], &[east]);
        assert_eq!(e2["TrafficPolicy/demo/greeter"].object.cluster, "west");
    }

    #[test]
    fn a_cluster_override_keeps_the_locked_fields() {
        let mut global = obj(
            "west",
            100,
            serde_json::json!({"targetRefs": [{"kind": "Service", "name": "greeter"}], "retry": {"attempts": 3}, "fault": {"abort": {"httpStatus": 500}}}),
        );
        global.locked_fields = vec!["spec.retry".into()];
        let mut local = obj(
            "east",
            300,
            serde_json::json!({"targetRefs": [{"kind": "Service", "name": "greeter"}], "retry": {"attempts": 0}}),
        );
        local.cluster_scope = true;
        let e = effective(&[local], &[global]);
        let x = &e["TrafficPolicy/demo/greeter"];
        let spec: serde_json::Value = serde_json::from_str(&x.object.spec_json).expect("json");
        assert_eq!(spec["retry"]["attempts"], 3, "locked field kept");
        assert!(spec.get("fault").is_none(), "unlocked fields are the override's");
        assert_eq!(x.overridden, Some((1, vec!["spec.retry".to_string()])));
        assert_eq!(x.clusterset_origin.as_deref(), Some("west"));
    }

    #[test]
    fn parse_names_the_bad_field_and_reads_the_scope() {
        let docs = parse_documents(
            r#"
apiVersion: policy.strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: a, namespace: demo, labels: {strait.dev/scope: cluster}}
spec: {targetRefs: [{kind: Service, name: x}], retry: {atempts: 3}}
---
apiVersion: policy.strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b, namespace: demo, labels: {strait.dev/scope: cluster}, annotations: {strait.dev/locked-fields: "spec.retry, spec.fault"}}
spec: {targetRefs: [{kind: Service, name: x}]}
"#,
        );
        let e = docs[0].as_ref().expect_err("schema error");
        assert!(e.contains("spec.retry") && e.contains("atempts"), "{e}");
        let b = docs[1].as_ref().expect("ok");
        assert!(b.cluster_scope);
        assert_eq!(b.locked, vec!["spec.retry", "spec.fault"]);
    }

    /// A catalog of HTTP services on port 80 in namespace demo.
    fn catalog(names: &[&str]) -> crate::catalog::Merged {
        names
            .iter()
            .map(|s| {
                (
                    format!("demo/{s}").into(),
                    std::sync::Arc::new(crate::catalog::MergedService {
                        name: s.to_string(),
                        namespace: "demo".into(),
                        clusterset_ip: std::net::Ipv4Addr::UNSPECIFIED,
                        ports: vec![pb::ServicePort {
                            name: "http".into(),
                            port: 80,
                            protocol: "http".into(),
                        }],
                        exports: vec![],
                        identities: vec![],
                        conditions: vec![],
                        clusters: vec!["east".into()],
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn the_readme_examples_are_valid() {
        // The directory as `cargo test` names it when it runs this test: a binary reused from
        // another clone (shared target directory) would name that clone at compile time.
        let crate_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
        let dir = format!("{crate_dir}/../examples/policy");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("examples/policy") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("readable");
            for doc in parse_documents(&text) {
                let p = doc.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let o = pb::PolicyObject {
                    kind: p.kind.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    spec_json: p.spec.to_string(),
                    cluster: "east".into(),
                    generation: 1,
                    ..Default::default()
                };
                let e = effective(&[o], &[]);
                let mut good = BTreeMap::new();
                let merged = catalog(&["echo", "greeter"]);
                let c = check(&e, &merged, &mut good, "east");
                let status = c.statuses.values().next().expect("status");
                assert!(
                    status.conditions.iter().all(|c| c.status == "True"),
                    "{}: {:?}",
                    path.display(),
                    status.conditions
                );
                n += 1;
            }
        }
        assert!(n >= 6, "{n} example objects");
    }

    #[test]
    fn a_bad_object_serves_its_last_good_version() {
        let merged = catalog(&["x"]);
        let mut good = BTreeMap::new();
        let ok = obj(
            "east",
            1,
            serde_json::json!({"targetRefs": [{"kind": "Service", "name": "x"}]}),
        );
        let e = effective(std::slice::from_ref(&ok), &[]);
        let c = check(&e, &merged, &mut good, "east");
        assert_eq!(c.policies.len(), 1);
        let mut bad = ok.clone();
        bad.generation = 2;
        bad.spec_json = serde_json::json!({"targetRefs": [{"kind": "Service", "name": "x"}], "rateLimit": {"requestsPerSecond": 0}}).to_string();
        let e = effective(&[bad], &[]);
        let c = check(&e, &merged, &mut good, "east");
        assert_eq!(c.policies.len(), 1, "still serving");
        let s = &c.statuses["TrafficPolicy/demo/greeter"];
        assert_eq!(s.serving_generation, 1);
        assert_eq!(s.generation, 2);
        let accepted = s.conditions.iter().find(|c| c.r#type == "Accepted").expect("Accepted");
        assert_eq!(accepted.status, "False");
        assert!(accepted.message.contains("rateLimit.requestsPerSecond"));
        let (ok, missing) = applied_in(c.statuses.values(), &["east".to_string()]);
        assert!(ok.is_empty() && missing == vec!["east".to_string()]);
    }
}
