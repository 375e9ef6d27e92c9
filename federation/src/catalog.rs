//! The catalog merge: this cluster's services and its peers' exports become one clusterset
//! catalog, following the Multi-Cluster Services rules: ports are the union of every export's;
//! where exports disagree on a port the oldest export wins and the conflict is reported as a
//! condition (in every cluster, since every cluster computes the same merge); every service
//! gets a ClusterSet IP that is the same in every cluster. Pure functions over plain data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use strait_api::pb;

/// A range of ClusterSet IPs, such as `240.0.0.0/4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    base: u32,
    size: u32,
}

impl std::str::FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not an IPv4 CIDR range with a prefix of /4 to /24 (e.g. 240.0.0.0/4)");
        let (ip, len) = s.split_once('/').ok_or_else(err)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let len: u32 = len.parse().map_err(|_| err())?;
        if !(4..=24).contains(&len) {
            return Err(err());
        }
        let size = 1u32 << (32 - len);
        Ok(IpRange {
            base: u32::from(ip) & !(size - 1),
            size,
        })
    }
}

/// Gives each service an address by hashing its name into the range, probing past collisions in
/// name order, so clusters that see the same services agree without talking.
pub fn allocate_ips<'a>(keys: impl IntoIterator<Item = &'a Key>, range: IpRange) -> BTreeMap<Key, Ipv4Addr> {
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    let mut keys: Vec<&Key> = keys.into_iter().collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let digest = Sha256::digest(key.as_bytes());
        let mut offset = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % range.size;
        // Skip the network and broadcast addresses, and anything already given out.
        while offset == 0 || offset == range.size - 1 || taken.contains(&offset) {
            offset = (offset + 1) % range.size;
        }
        taken.insert(offset);
        out.insert(key.clone(), Ipv4Addr::from(range.base + offset));
    }
    out
}

/// One service of the merged catalog.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedService {
    pub name: String,
    pub namespace: String,
    pub clusterset_ip: Ipv4Addr,
    pub ports: Vec<pb::ServicePort>,
    /// Each exporting cluster's export, oldest first (as `clusters`): the endpoints are theirs,
    /// shared rather than copied into one list ([`MergedService::endpoints`]).
    pub exports: Vec<Arc<pb::ExportedService>>,
    pub identities: Vec<String>,
    pub conditions: Vec<pb::Condition>,
    /// Exporting clusters, oldest export first.
    pub clusters: Vec<String>,
}

impl MergedService {
    /// Every endpoint, cluster by cluster in `clusters` order.
    pub fn endpoints(&self) -> impl Iterator<Item = &pb::Endpoint> {
        self.exports.iter().flat_map(|e| e.endpoints.iter())
    }

    /// The export of `cluster`, if it exports this service (one export per cluster).
    pub fn export_of(&self, cluster: &str) -> Option<&Arc<pb::ExportedService>> {
        self.clusters
            .iter()
            .position(|c| c == cluster)
            .and_then(|i| self.exports.get(i))
    }
}

/// A map key (a service's `<ns>/<name>`, a resource's name) shared by every map that holds it:
/// the merge, the build and the config streams copy maps of hundreds of entries on every pass,
/// and a shared key costs a reference count where a `String` cost an allocation and a copy.
/// Two keys from the same origin compare by pointer first ([`join`]).
pub type Key = Arc<str>;

/// The merged catalog by `<ns>/<name>`; a service that did not change between two merges is
/// the same `Arc` in both, so everything downstream can skip it by pointer.
pub type Merged = BTreeMap<Key, Arc<MergedService>>;

/// One cluster's services by `<ns>/<name>`. Each export is shared from where it was received
/// or read to the merge, which skips an unchanged one by pointer instead of comparing its
/// endpoints.
pub type Services = BTreeMap<Key, Arc<pb::ExportedService>>;

/// Whether two exports are the same: by pointer, else by value.
pub fn same_export(a: &Arc<pb::ExportedService>, b: &Arc<pb::ExportedService>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Whether two merged catalogs are the same, by pointer before value for each service: a merge
/// keeps the `Arc` of every service it did not change, so comparing a pass's catalog with the
/// last one costs a pointer comparison per service, not a walk over every endpoint.
pub fn same_merged(a: &Merged, b: &Merged) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
}

/// The services `now` adds, changes (by pointer, then value) or removes against `before`, in
/// key order: each with its export in `now`, `None` where `now` no longer has it. One walk over
/// both, not a lookup in `before` per service.
pub fn changes<'a>(
    before: &'a Services,
    now: &'a Services,
) -> impl Iterator<Item = (&'a Key, Option<&'a Arc<pb::ExportedService>>)> {
    join(before, now).filter_map(|(k, old, new)| match (old, new) {
        (Some(old), Some(new)) if same_export(old, new) => None,
        (None, None) => None,
        (_, new) => Some((k, new)),
    })
}

/// Walks two maps in key order at once: each key of either, with its value in each.
pub fn join<'a, V, W>(
    a: &'a BTreeMap<Key, V>,
    b: &'a BTreeMap<Key, W>,
) -> impl Iterator<Item = (&'a Key, Option<&'a V>, Option<&'a W>)> {
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    std::iter::from_fn(move || {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) if Arc::ptr_eq(ka, kb) => std::cmp::Ordering::Equal,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        Some(match order {
            std::cmp::Ordering::Less => a.next().map(|(k, v)| (k, Some(v), None))?,
            std::cmp::Ordering::Greater => b.next().map(|(k, w)| (k, None, Some(w)))?,
            std::cmp::Ordering::Equal => {
                let (k, v) = a.next()?;
                (k, Some(v), b.next().map(|(_, w)| w))
            }
        })
    })
}

/// What the last merge saw and made: a service whose exports (and address) are unchanged is
/// not merged again, and a pass looks only at the services of clusters whose exports changed.
/// This keeps a change's cost in proportion to what changed, not to the catalog.
#[derive(Default)]
pub struct MergeMemo {
    by_service: HashMap<Key, Memo>,
    /// The addresses last allocated, given out again while the set of services is the same.
    ips: BTreeMap<Key, Ipv4Addr>,
    /// The last pass's clusters and result, with its range. Not the clusters' maps: holding
    /// them kept every peer's map shared, so each update from a peer copied its whole map
    /// (hundreds of entries) to change one; what changed comes as [`Touched`] instead.
    last: Option<(BTreeSet<String>, Merged, IpRange)>,
    /// How many merges this memo has made, and which services the last one may have changed
    /// against the one before (`None`: any).
    generation: u64,
    touched: Option<Vec<Key>>,
}

/// Which services one merge changed against the merge before it, as [`MergeMemo::last_change`]
/// tells: every service whose `Arc` differs from the one before is among `keys`; `None` when
/// any may have (the first merge, a service that came or went, a new address range).
#[derive(Clone, Copy, Debug)]
pub struct MergeChange<'a> {
    /// The merge's number in its memo (1 for the first).
    pub generation: u64,
    pub keys: Option<&'a [Key]>,
}

impl MergeChange<'_> {
    /// A merge that may have changed anything.
    pub const ANY: MergeChange<'static> = MergeChange {
        generation: 0,
        keys: None,
    };
}

impl MergeMemo {
    /// What the last merge changed.
    pub fn last_change(&self) -> MergeChange<'_> {
        MergeChange {
            generation: self.generation,
            keys: self.touched.as_deref(),
        }
    }
}

/// Which of one cluster's services changed since the last merge: these keys (added, changed
/// or removed), or any of them.
#[derive(Clone, Debug, PartialEq)]
pub enum Touched {
    Keys(BTreeSet<Key>),
    All,
}

impl Default for Touched {
    fn default() -> Self {
        Touched::Keys(BTreeSet::new())
    }
}

impl Touched {
    /// The services `now` adds, changes or removes against `before`.
    pub fn between(before: &Services, now: &Services) -> Touched {
        Touched::Keys(changes(before, now).map(|(k, _)| k.clone()).collect())
    }

    /// Adds what `other` touched.
    pub fn add(&mut self, other: Touched) {
        match (&mut *self, other) {
            (Touched::All, _) => {}
            (_, Touched::All) => *self = Touched::All,
            (Touched::Keys(mine), Touched::Keys(theirs)) => mine.extend(theirs),
        }
    }
}

/// For each cluster whose services changed since the last merge, which ones.
pub type Changes = BTreeMap<String, Touched>;

/// One service's exports as a merge takes them: (exporting cluster, export).
type Inputs<'a> = Vec<(&'a String, &'a Arc<pb::ExportedService>)>;

/// One service's inputs (exporting cluster, export) as last merged, and the result.
type Memo = (Vec<(String, Arc<pb::ExportedService>)>, Arc<MergedService>);

/// Merges exports by cluster. `exports` maps cluster name → its services by `<ns>/<name>`.
pub fn merge(exports: &BTreeMap<String, Services>, range: IpRange) -> Merged {
    let shared = exports.iter().map(|(c, s)| (c.clone(), Arc::new(s.clone()))).collect();
    merge_with(&mut MergeMemo::default(), &shared, &Changes::new(), range)
}

/// The services whose inputs may differ from the last merge's: those `changes` names for a
/// cluster merged before, and every service of a cluster that came or went (or changed whole).
fn changed_services(
    memo: &HashMap<Key, Memo>,
    before: &BTreeSet<String>,
    now: &BTreeMap<String, Arc<Services>>,
    changes: &Changes,
) -> BTreeSet<Key> {
    let mut dirty = BTreeSet::new();
    // A cluster's services as last merged, from the memo's inputs (rare: a cluster came,
    // went or sent its whole catalog again).
    let had = |cluster: &str, dirty: &mut BTreeSet<Key>| {
        dirty.extend(
            memo.iter()
                .filter(|(_, (inputs, _))| inputs.iter().any(|(c, _)| c == cluster))
                .map(|(k, _)| k.clone()),
        )
    };
    for (cluster, services) in now {
        match (before.contains(cluster), changes.get(cluster)) {
            (true, None) => {}
            (true, Some(Touched::Keys(keys))) => dirty.extend(keys.iter().cloned()),
            (true, Some(Touched::All)) => {
                dirty.extend(services.keys().cloned());
                had(cluster, &mut dirty);
            }
            (false, _) => dirty.extend(services.keys().cloned()),
        }
    }
    for cluster in before {
        if !now.contains_key(cluster) {
            had(cluster, &mut dirty);
        }
    }
    dirty
}

/// [`merge`], reusing from `memo` every service whose inputs did not change: the same exports
/// (by pointer, else by value) from the same clusters. `changes` says, for each cluster whose
/// services changed since the last merge, which ones (a cluster not named is taken as
/// unchanged); when no service came or went, only those are looked at.
pub fn merge_with(
    memo: &mut MergeMemo,
    exports: &BTreeMap<String, Arc<Services>>,
    changes: &Changes,
    range: IpRange,
) -> Merged {
    memo.generation += 1;
    memo.touched = None;
    if let Some((clusters, last, last_range)) = &mut memo.last {
        if *last_range == range {
            let dirty = changed_services(&memo.by_service, clusters, exports, changes);
            let lists: Vec<(Key, Inputs)> = dirty
                .into_iter()
                .map(|key| {
                    let list = exports
                        .iter()
                        .filter_map(|(c, services)| services.get(&key).map(|s| (c, s)))
                        .collect();
                    (key, list)
                })
                // Touched, but neither merged before nor exported now (it came and went).
                .filter(|(key, list): &(Key, Inputs)| !list.is_empty() || last.contains_key(key))
                .collect();
            // A service that came or went can move others' addresses: merged whole below.
            let same_set = lists
                .iter()
                .all(|(key, list)| list.is_empty() != last.contains_key(key));
            if same_set {
                // The memo's map is updated in place: one copy of it per pass, the one returned.
                let mut touched = Vec::with_capacity(lists.len());
                for (key, list) in lists {
                    let merged = merge_service(&mut memo.by_service, &key, list, memo.ips[&key]);
                    last.insert(key.clone(), merged);
                    touched.push(key);
                }
                memo.touched = Some(touched);
                *clusters = exports.keys().cloned().collect();
                return last.clone();
            }
        }
    }
    let mut by_service: BTreeMap<&Key, Inputs> = BTreeMap::new();
    for (cluster, services) in exports {
        for (key, svc) in services.iter() {
            by_service.entry(key).or_default().push((cluster, svc));
        }
    }
    let same_keys = memo.ips.len() == by_service.len() && memo.ips.keys().zip(by_service.keys()).all(|(a, b)| a == *b);
    if !same_keys {
        memo.ips = allocate_ips(by_service.keys().copied(), range);
    }
    let mut out = BTreeMap::new();
    for (key, list) in by_service {
        let merged = merge_service(&mut memo.by_service, key, list, memo.ips[key]);
        out.insert(key.clone(), merged);
    }
    memo.by_service.retain(|k, _| out.contains_key(k));
    memo.last = Some((exports.keys().cloned().collect(), out.clone(), range));
    out
}

/// One service from its exports (cluster, export), or the memo's result where they are the
/// same as last time.
fn merge_service(memo: &mut HashMap<Key, Memo>, key: &Key, mut list: Inputs, ip: Ipv4Addr) -> Arc<MergedService> {
    list.sort_by(|a, b| (a.1.exported_at_unix_ms, a.0).cmp(&(b.1.exported_at_unix_ms, b.0)));
    if let Some((inputs, done)) = memo.get(key) {
        let same = done.clusterset_ip == ip
            && inputs.len() == list.len()
            && inputs
                .iter()
                .zip(&list)
                .all(|((c, s), (c2, s2))| c == *c2 && same_export(s, s2));
        if same {
            return done.clone();
        }
    }
    let (oldest_cluster, oldest) = list[0];
    let mut ports: Vec<pb::ServicePort> = vec![];
    let mut conflicts = vec![];
    for (cluster, svc) in &list {
        for p in &svc.ports {
            match ports.iter().find(|q| q.port == p.port) {
                None => ports.push(p.clone()),
                Some(q) if q.protocol != p.protocol => conflicts.push(format!(
                    "port {}: cluster {cluster} exports protocol {}, but the oldest export (cluster {oldest_cluster}) says {}; using {}",
                    p.port, p.protocol, q.protocol, q.protocol
                )),
                Some(_) => {}
            }
        }
    }
    ports.sort_by_key(|p| p.port);
    let mut conditions = vec![];
    if conflicts.is_empty() {
        conditions.push(pb::Condition {
            r#type: "Conflict".into(),
            status: "False".into(),
            reason: "NoConflicts".into(),
            message: String::new(),
        });
    } else {
        conditions.push(pb::Condition {
            r#type: "Conflict".into(),
            status: "True".into(),
            reason: "PortConflict".into(),
            message: conflicts.join("; "),
        });
    }
    let mut identities: Vec<String> = list.iter().flat_map(|(_, s)| s.identities.iter().cloned()).collect();
    identities.sort();
    identities.dedup();
    let merged = Arc::new(MergedService {
        name: oldest.name.clone(),
        namespace: oldest.namespace.clone(),
        clusterset_ip: ip,
        ports,
        exports: list.iter().map(|(_, s)| Arc::clone(s)).collect(),
        identities,
        conditions,
        clusters: list.iter().map(|(c, _)| (*c).clone()).collect(),
    });
    memo.insert(
        key.clone(),
        (
            list.iter().map(|(c, s)| ((*c).clone(), Arc::clone(s))).collect(),
            merged.clone(),
        ),
    );
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(name: &str, cluster: &str, at: i64, ports: &[(u32, &str)]) -> pb::ExportedService {
        pb::ExportedService {
            name: name.into(),
            namespace: "demo".into(),
            ports: ports
                .iter()
                .map(|(p, proto)| pb::ServicePort {
                    name: String::new(),
                    port: *p,
                    protocol: (*proto).into(),
                })
                .collect(),
            endpoints: vec![pb::Endpoint {
                address: format!("127.0.0.1:{at}"),
                workload: format!("{name}-{cluster}"),
                locality: Some(pb::Locality {
                    cluster: cluster.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            exported_at_unix_ms: at,
            identities: vec![format!("spiffe://mesh.local/ns/demo/sa/{name}")],
        }
    }

    fn exports(list: Vec<(&str, pb::ExportedService)>) -> BTreeMap<String, Services> {
        let mut out: BTreeMap<String, Services> = BTreeMap::new();
        for (cluster, svc) in list {
            out.entry(cluster.into())
                .or_default()
                .insert(format!("demo/{}", svc.name).into(), Arc::new(svc));
        }
        out
    }

    /// East exports a; west exports a and b.
    fn two_clusters() -> BTreeMap<String, Arc<Services>> {
        let plain = exports(vec![
            ("east", export("a", "east", 1, &[(80, "http")])),
            ("west", export("a", "west", 2, &[(80, "http")])),
            ("west", export("b", "west", 3, &[(80, "http")])),
        ]);
        plain.into_iter().map(|(c, s)| (c, Arc::new(s))).collect()
    }

    #[test]
    fn a_merge_redoes_only_what_changed() {
        let mut memo = MergeMemo::default();
        let range: IpRange = "240.0.0.0/4".parse().unwrap();
        let mut e = two_clusters();
        let from_scratch = |e: &BTreeMap<String, Arc<Services>>| {
            merge(&e.iter().map(|(c, s)| (c.clone(), (**s).clone())).collect(), range)
        };
        // What each cluster's source would report: the services changed since the last merge.
        let mut seen: BTreeMap<String, Arc<Services>> = BTreeMap::new();
        let changes = |seen: &mut BTreeMap<String, Arc<Services>>, e: &BTreeMap<String, Arc<Services>>| {
            let out: Changes = e
                .iter()
                .map(|(c, s)| {
                    (
                        c.clone(),
                        Touched::between(&seen.get(c).cloned().unwrap_or_default(), s),
                    )
                })
                .collect();
            *seen = e.iter().map(|(c, s)| (c.clone(), Arc::new((**s).clone()))).collect();
            out
        };
        let first = merge_with(&mut memo, &e, &changes(&mut seen, &e), range);
        // West moves b's endpoint: b is merged again, a is the very same Arc.
        let mut moved = export("b", "west", 3, &[(80, "http")]);
        moved.endpoints[0].address = "127.0.0.1:9".into();
        Arc::make_mut(e.get_mut("west").unwrap()).insert("demo/b".into(), Arc::new(moved));
        let second = merge_with(&mut memo, &e, &changes(&mut seen, &e), range);
        assert!(Arc::ptr_eq(&first["demo/a"], &second["demo/a"]));
        assert!(!Arc::ptr_eq(&first["demo/b"], &second["demo/b"]));
        assert_eq!(second["demo/b"].endpoints().next().unwrap().address, "127.0.0.1:9");
        // And the result equals a merge from scratch.
        assert_eq!(second, from_scratch(&e));
        // An equal export in a new allocation (a rebuilt catalog) is still the same input.
        let copy = Arc::new((*e["east"]["demo/a"]).clone());
        Arc::make_mut(e.get_mut("east").unwrap()).insert("demo/a".into(), copy);
        assert!(Arc::ptr_eq(
            &first["demo/a"],
            &merge_with(&mut memo, &e, &changes(&mut seen, &e), range)["demo/a"]
        ));
        // A new service (addresses allocated again), a cluster gone, a service gone: each
        // result equals a merge from scratch.
        Arc::make_mut(e.get_mut("east").unwrap())
            .insert("demo/c".into(), Arc::new(export("c", "east", 4, &[(81, "http")])));
        assert_eq!(
            merge_with(&mut memo, &e, &changes(&mut seen, &e), range),
            from_scratch(&e)
        );
        let west = e.remove("west").unwrap();
        let without_west = merge_with(&mut memo, &e, &changes(&mut seen, &e), range);
        assert_eq!(without_west, from_scratch(&e));
        assert_eq!(without_west["demo/a"].clusters, vec!["east".to_string()]);
        e.insert("west".into(), west);
        assert_eq!(
            merge_with(&mut memo, &e, &changes(&mut seen, &e), range),
            from_scratch(&e)
        );
        Arc::make_mut(e.get_mut("west").unwrap()).remove("demo/b");
        let third = merge_with(&mut memo, &e, &changes(&mut seen, &e), range);
        assert!(!third.contains_key("demo/b"));
        assert_eq!(third, from_scratch(&e));
        assert_eq!(memo.by_service.len(), 2);
    }

    #[test]
    fn merged_catalogs_compare_by_pointer_then_value() {
        let range: IpRange = "240.0.0.0/4".parse().unwrap();
        let e = two_clusters();
        let plain = |e: &BTreeMap<String, Arc<Services>>| e.iter().map(|(c, s)| (c.clone(), (**s).clone())).collect();
        let first = merge(&plain(&e), range);
        // The same Arcs, and equal services in new allocations: the same catalog.
        assert!(same_merged(&first, &first.clone()));
        let rebuilt = merge(&plain(&e), range);
        assert!(!Arc::ptr_eq(&first["demo/a"], &rebuilt["demo/a"]));
        assert!(same_merged(&first, &rebuilt));
        // A moved endpoint, a service gone, a service under another name: not the same.
        let mut moved = (*rebuilt["demo/b"]).clone();
        let mut export = (*moved.exports[0]).clone();
        export.endpoints[0].address = "127.0.0.1:9".into();
        moved.exports[0] = Arc::new(export);
        let mut changed = rebuilt.clone();
        changed.insert("demo/b".into(), Arc::new(moved));
        assert!(!same_merged(&first, &changed));
        let mut fewer = rebuilt.clone();
        let b = fewer.remove("demo/b").unwrap();
        assert!(!same_merged(&first, &fewer));
        fewer.insert("demo/z".into(), b);
        assert!(!same_merged(&first, &fewer));
        assert!(same_merged(&Merged::new(), &Merged::new()));
    }

    #[test]
    fn a_merge_looks_at_what_the_changes_name() {
        let mut memo = MergeMemo::default();
        let range: IpRange = "240.0.0.0/4".parse().unwrap();
        let mut e = two_clusters();
        let from_scratch = |e: &BTreeMap<String, Arc<Services>>| {
            merge(&e.iter().map(|(c, s)| (c.clone(), (**s).clone())).collect(), range)
        };
        let keys = |k: &[&str]| Touched::Keys(k.iter().map(|k| Key::from(*k)).collect());
        merge_with(&mut memo, &e, &Changes::new(), range);
        // West's map changed in place (as a peer's update changes it): b is merged again
        // because the changes name it, a is not looked at.
        let mut moved = export("b", "west", 3, &[(80, "http")]);
        moved.endpoints[0].address = "127.0.0.1:9".into();
        Arc::make_mut(e.get_mut("west").unwrap()).insert("demo/b".into(), Arc::new(moved));
        let changes = Changes::from([("west".to_string(), keys(&["demo/b"]))]);
        let second = merge_with(&mut memo, &e, &changes, range);
        assert_eq!(second, from_scratch(&e));
        // A service that came and went between two merges, named in the changes: nothing to do.
        let changes = Changes::from([("east".to_string(), keys(&["demo/gone"]))]);
        assert_eq!(merge_with(&mut memo, &e, &changes, range), from_scratch(&e));
        // A whole new catalog from west (a peer's full update after a reconnect): without b.
        Arc::make_mut(e.get_mut("west").unwrap()).remove("demo/b");
        let moved = export("a", "west", 5, &[(80, "http")]);
        Arc::make_mut(e.get_mut("west").unwrap()).insert("demo/a".into(), Arc::new(moved));
        let changes = Changes::from([("west".to_string(), Touched::All)]);
        let third = merge_with(&mut memo, &e, &changes, range);
        assert!(!third.contains_key("demo/b"));
        assert_eq!(third, from_scratch(&e));
        // Touched sets add up; All absorbs keys.
        let mut t = keys(&["demo/a"]);
        t.add(keys(&["demo/b"]));
        assert_eq!(t, keys(&["demo/a", "demo/b"]));
        t.add(Touched::All);
        t.add(keys(&["demo/c"]));
        assert_eq!(t, Touched::All);
    }

    #[test]
    fn changes_compare_by_pointer_then_value_in_one_walk() {
        let svc = |n: &str, at: i64| Arc::new(export(n, "east", at, &[(80, "http")]));
        let shared = svc("b", 2);
        let before: Services = [
            ("demo/a", svc("a", 1)),
            ("demo/b", shared.clone()),
            ("demo/c", svc("c", 3)),
        ]
        .into_iter()
        .map(|(k, s)| (k.into(), s))
        .collect();
        // a: equal in a new allocation; b: the same Arc; c: gone; d: new; e: changed.
        let mut changed = export("e", "east", 5, &[(80, "http")]);
        let before_e = Arc::new(changed.clone());
        changed.endpoints[0].address = "127.0.0.1:9".into();
        let mut before = before;
        before.insert("demo/e".into(), before_e);
        let now: Services = [
            ("demo/a", svc("a", 1)),
            ("demo/b", shared),
            ("demo/d", svc("d", 4)),
            ("demo/e", Arc::new(changed)),
        ]
        .into_iter()
        .map(|(k, s)| (k.into(), s))
        .collect();
        let found: Vec<(&str, Option<&str>)> = changes(&before, &now)
            .map(|(k, new)| (&**k, new.map(|s| s.endpoints[0].address.as_str())))
            .collect();
        assert_eq!(
            found,
            vec![
                ("demo/c", None),
                ("demo/d", Some("127.0.0.1:4")),
                ("demo/e", Some("127.0.0.1:9"))
            ]
        );
        assert!(changes(&BTreeMap::new(), &now).all(|(_, new)| new.is_some()));
        assert_eq!(changes(&BTreeMap::new(), &now).count(), 4);
        assert!(changes(&now, &BTreeMap::new()).all(|(_, new)| new.is_none()));
        assert_eq!(changes(&now, &now).count(), 0);
    }

    #[test]
    fn union_of_ports_and_endpoints() {
        let e = exports(vec![
            ("east", export("echo", "east", 10, &[(80, "http")])),
            ("west", export("echo", "west", 20, &[(80, "http"), (9090, "tcp")])),
        ]);
        let m = merge(&e, "240.0.0.0/4".parse().unwrap());
        let echo = &m["demo/echo"];
        assert_eq!(echo.ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![80, 9090]);
        assert_eq!(echo.endpoints().count(), 2);
        let workloads: Vec<&str> = echo.endpoints().map(|e| e.workload.as_str()).collect();
        assert_eq!(workloads, vec!["echo-east", "echo-west"], "oldest export first");
        assert_eq!(echo.clusters, vec!["east", "west"]);
        assert_eq!(echo.conditions[0].status, "False");
    }

    #[test]
    fn oldest_export_wins_a_conflict_and_it_is_reported() {
        let e = exports(vec![
            ("east", export("ledger", "east", 50, &[(80, "http")])),
            ("central", export("ledger", "central", 10, &[(80, "tcp")])),
        ]);
        let m = merge(&e, "240.0.0.0/4".parse().unwrap());
        let l = &m["demo/ledger"];
        assert_eq!(l.ports[0].protocol, "tcp");
        assert_eq!(l.conditions[0].status, "True");
        assert!(
            l.conditions[0].message.contains("oldest export (cluster central)"),
            "{}",
            l.conditions[0].message
        );
    }

    #[test]
    fn clusterset_ips_are_stable_unique_and_in_range() {
        let range: IpRange = "240.0.0.0/24".parse().unwrap();
        let keys: Vec<Key> = (0..200).map(|i| format!("demo/svc{i}").into()).collect();
        let a = allocate_ips(&keys, range);
        let mut rev = keys.clone();
        rev.reverse();
        let b = allocate_ips(&rev, range);
        assert_eq!(a, b, "allocation does not depend on discovery order");
        let unique: BTreeSet<_> = a.values().collect();
        assert_eq!(unique.len(), 200);
        assert!(a
            .values()
            .all(|ip| ip.octets()[..3] == [240, 0, 0] && ip.octets()[3] != 0 && ip.octets()[3] != 255));
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
    }
}
