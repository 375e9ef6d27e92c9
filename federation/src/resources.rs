//! From the merged catalog to the named, versioned resources the config stream carries, and
//! the diff between two such sets. Pure functions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use strait_api::pb;
use strait_api::pb::resource::Kind;

use crate::catalog::{join, Merged, MergedService};

/// The full config at one version.
#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    pub version: u64,
    pub resources: BTreeMap<String, Arc<Built>>,
    /// False right after a (re)start until every peer has been heard from (or one lease
    /// passed): until then the catalog lacks remote services, and serving it to sidecars would
    /// make them drop endpoints that are fine. Gateways get it at once (peers reach this
    /// controller through them).
    pub warm: bool,
    /// For each resource but services (the bulk of the config, and not objects with a status),
    /// the config version at which its current version first went out: a proxy that
    /// acknowledged that version (or a later one) has it.
    pub since: BTreeMap<String, u64>,
}

impl ConfigState {
    /// The `since` map of a new state at `version`, carried over from `previous` for every
    /// resource whose version did not change.
    pub fn since_from(
        previous: &ConfigState,
        resources: &BTreeMap<String, Arc<Built>>,
        version: u64,
    ) -> BTreeMap<String, u64> {
        resources
            .iter()
            .filter(|(k, _)| !k.starts_with("service/"))
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

/// Resources only gateways receive (the controller's own peering service).
pub fn gateway_only(name: &str) -> bool {
    name.strip_prefix("service/")
        .and_then(|rest| rest.strip_prefix(strait_api::SYSTEM_NAMESPACE))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// A resource as the config stream sends it: its name, its version (a digest of its content)
/// and its encoding as a `pb::Resource`, made once when it is built and shared by every
/// proxy's stream. The controller keeps nothing else of it: the decoded form (a service's
/// endpoints above all) was a copy of what the merge already holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    pub name: String,
    pub version: String,
    pub wire: Bytes,
}

impl Built {
    /// `buf` is the resource encoded without a version (its name and kind): the version is a
    /// digest of those bytes, appended as `Resource.version` (a field may come in any order).
    fn finish(name: String, mut buf: Vec<u8>) -> Built {
        let digest = Sha256::digest(&buf);
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
    Built::finish(r.name, buf)
}

/// `rateshare/<ns>/<name>`: a destination-total rate limit's shares for its sidecars.
pub fn rate_shares_resource(body: pb::RateShares) -> Built {
    resource(
        format!("rateshare/{}/{}", body.namespace, body.name),
        Kind::RateShares(body),
    )
}

/// `service/<ns>/<name>`, encoded straight from the merged service: its endpoints are written
/// from the exports that hold them, not copied into a `pb::Service` first. The same fields as
/// a `pb::Service` made from it, in the same order.
pub fn service_resource(svc: &MergedService) -> Built {
    use prost::encoding::{encode_key, encode_varint, message, string, WireType};
    let name = format!("service/{}/{}", svc.namespace, svc.name);
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
    let endpoints: usize = svc
        .endpoints()
        .map(|e| message::encoded_len(SERVICE_ENDPOINTS, e))
        .sum();
    let body = head.encoded_len() + endpoints + tail.encoded_len();
    let mut buf = Vec::with_capacity(name.len() + body + 48);
    string::encode(RESOURCE_NAME, &name, &mut buf);
    encode_key(RESOURCE_SERVICE, WireType::LengthDelimited, &mut buf);
    encode_varint(body as u64, &mut buf);
    head.encode(&mut buf).expect("a Vec grows to fit");
    for e in svc.endpoints() {
        message::encode(SERVICE_ENDPOINTS, e, &mut buf);
    }
    tail.encode(&mut buf).expect("a Vec grows to fit");
    Built::finish(name, buf)
}

/// Each service's resource from the last build, by the merged service it was made from: an
/// unchanged service (the same `Arc`) is not encoded and hashed again.
#[derive(Default)]
pub struct BuildMemo {
    by_service: HashMap<String, (Arc<MergedService>, Arc<Built>)>,
}

/// Whether two builds hold the same resources (names and versions; a version is a digest of
/// the content).
pub fn same_versions(a: &BTreeMap<String, Arc<Built>>, b: &BTreeMap<String, Arc<Built>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, ra), (kb, rb))| ka == kb && ra.version == rb.version)
}

/// Everything proxies of this cluster receive.
pub fn build(
    merged: &Merged,
    system_services: &[pb::Service],
    gateways: &[pb::Gateway],
    policy: &pb::LocalityPolicy,
    bundles: &[pb::TrustBundle],
    objects: &crate::objects::Checked,
) -> BTreeMap<String, Arc<Built>> {
    build_with(
        &mut BuildMemo::default(),
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
) -> BTreeMap<String, Arc<Built>> {
    let mut out = BTreeMap::new();
    for (key, svc) in merged {
        let r = match memo.by_service.get(key) {
            Some((made_from, r)) if Arc::ptr_eq(made_from, svc) => r.clone(),
            _ => {
                let r = Arc::new(service_resource(svc));
                memo.by_service.insert(key.clone(), (svc.clone(), r.clone()));
                r
            }
        };
        out.insert(r.name.clone(), r);
    }
    memo.by_service.retain(|k, _| merged.contains_key(k));
    for s in system_services {
        let r = resource(format!("service/{}/{}", s.namespace, s.name), Kind::Service(s.clone()));
        out.insert(r.name.clone(), Arc::new(r));
    }
    for g in gateways {
        let r = resource(format!("gateway/{}", g.cluster), Kind::Gateway(g.clone()));
        out.insert(r.name.clone(), Arc::new(r));
    }
    for route in &objects.routes {
        let prefix = if route.kind == "GRPCRoute" {
            "grpcroute"
        } else {
            "route"
        };
        let r = resource(
            format!("{prefix}/{}/{}", route.namespace, route.name),
            Kind::HttpRoute(route.clone()),
        );
        out.insert(r.name.clone(), Arc::new(r));
    }
    for p in &objects.policies {
        let r = resource(
            format!("trafficpolicy/{}/{}", p.namespace, p.name),
            Kind::TrafficPolicy(p.clone()),
        );
        out.insert(r.name.clone(), Arc::new(r));
    }
    for p in &objects.authz {
        let r = resource(
            format!("authz/{}/{}", p.namespace, p.name),
            Kind::AuthorizationPolicy(p.clone()),
        );
        out.insert(r.name.clone(), Arc::new(r));
    }
    let r = resource("policy/locality".into(), Kind::LocalityPolicy(policy.clone()));
    out.insert(r.name.clone(), Arc::new(r));
    for b in bundles {
        let r = resource(format!("bundle/{}", b.trust_domain), Kind::TrustBundle(b.clone()));
        out.insert(r.name.clone(), Arc::new(r));
    }
    out
}

/// What changed from the resources last sent to `now`, both seen through `include`:
/// resources to send (shared, not copied) and names removed. One walk over both; a resource
/// rebuilt from an unchanged source is the same `Arc` and is skipped without comparing versions.
pub fn diff<'a>(
    sent: &'a BTreeMap<String, Arc<Built>>,
    now: &'a BTreeMap<String, Arc<Built>>,
    include: impl Fn(&str) -> bool,
) -> (Vec<&'a Arc<Built>>, Vec<String>) {
    let mut changed = vec![];
    let mut removed = vec![];
    for (name, before, after) in join(sent, now) {
        if !include(name) {
            continue;
        }
        match (before, after) {
            (Some(b), Some(a)) if Arc::ptr_eq(b, a) || b.version == a.version => {}
            (_, Some(a)) => changed.push(a),
            (Some(_), None) => removed.push(name.clone()),
            (None, None) => {}
        }
    }
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        merged.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
        merged.conditions = vec![pb::Condition {
            r#type: "Conflict".into(),
            status: "False".into(),
            ..Default::default()
        }];
        let built = service_resource(&merged);
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
        assert_eq!(built.name, "service/demo/echo");
        // The version is the content's: the same service built again has it, a changed one not.
        assert_eq!(service_resource(&merged).version, built.version);
        let moved = &mut Arc::make_mut(&mut merged.exports[1]).endpoints[0];
        moved.ready = !moved.ready;
        assert_ne!(service_resource(&merged).version, built.version);
    }

    #[test]
    fn a_build_reuses_unchanged_services() {
        let policy = pb::LocalityPolicy::default();
        let mut merged: Merged = BTreeMap::from([("demo/a".into(), svc("a", 80)), ("demo/b".into(), svc("b", 80))]);
        let mut memo = BuildMemo::default();
        let objects = Default::default();
        let first = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        merged.insert("demo/b".into(), svc("b", 81));
        let second = build_with(&mut memo, &merged, &[], &[], &policy, &[], &objects);
        assert!(Arc::ptr_eq(&first["service/demo/a"], &second["service/demo/a"]));
        assert_ne!(first["service/demo/b"].version, second["service/demo/b"].version);
        // The same content as a build from scratch, version for version.
        let fresh = build(&merged, &[], &[], &policy, &[], &objects);
        assert!(same_versions(&second, &fresh));
        assert!(!same_versions(&first, &fresh));
    }

    #[test]
    fn diff_sends_only_changes() {
        let policy = pb::LocalityPolicy::default();
        let a = build(&BTreeMap::new(), &[], &[], &policy, &[], &Default::default());
        let (changed, removed) = diff(&a, &a, |_| true);
        assert!(changed.is_empty() && removed.is_empty());
        // Scoped out: the same as absent.
        let (changed, removed) = diff(&a, &a, |n| n != "policy/locality");
        assert!(changed.is_empty() && removed.is_empty());
        let policy2 = pb::LocalityPolicy {
            cluster_order: vec!["west".into()],
            ..Default::default()
        };
        let b = build(&BTreeMap::new(), &[], &[], &policy2, &[], &Default::default());
        let (changed, removed) = diff(&a, &b, |_| true);
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        let (_, removed) = diff(&a, &BTreeMap::new(), |_| true);
        assert_eq!(removed, vec!["policy/locality".to_string()]);
        // Services on either side of the walk: one gone, one new, one changed, one the same.
        let objects = Default::default();
        let one: Merged = [("a", 80), ("b", 80), ("c", 80)]
            .map(|(n, p)| (format!("demo/{n}"), svc(n, p)))
            .into();
        let two: Merged = [("b", 81), ("c", 80), ("d", 80)]
            .map(|(n, p)| (format!("demo/{n}"), svc(n, p)))
            .into();
        let before = build(&one, &[], &[], &policy, &[], &objects);
        let after = build(&two, &[], &[], &policy, &[], &objects);
        let (changed, removed) = diff(&before, &after, |_| true);
        let changed: Vec<&str> = changed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(changed, vec!["service/demo/b", "service/demo/d"]);
        assert_eq!(removed, vec!["service/demo/a".to_string()]);
        let (changed, removed) = diff(&before, &after, |n| n != "service/demo/d" && n != "service/demo/a");
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
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
    }
}
