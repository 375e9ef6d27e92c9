//! Passive outlier detection: endpoints that fail are ejected for a while, longer each time.

use std::collections::HashMap;
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

#[derive(Debug, Default)]
struct State {
    consecutive: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Per-endpoint failure state, keyed by the caller's endpoint key.
#[derive(Debug, Default)]
pub struct OutlierDetector {
    endpoints: HashMap<String, State>,
}

impl OutlierDetector {
    pub fn is_ejected(&self, key: &str, now: Instant) -> bool {
        self.endpoints
            .get(key)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| now < until)
    }

    pub fn success(&mut self, key: &str) {
        if let Some(s) = self.endpoints.get_mut(key) {
            s.consecutive = 0;
            if s.ejected_until.is_none() {
                s.ejections = 0;
            }
            s.ejected_until = None;
        }
    }

    /// Records a failure; returns the ejection time when this failure ejects the endpoint.
    pub fn failure(&mut self, key: &str, now: Instant, config: &OutlierConfig) -> Option<Duration> {
        let s = self.endpoints.entry(key.to_string()).or_default();
        if s.ejected_until.is_some_and(|until| now < until) {
            return None;
        }
        s.consecutive += 1;
        if s.consecutive < config.consecutive_errors.max(1) {
            return None;
        }
        s.ejections += 1;
        s.consecutive = 0;
        let time = (config.base_ejection * s.ejections).min(config.max_ejection);
        s.ejected_until = Some(now + time);
        Some(time)
    }

    /// Forgets endpoints that no longer exist.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.endpoints.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_for_growing_times_and_returns() {
        let cfg = OutlierConfig {
            consecutive_errors: 2,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(5),
        };
        let mut d = OutlierDetector::default();
        let t = Instant::now();
        assert_eq!(d.failure("a", t, &cfg), None);
        assert_eq!(d.failure("a", t, &cfg), Some(Duration::from_secs(2)));
        assert!(d.is_ejected("a", t + Duration::from_secs(1)));
        assert!(!d.is_ejected("a", t + Duration::from_secs(2)));
        let t2 = t + Duration::from_secs(3);
        d.failure("a", t2, &cfg);
        assert_eq!(d.failure("a", t2, &cfg), Some(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(10);
        d.failure("a", t3, &cfg);
        assert_eq!(d.failure("a", t3, &cfg), Some(Duration::from_secs(5)), "capped");
        d.success("a");
        assert!(!d.is_ejected("a", t3));
    }
}
