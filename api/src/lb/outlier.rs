//! Passive outlier detection: endpoints that fail are ejected for a while, longer each time.
//!
//! Two ways to be ejected, as in Envoy: consecutive failures (decided at each answer), and a
//! failure percentage over an interval (decided at each interval's sweep, per service).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint. Connect failures count like any other.
    pub consecutive_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    /// On by default, so failover never depends on a setting the user forgot.
    fn default() -> Self {
        OutlierConfig {
            consecutive_errors: 1,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(15),
        }
    }
}

/// A service's own outlier detection (a TrafficPolicy's `outlierDetection`), Envoy semantics:
/// a local failure (no connection, reset, timeout) counts as a gateway error and as a 5xx.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceOutlier {
    /// Consecutive 5xx answers that eject; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive 502, 503 and 504 answers (and local failures) that eject; 0: off.
    pub consecutive_gateway: u32,
    /// How often the failure percentage is judged.
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub failure_percentage: Option<FailurePercentage>,
}

/// Envoy's failure-percentage ejection: at each interval, an endpoint that took at least
/// `request_volume` requests, of which at least `threshold` % failed, is ejected, provided at
/// least `minimum_hosts` endpoints of the service took that many requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailurePercentage {
    pub threshold: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

/// How one attempt ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not a failure.
    Success,
    /// A 5xx answer; `gateway` for 502, 503 and 504.
    Error { gateway: bool },
    /// No answer: no connection, a reset, a timeout.
    Local,
}

#[derive(Debug, Default)]
struct State {
    consecutive: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// Requests and failures since the last sweep of this endpoint's service.
    requests: u32,
    failures: u32,
}

impl State {
    fn eject(&mut self, now: Instant, base: Duration, max: Duration) -> Duration {
        self.ejections += 1;
        self.consecutive = 0;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        let time = (base * self.ejections).min(max.max(base));
        self.ejected_until = Some(now + time);
        time
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// What outlier detection judges: an endpoint (its cluster and address: addresses are only
/// unique within a cluster) or a remote cluster's gateway. Borrowed, so looking one up on the
/// request path allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    Endpoint(&'a str, SocketAddr),
    Gateway(&'a str),
}

/// One cluster's state: its gateway's and its endpoints'.
#[derive(Debug, Default)]
struct ClusterState {
    gateway: Option<State>,
    endpoints: HashMap<SocketAddr, State>,
}

/// How often the state of endpoints that left the catalog is dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// Per-endpoint (and per-gateway) failure state, by cluster.
#[derive(Debug, Default)]
pub struct OutlierDetector {
    clusters: HashMap<String, ClusterState>,
    /// When each service's failure percentage was last judged.
    sweeps: HashMap<String, Instant>,
    pruned_at: Option<Instant>,
    /// When the last ejection of an endpoint, and of a gateway, to end ends: past it none is
    /// ejected, and a pick need not look each up (an early return to service only makes this
    /// later than need be).
    endpoint_ejections_end: Option<Instant>,
    gateway_ejections_end: Option<Instant>,
}

impl OutlierDetector {
    /// Whether it is time to drop the state of endpoints that left (every [`PRUNE_EVERY`]; the
    /// first call starts the clock): endpoints churn, and each that took a request has state.
    pub fn prune_due(&mut self, now: Instant) -> bool {
        match self.pruned_at {
            Some(at) if now.duration_since(at) < PRUNE_EVERY => false,
            _ => {
                self.pruned_at = Some(now);
                true
            }
        }
    }

    /// Drops the state of every endpoint `exists` says is gone (gateways' state stays).
    pub fn retain_endpoints(&mut self, exists: impl Fn(&str, SocketAddr) -> bool) {
        for (cluster, c) in &mut self.clusters {
            c.endpoints.retain(|addr, _| exists(cluster, *addr));
        }
        self.clusters
            .retain(|_, c| c.gateway.is_some() || !c.endpoints.is_empty());
    }

    /// How many endpoints have state.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.clusters.values().map(|c| c.endpoints.len()).sum()
    }

    fn get(&self, t: Target<'_>) -> Option<&State> {
        match t {
            Target::Endpoint(cluster, addr) => self.clusters.get(cluster)?.endpoints.get(&addr),
            Target::Gateway(cluster) => self.clusters.get(cluster)?.gateway.as_ref(),
        }
    }

    fn get_mut(&mut self, t: Target<'_>) -> Option<&mut State> {
        match t {
            Target::Endpoint(cluster, addr) => self.clusters.get_mut(cluster)?.endpoints.get_mut(&addr),
            Target::Gateway(cluster) => self.clusters.get_mut(cluster)?.gateway.as_mut(),
        }
    }

    /// The state of `t`, made on its first failure or outcome.
    fn entry(&mut self, t: Target<'_>) -> &mut State {
        let cluster = match t {
            Target::Endpoint(c, _) | Target::Gateway(c) => c,
        };
        if !self.clusters.contains_key(cluster) {
            self.clusters.insert(cluster.to_string(), ClusterState::default());
        }
        let c = self.clusters.get_mut(cluster).expect("inserted above");
        match t {
            Target::Endpoint(_, addr) => c.endpoints.entry(addr).or_default(),
            Target::Gateway(_) => c.gateway.get_or_insert_with(State::default),
        }
    }

    /// Whether any endpoint or gateway may be ejected at `now` (false: none is).
    pub fn any_ejected(&self, now: Instant) -> bool {
        self.any_endpoint_ejected(now) || self.gateway_ejections_end.is_some_and(|end| now < end)
    }

    /// Whether any endpoint may be ejected at `now` (false: none is).
    pub fn any_endpoint_ejected(&self, now: Instant) -> bool {
        self.endpoint_ejections_end.is_some_and(|end| now < end)
    }

    fn ejecting(&mut self, t: Target<'_>, now: Instant, time: Duration) {
        let last = match t {
            Target::Endpoint(..) => &mut self.endpoint_ejections_end,
            Target::Gateway(_) => &mut self.gateway_ejections_end,
        };
        let end = now + time;
        *last = Some(last.map_or(end, |e| e.max(end)));
    }

    pub fn is_ejected(&self, t: Target<'_>, now: Instant) -> bool {
        self.get(t).is_some_and(|s| s.ejected(now))
    }

    pub fn success(&mut self, t: Target<'_>) {
        if let Some(s) = self.get_mut(t) {
            s.consecutive = 0;
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            if s.ejected_until.is_none() {
                s.ejections = 0;
            }
            s.ejected_until = None;
        }
    }

    /// Records a failure; returns the ejection time when this failure ejects the endpoint.
    pub fn failure(&mut self, t: Target<'_>, now: Instant, config: &OutlierConfig) -> Option<Duration> {
        let s = self.entry(t);
        if s.ejected(now) {
            return None;
        }
        s.consecutive += 1;
        if s.consecutive < config.consecutive_errors.max(1) {
            return None;
        }
        let time = s.eject(now, config.base_ejection, config.max_ejection);
        self.ejecting(t, now, time);
        Some(time)
    }

    /// Records one attempt's outcome under a service's own rules; returns the ejection time
    /// when it ejects the endpoint. Every outcome counts towards the failure percentage.
    pub fn record(
        &mut self,
        t: Target<'_>,
        outcome: Outcome,
        now: Instant,
        rules: &ServiceOutlier,
    ) -> Option<Duration> {
        let s = self.entry(t);
        s.requests = s.requests.saturating_add(1);
        match outcome {
            Outcome::Success => {
                self.success(t);
                return None;
            }
            Outcome::Error { gateway } => {
                s.failures = s.failures.saturating_add(1);
                s.consecutive_5xx += 1;
                if gateway {
                    s.consecutive_gateway += 1;
                } else {
                    s.consecutive_gateway = 0;
                }
            }
            Outcome::Local => {
                s.failures = s.failures.saturating_add(1);
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
            }
        }
        if s.ejected(now) {
            return None;
        }
        let hit = |n: u32, threshold: u32| threshold > 0 && n >= threshold;
        // With neither consecutive rule on, a local failure still ejects as the mesh-wide
        // default does (failover must not depend on a setting).
        let local_default = outcome == Outcome::Local && rules.consecutive_5xx == 0 && rules.consecutive_gateway == 0;
        if hit(s.consecutive_5xx, rules.consecutive_5xx)
            || hit(s.consecutive_gateway, rules.consecutive_gateway)
            || local_default
        {
            let time = s.eject(now, rules.base_ejection, rules.max_ejection);
            self.ejecting(t, now, time);
            return Some(time);
        }
        None
    }

    /// Judges the failure percentage of `service`'s endpoints (`targets`) once per interval
    /// (the first call only starts the clock); returns those it ejects (as indices into
    /// `targets`) and for how long.
    pub fn sweep(
        &mut self,
        service: &str,
        targets: &[Target<'_>],
        now: Instant,
        rules: &ServiceOutlier,
    ) -> Vec<(usize, Duration)> {
        let Some(fp) = rules.failure_percentage else {
            return vec![];
        };
        let due = match self.sweeps.get(service) {
            None => {
                self.sweeps.insert(service.to_string(), now);
                for t in targets {
                    if let Some(s) = self.get_mut(*t) {
                        (s.requests, s.failures) = (0, 0);
                    }
                }
                return vec![];
            }
            Some(last) => now.duration_since(*last) >= rules.interval,
        };
        if !due {
            return vec![];
        }
        self.sweeps.insert(service.to_string(), now);
        let volume = fp.request_volume.max(1);
        let judged = targets
            .iter()
            .filter(|t| self.get(**t).is_some_and(|s| s.requests >= volume))
            .count();
        let mut ejected = vec![];
        for (i, t) in targets.iter().enumerate() {
            let Some(s) = self.get_mut(*t) else { continue };
            let (requests, failures) = (s.requests, s.failures);
            (s.requests, s.failures) = (0, 0);
            if judged < fp.minimum_hosts as usize || requests < volume || s.ejected(now) {
                continue;
            }
            if u64::from(failures) * 100 >= u64::from(fp.threshold) * u64::from(requests) {
                ejected.push((i, s.eject(now, rules.base_ejection, rules.max_ejection)));
            }
        }
        if let Some((i, longest)) = ejected.iter().max_by_key(|(_, time)| *time) {
            self.ejecting(targets[*i], now, *longest);
        }
        ejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoint `n` of cluster `west`.
    fn ep(n: u8) -> Target<'static> {
        Target::Endpoint("west", SocketAddr::from(([10, 0, 0, n], 8080)))
    }

    #[test]
    fn ejects_for_growing_times_and_returns() {
        let cfg = OutlierConfig {
            consecutive_errors: 2,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(5),
        };
        let mut d = OutlierDetector::default();
        let t = Instant::now();
        assert_eq!(d.failure(ep(1), t, &cfg), None);
        assert!(!d.any_ejected(t));
        assert_eq!(d.failure(ep(1), t, &cfg), Some(Duration::from_secs(2)));
        assert!(d.is_ejected(ep(1), t + Duration::from_secs(1)));
        assert!(!d.is_ejected(ep(1), t + Duration::from_secs(2)));
        assert!(d.any_ejected(t + Duration::from_secs(1)) && !d.any_ejected(t + Duration::from_secs(2)));
        assert!(d.any_endpoint_ejected(t + Duration::from_secs(1)));
        let t2 = t + Duration::from_secs(3);
        d.failure(ep(1), t2, &cfg);
        assert_eq!(d.failure(ep(1), t2, &cfg), Some(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(10);
        d.failure(ep(1), t3, &cfg);
        assert_eq!(d.failure(ep(1), t3, &cfg), Some(Duration::from_secs(5)), "capped");
        d.success(ep(1));
        assert!(!d.is_ejected(ep(1), t3));
        // The same address in another cluster, and the cluster's gateway, are judged apart.
        let twin = Target::Endpoint("east", SocketAddr::from(([10, 0, 0, 1], 8080)));
        d.failure(ep(1), t3, &cfg);
        assert!(d.failure(ep(1), t3, &cfg).is_some());
        assert!(!d.is_ejected(twin, t3) && !d.is_ejected(Target::Gateway("west"), t3));
        d.failure(Target::Gateway("east"), t3, &cfg);
        let mut gateway_only = OutlierDetector::default();
        gateway_only.failure(Target::Gateway("east"), t3, &cfg);
        gateway_only.failure(Target::Gateway("east"), t3, &cfg);
        assert!(gateway_only.any_ejected(t3) && !gateway_only.any_endpoint_ejected(t3));
        d.failure(Target::Gateway("east"), t3, &cfg);
        assert!(d.is_ejected(Target::Gateway("east"), t3) && !d.is_ejected(twin, t3));
    }

    #[test]
    fn the_state_of_endpoints_that_left_is_dropped_every_so_often() {
        let cfg = OutlierConfig::default();
        let mut d = OutlierDetector::default();
        let t = Instant::now();
        assert!(d.prune_due(t), "the first call prunes (nothing yet)");
        for n in 1..=3 {
            d.failure(ep(n), t, &cfg);
        }
        d.failure(Target::Gateway("east"), t, &cfg);
        assert!(!d.prune_due(t + Duration::from_secs(29)));
        assert!(d.prune_due(t + PRUNE_EVERY));
        // Endpoint 2 left the catalog; 1 and 3 are still there, ejected.
        d.retain_endpoints(|cluster, addr| cluster == "west" && addr != SocketAddr::from(([10, 0, 0, 2], 8080)));
        assert_eq!(d.tracked(), 2);
        assert!(d.is_ejected(ep(1), t) && d.is_ejected(ep(3), t) && !d.is_ejected(ep(2), t));
        assert!(d.is_ejected(Target::Gateway("east"), t), "a gateway's state stays");
    }

    fn rules(c5xx: u32, gw: u32, fp: Option<FailurePercentage>) -> ServiceOutlier {
        ServiceOutlier {
            consecutive_5xx: c5xx,
            consecutive_gateway: gw,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            failure_percentage: fp,
        }
    }

    #[test]
    fn consecutive_5xx_and_gateway_errors_are_counted_apart() {
        let r = rules(3, 2, None);
        let mut d = OutlierDetector::default();
        let t = Instant::now();
        let err = |g| Outcome::Error { gateway: g };
        // 500, 503: one gateway error in a row, two 5xx.
        assert_eq!(d.record(ep(1), err(false), t, &r), None);
        assert_eq!(d.record(ep(1), err(true), t, &r), None);
        // A third 5xx ejects under consecutive5xxErrors: 3.
        assert!(!d.any_ejected(t));
        assert_eq!(d.record(ep(1), err(false), t, &r), Some(Duration::from_secs(30)));
        assert!(d.is_ejected(ep(1), t) && d.any_ejected(t + Duration::from_secs(29)));
        // Two gateway errors in a row (a local failure is one) eject under 2.
        assert_eq!(d.record(ep(2), Outcome::Local, t, &r), None);
        assert_eq!(d.record(ep(2), err(true), t, &r), Some(Duration::from_secs(30)));
        // A success in between starts the count again.
        assert_eq!(d.record(ep(3), err(true), t, &r), None);
        assert_eq!(d.record(ep(3), Outcome::Success, t, &r), None);
        assert_eq!(d.record(ep(3), err(true), t, &r), None);
        assert!(!d.is_ejected(ep(3), t));
        // Both rules off: 5xx answers never eject, a local failure still does.
        let off = rules(0, 0, None);
        for _ in 0..10 {
            assert_eq!(d.record(ep(5), err(true), t, &off), None);
        }
        assert!(d.record(ep(5), Outcome::Local, t, &off).is_some());
    }

    #[test]
    fn failure_percentage_is_judged_once_per_interval_with_enough_volume_and_hosts() {
        let fp = FailurePercentage {
            threshold: 50,
            minimum_hosts: 2,
            request_volume: 10,
        };
        let r = rules(0, 0, Some(fp));
        let mut d = OutlierDetector::default();
        let t = Instant::now();
        let keys = [ep(1), ep(2), ep(3)];
        assert!(
            d.sweep("svc", &keys, t, &r).is_empty(),
            "the first sweep starts the clock"
        );
        // a: 6 of 10 failed; b: 1 of 10; c: 5 of 5 (below the volume).
        for i in 0..10 {
            let bad = if i < 6 {
                Outcome::Error { gateway: false }
            } else {
                Outcome::Success
            };
            d.record(ep(1), bad, t, &r);
            d.record(
                ep(2),
                if i == 0 {
                    Outcome::Error { gateway: true }
                } else {
                    Outcome::Success
                },
                t,
                &r,
            );
        }
        for _ in 0..5 {
            d.record(ep(3), Outcome::Error { gateway: false }, t, &r);
        }
        assert!(
            !d.is_ejected(ep(1), t),
            "5xx alone eject nobody with the consecutive rules off"
        );
        assert!(
            d.sweep("svc", &keys, t + Duration::from_secs(5), &r).is_empty(),
            "not due yet"
        );
        let at = t + Duration::from_secs(10);
        let out = d.sweep("svc", &keys, at, &r);
        assert_eq!(out, vec![(0, Duration::from_secs(30))], "a: the first target");
        assert!(d.any_ejected(at + Duration::from_secs(29)) && !d.any_ejected(at + Duration::from_secs(30)));
        assert!(d.is_ejected(ep(1), at) && !d.is_ejected(ep(2), at) && !d.is_ejected(ep(3), at));
        // The window starts again: c's earlier failures are forgotten.
        for _ in 0..10 {
            d.record(ep(2), Outcome::Success, at, &r);
            d.record(ep(3), Outcome::Error { gateway: false }, at, &r);
        }
        let out = d.sweep("svc", &keys, at + Duration::from_secs(10), &r);
        assert_eq!(out.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2], "c alone");
        // Fewer judged endpoints than minimumHosts: nobody is ejected.
        let mut d = OutlierDetector::default();
        d.sweep("svc", &keys, t, &r);
        for _ in 0..10 {
            d.record(ep(1), Outcome::Error { gateway: false }, t, &r);
        }
        assert!(d.sweep("svc", &keys, t + Duration::from_secs(10), &r).is_empty());
    }
}
