//! A TrafficPolicy's rate limit stated as a total for the destination (`scope: destination`)
//! is enforced by each of the service's sidecars with a share of it. Dividing it equally holds
//! the total only while every endpoint gets at least its equal share of the traffic; callers
//! prefer near endpoints, so that is rarely true across clusters. Here each controller divides
//! the total in proportion to the requests each endpoint receives (every cluster's traffic
//! summary, which peering already carries), and its sidecars get the shares as a resource.
//!
//! Pure logic; the merge loop calls [`RateShares::update`] every pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use strait_api::pb;
use strait_api::traffic::{compile_policy, TargetLookup, TrafficPolicySpec};

use crate::catalog::Merged;

/// A published share moves only when it changed by more than this (a fraction of the total),
/// so sidecars are not sent a new resource for every scrape's noise.
const HYSTERESIS: f64 = 0.03;

/// The least share an endpoint with no traffic keeps, as a fraction of an equal share, so its
/// first requests are not all refused before the next update.
const FLOOR: f64 = 0.05;

/// Fractions of `limit` requests/s (summing to 1) for endpoints receiving `demand` requests/s
/// each. Under the limit, each gets what it receives plus an equal part of the headroom; over
/// it, the limit is divided in proportion to what each receives (at least [`FLOOR`] of an equal
/// share). No demand at all: equal shares.
pub fn divide(limit: f64, demand: &[f64]) -> Vec<f64> {
    let n = demand.len();
    if n == 0 {
        return vec![];
    }
    let demand: Vec<f64> = demand
        .iter()
        .map(|d| if d.is_finite() { d.max(0.0) } else { 0.0 })
        .collect();
    let total: f64 = demand.iter().sum();
    if total <= 0.0 || limit <= 0.0 || !limit.is_finite() {
        return vec![1.0 / n as f64; n];
    }
    if total < limit {
        let headroom = (limit - total) / n as f64;
        return demand.iter().map(|d| (d + headroom) / limit).collect();
    }
    let floor = FLOOR * limit / n as f64;
    let weights: Vec<f64> = demand.iter().map(|d| d.max(floor)).collect();
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

/// The shares published to this cluster's sidecars, per service (`<ns>/<name>`).
#[derive(Default)]
pub struct RateShares {
    published: BTreeMap<String, BTreeMap<String, f64>>,
    /// `published` as `rateshare/<ns>/<name>` resources, rebuilt only when it changes.
    resources: Vec<Arc<crate::resources::Built>>,
    /// The policies the limits were last read from, and those limits (compiling policies on
    /// every pass of the merge loop would be work for nothing: they rarely change).
    policies: Vec<pb::TrafficPolicy>,
    limits: BTreeMap<String, f64>,
}

impl RateShares {
    /// Recomputes every destination-total rate limit's shares from `policies` (the checked
    /// TrafficPolicies), the merged catalog and every cluster's traffic `summaries`. Returns
    /// whether what is published changed.
    pub fn update(
        &mut self,
        policies: &[pb::TrafficPolicy],
        merged: &Merged,
        summaries: &[&pb::TrafficSummary],
    ) -> bool {
        if self.policies != policies {
            self.policies = policies.to_vec();
            self.limits = destination_limits(policies);
        }
        let mut next: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        let mut changed = false;
        for (key, limit) in &self.limits {
            let Some(svc) = merged.get(key) else { continue };
            let mut endpoints: Vec<String> = svc
                .endpoints()
                .filter(|e| e.ready)
                .map(|e| {
                    let cluster = e.locality.as_ref().map(|l| l.cluster.as_str()).unwrap_or_default();
                    strait_api::snapshot::share_key(cluster, &e.workload)
                })
                .collect();
            endpoints.sort();
            endpoints.dedup();
            // Requests per second arriving at each endpoint, as its cluster's proxies report.
            let host = format!(
                "{}.{}.{}",
                svc.name,
                svc.namespace,
                strait_api::snapshot::CLUSTERSET_SUFFIX
            );
            let mut arriving: HashMap<String, f64> = HashMap::new();
            for e in summaries.iter().flat_map(|s| s.edges.iter()) {
                if e.reporter == "destination" && e.destination_service == host {
                    let at = strait_api::snapshot::share_key(&e.destination_cluster, &e.destination_workload);
                    *arriving.entry(at).or_default() += e.rps;
                }
            }
            let demand: Vec<f64> = endpoints
                .iter()
                .map(|ep| arriving.get(ep).copied().unwrap_or_default())
                .collect();
            let fresh: BTreeMap<String, f64> = endpoints.into_iter().zip(divide(*limit, &demand)).collect();
            let chosen = match self.published.remove(key) {
                Some(old)
                    if old.len() == fresh.len()
                        && old
                            .iter()
                            .zip(&fresh)
                            .all(|((k0, v0), (k1, v1))| k0 == k1 && (v0 - v1).abs() <= HYSTERESIS) =>
                {
                    old
                }
                _ => {
                    changed = true;
                    fresh
                }
            };
            next.insert(key.clone(), chosen);
        }
        // What is left had its limit removed.
        changed |= !self.published.is_empty();
        self.published = next;
        if changed {
            self.resources = self
                .published
                .iter()
                .map(|(key, shares)| Arc::new(resource(key, shares)))
                .collect();
        }
        changed
    }

    /// The published shares as `rateshare/<ns>/<name>` resources.
    pub fn resources(&self) -> &[Arc<crate::resources::Built>] {
        &self.resources
    }
}

fn resource(key: &str, shares: &BTreeMap<String, f64>) -> crate::resources::Built {
    let (namespace, name) = key.split_once('/').unwrap_or_default();
    crate::resources::rate_shares_resource(pb::RateShares {
        namespace: namespace.to_string(),
        name: name.to_string(),
        shares: shares.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    })
}

/// Per service key, the destination-total rate limit (requests/s) that applies to it: the
/// oldest policy's where several name it.
fn destination_limits(policies: &[pb::TrafficPolicy]) -> BTreeMap<String, f64> {
    let mut sorted: Vec<&pb::TrafficPolicy> = policies.iter().filter(|p| p.spec_json.contains("rateLimit")).collect();
    sorted.sort_by(|a, b| (a.created_unix_ms, &a.namespace, &a.name).cmp(&(b.created_unix_ms, &b.namespace, &b.name)));
    let mut out = BTreeMap::new();
    for p in sorted {
        let Ok(spec) = serde_json::from_str::<TrafficPolicySpec>(&p.spec_json) else {
            continue;
        };
        let (Some(compiled), _) = compile_policy(&p.namespace, &p.name, &spec, &|_, _| TargetLookup::Found) else {
            continue;
        };
        let Some(limit) = compiled.rate_limit.filter(|r| r.per_destination) else {
            continue;
        };
        // A route rule's limit is divided by the demand on the rule's parent service.
        for t in &compiled.targets {
            out.entry(format!("{}/{}", t.namespace, t.name))
                .or_insert(limit.per_second);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(endpoints: &[(&str, &str, bool)]) -> Merged {
        let svc = crate::catalog::MergedService {
            name: "echo".into(),
            namespace: "demo".into(),
            clusterset_ip: std::net::Ipv4Addr::new(241, 0, 0, 1),
            ports: vec![],
            exports: vec![Arc::new(pb::ExportedService {
                endpoints: endpoints
                    .iter()
                    .map(|(cluster, workload, ready)| pb::Endpoint {
                        address: "127.0.0.1:1".into(),
                        workload: workload.to_string(),
                        locality: Some(pb::Locality {
                            cluster: cluster.to_string(),
                            ..Default::default()
                        }),
                        identity: String::new(),
                        ready: *ready,
                        labels: Default::default(),
                    })
                    .collect(),
                ..Default::default()
            })],
            identities: vec![],
            conditions: vec![],
            clusters: vec![],
        };
        BTreeMap::from([("demo/echo".to_string(), Arc::new(svc))])
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn the_total_is_divided_by_demand_and_always_sums_to_one() {
        assert!(close(&divide(40.0, &[0.0, 0.0, 0.0, 0.0]), &[0.25; 4]));
        // Under the limit: what each receives plus an equal part of the headroom.
        assert!(close(
            &divide(40.0, &[20.0, 0.0, 0.0, 0.0]),
            &[0.625, 0.125, 0.125, 0.125]
        ));
        // Over it: in proportion, with a floor for the idle ones.
        let s = divide(40.0, &[100.0, 0.0, 0.0, 0.0]);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(s[0] > 0.98 && s[1] > 0.0, "{s:?}");
        assert!(close(&divide(10.0, &[30.0, 10.0]), &[0.75, 0.25]));
        assert!(divide(10.0, &[]).is_empty());
        assert!(close(&divide(10.0, &[f64::NAN, 5.0]), &[0.25, 0.75]));
    }

    fn policy(spec: &str, created: i64) -> pb::TrafficPolicy {
        pb::TrafficPolicy {
            namespace: "demo".into(),
            name: format!("p{created}"),
            spec_json: spec.into(),
            created_unix_ms: created,
            ..Default::default()
        }
    }

    fn summary(edges: &[(&str, &str, f64)]) -> pb::TrafficSummary {
        pb::TrafficSummary {
            edges: edges
                .iter()
                .map(|(cluster, workload, rps)| pb::TrafficEdge {
                    reporter: "destination".into(),
                    destination_cluster: cluster.to_string(),
                    destination_workload: workload.to_string(),
                    destination_service: "echo.demo.svc.clusterset.local".into(),
                    rps: *rps,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn first(shares: &RateShares) -> pb::RateShares {
        match shares.resources()[0].decode().unwrap().kind {
            Some(pb::resource::Kind::RateShares(body)) => body,
            other => panic!("not rate shares: {other:?}"),
        }
    }

    #[test]
    fn shares_follow_every_clusters_traffic_and_ignore_noise() {
        let spec = r#"{"targetRefs":[{"group":"multicluster.x-k8s.io","kind":"ServiceImport","name":"echo"}],
                      "rateLimit":{"requestsPerSecond":40,"scope":"destination"}}"#;
        let policies = vec![policy(spec, 1)];
        let merged = catalog(&[
            ("east", "a", true),
            ("east", "b", true),
            ("west", "c", true),
            ("west", "d", false),
        ]);
        let mut shares = RateShares::default();
        let east = summary(&[("east", "a", 90.0)]);
        let west = summary(&[("west", "c", 10.0)]);
        assert!(shares.update(&policies, &merged, &[&east, &west]));
        let body = first(&shares);
        assert_eq!((body.namespace.as_str(), body.name.as_str()), ("demo", "echo"));
        let (a, b, c) = (body.shares["east/a"], body.shares["east/b"], body.shares["west/c"]);
        assert!(!body.shares.contains_key("west/d"), "not ready: no share");
        assert!((a + b + c - 1.0).abs() < 1e-9);
        assert!(a > 0.85 && c > 0.09 && b < 0.02, "{:?}", body.shares);
        // A small move in demand publishes nothing new; a big one does.
        let east = summary(&[("east", "a", 88.0)]);
        assert!(!shares.update(&policies, &merged, &[&east, &west]));
        let east = summary(&[("east", "a", 10.0), ("east", "b", 80.0)]);
        assert!(shares.update(&policies, &merged, &[&east, &west]));
        assert!(first(&shares).shares["east/b"] > 0.75);
        // Proxy-scoped limits and policies without a limit have no shares.
        let per_proxy = spec.replace("destination", "proxy");
        assert!(shares.update(&[policy(&per_proxy, 1)], &merged, &[&east]));
        assert_eq!(shares.resources().len(), 0);
    }
}
