use std::collections::BTreeMap;

use crate::locality::Locality;

/// The user's locality knobs (Istio's `localityLbSetting` plus an explicit cluster order).
#[derive(Clone, Debug, PartialEq)]
pub struct LbPolicy {
    /// Envoy's overprovisioning factor: a level at 1/1.4 ≈ 71% health still takes all its traffic.
    pub overprovisioning: f64,
    /// `from` region → `to` region, in order of preference.
    pub failover: Vec<(String, String)>,
    /// Labels whose leading matches with the caller's decide the priority (Istio semantics).
    pub failover_priority: Vec<String>,
    pub distribute: Vec<DistributeRule>,
    /// Clusters in failover order, nearest first; overrides region distance when set.
    pub cluster_order: Vec<String>,
}

impl Default for LbPolicy {
    fn default() -> Self {
        LbPolicy {
            overprovisioning: 1.4,
            failover: vec![],
            failover_priority: vec![],
            distribute: vec![],
            cluster_order: vec![],
        }
    }
}

/// Traffic from callers matching `from` is split over localities by weight (percent).
#[derive(Clone, Debug, PartialEq)]
pub struct DistributeRule {
    pub from: String,
    pub to: Vec<(String, u32)>,
}

/// One endpoint as the load balancer sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub locality: &'a Locality,
    pub labels: &'a BTreeMap<String, String>,
    pub healthy: bool,
}

fn label<'a>(loc: &'a Locality, labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str).or_else(|| loc.topology_label(key))
}

/// The geography of a region name: `us-east` → `us`. Regions of one geography are nearer to
/// each other than to any other, which gives a sensible default failover order without
/// coordinates.
fn geography(region: &str) -> &str {
    region.split(['-', '_']).next().unwrap_or(region)
}

fn region_rank(caller: &Locality, ep: &Locality, policy: &LbPolicy) -> u32 {
    if !policy.cluster_order.is_empty() {
        let pos = policy.cluster_order.iter().position(|c| *c == ep.cluster);
        return pos.unwrap_or(policy.cluster_order.len()) as u32;
    }
    let preferred: Vec<&str> = policy
        .failover
        .iter()
        .filter(|(from, _)| *from == caller.region)
        .map(|(_, to)| to.as_str())
        .collect();
    if let Some(pos) = preferred.iter().position(|to| *to == ep.region) {
        return pos as u32;
    }
    let base = preferred.len() as u32;
    if geography(&ep.region) == geography(&caller.region) {
        base
    } else {
        base + 1
    }
}

fn raw_priority(
    caller: &Locality,
    caller_labels: &BTreeMap<String, String>,
    c: &Candidate<'_>,
    policy: &LbPolicy,
) -> u32 {
    if !policy.failover_priority.is_empty() {
        let matching = policy
            .failover_priority
            .iter()
            .take_while(|key| {
                let mine = label(caller, caller_labels, key);
                mine.is_some() && mine == label(c.locality, c.labels, key)
            })
            .count();
        return (policy.failover_priority.len() - matching) as u32;
    }
    let ep = c.locality;
    if ep.region == caller.region {
        if ep.zone == caller.zone {
            if ep.subzone == caller.subzone {
                0
            } else {
                1
            }
        } else {
            2
        }
    } else {
        3 + region_rank(caller, ep, policy)
    }
}

/// Each candidate's priority level, 0 nearest, numbered without gaps.
pub fn priorities(
    caller: &Locality,
    caller_labels: &BTreeMap<String, String>,
    candidates: &[Candidate<'_>],
    policy: &LbPolicy,
) -> Vec<u32> {
    let raw: Vec<u32> = candidates
        .iter()
        .map(|c| raw_priority(caller, caller_labels, c, policy))
        .collect();
    let mut levels = raw.clone();
    levels.sort_unstable();
    levels.dedup();
    raw.iter()
        .map(|r| levels.iter().position(|l| l == r).unwrap_or_default() as u32)
        .collect()
}

/// Envoy's priority load: the share of traffic (percent) each level receives, given each level's
/// (healthy, total) endpoint counts. All zeros when nothing is healthy (the caller then panics:
/// it tries every endpoint rather than none).
pub fn priority_load(levels: &[(usize, usize)], overprovisioning: f64) -> Vec<f64> {
    let health: Vec<f64> = levels
        .iter()
        .map(|&(healthy, total)| {
            if total == 0 {
                0.0
            } else {
                (overprovisioning * 100.0 * healthy as f64 / total as f64).min(100.0)
            }
        })
        .collect();
    let sum: f64 = health.iter().sum();
    if sum <= 0.0 {
        return vec![0.0; levels.len()];
    }
    if sum < 100.0 {
        // Not enough healthy capacity anywhere: normalise so all traffic still lands.
        return health.iter().map(|h| h * 100.0 / sum).collect();
    }
    let mut remaining = 100.0;
    health
        .iter()
        .map(|h| {
            let load = h.min(remaining);
            remaining -= load;
            load
        })
        .collect()
}

/// Picks one candidate, skipping `exclude` (endpoints a retry already tried), given each
/// candidate's priority level (`prio`: [`priorities`] of the same caller, candidates and policy,
/// which a proxy keeps while its config stays the same). `r1` in [0, 1) chooses the level (or
/// the distribute target), `r2` the endpoint within it.
pub fn choose_at(
    caller: &Locality,
    candidates: &[Candidate<'_>],
    prio: &[u32],
    exclude: &[usize],
    policy: &LbPolicy,
    r1: f64,
    r2: u64,
) -> Option<usize> {
    debug_assert_eq!(prio.len(), candidates.len());
    let usable: Vec<usize> = (0..candidates.len()).filter(|i| !exclude.contains(i)).collect();
    if usable.is_empty() {
        return None;
    }
    let healthy: Vec<usize> = usable.iter().copied().filter(|&i| candidates[i].healthy).collect();
    if healthy.is_empty() {
        // Panic mode: every endpoint is unhealthy, so health tells us nothing; prefer the nearest.
        let best = usable.iter().map(|&i| prio[i]).min()?;
        let nearest: Vec<usize> = usable.into_iter().filter(|&i| prio[i] == best).collect();
        return Some(nearest[(r2 % nearest.len() as u64) as usize]);
    }
    if let Some(rule) = policy.distribute.iter().find(|d| caller.matches(&d.from)) {
        let targets: Vec<(&String, u32, Vec<usize>)> = rule
            .to
            .iter()
            .map(|(pattern, w)| {
                let members = healthy
                    .iter()
                    .copied()
                    .filter(|&i| candidates[i].locality.matches(pattern))
                    .collect::<Vec<_>>();
                (pattern, *w, members)
            })
            .filter(|(_, w, m)| *w > 0 && !m.is_empty())
            .collect();
        let total: u32 = targets.iter().map(|(_, w, _)| w).sum();
        if total > 0 {
            let mut point = r1 * total as f64;
            for (_, w, members) in &targets {
                if point < *w as f64 {
                    return Some(members[(r2 % members.len() as u64) as usize]);
                }
                point -= *w as f64;
            }
            let (_, _, members) = targets.last()?;
            return Some(members[(r2 % members.len() as u64) as usize]);
        }
    }
    let n_levels = usable.iter().map(|&i| prio[i]).max()? as usize + 1;
    let mut counts = vec![(0usize, 0usize); n_levels];
    for &i in &usable {
        let level = &mut counts[prio[i] as usize];
        level.1 += 1;
        if candidates[i].healthy {
            level.0 += 1;
        }
    }
    let load = priority_load(&counts, policy.overprovisioning);
    let mut point = r1 * 100.0;
    let mut level = load.iter().rposition(|l| *l > 0.0)?;
    for (p, l) in load.iter().enumerate() {
        if point < *l {
            level = p;
            break;
        }
        point -= l;
    }
    let members: Vec<usize> = healthy.into_iter().filter(|&i| prio[i] as usize == level).collect();
    Some(members[(r2 % members.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`choose_at`] with the levels worked out for this call.
    fn choose(
        caller: &Locality,
        caller_labels: &BTreeMap<String, String>,
        candidates: &[Candidate<'_>],
        exclude: &[usize],
        policy: &LbPolicy,
        r1: f64,
        r2: u64,
    ) -> Option<usize> {
        let levels = priorities(caller, caller_labels, candidates, policy);
        choose_at(caller, candidates, &levels, exclude, policy, r1, r2)
    }

    fn loc(cluster: &str, region: &str, zone: &str) -> Locality {
        Locality::new(cluster, region, zone)
    }

    struct Fixture {
        locs: Vec<Locality>,
        healthy: Vec<bool>,
        labels: BTreeMap<String, String>,
    }

    impl Fixture {
        fn demo() -> Self {
            let locs = vec![
                loc("east", "us-east", "us-east-1a"),
                loc("east", "us-east", "us-east-1b"),
                loc("west", "us-west", "us-west-2a"),
                loc("central", "eu-central", "eu-central-1a"),
            ];
            Fixture {
                healthy: vec![true; locs.len()],
                locs,
                labels: BTreeMap::new(),
            }
        }
        fn candidates(&self) -> Vec<Candidate<'_>> {
            self.locs
                .iter()
                .zip(&self.healthy)
                .map(|(l, h)| Candidate {
                    locality: l,
                    labels: &self.labels,
                    healthy: *h,
                })
                .collect()
        }
    }

    #[test]
    fn default_priorities_follow_zone_region_geography() {
        let f = Fixture::demo();
        let caller = loc("east", "us-east", "us-east-1a");
        let p = priorities(&caller, &f.labels, &f.candidates(), &LbPolicy::default());
        assert_eq!(
            p,
            vec![0, 1, 2, 3],
            "1a, then 1b, then us-west (same geography), then eu"
        );
    }

    #[test]
    fn failover_and_cluster_order_override_distance() {
        let f = Fixture::demo();
        let caller = loc("east", "us-east", "us-east-1a");
        let policy = LbPolicy {
            failover: vec![("us-east".into(), "eu-central".into())],
            ..LbPolicy::default()
        };
        assert_eq!(
            priorities(&caller, &f.labels, &f.candidates(), &policy),
            vec![0, 1, 3, 2]
        );
        let policy = LbPolicy {
            cluster_order: vec!["central".into(), "west".into()],
            ..LbPolicy::default()
        };
        assert_eq!(
            priorities(&caller, &f.labels, &f.candidates(), &policy),
            vec![0, 1, 3, 2]
        );
    }

    #[test]
    fn failover_priority_counts_leading_label_matches() {
        let f = Fixture::demo();
        let caller = loc("east", "us-east", "us-east-1a");
        let policy = LbPolicy {
            failover_priority: vec![
                "topology.kubernetes.io/region".into(),
                "topology.kubernetes.io/zone".into(),
            ],
            ..LbPolicy::default()
        };
        assert_eq!(
            priorities(&caller, &f.labels, &f.candidates(), &policy),
            vec![0, 1, 2, 2]
        );
    }

    #[test]
    fn priority_load_matches_envoy() {
        // Envoy docs: P0 healthy 100% → all traffic; 72% healthy → 100 (1.4 * 72 > 100).
        assert_eq!(priority_load(&[(10, 10), (10, 10)], 1.4), vec![100.0, 0.0]);
        assert_eq!(priority_load(&[(72, 100), (10, 10)], 1.4), vec![100.0, 0.0]);
        let l = priority_load(&[(50, 100), (10, 10)], 1.4);
        assert!((l[0] - 70.0).abs() < 1e-9 && (l[1] - 30.0).abs() < 1e-9, "{l:?}");
        let l = priority_load(&[(0, 1), (1, 2)], 1.4);
        assert_eq!(l, vec![0.0, 100.0]);
        // Degraded everywhere: normalised so the loads still sum to 100.
        let l = priority_load(&[(1, 10), (1, 10)], 1.4);
        assert!((l[0] - 50.0).abs() < 1e-9 && (l[1] - 50.0).abs() < 1e-9, "{l:?}");
        assert_eq!(priority_load(&[(0, 3)], 1.4), vec![0.0]);
    }

    #[test]
    fn choose_stays_local_then_fails_over_in_order() {
        let mut f = Fixture::demo();
        let caller = loc("east", "us-east", "us-east-1a");
        let policy = LbPolicy::default();
        for r in [0.0, 0.5, 0.99] {
            assert_eq!(choose(&caller, &f.labels, &f.candidates(), &[], &policy, r, 7), Some(0));
        }
        f.healthy[0] = false;
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[], &policy, 0.3, 7),
            Some(1)
        );
        f.healthy[1] = false;
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[], &policy, 0.3, 7),
            Some(2)
        );
        // A retry excludes what it tried.
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[2], &policy, 0.3, 7),
            Some(3)
        );
        // Everything unhealthy: panic mode still picks the nearest.
        f.healthy = vec![false; 4];
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[], &policy, 0.3, 7),
            Some(0)
        );
    }

    #[test]
    fn distribute_splits_by_weight() {
        let f = Fixture::demo();
        let caller = loc("east", "us-east", "us-east-1a");
        let policy = LbPolicy {
            distribute: vec![DistributeRule {
                from: "us-east/*".into(),
                to: vec![("us-east/us-east-1a".into(), 80), ("us-west/*".into(), 20)],
            }],
            ..LbPolicy::default()
        };
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[], &policy, 0.5, 0),
            Some(0)
        );
        assert_eq!(
            choose(&caller, &f.labels, &f.candidates(), &[], &policy, 0.9, 0),
            Some(2)
        );
    }
}
