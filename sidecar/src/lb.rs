//! The sidecar's balancer: the shared locality algorithm plus this proxy's view of health
//! (readiness from the catalog, passive outlier detection, gateway reachability).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use strait_api::lb::{choose, Candidate, Outcome, OutlierDetector, ServiceOutlier, Target};
use strait_api::locality::Locality;
use strait_api::snapshot::{EndpointEntry, ServiceEntry, Snapshot};
use strait_gateway::GatewayHealth;

use crate::metrics::SidecarMetrics;

/// The longest a TrafficPolicy's outlier detection ejects an endpoint that keeps failing
/// (its `baseEjectionTime` times the ejections in a row; Envoy's `max_ejection_time`).
const MAX_POLICY_EJECTION: std::time::Duration = std::time::Duration::from_secs(300);

pub struct Balancer {
    locality: Locality,
    labels: BTreeMap<String, String>,
    outlier: Mutex<OutlierDetector>,
    gateways: GatewayHealth,
    metrics: SidecarMetrics,
}

impl Balancer {
    /// `gateways` says which remote gateways the tunnel client found down.
    pub fn new(locality: Locality, gateways: GatewayHealth, metrics: SidecarMetrics) -> Self {
        Balancer {
            locality,
            labels: BTreeMap::new(),
            outlier: Mutex::default(),
            gateways,
            metrics,
        }
    }

    pub fn locality(&self) -> &Locality {
        &self.locality
    }

    /// Whether `ep` may take traffic: ready, its cluster reachable (the controller says so and
    /// the tunnel client has not found its gateway down), and (unless `outlier` is None: panic
    /// routing) neither it nor its cluster's gateway ejected.
    fn healthy(&self, snap: &Snapshot, ep: &EndpointEntry, outlier: Option<&OutlierDetector>, now: Instant) -> bool {
        let local = ep.locality().cluster == self.locality.cluster;
        let reachable = local
            || snap
                .gateways
                .get(&ep.locality().cluster)
                .is_some_and(|g| g.reachable && !self.gateways.is_down(g.address));
        if !ep.ready || !reachable {
            return false;
        }
        outlier.is_none_or(|o| {
            !o.is_ejected(ep.target(), now) && (local || !o.is_ejected(Target::Gateway(&ep.locality().cluster), now))
        })
    }

    /// Picks an endpoint of `svc`, skipping those already tried. When outlier detection has
    /// ejected every ready, reachable endpoint, picks among those anyway (Envoy's panic routing,
    /// counted in `strait_lb_panic_total`) rather than among not-ready ones or unreachable
    /// clusters.
    pub fn pick(&self, snap: &Snapshot, svc: &ServiceEntry, tried: &[usize]) -> Option<usize> {
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
        let healthy: Vec<bool> = svc
            .endpoints
            .iter()
            .map(|ep| self.healthy(snap, ep, Some(&outlier), now))
            .collect();
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
                let usable: Vec<bool> = svc
                    .endpoints
                    .iter()
                    .map(|ep| self.healthy(snap, ep, None, now))
                    .collect();
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
            return self.choose(snap, svc, &healthy, tried);
        }
        let usable: Vec<bool> = svc
            .endpoints
            .iter()
            .map(|ep| self.healthy(snap, ep, None, now))
            .collect();
        if untried(&usable) {
            self.metrics.panics.with_label_values(&[&svc.host()]).inc();
        }
        // With nothing usable either, `choose` itself falls back to the nearest endpoints.
        self.choose(snap, svc, &usable, tried)
    }

    fn choose(&self, snap: &Snapshot, svc: &ServiceEntry, healthy: &[bool], tried: &[usize]) -> Option<usize> {
        let candidates: Vec<Candidate<'_>> = svc
            .endpoints
            .iter()
            .zip(healthy)
            .map(|(ep, h)| Candidate {
                locality: ep.locality(),
                labels: ep.labels(),
                healthy: *h,
            })
            .collect();
        // A TrafficPolicy's locality settings override the mesh-wide ones for its service.
        let overridden = self.lb_policy(snap, svc);
        choose(
            &self.locality,
            &self.labels,
            &candidates,
            tried,
            overridden.as_ref().unwrap_or(&snap.policy.lb),
            rand::random::<f64>(),
            rand::random::<u64>(),
        )
    }

    /// For `strait route explain`: each endpoint's priority level (0 nearest) as this proxy
    /// computes it, and its health: (level, ready, reachable, ejected).
    pub fn levels(&self, snap: &Snapshot, svc: &ServiceEntry) -> Vec<(u32, bool, bool, bool)> {
        let now = Instant::now();
        let Ok(outlier) = self.outlier.lock() else {
            return vec![];
        };
        let candidates: Vec<Candidate<'_>> = svc
            .endpoints
            .iter()
            .map(|ep| Candidate {
                locality: ep.locality(),
                labels: ep.labels(),
                healthy: true,
            })
            .collect();
        let policy = self.lb_policy(snap, svc);
        let levels = strait_api::lb::priorities(
            &self.locality,
            &self.labels,
            &candidates,
            policy.as_ref().unwrap_or(&snap.policy.lb),
        );
        svc.endpoints
            .iter()
            .zip(levels)
            .map(|(ep, level)| {
                let reachable = self.healthy(snap, ep, None, now) || !ep.ready;
                let ejected = ep.ready && reachable && !self.healthy(snap, ep, Some(&outlier), now);
                (level, ep.ready, reachable, ejected)
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
