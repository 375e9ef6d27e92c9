//! The state a TrafficPolicy needs in a proxy: token buckets (rate limits), retry budgets and
//! request pools (circuit breaking), each keyed by the destination service and rebuilt when
//! the policy's numbers change. Plain data behind short locks; no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_api::traffic::{Budget, Pool, RateLimit};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A token bucket: `rate` tokens a second, holding at most `capacity`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The fewest tokens a rate-limit bucket holds (see [`RateLimiter::allow`]).
const MIN_BUCKET: f64 = 2.0;

/// Local rate limits, one bucket per key.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes a token for `key` under `limit`, this proxy's share being `share` (1 for a
    /// per-proxy limit; a fraction for a destination total). The bucket holds the share of the
    /// burst, so a total stays a total — but at least two tokens: a bucket of one drops what
    /// accrues between a token falling due and the next request, and so undershoots its rate
    /// by the gap between arrivals (10 % with requests at ten times the rate).
    pub fn allow(&self, key: &str, limit: &RateLimit, share: f64, now: Instant) -> bool {
        let rate = limit.per_second * share;
        let capacity = (f64::from(limit.burst) * share).max(MIN_BUCKET);
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let b = buckets.entry(key.to_string()).or_insert_with(|| Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        });
        if b.rate != rate || b.capacity != capacity {
            b.rate = rate;
            b.capacity = capacity;
            b.tokens = b.tokens.min(capacity);
        }
        b.take(now)
    }
}

/// Requests and retries per destination over a sliding window of one-second slots.
#[derive(Debug)]
struct Window {
    slots: Vec<(u64, u32, u32)>, // (second, requests, retries)
}

impl Window {
    fn add(&mut self, second: u64, len: usize, retry: bool) {
        if self.slots.len() != len {
            self.slots = vec![(0, 0, 0); len];
        }
        let slot = &mut self.slots[(second as usize) % len];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        if retry {
            slot.2 += 1;
        } else {
            slot.1 += 1;
        }
    }

    fn totals(&self, second: u64) -> (u32, u32) {
        let len = self.slots.len() as u64;
        self.slots
            .iter()
            .filter(|s| s.0 + len > second && s.0 <= second)
            .fold((0, 0), |(a, b), s| (a + s.1, b + s.2))
    }
}

/// Retry budgets (Gateway API `XBackendTrafficPolicy.retryConstraint`): retries to a
/// destination may be at most `percent` of its requests over `interval`, but always at least
/// `min_per_second` a second.
pub struct RetryBudgets {
    epoch: Instant,
    windows: Mutex<HashMap<String, Window>>,
}

impl Default for RetryBudgets {
    fn default() -> Self {
        RetryBudgets {
            epoch: Instant::now(),
            windows: Mutex::default(),
        }
    }
}

impl RetryBudgets {
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn slots(budget: &Budget) -> usize {
        (budget.interval.as_secs().max(1) as usize).min(300)
    }

    /// Counts a first attempt.
    pub fn request(&self, key: &str, budget: &Budget, now: Instant) {
        let second = self.second(now);
        if let Ok(mut w) = self.windows.lock() {
            w.entry(key.to_string())
                .or_insert(Window { slots: vec![] })
                .add(second, Self::slots(budget), false);
        }
    }

    /// Whether a retry fits the budget; counts it when it does.
    pub fn try_retry(&self, key: &str, budget: &Budget, now: Instant) -> bool {
        let second = self.second(now);
        let len = Self::slots(budget);
        let Ok(mut w) = self.windows.lock() else { return false };
        let window = w.entry(key.to_string()).or_insert(Window { slots: vec![] });
        if window.slots.len() != len {
            window.slots = vec![(0, 0, 0); len];
        }
        let (requests, retries) = window.totals(second);
        let allowed = (f64::from(requests) * budget.percent).max(f64::from(budget.min_per_second) * len as f64);
        if f64::from(retries) + 1.0 > allowed {
            return false;
        }
        window.add(second, len, true);
        true
    }
}

/// Circuit breaking: at most `max_requests` in flight to a destination from this proxy, at
/// most `max_pending` more waiting for a slot; the rest are refused at once.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Arc<PoolState>>>,
}

struct PoolState {
    limits: Pool,
    slots: Arc<Semaphore>,
    waiting: std::sync::atomic::AtomicU32,
}

/// Why a request was refused by a pool.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl Pools {
    /// A slot for one request to `key`, waiting (in the pending queue) when all are taken.
    /// `None` when the policy sets no request limit.
    pub async fn acquire(&self, key: &str, limits: &Pool) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        use std::sync::atomic::Ordering;
        let Some(max) = limits.max_requests else {
            return Ok(None);
        };
        let state = {
            let Ok(mut pools) = self.pools.lock() else {
                return Ok(None);
            };
            let entry = pools.entry(key.to_string()).or_insert_with(|| {
                Arc::new(PoolState {
                    limits: limits.clone(),
                    slots: Arc::new(Semaphore::new(max as usize)),
                    waiting: Default::default(),
                })
            });
            if entry.limits != *limits {
                *entry = Arc::new(PoolState {
                    limits: limits.clone(),
                    slots: Arc::new(Semaphore::new(max as usize)),
                    waiting: Default::default(),
                });
            }
            entry.clone()
        };
        if let Ok(p) = state.slots.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let max_pending = limits.max_pending.unwrap_or(u32::MAX);
        if state.waiting.fetch_add(1, Ordering::SeqCst) >= max_pending {
            state.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Overflow);
        }
        let permit = state.slots.clone().acquire_owned().await;
        state.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.map(Some).map_err(|_| Overflow)
    }
}

/// Whether an event with probability `p` (0..=1) happens now.
pub fn chance(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p)
}

/// How long a retry waits after the `n`th failure (n from 1): 25 ms doubling, capped at 250 ms,
/// with jitter (Envoy's defaults).
pub fn retry_backoff(n: u32) -> Duration {
    let base = Duration::from_millis(25).saturating_mul(1 << n.saturating_sub(1).min(4));
    let cap = base.min(Duration::from_millis(250));
    cap.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            per_destination: false,
            shadow: false,
        }
    }

    #[test]
    fn a_bucket_allows_its_rate_and_burst() {
        let rl = RateLimiter::default();
        let limit = limit(10.0, 5);
        let t0 = Instant::now();
        let burst = (0..20).filter(|_| rl.allow("a", &limit, 1.0, t0)).count();
        assert_eq!(burst, 5);
        let later = (0..20)
            .filter(|_| rl.allow("a", &limit, 1.0, t0 + Duration::from_millis(1000)))
            .count();
        assert_eq!(later, 5, "10/s for one second, capped at the burst of 5");
        // Half the total: half the rate and half the burst (but never under two tokens).
        let half = (0..20).filter(|_| rl.allow("b", &limit, 0.5, t0)).count();
        assert_eq!(half, 2);
        let tenth = (0..20).filter(|_| rl.allow("c", &limit, 0.1, t0)).count();
        assert_eq!(tenth, 2);
    }

    #[test]
    fn requests_at_any_spacing_get_the_whole_rate() {
        // 40/s with no burst, requests every 7 ms (a token falls due between two of them):
        // 400 in 10 s, plus the bucket's two.
        let rl = RateLimiter::default();
        let limit = limit(40.0, 0);
        let t0 = Instant::now();
        let allowed = (0..10_000 / 7)
            .filter(|i| rl.allow("a", &limit, 1.0, t0 + Duration::from_millis(i * 7)))
            .count();
        assert!((400..=402).contains(&allowed), "{allowed}");
    }

    #[test]
    fn retries_stop_when_the_budget_is_spent() {
        let b = RetryBudgets::default();
        let budget = Budget {
            percent: 0.2,
            interval: Duration::from_secs(10),
            min_per_second: 0,
        };
        let now = Instant::now();
        for _ in 0..100 {
            b.request("svc", &budget, now);
        }
        let allowed = (0..100).filter(|_| b.try_retry("svc", &budget, now)).count();
        assert_eq!(allowed, 20);
        // The floor: at least min_per_second over the interval even with no traffic.
        let floor = Budget {
            min_per_second: 1,
            ..budget
        };
        let allowed = (0..100).filter(|_| b.try_retry("idle", &floor, now)).count();
        assert_eq!(allowed, 10);
    }

    #[tokio::test]
    async fn a_full_pool_queues_then_refuses() {
        let pools = Pools::default();
        let limits = Pool {
            max_requests: Some(1),
            max_pending: Some(1),
            ..Default::default()
        };
        let first = pools.acquire("svc", &limits).await.expect("slot");
        assert!(first.is_some());
        let pools = Arc::new(pools);
        let p2 = pools.clone();
        let l2 = limits.clone();
        let queued = tokio::spawn(async move { p2.acquire("svc", &l2).await.map(|p| p.is_some()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pools.acquire("svc", &limits).await.err(), Some(Overflow), "queue full");
        drop(first);
        assert_eq!(queued.await.expect("task"), Ok(true), "the queued request got the slot");
    }
}
