//! From the merged catalog to the named, versioned resources the config stream carries, and
//! the diff between two such sets. Pure functions.

use std::collections::BTreeMap;

use prost::Message;
use sha2::{Digest, Sha256};
use strait_api::pb;
use strait_api::pb::resource::Kind;

use crate::catalog::MergedService;

/// The full config at one version.
#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    pub version: u64,
    pub resources: BTreeMap<String, pb::Resource>,
    /// False right after a (re)start until every peer has been heard from (or one lease
    /// passed): until then the catalog lacks remote services, and serving it to sidecars would
    /// make them drop endpoints that are fine. Gateways get it at once (peers reach this
    /// controller through them).
    pub warm: bool,
    /// For each resource, the config version at which its current version first went out: a
    /// proxy that acknowledged that version (or a later one) has it.
    pub since: BTreeMap<String, u64>,
}

impl ConfigState {
    /// The `since` map of a new state at `version`, carried over from `previous` for every
    /// resource whose version did not change.
    pub fn since_from(
        previous: &ConfigState,
        resources: &BTreeMap<String, pb::Resource>,
        version: u64,
    ) -> BTreeMap<String, u64> {
        resources
            .iter()
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
    name.starts_with(&format!("service/{}/", strait_api::SYSTEM_NAMESPACE))
}

fn resource(name: String, kind: Kind) -> pb::Resource {
    let mut r = pb::Resource {
        name,
        version: String::new(),
        kind: Some(kind),
    };
    let digest = Sha256::digest(r.encode_to_vec());
    r.version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    r
}

pub fn service_resource(svc: &MergedService) -> pb::Resource {
    resource(
        format!("service/{}/{}", svc.namespace, svc.name),
        Kind::Service(pb::Service {
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
            clusterset_ip: svc.clusterset_ip.to_string(),
            ports: svc.ports.clone(),
            endpoints: svc.endpoints.clone(),
            conditions: svc.conditions.clone(),
            identities: svc.identities.clone(),
        }),
    )
}

/// Everything proxies of this cluster receive.
pub fn build(
    merged: &BTreeMap<String, MergedService>,
    system_services: &[pb::Service],
    gateways: &[pb::Gateway],
    policy: &pb::LocalityPolicy,
    bundles: &[pb::TrustBundle],
    objects: &crate::objects::Checked,
) -> BTreeMap<String, pb::Resource> {
    let mut out = BTreeMap::new();
    for svc in merged.values() {
        let r = service_resource(svc);
        out.insert(r.name.clone(), r);
    }
    for s in system_services {
        let r = resource(format!("service/{}/{}", s.namespace, s.name), Kind::Service(s.clone()));
        out.insert(r.name.clone(), r);
    }
    for g in gateways {
        let r = resource(format!("gateway/{}", g.cluster), Kind::Gateway(g.clone()));
        out.insert(r.name.clone(), r);
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
        out.insert(r.name.clone(), r);
    }
    for p in &objects.policies {
        let r = resource(
            format!("trafficpolicy/{}/{}", p.namespace, p.name),
            Kind::TrafficPolicy(p.clone()),
        );
        out.insert(r.name.clone(), r);
    }
    for p in &objects.authz {
        let r = resource(
            format!("authz/{}/{}", p.namespace, p.name),
            Kind::AuthorizationPolicy(p.clone()),
        );
        out.insert(r.name.clone(), r);
    }
    let r = resource("policy/locality".into(), Kind::LocalityPolicy(policy.clone()));
    out.insert(r.name.clone(), r);
    for b in bundles {
        let r = resource(format!("bundle/{}", b.trust_domain), Kind::TrustBundle(b.clone()));
        out.insert(r.name.clone(), r);
    }
    out
}

/// What changed from `sent` (name → version) to `now`: resources to send and names removed.
pub fn diff(
    sent: &BTreeMap<String, String>,
    now: &BTreeMap<String, pb::Resource>,
    include: impl Fn(&str) -> bool,
) -> (Vec<pb::Resource>, Vec<String>) {
    let changed = now
        .values()
        .filter(|r| include(&r.name) && sent.get(&r.name) != Some(&r.version))
        .cloned()
        .collect();
    let removed = sent
        .keys()
        .filter(|name| !now.contains_key(*name) || !include(name))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sends_only_changes() {
        let policy = pb::LocalityPolicy::default();
        let a = build(&BTreeMap::new(), &[], &[], &policy, &[], &Default::default());
        let sent: BTreeMap<String, String> = a.iter().map(|(k, v)| (k.clone(), v.version.clone())).collect();
        let (changed, removed) = diff(&sent, &a, |_| true);
        assert!(changed.is_empty() && removed.is_empty());
        let policy2 = pb::LocalityPolicy {
            cluster_order: vec!["west".into()],
            ..Default::default()
        };
        let b = build(&BTreeMap::new(), &[], &[], &policy2, &[], &Default::default());
        let (changed, removed) = diff(&sent, &b, |_| true);
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        let (_, removed) = diff(&sent, &BTreeMap::new(), |_| true);
        assert_eq!(removed, vec!["policy/locality".to_string()]);
    }
}
