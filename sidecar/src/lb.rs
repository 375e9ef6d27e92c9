//! The sidecar's balancer: the shared locality algorithm plus this proxy's view of health
//! (readiness from the catalog, passive outlier detection, gateway reachability).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use strait_api::lb::{choose_at, priorities, Candidate, LbPolicy, Outcome, OutlierDetector, ServiceOutlier, Target};
use strait_api::locality::Locality;
use strait_api::snapshot::{EndpointEntry, ServiceEntry, Snapshot};
use strait_gateway::GatewayHealth;

use crate::metrics::SidecarMetrics;

/// The longest a TrafficPolicy's outlier detection ejects an endpoint that keeps failing
/// (its `baseEjectionTime` times the ejections in a row; Envoy's `max_ejection_time`).
const MAX_POLICY_EJECTION: std::time::Duration = std::time::Duration::from_secs(300);

/// This proxy's own workload labels in a config (its endpoint's, as the catalog has them):
/// what `failoverPriority` compares with each endpoint's.
pub type CallerLabels = Arc<dyn Fn(&Snapshot) -> Arc<BTreeMap<String, String>> + Send + Sync>;

pub struct Balancer {
    locality: Locality,
    /// None: no labels (only the locality's topology keys match).
    labels: Option<CallerLabels>,
    outlier: Mutex<OutlierDetector>,
    gateways: GatewayHealth,
    metrics: SidecarMetrics,
    views: Mutex<Views>,
}

/// What a pick needs to know of one service that only the config changes: worked out on the
/// first pick after a config and kept until the next, so a request pays for the endpoints'
/// live health (when anything is ejected or a gateway down) and a draw, not for ranking every
/// endpoint again.
struct View {
    /// Each endpoint's priority level for this caller (0 nearest).
    levels: Vec<u32>,
    /// Each endpoint ready and, if remote, its cluster's gateway reachable by the controller's
    /// word.
    usable: Vec<bool>,
    /// Each remote endpoint's gateway (`None` for a local one).
    gateway: Vec<Option<SocketAddr>>,
    /// The service's locality settings where a TrafficPolicy overrides the mesh's.
    policy: Option<LbPolicy>,
}

/// The views of one config version, by service; each with the entry it was made from (held,
/// so that an entry found at the same address is the same entry).
#[derive(Default)]
struct Views {
    version: u64,
    by_service: HashMap<String, (Arc<ServiceEntry>, Arc<View>)>,
}

impl Balancer {
    /// `gateways` says which remote gateways the tunnel client found down.
    pub fn new(locality: Locality, gateways: GatewayHealth, metrics: SidecarMetrics) -> Self {
        Balancer {
            locality,
            labels: None,
            outlier: Mutex::default(),
            gateways,
            metrics,
            views: Mutex::default(),
        }
    }

    /// Where this proxy's own labels come from (read again for each new config).
    pub fn with_labels(mut self, labels: CallerLabels) -> Self {
        self.labels = Some(labels);
        self
    }

    pub fn locality(&self) -> &Locality {
        &self.locality
    }

    /// `svc`'s view for `snap`: kept for an entry of `snap` itself, made afresh for any other.
    fn view(&self, snap: &Snapshot, svc: &ServiceEntry) -> Arc<View> {
        let key = svc.key();
        let Some(entry) = snap.services.get(&key).filter(|e| std::ptr::eq(&***e, svc)) else {
            return Arc::new(self.make_view(snap, svc));
        };
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.version != snap.version {
            *views = Views {
                version: snap.version,
                by_service: HashMap::new(),
            };
        }
        if let Some((held, view)) = views.by_service.get(&key) {
            if Arc::ptr_eq(held, entry) {
                return view.clone();
            }
        }
        let view = Arc::new(self.make_view(snap, svc));
        views.by_service.insert(key, (entry.clone(), view.clone()));
        view
    }

    fn make_view(&self, snap: &Snapshot, svc: &ServiceEntry) -> View {
        let policy = self.lb_policy(snap, svc);
        let candidates = Self::candidates(svc, None);
        let labels = self.labels.as_ref().map(|own| own(snap)).unwrap_or_default();
        let levels = priorities(
            &self.locality,
            &labels,
            &candidates,
            policy.as_ref().unwrap_or(&snap.policy.lb),
        );
        let (usable, gateway) = svc
            .endpoints
            .iter()
            .map(|ep| {
                if ep.locality().cluster == self.locality.cluster {
                    return (ep.ready, None);
                }
                match snap.gateways.get(&ep.locality().cluster).filter(|g| g.reachable) {
                    Some(g) => (ep.ready, Some(g.address)),
                    None => (false, None),
                }
            })
            .unzip();
        View {
            levels,
            usable,
            gateway,
            policy,
        }
    }

    fn candidates<'a>(svc: &'a ServiceEntry, healthy: Option<&[bool]>) -> Vec<Candidate<'a>> {
        svc.endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| Candidate {
                locality: ep.locality(),
                labels: ep.labels(),
                healthy: healthy.is_none_or(|h| h[i]),
            })
            .collect()
    }

    /// Whether each endpoint may take traffic: usable by the config, its gateway not found
    /// down by the tunnel client, and (unless `outlier` is None: panic routing) neither it nor
    /// its cluster's gateway ejected. While nothing is ejected and no gateway down, the config's
    /// word alone; else each cluster's gateway is judged once, and each endpoint looked up only
    /// while some endpoint is ejected.
    fn health(&self, view: &View, svc: &ServiceEntry, outlier: Option<&OutlierDetector>, now: Instant) -> Vec<bool> {
        if !self.gateways.any_down() && outlier.is_none_or(|o| !o.any_ejected(now)) {
            return view.usable.clone();
        }
        let endpoints_ejected = outlier.is_some_and(|o| o.any_endpoint_ejected(now));
        let mut gateways: Vec<(&str, bool)> = vec![];
        svc.endpoints
            .iter()
            .zip(&view.usable)
            .zip(&view.gateway)
            .map(|((ep, usable), gateway)| {
                if !*usable {
                    return false;
                }
                if let Some(address) = gateway {
                    let cluster = ep.locality().cluster.as_str();
                    let up = match gateways.iter().find(|(c, _)| *c == cluster) {
                        Some((_, up)) => *up,
                        None => {
                            let up = !self.gateways.is_down(*address)
                                && outlier.is_none_or(|o| !o.is_ejected(Target::Gateway(cluster), now));
                            gateways.push((cluster, up));
                            up
                        }
                    };
                    if !up {
                        return false;
                    }
                }
                !(endpoints_ejected && outlier.is_some_and(|o| o.is_ejected(ep.target(), now)))
            })
            .collect()
    }

    /// Picks an endpoint of `svc`, skipping those already tried. When outlier detection has
    /// ejected every ready, reachable endpoint, picks among those anyway (Envoy's panic routing,
    /// counted in `strait_lb_panic_total`) rather than among not-ready ones or unreachable
    /// clusters.
    pub fn pick(&self, snap: &Snapshot, svc: &ServiceEntry, tried: &[usize]) -> Option<usize> {
        let view = self.view(snap, svc);
        let now = Instant::now();
        let mut outlier = self.outlier.lock().ok()?;
        if outlier.prune_due(now) {
            outlier.retain_endpoints(|_, addr| snap.endpoint_by_addr(addr).is_some());
        }
        // A TrafficPolicy's failure percentage is judged here, once per its interval.
        if let Some(rules) = self.rules(snap, svc).filter(|r| r.failure_percentage.is_some()) {
            let targets: Vec<Target<'_>> = svc.endpoints.iter().map(EndpointEntry::target).collect();
            for (i, time) in outlier.sweep(&svc.key(), &targets, now, &rules) {
                self.ejected(svc, &svc.endpoints[i], time, "failure percentage");
            }
        }
        let healthy = self.health(&view, svc, Some(&outlier), now);
        drop(outlier);
        let untried = |flags: &[bool]| flags.iter().enumerate().any(|(i, h)| *h && !tried.contains(&i));
        // A TrafficPolicy's maxEjectionPercent: past it, ejected endpoints take traffic again.
        let max_ejection = snap
            .traffic_policy(svc, None)
            .and_then(|p| p.outlier.as_ref())
            .map(|o| o.max_ejection_percent);
        let healthy = match max_ejection {
            None => healthy,
            Some(max) => {
                let usable = self.health(&view, svc, None, now);
                let total = usable.iter().filter(|u| **u).count();
                let ejected = usable.iter().zip(&healthy).filter(|(u, h)| **u && !**h).count();
                if total > 0 && ejected * 100 > max as usize * total {
                    usable
                } else {
                    healthy
                }
            }
        };
        if untried(&healthy) {
            return self.choose(snap, svc, &view, &healthy, tried);
        }
        let usable = self.health(&view, svc, None, now);
        if untried(&usable) {
            self.metrics.panics.with_label_values(&[&svc.host()]).inc();
        }
        // With nothing usable either, `choose_at` itself falls back to the nearest endpoints.
        self.choose(snap, svc, &view, &usable, tried)
    }

    fn choose(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        view: &View,
        healthy: &[bool],
        tried: &[usize],
    ) -> Option<usize> {
        // A TrafficPolicy's locality settings override the mesh-wide ones for its service.
        choose_at(
            &self.locality,
            &Self::candidates(svc, Some(healthy)),
            &view.levels,
            tried,
            view.policy.as_ref().unwrap_or(&snap.policy.lb),
            rand::random::<f64>(),
            rand::random::<u64>(),
        )
    }

    /// For `strait route explain`: each endpoint's priority level (0 nearest) as this proxy
    /// computes it, and its health: (level, ready, reachable, ejected).
    pub fn levels(&self, snap: &Snapshot, svc: &ServiceEntry) -> Vec<(u32, bool, bool, bool)> {
        let view = self.view(snap, svc);
        let now = Instant::now();
        let Ok(outlier) = self.outlier.lock() else {
            return vec![];
        };
        let (usable, healthy) = (
            self.health(&view, svc, None, now),
            self.health(&view, svc, Some(&outlier), now),
        );
        svc.endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| {
                let reachable = usable[i] || !ep.ready;
                let ejected = ep.ready && reachable && !healthy[i];
                (view.levels[i], ep.ready, reachable, ejected)
            })
            .collect()
    }

    /// A TrafficPolicy's locality settings for `svc`, over the mesh-wide ones.
    fn lb_policy(&self, snap: &Snapshot, svc: &ServiceEntry) -> Option<strait_api::lb::LbPolicy> {
        snap.traffic_policy(svc, None)
            .filter(|p| !p.failover.is_empty() || !p.failover_priority.is_empty())
            .map(|p| {
                let mut lb = snap.policy.lb.clone();
                if !p.failover.is_empty() {
                    lb.failover = p.failover.clone();
                }
                if !p.failover_priority.is_empty() {
                    lb.failover_priority = p.failover_priority.clone();
                }
                lb
            })
    }

    pub fn success(&self, ep: &EndpointEntry) {
        if let Ok(mut o) = self.outlier.lock() {
            o.success(ep.target());
            if ep.locality().cluster != self.locality.cluster {
                o.success(Target::Gateway(&ep.locality().cluster));
            }
        }
    }

    /// A remote cluster's gateway could not be reached: every endpoint behind it is out for
    /// the ejection time, not just the one this request tried.
    pub fn gateway_failure(&self, snap: &Snapshot, cluster: &str) {
        let ejected = self
            .outlier
            .lock()
            .ok()
            .and_then(|mut o| o.failure(Target::Gateway(cluster), Instant::now(), &snap.policy.outlier));
        if let Some(time) = ejected {
            tracing::info!(%cluster, ejection = ?time, "gateway unreachable; its cluster's endpoints are ejected");
        }
    }

    /// A TrafficPolicy's outlierDetection for `svc`, which overrides the mesh-wide settings.
    fn rules(&self, snap: &Snapshot, svc: &ServiceEntry) -> Option<ServiceOutlier> {
        let o = snap.traffic_policy(svc, None)?.outlier.as_ref()?;
        Some(ServiceOutlier {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            interval: o.interval,
            base_ejection: o.base_ejection,
            max_ejection: o.base_ejection.max(MAX_POLICY_EJECTION),
            failure_percentage: o.failure_percentage,
        })
    }

    fn ejected(&self, svc: &ServiceEntry, ep: &EndpointEntry, time: std::time::Duration, why: &str) {
        tracing::info!(endpoint = %ep.key(), service = %svc.host(), ejection = ?time, why, "outlier detection ejected endpoint");
        self.metrics
            .ejections
            .with_label_values(&[&ep.locality().cluster, &svc.host()])
            .inc();
    }

    /// No answer from `ep` (no connection, a reset, a timeout).
    pub fn failure(&self, snap: &Snapshot, svc: &ServiceEntry, ep: &EndpointEntry) {
        self.record(snap, svc, ep, Outcome::Local);
    }

    /// `ep` answered `status`. Without a TrafficPolicy's outlierDetection every answer is a
    /// success (only local failures eject); with one, 5xx answers count as it says.
    pub fn answered(&self, snap: &Snapshot, svc: &ServiceEntry, ep: &EndpointEntry, status: u16) {
        let outcome = if status >= 500 {
            Outcome::Error {
                gateway: (502..=504).contains(&status),
            }
        } else {
            Outcome::Success
        };
        self.record(snap, svc, ep, outcome);
    }

    /// `ep` answered `status`, which a route retries elsewhere: a failure as the service's
    /// outlierDetection counts it, or (without one) as the mesh-wide detection counts a failure.
    pub fn retried(&self, snap: &Snapshot, svc: &ServiceEntry, ep: &EndpointEntry, status: u16) {
        if self.rules(snap, svc).is_some() {
            self.answered(snap, svc, ep, status);
        } else {
            self.failure(snap, svc, ep);
        }
    }

    fn record(&self, snap: &Snapshot, svc: &ServiceEntry, ep: &EndpointEntry, outcome: Outcome) {
        let now = Instant::now();
        let rules = self.rules(snap, svc);
        let Ok(mut o) = self.outlier.lock() else { return };
        let ejected = match (&rules, outcome) {
            (Some(rules), _) => o.record(ep.target(), outcome, now, rules),
            (None, Outcome::Local) => o.failure(ep.target(), now, &snap.policy.outlier),
            (None, _) => {
                o.success(ep.target());
                None
            }
        };
        // Any answer shows the cluster's gateway works.
        if outcome != Outcome::Local && ep.locality().cluster != self.locality.cluster {
            o.success(Target::Gateway(&ep.locality().cluster));
        }
        drop(o);
        if let Some(time) = ejected {
            self.ejected(svc, ep, time, "consecutive failures");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::pb;
    use strait_api::snapshot::Resources;
    use strait_api::testing;

    fn locality(cluster: &str, zone: &str) -> pb::Locality {
        pb::Locality {
            cluster: cluster.into(),
            region: format!("r-{cluster}"),
            zone: zone.into(),
            ..Default::default()
        }
    }

    /// Config `version`: service demo/echo with `endpoints` (cluster, zone, ready) at
    /// 10.0.0.<index + 1>, and cluster c1's gateway.
    fn snapshot(resources: &mut Resources, version: u64, endpoints: &[(&str, &str, bool)]) -> Snapshot {
        let endpoints = endpoints
            .iter()
            .enumerate()
            .map(|(i, (cluster, zone, ready))| pb::Endpoint {
                ready: *ready,
                ..testing::endpoint(
                    &format!("10.0.0.{}:8080", i + 1),
                    &format!("echo-{i}"),
                    locality(cluster, zone),
                )
            })
            .collect();
        let service = testing::http_service("demo", "echo", &version.to_string(), endpoints);
        let gateway = testing::gateway("c1", "127.0.1.2:15443", locality("c1", "c1-a"));
        assert!(resources
            .apply(pb::ConfigUpdate {
                version,
                full: true,
                resources: vec![service, gateway],
                ..Default::default()
            })
            .is_empty());
        resources.snapshot(version)
    }

    /// Which endpoints 300 picks of `svc` went to.
    fn picked(b: &Balancer, snap: &Snapshot, svc: &ServiceEntry) -> std::collections::BTreeSet<usize> {
        (0..300).map(|_| b.pick(snap, svc, &[]).unwrap()).collect()
    }

    #[test]
    fn what_a_config_decides_is_kept_until_the_next_and_live_health_still_counts() {
        let registry = prometheus::Registry::new();
        let caller = Locality {
            cluster: "c0".into(),
            region: "r-c0".into(),
            zone: "c0-a".into(),
            subzone: String::new(),
        };
        let b = Balancer::new(caller, GatewayHealth::default(), SidecarMetrics::new(&registry));
        let mut resources = Resources::default();
        let eps = [
            ("c1", "c1-a", true),
            ("c0", "c0-a", true),
            ("c0", "c0-b", true),
            ("c0", "c0-a", true),
        ];
        let one = snapshot(&mut resources, 1, &eps);
        let svc = one.services["demo/echo"].clone();
        // The caller's zone takes everything while it is healthy; asked again, the same.
        assert_eq!(picked(&b, &one, &svc), [1, 3].into());
        assert_eq!(picked(&b, &one, &svc), [1, 3].into());
        let levels: Vec<u32> = b.levels(&one, &svc).iter().map(|l| l.0).collect();
        assert_eq!(levels, [2, 0, 1, 0]);

        // Config 2: the caller's zone is not ready; the next zone takes over.
        let not_ready = [
            ("c1", "c1-a", true),
            ("c0", "c0-a", false),
            ("c0", "c0-b", true),
            ("c0", "c0-a", false),
        ];
        let two = snapshot(&mut resources, 2, &not_ready);
        let svc2 = two.services["demo/echo"].clone();
        assert_eq!(picked(&b, &two, &svc2), [2].into());
        // Live health: that endpoint fails until ejected, and the other cluster takes over.
        for _ in 0..10 {
            b.failure(&two, &svc2, &svc2.endpoints[2]);
        }
        assert_eq!(picked(&b, &two, &svc2), [0].into());
        let (_, ready, reachable, ejected) = b.levels(&two, &svc2)[2];
        assert!(ready && reachable && ejected);
        // Its cluster's gateway ejected too: nothing is healthy, and panic routing takes the
        // nearest endpoint the config allows (not the ones that are not ready).
        for _ in 0..3 {
            b.gateway_failure(&two, "c1");
        }
        assert_eq!(picked(&b, &two, &svc2), [2].into());
        let (_, ready, reachable, ejected) = b.levels(&two, &svc2)[0];
        assert!(ready && reachable && ejected);

        // An entry not of the config (here: the endpoints reversed) is judged on its own.
        let mut reversed = (*svc).clone();
        reversed.endpoints.reverse();
        assert_eq!(picked(&b, &one, &reversed), [0, 2].into());
        // The config before is still answered rightly (its view made again).
        assert_eq!(picked(&b, &one, &svc), [1, 3].into());
    }

    #[test]
    fn failover_priority_compares_the_callers_own_labels() {
        let caller = Locality {
            cluster: "c0".into(),
            region: "r-c0".into(),
            zone: "c0-a".into(),
            subzone: String::new(),
        };
        let endpoints = ["v1", "v2", "v1"]
            .iter()
            .enumerate()
            .map(|(i, version)| pb::Endpoint {
                labels: [("version".to_string(), version.to_string())].into(),
                ..testing::endpoint(
                    &format!("10.0.0.{}:8080", i + 1),
                    &format!("echo-{i}"),
                    locality("c0", "c0-a"),
                )
            })
            .collect();
        let policy = pb::Resource {
            name: "policy/locality".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::LocalityPolicy(pb::LocalityPolicy {
                failover_priority: vec!["version".into()],
                ..Default::default()
            })),
        };
        let mut resources = Resources::default();
        assert!(resources
            .apply(pb::ConfigUpdate {
                version: 1,
                full: true,
                resources: vec![testing::http_service("demo", "echo", "1", endpoints), policy],
                ..Default::default()
            })
            .is_empty());
        let snap = resources.snapshot(1);
        let svc = snap.services["demo/echo"].clone();
        let balancer = |labels: Option<CallerLabels>| {
            let b = Balancer::new(
                caller.clone(),
                GatewayHealth::default(),
                SidecarMetrics::new(&prometheus::Registry::new()),
            );
            match labels {
                Some(l) => b.with_labels(l),
                None => b,
            }
        };
        // Without its own labels the caller matches no endpoint's version: all alike.
        assert_eq!(picked(&balancer(None), &snap, &svc), [0, 1, 2].into());
        // A v2 caller prefers the v2 endpoint.
        let v2: CallerLabels = Arc::new(|_: &Snapshot| Arc::new([("version".to_string(), "v2".to_string())].into()));
        assert_eq!(picked(&balancer(Some(v2)), &snap, &svc), [1].into());
    }
}
