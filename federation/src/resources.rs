//! From the merged catalog to the named, versioned resources the config stream carries, and
//! the diff between two such sets. Pure functions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use strait_api::pb;
use strait_api::pb::resource::Kind;

use crate::catalog::{join, Key, MergeChange, Merged, MergedService};
use crate::objects::Enforcement;

/// Resources by name, as a controller serves them: in [`SHARDS`] shards by a hash of the name,
/// each shared by `Arc` with the states before it that hold the same. A pass replaces only the
/// shards its changes touch, so copying a state, comparing two, diffing what a proxy was sent
/// against the state now and dropping an old one cost what changed, not the catalog's ~600
/// resources (each walk over all of them was a cache miss per entry, on every pass, in every
/// proxy's stream).
#[derive(Clone, Debug)]
pub struct Resources {
    shards: Vec<Arc<Shard>>,
    len: usize,
}

type Shard = BTreeMap<Key, Arc<Built>>;

/// How many shards [`Resources`] has: ~10 resources each at the published size (300 services
/// and their gateway views).
const SHARDS: usize = 64;

/// The shard of a resource name (FNV-1a: stable, and cheap for short names).
fn shard_of(name: &str) -> usize {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % SHARDS as u64) as usize
}

impl Default for Resources {
    fn default() -> Self {
        // One empty shard shared by all: two empty shards are the same by pointer.
        static EMPTY: std::sync::OnceLock<Arc<Shard>> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(Arc::default);
        Resources {
            shards: vec![empty.clone(); SHARDS],
            len: 0,
        }
    }
}

impl Resources {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Built>> {
        self.shards[shard_of(name)].get(name)
    }

    /// Holds `built` under its name; a shard changes (and is copied, if shared) only when
    /// `built` is not the resource it holds there already.
    pub fn insert(&mut self, built: Arc<Built>) {
        let shard = &mut self.shards[shard_of(&built.name)];
        if shard.get(&*built.name).is_some_and(|b| Arc::ptr_eq(b, &built)) {
            return;
        }
        if Arc::make_mut(shard).insert(built.name.clone(), built).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Built>> {
        let shard = &mut self.shards[shard_of(name)];
        if !shard.contains_key(name) {
            return None;
        }
        let gone = Arc::make_mut(shard).remove(name);
        self.len -= gone.is_some() as usize;
        gone
    }

    /// Every resource, shard by shard (in name order within a shard only).
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Arc<Built>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// The shards that differ between `self` and `other` (not the same `Arc`), side by side.
    fn differing<'a>(&'a self, other: &'a Resources) -> impl Iterator<Item = (&'a Shard, &'a Shard)> {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .map(|(a, b)| (&**a, &**b))
    }
}

impl std::ops::Index<&str> for Resources {
    type Output = Arc<Built>;
    fn index(&self, name: &str) -> &Arc<Built> {
        self.get(name).unwrap_or_else(|| panic!("no resource {name}"))
    }
}

/// The full config at one version.
#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    pub version: u64,
    pub resources: Resources,
    /// False right after a (re)start until every peer has been heard from (or one lease
    /// passed): until then the catalog lacks remote services, and serving it to sidecars would
    /// make them drop endpoints that are fine. Gateways get it at once (peers reach this
    /// controller through them).
    pub warm: bool,
    /// For each resource but services (the bulk of the config, and not objects with a status),
    /// the config version at which its current version first went out: a proxy that
    /// acknowledged that version (or a later one) has it.
    pub since: BTreeMap<Key, u64>,
    /// Which services outside a namespace its services' routes send to, for proxies scoped
    /// to namespaces.
    pub reach: Arc<RouteReach>,
    /// The served authorization policies, for proxies scoped by authorization.
    pub authz: Arc<AuthzScope>,
}

/// The authorization policies proxies are sent, compiled once and kept by namespace, for
/// proxies scoped by authorization (`Hello.scope_authorized`): such a proxy is sent only the
/// services that could allow some request of its identity as a caller in this cluster
/// ([`strait_api::authz::may_call`]), evaluated for the workloads of each cluster exporting
/// the service apart where they are known and the answer can differ between clusters: a
/// selector's reach there comes from the label sets of that cluster's endpoints in the merged
/// catalog. Where a policy is not enforced alike in every
/// cluster ([`Enforcement`]: a cluster-scoped policy, a peer's override, a peer that has not
/// taken the version served here), a service is left out only if the workloads of every cluster
/// exporting it refuse the caller under what that cluster enforces: the version served here, an
/// earlier version this controller served (a peer that has not yet taken an edit), or, where
/// that is not known, the version served here reaching some workloads at most (so refusing no
/// caller). An edit of a policy therefore moves no service in and out again while the peers
/// take it. A cluster-scoped policy of another cluster is not seen (peers do not send them): it
/// can only make a service this scope holds refuse a caller there, which the destination still
/// decides.
#[derive(Debug, Default)]
pub struct AuthzScope {
    cluster: String,
    by_namespace: Arc<BTreeMap<String, Vec<strait_api::authz::CompiledAuthz>>>,
    /// Where each served policy is enforced.
    enforcement: Arc<Enforcement>,
    /// Earlier versions of served policies that some cluster still enforces.
    earlier: Arc<Earlier>,
    /// The workloads of each service (`<ns>/<name>`) of the namespaces a selector or a partly
    /// enforced policy could reach.
    workloads: HashMap<Key, Workloads>,
    /// Where this scope stands in the sequence the controller made (0: made alone), and the
    /// services whose place in a scope may have moved since the one before it.
    seq: u64,
    moved: Moved,
}

/// Services whose place in an authorization scope may have moved between two scopes: those
/// of the namespaces whose policies or their enforcement changed, and those whose workloads
/// changed (`all`: the root namespace's policies changed, or the scopes are not consecutive).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Moved {
    all: bool,
    namespaces: BTreeSet<String>,
    services: BTreeSet<Key>,
}

impl Moved {
    fn all() -> Self {
        Moved {
            all: true,
            ..Default::default()
        }
    }

    /// Whether resource `name` is a service that may have moved.
    pub fn covers(&self, name: &str) -> bool {
        let Some(key) = name.strip_prefix("service/") else {
            return false;
        };
        self.all
            || key.split_once('/').is_some_and(|(ns, _)| self.namespaces.contains(ns))
            || self.services.contains(key)
    }

    /// Adds namespace `ns` (every namespace when it is the root namespace).
    fn namespace(&mut self, ns: &str) {
        if ns == strait_api::authz::ROOT_NAMESPACE {
            self.all = true;
        } else {
            self.namespaces.insert(ns.to_string());
        }
    }
}

/// Earlier versions of served policies, by namespace and name.
type Earlier = BTreeMap<String, BTreeMap<String, Vec<EarlierVersion>>>;

/// A version of a policy served here before its generation changed, kept while some cluster
/// still enforces it.
#[derive(Debug, Clone)]
struct EarlierVersion {
    origin: String,
    generation: u64,
    policy: strait_api::authz::CompiledAuthz,
}

/// One origin's generation is one content.
impl PartialEq for EarlierVersion {
    fn eq(&self, other: &Self) -> bool {
        (&self.origin, self.generation) == (&other.origin, other.generation)
    }
}

/// The keys (namespaces) whose values differ between two maps.
fn differing<'a, K: Ord, V: PartialEq>(a: &'a BTreeMap<K, V>, b: &'a BTreeMap<K, V>) -> impl Iterator<Item = &'a K> {
    a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k))
}

/// What the controller keeps to scope proxies by authorization: the policies last served, where
/// they are enforced, the workloads their reach needs, and the [`AuthzScope`] made of these (a
/// new one only when one of them changed).
#[derive(Debug, Default)]
pub struct AuthzScopes {
    served: Vec<pb::AuthorizationPolicy>,
    policies: AuthzScope,
    workloads: ServiceWorkloads,
    current: Arc<AuthzScope>,
}

impl AuthzScopes {
    /// The scope for the policies now served (`policies`), enforced as `enforcement` says, over
    /// the catalog `merged`.
    pub fn update(
        &mut self,
        cluster: &str,
        policies: &[pb::AuthorizationPolicy],
        enforcement: &Enforcement,
        merged: &Merged,
    ) -> Arc<AuthzScope> {
        let mut moved = Moved::default();
        let (served_before, enforcement_before) =
            (self.policies.by_namespace.clone(), self.policies.enforcement.clone());
        if self.served != policies {
            fn by_namespace(ps: &[pb::AuthorizationPolicy]) -> BTreeMap<&str, Vec<&pb::AuthorizationPolicy>> {
                let mut m: BTreeMap<&str, Vec<&pb::AuthorizationPolicy>> = BTreeMap::new();
                for p in ps {
                    m.entry(p.namespace.as_str()).or_default().push(p);
                }
                m
            }
            let (before, now) = (by_namespace(&self.served), by_namespace(policies));
            differing(&before, &now).for_each(|ns| moved.namespace(ns));
            self.served = policies.to_vec();
            self.policies.cluster = cluster.to_string();
            self.policies.by_namespace = Arc::new(compiled(policies));
        }
        if *self.policies.enforcement != *enforcement {
            differing(&self.policies.enforcement, enforcement).for_each(|ns| moved.namespace(ns));
            self.policies.enforcement = Arc::new(enforcement.clone());
        }
        if !Arc::ptr_eq(&served_before, &self.policies.by_namespace)
            || !Arc::ptr_eq(&enforcement_before, &self.policies.enforcement)
        {
            let earlier = self.policies.earlier_after(&served_before, &enforcement_before);
            if earlier != *self.policies.earlier {
                differing(&self.policies.earlier, &earlier).for_each(|ns| moved.namespace(ns));
                self.policies.earlier = Arc::new(earlier);
            }
        }
        let workloads_changed = if self.policies.needs_workloads_any() {
            let policies = &self.policies;
            self.workloads.update(merged, |ns| policies.needs_workloads_in(ns))
        } else {
            self.workloads.clear()
        };
        moved.services.extend(workloads_changed);
        if moved != Moved::default() {
            let mut next = self.policies.with_workloads(&self.workloads);
            next.seq = self.current.seq + 1;
            next.moved = moved;
            self.current = Arc::new(next);
        }
        self.current.clone()
    }
}

/// What scoping by authorization reads of a service's workloads: each cluster exporting it,
/// with the distinct label sets of its workloads there (sorted; a selector's reach in that
/// cluster).
#[derive(Clone, Debug, PartialEq)]
struct Workloads(Arc<[(String, LabelSets)]>);

/// Distinct label sets, sorted.
type LabelSets = Vec<BTreeMap<String, String>>;

impl Workloads {
    fn of(svc: &MergedService) -> Self {
        let exports = svc.clusters.iter().enumerate().map(|(i, cluster)| {
            let endpoints = svc.exports.get(i).map_or(&[][..], |x| &x.endpoints[..]);
            (cluster.clone(), label_sets(endpoints))
        });
        Workloads(exports.collect())
    }
}

/// The [`Workloads`] of each service, kept for the services of the namespaces that need them,
/// and made again only for a service the merge changed (a new `Arc`).
#[derive(Debug, Default)]
struct ServiceWorkloads(HashMap<Key, (Arc<MergedService>, Workloads)>);

impl ServiceWorkloads {
    /// Brings the sets up to `merged` for the services of the namespaces `wanted` holds for;
    /// the services whose workloads changed (or came or went).
    fn update(&mut self, merged: &Merged, wanted: impl Fn(&str) -> bool) -> Vec<Key> {
        let mut changed = vec![];
        self.0.retain(|k, _| {
            let keep = merged.get(k).is_some_and(|s| wanted(&s.namespace));
            if !keep {
                changed.push(k.clone());
            }
            keep
        });
        for (k, svc) in merged {
            if !wanted(&svc.namespace) {
                continue;
            }
            let entry = self.0.get_mut(k);
            if entry.as_ref().is_some_and(|(from, _)| Arc::ptr_eq(from, svc)) {
                continue;
            }
            let workloads = Workloads::of(svc);
            match entry {
                Some((from, old)) => {
                    *from = svc.clone();
                    if *old != workloads {
                        *old = workloads;
                        changed.push(k.clone());
                    }
                }
                None => {
                    self.0.insert(k.clone(), (svc.clone(), workloads));
                    changed.push(k.clone());
                }
            }
        }
        changed
    }

    /// Forgets every service; those there were.
    fn clear(&mut self) -> Vec<Key> {
        self.0.drain().map(|(k, _)| k).collect()
    }
}

/// The distinct label sets of endpoints, sorted (a set is copied only when new).
fn label_sets(endpoints: &[pb::Endpoint]) -> LabelSets {
    let mut sets: Vec<BTreeMap<String, String>> = vec![];
    for e in endpoints {
        let same = |s: &BTreeMap<String, String>| {
            s.len() == e.labels.len() && s.iter().all(|(k, v)| e.labels.get(k) == Some(v))
        };
        if !sets.iter().any(same) {
            sets.push(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
    }
    sets.sort();
    sets
}

/// The policies that compile, by namespace.
fn compiled(policies: &[pb::AuthorizationPolicy]) -> BTreeMap<String, Vec<strait_api::authz::CompiledAuthz>> {
    let mut by_namespace: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for p in policies {
        if let Ok(c) = strait_api::authz::compile_wire(p) {
            by_namespace.entry(p.namespace.clone()).or_default().push(c);
        }
    }
    by_namespace
}

impl AuthzScope {
    /// From the policies proxies are sent (one that does not compile is left out, so it
    /// refuses nothing here: proxies refuse it too), enforced as `enforcement` says.
    pub fn of(cluster: &str, policies: &[pb::AuthorizationPolicy], enforcement: Arc<Enforcement>) -> Self {
        AuthzScope {
            cluster: cluster.to_string(),
            by_namespace: Arc::new(compiled(policies)),
            enforcement,
            earlier: Default::default(),
            workloads: HashMap::new(),
            seq: 0,
            moved: Moved::all(),
        }
    }

    /// The same policies, with the workloads `workloads` holds.
    fn with_workloads(&self, workloads: &ServiceWorkloads) -> Self {
        AuthzScope {
            cluster: self.cluster.clone(),
            by_namespace: self.by_namespace.clone(),
            enforcement: self.enforcement.clone(),
            earlier: self.earlier.clone(),
            workloads: workloads.0.iter().map(|(k, (_, w))| (k.clone(), w.clone())).collect(),
            seq: 0,
            moved: Moved::all(),
        }
    }

    /// The services whose place in the scope may have moved since `before` (a scope of the same
    /// sequence, or any: then every service).
    pub fn moved_since(&self, before: &AuthzScope) -> std::borrow::Cow<'_, Moved> {
        if self.seq > 0 && self.seq == before.seq + 1 {
            std::borrow::Cow::Borrowed(&self.moved)
        } else {
            std::borrow::Cow::Owned(Moved::all())
        }
    }

    /// Whether a policy that may reach some workloads of a service and not others (one with a
    /// selector, or one not enforced in every cluster) could reach services of namespace `ns`.
    fn needs_workloads_in(&self, ns: &str) -> bool {
        use strait_api::authz::{Scope, ROOT_NAMESPACE};
        let selects = |ps: Option<&Vec<strait_api::authz::CompiledAuthz>>| {
            ps.is_some_and(|ps| {
                ps.iter()
                    .any(|p| matches!(&p.scope, Scope::Selector(want) if !want.is_empty()))
            })
        };
        [ROOT_NAMESPACE, ns].iter().any(|n| {
            selects(self.by_namespace.get(*n))
                || self
                    .enforcement
                    .get(*n)
                    .is_some_and(|ps| ps.values().any(|e| e.clusters.is_some()))
        })
    }

    /// Whether any policy needs the workloads of the services it reaches.
    fn needs_workloads_any(&self) -> bool {
        self.by_namespace.keys().any(|ns| self.needs_workloads_in(ns))
    }

    /// Where policy `p` is not enforced alike in every cluster, where it is.
    fn partly_enforced(&self, p: &strait_api::authz::CompiledAuthz) -> Option<&crate::objects::Enforcing> {
        let e = self.enforcement.get(&p.namespace)?.get(&p.name)?;
        e.clusters.is_some().then_some(e)
    }

    /// The version of `p` that cluster `at` enforces, and whether that is known (`at` `None`:
    /// the clusters are not known). Unknown, it is `p` as served here.
    fn version_in<'a>(
        &'a self,
        p: &'a strait_api::authz::CompiledAuthz,
        at: Option<&str>,
    ) -> (&'a strait_api::authz::CompiledAuthz, bool) {
        let Some(e) = self.partly_enforced(p) else {
            return (p, true);
        };
        let Some(cluster) = at else {
            return (p, false);
        };
        if e.enforced_in(cluster) {
            return (p, true);
        }
        let Some(generation) = e.clusters.as_ref().and_then(|cs| cs.get(cluster)) else {
            return (p, false);
        };
        let earlier = self.earlier.get(&p.namespace).and_then(|names| names.get(&p.name));
        match earlier
            .into_iter()
            .flatten()
            .find(|v| v.origin == e.origin && v.generation == *generation)
        {
            Some(v) => (&v.policy, true),
            None => (p, false),
        }
    }

    /// What is worth keeping of the earlier versions (this scope's, and those of `served_before`
    /// as `enforcement_before` knew them): each one another generation has since replaced here
    /// and some cluster still enforces.
    fn earlier_after(
        &self,
        served_before: &BTreeMap<String, Vec<strait_api::authz::CompiledAuthz>>,
        enforcement_before: &Enforcement,
    ) -> Earlier {
        let replaced = served_before.values().flatten().filter_map(|p| {
            let e = enforcement_before.get(&p.namespace)?.get(&p.name)?;
            Some((p, e.origin.as_str(), e.generation))
        });
        let kept = self
            .earlier
            .values()
            .flat_map(|names| names.values().flatten())
            .map(|v| (&v.policy, v.origin.as_str(), v.generation));
        let mut out = Earlier::new();
        for (p, origin, generation) in kept.chain(replaced) {
            let Some(now) = self.enforcement.get(&p.namespace).and_then(|names| names.get(&p.name)) else {
                continue;
            };
            let enforced = now.origin == origin
                && now.generation != generation
                && now
                    .clusters
                    .as_ref()
                    .is_some_and(|cs| cs.values().any(|g| *g == generation));
            if !enforced {
                continue;
            }
            let versions = out
                .entry(p.namespace.clone())
                .or_default()
                .entry(p.name.clone())
                .or_default();
            if !versions
                .iter()
                .any(|v| v.origin == origin && v.generation == generation)
            {
                versions.push(EarlierVersion {
                    origin: origin.to_string(),
                    generation,
                    policy: p.clone(),
                });
            }
        }
        out
    }

    /// Whether a proxy of identity `principal` scoped by authorization is sent resource
    /// `name`: every resource but a service whose workloads, in every cluster exporting it,
    /// refuse the principal everything under the policies that cluster enforces.
    pub fn may_call(&self, principal: &str, name: &str) -> bool {
        use strait_api::authz::{may_call, reach_over, Peer, Reach, Scope, ROOT_NAMESPACE};
        if self.by_namespace.is_empty() {
            return true;
        }
        let Some(key) = name.strip_prefix("service/") else {
            return true;
        };
        let Some((ns, service)) = key.split_once('/') else {
            return true;
        };
        let root = self.by_namespace.get(ROOT_NAMESPACE).filter(|_| ns != ROOT_NAMESPACE);
        let own = self.by_namespace.get(ns);
        if root.is_none() && own.is_none() {
            // Most namespaces: no policy, nothing to look at.
            return true;
        }
        let listed = || root.into_iter().chain(own).flatten();
        let peer = Peer {
            principal: Some(principal),
            cluster: Some(&self.cluster),
        };
        // Whether the workloads in cluster `at`, of these label sets, may let it in (`None`:
        // wherever they are, labels not known).
        let may_in = |at: Option<&str>, labels: &[BTreeMap<String, String>]| {
            let policies: Vec<_> = listed()
                .map(|p| {
                    let (version, known) = self.version_in(p, at);
                    match reach_over(version, service, ns, labels) {
                        Reach::Every if !known => (version, Reach::Some),
                        reach => (version, reach),
                    }
                })
                .filter(|(_, r)| *r != Reach::None)
                .collect();
            policies.is_empty() || may_call(&policies, &peer)
        };
        // Each cluster apart only where that can differ: a policy not enforced alike
        // everywhere, or one whose reach depends on labels.
        let apart = listed().any(|p| {
            self.partly_enforced(p).is_some() || matches!(&p.scope, Scope::Selector(want) if !want.is_empty())
        });
        match self.workloads.get(key) {
            Some(w) if apart && !w.0.is_empty() => w.0.iter().any(|(c, labels)| may_in(Some(c), labels)),
            _ => may_in(None, &[]),
        }
    }
}

/// For each namespace, the services of other namespaces that the routes for its services
/// send to (backends and mirrors), by resource name. A proxy scoped to some namespaces is sent
/// these too, or a route there would send its requests to a service the proxy does not know
/// (Gateway API answers such a request 500).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteReach(BTreeMap<String, BTreeSet<Key>>);

impl RouteReach {
    /// From the routes proxies are sent (a route's spec that does not parse reaches nothing:
    /// proxies do not serve it either).
    pub fn of(routes: &[pb::HttpRoute]) -> Self {
        let mut reach: BTreeMap<String, BTreeSet<Key>> = BTreeMap::new();
        for r in routes {
            let Ok(spec) = serde_json::from_str::<strait_api::routes::HttpRouteSpec>(&r.spec_json) else {
                continue;
            };
            let (parents, backends) = strait_api::routes::route_services(&r.namespace, &spec);
            for parent in &parents {
                let ns = parent.split('/').next().unwrap_or_default();
                for b in &backends {
                    if b.split('/').next() != Some(ns) {
                        reach
                            .entry(ns.to_string())
                            .or_default()
                            .insert(format!("service/{b}").into());
                    }
                }
            }
        }
        RouteReach(reach)
    }

    /// The services a proxy scoped to `namespaces` is sent beyond them (none for a proxy of
    /// every namespace).
    pub fn beyond(&self, namespaces: &[String]) -> BTreeSet<Key> {
        namespaces
            .iter()
            .filter_map(|ns| self.0.get(ns))
            .flatten()
            .filter(|k| {
                !namespaces
                    .iter()
                    .any(|ns| k.strip_prefix("service/").and_then(|r| r.split('/').next()) == Some(ns))
            })
            .cloned()
            .collect()
    }
}

impl ConfigState {
    /// The `since` map of a new state at `version`, carried over from `previous` for every
    /// resource whose version did not change.
    /// Only the shards that changed are looked at: the rest hold what they held, since included.
    pub fn since_from(previous: &ConfigState, resources: &Resources, version: u64) -> BTreeMap<Key, u64> {
        let mut since = previous.since.clone();
        for (before, now) in previous.resources.differing(resources) {
            for (k, old, new) in join(before, now) {
                if is_service(k) {
                    continue;
                }
                match (old, new) {
                    (Some(old), Some(new)) if old.version == new.version => {}
                    (_, Some(_)) => {
                        since.insert(k.clone(), version);
                    }
                    (_, None) => {
                        since.remove(k);
                    }
                }
            }
        }
        since
    }
}

/// Resources only gateways receive: the controller's own peering service, and each service's
/// gateway view ([`LOCAL_VIEW`]).
pub fn gateway_only(name: &str) -> bool {
    name.starts_with(LOCAL_VIEW)
        || name
            .strip_prefix("service/")
            .and_then(|rest| rest.strip_prefix(strait_api::SYSTEM_NAMESPACE))
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Resources gateways do not receive: the clusterset's services with every cluster's endpoints,
/// which they get as their [`LOCAL_VIEW`] instead.
pub fn sidecar_only(name: &str) -> bool {
    name.starts_with("service/") && !gateway_only(name)
}

/// The prefix of a service's gateway view, `local/service/<ns>/<name>`: the service with only
/// this cluster's endpoints. A gateway forwards tunnels to local endpoints alone, so it needs no
/// other; the view changes only when they (or the service itself) do, not with every endpoint
/// change elsewhere in the clusterset, which was most of a gateway's work under churn.
pub use strait_api::snapshot::LOCAL_VIEW;

/// Whether a resource is a service (either form).
pub fn is_service(name: &str) -> bool {
    name.strip_prefix(LOCAL_VIEW).unwrap_or(name).starts_with("service/")
}

/// A resource as the config stream sends it: its name, its version (a digest of its content)
/// and its encoding as a `pb::Resource` ([`Built::wire`]), made once and shared by every
/// proxy's stream. The controller keeps nothing else of it: the decoded form (a service's
/// endpoints above all) was a copy of what the merge already holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    /// The name, shared with every map that holds the resource.
    pub name: Key,
    pub version: String,
    wire: Wire,
    /// A clusterset service also in parts, for proxies that take it so
    /// (`Hello.accepts_endpoint_parts`): an endpoint change in one cluster then sends them that
    /// cluster's endpoints, not every cluster's. `None` for every other resource.
    pub split: Option<Box<Split>>,
}

/// A service as its fields and one resource per exporting cluster's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// `service/<ns>/<name>` without endpoints.
    pub head: Built,
    /// `endpoints/<ns>/<name>/<cluster>`, one per exporting cluster, in cluster-name order
    /// (the order in which proxies join them).
    pub parts: Vec<Arc<Built>>,
}

/// A resource's encoding: its bytes, or (a clusterset service's whole form) the pieces they are
/// joined from when first asked for. Proxies that take services in parts (every proxy of this
/// version) are never sent the whole form, so a controller serving only them never writes it:
/// copying every cluster's endpoints into it on each change was a third of building a changed
/// service, and holding it a copy of the whole catalog's endpoints.
#[derive(Clone, Debug)]
enum Wire {
    Bytes(Bytes),
    /// The bytes before the endpoints, each part's endpoints (slices of the parts' own
    /// encodings, not copies) and the bytes after them.
    Pieces {
        pieces: Vec<Bytes>,
        joined: std::sync::OnceLock<Bytes>,
    },
}

impl Wire {
    /// `pieces` as they are sent: joined at once, or `in_pieces` when first asked for.
    fn of(pieces: Vec<Bytes>, in_pieces: bool) -> Wire {
        if in_pieces {
            Wire::Pieces {
                pieces,
                joined: Default::default(),
            }
        } else {
            Wire::Bytes(join_pieces(&pieces))
        }
    }

    fn bytes(&self) -> &Bytes {
        match self {
            Wire::Bytes(b) => b,
            Wire::Pieces { pieces, joined } => joined.get_or_init(|| join_pieces(pieces)),
        }
    }
}

fn join_pieces(pieces: &[Bytes]) -> Bytes {
    let mut buf = Vec::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in pieces {
        buf.extend_from_slice(p);
    }
    buf.into()
}

impl PartialEq for Wire {
    fn eq(&self, other: &Wire) -> bool {
        self.bytes() == other.bytes()
    }
}

/// The version for a digest: its first 8 bytes in hex.
fn version_of(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Built {
    /// `buf` is the resource encoded without a version (its name and kind): the version is a
    /// digest of those bytes, appended as `Resource.version` (a field may come in any order).
    fn finish(name: Key, buf: Vec<u8>) -> Built {
        let digest = Sha256::digest(&buf);
        Built::with_version(name, buf, &digest)
    }

    /// `buf` as [`Built::finish`] takes it, with the digest that stands for its content.
    fn with_version(name: Key, mut buf: Vec<u8>, digest: &[u8]) -> Built {
        let version = version_of(digest);
        prost::encoding::string::encode(RESOURCE_VERSION, &version, &mut buf);
        Built {
            name,
            version,
            wire: Wire::Bytes(buf.into()),
            split: None,
        }
    }

    /// The resource encoded as a `pb::Resource`, as the config stream sends it.
    pub fn wire(&self) -> &Bytes {
        self.wire.bytes()
    }

    /// The resource as a proxy decodes it.
    pub fn decode(&self) -> Result<pb::Resource, prost::DecodeError> {
        pb::Resource::decode(self.wire().clone())
    }
}

/// `Resource`'s field numbers that [`Built`] writes itself (`proto/strait.proto`; the unit
/// tests decode what is written and compare).
const RESOURCE_NAME: u32 = 1;
const RESOURCE_VERSION: u32 = 2;
const RESOURCE_SERVICE: u32 = 3;
const RESOURCE_SERVICE_ENDPOINTS: u32 = 11;
const SERVICE_ENDPOINTS: u32 = 5;

pub(crate) fn resource(name: String, kind: Kind) -> Built {
    let r = pb::Resource {
        name,
        version: String::new(),
        kind: Some(kind),
    };
    let buf = r.encode_to_vec();
    Built::finish(r.name.into(), buf)
}

/// `rateshare/<ns>/<name>`: a destination-total rate limit's shares for its sidecars.
pub fn rate_shares_resource(body: pb::RateShares) -> Built {
    resource(
        format!("rateshare/{}/{}", body.namespace, body.name),
        Kind::RateShares(body),
    )
}

/// One cluster's export of a service, encoded once as a resource of its own
/// (`endpoints/<ns>/<name>/<cluster>`, a `pb::ServiceEndpoints`) whose endpoints (field 5,
/// repeated, as in `pb::Service`) the service's whole form copies, with a digest of those bytes.
/// Made once per export and kept by [`BuildMemo`] while the export is the same `Arc`: a change
/// in one cluster encodes and hashes that cluster's endpoints, not every cluster's (it was most
/// of a controller's work under churn).
struct Part {
    export: Arc<pb::ExportedService>,
    resource: Arc<Built>,
    /// Where the endpoints lie in `resource.wire`.
    endpoints: std::ops::Range<usize>,
    digest: [u8; 32],
}

impl Part {
    fn new(svc: &MergedService, cluster: &str, export: &Arc<pb::ExportedService>) -> Arc<Part> {
        use prost::encoding::{encode_key, encode_varint, string, WireType};
        let endpoints: usize = export
            .endpoints
            .iter()
            .map(|e| prost::encoding::message::encoded_len(SERVICE_ENDPOINTS, e))
            .sum();
        // Fields 1-3 as prost writes them (an empty string is left out), then the endpoints.
        let fields = [(1, &svc.namespace), (2, &svc.name), (3, &cluster.to_string())];
        let body = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(tag, v)| string::encoded_len(*tag, v))
            .sum::<usize>()
            + endpoints;
        let name = format!("endpoints/{}/{}/{cluster}", svc.namespace, svc.name);
        let mut buf = Vec::with_capacity(name.len() + body + 48);
        string::encode(RESOURCE_NAME, &name, &mut buf);
        encode_key(RESOURCE_SERVICE_ENDPOINTS, WireType::LengthDelimited, &mut buf);
        encode_varint(body as u64, &mut buf);
        for (tag, v) in fields.iter().filter(|(_, v)| !v.is_empty()) {
            string::encode(*tag, v, &mut buf);
        }
        let start = buf.len();
        for e in &export.endpoints {
            prost::encoding::message::encode(SERVICE_ENDPOINTS, e, &mut buf);
        }
        let range = start..buf.len();
        let digest: [u8; 32] = Sha256::digest(&buf[range.clone()]).into();
        Arc::new(Part {
            export: export.clone(),
            resource: Arc::new(Built::with_version(name.into(), buf, &digest)),
            endpoints: range,
            digest,
        })
    }

    /// The endpoints' bytes, as field 5 of a `pb::Service` (a slice of the part's encoding).
    fn endpoint_bytes(&self) -> Bytes {
        self.resource.wire().slice(self.endpoints.clone())
    }

    /// The part of `export` in `old` (by pointer), or a new one.
    fn reuse_or_new(
        old: &[Arc<Part>],
        svc: &MergedService,
        cluster: &str,
        export: &Arc<pb::ExportedService>,
    ) -> Arc<Part> {
        old.iter()
            .find(|p| Arc::ptr_eq(&p.export, export))
            .cloned()
            .unwrap_or_else(|| Part::new(svc, cluster, export))
    }
}

/// `service/<ns>/<name>`, encoded straight from the merged service: its endpoints are written
/// from the parts of the exports that hold them (`parts`, in `svc.exports` order), not copied
/// into a `pb::Service` first. The same fields as a `pb::Service` made from it, in the same
/// order; the whole form's bytes are joined only for a proxy that asks for it.
fn service_resource(svc: &MergedService, parts: &[Arc<Part>]) -> Built {
    let name = format!("service/{}/{}", svc.namespace, svc.name);
    let head = encode_service(name.clone(), svc, &[], false);
    let mut by_cluster: Vec<(&String, &Arc<Part>)> = svc.clusters.iter().zip(parts).collect();
    by_cluster.sort_by(|a, b| a.0.cmp(b.0));
    let mut whole = encode_service(name, svc, parts, true);
    whole.split = Some(Box::new(Split {
        head,
        parts: by_cluster.into_iter().map(|(_, p)| p.resource.clone()).collect(),
    }));
    whole
}

/// The gateway view of a service in cluster `local` (`local/service/<ns>/<name>`): the same
/// service with only the endpoints `local` exports.
fn local_service_resource(svc: &MergedService, parts: &[Arc<Part>], local: &str) -> Built {
    let only = svc.clusters.iter().position(|c| c == local).and_then(|i| parts.get(i));
    encode_service(
        format!("{LOCAL_VIEW}service/{}/{}", svc.namespace, svc.name),
        svc,
        only.map(std::slice::from_ref).unwrap_or_default(),
        false,
    )
}

/// A service resource named `name` with the endpoints of `parts`. Its version is a digest of
/// the bytes before the endpoints, each part's digest and the bytes after, each with its
/// length: the same content gives the same version in every build and controller, and a
/// change anywhere a new one, without hashing every endpoint again.
/// `in_pieces`: its bytes are joined only when first asked for ([`Wire::Pieces`]).
fn encode_service(name: String, svc: &MergedService, parts: &[Arc<Part>], in_pieces: bool) -> Built {
    use prost::encoding::{encode_key, encode_varint, string, WireType};
    // Fields 1-4, then the endpoints (5), then 6 and 7: prost writes them in this order.
    let head = pb::Service {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        clusterset_ip: svc.clusterset_ip.to_string(),
        ports: svc.ports.clone(),
        ..Default::default()
    };
    let tail = pb::Service {
        conditions: svc.conditions.clone(),
        identities: svc.identities.clone(),
        ..Default::default()
    };
    let endpoints: usize = parts.iter().map(|p| p.endpoints.len()).sum();
    let body = head.encoded_len() + endpoints + tail.encoded_len();
    // Up to the endpoints: the name, the field's key and length, fields 1-4.
    let mut buf = Vec::with_capacity(name.len() + head.encoded_len() + 24);
    string::encode(RESOURCE_NAME, &name, &mut buf);
    encode_key(RESOURCE_SERVICE, WireType::LengthDelimited, &mut buf);
    encode_varint(body as u64, &mut buf);
    head.encode(&mut buf).expect("a Vec grows to fit");
    let mut digest = Sha256::new();
    let mut segment = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    segment(&buf);
    // The bytes before the endpoints, each part's endpoints (slices of its own encoding), the
    // bytes after them with the version.
    let mut pieces = Vec::with_capacity(parts.len() + 2);
    pieces.push(Bytes::from(buf));
    for p in parts {
        segment(&p.digest);
        pieces.push(p.endpoint_bytes());
    }
    let mut after = tail.encode_to_vec();
    segment(&after);
    let version = version_of(&digest.finalize());
    string::encode(RESOURCE_VERSION, &version, &mut after);
    pieces.push(after.into());
    Built {
        name: name.into(),
        version,
        wire: Wire::of(pieces, in_pieces),
        split: None,
    }
}

/// Each service's resources (its whole form and its gateway view in cluster `local`) from the
/// last build, by the merged service they were made from: an unchanged service (the same
/// `Arc`) is not encoded and hashed again; nor is any other resource whose content is the
/// same as in the last build (gateways, bundles, routes and policies are built on every pass).
/// It holds the last build's resources too, and changes them in place: a pass after a merge
/// that says which services it changed ([`MergeChange`]) looks at those alone.
pub struct BuildMemo {
    local: String,
    by_service: HashMap<Key, Memoized>,
    others: HashMap<String, (Kind, Arc<Built>)>,
    /// The names of the last build's resources that are not services (they are built, or
    /// given, on every pass: one not given again is gone).
    other_names: BTreeSet<Key>,
    resources: Resources,
    /// The generation of the merge the last build was made from.
    built_from: Option<u64>,
}

struct Memoized {
    made_from: Arc<MergedService>,
    /// The parts of `made_from.exports`, in order.
    parts: Vec<Arc<Part>>,
    whole: Arc<Built>,
    view: Arc<Built>,
}

impl BuildMemo {
    /// For the proxies of cluster `local`.
    pub fn new(local: &str) -> Self {
        BuildMemo {
            local: local.to_string(),
            by_service: HashMap::new(),
            others: HashMap::new(),
            other_names: BTreeSet::new(),
            resources: Resources::default(),
            built_from: None,
        }
    }

    /// Makes `key`'s resources from `svc` (or removes them, when it is gone), unless they were
    /// made from the same `Arc`.
    fn service(&mut self, key: &Key, svc: Option<&Arc<MergedService>>) {
        let Some(svc) = svc else {
            if let Some(m) = self.by_service.remove(key) {
                self.resources.remove(&m.whole.name);
                self.resources.remove(&m.view.name);
            }
            return;
        };
        let old = self.by_service.get(key);
        if old.is_some_and(|m| Arc::ptr_eq(&m.made_from, svc)) {
            return;
        }
        let old_parts = old.map(|m| m.parts.as_slice()).unwrap_or_default();
        let parts: Vec<Arc<Part>> = svc
            .exports
            .iter()
            .zip(&svc.clusters)
            .map(|(e, c)| Part::reuse_or_new(old_parts, svc, c, e))
            .collect();
        let whole = Arc::new(service_resource(svc, &parts));
        // A view that is, or comes out, as before stays the same `Arc`: gateways' streams skip
        // it by pointer. Most changes are to other clusters' exports, which the view does not
        // hold: it is not encoded again for those.
        let view = match old {
            Some(m) if same_view(&m.made_from, svc, &self.local) => m.view.clone(),
            _ => {
                let view = local_service_resource(svc, &parts, &self.local);
                match old {
                    Some(m) if m.view.version == view.version => m.view.clone(),
                    _ => Arc::new(view),
                }
            }
        };
        self.resources.insert(whole.clone());
        self.resources.insert(view.clone());
        let m = Memoized {
            made_from: svc.clone(),
            parts,
            whole,
            view,
        };
        self.by_service.insert(key.clone(), m);
    }
}

/// What a build holds besides the merged catalog's services.
#[derive(Clone, Copy)]
pub struct Others<'a> {
    /// The controller's own services (its peering endpoint).
    pub system_services: &'a [pb::Service],
    pub gateways: &'a [pb::Gateway],
    pub policy: &'a pb::LocalityPolicy,
    pub bundles: &'a [pb::TrustBundle],
    pub objects: &'a crate::objects::Checked,
    /// Resources built elsewhere (each destination-total rate limit's shares).
    pub built: &'a [Arc<Built>],
}

/// Whether `svc`'s gateway view in cluster `local` is the one made from `old`: the same export
/// from `local` (by pointer; an export that did not change is the same `Arc` from its source
/// on) and the same fields beside the endpoints.
fn same_view(old: &MergedService, svc: &MergedService, local: &str) -> bool {
    let same_export = match (old.export_of(local), svc.export_of(local)) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    same_export
        && old.name == svc.name
        && old.namespace == svc.namespace
        && old.clusterset_ip == svc.clusterset_ip
        && old.ports == svc.ports
        && old.identities == svc.identities
        && old.conditions == svc.conditions
}

/// Whether two builds hold the same resources (names and versions; a version is a digest of
/// the content).
pub fn same_versions(a: &Resources, b: &Resources) -> bool {
    a.len() == b.len()
        && a.differing(b).all(|(x, y)| {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, ra), (kb, rb))| ka == kb && ra.version == rb.version)
        })
}

/// Everything proxies of cluster `local` receive.
pub fn build(local: &str, merged: &Merged, others: &Others) -> Resources {
    build_with(&mut BuildMemo::new(local), merged, MergeChange::ANY, others)
}

/// [`build`], reusing from `memo` the resource of every service that did not change. When
/// `change` is the merge right after the one `memo` last built from and names the services it
/// changed, only those are looked at; else every service of `merged`.
pub fn build_with(memo: &mut BuildMemo, merged: &Merged, change: MergeChange, others: &Others) -> Resources {
    let follows = change.generation != 0 && memo.built_from == Some(change.generation - 1);
    match change.keys.filter(|_| follows) {
        Some(keys) => {
            for key in keys {
                memo.service(key, merged.get(key));
            }
        }
        None => {
            for (key, svc) in merged {
                memo.service(key, Some(svc));
            }
            let gone: Vec<Key> = memo
                .by_service
                .keys()
                .filter(|k| !merged.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                memo.service(&key, None);
            }
        }
    }
    memo.built_from = (change.generation != 0).then_some(change.generation);
    let mut kept = std::mem::take(&mut memo.others);
    let mut names = BTreeSet::new();
    let mut add = |memo: &mut BuildMemo, name: String, kind: Kind| {
        let built = match kept.remove(&name) {
            Some((was, built)) if was == kind => built,
            _ => Arc::new(resource(name.clone(), kind.clone())),
        };
        names.insert(built.name.clone());
        memo.resources.insert(built.clone());
        memo.others.insert(name, (kind, built));
    };
    for s in others.system_services {
        add(
            memo,
            format!("service/{}/{}", s.namespace, s.name),
            Kind::Service(s.clone()),
        );
    }
    for g in others.gateways {
        add(memo, format!("gateway/{}", g.cluster), Kind::Gateway(g.clone()));
    }
    for route in &others.objects.routes {
        let prefix = if route.kind == "GRPCRoute" {
            "grpcroute"
        } else {
            "route"
        };
        add(
            memo,
            format!("{prefix}/{}/{}", route.namespace, route.name),
            Kind::HttpRoute(route.clone()),
        );
    }
    for p in &others.objects.policies {
        add(
            memo,
            format!("trafficpolicy/{}/{}", p.namespace, p.name),
            Kind::TrafficPolicy(p.clone()),
        );
    }
    for p in &others.objects.authz {
        add(
            memo,
            format!("authz/{}/{}", p.namespace, p.name),
            Kind::AuthorizationPolicy(p.clone()),
        );
    }
    add(
        memo,
        "policy/locality".into(),
        Kind::LocalityPolicy(others.policy.clone()),
    );
    for b in others.bundles {
        add(memo, format!("bundle/{}", b.trust_domain), Kind::TrustBundle(b.clone()));
    }
    for b in others.built {
        names.insert(b.name.clone());
        memo.resources.insert(b.clone());
    }
    for gone in memo.other_names.difference(&names) {
        memo.resources.remove(gone);
        // A merged service of the same name (one a system service hid) is served again.
        let hidden = gone.strip_prefix("service/").and_then(|k| memo.by_service.get(k));
        if let Some(m) = hidden {
            memo.resources.insert(m.whole.clone());
        }
    }
    memo.other_names = names;
    memo.resources.clone()
}

/// What changed from the resources last sent to `now`, both seen through `include`:
/// resources to send (shared, not copied) and names removed, shard by shard (in name order
/// within each). One walk over the shards that differ; a resource rebuilt from an unchanged
/// source is the same `Arc` and is skipped without comparing versions.
pub fn diff<'a>(
    sent: &'a Resources,
    now: &'a Resources,
    include: impl Fn(&str) -> bool,
) -> (Vec<&'a Arc<Built>>, Vec<String>) {
    let mut changed = vec![];
    let mut removed = vec![];
    // Shards that are the same `Arc` in both hold nothing new: skipped whole.
    for (name, before, after) in sent.differing(now).flat_map(|(a, b)| join(a, b)) {
        // Most resources are the same `Arc` in both: skipped before `include` looks at the name.
        match (before, after) {
            (Some(b), Some(a)) if Arc::ptr_eq(b, a) || b.version == a.version => {}
            (_, Some(a)) if include(name) => changed.push(a),
            (Some(_), None) if include(name) => removed.push(name.to_string()),
            _ => {}
        }
    }
    (changed, removed)
}

/// What a proxy that takes services in parts (`Hello.accepts_endpoint_parts`) is sent for
/// [`diff`]'s result against the resources it was sent before (`sent`): a service whose fields
/// changed (or that is new to it) as its fields and every cluster's endpoints; one whose fields
/// did not, only the clusters' endpoints that changed, and the names of those gone; a service
/// removed, with all of its parts. Every other resource as it is.
pub fn in_parts(sent: &Resources, changed: Vec<&Arc<Built>>, mut removed: Vec<String>) -> (Vec<Bytes>, Vec<String>) {
    let mut out = Vec::with_capacity(changed.len());
    let mut gone = vec![];
    for r in changed {
        let Some(split) = &r.split else {
            out.push(r.wire().clone());
            continue;
        };
        let before = sent.get(&r.name).and_then(|b| b.split.as_deref());
        let fields_same = before.is_some_and(|b| b.head.version == split.head.version);
        if !fields_same {
            out.push(split.head.wire().clone());
        }
        let old = before.map(|b| b.parts.as_slice()).unwrap_or_default();
        // Both in name order: one walk.
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < split.parts.len() {
            match (old.get(i), split.parts.get(j)) {
                (Some(o), Some(n)) if o.name == n.name => {
                    if !fields_same || o.version != n.version {
                        out.push(n.wire().clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), None) => {
                    gone.push(o.name.to_string());
                    i += 1;
                }
                (Some(o), Some(n)) if o.name < n.name => {
                    gone.push(o.name.to_string());
                    i += 1;
                }
                (_, Some(n)) => {
                    out.push(n.wire().clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
    }
    for name in &removed {
        if let Some(split) = sent.get(name.as_str()).and_then(|b| b.split.as_deref()) {
            gone.extend(split.parts.iter().map(|p| p.name.to_string()));
        }
    }
    removed.append(&mut gone);
    (out, removed)
}

/// What a proxy that says it holds `held` (its `Hello.held`, name to version as
/// [`strait_api::snapshot::fingerprint`] makes it) is sent as its first update instead of the
/// whole state `all` (every resource it takes, as [`diff`] gives them against nothing): each
/// resource it does not hold at its version, and the names it holds that are no longer there,
/// in name order. A service in parts, for a proxy that takes them (`parts`), goes as
/// [`in_parts`] sends it: its fields and every cluster's endpoints when it does not hold its
/// fields' version, else only the clusters' endpoints it does not hold. A resource without a
/// version is never taken as held.
pub fn resume(all: Vec<&Arc<Built>>, held: &HashMap<String, u64>, parts: bool) -> (Vec<Bytes>, Vec<String>) {
    use strait_api::snapshot::fingerprint;
    let holds = |name: &str, version: &str| !version.is_empty() && held.get(name) == Some(&fingerprint(version));
    let mut out = vec![];
    let mut named: std::collections::HashSet<&str> = std::collections::HashSet::with_capacity(held.len());
    for r in all {
        match r.split.as_deref().filter(|_| parts) {
            Some(split) => {
                named.insert(&split.head.name);
                let fields_same = holds(&split.head.name, &split.head.version);
                if !fields_same {
                    out.push(split.head.wire().clone());
                }
                for p in &split.parts {
                    named.insert(&p.name);
                    if !fields_same || !holds(&p.name, &p.version) {
                        out.push(p.wire().clone());
                    }
                }
            }
            None => {
                named.insert(&r.name);
                if !holds(&r.name, &r.version) {
                    out.push(r.wire().clone());
                }
            }
        }
    }
    let mut removed: Vec<String> = held
        .keys()
        .filter(|name| !named.contains(name.as_str()))
        .cloned()
        .collect();
    removed.sort_unstable();
    (out, removed)
}

/// [`resume`] for a proxy that said what it holds as `Hello.held_digests`: every resource of
/// each bucket whose digest differs from that of what `all` holds there (a service whole, with
/// every part, in parts), and those buckets, which the proxy takes as replaced (what it held
/// there and the update does not name, it removes). A bucket with a resource without a version
/// is always replaced: nothing tells its content. Nothing at all when the proxy holds `all`.
pub fn resume_digests(all: Vec<&Arc<Built>>, digests: &[u64], parts: bool) -> (Vec<Bytes>, Vec<u32>) {
    use strait_api::snapshot::fingerprint;
    use strait_api::xds::{bucket_of, held_item};
    let buckets = digests.len();
    let mut sums = vec![0u64; buckets];
    let mut unversioned = vec![false; buckets];
    let of: Vec<usize> = all
        .iter()
        .map(|r| {
            let bucket = bucket_of(&r.name, buckets);
            let mut add = |name: &str, version: &str| {
                unversioned[bucket] |= version.is_empty();
                sums[bucket] = sums[bucket].wrapping_add(held_item(name, fingerprint(version)));
            };
            match r.split.as_deref().filter(|_| parts) {
                Some(split) => {
                    add(&split.head.name, &split.head.version);
                    for p in &split.parts {
                        add(&p.name, &p.version);
                    }
                }
                None => add(&r.name, &r.version),
            }
            bucket
        })
        .collect();
    let replaced: Vec<bool> = (0..buckets).map(|b| unversioned[b] || sums[b] != digests[b]).collect();
    let mut out = vec![];
    for (r, bucket) in all.into_iter().zip(of) {
        if !replaced[bucket] {
            continue;
        }
        match r.split.as_deref().filter(|_| parts) {
            Some(split) => {
                out.push(split.head.wire().clone());
                out.extend(split.parts.iter().map(|p| p.wire().clone()));
            }
            None => out.push(r.wire().clone()),
        }
    }
    let replaced = (0..buckets as u32).filter(|b| replaced[*b as usize]).collect();
    (out, replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scoped_proxy_reaches_the_backends_of_its_namespaces_routes_in_other_namespaces() {
        let route = |ns: &str, spec: &str| pb::HttpRoute {
            namespace: ns.into(),
            name: "r".into(),
            spec_json: spec.into(),
            ..Default::default()
        };
        let reach = RouteReach::of(&[
            route(
                "web",
                r#"{"parentRefs":[{"name":"front"}],"rules":[{"backendRefs":[{"name":"front-v2"},{"name":"echo","namespace":"demo"}]}]}"#,
            ),
            // A consumer route in web for a service of shop: shop's proxies reach audit.
            route(
                "web",
                r#"{"parentRefs":[{"name":"cart","namespace":"shop"}],"rules":[{"filters":[{"type":"RequestMirror","requestMirror":{"backendRef":{"name":"log","namespace":"audit"}}}]}]}"#,
            ),
            route("web", "not json"),
        ]);
        let names = |set: BTreeSet<Key>| set.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(names(reach.beyond(&["web".into()])), ["service/demo/echo"]);
        assert_eq!(names(reach.beyond(&["shop".into()])), ["service/audit/log"]);
        assert!(reach.beyond(&["web".into(), "demo".into()]).is_empty());
        assert!(reach.beyond(&["demo".into()]).is_empty());
        assert!(reach.beyond(&[]).is_empty());
    }

    #[test]
    fn a_selector_reaches_the_services_whose_workloads_carry_its_labels() {
        let service = |name: &str, apps: &[&str]| {
            let mut s = (*svc(name, 80)).clone();
            s.exports = vec![Arc::new(pb::ExportedService {
                endpoints: apps
                    .iter()
                    .map(|app| pb::Endpoint {
                        labels: [("app".to_string(), app.to_string())].into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })];
            Arc::new(s)
        };
        let mut merged: Merged = BTreeMap::new();
        merged.insert("demo/greeter".into(), service("greeter", &["greeter", "greeter"]));
        merged.insert("demo/echo".into(), service("echo", &["echo"]));
        merged.insert("demo/mixed".into(), service("mixed", &["greeter", "echo"]));
        // Istio's usual form: a selector, ALLOW for one principal.
        let policy = pb::AuthorizationPolicy {
            namespace: "demo".into(),
            name: "greeter-readers".into(),
            spec_json: r#"{"selector":{"matchLabels":{"app":"greeter"}},"rules":[{"from":[{"source":{"principals":["spiffe://mesh.local/ns/demo/sa/ledger"]}}]}]}"#.into(),
            ..Default::default()
        };
        let policies = AuthzScope::of("east", &[policy], Default::default());
        assert!(
            policies.needs_workloads_in("demo")
                && !policies.needs_workloads_in("web")
                && policies.needs_workloads_any()
        );
        let mut labels = ServiceWorkloads::default();
        assert_eq!(labels.update(&merged, |ns| policies.needs_workloads_in(ns)).len(), 3);
        let scope = policies.with_workloads(&labels);
        let echo = "spiffe://mesh.local/ns/demo/sa/echo";
        let ledger = "spiffe://mesh.local/ns/demo/sa/ledger";
        assert!(
            !scope.may_call(echo, "service/demo/greeter"),
            "every greeter workload bound by the ALLOW"
        );
        assert!(scope.may_call(ledger, "service/demo/greeter"));
        assert!(
            scope.may_call(echo, "service/demo/echo"),
            "the selector reaches none of echo"
        );
        assert!(
            scope.may_call(echo, "service/demo/mixed"),
            "an echo workload of mixed has no ALLOW"
        );
        // Without the label sets, a selector may apply: nothing is taken away.
        assert!(policies.may_call(echo, "service/demo/greeter"));
        // The same services again (the same `Arc`s, or new ones with the same labels): no change.
        assert!(labels.update(&merged, |ns| policies.needs_workloads_in(ns)).is_empty());
        merged.insert("demo/greeter".into(), service("greeter", &["greeter"]));
        assert!(labels.update(&merged, |ns| policies.needs_workloads_in(ns)).is_empty());
        // A workload's labels change: a change, and the selector's reach with it.
        merged.insert("demo/greeter".into(), service("greeter", &["greeter", "canary"]));
        assert_eq!(
            labels.update(&merged, |ns| policies.needs_workloads_in(ns)),
            [Key::from("demo/greeter")]
        );
        assert!(policies.with_workloads(&labels).may_call(echo, "service/demo/greeter"));
        // A service gone, or a namespace no selector reaches any more: forgotten.
        merged.remove("demo/mixed");
        assert_eq!(
            labels.update(&merged, |ns| policies.needs_workloads_in(ns)),
            [Key::from("demo/mixed")]
        );
        assert_eq!(labels.update(&merged, |_| false).len(), 2);
        assert!(labels.clear().is_empty());
    }

    #[test]
    fn a_policy_refuses_a_caller_only_where_every_cluster_holding_the_workloads_enforces_it() {
        let service = |name: &str, clusters: &[&str]| {
            let mut s = (*svc(name, 80)).clone();
            s.clusters = clusters.iter().map(|c| c.to_string()).collect();
            Arc::new(s)
        };
        let mut merged: Merged = BTreeMap::new();
        merged.insert("demo/echo".into(), service("echo", &["east", "west"]));
        merged.insert("demo/audit".into(), service("audit", &["east"]));
        // Refuses every caller of east, as east's scoped proxies are.
        let policy = pb::AuthorizationPolicy {
            namespace: "demo".into(),
            name: "no-east".into(),
            spec_json: r#"{"targetRefs":[{"kind":"Service","name":"echo"},{"kind":"Service","name":"audit"}],"action":"DENY","rules":[{"from":[{"source":{"clusters":["east"]}}]}]}"#.into(),
            ..Default::default()
        };
        let enforced_in = |clusters: &[&str]| -> Enforcement {
            let at: Vec<_> = clusters.iter().map(|c| (*c, 1)).collect();
            enforcing("no-east", 1, Some(&at))
        };
        let caller = "spiffe://mesh.local/ns/demo/sa/greeter";
        let mut scopes = AuthzScopes::default();
        let policies = std::slice::from_ref(&policy);
        // Enforced everywhere (no entry): both services refuse east's callers.
        let everywhere = scopes.update("east", policies, &Enforcement::new(), &merged);
        assert!(!everywhere.may_call(caller, "service/demo/echo"));
        assert!(!everywhere.may_call(caller, "service/demo/audit"));
        assert!(Arc::ptr_eq(
            &everywhere,
            &scopes.update("east", policies, &Enforcement::new(), &merged)
        ));
        // East's alone (cluster-scoped, or not yet taken by its peers): west's echo workloads
        // do not refuse, so echo stays; audit has workloads in east only.
        let here = scopes.update("east", policies, &enforced_in(&["east"]), &merged);
        assert!(!Arc::ptr_eq(&everywhere, &here));
        assert!(here.may_call(caller, "service/demo/echo"));
        assert!(!here.may_call(caller, "service/demo/audit"));
        // Every cluster holding echo's workloads enforces it (a third one does not, holding none).
        let holding = scopes.update("east", policies, &enforced_in(&["east", "west"]), &merged);
        assert!(!holding.may_call(caller, "service/demo/echo"));
        // Echo's workloads move: west no longer exports it, central does.
        merged.insert("demo/echo".into(), service("echo", &["east", "central"]));
        let moved = scopes.update("east", policies, &enforced_in(&["east", "west"]), &merged);
        assert!(!Arc::ptr_eq(&holding, &moved));
        assert!(moved.may_call(caller, "service/demo/echo"));
        // Enforced everywhere again: nothing about workloads is kept.
        scopes.update("east", policies, &Enforcement::new(), &merged);
        assert!(scopes.workloads.0.is_empty());
    }

    #[test]
    fn a_selector_reaches_the_workloads_of_each_cluster_apart() {
        // Mixed: its workloads in east are `app: a`, in west `app: b`.
        let export = |app: &str| {
            Arc::new(pb::ExportedService {
                endpoints: vec![pb::Endpoint {
                    labels: [("app".to_string(), app.to_string())].into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let mut mixed = (*svc("mixed", 80)).clone();
        mixed.exports = vec![export("a"), export("b")];
        mixed.clusters = vec!["east".into(), "west".into()];
        let merged: Merged = [("demo/mixed".into(), Arc::new(mixed))].into();
        let policy = |name: &str, spec: &str| pb::AuthorizationPolicy {
            namespace: "demo".into(),
            name: name.into(),
            spec_json: spec.into(),
            ..Default::default()
        };
        // `a` refuses everyone; `b` lets ledger alone in.
        let policies = [
            policy(
                "a-closed",
                r#"{"selector":{"matchLabels":{"app":"a"}},"action":"DENY","rules":[{}]}"#,
            ),
            policy(
                "b-ledger",
                r#"{"selector":{"matchLabels":{"app":"b"}},"rules":[{"from":[{"source":{"principals":["spiffe://mesh.local/ns/demo/sa/ledger"]}}]}]}"#,
            ),
        ];
        let scope = AuthzScopes::default().update("east", &policies, &Enforcement::new(), &merged);
        // Every workload of every cluster refuses echo: the service is left out, where the
        // label sets of both clusters together left each selector reaching some workloads.
        assert!(!scope.may_call("spiffe://mesh.local/ns/demo/sa/echo", "service/demo/mixed"));
        assert!(scope.may_call("spiffe://mesh.local/ns/demo/sa/ledger", "service/demo/mixed"));
        // Without the DENY, east's `a` workloads have no policy: echo may call them.
        let scope = AuthzScopes::default().update("east", &policies[1..], &Enforcement::new(), &merged);
        assert!(scope.may_call("spiffe://mesh.local/ns/demo/sa/echo", "service/demo/mixed"));
    }

    /// Policy `demo/<name>` of west's, served here at `generation`, and the generation each
    /// cluster enforces (`None`: this one in every cluster).
    fn enforcing(name: &str, generation: u64, clusters: Option<&[(&str, u64)]>) -> Enforcement {
        let e = crate::objects::Enforcing {
            origin: "west".into(),
            generation,
            clusters: clusters.map(|cs| cs.iter().map(|(c, g)| (c.to_string(), *g)).collect()),
        };
        [("demo".to_string(), [(name.to_string(), e)].into())].into()
    }

    #[test]
    fn an_edited_policy_keeps_its_effect_while_the_peers_take_the_edit() {
        let mut merged: Merged = BTreeMap::new();
        let mut echo = (*svc("echo", 80)).clone();
        echo.clusters = vec!["east".into(), "west".into()];
        merged.insert("demo/echo".into(), Arc::new(echo));
        let deny_from = |clusters: &str| pb::AuthorizationPolicy {
            namespace: "demo".into(),
            name: "fence".into(),
            spec_json: format!(
                r#"{{"targetRefs":[{{"kind":"Service","name":"echo"}}],"action":"DENY","rules":[{{"from":[{{"source":{{"clusters":[{clusters}]}}}}]}}]}}"#
            ),
            ..Default::default()
        };
        let (v1, v2, v3) = (
            deny_from(r#""east""#),
            deny_from(r#""east","central""#),
            deny_from(r#""central""#),
        );
        let caller = "spiffe://mesh.local/ns/demo/sa/greeter";
        let mut scopes = AuthzScopes::default();
        let mut step = |policy: &pb::AuthorizationPolicy, generation, clusters: Option<&[(&str, u64)]>| {
            let e = enforcing("fence", generation, clusters);
            let scope = scopes.update("east", std::slice::from_ref(policy), &e, &merged);
            let kept: Vec<u64> = scope
                .earlier
                .values()
                .flat_map(|n| n.values().flatten())
                .map(|v| v.generation)
                .collect();
            (scope.may_call(caller, "service/demo/echo"), kept)
        };
        assert_eq!(
            step(&v1, 1, None),
            (false, vec![]),
            "v1 everywhere: east's callers refused"
        );
        // Edited to v2 (refusing east still): west enforces v1 until it takes v2, and v1 refuses
        // them too, so echo stays out throughout.
        assert_eq!(step(&v2, 2, Some(&[("east", 2), ("west", 1)])), (false, vec![1]));
        assert_eq!(
            step(&v2, 2, Some(&[("east", 2)])),
            (true, vec![]),
            "west's report gone: not known"
        );
        assert_eq!(step(&v2, 2, None), (false, vec![]));
        // Edited to v3, which lets east in: east's workloads let the caller in at once.
        assert_eq!(step(&v3, 3, Some(&[("east", 3), ("west", 2)])), (true, vec![2]));
        assert_eq!(step(&v3, 3, None), (true, vec![]));
        // A peer at a generation never served here: not known, so nothing is taken away.
        assert_eq!(step(&v1, 4, None), (false, vec![]));
        assert_eq!(step(&v2, 5, Some(&[("east", 5), ("west", 7)])), (true, vec![]));
        // A new generation of the same content (served unchanged): the one before is kept.
        assert_eq!(step(&v2, 6, None), (false, vec![]));
        assert_eq!(step(&v2, 7, Some(&[("east", 7), ("west", 6)])), (false, vec![6]));
        // A version of another origin is another policy: its generations say nothing of this one.
        let mut other = enforcing("fence", 8, Some(&[("east", 8), ("west", 7)]));
        other.get_mut("demo").unwrap().get_mut("fence").unwrap().origin = "central".into();
        let scope = scopes.update("east", std::slice::from_ref(&v2), &other, &merged);
        assert!(scope.may_call(caller, "service/demo/echo") && scope.earlier.is_empty());
    }

    /// A build's other inputs: these gateways, policy and objects, nothing else.
    fn inputs<'a>(
        gateways: &'a [pb::Gateway],
        policy: &'a pb::LocalityPolicy,
        objects: &'a crate::objects::Checked,
    ) -> Others<'a> {
        Others {
            system_services: &[],
            gateways,
            policy,
            bundles: &[],
            objects,
            built: &[],
        }
    }

    /// Each export of `svc` as a [`Part`], in `svc.exports` order.
    fn parts(svc: &MergedService) -> Vec<Arc<Part>> {
        svc.exports
            .iter()
            .zip(&svc.clusters)
            .map(|(e, c)| Part::new(svc, c, e))
            .collect()
    }

    fn whole(svc: &MergedService) -> Built {
        service_resource(svc, &parts(svc))
    }

    fn svc(name: &str, port: u32) -> Arc<MergedService> {
        Arc::new(MergedService {
            name: name.into(),
            namespace: "demo".into(),
            clusterset_ip: std::net::Ipv4Addr::new(240, 0, 0, 1),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port,
                protocol: "http".into(),
            }],
            exports: vec![],
            identities: vec![],
            conditions: vec![],
            clusters: vec!["east".into()],
        })
    }

    #[test]
    fn a_service_encoded_from_its_exports_is_what_prost_writes_for_it() {
        let export = |cluster: &str, n: usize| {
            Arc::new(pb::ExportedService {
                endpoints: (0..n)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.0.{i}:8080"),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            zone: "us-east-1a".into(),
                            ..Default::default()
                        }),
                        identity: "spiffe://mesh.local/ns/demo/sa/echo".into(),
                        ready: i % 2 == 0,
                        labels: [("version".to_string(), format!("v{i}"))].into(),
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let mut merged = (*svc("echo", 80)).clone();
        merged.exports = vec![export("east", 3), export("west", 2)];
        merged.clusters = vec!["east".into(), "west".into()];
        merged.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
        merged.conditions = vec![pb::Condition {
            r#type: "Conflict".into(),
            status: "False".into(),
            ..Default::default()
        }];
        let built = whole(&merged);
        let body = pb::Service {
            name: merged.name.clone(),
            namespace: merged.namespace.clone(),
            clusterset_ip: merged.clusterset_ip.to_string(),
            ports: merged.ports.clone(),
            endpoints: merged.endpoints().cloned().collect(),
            conditions: merged.conditions.clone(),
            identities: merged.identities.clone(),
        };
        let mut want = pb::Resource {
            name: "service/demo/echo".into(),
            version: String::new(),
            kind: Some(Kind::Service(body)),
        };
        // Byte for byte prost's encoding, the version appended; and it decodes to the resource.
        let mut bytes = want.encode_to_vec();
        prost::encoding::string::encode(2, &built.version, &mut bytes);
        assert_eq!(built.wire(), &bytes);
        // Joined from its pieces or written at once: the same bytes and version.
        let at_once = encode_service(built.name.to_string(), &merged, &parts(&merged), false);
        assert!(matches!(at_once.wire, Wire::Bytes(_)) && matches!(built.wire, Wire::Pieces { .. }));
        assert_eq!((at_once.wire(), &at_once.version), (built.wire(), &built.version));
        want.version = built.version.clone();
        assert_eq!(built.decode().unwrap(), want);
        assert_eq!(&*built.name, "service/demo/echo");
        // In parts, as prost writes them too: the service's fields alone, and each cluster's
        // endpoints as a resource of their own, in cluster-name order.
        let prost_bytes = |r: &pb::Resource, version: &String| {
            let mut bytes = pb::Resource {
                version: String::new(),
                ..r.clone()
            }
            .encode_to_vec();
            prost::encoding::string::encode(2, version, &mut bytes);
            bytes
        };
        let split = built
            .split
            .as_deref()
            .expect("a clusterset service is also built in parts");
        let mut head = want.clone();
        if let Some(Kind::Service(s)) = &mut head.kind {
            s.endpoints.clear();
        }
        assert_eq!(split.head.wire(), &prost_bytes(&head, &split.head.version));
        assert_eq!(&*split.head.name, "service/demo/echo");
        assert_eq!(split.parts.len(), 2);
        for (part, (cluster, export)) in split.parts.iter().zip(merged.clusters.iter().zip(&merged.exports)) {
            let want = pb::Resource {
                name: format!("endpoints/demo/echo/{cluster}"),
                version: part.version.clone(),
                kind: Some(Kind::ServiceEndpoints(pb::ServiceEndpoints {
                    namespace: "demo".into(),
                    name: "echo".into(),
                    cluster: cluster.clone(),
                    endpoints: export.endpoints.clone(),
                })),
            };
            assert_eq!(part.wire(), &prost_bytes(&want, &part.version));
            assert_eq!(part.decode().unwrap(), want);
            assert_eq!(*part.name, *want.name);
        }
        // The version is the content's: the same service built again has it, a changed one not;
        // a part's changes with its cluster's endpoints alone.
        assert_eq!(whole(&merged).version, built.version);
        let moved = &mut Arc::make_mut(&mut merged.exports[1]).endpoints[0];
        moved.ready = !moved.ready;
        let again = whole(&merged);
        assert_ne!(again.version, built.version);
        let again = again.split.unwrap();
        assert_eq!(again.head, split.head);
        assert_eq!(again.parts[0], split.parts[0]);
        assert_ne!(again.parts[1].version, split.parts[1].version);
    }

    /// One pass as the controller's loop makes it: merge, then build from what the merge
    /// changed; checked against a build made anew from the same merge, and the state's `since`
    /// against its definition. Returns the new state.
    fn pass(
        merge_memo: &mut crate::catalog::MergeMemo,
        memo: &mut BuildMemo,
        clusters: &BTreeMap<String, Arc<crate::catalog::Services>>,
        changes: &crate::catalog::Changes,
        others: &Others,
        before: &ConfigState,
    ) -> ConfigState {
        let range = "240.0.0.0/4".parse().unwrap();
        let merged = crate::catalog::merge_with(merge_memo, clusters, changes, range);
        let now = build_with(memo, &merged, merge_memo.last_change(), others);
        let fresh = build("east", &merged, others);
        let names = |r: &Resources| {
            let mut names: Vec<Key> = r.iter().map(|(k, _)| k.clone()).collect();
            names.sort_unstable();
            names
        };
        assert_eq!(names(&now), names(&fresh));
        assert_eq!(now.len(), fresh.len());
        for (name, r) in fresh.iter() {
            assert_eq!(now[name].version, r.version, "{name}");
        }
        let version = before.version + 1;
        let since = ConfigState::since_from(before, &now, version);
        let want: BTreeMap<Key, u64> = now
            .iter()
            .filter(|(k, _)| !is_service(k))
            .map(|(k, r)| {
                let kept = before.resources.get(k).filter(|b| b.version == r.version);
                (k.clone(), kept.map_or(version, |_| before.since[k]))
            })
            .collect();
        assert_eq!(since, want);
        ConfigState {
            version,
            resources: now,
            warm: true,
            since,
            reach: Arc::default(),
            authz: Arc::default(),
        }
    }

    #[test]
    fn a_build_after_a_merge_that_names_its_changes_holds_what_a_build_anew_holds() {
        use crate::catalog::{Changes, MergeMemo, Services, Touched};
        let export = |name: &str, cluster: &str, port: u32| {
            Arc::new(pb::ExportedService {
                name: name.into(),
                namespace: "demo".into(),
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "http".into(),
                }],
                endpoints: vec![pb::Endpoint {
                    address: format!("10.0.{}.1:{port}", cluster.len()),
                    workload: format!("{name}-{cluster}"),
                    ..Default::default()
                }],
                exported_at_unix_ms: 1,
                identities: vec![],
            })
        };
        let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let mut clusters: BTreeMap<String, Arc<Services>> = ["east", "west"]
            .iter()
            .map(|c| {
                let services: Services = names
                    .iter()
                    .map(|n| (Key::from(format!("demo/{n}")), export(n, c, 8080)))
                    .collect();
                (c.to_string(), Arc::new(services))
            })
            .collect();
        let keys = |k: &[&str]| Touched::Keys(k.iter().map(|k| Key::from(*k)).collect());
        let policy = pb::LocalityPolicy::default();
        let objects = Default::default();
        let gateway = |cluster: &str| pb::Gateway {
            cluster: cluster.into(),
            ..Default::default()
        };
        let gateways = [gateway("east"), gateway("west")];
        let others = inputs(&gateways, &policy, &objects);
        let (mut merge_memo, mut memo) = (MergeMemo::default(), BuildMemo::new("east"));
        let first = pass(
            &mut merge_memo,
            &mut memo,
            &clusters,
            &Changes::new(),
            &others,
            &ConfigState::default(),
        );
        assert_eq!(first.resources.len(), 2 * 40 + 3);

        // West moves one endpoint of s7: the merge names s7, the build looks at it alone, and
        // only its whole form changes (east's view holds east's endpoints): one shard differs.
        Arc::make_mut(clusters.get_mut("west").unwrap()).insert("demo/s7".into(), export("s7", "west", 9090));
        let changes = Changes::from([("west".to_string(), keys(&["demo/s7"]))]);
        let second = pass(&mut merge_memo, &mut memo, &clusters, &changes, &others, &first);
        assert_eq!(merge_memo.last_change().keys.map(<[Key]>::len), Some(1));
        assert_eq!(second.resources.differing(&first.resources).count(), 1);
        let (changed, removed) = diff(&first.resources, &second.resources, |_| true);
        assert_eq!(
            changed.iter().map(|r| &*r.name).collect::<Vec<_>>(),
            ["service/demo/s7"]
        );
        assert!(removed.is_empty());

        // Nothing changed: every shard is the one before.
        let third = pass(&mut merge_memo, &mut memo, &clusters, &Changes::new(), &others, &second);
        assert_eq!(third.resources.differing(&second.resources).count(), 0);
        assert!(same_versions(&third.resources, &second.resources));

        // East changes s3 and its own view changes with it; then a service comes (the merge
        // gives every address again: the build looks at every service) and one goes.
        Arc::make_mut(clusters.get_mut("east").unwrap()).insert("demo/s3".into(), export("s3", "east", 9090));
        let changes = Changes::from([("east".to_string(), keys(&["demo/s3"]))]);
        let fourth = pass(&mut merge_memo, &mut memo, &clusters, &changes, &others, &third);
        let (changed, _) = diff(&third.resources, &fourth.resources, |_| true);
        let mut changed: Vec<&str> = changed.iter().map(|r| &*r.name).collect();
        changed.sort_unstable();
        assert_eq!(changed, ["local/service/demo/s3", "service/demo/s3"]);
        Arc::make_mut(clusters.get_mut("east").unwrap()).insert("demo/new".into(), export("new", "east", 80));
        for c in ["east", "west"] {
            Arc::make_mut(clusters.get_mut(c).unwrap()).remove("demo/s0");
        }
        let changes = Changes::from([
            ("east".to_string(), keys(&["demo/new", "demo/s0"])),
            ("west".to_string(), keys(&["demo/s0"])),
        ]);
        let fifth = pass(&mut merge_memo, &mut memo, &clusters, &changes, &others, &fourth);
        assert!(merge_memo.last_change().keys.is_none());
        assert!(fifth.resources.get("service/demo/s0").is_none());
        assert!(fifth.resources.get("local/service/demo/s0").is_none());
        assert!(fifth.resources.get("service/demo/new").is_some());

        // Other resources: a gateway goes, a rate limit's shares come and go.
        let shares = Arc::new(rate_shares_resource(pb::RateShares {
            namespace: "demo".into(),
            name: "s1".into(),
            shares: [("east/a".to_string(), 1.0)].into(),
        }));
        let built = [shares];
        let with_shares = Others {
            gateways: &gateways[..1],
            built: &built,
            ..others
        };
        let sixth = pass(
            &mut merge_memo,
            &mut memo,
            &clusters,
            &Changes::new(),
            &with_shares,
            &fifth,
        );
        assert!(sixth.resources.get("gateway/west").is_none());
        assert!(sixth.resources.get("rateshare/demo/s1").is_some());
        assert_eq!(sixth.since["rateshare/demo/s1"], sixth.version);
        assert_eq!(sixth.since["gateway/east"], first.version);
        let seventh = pass(&mut merge_memo, &mut memo, &clusters, &Changes::new(), &others, &sixth);
        assert!(seventh.resources.get("rateshare/demo/s1").is_none());
        assert!(!seventh.since.contains_key("rateshare/demo/s1"));
        assert_eq!(seventh.since["gateway/west"], seventh.version);

        // A system service of a merged service's name is served in its place while it is
        // given; then the merged one again (each pass checks against a build anew).
        let system = [pb::Service {
            name: "s1".into(),
            namespace: "demo".into(),
            ..Default::default()
        }];
        let hiding = Others {
            system_services: &system,
            ..others
        };
        let hidden = pass(
            &mut merge_memo,
            &mut memo,
            &clusters,
            &Changes::new(),
            &hiding,
            &seventh,
        );
        assert!(hidden.resources["service/demo/s1"].split.is_none());
        let seventh = pass(&mut merge_memo, &mut memo, &clusters, &Changes::new(), &others, &hidden);
        assert!(seventh.resources["service/demo/s1"].split.is_some());

        // A memo that missed a merge does not trust the next one's keys: it looks at every
        // service (the pass checks the result against a build anew).
        let range = "240.0.0.0/4".parse().unwrap();
        Arc::make_mut(clusters.get_mut("west").unwrap()).insert("demo/s9".into(), export("s9", "west", 9090));
        let changes = Changes::from([("west".to_string(), keys(&["demo/s9"]))]);
        crate::catalog::merge_with(&mut merge_memo, &clusters, &changes, range);
        Arc::make_mut(clusters.get_mut("west").unwrap()).insert("demo/s8".into(), export("s8", "west", 9090));
        let changes = Changes::from([("west".to_string(), keys(&["demo/s8"]))]);
        let eighth = pass(&mut merge_memo, &mut memo, &clusters, &changes, &others, &seventh);
        assert_ne!(
            eighth.resources["service/demo/s9"].version,
            seventh.resources["service/demo/s9"].version
        );
    }

    #[test]
    fn a_build_reuses_unchanged_services() {
        let policy = pb::LocalityPolicy::default();
        let mut merged: Merged = BTreeMap::from([("demo/a".into(), svc("a", 80)), ("demo/b".into(), svc("b", 80))]);
        let mut memo = BuildMemo::new("east");
        let objects = Default::default();
        let first = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        merged.insert("demo/b".into(), svc("b", 81));
        let second = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        assert!(Arc::ptr_eq(&first["service/demo/a"], &second["service/demo/a"]));
        assert_ne!(first["service/demo/b"].version, second["service/demo/b"].version);
        // The same content as a build from scratch, version for version.
        let fresh = build("east", &merged, &inputs(&[], &policy, &objects));
        assert!(same_versions(&second, &fresh));
        assert!(!same_versions(&first, &fresh));
        // Resources besides services too: the same gateway is the same `Arc`, a changed one
        // is built again, and one no longer given is gone.
        let gateway = |reachable| pb::Gateway {
            cluster: "west".into(),
            reachable,
            ..Default::default()
        };
        let third = build_with(
            &mut memo,
            &merged,
            MergeChange::ANY,
            &inputs(&[gateway(true)], &policy, &objects),
        );
        let fourth = build_with(
            &mut memo,
            &merged,
            MergeChange::ANY,
            &inputs(&[gateway(true)], &policy, &objects),
        );
        assert!(Arc::ptr_eq(&third["gateway/west"], &fourth["gateway/west"]));
        assert!(Arc::ptr_eq(&third["policy/locality"], &second["policy/locality"]));
        let fifth = build_with(
            &mut memo,
            &merged,
            MergeChange::ANY,
            &inputs(&[gateway(false)], &policy, &objects),
        );
        assert_ne!(fifth["gateway/west"].version, fourth["gateway/west"].version);
        assert_eq!(
            fifth["gateway/west"],
            build("east", &merged, &inputs(&[gateway(false)], &policy, &objects))["gateway/west"]
        );
        let sixth = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        assert!(sixth.get("gateway/west").is_none() && !memo.others.contains_key("gateway/west"));
    }

    #[test]
    fn a_change_in_one_clusters_export_encodes_that_export_alone() {
        let export = |cluster: &str, ready: bool| {
            Arc::new(pb::ExportedService {
                endpoints: vec![pb::Endpoint {
                    address: "10.0.0.1:8080".into(),
                    workload: format!("echo-{cluster}"),
                    locality: Some(pb::Locality {
                        cluster: cluster.into(),
                        ..Default::default()
                    }),
                    ready,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let policy = pb::LocalityPolicy::default();
        let objects = Default::default();
        let mut echo = (*svc("echo", 80)).clone();
        echo.exports = vec![export("east", true), export("west", true)];
        echo.clusters = vec!["east".into(), "west".into()];
        let mut merged: Merged = BTreeMap::from([("demo/echo".into(), Arc::new(echo.clone()))]);
        let mut memo = BuildMemo::new("east");
        let first = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        let east_part = memo.by_service["demo/echo"].parts[0].clone();
        echo.exports[1] = export("west", false);
        merged.insert("demo/echo".into(), Arc::new(echo.clone()));
        let second = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        // East's endpoints were not encoded again; the service changed, east's view did not.
        assert!(Arc::ptr_eq(&memo.by_service["demo/echo"].parts[0], &east_part));
        assert_ne!(first["service/demo/echo"].version, second["service/demo/echo"].version);
        assert!(Arc::ptr_eq(
            &first["local/service/demo/echo"],
            &second["local/service/demo/echo"]
        ));
        // Byte for byte and version for version what a build from scratch makes, and back to
        // the first content is back to the first version.
        let fresh = build("east", &merged, &inputs(&[], &policy, &objects));
        assert_eq!(second["service/demo/echo"], fresh["service/demo/echo"]);
        echo.exports[1] = export("west", true);
        merged.insert("demo/echo".into(), Arc::new(echo));
        let third = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        assert_eq!(third["service/demo/echo"], first["service/demo/echo"]);
    }

    #[test]
    fn diff_sends_only_changes() {
        let policy = pb::LocalityPolicy::default();
        let a = build("east", &BTreeMap::new(), &inputs(&[], &policy, &Default::default()));
        let (changed, removed) = diff(&a, &a, |_| true);
        assert!(changed.is_empty() && removed.is_empty());
        // Scoped out: the same as absent.
        let (changed, removed) = diff(&a, &a, |n| n != "policy/locality");
        assert!(changed.is_empty() && removed.is_empty());
        let policy2 = pb::LocalityPolicy {
            cluster_order: vec!["west".into()],
            ..Default::default()
        };
        let b = build("east", &BTreeMap::new(), &inputs(&[], &policy2, &Default::default()));
        let (changed, removed) = diff(&a, &b, |_| true);
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        let (_, removed) = diff(&a, &Resources::default(), |_| true);
        assert_eq!(removed, vec!["policy/locality".to_string()]);
        // Services on either side of the walk: one gone, one new, one changed, one the same.
        let objects = Default::default();
        let one: Merged = [("a", 80), ("b", 80), ("c", 80)]
            .map(|(n, p)| (format!("demo/{n}").into(), svc(n, p)))
            .into();
        let two: Merged = [("b", 81), ("c", 80), ("d", 80)]
            .map(|(n, p)| (format!("demo/{n}").into(), svc(n, p)))
            .into();
        let before = build("east", &one, &inputs(&[], &policy, &objects));
        let after = build("east", &two, &inputs(&[], &policy, &objects));
        let sidecar = |n: &str| !gateway_only(n);
        let (changed, removed) = diff(&before, &after, sidecar);
        let changed: Vec<&str> = changed.iter().map(|r| &*r.name).collect();
        assert_eq!(changed, vec!["service/demo/b", "service/demo/d"]);
        assert_eq!(removed, vec!["service/demo/a".to_string()]);
        let (changed, removed) = diff(&before, &after, |n| {
            sidecar(n) && n != "service/demo/d" && n != "service/demo/a"
        });
        assert_eq!(changed.len(), 1);
        assert!(removed.is_empty());
        // A gateway sees the same changes in the services' gateway views.
        let (changed, removed) = diff(&before, &after, |n| !sidecar_only(n));
        let changed: Vec<&str> = changed.iter().map(|r| &*r.name).collect();
        assert_eq!(changed, vec!["local/service/demo/b", "local/service/demo/d"]);
        assert_eq!(removed, vec!["local/service/demo/a".to_string()]);
    }

    #[test]
    fn only_the_mesh_namespace_services_are_for_gateways_alone() {
        assert!(gateway_only(&format!(
            "service/{}/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!gateway_only(&format!(
            "service/{}x/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!gateway_only("service/demo/echo"));
        assert!(!gateway_only(&format!("route/{}/r", strait_api::SYSTEM_NAMESPACE)));
        // Gateways take services in their gateway view, sidecars whole; everything else both.
        assert!(gateway_only("local/service/demo/echo") && !sidecar_only("local/service/demo/echo"));
        assert!(sidecar_only("service/demo/echo"));
        assert!(!sidecar_only(&format!(
            "service/{}/federation",
            strait_api::SYSTEM_NAMESPACE
        )));
        assert!(!sidecar_only("route/demo/r") && !gateway_only("route/demo/r"));
        assert!(is_service("local/service/demo/echo") && is_service("service/demo/echo"));
        assert!(!is_service("local/route/demo/r") && !is_service("gateway/east"));
    }

    #[test]
    fn a_gateway_view_holds_this_clusters_endpoints_and_ignores_changes_elsewhere() {
        let export = |cluster: &str, ready: bool| {
            Arc::new(pb::ExportedService {
                endpoints: (0..3)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.0.{i}:8080"),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            ..Default::default()
                        }),
                        ready,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let mut echo = (*svc("echo", 80)).clone();
        echo.exports = vec![export("east", true), export("west", true)];
        echo.clusters = vec!["east".into(), "west".into()];
        let view = local_service_resource(&echo, &parts(&echo), "west");
        assert_eq!(&*view.name, "local/service/demo/echo");
        let Some(Kind::Service(s)) = view.decode().unwrap().kind else {
            panic!("not a service")
        };
        assert_eq!(s.endpoints.len(), 3);
        assert!(s.endpoints.iter().all(|e| e.workload.starts_with("echo-west-")));
        assert_eq!((s.name.as_str(), s.ports.len()), ("echo", 1));
        // Through builds: east's endpoints change, west's gateway view does not (the same
        // `Arc`), the whole service does.
        let policy = pb::LocalityPolicy::default();
        let objects = Default::default();
        let mut memo = BuildMemo::new("west");
        let mut merged: Merged = BTreeMap::from([("demo/echo".into(), Arc::new(echo.clone()))]);
        let first = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        echo.exports[0] = export("east", false);
        merged.insert("demo/echo".into(), Arc::new(echo.clone()));
        let second = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
        assert!(Arc::ptr_eq(
            &first["local/service/demo/echo"],
            &second["local/service/demo/echo"]
        ));
        assert_ne!(first["service/demo/echo"].version, second["service/demo/echo"].version);
        // Builds again with `echo` as it now is: its view must have changed, and the build
        // must equal one from scratch.
        let mut view_changed = |echo: &MergedService, before: &Resources| {
            merged.insert("demo/echo".into(), Arc::new(echo.clone()));
            let now = build_with(&mut memo, &merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
            let view = "local/service/demo/echo";
            assert_ne!(before[view].version, now[view].version);
            assert!(same_versions(
                &now,
                &build("west", &merged, &inputs(&[], &policy, &objects))
            ));
            now
        };
        // West's own change reaches its gateway.
        echo.exports[1] = export("west", false);
        let third = view_changed(&echo, &second);
        // A field the view holds beside its endpoints (the ports, a union over every cluster's
        // export) changed by east alone: the view is made again although west's export is
        // the same `Arc`.
        echo.ports.push(pb::ServicePort {
            name: "grpc".into(),
            port: 9090,
            protocol: "grpc".into(),
        });
        view_changed(&echo, &third);
    }

    #[test]
    fn a_view_is_the_same_only_for_the_same_local_export_and_fields() {
        let local = Arc::new(pb::ExportedService::default());
        let mut old = (*svc("echo", 80)).clone();
        old.exports = vec![Arc::new(pb::ExportedService::default()), local.clone()];
        old.clusters = vec!["east".into(), "west".into()];
        // East's export replaced: west's view is the same.
        let mut new = old.clone();
        new.exports[0] = Arc::new(pb::ExportedService::default());
        assert!(same_view(&old, &new, "west"));
        assert!(!same_view(&old, &new, "east"), "east's own export is a new Arc");
        // West's replaced by an equal one: looked at again (the version then decides).
        let mut replaced = old.clone();
        replaced.exports[1] = Arc::new(pb::ExportedService::default());
        assert!(!same_view(&old, &replaced, "west"));
        // West stops exporting, or a field beside the endpoints changes.
        let mut gone = old.clone();
        gone.exports.pop();
        gone.clusters.pop();
        assert!(!same_view(&old, &gone, "west"));
        assert!(
            same_view(&gone, &gone.clone(), "west"),
            "no export of west's either way"
        );
        let mut other_ip = old.clone();
        other_ip.clusterset_ip = std::net::Ipv4Addr::new(10, 9, 9, 9);
        assert!(!same_view(&old, &other_ip, "west"));
        let mut other_identities = old.clone();
        other_identities
            .identities
            .push("spiffe://mesh.local/ns/demo/sa/other".into());
        assert!(!same_view(&old, &other_identities, "west"));
    }

    /// A proxy's resources and snapshot, fed updates as the config stream sends them.
    struct Proxy {
        resources: strait_api::snapshot::Resources,
        snapshot: strait_api::snapshot::Snapshot,
        version: u64,
    }

    impl Proxy {
        fn new() -> Self {
            Proxy {
                resources: Default::default(),
                snapshot: Default::default(),
                version: 0,
            }
        }

        fn apply(&mut self, wire: &[Bytes], removed: Vec<String>) {
            self.apply_as(self.version == 0, wire, removed)
        }

        fn apply_as(&mut self, full: bool, wire: &[Bytes], removed: Vec<String>) {
            self.apply_replacing(full, wire, removed, 0, vec![])
        }

        /// An update that may replace buckets of what the proxy holds whole (`resume_digests`).
        fn apply_replacing(
            &mut self,
            full: bool,
            wire: &[Bytes],
            removed: Vec<String>,
            buckets: u32,
            replaced: Vec<u32>,
        ) {
            self.version += 1;
            let update = pb::ConfigUpdate {
                version: self.version,
                full,
                resources: wire.iter().map(|b| pb::Resource::decode(b.clone()).unwrap()).collect(),
                removed,
                more: false,
                buckets,
                replaced_buckets: replaced,
            };
            let (snapshot, rejected) = self.resources.update(&self.snapshot, update);
            assert!(rejected.is_empty(), "{rejected:?}");
            // The snapshot made from the last one is the one made anew.
            let fresh = self.resources.snapshot(self.version);
            assert_eq!(snapshot.services, fresh.services);
            for (addr, svc, i) in fresh.endpoints() {
                let (s, j) = snapshot
                    .endpoint_by_addr(addr.socket())
                    .expect("every endpoint indexed");
                assert!(Arc::ptr_eq(s, svc) && i == j);
            }
            self.snapshot = snapshot;
        }

        /// Each service with its endpoints in address order (the order of clusters differs
        /// between the whole form, oldest export first, and parts, by name).
        fn services(&self) -> Vec<String> {
            self.snapshot
                .services
                .values()
                .map(|s| {
                    let mut endpoints: Vec<String> = s
                        .endpoints
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            format!(
                                "{} ready={} {} {} {}",
                                e.address,
                                e.ready,
                                e.locality().cluster,
                                e.identity(),
                                s.workload(i)
                            )
                        })
                        .collect();
                    endpoints.sort();
                    format!(
                        "{} {:?} {:?} {:?} {endpoints:?}",
                        s.key(),
                        s.clusterset_ip,
                        s.ports,
                        s.identities
                    )
                })
                .collect()
        }
    }

    /// A catalog at five steps: demo/echo exported by two clusters, then one cluster's
    /// endpoints changed, one cluster gone, back with another port, and echo gone; demo/other
    /// the same throughout.
    fn echo_steps() -> Vec<Merged> {
        let export = |cluster: &str, n: usize, ready: bool| {
            Arc::new(pb::ExportedService {
                identities: vec!["spiffe://mesh.local/ns/demo/sa/echo".into()],
                endpoints: (0..n)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.{}.{i}:8080", cluster.len()),
                        workload: format!("echo-{cluster}-{i}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            ..Default::default()
                        }),
                        identity: format!("spiffe://mesh.local/ns/demo/sa/echo-{cluster}"),
                        ready: ready || i > 0,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let service = |exports: Vec<(&str, Arc<pb::ExportedService>)>, port: u32| {
            let mut s = (*svc("echo", port)).clone();
            s.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
            s.clusters = exports.iter().map(|(c, _)| c.to_string()).collect();
            s.exports = exports.into_iter().map(|(_, e)| e).collect();
            Arc::new(s)
        };
        let other = Arc::new(MergedService {
            exports: vec![export("east", 1, true)],
            ..(*svc("other", 80)).clone()
        });
        // West exported first: the whole form lists west's endpoints first, parts east's.
        let (west, east) = (export("westcluster", 2, true), export("east", 3, true));
        vec![
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("westcluster", west.clone()), ("east", east.clone())], 80),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // One cluster's endpoints change: east's part alone is sent.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(
                        vec![("westcluster", west.clone()), ("east", export("east", 4, false))],
                        80,
                    ),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // West stops exporting: its part is removed, and so are its endpoints' identities.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("east", export("east", 4, false))], 80),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // West is back and the port changes: the service's fields and every part.
            BTreeMap::from([
                (
                    "demo/echo".into(),
                    service(vec![("east", export("east", 4, false)), ("westcluster", west)], 81),
                ),
                ("demo/other".into(), other.clone()),
            ]),
            // The service goes, with its parts.
            BTreeMap::from([("demo/other".into(), other)]),
        ]
    }

    #[test]
    fn a_proxy_given_services_in_parts_holds_what_one_given_them_whole_holds() {
        let steps = echo_steps();
        let (policy, objects) = (pb::LocalityPolicy::default(), Default::default());
        let (mut whole_proxy, mut parts_proxy) = (Proxy::new(), Proxy::new());
        let mut sent = Resources::default();
        let mut memo = BuildMemo::new("east");
        let (mut sent_in_parts, mut identities) = (vec![], vec![]);
        for merged in &steps {
            let now = build_with(&mut memo, merged, MergeChange::ANY, &inputs(&[], &policy, &objects));
            let sidecar = |name: &str| !gateway_only(name);
            let (changed, removed) = diff(&sent, &now, sidecar);
            let wire: Vec<Bytes> = changed.iter().map(|r| r.wire().clone()).collect();
            whole_proxy.apply(&wire, removed.clone());
            let (wire, removed) = in_parts(&sent, changed, removed);
            let names: Vec<String> = wire
                .iter()
                .map(|b| pb::Resource::decode(b.clone()).unwrap().name)
                .chain(removed.iter().map(|r| format!("-{r}")))
                .collect();
            sent_in_parts.push(names);
            parts_proxy.apply(&wire, removed);
            assert_eq!(parts_proxy.services(), whole_proxy.services());
            identities.push(
                parts_proxy
                    .snapshot
                    .services
                    .get("demo/echo")
                    .map(|s| s.identities.iter().map(|i| i.to_string()).collect::<Vec<_>>()),
            );
            sent = now;
        }
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            sent_in_parts[0],
            names(&[
                "policy/locality",
                "service/demo/echo",
                "endpoints/demo/echo/east",
                "endpoints/demo/echo/westcluster",
                "service/demo/other",
                "endpoints/demo/other/east",
            ])
        );
        assert_eq!(sent_in_parts[1], names(&["endpoints/demo/echo/east"]));
        assert_eq!(sent_in_parts[2], names(&["-endpoints/demo/echo/westcluster"]));
        assert_eq!(
            sent_in_parts[3],
            names(&[
                "service/demo/echo",
                "endpoints/demo/echo/east",
                "endpoints/demo/echo/westcluster"
            ])
        );
        assert_eq!(
            sent_in_parts[4],
            names(&[
                "-service/demo/echo",
                "-endpoints/demo/echo/east",
                "-endpoints/demo/echo/westcluster"
            ])
        );
        // West's endpoints' identity went with them, and came back.
        let west_id = |ids: &Vec<String>| ids.iter().any(|i| i.ends_with("sa/echo-westcluster"));
        assert_eq!(
            identities.iter().map(|i| i.as_ref().map(west_id)).collect::<Vec<_>>(),
            [Some(true), Some(true), Some(false), Some(true), None]
        );
    }

    /// A proxy that held the state of any step and says so is sent, by [`resume`], what makes
    /// it hold the state of any other step exactly as a proxy sent that whole state does: in
    /// parts or whole, and nothing at all when it holds the state already.
    #[test]
    fn a_proxy_that_says_what_it_holds_is_sent_only_what_differs() {
        let steps = echo_steps();
        let (policy, objects) = (pb::LocalityPolicy::default(), Default::default());
        let mut memo = BuildMemo::new("east");
        let states: Vec<Resources> = steps
            .iter()
            .map(|merged| build_with(&mut memo, merged, MergeChange::ANY, &inputs(&[], &policy, &objects)))
            .collect();
        let sidecar = |name: &str| !gateway_only(name);
        let nothing = Resources::default();
        let all = |i: usize| diff(&nothing, &states[i], sidecar).0;
        // A proxy sent state `i` whole (in parts or not), as on a first connect.
        let first = |i: usize, parts: bool| {
            let mut proxy = Proxy::new();
            let (wire, removed) = if parts {
                in_parts(&nothing, all(i), vec![])
            } else {
                (all(i).iter().map(|r| r.wire().clone()).collect(), vec![])
            };
            proxy.apply(&wire, removed);
            proxy
        };
        let names = |wire: &[Bytes]| -> Vec<String> {
            wire.iter()
                .map(|b| pb::Resource::decode(b.clone()).unwrap().name)
                .collect()
        };
        // A resumed proxy holds what one sent that state whole holds.
        let holds_as_sent_whole = |proxy: &Proxy, to: usize, parts: bool, how: &str| {
            let whole = first(to, parts);
            assert_eq!(proxy.services(), whole.services(), "{how}");
            assert_eq!(
                proxy.resources.held(usize::MAX).0,
                whole.resources.held(usize::MAX).0,
                "{how}: what it holds"
            );
        };
        for parts in [true, false] {
            for from in 0..states.len() {
                for to in 0..states.len() {
                    let mut proxy = first(from, parts);
                    let held: HashMap<String, u64> = proxy
                        .resources
                        .held(usize::MAX)
                        .0
                        .into_iter()
                        .map(|h| (h.name, h.version))
                        .collect();
                    let (wire, removed) = resume(all(to), &held, parts);
                    if from == to {
                        assert!(
                            wire.is_empty() && removed.is_empty(),
                            "step {from} again (parts {parts}): {:?} {removed:?}",
                            names(&wire)
                        );
                    }
                    if parts && (from, to) == (0, 1) {
                        // East's endpoints changed: they alone.
                        assert_eq!(names(&wire), ["endpoints/demo/echo/east"]);
                        assert!(removed.is_empty());
                    }
                    if parts && (from, to) == (1, 3) {
                        // The service's fields changed: sent with every part, as the config
                        // stream's contract has it (east's is the one held).
                        assert_eq!(
                            names(&wire),
                            [
                                "service/demo/echo",
                                "endpoints/demo/echo/east",
                                "endpoints/demo/echo/westcluster"
                            ]
                        );
                    }
                    if parts && (from, to) == (3, 4) {
                        assert!(wire.is_empty());
                        assert_eq!(
                            removed,
                            [
                                "endpoints/demo/echo/east",
                                "endpoints/demo/echo/westcluster",
                                "service/demo/echo"
                            ]
                        );
                    }
                    proxy.apply_as(false, &wire, removed);
                    holds_as_sent_whole(&proxy, to, parts, &format!("from step {from} to {to} (parts {parts})"));
                }
            }
        }
        // The same with what the proxy holds said as digests of buckets of it: what is sent
        // makes it hold the other step's state exactly, and nothing is sent when it holds it.
        for parts in [true, false] {
            for from in 0..states.len() {
                for to in 0..states.len() {
                    let mut proxy = first(from, parts);
                    let digests = proxy.resources.held_digests();
                    assert_eq!(digests.len(), 16, "the fewest buckets a proxy hashes into");
                    let (wire, replaced) = resume_digests(all(to), &digests, parts);
                    if from == to {
                        assert!(
                            wire.is_empty() && replaced.is_empty(),
                            "step {from} again (parts {parts}): {:?} {replaced:?}",
                            names(&wire)
                        );
                    } else {
                        assert!(!replaced.is_empty(), "from step {from} to {to} (parts {parts})");
                    }
                    proxy.apply_replacing(false, &wire, vec![], digests.len() as u32, replaced);
                    holds_as_sent_whole(
                        &proxy,
                        to,
                        parts,
                        &format!("from step {from} to {to} (parts {parts}), by digests"),
                    );
                }
            }
        }
        // A resource held without a version is never taken as held.
        let held: HashMap<String, u64> =
            [("policy/locality".to_string(), strait_api::snapshot::fingerprint(""))].into();
        let mut unversioned = (*states[0]["policy/locality"]).clone();
        unversioned.version = String::new();
        let unversioned = Arc::new(unversioned);
        let (wire, removed) = resume(vec![&unversioned], &held, true);
        assert_eq!((names(&wire), removed), (vec!["policy/locality".to_string()], vec![]));
        // ... nor are the buckets of one, whatever their digests.
        let bucket = strait_api::xds::bucket_of("policy/locality", 16);
        let mut digests = vec![0u64; 16];
        digests[bucket] = strait_api::xds::held_item("policy/locality", strait_api::snapshot::fingerprint(""));
        let (wire, replaced) = resume_digests(vec![&unversioned], &digests, true);
        assert_eq!(
            (names(&wire), replaced),
            (vec!["policy/locality".to_string()], vec![bucket as u32])
        );
    }
}
