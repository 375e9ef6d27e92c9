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

/// One cluster's export of a service, encoded as the endpoints of a `pb::Service` (field 5,
/// repeated) with a digest of those bytes. Made once per export and kept by [`BuildMemo`]
/// while the export is the same `Arc`: a change in one cluster encodes and hashes that
/// cluster's endpoints, not every cluster's (it was most of a controller's work under churn).
struct Part {
    export: Arc<pb::ExportedService>,
    wire: Vec<u8>,
    digest: [u8; 32],
}

impl Part {
    fn new(export: &Arc<pb::ExportedService>) -> Arc<Part> {
        let len = export
            .endpoints
            .iter()
            .map(|e| prost::encoding::message::encoded_len(SERVICE_ENDPOINTS, e))
            .sum();
        let mut wire = Vec::with_capacity(len);
        for e in &export.endpoints {
            prost::encoding::message::encode(SERVICE_ENDPOINTS, e, &mut wire);
        }
        let digest = Sha256::digest(&wire).into();
        Arc::new(Part {
            export: export.clone(),
            wire,
            digest,
        })
    }

    /// The part of `export` in `old` (by pointer), or a new one.
    fn reuse_or_new(old: &[Arc<Part>], export: &Arc<pb::ExportedService>) -> Arc<Part> {
        old.iter()
            .find(|p| Arc::ptr_eq(&p.export, export))
            .cloned()
            .unwrap_or_else(|| Part::new(export))
    }
}

/// `service/<ns>/<name>`, encoded straight from the merged service: its endpoints are written
/// from the parts of the exports that hold them (`parts`, in `svc.exports` order), not copied
/// into a `pb::Service` first. The same fields as a `pb::Service` made from it, in the same
/// order.
fn service_resource(svc: &MergedService, parts: &[Arc<Part>]) -> Built {
    encode_service(format!("service/{}/{}", svc.namespace, svc.name), svc, parts)
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
    let endpoints: usize = parts.iter().map(|p| p.wire.len()).sum();
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
        buf.extend_from_slice(&p.wire);
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
                let parts: Vec<Arc<Part>> = svc.exports.iter().map(|e| Part::reuse_or_new(old_parts, e)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each export of `svc` as a [`Part`], in `svc.exports` order.
    fn parts(svc: &MergedService) -> Vec<Arc<Part>> {
        svc.exports.iter().map(Part::new).collect()
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
        // The version is the content's: the same service built again has it, a changed one not.
        assert_eq!(whole(&merged).version, built.version);
        let moved = &mut Arc::make_mut(&mut merged.exports[1]).endpoints[0];
        moved.ready = !moved.ready;
        assert_ne!(whole(&merged).version, built.version);
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
}
