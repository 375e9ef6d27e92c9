//! The sidecar's balancer: the shared locality algorithm plus this proxy's view of health
//! (readiness from the catalog, passive outlier detection, gateway reachability).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use strait_api::lb::{choose, Candidate, OutlierDetector};
use strait_api::locality::Locality;
use strait_api::snapshot::{EndpointEntry, ServiceEntry, Snapshot};
use strait_gateway::GatewayHealth;

use crate::metrics::SidecarMetrics;

fn gateway_key(cluster: &str) -> String {
    format!("gateway/{cluster}")
}

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
        let local = ep.locality.cluster == self.locality.cluster;
        let reachable = local
            || snap
                .gateways
                .get(&ep.locality.cluster)
                .is_some_and(|g| g.reachable && !self.gateways.is_down(g.address));
        if !ep.ready || !reachable {
            return false;
        }
        outlier.is_none_or(|o| {
            !o.is_ejected(&ep.key, now) && (local || !o.is_ejected(&gateway_key(&ep.locality.cluster), now))
        })
    }

    /// Picks an endpoint of `svc`, skipping those already tried. When outlier detection has
    /// ejected every ready, reachable endpoint, picks among those anyway (Envoy's panic routing,
    /// counted in `strait_lb_panic_total`) rather than among not-ready ones or unreachable
    /// clusters.
    pub fn pick(&self, snap: &Snapshot, svc: &ServiceEntry, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let outlier = self.outlier.lock().ok()?;
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
                locality: &ep.locality,
                labels: &ep.labels,
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
                locality: &ep.locality,
                labels: &ep.labels,
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

    /// Whether an answer with `status` is a failure for outlier detection: a TrafficPolicy's
    /// `consecutive5xxErrors` counts every 5xx, `consecutiveGatewayErrors` 502, 503 and 504.
    pub fn counts_as_failure(&self, snap: &Snapshot, svc: &ServiceEntry, status: u16) -> bool {
        snap.traffic_policy(svc, None)
            .and_then(|p| p.outlier.as_ref())
            .is_some_and(|o| {
                (o.consecutive_5xx > 0 && status >= 500) || (o.consecutive_gateway > 0 && (502..=504).contains(&status))
            })
    }

    pub fn success(&self, ep: &EndpointEntry) {
        if let Ok(mut o) = self.outlier.lock() {
            o.success(&ep.key);
            if ep.locality.cluster != self.locality.cluster {
                o.success(&gateway_key(&ep.locality.cluster));
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
            .and_then(|mut o| o.failure(&gateway_key(cluster), Instant::now(), &snap.policy.outlier));
        if let Some(time) = ejected {
            tracing::info!(%cluster, ejection = ?time, "gateway unreachable; its cluster's endpoints are ejected");
        }
    }

    pub fn failure(&self, snap: &Snapshot, svc: &ServiceEntry, ep: &EndpointEntry) {
        // A TrafficPolicy's outlierDetection overrides the mesh-wide settings for its service.
        let own = snap
            .traffic_policy(svc, None)
            .and_then(|p| p.outlier.as_ref())
            .map(|o| {
                let consecutive = match o.consecutive_gateway {
                    0 => o.consecutive_5xx,
                    g => g.min(o.consecutive_5xx.max(1)),
                };
                strait_api::lb::OutlierConfig {
                    consecutive_errors: consecutive.max(1),
                    base_ejection: o.base_ejection,
                    max_ejection: o.base_ejection.max(snap.policy.outlier.max_ejection),
                }
            });
        let config = own.as_ref().unwrap_or(&snap.policy.outlier);
        let ejected = self
            .outlier
            .lock()
            .ok()
            .and_then(|mut o| o.failure(&ep.key, Instant::now(), config));
        if let Some(time) = ejected {
            tracing::info!(endpoint = %ep.key, service = %svc.host(), ejection = ?time, "outlier detection ejected endpoint");
            self.metrics
                .ejections
                .with_label_values(&[&ep.locality.cluster, &svc.host()])
                .inc();
        }
    }
}
