//! A TrafficPolicy's rate limit stated as a total for the destination (`scope: destination`)
//! is enforced by each of the service's sidecars with a share of it. Dividing it equally holds
//! the total only while every endpoint gets at least its equal share of the traffic; callers
//! prefer near endpoints, so that is rarely true across clusters. Here each controller divides
//! the total in proportion to the requests each endpoint receives (every cluster's traffic
//! summary, which peering already carries), and its sidecars get the shares as a resource.
//!
//! Each controller divides from its own view of the summaries, and a new summary reaches the
//! clusters at slightly different times. A share that grows is therefore published only once
//! it has been computed at least that large for [`HOLD`], while a share that shrinks goes out
//! at once: a cluster that sees its own endpoints' demand rise before the others have seen it
//! (and lowered theirs) would otherwise raise its shares while theirs are still high, and the
//! shares across clusters would sum to more than the total until the views agree.
//!
//! Pure logic; the merge loop calls [`RateShares::update`] every pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_api::pb;
use strait_api::traffic::{compile_policy, TargetLookup, TrafficPolicySpec};

use crate::catalog::Merged;

/// A published share moves only when it changed by more than this (a fraction of the total),
/// so sidecars are not sent a new resource for every scrape's noise...
const HYSTERESIS: f64 = 0.03;

/// ...but a published share may exceed what is computed for it by this much at most, so the
/// shares kept across noise never sum to much more than the total.
const OVERSHOOT: f64 = 0.005;

/// The least share an endpoint with no traffic keeps, as a fraction of an equal share, so its
/// first requests are not all refused before the next update.
const FLOOR: f64 = 0.05;

/// How long a share must have been computed at least as large before it grows: longer than
/// two controllers' views of the summaries can differ (a new summary reaches its own merge loop
/// within one refresh and every peer's within a round trip), with room for a busy machine.
pub const HOLD: Duration = Duration::from_secs(4);

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

/// A service's shares as computed over the last [`HOLD`], oldest first, each with its time.
type Computed = VecDeque<(Instant, BTreeMap<String, f64>)>;

/// The shares published to this cluster's sidecars, per service (`<ns>/<name>`).
#[derive(Default)]
pub struct RateShares {
    published: BTreeMap<String, BTreeMap<String, f64>>,
    /// Per service, the shares computed over the last [`HOLD`], oldest first (the oldest was in
    /// effect when the window began).
    computed: BTreeMap<String, Computed>,
    /// `published` as `rateshare/<ns>/<name>` resources, rebuilt only when it changes.
    resources: Vec<Arc<crate::resources::Built>>,
    /// The policies the limits were last read from, and those limits (compiling policies on
    /// every pass of the merge loop would be work for nothing: they rarely change).
    policies: Vec<pb::TrafficPolicy>,
    limits: BTreeMap<String, f64>,
}

impl RateShares {
    /// Recomputes every destination-total rate limit's shares from `policies` (the checked
    /// TrafficPolicies), the merged catalog and every cluster's traffic `summaries`, at `now`.
    /// Returns whether what is published changed.
    pub fn update(
        &mut self,
        policies: &[pb::TrafficPolicy],
        merged: &Merged,
        summaries: &[&pb::TrafficSummary],
        now: Instant,
    ) -> bool {
        if self.policies != policies {
            self.policies = policies.to_vec();
            self.limits = destination_limits(policies);
        }
        let mut next: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        let mut changed = false;
        for (key, limit) in &self.limits {
            let Some(svc) = merged.get(key.as_str()) else { continue };
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
            let held = hold(self.computed.entry(key.clone()).or_default(), fresh, now);
            let chosen = match self.published.remove(key) {
                Some(old)
                    if old.len() == held.len()
                        && old.iter().zip(&held).all(|((k0, v0), (k1, v1))| {
                            k0 == k1 && (v1 - HYSTERESIS..=v1 + OVERSHOOT).contains(v0)
                        }) =>
                {
                    old
                }
                _ => {
                    changed = true;
                    held
                }
            };
            next.insert(key.clone(), chosen);
        }
        // What is left had its limit removed.
        changed |= !self.published.is_empty();
        self.published = next;
        self.computed.retain(|key, _| self.published.contains_key(key));
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

/// Records `fresh` (a service's shares computed at `now`) in `computed` and returns, per
/// endpoint, the least share computed for it over the last [`HOLD`]: a shrink at once, a growth
/// only once it has lasted. Before the first computation the sidecars held equal shares (their
/// fallback), and an endpoint missing from an older computation counts as holding one too.
fn hold(computed: &mut Computed, fresh: BTreeMap<String, f64>, now: Instant) -> BTreeMap<String, f64> {
    let equal = 1.0 / fresh.len().max(1) as f64;
    if computed.is_empty() {
        computed.push_back((now, fresh.keys().map(|k| (k.clone(), equal)).collect()));
    }
    if computed.back().is_some_and(|(_, last)| *last != fresh) {
        computed.push_back((now, fresh.clone()));
    }
    // The oldest kept is the one in effect when the window began.
    while computed
        .get(1)
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HOLD)
    {
        computed.pop_front();
    }
    fresh
        .into_iter()
        .map(|(k, v)| {
            let least = computed
                .iter()
                .map(|(_, shares)| shares.get(&k).copied().unwrap_or(equal))
                .fold(v, f64::min);
            (k, least)
        })
        .collect()
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
        BTreeMap::from([("demo/echo".into(), Arc::new(svc))])
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

    const SPEC: &str = r#"{"targetRefs":[{"group":"multicluster.x-k8s.io","kind":"ServiceImport","name":"echo"}],
                      "rateLimit":{"requestsPerSecond":40,"scope":"destination"}}"#;

    #[test]
    fn shares_follow_every_clusters_traffic_growing_after_the_hold_and_ignore_noise() {
        let policies = vec![policy(SPEC, 1)];
        let merged = catalog(&[
            ("east", "a", true),
            ("east", "b", true),
            ("west", "c", true),
            ("west", "d", false),
        ]);
        let mut shares = RateShares::default();
        let t0 = Instant::now();
        let east = summary(&[("east", "a", 90.0)]);
        let west = summary(&[("west", "c", 10.0)]);
        // Until now the sidecars held equal shares: the shrinking ones go out at once, the
        // growing one stays equal for the hold.
        assert!(shares.update(&policies, &merged, &[&east, &west], t0));
        let body = first(&shares);
        assert_eq!((body.namespace.as_str(), body.name.as_str()), ("demo", "echo"));
        assert!(!body.shares.contains_key("west/d"), "not ready: no share");
        let (a, b, c) = (body.shares["east/a"], body.shares["east/b"], body.shares["west/c"]);
        assert!(
            (a - 1.0 / 3.0).abs() < 1e-9 && b < 0.02 && c < 0.11,
            "{:?}",
            body.shares
        );
        assert!(!shares.update(&policies, &merged, &[&east, &west], t0 + HOLD / 2));
        assert!(shares.update(&policies, &merged, &[&east, &west], t0 + HOLD));
        let body = first(&shares);
        let (a, b, c) = (body.shares["east/a"], body.shares["east/b"], body.shares["west/c"]);
        assert!((a + b + c - 1.0).abs() < 1e-9);
        assert!(a > 0.85 && c > 0.09 && b < 0.02, "{:?}", body.shares);
        // A small move in demand publishes nothing new; a big one does, shrinking at once and
        // growing after the hold.
        let t1 = t0 + HOLD * 2;
        let east = summary(&[("east", "a", 88.0)]);
        assert!(!shares.update(&policies, &merged, &[&east, &west], t1));
        let east = summary(&[("east", "a", 10.0), ("east", "b", 80.0)]);
        assert!(shares.update(&policies, &merged, &[&east, &west], t1));
        let body = first(&shares);
        assert!(
            body.shares["east/a"] < 0.11 && body.shares["east/b"] < 0.02,
            "{:?}",
            body.shares
        );
        assert!(shares.update(&policies, &merged, &[&east, &west], t1 + HOLD));
        assert!(first(&shares).shares["east/b"] > 0.75);
        // Proxy-scoped limits and policies without a limit have no shares.
        let per_proxy = SPEC.replace("destination", "proxy");
        assert!(shares.update(&[policy(&per_proxy, 1)], &merged, &[&east], t1 + HOLD));
        assert_eq!(shares.resources().len(), 0);
    }

    /// Three controllers divide 40/s among echo's endpoints in their clusters, each from its own
    /// view of the summaries: its own reaches its merge loop up to a refresh late, its peers'
    /// a moment after they are made, and each cluster scrapes at its own phase over a sliding
    /// window (so the rates ramp). What the sidecars enforce, each cluster's shares for its own
    /// endpoints, must never sum to more than the total, while the traffic starts, while it all
    /// moves to one endpoint, and after.
    #[test]
    fn the_shares_enforced_across_clusters_never_sum_over_the_total_while_views_differ() {
        const ENDPOINTS: [(&str, &str); 4] = [("east", "a"), ("east", "b"), ("west", "c"), ("central", "d")];
        const CLUSTERS: [&str; 3] = ["east", "west", "central"];
        let merged = catalog(&ENDPOINTS.map(|(c, w)| (c, w, true)));
        let policies = vec![policy(SPEC, 1)];
        // Requests/s arriving at endpoint `i` at second `t`: none, then every endpoint busy,
        // then all of it at east/a.
        let demand = |t: f64, i: usize| match t {
            t if t < 1.0 => 0.0,
            t if t < 30.0 => 160.0,
            _ if i == 0 => 640.0,
            _ => 0.0,
        };
        let step = 0.05;
        // A cluster's summary made at second `at`: the mean rate over the last window.
        let window = crate::clusterset::WINDOW.as_secs_f64();
        let made = |cluster: &str, at: f64| {
            let edges: Vec<(&str, &str, f64)> = ENDPOINTS
                .iter()
                .enumerate()
                .filter(|(_, (c, _))| *c == cluster)
                .map(|(i, (c, w))| {
                    let ticks = (window / step) as usize;
                    let sum: f64 = (0..ticks).map(|k| demand(at - k as f64 * step, i)).sum();
                    (*c, *w, sum / ticks as f64)
                })
                .collect();
            summary(&edges)
        };
        let scrape = crate::clusterset::SCRAPE_EVERY.as_secs_f64();
        let phase = [0.0, 0.7, 1.3];
        // The latest summary of cluster `c` made at or before second `t`.
        let latest = |c: usize, t: f64| {
            let n = ((t - phase[c]) / scrape).floor();
            (n >= 0.0).then(|| made(CLUSTERS[c], phase[c] + n * scrape))
        };
        let (refresh, push) = (0.5, 0.05);
        let t0 = Instant::now();
        let mut controllers: Vec<RateShares> = CLUSTERS.iter().map(|_| RateShares::default()).collect();
        let mut worst: f64 = 0.0;
        let mut at_end = vec![];
        for tick in 0..(60.0 / step) as usize {
            let t = tick as f64 * step;
            let mut enforced = 0.0;
            for (x, shares) in controllers.iter_mut().enumerate() {
                // Each merge loop passes at its own times, every refresh at least.
                if tick % ((refresh / step) as usize) != x {
                    continue;
                }
                let view: Vec<pb::TrafficSummary> = (0..CLUSTERS.len())
                    .filter_map(|c| latest(c, t - if c == x { refresh } else { push }))
                    .collect();
                let view: Vec<&pb::TrafficSummary> = view.iter().collect();
                shares.update(&policies, &merged, &view, t0 + Duration::from_secs_f64(t));
            }
            for (x, shares) in controllers.iter().enumerate() {
                let mine = format!("{}/", CLUSTERS[x]);
                enforced += match shares.resources().first() {
                    Some(_) => first(shares)
                        .shares
                        .iter()
                        .filter(|(k, _)| k.starts_with(&mine))
                        .map(|(_, v)| v)
                        .sum(),
                    None => ENDPOINTS.iter().filter(|(c, _)| *c == CLUSTERS[x]).count() as f64 / 4.0,
                };
            }
            worst = worst.max(enforced);
            if t >= 59.0 {
                at_end.push(enforced);
            }
        }
        let bound = 1.0 + ENDPOINTS.len() as f64 * OVERSHOOT + 1e-9;
        assert!(worst <= bound, "the shares enforced summed to {worst:.3} of the total");
        // Once the views agree, the total is used: east/a holds nearly all of it.
        assert!(at_end.iter().all(|s| (0.97..=bound).contains(s)), "{at_end:?}");
        let a = first(&controllers[0]).shares["east/a"];
        assert!(a > 0.95, "east/a holds {a}");
    }
}
