//! The config a proxy serves from: resources received on the config stream, each validated into
//! a typed entry, assembled into one immutable [`Snapshot`] that is swapped atomically.
//!
//! [`Resources::apply`] is the two-step update: every resource in an update is converted and
//! checked first; a bad one is rejected by name (and the last good version of it kept), then
//! the new set replaces the old in one step. [`Resources::update`] also makes the next
//! snapshot, from the previous one where only services changed (endpoint churn), so a
//! change's cost follows what changed rather than the catalog's size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use strait_trust::{SpiffeId, TrustBundle};

use crate::lb::{DistributeRule, LbPolicy, OutlierConfig};
use crate::locality::Locality;
use crate::pb;

/// The suffix of cross-cluster service names.
pub const CLUSTERSET_SUFFIX: &str = "svc.clusterset.local";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2, told apart per connection.
    Http,
    /// gRPC: HTTP/2 end to end.
    Grpc,
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortEntry {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// An endpoint's address as a catalog holds it: 20 bytes where a `SocketAddr` takes 32, since
/// a catalog address carries no IPv6 flow label or scope (one that does is refused when
/// parsed). A catalog of 40,000 endpoints holds each address twice (entry and index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointAddr {
    ip: IpAddr,
    port: u16,
}

impl EndpointAddr {
    pub fn ip(self) -> IpAddr {
        self.ip
    }

    pub fn port(self) -> u16 {
        self.port
    }

    pub fn socket(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl From<SocketAddr> for EndpointAddr {
    fn from(a: SocketAddr) -> Self {
        EndpointAddr {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl std::str::FromStr for EndpointAddr {
    type Err = String;

    /// `ip:port` or `[ipv6]:port`; an IPv6 scope (`%eth0`, `%2`) names a link of one host and
    /// means nothing to a proxy elsewhere, so it is refused rather than dropped.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<SocketAddr>() {
            Ok(SocketAddr::V6(v6)) if v6.scope_id() != 0 || v6.flowinfo() != 0 => Err(format!(
                "{s:?} has an IPv6 scope or flow label; give the address without it"
            )),
            Ok(a) => Ok(a.into()),
            Err(_) => Err(format!("{s:?} is not an address (expected ip:port)")),
        }
    }
}

impl std::fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.socket().fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointEntry {
    pub address: EndpointAddr,
    pub ready: bool,
    /// Where it runs, as whom and with which labels: shared by the endpoints of a service
    /// that have all three in common (one pointer each, where three made an entry 16 bytes
    /// larger and a service's endpoint vector a size class up).
    pub profile: Arc<EndpointProfile>,
}

/// What many endpoints have in common.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointProfile {
    /// Shared by every endpoint of the catalog in one locality.
    pub locality: Arc<Locality>,
    /// Shared by every endpoint of the catalog that runs as one identity.
    pub identity: Arc<SpiffeId>,
    /// Shared by the endpoints of a service that carry the same labels.
    pub labels: Arc<BTreeMap<String, String>>,
}

impl EndpointEntry {
    pub fn locality(&self) -> &Arc<Locality> {
        &self.profile.locality
    }

    pub fn identity(&self) -> &Arc<SpiffeId> {
        &self.profile.identity
    }

    pub fn labels(&self) -> &Arc<BTreeMap<String, String>> {
        &self.profile.labels
    }

    /// `<cluster>/<address>`: unique in the clusterset (an address only within its cluster),
    /// for connection pools and messages. Made on demand rather than held: a catalog of 40,000
    /// endpoints would hold 2 MiB of these.
    pub fn key(&self) -> String {
        format!("{}/{}", self.locality().cluster, self.address)
    }

    /// How outlier detection knows this endpoint (nothing allocated).
    pub fn target(&self) -> crate::lb::Target<'_> {
        crate::lb::Target::Endpoint(&self.locality().cluster, self.address.socket())
    }
}

/// How a destination-total rate limit's shares name an endpoint: `<cluster>/<workload>`, as
/// the Istio metrics' destination labels name it.
pub fn share_key(cluster: &str, workload: &str) -> String {
    format!("{cluster}/{workload}")
}

/// The key of a TrafficPolicy aimed at one route rule of `namespace/name`.
pub fn rule_key(namespace: &str, name: &str, rule: &str) -> String {
    format!("{namespace}/{name}#{rule}")
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub clusterset_ip: Option<IpAddr>,
    pub ports: Vec<PortEntry>,
    pub endpoints: Vec<EndpointEntry>,
    /// The workload name of each endpoint, in the same order ([`ServiceEntry::workload`]).
    pub workloads: Workloads,
    /// Every identity that may serve this service, sorted: those the catalog declares and
    /// those of its endpoints (what a client accepts from whichever endpoint answers).
    pub identities: Vec<SpiffeId>,
    /// Those the service's own resource declares (`identities` less its endpoints'): kept to
    /// work `identities` out again when one cluster's endpoints change.
    pub declared: Vec<SpiffeId>,
    /// For a service received in parts (`endpoints/<ns>/<name>/<cluster>`), where each
    /// cluster's endpoints lie in `endpoints`, in cluster-name order; the endpoints before the
    /// first came with the service's own resource. Empty for a service received whole.
    pub spans: Vec<Span>,
}

/// Where one cluster's endpoints lie in a service received in parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub cluster: Box<str>,
    pub start: u32,
    pub end: u32,
    /// The version of the part they came in, as [`fingerprint`] holds it: a full update that
    /// sends that version again leaves them as they are.
    pub version: u64,
}

/// What one entry of `Hello.held` takes encoded in the Hello: its field's tag and length, and
/// the message (its name and version).
fn held_len(h: &pb::Held) -> usize {
    let len = prost::Message::encoded_len(h);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// A resource version as a part's [`Span`] holds it, in 8 bytes where the string would take
/// an allocation per part: the controller's versions (16 hex digits, a digest's first 8 bytes)
/// as that number, exactly; any other as a 64-bit hash of it.
pub fn fingerprint(version: &str) -> u64 {
    match u64::from_str_radix(version, 16) {
        Ok(v) if version.len() == 16 => v,
        _ => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            version.hash(&mut h);
            h.finish()
        }
    }
}

/// One cluster's endpoints of a service as received (`endpoints/<ns>/<name>/<cluster>`),
/// converted and checked; joined to its service when the update is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointsPart {
    /// The service's resource name, `service/<ns>/<name>`.
    pub service: String,
    pub cluster: String,
    pub endpoints: Vec<EndpointEntry>,
    pub workloads: Workloads,
}

/// A service's endpoints' workload names end to end in one string, with where each ends: one
/// allocation for all of them, where a name of its own in each endpoint took 16 bytes there
/// plus an allocation (a pod's name is some 30 bytes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workloads {
    names: Box<str>,
    ends: Box<[u32]>,
}

impl Workloads {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let (mut all, mut ends) = (String::new(), vec![]);
        for name in names {
            all.push_str(name);
            ends.push(u32::try_from(all.len()).unwrap_or(u32::MAX));
        }
        Workloads {
            names: all.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// The `i`th name ("" past the last).
    pub fn get(&self, i: usize) -> &str {
        let Some(&end) = self.ends.get(i) else { return "" };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.names.get(start as usize..end as usize).unwrap_or("")
    }
}

impl ServiceEntry {
    /// The workload name of endpoint `i`.
    pub fn workload(&self, i: usize) -> &str {
        self.workloads.get(i)
    }

    /// `<namespace>/<name>`, the key of the catalog and of policies.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn host(&self) -> String {
        format!("{}.{}.{CLUSTERSET_SUFFIX}", self.name, self.namespace)
    }

    pub fn port(&self, port: u16) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GatewayEntry {
    pub cluster: String,
    pub address: SocketAddr,
    pub identity: SpiffeId,
    pub locality: Locality,
    pub reachable: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyEntry {
    pub lb: LbPolicy,
    pub outlier: OutlierConfig,
}

#[derive(Clone, Debug)]
pub enum Typed {
    Service(Arc<ServiceEntry>),
    Gateway(Arc<GatewayEntry>),
    Policy(Arc<PolicyEntry>),
    Bundle(Arc<TrustBundle>),
    Route(Arc<RouteEntry>),
    Traffic(Arc<crate::traffic::CompiledPolicy>, i64),
    Authz(Arc<crate::authz::CompiledAuthz>),
    /// A service key (`<ns>/<name>`) and its rate-limit shares.
    Shares(String, Arc<HashMap<String, f64>>),
    /// One cluster's endpoints of a service ([`EndpointsPart`]) as received: joined to its
    /// service when the update is applied, and held there (its span), not by name.
    Endpoints(Arc<EndpointsPart>),
}

/// An HTTPRoute as received: its spec checked (every field but the backends, which are looked
/// up when the snapshot is assembled), with what orders it among routes of equal precedence.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteEntry {
    pub namespace: String,
    pub name: String,
    pub spec: crate::routes::HttpRouteSpec,
    pub created_unix_ms: i64,
    pub cluster: String,
}

fn convert_route(r: &pb::HttpRoute) -> Result<RouteEntry, FieldError> {
    let spec: crate::routes::HttpRouteSpec =
        serde_json::from_str(&r.spec_json).map_err(|e| bad("spec", e.to_string()))?;
    let (_, errors) = crate::routes::compile_route(&r.namespace, &r.name, &spec, &|_| {
        crate::routes::compile::BackendLookup::Found
    });
    if let Some(e) = errors.iter().find(|e| e.rejects_route()) {
        return Err(bad(&format!("spec.{}", e.field), e.message.clone()));
    }
    Ok(RouteEntry {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        spec,
        created_unix_ms: r.created_unix_ms,
        cluster: r.cluster.clone(),
    })
}

fn convert_traffic(p: &pb::TrafficPolicy) -> Result<crate::traffic::CompiledPolicy, FieldError> {
    let spec: crate::traffic::TrafficPolicySpec =
        serde_json::from_str(&p.spec_json).map_err(|e| bad("spec", e.to_string()))?;
    let (compiled, errors) = crate::traffic::compile_policy(&p.namespace, &p.name, &spec, &|_, _| {
        crate::traffic::TargetLookup::Found
    });
    match compiled {
        Some(c) => Ok(c),
        None => {
            let e = errors
                .first()
                .map(|e| (e.field.clone(), e.message.clone()))
                .unwrap_or_default();
            Err(bad(&e.0, e.1))
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    field: String,
    problem: String,
}

fn bad(field: &str, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, FieldError> {
    s.parse()
        .map_err(|_| bad(field, format!("{s:?} is not an address (expected ip:port)")))
}

fn parse_id(field: &str, s: &str) -> Result<SpiffeId, FieldError> {
    s.parse()
        .map_err(|e: strait_trust::TrustError| bad(field, e.to_string()))
}

/// What the endpoints of every service share, parsed and held once for the whole catalog
/// rather than once per service: localities (a clusterset has a few dozen; each of the
/// published size's 300 services has endpoints in 20 of them) and identities. [`Resources`]
/// keeps it between updates, so a service's next version shares them too; what no resource
/// holds any more is let go after each update.
#[derive(Clone, Debug, Default)]
struct Interned {
    localities: HashSet<Arc<Locality>>,
    identities: HashMap<String, Arc<SpiffeId>>,
}

impl Interned {
    fn locality(&mut self, wire: &pb::Locality) -> Arc<Locality> {
        let l = Locality::from(wire);
        if let Some(held) = self.localities.get(&l) {
            return held.clone();
        }
        let l = Arc::new(l);
        self.localities.insert(l.clone());
        l
    }

    /// The identity of endpoint `i`, parsed the first time the catalog names it.
    fn identity(&mut self, i: usize, id: &str) -> Result<Arc<SpiffeId>, FieldError> {
        if let Some(held) = self.identities.get(id) {
            return Ok(held.clone());
        }
        let parsed = Arc::new(parse_id(&format!("endpoints[{i}].identity"), id)?);
        self.identities.insert(id.to_string(), parsed.clone());
        Ok(parsed)
    }

    /// Lets go of what only this table holds.
    fn prune(&mut self) {
        self.localities.retain(|l| Arc::strong_count(l) > 1);
        self.identities.retain(|_, id| Arc::strong_count(id) > 1);
    }
}

/// Converts one wire resource into its typed form, naming the first bad field.
/// The prefix of a gateway's view of a service (`local/service/<ns>/<name>`: the service with
/// only the endpoints the gateway's own cluster exports).
pub const LOCAL_VIEW: &str = "local/";

pub fn convert(res: &pb::Resource) -> Result<Typed, FieldError> {
    convert_with(res, &mut Interned::default())
}

/// [`convert`], sharing localities and identities through `interned`.
fn convert_with(res: &pb::Resource, interned: &mut Interned) -> Result<Typed, FieldError> {
    use pb::resource::Kind;
    match &res.kind {
        Some(Kind::Service(s)) => {
            let svc = convert_service(s, interned)?;
            // Named as its key says (or its gateway view, [`LOCAL_VIEW`]): an update's changes
            // are found by resource name, and an `endpoints/…` name leads to another service's
            // parts.
            let name = res.name.strip_prefix(LOCAL_VIEW).unwrap_or(&res.name);
            if name.strip_prefix("service/").and_then(|n| n.split_once('/')) != Some((&s.namespace, &s.name)) {
                let want = format!("service/{}/{}", s.namespace, s.name);
                return Err(bad(
                    "name",
                    format!("{:?} must be {want:?}, from the resource's fields", res.name),
                ));
            }
            Ok(Typed::Service(Arc::new(svc)))
        }
        Some(Kind::ServiceEndpoints(p)) => convert_part(&res.name, p, interned).map(|p| Typed::Endpoints(Arc::new(p))),
        Some(Kind::Gateway(g)) => Ok(Typed::Gateway(Arc::new(GatewayEntry {
            cluster: g.cluster.clone(),
            address: parse_addr("address", &g.address)?,
            identity: parse_id("identity", &g.identity)?,
            locality: g.locality.as_ref().map(Locality::from).unwrap_or_default(),
            reachable: g.reachable,
        }))),
        Some(Kind::LocalityPolicy(p)) => convert_policy(p).map(|p| Typed::Policy(Arc::new(p))),
        Some(Kind::HttpRoute(r)) => convert_route(r).map(|r| Typed::Route(Arc::new(r))),
        Some(Kind::AuthorizationPolicy(p)) => crate::authz::compile_wire(p)
            .map(|c| Typed::Authz(Arc::new(c)))
            .map_err(|e| bad(&e.field, e.message)),
        Some(Kind::TrafficPolicy(p)) => convert_traffic(p).map(|c| Typed::Traffic(Arc::new(c), p.created_unix_ms)),
        Some(Kind::RateShares(r)) => {
            if let Some((k, v)) = r.shares.iter().find(|(_, v)| !v.is_finite() || **v < 0.0 || **v > 1.0) {
                return Err(bad(
                    &format!("shares.{k}"),
                    format!("{v} is not a fraction between 0 and 1"),
                ));
            }
            Ok(Typed::Shares(
                format!("{}/{}", r.namespace, r.name),
                Arc::new(r.shares.iter().map(|(k, v)| (k.clone(), *v)).collect()),
            ))
        }
        Some(Kind::TrustBundle(b)) => TrustBundle::from_pem(&res.name, b.pem.as_bytes())
            .map(|b| Typed::Bundle(Arc::new(b)))
            .map_err(|e| bad("pem", e.to_string())),
        None => Err(bad("kind", "the resource has no body")),
    }
}

fn convert_service(s: &pb::Service, interned: &mut Interned) -> Result<ServiceEntry, FieldError> {
    if s.name.is_empty() || s.namespace.is_empty() {
        return Err(bad("name", "service name and namespace are required"));
    }
    let clusterset_ip = if s.clusterset_ip.is_empty() {
        None
    } else {
        Some(
            s.clusterset_ip
                .parse()
                .map_err(|_| bad("clustersetIP", format!("{:?} is not an IP address", s.clusterset_ip)))?,
        )
    };
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let port = u16::try_from(p.port).ok().filter(|p| *p > 0).ok_or_else(|| {
                bad(
                    &format!("ports[{i}].port"),
                    format!("{} is not a port (1-65535)", p.port),
                )
            })?;
            let protocol = match p.protocol.as_str() {
                "http" | "HTTP" | "" => Protocol::Http,
                "grpc" | "GRPC" => Protocol::Grpc,
                "tcp" | "TCP" => Protocol::Tcp,
                other => {
                    return Err(bad(
                        &format!("ports[{i}].protocol"),
                        format!("{other:?} is not a protocol (use http, grpc or tcp)"),
                    ))
                }
            };
            Ok(PortEntry {
                name: p.name.clone(),
                port,
                protocol,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (endpoints, profiles) = convert_endpoints(&s.endpoints, interned)?;
    let declared = s
        .identities
        .iter()
        .enumerate()
        .map(|(i, id)| parse_id(&format!("identities[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceEntry {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        clusterset_ip,
        ports,
        endpoints,
        workloads: Workloads::new(s.endpoints.iter().map(|e| e.workload.as_str())),
        identities: identities_of(&declared, profiles.iter().map(|p| &p.identity)),
        declared,
        spans: vec![],
    })
}

/// The declared identities and the endpoints' (`ids`, shared: told apart by pointer first),
/// sorted, each once.
fn identities_of<'a>(declared: &[SpiffeId], ids: impl IntoIterator<Item = &'a Arc<SpiffeId>>) -> Vec<SpiffeId> {
    let mut seen: Vec<&Arc<SpiffeId>> = vec![];
    for id in ids {
        if !seen.iter().any(|s| Arc::ptr_eq(s, id)) {
            seen.push(id);
        }
    }
    let mut identities: Vec<SpiffeId> = declared.to_vec();
    identities.extend(seen.into_iter().map(|id| (**id).clone()));
    identities.sort();
    identities.dedup();
    identities
}

/// `endpoints/<ns>/<name>/<cluster>`: checked like a service's endpoints, and its name must be
/// the one its body gives (removals find it by name).
fn convert_part(name: &str, p: &pb::ServiceEndpoints, interned: &mut Interned) -> Result<EndpointsPart, FieldError> {
    if p.name.is_empty() || p.namespace.is_empty() || p.cluster.is_empty() {
        return Err(bad(
            "name",
            "the service's name and namespace and the cluster are required",
        ));
    }
    let want = format!("endpoints/{}/{}/{}", p.namespace, p.name, p.cluster);
    if name != want {
        return Err(bad(
            "name",
            format!("{name:?} must be {want:?}, from the resource's fields"),
        ));
    }
    let (endpoints, _) = convert_endpoints(&p.endpoints, interned)?;
    Ok(EndpointsPart {
        service: format!("service/{}/{}", p.namespace, p.name),
        cluster: p.cluster.clone(),
        endpoints,
        workloads: Workloads::new(p.endpoints.iter().map(|e| e.workload.as_str())),
    })
}

/// Endpoints from the wire, with the distinct profiles they share.
fn convert_endpoints(
    wire: &[pb::Endpoint],
    interned: &mut Interned,
) -> Result<(Vec<EndpointEntry>, Vec<Arc<EndpointProfile>>), FieldError> {
    // A service's endpoints share a few localities, identities and label sets: each is parsed
    // and held once (a catalog of 40,000 endpoints would otherwise hold 40,000 copies of each),
    // localities and identities once for the whole catalog. Identities are looked up there by
    // their text; a locality is compared with the service's own short list first, since the
    // catalog-wide table is keyed by a built `Locality` (one per distinct value here).
    let mut localities: Vec<Arc<Locality>> = vec![];
    let no_locality = pb::Locality::default();
    let mut label_sets: HashMap<BTreeMap<String, String>, Arc<BTreeMap<String, String>>> = HashMap::new();
    // Then each distinct combination of the three, told apart by pointer.
    let mut profiles: Vec<Arc<EndpointProfile>> = vec![];
    let mut endpoints = wire
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let wire = e.locality.as_ref().unwrap_or(&no_locality);
            let locality = match localities.iter().find(|l| same_locality(l, wire)) {
                Some(l) => l.clone(),
                None => {
                    let l = interned.locality(wire);
                    localities.push(l.clone());
                    l
                }
            };
            let identity = interned.identity(i, &e.identity)?;
            let address = e
                .address
                .parse::<EndpointAddr>()
                .map_err(|problem| bad(&format!("endpoints[{i}].address"), problem))?;
            let labels = label_sets
                .entry(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .or_insert_with_key(|l| Arc::new(l.clone()))
                .clone();
            let same = |p: &&Arc<EndpointProfile>| {
                Arc::ptr_eq(&p.locality, &locality)
                    && Arc::ptr_eq(&p.identity, &identity)
                    && Arc::ptr_eq(&p.labels, &labels)
            };
            let profile = match profiles.iter().find(same) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(EndpointProfile {
                        locality,
                        identity,
                        labels,
                    });
                    profiles.push(p.clone());
                    p
                }
            };
            Ok(EndpointEntry {
                address,
                ready: e.ready,
                profile,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Collected through a `Result`, the vector grew by doubling: up to half of it would be
    // spare capacity, held for as long as the service is.
    endpoints.shrink_to_fit();
    Ok((endpoints, profiles))
}

fn same_locality(l: &Locality, wire: &pb::Locality) -> bool {
    l.cluster == wire.cluster && l.region == wire.region && l.zone == wire.zone && l.subzone == wire.subzone
}

fn convert_policy(p: &pb::LocalityPolicy) -> Result<PolicyEntry, FieldError> {
    let overprovisioning = match p.overprovisioning_percent {
        0 => 1.4,
        100..=1000 => p.overprovisioning_percent as f64 / 100.0,
        other => return Err(bad("overprovisioningPercent", format!("{other} is outside 100-1000"))),
    };
    let distribute = p
        .distribute
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let total: u32 = d.to.values().sum();
            if total != 100 {
                return Err(bad(
                    &format!("distribute[{i}].to"),
                    format!("weights sum to {total}, they must sum to 100"),
                ));
            }
            let mut to: Vec<(String, u32)> = d.to.iter().map(|(k, v)| (k.clone(), *v)).collect();
            to.sort();
            Ok(DistributeRule {
                from: d.from.clone(),
                to,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outlier = match &p.outlier_detection {
        None => OutlierConfig::default(),
        Some(o) => {
            let d = OutlierConfig::default();
            OutlierConfig {
                consecutive_errors: if o.consecutive_errors == 0 {
                    d.consecutive_errors
                } else {
                    o.consecutive_errors
                },
                base_ejection: if o.base_ejection_ms == 0 {
                    d.base_ejection
                } else {
                    Duration::from_millis(o.base_ejection_ms)
                },
                max_ejection: d.max_ejection.max(Duration::from_millis(o.base_ejection_ms)),
            }
        }
    };
    Ok(PolicyEntry {
        lb: LbPolicy {
            overprovisioning,
            failover: p.failover.iter().map(|f| (f.from.clone(), f.to.clone())).collect(),
            failover_priority: p.failover_priority.clone(),
            distribute,
            cluster_order: p.cluster_order.clone(),
        },
        outlier,
    })
}

/// An update as it arrives, each resource converted and checked as soon as its part is
/// decoded: a large update comes in parts (`ConfigUpdate.more`), and each part's wire form is
/// dropped once converted, so a whole catalog is never held twice, wire and typed.
#[derive(Debug, Default)]
pub struct Pending {
    version: u64,
    full: bool,
    parts: usize,
    accepted: Vec<(String, String, Typed)>,
    rejected: Vec<pb::Rejection>,
    removed: Vec<String>,
    /// Resources that came at the version the proxy already holds: not converted again, and
    /// left as they are (a controller that restarted sends every resource again, most of them
    /// unchanged).
    unchanged: Vec<String>,
    /// An update resuming the proxy from its `Hello.held_digests`: how many buckets it hashed
    /// what it holds into, and those the update replaces whole ([`Pending::as_change`]).
    buckets: u32,
    replaced: Vec<u32>,
    /// Lent by the [`Resources`] the update is for ([`Resources::pending`]), given back when
    /// it is applied.
    interned: Interned,
}

impl Pending {
    /// Adds one part of an update for the proxy holding `held`; returns whether the update is
    /// whole (the part was the last). A bad resource is rejected by name here; the rest go on.
    pub fn add(&mut self, part: pb::ConfigUpdate, held: &Resources) -> bool {
        self.version = part.version;
        self.full |= part.full;
        self.parts += 1;
        self.buckets = self.buckets.max(part.buckets);
        self.replaced.extend(part.replaced_buckets);
        for res in part.resources {
            // Only a full update, or one that replaces buckets whole, resends what a proxy
            // holds (a delta names what changed).
            if (self.full || self.buckets > 0) && held.holds(&res.name, &res.version) {
                self.unchanged.push(res.name);
                continue;
            }
            match convert_with(&res, &mut self.interned) {
                Ok(typed) => self.accepted.push((res.name, res.version, typed)),
                Err(e) => {
                    tracing::warn!(resource = %res.name, error = %e, "rejected config resource; keeping the last good version");
                    self.rejected.push(pb::Rejection {
                        name: res.name,
                        error: e.to_string(),
                    });
                }
            }
        }
        self.removed.extend(part.removed);
        !part.more
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the update is the whole state (sent on every new stream).
    pub fn full(&self) -> bool {
        self.full
    }

    /// How many messages the update came in.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// How many resources the update carried (accepted, unchanged or rejected).
    pub fn received(&self) -> usize {
        self.accepted.len() + self.unchanged.len() + self.rejected.len()
    }

    /// How many of them the proxy already held at their version.
    pub fn unchanged(&self) -> usize {
        self.unchanged.len()
    }

    /// How many names the update removes.
    pub fn removed(&self) -> usize {
        self.removed.len()
    }

    /// A full update to a proxy that held some of it already, as the change it makes: what
    /// `held` holds and the update does not name (a resource, or one cluster's endpoints of a
    /// service) is removed, what it names unchanged is left alone. Applied so, the services
    /// it leaves alone stay the very entries the proxy held (no rebuild, no second copy of
    /// the catalog beside the first while it is applied). An update that replaces buckets
    /// whole is the same within those buckets: what the proxy held there and the update does
    /// not name is removed.
    fn as_change(&mut self, held: &Resources) {
        let buckets = self.buckets as usize;
        // A bucket count the proxy did not send cannot name its buckets: nothing is replaced.
        let replacing = !self.full && !self.replaced.is_empty() && crate::xds::valid_buckets(buckets);
        if !replacing && (!self.full || self.unchanged.is_empty()) {
            return;
        }
        let replaced: HashSet<usize> = self.replaced.iter().map(|b| *b as usize).collect();
        let named: HashSet<&str> = self
            .accepted
            .iter()
            .map(|(name, _, _)| name.as_str())
            .chain(self.rejected.iter().map(|r| r.name.as_str()))
            .chain(self.unchanged.iter().map(String::as_str))
            .collect();
        let mut removed = vec![];
        for (name, (_, typed)) in &held.entries {
            // A service's endpoints are in its bucket.
            if replacing && !replaced.contains(&crate::xds::bucket_of(name, buckets)) {
                continue;
            }
            if !named.contains(name.as_str()) {
                removed.push(name.clone());
            }
            if let Typed::Service(svc) = typed {
                let service = name.strip_prefix("service/").unwrap_or(name);
                for span in &svc.spans {
                    let part = format!("endpoints/{service}/{}", span.cluster);
                    if !named.contains(part.as_str()) {
                        removed.push(part);
                    }
                }
            }
        }
        self.removed.extend(removed);
        self.full = false;
    }

    /// Every name the update touches: its resources (rejected ones too) and its removals,
    /// each once; a cluster's endpoints of a service as the service's name.
    fn touched(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<String> = self
            .accepted
            .iter()
            .map(|(name, _, _)| name)
            .chain(self.rejected.iter().map(|r| &r.name))
            .chain(&self.removed)
            .map(|name| part_of(name).map_or_else(|| name.clone(), |(service, _)| service))
            .collect();
        names.into_iter().collect()
    }
}

/// What an update does to one service received in parts.
#[derive(Default)]
struct Join {
    /// Set when the service's own resource came: what it replaced.
    replaced: Option<Option<Arc<ServiceEntry>>>,
    /// Its clusters' endpoints that came (with the resource's name and version).
    came: Vec<(String, u64, EndpointsPart)>,
    /// The clusters whose endpoints were removed.
    gone: Vec<String>,
    /// The clusters whose endpoints were rejected: they keep their last good version.
    kept: Vec<String>,
}

/// The service (`service/<ns>/<name>`) and cluster a part's name
/// (`endpoints/<ns>/<name>/<cluster>`) stands for.
fn part_of(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix("endpoints/")?;
    let (service, cluster) = rest.rsplit_once('/')?;
    Some((format!("service/{service}"), cluster.to_string()))
}

/// The accepted resources of a proxy, by name, with their versions.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    entries: BTreeMap<String, (String, Typed)>,
    /// Lent to the update being received (see [`Resources::pending`]).
    interned: Interned,
}

impl Resources {
    /// Applies an update and returns the resources it rejected (name, reason). Rejected
    /// resources keep their last good version.
    pub fn apply(&mut self, update: pb::ConfigUpdate) -> Vec<pb::Rejection> {
        let whole = self.whole(update);
        self.commit(whole)
    }

    /// An empty update to receive in parts and then apply with [`Resources::update_with`]: it
    /// converts each part as it arrives, sharing what these resources already hold.
    pub fn pending(&mut self) -> Pending {
        Pending {
            interned: std::mem::take(&mut self.interned),
            ..Pending::default()
        }
    }

    /// An update that came in one message.
    fn whole(&mut self, update: pb::ConfigUpdate) -> Pending {
        let mut pending = self.pending();
        pending.add(update, self);
        pending
    }

    /// What these resources hold, as a proxy says it in `Hello.held`: each resource's name and
    /// version ([`fingerprint`]), and each cluster's endpoints of a service held in parts
    /// (`endpoints/<ns>/<name>/<cluster>`, the version of the part they came in). Empty when
    /// the list would take more than `max_bytes` encoded: the controller then sends the whole
    /// state, as it does on a first connect. With the list, what it takes in the Hello.
    pub fn held(&self, max_bytes: usize) -> (Vec<pb::Held>, usize) {
        let mut out = Vec::with_capacity(self.entries.len());
        for (name, (version, typed)) in &self.entries {
            // A resource without a version is listed too (so that the controller removes it
            // when it no longer has it); the controller never takes it as held.
            out.push(pb::Held {
                name: name.clone(),
                version: fingerprint(version),
            });
            if let Typed::Service(svc) = typed {
                let service = name.strip_prefix("service/").unwrap_or(name);
                out.extend(svc.spans.iter().map(|span| pb::Held {
                    name: format!("endpoints/{service}/{}", span.cluster),
                    version: span.version,
                }));
            }
        }
        let bytes: usize = out.iter().map(held_len).sum();
        if bytes > max_bytes {
            return (vec![], 0);
        }
        (out, bytes)
    }

    /// What these resources hold as a proxy says it in `Hello.held_digests`: each resource's
    /// name and version ([`fingerprint`]), and each cluster's endpoints of a service held in
    /// parts (`endpoints/<ns>/<name>/<cluster>`, the version of the part they came in), summed
    /// into [`crate::xds::buckets_for`] buckets. Empty when nothing is held.
    pub fn held_digests(&self) -> Vec<u64> {
        if self.entries.is_empty() {
            return vec![];
        }
        let buckets = crate::xds::buckets_for(self.entries.len());
        let mut sums = vec![0u64; buckets];
        for (name, (version, typed)) in &self.entries {
            // A service's endpoints share its bucket.
            let sum = &mut sums[crate::xds::bucket_of(name, buckets)];
            *sum = sum.wrapping_add(crate::xds::held_item(name, fingerprint(version)));
            if let Typed::Service(svc) = typed {
                let service = name.strip_prefix("service/").unwrap_or(name);
                for span in &svc.spans {
                    let part = format!("endpoints/{service}/{}", span.cluster);
                    *sum = sum.wrapping_add(crate::xds::held_item(&part, span.version));
                }
            }
        }
        sums
    }

    /// Whether these resources hold `name` at `version` (one cluster's endpoints of a
    /// service by the version of the part they came in). A resource without a version is
    /// never held: nothing tells its content.
    fn holds(&self, name: &str, version: &str) -> bool {
        if version.is_empty() {
            return false;
        }
        match part_of(name) {
            Some((service, cluster)) => match self.entries.get(&service) {
                Some((_, Typed::Service(svc))) => svc
                    .spans
                    .iter()
                    .any(|s| *s.cluster == *cluster && s.version == fingerprint(version)),
                _ => false,
            },
            None => self.entries.get(name).is_some_and(|(v, _)| v == version),
        }
    }

    fn commit(&mut self, mut update: Pending) -> Vec<pb::Rejection> {
        update.as_change(self);
        let mut rejected = update.rejected;
        // Services to join again: those whose own resource came (with what it replaced) and
        // those whose endpoints in some cluster came, went, or were rejected (and keep their
        // last good version).
        let mut joins: BTreeMap<String, Join> = BTreeMap::new();
        for r in &rejected {
            if let Some((service, cluster)) = part_of(&r.name) {
                joins.entry(service).or_default().kept.push(cluster);
            }
        }
        if update.full {
            // A rejected resource is named too: it keeps its last good version.
            let named: HashSet<&str> = update
                .accepted
                .iter()
                .map(|(name, _, _)| name.as_str())
                .chain(rejected.iter().map(|r| r.name.as_str()))
                .chain(update.unchanged.iter().map(String::as_str))
                .collect();
            self.entries.retain(|k, _| named.contains(k.as_str()));
        }
        for (name, version, typed) in update.accepted {
            match typed {
                Typed::Endpoints(part) => {
                    let part = Arc::unwrap_or_clone(part);
                    let version = fingerprint(&version);
                    joins
                        .entry(part.service.clone())
                        .or_default()
                        .came
                        .push((name, version, part));
                }
                typed => {
                    let is_service = matches!(typed, Typed::Service(_));
                    let old = self.entries.insert(name.clone(), (version, typed));
                    if is_service {
                        let join = joins.entry(name).or_default();
                        if join.replaced.is_none() {
                            join.replaced = Some(match old {
                                Some((_, Typed::Service(s))) => Some(s),
                                _ => None,
                            });
                        }
                    }
                }
            }
        }
        for name in &update.removed {
            match part_of(name) {
                Some((service, cluster)) => joins.entry(service).or_default().gone.push(cluster),
                None => {
                    self.entries.remove(name);
                }
            }
        }
        for (service, join) in joins {
            rejected.extend(self.join(&service, join, update.full));
        }
        self.interned = update.interned;
        self.interned.prune();
        rejected
    }

    /// `service` (`service/<ns>/<name>`) as its own resource now held, followed by the
    /// endpoints of each cluster it holds a part of, in cluster-name order: those that came in
    /// this update, the others as the service held them before (`ServiceEntry::spans`). Which
    /// clusters: after a full update, those it named; else those held before, with those that
    /// came and without those removed. A part with no service to join is rejected (and not
    /// held: the controller sends a service with all of its parts).
    fn join(&mut self, service: &str, join: Join, full: bool) -> Vec<pb::Rejection> {
        let Some((version, Typed::Service(head))) = self.entries.get(service) else {
            let what = service.strip_prefix("service/").unwrap_or(service);
            return join
                .came
                .into_iter()
                .map(|(name, _, _)| pb::Rejection {
                    name,
                    error: format!(
                        "name: no service {what} to hold these endpoints (its resource was rejected or not sent); \
                         they are taken when it comes again"
                    ),
                })
                .collect();
        };
        let (version, head) = (version.clone(), head.clone());
        // The service as it was before this update.
        let before: Option<Arc<ServiceEntry>> = match &join.replaced {
            Some(old) => old.clone(),
            None => Some(head.clone()),
        };
        let old_spans = before.as_ref().map(|b| b.spans.as_slice()).unwrap_or_default();
        let fields_came = join.replaced.is_some();
        if join.came.is_empty() && join.gone.is_empty() && (old_spans.is_empty() || !fields_came) {
            // Received whole (as from a controller before parts), or nothing of it changed.
            return vec![];
        }
        let mut clusters: std::collections::BTreeSet<&str> = if full {
            join.kept.iter().map(String::as_str).collect()
        } else {
            old_spans.iter().map(|s| &*s.cluster).collect()
        };
        clusters.extend(join.came.iter().map(|(_, _, p)| p.cluster.as_str()));
        for c in &join.gone {
            clusters.remove(c.as_str());
        }
        let came: HashMap<&str, (u64, &EndpointsPart)> = join
            .came
            .iter()
            .map(|(_, v, p)| (p.cluster.as_str(), (*v, p)))
            .collect();
        // The service's own endpoints first (none for a service sent in parts).
        let inline = head.spans.first().map_or(head.endpoints.len(), |s| s.start as usize);
        let mut endpoints: Vec<EndpointEntry> = head.endpoints[..inline].to_vec();
        let mut names: Vec<&str> = (0..inline).map(|i| head.workload(i)).collect();
        let mut spans = Vec::with_capacity(clusters.len());
        for c in clusters {
            let start = endpoints.len();
            let mut version = 0;
            if let Some((v, p)) = came.get(c) {
                endpoints.extend_from_slice(&p.endpoints);
                names.extend((0..p.endpoints.len()).map(|i| p.workloads.get(i)));
                version = *v;
            } else if let (Some(old), Some(span)) = (&before, old_spans.iter().find(|s| &*s.cluster == c)) {
                let range = span.start as usize..span.end as usize;
                endpoints.extend_from_slice(&old.endpoints[range.clone()]);
                names.extend(range.map(|i| old.workload(i)));
                version = span.version;
            }
            spans.push(Span {
                cluster: c.into(),
                start: start as u32,
                end: endpoints.len() as u32,
                version,
            });
        }
        endpoints.shrink_to_fit();
        let joined = ServiceEntry {
            name: head.name.clone(),
            namespace: head.namespace.clone(),
            clusterset_ip: head.clusterset_ip,
            ports: head.ports.clone(),
            identities: identities_of(&head.declared, endpoints.iter().map(|e| &e.profile.identity)),
            workloads: Workloads::new(names),
            endpoints,
            declared: head.declared.clone(),
            spans,
        };
        self.entries
            .insert(service.to_string(), (version, Typed::Service(Arc::new(joined))));
        vec![]
    }

    /// Applies an update (as [`Resources::apply`]) and returns the snapshot of the result.
    /// `prev` must be the snapshot of these resources before the update. When the update only
    /// replaces or removes services, the snapshot is `prev` with those services' entries
    /// swapped; anything else (or two services claiming one address or host) builds it anew.
    pub fn update(&mut self, prev: &Snapshot, update: pb::ConfigUpdate) -> (Snapshot, Vec<pb::Rejection>) {
        let whole = self.whole(update);
        self.update_with(prev, whole)
    }

    /// [`Resources::update`] with an update received in parts.
    pub fn update_with(&mut self, prev: &Snapshot, mut update: Pending) -> (Snapshot, Vec<pb::Rejection>) {
        update.as_change(self);
        let (full, version) = (update.full, update.version);
        let touched = update.touched();
        let service = |t: Option<&(String, Typed)>| match t {
            None => Some(None),
            Some((_, Typed::Service(s))) => Some(Some(s.clone())),
            Some(_) => None,
        };
        let before: Option<Vec<Option<Arc<ServiceEntry>>>> =
            touched.iter().map(|n| service(self.entries.get(n))).collect();
        let rejected = self.commit(update);
        let after: Option<Vec<Option<Arc<ServiceEntry>>>> =
            touched.iter().map(|n| service(self.entries.get(n))).collect();
        let snap = match (full, before, after) {
            (false, Some(before), Some(after)) => self.swap_services(prev, version, before.into_iter().zip(after)),
            _ => None,
        };
        (snap.unwrap_or_else(|| self.snapshot(version)), rejected)
    }

    /// `prev` with each (old, new) service pair swapped, or `None` where the result could
    /// differ from a snapshot built anew: an address, host or IP shared by two services, now or
    /// in `prev` (removing one owner would have to uncover the other).
    fn swap_services(
        &self,
        prev: &Snapshot,
        version: u64,
        changes: impl Iterator<Item = (Option<Arc<ServiceEntry>>, Option<Arc<ServiceEntry>>)>,
    ) -> Option<Snapshot> {
        if prev.shadowed {
            return None;
        }
        let mut snap = prev.clone();
        snap.version = version;
        let mut reroute = false;
        // Each new service, with the slot of the old one it replaces where it keeps it.
        let mut added: Vec<(Arc<ServiceEntry>, Option<u32>)> = vec![];
        for (old, new) in changes {
            if let (Some(o), Some(n)) = (&old, &new) {
                if Arc::ptr_eq(o, n) {
                    continue;
                }
            }
            reroute |= match (&old, &new) {
                (Some(o), Some(n)) => o.key() != n.key() || o.ports != n.ports,
                _ => true,
            };
            let mut kept = None;
            if let Some(o) = old {
                let owned = |s: Option<&Arc<ServiceEntry>>| s.is_some_and(|s| Arc::ptr_eq(s, &o));
                if !owned(snap.services.remove(&o.key()).as_ref()) || !owned(snap.by_host.remove(&o.host()).as_ref()) {
                    return None;
                }
                if let Some(ip) = o.clusterset_ip {
                    if !owned(snap.by_ip.remove(&ip).as_ref()) {
                        return None;
                    }
                }
                // A new version of the same service keeps the old one's slot, and the addresses
                // both have stay in the index: an endpoint's churn touches only its own entries
                // (and the index shards they live in), not every endpoint of its service.
                let keep: HashSet<&EndpointAddr> = match &new {
                    Some(n) if n.key() == o.key() => n.endpoints.iter().map(|e| &e.address).collect(),
                    _ => HashSet::new(),
                };
                let mut slot = None;
                for (i, e) in o.endpoints.iter().enumerate() {
                    let at = if keep.contains(&e.address) {
                        snap.by_endpoint.get(&e.address)
                    } else {
                        snap.by_endpoint.remove(&e.address)
                    };
                    match at {
                        Some((k, j))
                            if j as usize == i
                                && slot.is_none_or(|s| s == k)
                                && snap.slot(k).is_some_and(|s| Arc::ptr_eq(s, &o)) =>
                        {
                            slot = Some(k)
                        }
                        _ => return None,
                    }
                }
                if let Some(k) = slot {
                    if keep.is_empty() {
                        snap.slots[k as usize] = None;
                        snap.free.push(k);
                    } else {
                        kept = Some(k);
                    }
                }
            }
            added.extend(new.map(|n| (n, kept)));
        }
        // Added after every removal, so a service that takes over another's address in the
        // same update is not mistaken for a conflict.
        for (n, kept) in added {
            if snap.services.insert(n.key(), n.clone()).is_some() || snap.by_host.insert(n.host(), n.clone()).is_some()
            {
                return None;
            }
            if let Some(ip) = n.clusterset_ip {
                if snap.by_ip.insert(ip, n.clone()).is_some() {
                    return None;
                }
            }
            let k = match kept {
                Some(k) => {
                    snap.slots[k as usize] = Some(n.clone());
                    k
                }
                None => snap.take_slot(&n),
            };
            for (i, e) in n.endpoints.iter().enumerate() {
                let at = (k, i as u32);
                if kept.is_some() && snap.by_endpoint.get(&e.address) == Some(at) {
                    continue;
                }
                match snap.by_endpoint.insert(e.address, at) {
                    None => {}
                    // Its own address, moved to another index.
                    Some((k2, _)) if kept == Some(k2) => {}
                    // Another service's: built anew.
                    Some(_) => return None,
                }
            }
        }
        if reroute {
            snap.routes = route_tables(&snap, &self.routes());
        }
        Some(snap)
    }

    /// The HTTPRoutes, oldest first (the order that breaks ties in precedence).
    fn routes(&self) -> Vec<&Arc<RouteEntry>> {
        let mut routes: Vec<&Arc<RouteEntry>> = self
            .entries
            .values()
            .filter_map(|(_, t)| match t {
                Typed::Route(r) => Some(r),
                _ => None,
            })
            .collect();
        routes.sort_by(|a, b| {
            (a.created_unix_ms, &a.namespace, &a.name).cmp(&(b.created_unix_ms, &b.namespace, &b.name))
        });
        routes
    }

    pub fn snapshot(&self, version: u64) -> Snapshot {
        let mut snap = Snapshot {
            version,
            ..Snapshot::default()
        };
        for (_, typed) in self.entries.values() {
            match typed {
                Typed::Service(s) => {
                    let mut shadows = snap.by_host.insert(s.host(), s.clone()).is_some();
                    if let Some(ip) = s.clusterset_ip {
                        shadows |= snap.by_ip.insert(ip, s.clone()).is_some();
                    }
                    snap.take_slot(s);
                    shadows |= snap.services.insert(s.key(), s.clone()).is_some();
                    snap.shadowed |= shadows;
                }
                Typed::Gateway(g) => {
                    snap.gateways.insert(g.cluster.clone(), g.clone());
                }
                Typed::Policy(p) => snap.policy = p.clone(),
                Typed::Bundle(b) => {
                    let merged = snap.bundle.get_or_insert_with(TrustBundle::new);
                    let _ = merged.merge(b);
                }
                Typed::Authz(a) => snap.authz.push(a.clone()),
                Typed::Shares(key, shares) => {
                    snap.rate_shares.insert(key.clone(), shares.clone());
                }
                Typed::Route(_) | Typed::Traffic(..) | Typed::Endpoints(_) => {}
            }
        }
        // The index at once, in the order the services took their slots (a fresh snapshot
        // frees none): where two claim one address, the later by name wins, as in `by_host`.
        let (index, shadows) = EndpointIndex::build(snap.slots.iter().enumerate().flat_map(|(k, s)| {
            s.iter().flat_map(move |s| {
                s.endpoints
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (e.address, (k as u32, i as u32)))
            })
        }));
        snap.by_endpoint = index;
        snap.shadowed |= shadows;
        snap.routes = route_tables(&snap, &self.routes());
        // TrafficPolicies by target (`<ns>/<svc>`, or `<ns>/<svc>#<rule>` for one route rule);
        // where several target the same, they merge field by field and the oldest wins each
        // field (Gateway API policy attachment).
        let mut policies: Vec<(&Arc<crate::traffic::CompiledPolicy>, i64)> = self
            .entries
            .values()
            .filter_map(|(_, t)| match t {
                Typed::Traffic(p, created) => Some((p, *created)),
                _ => None,
            })
            .collect();
        policies.sort_by(|a, b| (a.1, &a.0.namespace, &a.0.name).cmp(&(b.1, &b.0.namespace, &b.0.name)));
        for (p, _) in policies {
            for t in &p.targets {
                let key = match &t.rule {
                    Some(rule) => rule_key(&t.namespace, &t.name, rule),
                    None => format!("{}/{}", t.namespace, t.name),
                };
                match snap.traffic.get_mut(&key) {
                    None => {
                        snap.traffic.insert(key, p.clone());
                    }
                    Some(older) => Arc::make_mut(older).fill_from(p),
                }
            }
        }
        snap
    }
}

/// Everything a proxy serves from, immutable once built.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    /// By `<namespace>/<name>`.
    pub services: BTreeMap<String, Arc<ServiceEntry>>,
    pub by_host: HashMap<String, Arc<ServiceEntry>>,
    pub by_ip: HashMap<IpAddr, Arc<ServiceEntry>>,
    /// Endpoint address → (its service's slot in `slots`, index in its endpoints): plain
    /// numbers in shards shared with the snapshot before, so the next snapshot copies only the
    /// shards its update touches. Look up with [`Snapshot::endpoint_by_addr`].
    by_endpoint: EndpointIndex,
    /// The services `by_endpoint` points at; a freed slot is `None` until reused (`free`).
    slots: Vec<Option<Arc<ServiceEntry>>>,
    free: Vec<u32>,
    pub gateways: BTreeMap<String, Arc<GatewayEntry>>,
    pub policy: Arc<PolicyEntry>,
    pub bundle: Option<TrustBundle>,
    /// The HTTPRoutes attached to each service (by `<namespace>/<name>`), ready to match.
    pub routes: HashMap<String, Arc<crate::routes::RouteTable>>,
    /// TrafficPolicies by the service (`<ns>/<name>`) or route rule (`<ns>/<name>#<rule>`)
    /// they target.
    pub traffic: HashMap<String, Arc<crate::traffic::CompiledPolicy>>,
    /// Every AuthorizationPolicy; each sidecar evaluates those that apply to its workload.
    pub authz: Vec<Arc<crate::authz::CompiledAuthz>>,
    /// By service (`<ns>/<name>`): each endpoint's (`<cluster>/<workload>`) share of a
    /// destination-total rate limit, as the controller divides it by demand.
    pub rate_shares: HashMap<String, Arc<HashMap<String, f64>>>,
    /// Whether two services share an endpoint address, host or IP (the later by name wins
    /// the lookup). Such a snapshot is always built anew, never updated in place.
    pub shadowed: bool,
}

/// How many shards [`EndpointIndex`] splits addresses into (a power of two): an update copies
/// only the shards holding addresses it changes, each about 1/64 of the index.
const ENDPOINT_SHARDS: usize = 64;
const _: () = assert!(ENDPOINT_SHARDS.is_power_of_two());

/// A map from endpoint address to (slot, index), split by a hash of the address into shards
/// that snapshots share until one changes (copy on write, one shard at a time). Each shard is
/// two sorted lists found by binary search, IPv4 addresses (16 bytes an entry) and IPv6 (28),
/// rather than a hash table (40-byte buckets, a fifth to a half of them empty, rounded up to
/// the allocator's size class): 40,000 IPv4 endpoints take 0.6 MiB instead of 3, and a copied
/// shard is that much less to copy.
#[derive(Clone, Debug, Default)]
struct EndpointIndex {
    /// Empty until the first insert, then `ENDPOINT_SHARDS` long.
    shards: Vec<Arc<Shard>>,
}

#[derive(Clone, Debug, Default)]
struct Shard {
    v4: Vec<Indexed<u64>>,
    v6: Vec<Indexed<EndpointAddr>>,
}

/// An address's (slot, index) under a key that sorts as the address does: for IPv4 the
/// address and port in one number, `ip << 16 | port`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Indexed<K> {
    key: K,
    slot: u32,
    index: u32,
}

enum Key {
    V4(u64),
    V6(EndpointAddr),
}

impl Key {
    fn of(addr: &EndpointAddr) -> Key {
        match addr.ip {
            IpAddr::V4(v4) => Key::V4(u64::from(u32::from(v4)) << 16 | u64::from(addr.port)),
            IpAddr::V6(_) => Key::V6(*addr),
        }
    }

    fn v4_addr(key: u64) -> EndpointAddr {
        EndpointAddr {
            ip: IpAddr::V4(std::net::Ipv4Addr::from((key >> 16) as u32)),
            port: key as u16,
        }
    }
}

/// One of a shard's sorted lists.
trait SortedList<K> {
    fn find(&self, key: &K) -> Option<(u32, u32)>;
    fn put(&mut self, key: K, at: (u32, u32)) -> Option<(u32, u32)>;
    fn take(&mut self, key: &K) -> Option<(u32, u32)>;
    /// Sorts what was pushed unsorted, the last entry for a key winning; returns whether any
    /// key had several.
    fn finish(&mut self) -> bool;
}

impl<K: Ord + Copy> SortedList<K> for Vec<Indexed<K>> {
    fn find(&self, key: &K) -> Option<(u32, u32)> {
        let at = self.binary_search_by_key(key, |e| e.key).ok()?;
        Some((self[at].slot, self[at].index))
    }

    fn put(&mut self, key: K, (slot, index): (u32, u32)) -> Option<(u32, u32)> {
        let new = Indexed { key, slot, index };
        match self.binary_search_by_key(&key, |e| e.key) {
            Ok(at) => {
                let old = std::mem::replace(&mut self[at], new);
                Some((old.slot, old.index))
            }
            Err(at) => {
                // A copied shard is exactly full: grow it by an eighth, not double it, so the
                // shards an update touches do not each hold twice what they need.
                if self.len() == self.capacity() {
                    self.reserve_exact(self.len() / 8 + 1);
                }
                self.insert(at, new);
                None
            }
        }
    }

    fn take(&mut self, key: &K) -> Option<(u32, u32)> {
        let at = self.binary_search_by_key(key, |e| e.key).ok()?;
        let old = self.remove(at);
        Some((old.slot, old.index))
    }

    fn finish(&mut self) -> bool {
        // Stable: the entries for one key stay in the order given, and the last is kept.
        self.sort_by_key(|e| e.key);
        let len = self.len();
        self.reverse();
        self.dedup_by_key(|e| e.key);
        self.reverse();
        self.shrink_to_fit();
        self.len() != len
    }
}

impl Shard {
    fn get(&self, key: &Key) -> Option<(u32, u32)> {
        match key {
            Key::V4(k) => self.v4.find(k),
            Key::V6(k) => self.v6.find(k),
        }
    }

    fn has(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    fn insert(&mut self, key: Key, at: (u32, u32)) -> Option<(u32, u32)> {
        match key {
            Key::V4(k) => self.v4.put(k, at),
            Key::V6(k) => self.v6.put(k, at),
        }
    }

    fn remove(&mut self, key: &Key) -> Option<(u32, u32)> {
        match key {
            Key::V4(k) => self.v4.take(k),
            Key::V6(k) => self.v6.take(k),
        }
    }
}

impl EndpointIndex {
    fn shard(addr: &EndpointAddr) -> usize {
        let ip = match addr.ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        };
        // Fibonacci hashing: the top bits of a multiply spread neighbouring addresses.
        let h = (ip ^ (u64::from(addr.port) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (u64::BITS - ENDPOINT_SHARDS.trailing_zeros())) as usize
    }

    /// Every (address, (slot, index)) at once, a later entry for an address replacing an
    /// earlier one; also whether any did.
    fn build(entries: impl Iterator<Item = (EndpointAddr, (u32, u32))>) -> (Self, bool) {
        let mut shards: Vec<Shard> = vec![Shard::default(); ENDPOINT_SHARDS];
        for (addr, (slot, index)) in entries {
            let shard = &mut shards[Self::shard(&addr)];
            match Key::of(&addr) {
                Key::V4(key) => shard.v4.push(Indexed { key, slot, index }),
                Key::V6(key) => shard.v6.push(Indexed { key, slot, index }),
            }
        }
        let mut replaced = false;
        let shards = shards
            .into_iter()
            .map(|mut shard| {
                replaced |= shard.v4.finish();
                replaced |= shard.v6.finish();
                Arc::new(shard)
            })
            .collect();
        (EndpointIndex { shards }, replaced)
    }

    fn get(&self, addr: &EndpointAddr) -> Option<(u32, u32)> {
        self.shards.get(Self::shard(addr))?.get(&Key::of(addr))
    }

    fn insert(&mut self, addr: EndpointAddr, at: (u32, u32)) -> Option<(u32, u32)> {
        if self.shards.is_empty() {
            self.shards = (0..ENDPOINT_SHARDS).map(|_| Arc::default()).collect();
        }
        Arc::make_mut(&mut self.shards[Self::shard(&addr)]).insert(Key::of(&addr), at)
    }

    fn remove(&mut self, addr: &EndpointAddr) -> Option<(u32, u32)> {
        let shard = self.shards.get_mut(Self::shard(addr))?;
        let key = Key::of(addr);
        // Looked up first, so an absent address copies nothing.
        if !shard.has(&key) {
            return None;
        }
        Arc::make_mut(shard).remove(&key)
    }

    /// Every (address, slot, index), in no order.
    fn iter(&self) -> impl Iterator<Item = (EndpointAddr, u32, u32)> + '_ {
        self.shards.iter().flat_map(|shard| {
            let v4 = shard.v4.iter().map(|e| (Key::v4_addr(e.key), e.slot, e.index));
            let v6 = shard.v6.iter().map(|e| (e.key, e.slot, e.index));
            v4.chain(v6)
        })
    }
}

/// Compiles each route against the snapshot's services (a backend that is not there fails
/// only its share) and groups them by the service they attach to, oldest route first.
fn route_tables(snap: &Snapshot, routes: &[&Arc<RouteEntry>]) -> HashMap<String, Arc<crate::routes::RouteTable>> {
    use crate::routes::compile::{BackendLookup, Target};
    let lookup = |t: &Target| match snap.services.get(&format!("{}/{}", t.namespace, t.name)) {
        None => BackendLookup::NoSuchService,
        Some(svc) => match t.port.map(|p| svc.port(p)) {
            Some(None) => BackendLookup::NoSuchPort,
            Some(Some(p)) if p.protocol == Protocol::Tcp => BackendLookup::NotHttp,
            _ => BackendLookup::Found,
        },
    };
    let mut by_parent: BTreeMap<String, Vec<Arc<crate::routes::CompiledRoute>>> = BTreeMap::new();
    for r in routes {
        let (compiled, errors) = crate::routes::compile_route(&r.namespace, &r.name, &r.spec, &lookup);
        for e in &errors {
            tracing::warn!(route = %format!("{}/{}", r.namespace, r.name), error = %e, "HTTPRoute problem");
        }
        let Some(compiled) = compiled else { continue };
        let compiled = Arc::new(compiled);
        for p in &compiled.parents {
            by_parent
                .entry(format!("{}/{}", p.namespace, p.name))
                .or_default()
                .push(compiled.clone());
        }
    }
    by_parent
        .into_iter()
        .map(|(k, list)| (k, Arc::new(crate::routes::RouteTable::new(&list))))
        .collect()
}

impl Snapshot {
    /// Finds a service by host name (`<svc>.<ns>.svc.clusterset.local`, with or without a
    /// trailing dot) or ClusterSet IP.
    /// The TrafficPolicy for requests to `svc` (routed by `rule`, if a named rule routed them).
    pub fn traffic_policy(
        &self,
        svc: &ServiceEntry,
        rule: Option<&str>,
    ) -> Option<&Arc<crate::traffic::CompiledPolicy>> {
        if self.traffic.is_empty() {
            return None;
        }
        if let Some(rule) = rule {
            if let Some(p) = self.traffic.get(&rule_key(&svc.namespace, &svc.name, rule)) {
                return Some(p);
            }
        }
        self.traffic.get(&format!("{}/{}", svc.namespace, svc.name))
    }

    pub fn service_by_host(&self, host: &str) -> Option<&Arc<ServiceEntry>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.parse::<IpAddr>() {
            Ok(ip) => self.by_ip.get(&ip),
            Err(_) => self.by_host.get(&host),
        }
    }

    /// Finds the service and endpoint index a workload address belongs to.
    pub fn endpoint_by_addr(&self, addr: SocketAddr) -> Option<(&Arc<ServiceEntry>, usize)> {
        let (k, i) = self.by_endpoint.get(&addr.into())?;
        Some((self.slot(k)?, i as usize))
    }

    /// Every endpoint address with its service and index, in no order.
    pub fn endpoints(&self) -> impl Iterator<Item = (EndpointAddr, &Arc<ServiceEntry>, usize)> {
        self.by_endpoint
            .iter()
            .filter_map(|(addr, slot, index)| Some((addr, self.slot(slot)?, index as usize)))
    }

    fn slot(&self, k: u32) -> Option<&Arc<ServiceEntry>> {
        self.slots.get(k as usize)?.as_ref()
    }

    /// A slot for `svc`: a freed one, else a new one. A service without endpoints has nothing
    /// in the index to point at its slot and takes none (0, never looked up).
    fn take_slot(&mut self, svc: &Arc<ServiceEntry>) -> u32 {
        if svc.endpoints.is_empty() {
            return 0;
        }
        match self.free.pop() {
            Some(k) => {
                self.slots[k as usize] = Some(svc.clone());
                k
            }
            None => {
                self.slots.push(Some(svc.clone()));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Finds a service by its ClusterSet IP.
    pub fn service_by_ip(&self, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_ip.get(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_resource(name: &str, address: &str) -> pb::Resource {
        let east = pb::Locality {
            cluster: "east".into(),
            ..Default::default()
        };
        crate::testing::http_service("demo", name, "1", vec![crate::testing::endpoint(address, "w", east)])
    }

    #[test]
    fn bad_resource_is_rejected_and_last_good_kept() {
        let good = pb::ConfigUpdate {
            version: 1,
            full: true,
            resources: vec![service_resource("echo", "127.0.0.1:15006")],
            removed: vec![],
            more: false,
            ..Default::default()
        };
        let mut r = Resources::default();
        let rej = r.apply(good);
        assert!(rej.is_empty());
        let bad = pb::ConfigUpdate {
            version: 2,
            full: false,
            resources: vec![service_resource("echo", "not-an-address")],
            removed: vec![],
            more: false,
            ..Default::default()
        };
        let rej = r.apply(bad);
        assert_eq!(rej.len(), 1);
        assert!(rej[0].error.contains("endpoints[0].address"), "{}", rej[0].error);
        let snap = r.snapshot(2);
        let svc = snap.service_by_host("echo.demo.svc.clusterset.local.").unwrap();
        assert_eq!(svc.endpoints[0].address.to_string(), "127.0.0.1:15006");
        assert!(snap.service_by_host("240.0.0.10").is_some());
    }

    #[test]
    fn an_ipv6_endpoint_is_held_and_one_with_a_scope_is_refused_by_field() {
        let mut r = Resources::default();
        let update = |version, res| pb::ConfigUpdate {
            version,
            full: false,
            resources: vec![res],
            removed: vec![],
            more: false,
            ..Default::default()
        };
        assert!(r.apply(update(1, service_resource("v6", "[fd00::1]:8080"))).is_empty());
        let snap = r.snapshot(1);
        let (svc, i) = snap.endpoint_by_addr("[fd00::1]:8080".parse().unwrap()).unwrap();
        assert_eq!(svc.endpoints[i].address.to_string(), "[fd00::1]:8080");
        let rej = r.apply(update(2, service_resource("v6", "[fe80::1%2]:8080")));
        assert_eq!(rej.len(), 1);
        assert!(
            rej[0].error.contains("endpoints[0].address") && rej[0].error.contains("scope"),
            "{}",
            rej[0].error
        );
        // The last good version stays.
        assert!(r
            .snapshot(2)
            .endpoint_by_addr("[fd00::1]:8080".parse().unwrap())
            .is_some());
    }

    #[test]
    fn the_endpoint_index_finds_ipv4_and_ipv6_addresses_and_the_last_entry_wins() {
        let addrs: Vec<EndpointAddr> = [
            "10.0.0.1:80",
            "10.0.0.1:81",
            "[fd00::1]:80",
            "255.255.255.255:65535",
            "0.0.0.0:1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let entries = addrs.iter().enumerate().map(|(i, a)| (*a, (0, i as u32)));
        let (mut index, replaced) = EndpointIndex::build(entries.chain([(addrs[0], (1, 9))]));
        assert!(replaced);
        assert_eq!(index.get(&addrs[0]), Some((1, 9)));
        for (i, a) in addrs.iter().enumerate().skip(1) {
            assert_eq!(index.get(a), Some((0, i as u32)), "{a}");
        }
        let mut all: Vec<String> = index.iter().map(|(a, _, _)| a.to_string()).collect();
        let mut want: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        all.sort();
        want.sort();
        assert_eq!(all, want);
        assert_eq!(index.remove(&addrs[2]), Some((0, 2)));
        assert_eq!(index.get(&addrs[2]), None);
        assert_eq!(index.insert(addrs[2], (3, 3)), None);
        assert_eq!(index.insert(addrs[2], (4, 4)), Some((3, 3)));
        assert_eq!(index.remove(&"10.0.0.2:80".parse().unwrap()), None);
    }

    #[test]
    fn workload_names_are_read_back_by_endpoint_index() {
        let w = Workloads::new(["web-7d4f-x2x", "", "api-0"]);
        assert_eq!(
            (w.get(0), w.get(1), w.get(2), w.get(3)),
            ("web-7d4f-x2x", "", "api-0", "")
        );
        assert_eq!(Workloads::new([]).get(0), "");
        let mut r = Resources::default();
        r.apply(pb::ConfigUpdate {
            version: 1,
            full: true,
            resources: vec![service_resource("a", "127.0.0.1:1")],
            removed: vec![],
            more: false,
            ..Default::default()
        });
        let snap = r.snapshot(1);
        let (svc, i) = snap.endpoint_by_addr("127.0.0.1:1".parse().unwrap()).unwrap();
        assert_eq!(svc.workload(i), "w");
    }

    #[test]
    fn localities_and_identities_are_held_once_across_services_and_updates() {
        let mut r = Resources::default();
        let full = |version, resources| pb::ConfigUpdate {
            version,
            full: true,
            resources,
            removed: vec![],
            more: false,
            ..Default::default()
        };
        let first = |snap: &Snapshot, name: &str| snap.services[&format!("demo/{name}")].endpoints[0].clone();
        // Service b has two endpoints alike but for their address.
        let mut b = service_resource("b", "127.0.0.1:2");
        if let Some(pb::resource::Kind::Service(s)) = &mut b.kind {
            let other = pb::Endpoint {
                address: "127.0.0.1:5".into(),
                ..s.endpoints[0].clone()
            };
            s.endpoints.push(other);
        }
        r.apply(full(1, vec![service_resource("a", "127.0.0.1:1"), b]));
        let snap = r.snapshot(1);
        let both = &snap.services["demo/b"].endpoints;
        assert!(Arc::ptr_eq(&both[0].profile, &both[1].profile));
        let (a, b) = (first(&snap, "a"), first(&snap, "b"));
        drop(snap);
        assert!(Arc::ptr_eq(a.locality(), b.locality()));
        assert!(Arc::ptr_eq(a.identity(), b.identity()));
        drop(a);
        // A later version of one service shares them with the other's.
        r.apply(pb::ConfigUpdate {
            full: false,
            ..full(2, vec![service_resource("a", "127.0.0.1:3")])
        });
        let a = first(&r.snapshot(2), "a");
        assert_eq!(a.address.to_string(), "127.0.0.1:3");
        assert!(Arc::ptr_eq(a.locality(), b.locality()));
        drop((a, b));
        // What no resource holds any more is let go.
        let mut west = service_resource("c", "127.0.0.1:4");
        if let Some(pb::resource::Kind::Service(s)) = &mut west.kind {
            s.endpoints[0].locality = Some(pb::Locality {
                cluster: "west".into(),
                ..Default::default()
            });
        }
        r.apply(full(3, vec![west]));
        let held: Vec<&str> = r.interned.localities.iter().map(|l| l.cluster.as_str()).collect();
        assert_eq!(held, ["west"]);
        assert_eq!(r.interned.identities.len(), 1);
    }

    #[test]
    fn full_update_removes_what_it_does_not_name() {
        let mut r = Resources::default();
        r.apply(pb::ConfigUpdate {
            version: 1,
            full: true,
            resources: vec![
                service_resource("a", "127.0.0.1:1"),
                service_resource("b", "127.0.0.1:2"),
            ],
            removed: vec![],
            more: false,
            ..Default::default()
        });
        r.apply(pb::ConfigUpdate {
            version: 2,
            full: true,
            resources: vec![service_resource("b", "127.0.0.1:2")],
            removed: vec![],
            more: false,
            ..Default::default()
        });
        assert_eq!(r.snapshot(2).services.len(), 1);
        r.apply(pb::ConfigUpdate {
            version: 3,
            full: false,
            resources: vec![],
            removed: vec!["service/demo/b".into()],
            more: false,
            ..Default::default()
        });
        assert!(r.snapshot(3).services.is_empty());
    }

    #[test]
    fn an_update_in_parts_applies_as_one_update_after_its_last_part() {
        let whole = |version, resources: Vec<pb::Resource>, removed: Vec<String>| pb::ConfigUpdate {
            version,
            full: version == 1,
            resources,
            removed,
            more: false,
            ..Default::default()
        };
        let mut one = Resources::default();
        one.apply(whole(1, vec![service_resource("old", "127.0.0.1:9")], vec![]));
        let mut parted = one.clone();
        let mut snap = parted.snapshot(1);
        // A full update of three services (one of them bad) and a removal, sent whole ...
        let resources = vec![
            service_resource("a", "127.0.0.1:1"),
            service_resource("b", "not-an-address"),
            service_resource("c", "127.0.0.1:3"),
        ];
        let mut full = whole(2, resources.clone(), vec!["service/demo/gone".into()]);
        full.full = true;
        let rejected = one.apply(full);
        // ... and in parts: `full` on the first, `removed` on the last, `more` on all but it.
        let mut pending = Pending::default();
        let parts = [
            (true, vec![resources[0].clone()], vec![], true),
            (false, vec![resources[1].clone()], vec![], true),
            (
                false,
                vec![resources[2].clone()],
                vec!["service/demo/gone".to_string()],
                false,
            ),
        ];
        for (i, (full, resources, removed, more)) in parts.into_iter().enumerate() {
            let part = pb::ConfigUpdate {
                version: 2,
                full,
                resources,
                removed,
                more,
                ..Default::default()
            };
            assert_eq!(pending.add(part, &parted), !more, "part {i}");
            if more {
                // Nothing is applied before the last part: the proxy serves the old config.
                assert!(snap.services.contains_key("demo/old"));
            }
        }
        assert_eq!((pending.version(), pending.received(), pending.parts()), (2, 3, 3));
        let (next, parted_rejected) = parted.update_with(&snap, pending);
        snap = next;
        assert_eq!(parted_rejected, rejected);
        assert_eq!(shape(&snap), shape(&one.snapshot(2)));
        // The full update (all its parts) removed what none of them named.
        assert!(!snap.services.contains_key("demo/old"));
        assert!(snap.services.contains_key("demo/a") && snap.services.contains_key("demo/c"));
        assert_eq!(snap.version, 2);
    }

    /// What a snapshot maps, by service key, for comparing two built differently.
    fn shape(s: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = s.services.iter().map(|(k, v)| format!("svc {k} {v:?}")).collect();
        out.extend(s.by_host.iter().map(|(h, v)| format!("host {h} {}", v.key())));
        out.extend(s.by_ip.iter().map(|(ip, v)| format!("ip {ip} {}", v.key())));
        out.extend(s.endpoints().map(|(a, v, i)| format!("ep {a} {} {i}", v.key())));
        out.extend(s.routes.keys().map(|k| format!("route {k}")));
        out.sort();
        out
    }

    #[test]
    fn one_endpoints_churn_copies_only_its_own_index_shards() {
        let big = |moved: u16| {
            let mut r = service_resource("big", "127.0.0.1:1");
            let Some(pb::resource::Kind::Service(s)) = &mut r.kind else {
                unreachable!()
            };
            let ep = s.endpoints[0].clone();
            s.endpoints = (1..=300u16)
                .map(|p| pb::Endpoint {
                    address: format!("127.0.0.1:{}", if p == 150 { moved } else { p }),
                    ..ep.clone()
                })
                .collect();
            r
        };
        let update = |version, r| pb::ConfigUpdate {
            version,
            full: version == 1,
            resources: vec![r],
            removed: vec![],
            more: false,
            ..Default::default()
        };
        let mut r = Resources::default();
        let (first, _) = r.update(&Snapshot::default(), update(1, big(150)));
        let (next, _) = r.update(&first, update(2, big(5000)));
        assert_eq!(shape(&next), shape(&r.snapshot(2)));
        let copied = next
            .by_endpoint
            .shards
            .iter()
            .zip(&first.by_endpoint.shards)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count();
        assert!(
            copied <= 2,
            "{copied} of {ENDPOINT_SHARDS} shards copied for one endpoint"
        );
        assert_eq!(next.endpoint_by_addr("127.0.0.1:5000".parse().unwrap()).unwrap().1, 149);
        assert!(next.endpoint_by_addr("127.0.0.1:150".parse().unwrap()).is_none());
    }

    #[test]
    fn an_update_of_services_gives_the_snapshot_a_full_build_gives() {
        let svc = |name: &str, ip: u8, addrs: &[u16]| {
            let mut r = service_resource(name, "127.0.0.1:1");
            let Some(pb::resource::Kind::Service(s)) = &mut r.kind else {
                unreachable!()
            };
            s.clusterset_ip = format!("240.0.0.{ip}");
            let ep = s.endpoints[0].clone();
            s.endpoints = addrs
                .iter()
                .map(|p| pb::Endpoint {
                    address: format!("127.0.0.1:{p}"),
                    ..ep.clone()
                })
                .collect();
            r
        };
        let update = |version: u64, resources: Vec<pb::Resource>, removed: &[&str]| pb::ConfigUpdate {
            more: false,
            version,
            full: version == 1,
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let steps = [
            update(1, vec![svc("a", 1, &[1, 2]), svc("b", 2, &[3]), svc("c", 3, &[4])], &[]),
            // Endpoint churn: swapped in place.
            update(2, vec![svc("a", 1, &[1, 5])], &[]),
            // A service gone, one new, one taking over the other's address in the same update.
            update(3, vec![svc("d", 4, &[3]), svc("a", 1, &[1])], &["service/demo/b"]),
            // Two services claiming one address: built anew (the later name wins), and
            // again when one of them lets go of it (the other's entry comes back).
            update(4, vec![svc("e", 5, &[1])], &[]),
            update(5, vec![svc("e", 5, &[7])], &[]),
            update(6, vec![svc("e", 5, &[9])], &[]),
            // Unchanged resent; a rejected one keeps its last good version.
            update(7, vec![svc("c", 3, &[4]), service_resource("d", "not-an-address")], &[]),
            // Something other than a service: built anew.
            update(8, vec![svc("c", 3, &[8])], &["bundle/none"]),
        ];
        let mut r = Resources::default();
        let mut snap = Snapshot::default();
        for (i, u) in steps.iter().enumerate() {
            let (next, _) = r.update(&snap, u.clone());
            assert_eq!(next.version, u.version);
            assert_eq!(shape(&next), shape(&r.snapshot(u.version)), "after step {i}");
            // Slots are reused: one per service with endpoints, none left behind.
            let with_endpoints = next.services.values().filter(|s| !s.endpoints.is_empty()).count();
            assert_eq!(next.slots.iter().flatten().count(), with_endpoints, "after step {i}");
            assert!(
                next.slots.len() <= with_endpoints + 1,
                "after step {i}: {} slots",
                next.slots.len()
            );
            if i == 1 {
                // Swapped in place: only the shards holding the three addresses it moved
                // (1, 2 out; 1, 5 in) are copies; the rest are the previous snapshot's.
                let shared = next
                    .by_endpoint
                    .shards
                    .iter()
                    .zip(&snap.by_endpoint.shards)
                    .filter(|(a, b)| Arc::ptr_eq(a, b))
                    .count();
                assert!(shared >= ENDPOINT_SHARDS - 3, "only {shared} shards shared");
            }
            snap = next;
        }
        assert_eq!(
            snap.endpoint_by_addr("127.0.0.1:1".parse().unwrap()).unwrap().0.name,
            "a"
        );
        assert!(!snap.shadowed);
        assert_eq!(snap.service_by_ip("240.0.0.4".parse().unwrap()).unwrap().name, "d");
    }

    /// `endpoints/demo/echo/<cluster>` with an endpoint at each address.
    fn part_resource(cluster: &str, addresses: &[&str]) -> pb::Resource {
        pb::Resource {
            name: format!("endpoints/demo/echo/{cluster}"),
            version: addresses.join(","),
            kind: Some(pb::resource::Kind::ServiceEndpoints(pb::ServiceEndpoints {
                namespace: "demo".into(),
                name: "echo".into(),
                cluster: cluster.into(),
                endpoints: addresses
                    .iter()
                    .map(|a| pb::Endpoint {
                        address: a.to_string(),
                        workload: format!("w-{a}"),
                        locality: Some(pb::Locality {
                            cluster: cluster.into(),
                            ..Default::default()
                        }),
                        identity: format!("spiffe://mesh.local/ns/demo/sa/{cluster}"),
                        ready: true,
                        labels: Default::default(),
                    })
                    .collect(),
            })),
        }
    }

    /// `service/demo/echo`'s fields alone, as a proxy that takes parts gets them.
    fn head_resource(port: u32) -> pb::Resource {
        let mut r = service_resource("echo", "127.0.0.1:1");
        if let Some(pb::resource::Kind::Service(s)) = &mut r.kind {
            s.endpoints.clear();
            s.ports[0].port = port;
            s.identities = vec!["spiffe://mesh.local/ns/demo/sa/echo".into()];
        }
        r
    }

    fn update(version: u64, full: bool, resources: Vec<pb::Resource>, removed: &[&str]) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version,
            full,
            resources,
            removed: removed.iter().map(|r| r.to_string()).collect(),
            more: false,
            ..Default::default()
        }
    }

    /// The echo service's endpoints (address, workload) and identities.
    fn echo(snap: &Snapshot) -> (Vec<(String, String)>, Vec<String>) {
        let s = &snap.services["demo/echo"];
        (
            s.endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (e.address.to_string(), s.workload(i).to_string()))
                .collect(),
            s.identities.iter().map(|i| i.to_string()).collect(),
        )
    }

    /// [`Resources::update`], checking that the snapshot it makes from the last one is the
    /// one made anew.
    fn checked(r: &mut Resources, prev: &Snapshot, u: pb::ConfigUpdate) -> (Snapshot, Vec<pb::Rejection>) {
        let (snap, rejected) = r.update(prev, u);
        let fresh = r.snapshot(snap.version);
        assert_eq!(snap.services, fresh.services);
        assert_eq!(snap.endpoints().count(), fresh.endpoints().count());
        for (addr, svc, i) in fresh.endpoints() {
            let (s, j) = snap.endpoint_by_addr(addr.socket()).expect("indexed");
            assert!(Arc::ptr_eq(s, svc) && i == j, "{addr}");
        }
        (snap, rejected)
    }

    #[test]
    fn a_full_update_again_leaves_what_the_proxy_holds_as_it_is() {
        let versioned = |mut r: pb::Resource, version: &str| {
            r.version = version.into();
            r
        };
        let other = versioned(service_resource("other", "127.0.0.1:9"), "o1");
        let held = vec![
            versioned(head_resource(80), "h80"),
            part_resource("east", &["127.0.0.1:80", "127.0.0.2:80"]),
            part_resource("west", &["127.0.0.3:80"]),
            other.clone(),
        ];
        // What a proxy that held nothing makes of a full update: the old way, everything anew.
        let anew = |version, resources: &[pb::Resource]| {
            let mut fresh = Resources::default();
            let (snap, rejected) = fresh.update(&Snapshot::default(), update(version, true, resources.to_vec(), &[]));
            assert!(rejected.is_empty(), "{rejected:?}");
            shape(&snap)
        };
        let mut r = Resources::default();
        let (snap, _) = checked(&mut r, &Snapshot::default(), update(1, true, held.clone(), &[]));
        // The controller restarted: the same resources, the same versions. Nothing is converted
        // again, and the proxy keeps the very entries it held.
        let mut pending = r.pending();
        assert!(pending.add(update(1, true, held.clone(), &[]), &r));
        assert_eq!((pending.received(), pending.unchanged()), (4, 4));
        let (again, rejected) = r.update_with(&snap, pending);
        assert!(rejected.is_empty());
        for key in ["demo/echo", "demo/other"] {
            assert!(Arc::ptr_eq(&again.services[key], &snap.services[key]), "{key}");
        }
        assert_eq!(shape(&again), anew(1, &held));
        // East's endpoints changed, west and `other` are gone, `new` came: removed what it does
        // not name, as a full update always did, and east joined to the service it held.
        let changed = vec![
            versioned(head_resource(80), "h80"),
            part_resource("east", &["127.0.0.4:80"]),
            versioned(service_resource("new", "127.0.0.1:7"), "n1"),
        ];
        let (snap, rejected) = checked(&mut r, &again, update(2, true, changed.clone(), &[]));
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(shape(&snap), anew(2, &changed));
        assert_eq!(
            echo(&snap).0,
            [("127.0.0.4:80".to_string(), "w-127.0.0.4:80".to_string())]
        );
        assert!(!snap.services.contains_key("demo/other") && snap.services.contains_key("demo/new"));
        // The service's own fields changed, its parts not: the new fields with the endpoints held.
        let fields = vec![
            versioned(head_resource(81), "h81"),
            part_resource("east", &["127.0.0.4:80"]),
            versioned(service_resource("new", "127.0.0.1:7"), "n1"),
        ];
        let (snap, _) = checked(&mut r, &snap, update(3, true, fields.clone(), &[]));
        assert_eq!(shape(&snap), anew(3, &fields));
        assert_eq!(snap.services["demo/echo"].ports[0].port, 81);
        assert_eq!(echo(&snap).0.len(), 1);
        // A bad resource in a full update keeps its last good version, as before.
        let bad = vec![
            versioned(head_resource(81), "h81"),
            part_resource("east", &["not-an-address"]),
            versioned(service_resource("new", "127.0.0.1:7"), "n1"),
        ];
        let (snap, rejected) = checked(&mut r, &snap, update(4, true, bad, &[]));
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(echo(&snap).0[0].0, "127.0.0.4:80");
    }

    /// What a proxy says it holds: each resource at its version and each cluster's endpoints
    /// of a service held in parts at the version of the part they came in, in name order; as
    /// much as fits, or nothing.
    #[test]
    fn a_proxy_lists_what_it_holds_with_each_part() {
        let mut head = head_resource(80);
        head.version = "00000000000000a1".into();
        let mut other = service_resource("other", "127.0.0.1:9");
        other.version = "o1".into();
        let mut r = Resources::default();
        r.apply(update(
            1,
            true,
            vec![
                head,
                part_resource("east", &["127.0.0.1:80"]),
                part_resource("west", &["127.0.0.3:80"]),
                other,
            ],
            &[],
        ));
        let (list, bytes) = r.held(usize::MAX);
        let held: Vec<(String, u64)> = list.into_iter().map(|h| (h.name, h.version)).collect();
        assert_eq!(
            held,
            [
                ("service/demo/echo".to_string(), 0xa1),
                ("endpoints/demo/echo/east".to_string(), fingerprint("127.0.0.1:80")),
                ("endpoints/demo/echo/west".to_string(), fingerprint("127.0.0.3:80")),
                ("service/demo/other".to_string(), fingerprint("o1")),
            ]
        );
        // Each entry is its name and 13 bytes: 4 names of 17, 24, 24 and 18 bytes.
        let hello = pb::Hello {
            held: r.held(usize::MAX).0,
            ..Default::default()
        };
        assert_eq!(prost::Message::encoded_len(&hello), 83 + 4 * 13);
        assert_eq!(bytes, 83 + 4 * 13, "what the list takes in the Hello");
        assert_eq!(r.held(83 + 4 * 13).0.len(), 4);
        assert_eq!(r.held(83 + 4 * 13 - 1), (vec![], 0), "more than fits: nothing");
    }

    #[test]
    fn a_service_in_parts_is_joined_in_cluster_order_and_patched_one_cluster_at_a_time() {
        let mut r = Resources::default();
        // Parts before the service, as a name-ordered update may carry them.
        let (snap, rejected) = checked(
            &mut r,
            &Snapshot::default(),
            update(
                1,
                true,
                vec![
                    part_resource("west", &["127.0.0.3:80"]),
                    part_resource("east", &["127.0.0.1:80", "127.0.0.2:80"]),
                    head_resource(80),
                ],
                &[],
            ),
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let addrs = |s: &Snapshot| echo(s).0.into_iter().map(|(a, _)| a).collect::<Vec<_>>();
        assert_eq!(addrs(&snap), ["127.0.0.1:80", "127.0.0.2:80", "127.0.0.3:80"]);
        assert_eq!(echo(&snap).0[2].1, "w-127.0.0.3:80");
        assert_eq!(
            echo(&snap).1,
            [
                "spiffe://mesh.local/ns/demo/sa/east",
                "spiffe://mesh.local/ns/demo/sa/echo",
                "spiffe://mesh.local/ns/demo/sa/west"
            ]
        );
        assert_eq!(snap.endpoint_by_addr("127.0.0.3:80".parse().unwrap()).unwrap().1, 2);
        // East changes: west's endpoints are kept as they were.
        let (snap, rejected) = checked(
            &mut r,
            &snap,
            update(2, false, vec![part_resource("east", &["127.0.0.4:80"])], &[]),
        );
        assert!(rejected.is_empty());
        assert_eq!(addrs(&snap), ["127.0.0.4:80", "127.0.0.3:80"]);
        assert!(snap.endpoint_by_addr("127.0.0.1:80".parse().unwrap()).is_none());
        assert_eq!(snap.endpoint_by_addr("127.0.0.3:80".parse().unwrap()).unwrap().1, 1);
        // The service's fields change alone: its endpoints stay.
        let (snap, _) = checked(&mut r, &snap, update(3, false, vec![head_resource(81)], &[]));
        assert_eq!(snap.services["demo/echo"].ports[0].port, 81);
        assert_eq!(addrs(&snap), ["127.0.0.4:80", "127.0.0.3:80"]);
        // A bad part is rejected by field; that cluster keeps its last good endpoints.
        let (snap, rejected) = checked(
            &mut r,
            &snap,
            update(4, false, vec![part_resource("west", &["not-an-address"])], &[]),
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].name, "endpoints/demo/echo/west");
        assert!(
            rejected[0].error.contains("endpoints[0].address"),
            "{}",
            rejected[0].error
        );
        assert_eq!(addrs(&snap), ["127.0.0.4:80", "127.0.0.3:80"]);
        // West stops exporting: its endpoints and its identity go.
        let (snap, _) = checked(&mut r, &snap, update(5, false, vec![], &["endpoints/demo/echo/west"]));
        assert_eq!(addrs(&snap), ["127.0.0.4:80"]);
        assert!(!echo(&snap).1.iter().any(|i| i.ends_with("/west")));
        // A full update that no longer names a part drops its endpoints too.
        let (snap, _) = checked(
            &mut r,
            &snap,
            update(
                6,
                true,
                vec![head_resource(81), part_resource("west", &["127.0.0.5:80"])],
                &[],
            ),
        );
        assert_eq!(addrs(&snap), ["127.0.0.5:80"]);
        // The service removed with its parts: nothing of it is left.
        let (snap, _) = checked(
            &mut r,
            &snap,
            update(7, false, vec![], &["service/demo/echo", "endpoints/demo/echo/west"]),
        );
        assert!(snap.services.is_empty() && snap.endpoints().next().is_none());
        assert!(r.entries.is_empty());
    }

    #[test]
    fn a_part_without_its_service_or_under_another_name_is_rejected_by_name() {
        let mut r = Resources::default();
        let rejected = r.apply(update(1, true, vec![part_resource("east", &["127.0.0.1:80"])], &[]));
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].name, "endpoints/demo/echo/east");
        assert!(
            rejected[0].error.contains("no service demo/echo"),
            "{}",
            rejected[0].error
        );
        assert!(r.entries.is_empty(), "a part with no service is not held");
        let mut renamed = part_resource("east", &["127.0.0.1:80"]);
        renamed.name = "endpoints/demo/other/east".into();
        let rejected = r.apply(update(2, false, vec![head_resource(80), renamed], &[]));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].error.starts_with("name:"), "{}", rejected[0].error);
        // Sent again with its service, it is taken.
        let rejected = r.apply(update(
            3,
            false,
            vec![head_resource(80), part_resource("east", &["127.0.0.1:80"])],
            &[],
        ));
        assert!(rejected.is_empty());
        assert_eq!(echo(&r.snapshot(3)).0.len(), 1);
    }

    /// Found by the fuzzer: a service sent under an `endpoints/…` name was held, but an update
    /// finds its changes by name, so applying it in place left the service out where a snapshot
    /// built anew had it. Any service under a name that is not its own is rejected by name.
    #[test]
    fn a_service_under_another_name_is_rejected_by_name_and_in_place_matches_anew() {
        for name in [
            "endpoints/mo/echo",
            "endpoints/service/demo/echo",
            "service/demo/other",
            "echo",
        ] {
            let mut r = Resources::default();
            let mut misnamed = head_resource(80);
            misnamed.name = name.into();
            let (snap, rejected) = r.update(&Snapshot::default(), update(1, false, vec![misnamed], &[]));
            assert_eq!(rejected.len(), 1, "{name}");
            assert_eq!(rejected[0].name, name);
            assert!(rejected[0].error.starts_with("name:"), "{}", rejected[0].error);
            assert!(rejected[0].error.contains("service/demo/echo"), "{}", rejected[0].error);
            assert!(snap.services.is_empty() && r.snapshot(1).services.is_empty(), "{name}");
        }
        // Its own name, and a gateway's view of it, are taken.
        for name in ["service/demo/echo", "local/service/demo/echo"] {
            let mut r = Resources::default();
            let mut named = head_resource(80);
            named.name = name.into();
            let (snap, rejected) = r.update(&Snapshot::default(), update(1, false, vec![named], &[]));
            assert!(rejected.is_empty(), "{name}: {rejected:?}");
            assert_eq!(snap.services.len(), 1, "{name}");
        }
    }
}
