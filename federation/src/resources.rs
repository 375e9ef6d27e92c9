//! From the merged catalog to the named, versioned resources the config stream carries, and
//! the diff between two such sets. Pure functions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use strait_api::pb;
use strait_api::pb::resource::Kind;

use crate::catalog::{join, Key, Merged, MergedService};

/// Resources by name, as a controller serves them.
pub type Resources = BTreeMap<Key, Arc<Built>>;

/// The full config at one version.
#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    pub version: u64,
    pub resources: Resources,
    /// False right after a (re)start until every peer has been heard from (or one lease
    /// passed): until then the catalog lacks remote services, and serving it to sidecars would
    /// make them drop endpoints that are fine. Gateways get it at once (peers reach this
    /// controller through them).
    pub warm: bool,
    /// For each resource but services (the bulk of the config, and not objects with a status),
    /// the config version at which its current version first went out: a proxy that
    /// acknowledged that version (or a later one) has it.
    pub since: BTreeMap<Key, u64>,
}

impl ConfigState {
    /// The `since` map of a new state at `version`, carried over from `previous` for every
    /// resource whose version did not change.
    pub fn since_from(previous: &ConfigState, resources: &Resources, version: u64) -> BTreeMap<Key, u64> {
        resources
            .iter()
            .filter(|(k, _)| !is_service(k))
            .map(|(k, r)| {
                let kept = previous
                    .resources
                    .get(k)
                    .filter(|old| old.version == r.version)
                    .and_then(|_| previous.since.get(k).copied());
                (k.clone(), kept.unwrap_or(version))
            })
            .collect()
    }
}

/// Resources only gateways receive: the controller's own peering service, and each service's
/// gateway view ([`LOCAL_VIEW`]).
pub fn gateway_only(name: &str) -> bool {
    name.starts_with(LOCAL_VIEW)
        || name
            .strip_prefix("service/")
            .and_then(|rest| rest.strip_prefix(strait_api::SYSTEM_NAMESPACE))
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Resources gateways do not receive: the clusterset's services with every cluster's endpoints,
/// which they get as their [`LOCAL_VIEW`] instead.
pub fn sidecar_only(name: &str) -> bool {
    name.starts_with("service/") && !gateway_only(name)
}

/// The prefix of a service's gateway view, `local/service/<ns>/<name>`: the service with only
/// this cluster's endpoints. A gateway forwards tunnels to local endpoints alone, so it needs no
/// other; the view changes only when they (or the service itself) do, not with every endpoint
/// change elsewhere in the clusterset, which was most of a gateway's work under churn.
pub const LOCAL_VIEW: &str = "local/";

/// Whether a resource is a service (either form).
pub fn is_service(name: &str) -> bool {
    name.strip_prefix(LOCAL_VIEW).unwrap_or(name).starts_with("service/")
}

/// A resource as the config stream sends it: its name, its version (a digest of its content)
/// and its encoding as a `pb::Resource`, made once when it is built and shared by every
/// proxy's stream. The controller keeps nothing else of it: the decoded form (a service's
/// endpoints above all) was a copy of what the merge already holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    /// The name, shared with every map that holds the resource.
    pub name: Key,
    pub version: String,
    pub wire: Bytes,
    /// A clusterset service also in parts, for proxies that take it so
    /// (`Hello.accepts_endpoint_parts`): an endpoint change in one cluster then sends them that
    /// cluster's endpoints, not every cluster's. `None` for every other resource.
    pub split: Option<Box<Split>>,
}

/// A service as its fields and one resource per exporting cluster's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// `service/<ns>/<name>` without endpoints.
    pub head: Built,
    /// `endpoints/<ns>/<name>/<cluster>`, one per exporting cluster, in cluster-name order
    /// (the order in which proxies join them).
    pub parts: Vec<Arc<Built>>,
}

impl Built {
    /// `buf` is the resource encoded without a version (its name and kind): the version is a
    /// digest of those bytes, appended as `Resource.version` (a field may come in any order).
    fn finish(name: Key, buf: Vec<u8>) -> Built {
        let digest = Sha256::digest(&buf);
        Built::with_version(name, buf, &digest)
    }

    /// `buf` as [`Built::finish`] takes it, with the digest that stands for its content.
    fn with_version(name: Key, mut buf: Vec<u8>, digest: &[u8]) -> Built {
        let version: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        prost::encoding::string::encode(RESOURCE_VERSION, &version, &mut buf);
        Built {
            name,
            version,
            wire: buf.into(),
            split: None,
        }
    }

    /// The resource as a proxy decodes it.
    pub fn decode(&self) -> Result<pb::Resource, prost::DecodeError> {
        pb::Resource::decode(self.wire.clone())
    }
}

/// `Resource`'s field numbers that [`Built`] writes itself (`proto/strait.proto`; the unit
/// tests decode what is written and compare).
const RESOURCE_NAME: u32 = 1;
const RESOURCE_VERSION: u32 = 2;
const RESOURCE_SERVICE: u32 = 3;
const RESOURCE_SERVICE_ENDPOINTS: u32 = 11;
const SERVICE_ENDPOINTS: u32 = 5;

fn resource(name: String, kind: Kind) -> Built {
    let r = pb::Resource {
        name,
        version: String::new(),
        kind: Some(kind),
    };
    let buf = r.encode_to_vec();
    Built::finish(r.name.into(), buf)
}

/// `rateshare/<ns>/<name>`: a destination-total rate limit's shares for its sidecars.
pub fn rate_shares_resource(body: pb::RateShares) -> Built {
    resource(
        format!("rateshare/{}/{}", body.namespace, body.name),
        Kind::RateShares(body),
    )
}

/// One cluster's export of a service, encoded once as a resource of its own
/// (`endpoints/<ns>/<name>/<cluster>`, a `pb::ServiceEndpoints`) whose endpoints (field 5,
/// repeated, as in `pb::Service`) the service's whole form copies, with a digest of those bytes.
/// Made once per export and kept by [`BuildMemo`] while the export is the same `Arc`: a change
/// in one cluster encodes and hashes that cluster's endpoints, not every cluster's (it was most
/// of a controller's work under churn).
struct Part {
    export: Arc<pb::ExportedService>,
    resource: Arc<Built>,
    /// Where the endpoints lie in `resource.wire`.
    endpoints: std::ops::Range<usize>,
    digest: [u8; 32],
}

impl Part {
    fn new(svc: &MergedService, cluster: &str, export: &Arc<pb::ExportedService>) -> Arc<Part> {
        use prost::encoding::{encode_key, encode_varint, string, WireType};
        let endpoints: usize = export
            .endpoints
            .iter()
            .map(|e| prost::encoding::message::encoded_len(SERVICE_ENDPOINTS, e))
            .sum();
        // Fields 1-3 as prost writes them (an empty string is left out), then the endpoints.
        let fields = [(1, &svc.namespace), (2, &svc.name), (3, &cluster.to_string())];
        let body = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(tag, v)| string::encoded_len(*tag, v))
            .sum::<usize>()
            + endpoints;
        let name = format!("endpoints/{}/{}/{cluster}", svc.namespace, svc.name);
        let mut buf = Vec::with_capacity(name.len() + body + 48);
        string::encode(RESOURCE_NAME, &name, &mut buf);
        encode_key(RESOURCE_SERVICE_ENDPOINTS, WireType::LengthDelimited, &mut buf);
        encode_varint(body as u64, &mut buf);
        for (tag, v) in fields.iter().filter(|(_, v)| !v.is_empty()) {
            string::encode(*tag, v, &mut buf);
        }
        let start = buf.len();
        for e in &export.endpoints {
            prost::encoding::message::encode(SERVICE_ENDPOINTS, e, &mut buf);
        }
        let range = start..buf.len();
        let digest: [u8; 32] = Sha256::digest(&buf[range.clone()]).into();
        Arc::new(Part {
            export: export.clone(),
            resource: Arc::new(Built::with_version(name.into(), buf, &digest)),
            endpoints: range,
            digest,
        })
    }

    /// The endpoints' bytes, as field 5 of a `pb::Service`.
    fn endpoint_bytes(&self) -> &[u8] {
        &self.resource.wire[self.endpoints.clone()]
    }

    /// The part of `export` in `old` (by pointer), or a new one.
    fn reuse_or_new(
        old: &[Arc<Part>],
        svc: &MergedService,
        cluster: &str,
        export: &Arc<pb::ExportedService>,
    ) -> Arc<Part> {
        old.iter()
            .find(|p| Arc::ptr_eq(&p.export, export))
            .cloned()
            .unwrap_or_else(|| Part::new(svc, cluster, export))
    }
}

/// `service/<ns>/<name>`, encoded straight from the merged service: its endpoints are written
/// from the parts of the exports that hold them (`parts`, in `svc.exports` order), not copied
/// into a `pb::Service` first. The same fields as a `pb::Service` made from it, in the same
/// order.
fn service_resource(svc: &MergedService, parts: &[Arc<Part>]) -> Built {
    let name = format!("service/{}/{}", svc.namespace, svc.name);
    let head = encode_service(name.clone(), svc, &[]);
    let mut by_cluster: Vec<(&String, &Arc<Part>)> = svc.clusters.iter().zip(parts).collect();
    by_cluster.sort_by(|a, b| a.0.cmp(b.0));
    let mut whole = encode_service(name, svc, parts);
    whole.split = Some(Box::new(Split {
        head,
        parts: by_cluster.into_iter().map(|(_, p)| p.resource.clone()).collect(),
    }));
    whole
}

/// The gateway view of a service in cluster `local` (`local/service/<ns>/<name>`): the same
/// service with only the endpoints `local` exports.
fn local_service_resource(svc: &MergedService, parts: &[Arc<Part>], local: &str) -> Built {
    let only = svc.clusters.iter().position(|c| c == local).and_then(|i| parts.get(i));
    encode_service(
        format!("{LOCAL_VIEW}service/{}/{}", svc.namespace, svc.name),
        svc,
        only.map(std::slice::from_ref).unwrap_or_default(),
    )
}

/// A service resource named `name` with the endpoints of `parts`. Its version is a digest of
/// the bytes before the endpoints, each part's digest and the bytes after, each with its
/// length: the same content gives the same version in every build and controller, and a
/// change anywhere a new one, without hashing every endpoint again.
fn encode_service(name: String, svc: &MergedService, parts: &[Arc<Part>]) -> Built {
    use prost::encoding::{encode_key, encode_varint, string, WireType};
    // Fields 1-4, then the endpoints (5), then 6 and 7: prost writes them in this order.
    let head = pb::Service {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        clusterset_ip: svc.clusterset_ip.to_string(),
        ports: svc.ports.clone(),
        ..Default::default()
    };
    let tail = pb::Service {
        conditions: svc.conditions.clone(),
        identities: svc.identities.clone(),
        ..Default::default()
    };
    let endpoints: usize = parts.iter().map(|p| p.endpoints.len()).sum();
    let body = head.encoded_len() + endpoints + tail.encoded_len();
    let mut buf = Vec::with_capacity(name.len() + body + 48);
    string::encode(RESOURCE_NAME, &name, &mut buf);
    encode_key(RESOURCE_SERVICE, WireType::LengthDelimited, &mut buf);
    encode_varint(body as u64, &mut buf);
    head.encode(&mut buf).expect("a Vec grows to fit");
    let mut digest = Sha256::new();
    let mut segment = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    segment(&buf);
    for p in parts {
        segment(&p.digest);
        buf.extend_from_slice(p.endpoint_bytes());
    }
    let before_tail = buf.len();
    tail.encode(&mut buf).expect("a Vec grows to fit");
    segment(&buf[before_tail..]);
    Built::with_version(name.into(), buf, &digest.finalize())
}

/// Each service's resources (its whole form and its gateway view in cluster `local`) from the
/// last build, by the merged service they were made from: an unchanged service (the same
/// `Arc`) is not encoded and hashed again; nor is any other resource whose content is the
/// same as in the last build (gateways, bundles, routes and policies are built on every pass).
pub struct BuildMemo {
    local: String,
    by_service: HashMap<Key, Memoized>,
    others: HashMap<String, (Kind, Arc<Built>)>,
}

struct Memoized {
    made_from: Arc<MergedService>,
    /// The parts of `made_from.exports`, in order.
    parts: Vec<Arc<Part>>,
    whole: Arc<Built>,
    view: Arc<Built>,
}

impl BuildMemo {
    /// For the proxies of cluster `local`.
    pub fn new(local: &str) -> Self {
        BuildMemo {
            local: local.to_string(),
            by_service: HashMap::new(),
            others: HashMap::new(),
        }
    }
}

/// Whether `svc`'s gateway view in cluster `local` is the one made from `old`: the same export
/// from `local` (by pointer; an export that did not change is the same `Arc` from its source
/// on) and the same fields beside the endpoints.
fn same_view(old: &MergedService, svc: &MergedService, local: &str) -> bool {
    let same_export = match (old.export_of(local), svc.export_of(local)) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    same_export
        && old.name == svc.name
        && old.namespace == svc.namespace
        && old.clusterset_ip == svc.clusterset_ip
        && old.ports == svc.ports
        && old.identities == svc.identities
        && old.conditions == svc.conditions
}

/// Whether two builds hold the same resources (names and versions; a version is a digest of
/// the content).
pub fn same_versions(a: &Resources, b: &Resources) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, ra), (kb, rb))| ka == kb && ra.version == rb.version)
}

/// Everything proxies of cluster `local` receive.
pub fn build(
    local: &str,
    merged: &Merged,
    system_services: &[pb::Service],
    gateways: &[pb::Gateway],
    policy: &pb::LocalityPolicy,
    bundles: &[pb::TrustBundle],
    objects: &crate::objects::Checked,
) -> Resources {
    build_with(
        &mut BuildMemo::new(local),
        merged,
        system_services,
        gateways,
        policy,
        bundles,
        objects,
    )
}

/// [`build`], reusing from `memo` the resource of every service that did not change.
pub fn build_with(
    memo: &mut BuildMemo,
    merged: &Merged,
    system_services: &[pb::Service],
    gateways: &[pb::Gateway],
    policy: &pb::LocalityPolicy,
    bundles: &[pb::TrustBundle],
    objects: &crate::objects::Checked,
) -> Resources {
    // Collected, then sorted once, and the map built in one go instead of searched for each of
    // hundreds of inserts: wholes and views each come in name order, so the sort finds the
    // runs and merges them.
    let mut out: Vec<(Key, Arc<Built>)> = Vec::with_capacity(2 * merged.len() + 16);
    let mut views: Vec<(Key, Arc<Built>)> = Vec::with_capacity(merged.len());
    for (key, svc) in merged {
        let (whole, view) = match memo.by_service.get(key) {
            Some(m) if Arc::ptr_eq(&m.made_from, svc) => (m.whole.clone(), m.view.clone()),
            old => {
                let old_parts = old.map(|m| m.parts.as_slice()).unwrap_or_default();
                let parts: Vec<Arc<Part>> = svc
                    .exports
                    .iter()
                    .zip(&svc.clusters)
                    .map(|(e, c)| Part::reuse_or_new(old_parts, svc, c, e))
                    .collect();
                let whole = Arc::new(service_resource(svc, &parts));
                // A view that is, or comes out, as before stays the same `Arc`: gateways'
                // streams skip it by pointer. Most changes are to other clusters' exports,
                // which the view does not hold: it is not encoded again for those.
                let view = match old {
                    Some(m) if same_view(&m.made_from, svc, &memo.local) => m.view.clone(),
                    _ => {
                        let view = local_service_resource(svc, &parts, &memo.local);
                        match old {
                            Some(m) if m.view.version == view.version => m.view.clone(),
                            _ => Arc::new(view),
                        }
                    }
                };
                let m = Memoized {
                    made_from: svc.clone(),
                    parts,
                    whole: whole.clone(),
                    view: view.clone(),
                };
                memo.by_service.insert(key.clone(), m);
                (whole, view)
            }
        };
        out.push((whole.name.clone(), whole));
        views.push((view.name.clone(), view));
    }
    out.append(&mut views);
    memo.by_service.retain(|k, _| merged.contains_key(k));
    let mut others = std::mem::take(&mut memo.others);
    let mut add = |name: String, kind: Kind| {
        let built = match others.remove(&name) {
            Some((was, built)) if was == kind => built,
            _ => Arc::new(resource(name.clone(), kind.clone())),
        };
        out.push((built.name.clone(), built.clone()));
        memo.others.insert(name, (kind, built));
    };
    for s in system_services {
        add(format!("service/{}/{}", s.namespace, s.name), Kind::Service(s.clone()));
    }
    for g in gateways {
        add(format!("gateway/{}", g.cluster), Kind::Gateway(g.clone()));
    }
    for route in &objects.routes {
        let prefix = if route.kind == "GRPCRoute" {
            "grpcroute"
        } else {
            "route"
        };
        add(
            format!("{prefix}/{}/{}", route.namespace, route.name),
            Kind::HttpRoute(route.clone()),
        );
    }
    for p in &objects.policies {
        add(
            format!("trafficpolicy/{}/{}", p.namespace, p.name),
            Kind::TrafficPolicy(p.clone()),
        );
    }
    for p in &objects.authz {
        add(
            format!("authz/{}/{}", p.namespace, p.name),
            Kind::AuthorizationPolicy(p.clone()),
        );
    }
    add("policy/locality".into(), Kind::LocalityPolicy(policy.clone()));
    for b in bundles {
        add(format!("bundle/{}", b.trust_domain), Kind::TrustBundle(b.clone()));
    }
    out.into_iter().collect()
}

/// What changed from the resources last sent to `now`, both seen through `include`:
/// resources to send (shared, not copied) and names removed. One walk over both; a resource
/// rebuilt from an unchanged source is the same `Arc` and is skipped without comparing versions.
pub fn diff<'a>(
    sent: &'a Resources,
    now: &'a Resources,
    include: impl Fn(&str) -> bool,
) -> (Vec<&'a Arc<Built>>, Vec<String>) {
    let mut changed = vec![];
    let mut removed = vec![];
    for (name, before, after) in join(sent, now) {
        // Most resources are the same `Arc` in both: skipped before `include` looks at the name.
        match (before, after) {
            (Some(b), Some(a)) if Arc::ptr_eq(b, a) || b.version == a.version => {}
            (_, Some(a)) if include(name) => changed.push(a),
            (Some(_), None) if include(name) => removed.push(name.to_string()),
            _ => {}
        }
    }
    (changed, removed)
}

/// What a proxy that takes services in parts (`Hello.accepts_endpoint_parts`) is sent for
/// [`diff`]'s result against the resources it was sent before (`sent`): a service whose fields
/// changed (or that is new to it) as its fields and every cluster's endpoints; one whose fields
/// did not, only the clusters' endpoints that changed, and the names of those gone; a service
/// removed, with all of its parts. Every other resource as it is.
pub fn in_parts(sent: &Resources, changed: Vec<&Arc<Built>>, mut removed: Vec<String>) -> (Vec<Bytes>, Vec<String>) {
    let mut out = Vec::with_capacity(changed.len());
    let mut gone = vec![];
    for r in changed {
        let Some(split) = &r.split else {
            out.push(r.wire.clone());
            continue;
        };
        let before = sent.get(&r.name).and_then(|b| b.split.as_deref());
        let fields_same = before.is_some_and(|b| b.head.version == split.head.version);
        if !fields_same {
            out.push(split.head.wire.clone());
        }
        let old = before.map(|b| b.parts.as_slice()).unwrap_or_default();
        // Both in name order: one walk.
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < split.parts.len() {
            match (old.get(i), split.parts.get(j)) {
                (Some(o), Some(n)) if o.name == n.name => {
                    if !fields_same || o.version != n.version {
                        out.push(n.wire.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), None) => {
                    gone.push(o.name.to_string());
                    i += 1;
                }
                (Some(o), Some(n)) if o.name < n.name => {
                    gone.push(o.name.to_string());
                    i += 1;
                }
                (_, Some(n)) => {
                    out.push(n.wire.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
    }
    for name in &removed {
        if let Some(split) = sent.get(name.as_str()).and_then(|b| b.split.as_deref()) {
            gone.extend(split.parts.iter().map(|p| p.name.to_string()));
        }
    }
    removed.append(&mut gone);
    (out, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each export of `svc` as a [`Part`], in `svc.exports` order.
    fn parts(svc: &MergedService) -> Vec<Arc<Part>> {
        svc.exports
            .iter()
            .zip(&svc.clusters)
            .map(|(e, c)| Part::new(svc, c, e))
            .collect()
    }

    fn whole(svc: &MergedService) -> Built {
        service_resource(svc, &parts(svc))
    }

    fn svc(name: &str, port: u32) -> Arc<MergedService> {
        Arc::new(MergedService {
            name: name.into(),
            namespace: "demo".into(),
            clusterset_ip: std::net::Ipv4Addr::new(240, 0, 0, 1),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port,
                protocol: "http".into(),
            }],
            exports: vec![],
            identities: vec![],
            conditions: vec![],
            clusters: vec!["east".into()],
        })
    }

    #[test]
    fn a_service_encoded_from_its_exports_is_what_prost_writes_for_it() {
        let export = |cluster: &str, n: usize| {
            Arc::new(pb::ExportedService {
                endpoints: (0..n)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.0.{i}:8080"),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            zone: "us-east-1a".into(),
                            ..Default::default()
                        }),
                        identity: "spiffe://mesh.local/ns/demo/sa/echo".into(),
                        ready: i % 2 == 0,
                        labels: [("version".to_string(), format!("v{i}"))].into(),
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let mut merged = (*svc("echo", 80)).clone();
        merged.exports = vec![export("east", 3), export("west", 2)];
        merged.clusters = vec!["east".into(), "west".into()];
        merged.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
        merged.conditions = vec![pb::Condition {
            r#type: "Conflict".into(),
            status: "False".into(),
            ..Default::default()
        }];
        let built = whole(&merged);
        let body = pb::Service {
            name: merged.name.clone(),
            namespace: merged.namespace.clone(),
            clusterset_ip: merged.clusterset_ip.to_string(),
            ports: merged.ports.clone(),
            endpoints: merged.endpoints().cloned().collect(),
            conditions: merged.conditions.clone(),
            identities: merged.identities.clone(),
        };
        let mut want = pb::Resource {
            name: "service/demo/echo".into(),
            version: String::new(),
            kind: Some(Kind::Service(body)),
        };
        // Byte for byte prost's encoding, the version appended; and it decodes to the resource.
        let mut bytes = want.encode_to_vec();
        prost::encoding::string::encode(2, &built.version, &mut bytes);
        assert_eq!(built.wire, bytes);
        want.version = built.version.clone();
        assert_eq!(built.decode().unwrap(), want);
        assert_eq!(&*built.name, "service/demo/echo");
        // In parts, as prost writes them too: the service's fields alone, and each cluster's
        // endpoints as a resource of their own, in cluster-name order.
        let prost_bytes = |r: &pb::Resource, version: &String| {
            let mut bytes = pb::Resource {
                version: String::new(),
                ..r.clone()
            }
            .encode_to_vec();
            prost::encoding::string::encode(2, version, &mut bytes);
            bytes
        };
        let split = built
            .split
            .as_deref()
            .expect("a clusterset service is also built in parts");
        let mut head = want.clone();
        if let Some(Kind::Service(s)) = &mut head.kind {
            s.endpoints.clear();
        }
        assert_eq!(split.head.wire, prost_bytes(&head, &split.head.version));
        assert_eq!(&*split.head.name, "service/demo/echo");
        assert_eq!(split.parts.len(), 2);
        for (part, (cluster, export)) in split.parts.iter().zip(merged.clusters.iter().zip(&merged.exports)) {
            let want = pb::Resource {
                name: format!("endpoints/demo/echo/{cluster}"),
                version: part.version.clone(),
                kind: Some(Kind::ServiceEndpoints(pb::ServiceEndpoints {
                    namespace: "demo".into(),
                    name: "echo".into(),
                    cluster: cluster.clone(),
                    endpoints: export.endpoints.clone(),
                })),
            };
            assert_eq!(part.wire, prost_bytes(&want, &part.version));
            assert_eq!(part.decode().unwrap(), want);
            assert_eq!(*part.name, *want.name);
        }
        // The version is the content's: the same service built again has it, a changed one not;
        // a part's changes with its cluster's endpoints alone.
        assert_eq!(whole(&merged).version, built.version);
        let moved = &mut Arc::make_mut(&mut merged.exports[1]).endpoints[0];
        moved.ready = !moved.ready;
        let again = whole(&merged);
        assert_ne!(again.version, built.version);
        let again = again.split.unwrap();
        assert_eq!(again.head, split.head);
        assert_eq!(again.parts[0], split.parts[0]);
        assert_ne!(again.parts[1].version, split.parts[1].version);
    }

    #[test]
    fn a_build_reuses_unchanged_services() {
        let policy = pb::LocalityPolicy::default();
        let mut merged: Merged = BTreeMap::from([("demo/a".into(), svc("a", 80)), ("demo/b".into(), svc("b", 80))]);
        let mut memo = BuildMemo::new("east");
        let objects = Default::default();
        let first = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        merged.insert("demo/b".into(), svc("b", 81));
        let second = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        assert!(Arc::ptr_eq(&first["service/demo/a"], &second["service/demo/a"]));
        assert_ne!(first["service/demo/b"].version, second["service/demo/b"].version);
        // The same content as a build from scratch, version for version.
        let fresh = build("east", &merged, &[], &[], &policy, &[], &objects);
        assert!(same_versions(&second, &fresh));
        assert!(!same_versions(&first, &fresh));
        // Resources besides services too: the same gateway is the same `Arc`, a changed one
        // is built again, and one no longer given is gone.
        let gateway = |reachable| pb::Gateway {
            cluster: "west".into(),
            reachable,
            ..Default::default()
        };
        let third = build_with(&mut memo, &merged, &[], &[gateway(true)], &policy, &[], &objects);
        let fourth = build_with(&mut memo, &merged, &[], &[gateway(true)], &policy, &[], &objects);
        assert!(Arc::ptr_eq(&third["gateway/west"], &fourth["gateway/west"]));
        assert!(Arc::ptr_eq(&third["policy/locality"], &second["policy/locality"]));
        let fifth = build_with(&mut memo, &merged, &[], &[gateway(false)], &policy, &[], &objects);
        assert_ne!(fifth["gateway/west"].version, fourth["gateway/west"].version);
        assert_eq!(
            fifth["gateway/west"],
            build("east", &merged, &[], &[gateway(false)], &policy, &[], &objects)["gateway/west"]
        );
        let sixth = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        assert!(!sixth.contains_key("gateway/west") && !memo.others.contains_key("gateway/west"));
    }

    #[test]
    fn a_change_in_one_clusters_export_encodes_that_export_alone() {
        let export = |cluster: &str, ready: bool| {
            Arc::new(pb::ExportedService {
                endpoints: vec![pb::Endpoint {
                    address: "10.0.0.1:8080".into(),
                    workload: format!("echo-{cluster}"),
                    locality: Some(pb::Locality {
                        cluster: cluster.into(),
                        ..Default::default()
                    }),
                    ready,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let policy = pb::LocalityPolicy::default();
        let objects = Default::default();
        let mut echo = (*svc("echo", 80)).clone();
        echo.exports = vec![export("east", true), export("west", true)];
        echo.clusters = vec!["east".into(), "west".into()];
        let mut merged: Merged = BTreeMap::from([("demo/echo".into(), Arc::new(echo.clone()))]);
        let mut memo = BuildMemo::new("east");
        let first = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        let east_part = memo.by_service["demo/echo"].parts[0].clone();
        echo.exports[1] = export("west", false);
        merged.insert("demo/echo".into(), Arc::new(echo.clone()));
        let second = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        // East's endpoints were not encoded again; the service changed, east's view did not.
        assert!(Arc::ptr_eq(&memo.by_service["demo/echo"].parts[0], &east_part));
        assert_ne!(first["service/demo/echo"].version, second["service/demo/echo"].version);
        assert!(Arc::ptr_eq(
            &first["local/service/demo/echo"],
            &second["local/service/demo/echo"]
        ));
        // Byte for byte and version for version what a build from scratch makes, and back to
        // the first content is back to the first version.
        let fresh = build("east", &merged, &[], &[], &policy, &[], &objects);
        assert_eq!(second["service/demo/echo"], fresh["service/demo/echo"]);
        echo.exports[1] = export("west", true);
        merged.insert("demo/echo".into(), Arc::new(echo));
        let third = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        assert_eq!(third["service/demo/echo"], first["service/demo/echo"]);
    }

    #[test]
    fn diff_sends_only_changes() {
        let policy = pb::LocalityPolicy::default();
        let a = build("east", &BTreeMap::new(), &[], &[], &policy, &[], &Default::default());
        let (changed, removed) = diff(&a, &a, |_| true);
        assert!(changed.is_empty() && removed.is_empty());
        // Scoped out: the same as absent.
        let (changed, removed) = diff(&a, &a, |n| n != "policy/locality");
        assert!(changed.is_empty() && removed.is_empty());
        let policy2 = pb::LocalityPolicy {
            cluster_order: vec!["west".into()],
            ..Default::default()
        };
        let b = build("east", &BTreeMap::new(), &[], &[], &policy2, &[], &Default::default());
        let (changed, removed) = diff(&a, &b, |_| true);
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        let (_, removed) = diff(&a, &BTreeMap::new(), |_| true);
        assert_eq!(removed, vec!["policy/locality".to_string()]);
        // Services on either side of the walk: one gone, one new, one changed, one the same.
        let objects = Default::default();
        let one: Merged = [("a", 80), ("b", 80), ("c", 80)]
            .map(|(n, p)| (format!("demo/{n}").into(), svc(n, p)))
            .into();
        let two: Merged = [("b", 81), ("c", 80), ("d", 80)]
            .map(|(n, p)| (format!("demo/{n}").into(), svc(n, p)))
            .into();
        let before = build("east", &one, &[], &[], &policy, &[], &objects);
        let after = build("east", &two, &[], &[], &policy, &[], &objects);
        let sidecar = |n: &str| !gateway_only(n);
        let (changed, removed) = diff(&before, &after, sidecar);
        let changed: Vec<&str> = changed.iter().map(|r| &*r.name).collect();
        assert_eq!(changed, vec!["service/demo/b", "service/demo/d"]);
        assert_eq!(removed, vec!["service/demo/a".to_string()]);
        let (changed, removed) = diff(&before, &after, |n| {
            sidecar(n) && n != "service/demo/d" && n != "service/demo/a"
        });
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        // A gateway sees the same changes in the services' gateway views.
        let (changed, removed) = diff(&before, &after, |n| !sidecar_only(n));
        let changed: Vec<&str> = changed.iter().map(|r| &*r.name).collect();
        assert_eq!(changed, vec!["local/service/demo/b", "local/service/demo/d"]);
        assert_eq!(removed, vec!["local/service/demo/a".to_string()]);
    }

    #[test]
    fn only_the_mesh_namespace_services_are_for_gateways_alone() {
        assert!(gateway_only(&format!(
            "service/{}/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!gateway_only(&format!(
            "service/{}x/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!gateway_only("service/demo/echo"));
        assert!(!gateway_only(&format!("route/{}/r", strait_api::SYSTEM_NAMESPACE)));
        // Gateways take services in their gateway view, sidecars whole; everything else both.
        assert!(gateway_only("local/service/demo/echo") && !sidecar_only("local/service/demo/echo"));
        assert!(sidecar_only("service/demo/echo"));
        assert!(!sidecar_only(&format!(
            "service/{}/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!sidecar_only("route/demo/r") && !gateway_only("route/demo/r"));
        assert!(is_service("local/service/demo/echo") && is_service("service/demo/echo"));
        assert!(!is_service("local/route/demo/r") && !is_service("gateway/east"));
    }

    #[test]
    fn a_gateway_view_holds_this_clusters_endpoints_and_ignores_changes_elsewhere() {
        let export = |cluster: &str, ready: bool| {
            Arc::new(pb::ExportedService {
                endpoints: (0..3)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.0.{i}:8080"),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            ..Default::default()
                        }),
                        ready,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let mut echo = (*svc("echo", 80)).clone();
        echo.exports = vec![export("east", true), export("west", true)];
        echo.clusters = vec!["east".into(), "west".into()];
        let view = local_service_resource(&echo, &parts(&echo), "west");
        assert_eq!(&*view.name, "local/service/demo/echo");
        let Some(Kind::Service(s)) = view.decode().unwrap().kind else {
            panic!("not a service")
        };
        assert_eq!(s.endpoints.len(), 3);
        assert!(s.endpoints.iter().all(|e| e.workload.starts_with("echo-west-")));
        assert_eq!((s.name.as_str(), s.ports.len()), ("echo", 1));
        // Through builds: east's endpoints change, west's gateway view does not (the same
        // `Arc`), the whole service does.
        let policy = pb::LocalityPolicy::default();
        let objects = Default::default();
        let mut memo = BuildMemo::new("west");
        let mut merged: Merged = BTreeMap::from([("demo/echo".into(), Arc::new(echo.clone()))]);
        let first = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        echo.exports[0] = export("east", false);
        merged.insert("demo/echo".into(), Arc::new(echo.clone()));
        let second = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        assert!(Arc::ptr_eq(
            &first["local/service/demo/echo"],
            &second["local/service/demo/echo"]
        ));
        assert_ne!(first["service/demo/echo"].version, second["service/demo/echo"].version);
        // Builds again with `echo` as it now is: its view must have changed, and the build
        // must equal one from scratch.
        let mut view_changed = |echo: &MergedService, before: &Resources| {
            merged.insert("demo/echo".into(), Arc::new(echo.clone()));
            let now = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
            let view = "local/service/demo/echo";
            assert_ne!(before[view].version, now[view].version);
            assert!(same_versions(
                &now,
                &build("west", &merged, &[], &[], &policy, &[], &objects)
            ));
            now
        };
        // West's own change reaches its gateway.
        echo.exports[1] = export("west", false);
        let third = view_changed(&echo, &second);
        // A field the view holds beside its endpoints (the ports, a union over every cluster's
        // export) changed by east alone: the view is made again although west's export is
        // the same `Arc`.
        echo.ports.push(pb::ServicePort {
            name: "grpc".into(),
            port: 9090,
            protocol: "grpc".into(),
        });
        view_changed(&echo, &third);
    }

    #[test]
    fn a_view_is_the_same_only_for_the_same_local_export_and_fields() {
        let local = Arc::new(pb::ExportedService::default());
        let mut old = (*svc("echo", 80)).clone();
        old.exports = vec![Arc::new(pb::ExportedService::default()), local.clone()];
        old.clusters = vec!["east".into(), "west".into()];
        // East's export replaced: west's view is the same.
        let mut new = old.clone();
        new.exports[0] = Arc::new(pb::ExportedService::default());
        assert!(same_view(&old, &new, "west"));
        assert!(!same_view(&old, &new, "east"), "east's own export is a new Arc");
        // West's replaced by an equal one: looked at again (the version then decides).
        let mut replaced = old.clone();
        replaced.exports[1] = Arc::new(pb::ExportedService::default());
        assert!(!same_view(&old, &replaced, "west"));
        // West stops exporting, or a field beside the endpoints changes.
        let mut gone = old.clone();
        gone.exports.pop();
        gone.clusters.pop();
        assert!(!same_view(&old, &gone, "west"));
        assert!(
            same_view(&gone, &gone.clone(), "west"),
            "no export of west's either way"
        );
        let mut other_ip = old.clone();
        other_ip.clusterset_ip = std::net::Ipv4Addr::new(10, 9, 9, 9);
        assert!(!same_view(&old, &other_ip, "west"));
        let mut other_identities = old.clone();
        other_identities
            .identities
            .push("spiffe://mesh.local/ns/demo/sa/other".into());
        assert!(!same_view(&old, &other_identities, "west"));
    }

    /// A proxy's resources and snapshot, fed updates as the config stream sends them.
    struct Proxy {
        resources: strait_api::snapshot::Resources,
        snapshot: strait_api::snapshot::Snapshot,
        version: u64,
    }

    impl Proxy {
        fn new() -> Self {
            Proxy {
                resources: Default::default(),
                snapshot: Default::default(),
                version: 0,
            }
        }

        fn apply(&mut self, wire: &[Bytes], removed: Vec<String>) {
            self.version += 1;
            let update = pb::ConfigUpdate {
                version: self.version,
                full: self.version == 1,
                resources: wire.iter().map(|b| pb::Resource::decode(b.clone()).unwrap()).collect(),
                removed,
                more: false,
            };
            let (snapshot, rejected) = self.resources.update(&self.snapshot, update);
            assert!(rejected.is_empty(), "{rejected:?}");
            // The snapshot made from the last one is the one made anew.
            let fresh = self.resources.snapshot(self.version);
            assert_eq!(snapshot.services, fresh.services);
            for (addr, svc, i) in fresh.endpoints() {
                let (s, j) = snapshot
                    .endpoint_by_addr(addr.socket())
                    .expect("every endpoint indexed");
                assert!(Arc::ptr_eq(s, svc) && i == j);
            }
            self.snapshot = snapshot;
        }

        /// Each service with its endpoints in address order (the order of clusters differs
        /// between the whole form, oldest export first, and parts, by name).
        fn services(&self) -> Vec<String> {
            self.snapshot
                .services
                .values()
                .map(|s| {
                    let mut endpoints: Vec<String> = s
                        .endpoints
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            format!(
                                "{} ready={} {} {} {}",
                                e.address,
                                e.ready,
                                e.locality().cluster,
                                e.identity(),
                                s.workload(i)
                            )
                        })
                        .collect();
                    endpoints.sort();
                    format!(
                        "{} {:?} {:?} {:?} {endpoints:?}",
                        s.key(),
                        s.clusterset_ip,
                        s.ports,
                        s.identities
                    )
                })
                .collect()
        }
    }

    #[test]
    fn a_proxy_given_services_in_parts_holds_what_one_given_them_whole_holds() {
        let export = |cluster: &str, n: usize, ready: bool| {
            Arc::new(pb::ExportedService {
                identities: vec!["spiffe://mesh.local/ns/demo/sa/echo".into()],
                endpoints: (0..n)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.{}.{i}:8080", cluster.len()),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            ..Default::default()
                        }),
                        identity: format!("spiffe://mesh.local/ns/demo/sa/echo-{cluster}"),
                        ready: ready || i > 0,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let service = |exports: Vec<(&str, Arc<pb::ExportedService>)>, port: u32| {
            let mut s = (*svc("echo", port)).clone();
            s.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
            s.clusters = exports.iter().map(|(c, _)| c.to_string()).collect();
            s.exports = exports.into_iter().map(|(_, e)| e).collect();
            Arc::new(s)
        };
        let other = Arc::new(MergedService {
            exports: vec![export("east", 1, true)],
            ..(*svc("other", 80)).clone()
        });
        // West exported first: the whole form lists west's endpoints first, parts east's.
        let (west, east) = (export("westcluster", 2, true), export("east", 3, true));
        let steps: Vec<Merged> = vec![
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("westcluster", west.clone()), ("east", east.clone())], 80),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // One cluster's endpoints change: east's part alone is sent.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(
                        vec![("westcluster", west.clone()), ("east", export("east", 4, false))],
                        80,
                    ),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // West stops exporting: its part is removed, and so are its endpoints' identities.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("east", export("east", 4, false))], 80),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // West is back and the port changes: the service's fields and every part.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("east", export("east", 4, false)), ("westcluster", west)], 81),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // The service goes, with its parts.
            BTreeMap::from([("demo/other".into(), other)]),
        ];
        let (policy, objects) = (pb::LocalityPolicy::default(), Default::default());
        let (mut whole_proxy, mut parts_proxy) = (Proxy::new(), Proxy::new());
        let mut sent = Resources::new();
        let mut memo = BuildMemo::new("east");
        let (mut sent_in_parts, mut identities) = (vec![], vec![]);
        for merged in &steps {
            let now = build_with(&mut memo, merged, &[], &[], &policy, &[], &objects);
            let sidecar = |name: &str| !gateway_only(name);
            let (changed, removed) = diff(&sent, &now, sidecar);
            let wire: Vec<Bytes> = changed.iter().map(|r| r.wire.clone()).collect();
            whole_proxy.apply(&wire, removed.clone());
            let (wire, removed) = in_parts(&sent, changed, removed);
            let names: Vec<String> = wire
                .iter()
                .map(|b| pb::Resource::decode(b.clone()).unwrap().name)
                .chain(removed.iter().map(|r| format!("-{r}")))
                .collect();
            sent_in_parts.push(names);
            parts_proxy.apply(&wire, removed);
            assert_eq!(parts_proxy.services(), whole_proxy.services());
            identities.push(
                parts_proxy
                    .snapshot
                    .services
                    .get("demo/echo")
                    .map(|s| s.identities.iter().map(|i| i.to_string()).collect::<Vec<_>>()),
            );
            sent = now;
        }
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            sent_in_parts[0],
            names(&[
                "policy/locality",
                "service/demo/echo",
                "endpoints/demo/echo/east",
                "endpoints/demo/echo/westcluster",
                "service/demo/other",
                "endpoints/demo/other/east",
            ])
        );
        assert_eq!(sent_in_parts[1], names(&["endpoints/demo/echo/east"]));
        assert_eq!(sent_in_parts[2], names(&["-endpoints/demo/echo/westcluster"]));
        assert_eq!(
            sent_in_parts[3],
            names(&[
                "service/demo/echo",
                "endpoints/demo/echo/east",
                "endpoints/demo/echo/westcluster"
            ])
        );
        assert_eq!(
            sent_in_parts[4],
            names(&[
                "-service/demo/echo",
                "-endpoints/demo/echo/east",
                "-endpoints/demo/echo/westcluster"
            ])
        );
        // West's endpoints' identity went with them, and came back.
        let west_id = |ids: &Vec<String>| ids.iter().any(|i| i.ends_with("sa/echo-westcluster"));
        assert_eq!(
            identities.iter().map(|i| i.as_ref().map(west_id)).collect::<Vec<_>>(),
            [Some(true), Some(true), Some(false), Some(true), None]
        );
    }
}
