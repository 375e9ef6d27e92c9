//! The controller side of the config stream: every connected proxy gets the full state (or,
//! when its Hello says what it holds, what differs from that), then only what changed, and its
//! ACKs and NACKs are recorded (and shown by `strait status`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use strait_api::pb;
use strait_api::pb::wire::config_service_server::ConfigService;
use strait_api::transport::PeerInfo;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::Key;
use crate::resources::{
    diff, gateway_only, in_parts, resume, resume_digests, sidecar_only, Built, ConfigState, Resources,
};

/// What the controller knows of one connected proxy.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub node: String,
    pub kind: String,
    pub identity: String,
    /// Its admin address, as it said.
    pub admin: String,
    /// What it is sent of the services: "" for every one, else its scope (namespaces, and
    /// "authorized" when scoped by authorization).
    pub scope: String,
    pub sent_version: u64,
    pub acked_version: u64,
    pub rejected: Vec<String>,
}

#[derive(Clone)]
pub struct XdsServer {
    state: watch::Receiver<Arc<ConfigState>>,
    proxies: Arc<Mutex<BTreeMap<String, ProxyStatus>>>,
    connected: IntGauge,
    acks: IntCounterVec,
    sent: SentMetrics,
}

/// What the controller sent proxies, by update: `full` (the whole state, on a proxy's first
/// connect), `resumed` (the first update to a proxy that said what it held: only what differs)
/// and `change`.
#[derive(Clone)]
struct SentMetrics {
    updates: IntCounterVec,
    bytes: IntCounterVec,
}

/// The kind of an update sent to a proxy or a peer (the `update` label of [`SentMetrics`] and of
/// the peering metrics).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Update {
    /// The whole state, on a proxy's or peer's first connect.
    Full,
    /// The first update to a receiver that said what it held: only what differs from it.
    Resumed,
    /// What changed since the update before.
    Change,
}

impl Update {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Update::Full => "full",
            Update::Resumed => "resumed",
            Update::Change => "change",
        }
    }
}

impl SentMetrics {
    fn new(registry: &Registry) -> Self {
        let updates = IntCounterVec::new(
            Opts::new(
                "strait_config_sent_updates_total",
                "Config updates sent to proxies, by update (full, resumed or change)",
            ),
            &["update"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "strait_config_sent_bytes_total",
                "Encoded bytes of the config updates sent to proxies, by update (full, resumed or change)",
            ),
            &["update"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(updates.clone()));
        let _ = registry.register(Box::new(bytes.clone()));
        SentMetrics { updates, bytes }
    }
}

impl XdsServer {
    pub fn new(state: watch::Receiver<Arc<ConfigState>>, registry: &Registry) -> Self {
        let connected = IntGauge::new(
            "strait_config_proxies_connected",
            "Proxies subscribed to this controller",
        )
        .expect("valid metric");
        let acks = IntCounterVec::new(
            Opts::new(
                "strait_config_acks_total",
                "Config versions acknowledged by proxies, by result (ack or nack)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(connected.clone()));
        let _ = registry.register(Box::new(acks.clone()));
        XdsServer {
            state,
            proxies: Arc::default(),
            connected,
            acks,
            sent: SentMetrics::new(registry),
        }
    }

    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::wire::ConfigUpdateWire, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for XdsServer {
    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, req: Request<Streaming<pb::ProxyMessage>>) -> Result<Response<UpdateStream>, Status> {
        let identity = PeerInfo::of(&req).and_then(|p| p.identity.clone()).ok_or_else(|| {
            Status::unauthenticated("the config stream needs a client certificate from this mesh's CA")
        })?;
        let mut inbound = req.into_inner();
        let mut hello = match inbound.message().await? {
            Some(pb::ProxyMessage {
                kind: Some(pb::proxy_message::Kind::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the config stream must be Hello",
                ))
            }
        };
        let gateway = hello.kind == "gateway";
        // Gateways also learn the controller's own peering endpoint; only a gateway identity may
        // subscribe as one.
        if gateway && identity.service_account() != Some(strait_api::GATEWAY_SA) {
            return Err(Status::permission_denied(format!(
                "{identity} may not subscribe as a gateway (only {}/{} may)",
                strait_api::SYSTEM_NAMESPACE,
                strait_api::GATEWAY_SA
            )));
        }
        let key = format!("{}/{}", hello.kind, hello.node);
        tracing::info!(node = %hello.node, kind = %hello.kind, %identity, held = hello.held.len(), held_buckets = hello.held_digests.len(), "proxy subscribed");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut state = self.state.clone();
        let proxies = self.proxies.clone();
        let connected = self.connected.clone();
        let acks = self.acks.clone();
        let sent_metrics = self.sent.clone();
        // What the proxy says it holds (taken by the first send, which is what differs from
        // it): digests of buckets of it (a proxy of this build; a count of buckets no proxy
        // sends is not read, and that proxy is sent the whole state), or the list of it.
        let digests = std::mem::take(&mut hello.held_digests);
        let mut said = if strait_api::xds::valid_buckets(digests.len()) {
            Some(Said::Digests(digests))
        } else {
            if !digests.is_empty() {
                tracing::warn!(node = %key, buckets = digests.len(), "proxy sent digests of a number of buckets that is not a power of two from 16 to 4096; sending it the whole state");
            }
            (!hello.held.is_empty()).then(|| {
                Said::List(
                    std::mem::take(&mut hello.held)
                        .into_iter()
                        .map(|h| (h.name, h.version))
                        .collect(),
                )
            })
        };
        proxies.lock().map_err(|_| Status::internal("lock"))?.insert(
            key.clone(),
            ProxyStatus {
                node: hello.node.clone(),
                kind: hello.kind.clone(),
                identity: identity.to_string(),
                admin: hello.admin.clone(),
                scope: ProxyScope::describe(&hello),
                sent_version: 0,
                acked_version: 0,
                rejected: vec![],
            },
        );
        connected.inc();
        tokio::spawn(async move {
            let scope = ProxyScope::of(&hello, &identity);
            // The state last sent, shared with the watch: the proxy holds what its scope lets
            // through of it.
            let mut sent: Arc<ConfigState> = Arc::default();
            let mut first = true;
            loop {
                let current = state.borrow_and_update().clone();
                // Gateways take each service's gateway view (its local endpoints) instead of
                // the whole service; sidecars the whole service, in their scope.
                let (changed, removed, newly) = if gateway {
                    let (changed, removed) = diff(&sent.resources, &current.resources, |n| !sidecar_only(n));
                    (changed, removed, vec![])
                } else {
                    scope.changes(&sent, &current)
                };
                let may_send = gateway || current.warm;
                if may_send && (first || !changed.is_empty() || !removed.is_empty() || !newly.is_empty()) {
                    // On the first send `sent` is empty, so `changed` is the whole state: to a
                    // proxy that said what it holds (`said`, taken by the first send), only what
                    // differs from that goes. Encoded once when built; every proxy's stream
                    // shares the bytes.
                    let mut replaced = None;
                    let (update, changed, removed) = match said.take() {
                        Some(Said::Digests(digests)) => {
                            let (changed, buckets) = resume_digests(
                                changed.into_iter().chain(newly).collect(),
                                &digests,
                                hello.accepts_endpoint_parts,
                            );
                            replaced = Some((digests.len() as u32, buckets));
                            (Update::Resumed, changed, vec![])
                        }
                        Some(Said::List(held)) => {
                            let (changed, removed) = resume(
                                changed.into_iter().chain(newly).collect(),
                                &held,
                                hello.accepts_endpoint_parts,
                            );
                            (Update::Resumed, changed, removed)
                        }
                        None => {
                            let update = if first { Update::Full } else { Update::Change };
                            let (changed, removed) = if hello.accepts_endpoint_parts {
                                let (mut out, removed) = in_parts(&sent.resources, changed, removed);
                                out.extend(in_parts(&Resources::default(), newly, vec![]).0);
                                (out, removed)
                            } else {
                                (
                                    changed.into_iter().chain(newly).map(|r| r.wire().clone()).collect(),
                                    removed,
                                )
                            };
                            (update, changed, removed)
                        }
                    };
                    let (sent_resources, sent_removed) = (changed.len(), removed.len());
                    let replaced_buckets = replaced.as_ref().map_or(0, |(_, r)| r.len());
                    let mut parts = Parts::new(current.version, update == Update::Full, hello.accepts_parts);
                    if let Some((buckets, _)) = &replaced {
                        parts.buckets = *buckets;
                    }
                    let mut gone = false;
                    let mut bytes = 0;
                    for r in changed {
                        if let Some(part) = parts.push(r) {
                            bytes += prost::Message::encoded_len(&part);
                            gone = tx.send(Ok(part)).await.is_err();
                            if gone {
                                break;
                            }
                        }
                    }
                    first = false;
                    sent = current.clone();
                    let last = parts.last(removed, replaced.map(|(_, r)| r).unwrap_or_default());
                    bytes += prost::Message::encoded_len(&last);
                    if gone || tx.send(Ok(last)).await.is_err() {
                        break;
                    }
                    sent_metrics.updates.with_label_values(&[update.label()]).inc();
                    sent_metrics
                        .bytes
                        .with_label_values(&[update.label()])
                        .inc_by(bytes as u64);
                    if update == Update::Resumed {
                        tracing::info!(node = %key, version = current.version, resources = sent_resources, removed = sent_removed, replaced_buckets, bytes, "proxy resumed: sent what differs from what it held");
                    }
                    if let Ok(mut p) = proxies.lock() {
                        if let Some(s) = p.get_mut(&key) {
                            s.sent_version = current.version;
                        }
                    }
                } else if may_send && !first {
                    // Nothing this proxy takes changed: what it holds is `current` as much as
                    // `sent`. Holding on to `sent` would keep every resource since replaced
                    // alive (a gateway, sent only its services' local views, held a whole old
                    // catalog's encodings).
                    sent = current;
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { break },
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::ProxyMessage { kind: Some(pb::proxy_message::Kind::Ack(ack)) })) => {
                            let result = if ack.rejected.is_empty() { "ack" } else { "nack" };
                            acks.with_label_values(&[result]).inc();
                            for r in &ack.rejected {
                                tracing::warn!(node = %key, resource = %r.name, error = %r.error, "proxy rejected a resource");
                            }
                            if let Ok(mut p) = proxies.lock() {
                                if let Some(s) = p.get_mut(&key) {
                                    s.acked_version = ack.version;
                                    s.rejected = ack.rejected.iter().map(|r| format!("{}: {}", r.name, r.error)).collect();
                                }
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            connected.dec();
            if let Ok(mut p) = proxies.lock() {
                p.remove(&key);
            }
            tracing::info!(node = %key, "proxy unsubscribed");
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// How large a part of an update split for sending may grow (encoded bytes; a resource larger
/// than this is a part alone). A whole catalog of 40,000 endpoints is 3.5 MB: sent whole, the
/// proxy's decode buffer would grow to hold it and keep that size for as long as the stream.
pub const PART_BYTES: usize = 256 * 1024;

/// What a proxy's Hello said it holds.
enum Said {
    /// Each resource's name and version (`Hello.held`, older proxies).
    List(HashMap<String, u64>),
    /// A digest of each bucket of it (`Hello.held_digests`).
    Digests(Vec<u64>),
}

/// An update cut into parts of at most [`PART_BYTES`] as its encoded resources are added (for a
/// proxy that takes parts; for one that does not, one part).
struct Parts {
    version: u64,
    full: bool,
    /// Set on every part of an update resuming a proxy from its digests.
    buckets: u32,
    split: bool,
    resources: Vec<Bytes>,
    bytes: usize,
    sent_any: bool,
}

impl Parts {
    fn new(version: u64, full: bool, split: bool) -> Self {
        Parts {
            version,
            full,
            buckets: 0,
            split,
            resources: vec![],
            bytes: 0,
            sent_any: false,
        }
    }

    /// Adds an encoded resource; returns a part to send when this one would not fit in it.
    fn push(&mut self, r: Bytes) -> Option<pb::wire::ConfigUpdateWire> {
        let mut ready = None;
        if self.split {
            let len = r.len();
            if !self.resources.is_empty() && self.bytes + len > PART_BYTES {
                ready = Some(self.part(vec![], true));
            }
            self.bytes += len;
        }
        self.resources.push(r);
        ready
    }

    /// The last part, with the update's removals and the buckets it replaces.
    fn last(mut self, removed: Vec<String>, replaced_buckets: Vec<u32>) -> pb::wire::ConfigUpdateWire {
        let mut last = self.part(removed, false);
        last.replaced_buckets = replaced_buckets;
        last
    }

    fn part(&mut self, removed: Vec<String>, more: bool) -> pb::wire::ConfigUpdateWire {
        // `full` on the first part only: it covers every part.
        let full = self.full && !self.sent_any;
        self.sent_any = true;
        self.bytes = 0;
        pb::wire::ConfigUpdateWire {
            version: self.version,
            full,
            resources: std::mem::take(&mut self.resources),
            removed,
            more,
            buckets: self.buckets,
            replaced_buckets: vec![],
        }
    }
}

/// What a sidecar is sent of the services: those of its scope (every one by default).
struct ProxyScope {
    /// The namespaces whose services it is sent (empty: every namespace).
    namespaces: Vec<String>,
    /// Its own service's resource name (empty if it did not say), always sent.
    own: String,
    /// Its identity, when it is scoped by authorization.
    principal: Option<String>,
}

impl ProxyScope {
    fn of(hello: &pb::Hello, identity: &strait_trust::SpiffeId) -> Self {
        ProxyScope {
            namespaces: hello.namespaces.clone(),
            own: match hello.service.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => format!("service/{}", hello.service),
                _ => String::new(),
            },
            principal: hello.scope_authorized.then(|| identity.to_string()),
        }
    }

    /// What a proxy that says `hello` is sent of the services, in words: "" for every one.
    fn describe(hello: &pb::Hello) -> String {
        let mut how = vec![];
        if !hello.namespaces.is_empty() {
            how.push(format!("namespaces {}", hello.namespaces.join(",")));
        }
        if hello.scope_authorized {
            how.push("authorized".to_string());
        }
        how.join("; ")
    }

    /// The services beyond its namespaces it is sent in `state`: those its namespaces'
    /// routes send to.
    fn beyond(&self, state: &ConfigState) -> BTreeSet<Key> {
        if self.namespaces.is_empty() {
            BTreeSet::new()
        } else {
            state.reach.beyond(&self.namespaces)
        }
    }

    /// Whether it is sent resource `name` of `state`, where `beyond` is [`Self::beyond`].
    fn includes(&self, state: &ConfigState, beyond: &BTreeSet<Key>, name: &str) -> bool {
        if gateway_only(name) {
            return false;
        }
        if name == self.own || !name.starts_with("service/") {
            return true;
        }
        (in_scope(&self.namespaces, name) || beyond.contains(name))
            && self.principal.as_deref().is_none_or(|p| state.authz.may_call(p, name))
    }

    /// What to send it going from `sent` to `current`: the resources in its scope that
    /// changed and the names of those removed (as [`diff`]), and the services new to it
    /// because a route or a policy now brings them into its scope, changed or not (sent
    /// whole); one a route or a policy takes out of its scope is removed.
    fn changes<'a>(
        &self,
        sent: &'a ConfigState,
        current: &'a ConfigState,
    ) -> (Vec<&'a Arc<Built>>, Vec<String>, Vec<&'a Arc<Built>>) {
        let beyond_now = self.beyond(current);
        // The same routes (most updates): the same reach.
        let other;
        let beyond_before = if Arc::ptr_eq(&sent.reach, &current.reach) {
            &beyond_now
        } else {
            other = self.beyond(sent);
            &other
        };
        let before = |name: &str| self.includes(sent, beyond_before, name);
        let now = |name: &str| self.includes(current, &beyond_now, name);
        let (mut changed, mut removed) = diff(&sent.resources, &current.resources, now);
        let mut moved: BTreeSet<&str> = beyond_before.symmetric_difference(&beyond_now).map(|k| &**k).collect();
        if self.principal.is_some() && !Arc::ptr_eq(&sent.authz, &current.authz) {
            // The policies, where they are enforced, or the workloads they reach changed: the
            // services of the namespaces concerned may have moved in or out.
            let moved_by_authz = current.authz.moved_since(&sent.authz);
            moved.extend(
                sent.resources
                    .iter()
                    .chain(current.resources.iter())
                    .map(|(k, _)| &**k)
                    .filter(|k| moved_by_authz.covers(k)),
            );
        }
        moved.retain(|name| before(name) != now(name));
        if moved.is_empty() {
            return (changed, removed, vec![]);
        }
        changed.retain(|r| !moved.contains(&*r.name));
        removed.retain(|name| !moved.contains(name.as_str()));
        let mut newly = vec![];
        for name in moved {
            if now(name) {
                newly.extend(current.resources.get(name));
            } else if sent.resources.get(name).is_some() {
                removed.push(name.to_string());
            }
        }
        (changed, removed, newly)
    }
}

/// Whether a resource is sent to a proxy scoped to `namespaces` (empty: every namespace). Only
/// services are scoped; the mesh's own namespace, gateways, policies and routes always go.
fn in_scope(namespaces: &[String], name: &str) -> bool {
    let Some(rest) = name.strip_prefix("service/") else {
        return true;
    };
    let ns = rest.split('/').next().unwrap_or_default();
    namespaces.is_empty() || ns == strait_api::SYSTEM_NAMESPACE || namespaces.iter().any(|n| n == ns)
}

#[cfg(test)]
mod scope_tests {
    use std::sync::Arc;

    use strait_api::pb;

    use super::{in_scope, ProxyScope};
    use crate::resources::{resource, AuthzScope, ConfigState, Resources};

    /// A state holding these resources (each name's version given: a new version is a change).
    fn state(resources: &[(&str, &str)], authz: &Arc<AuthzScope>) -> ConfigState {
        let mut r = Resources::default();
        for (name, version) in resources {
            let kind = pb::resource::Kind::TrustBundle(pb::TrustBundle {
                pem: version.to_string(),
                ..Default::default()
            });
            r.insert(Arc::new(resource(name.to_string(), kind)));
        }
        ConfigState {
            resources: r,
            authz: authz.clone(),
            warm: true,
            ..Default::default()
        }
    }

    /// Policy `p` of namespace `ns`, its spec in YAML.
    fn policy(ns: &str, yaml: &str) -> pb::AuthorizationPolicy {
        pb::AuthorizationPolicy {
            namespace: ns.to_string(),
            name: "p".into(),
            spec_json: serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(yaml).unwrap()).unwrap(),
            ..Default::default()
        }
    }

    fn authz(policies: &[(&str, &str)]) -> Arc<AuthzScope> {
        let policies: Vec<pb::AuthorizationPolicy> = policies.iter().map(|(ns, yaml)| policy(ns, yaml)).collect();
        Arc::new(AuthzScope::of("east", &policies, Default::default()))
    }

    /// The scope of web's front, a sidecar scoped by authorization.
    fn front_scoped_by_authorization() -> ProxyScope {
        let hello = pb::Hello {
            scope_authorized: true,
            service: "web/front".into(),
            ..Default::default()
        };
        ProxyScope::of(&hello, &front())
    }

    fn front() -> strait_trust::SpiffeId {
        "spiffe://mesh.local/ns/web/sa/front".parse().unwrap()
    }

    fn names<'a>(resources: impl IntoIterator<Item = &'a Arc<crate::resources::Built>>) -> Vec<String> {
        let mut v: Vec<String> = resources.into_iter().map(|r| r.name.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_proxy_scoped_by_authorization_gains_and_loses_services_as_policies_change() {
        let scope = front_scoped_by_authorization();
        let catalog = |greeter: &'static str| {
            vec![
                ("service/demo/echo", "1"),
                ("service/demo/greeter", greeter),
                ("service/web/front", "1"),
                ("service/web/admin", "1"),
                ("route/web/r", "1"),
            ]
        };
        let none = authz(&[]);
        let s0 = state(&catalog("1"), &none);
        let empty = ConfigState::default();
        let (changed, removed, newly) = scope.changes(&empty, &s0);
        assert_eq!(changed.len(), 5, "no policy: everything");
        assert!(removed.is_empty() && newly.is_empty());
        // greeter lets in only demo's callers; web's admin service refuses everyone (but front
        // is the proxy's own service, always sent).
        let policies = authz(&[
            (
                "demo",
                "targetRefs: [{kind: Service, name: greeter}]\nrules: [{from: [{source: {namespaces: [demo]}}]}]",
            ),
            ("web", "action: DENY\nrules: [{}]"),
        ]);
        let mut with_policy = catalog("1");
        with_policy.push(("authz/demo/p", "1"));
        let s1 = state(&with_policy, &policies);
        let (changed, mut removed, newly) = scope.changes(&s0, &s1);
        removed.sort();
        assert_eq!(names(changed), ["authz/demo/p"]);
        assert_eq!(removed, ["service/demo/greeter", "service/web/admin"]);
        assert!(newly.is_empty());
        // A change of greeter is not sent while it is out of scope ...
        with_policy[1].1 = "2";
        let s2 = state(&with_policy, &policies);
        let (changed, removed, newly) = scope.changes(&s1, &s2);
        assert!(changed.is_empty() && removed.is_empty() && newly.is_empty());
        // ... and once the policies go, greeter and admin come back whole, changed or not.
        let s3 = state(&catalog("2"), &none);
        let (changed, removed, newly) = scope.changes(&s2, &s3);
        assert!(changed.is_empty(), "{:?}", names(changed));
        assert_eq!(removed, ["authz/demo/p"]);
        assert_eq!(names(newly), ["service/demo/greeter", "service/web/admin"]);
        // Scoped to other namespaces, a proxy is still sent its own service.
        let demo_only = ProxyScope::of(
            &pb::Hello {
                namespaces: vec!["demo".into()],
                service: "web/front".into(),
                ..Default::default()
            },
            &front(),
        );
        let (changed, _, _) = demo_only.changes(&empty, &s0);
        assert_eq!(
            names(changed),
            [
                "route/web/r",
                "service/demo/echo",
                "service/demo/greeter",
                "service/web/front"
            ]
        );
        // Unscoped: the policies change nothing of what it is sent.
        let all = ProxyScope::of(&pb::Hello::default(), &front());
        let (changed, removed, newly) = all.changes(&s0, &s1);
        assert_eq!(names(changed), ["authz/demo/p"]);
        assert!(removed.is_empty() && newly.is_empty());
    }

    #[test]
    fn a_policy_change_moves_only_the_services_of_its_namespace() {
        use crate::objects::Enforcement;
        use crate::resources::AuthzScopes;
        let scope = front_scoped_by_authorization();
        let catalog = [
            ("service/demo/echo", "1"),
            ("service/demo/greeter", "1"),
            ("service/shop/cart", "1"),
            ("service/web/front", "1"),
            ("service/web/admin", "1"),
        ];
        let shop_from_demo = policy("shop", "rules: [{from: [{source: {namespaces: [demo]}}]}]");
        let demo_closed = policy("demo", "action: DENY\nrules: [{}]");
        let root_closed = policy(strait_api::authz::ROOT_NAMESPACE, "action: DENY\nrules: [{}]");
        let here = crate::objects::Enforcing {
            origin: "east".into(),
            generation: 1,
            clusters: Some([("east".to_string(), 1)].into()),
        };
        let demo_here: Enforcement = [("demo".to_string(), [("p".to_string(), here)].into())].into();
        let steps: Vec<(Vec<pb::AuthorizationPolicy>, Enforcement)> = vec![
            (vec![], Enforcement::new()),
            (vec![shop_from_demo.clone()], Enforcement::new()),
            (vec![shop_from_demo.clone(), demo_closed.clone()], Enforcement::new()),
            // demo's policy not enforced everywhere: demo's services come back.
            (vec![shop_from_demo.clone(), demo_closed.clone()], demo_here),
            (vec![shop_from_demo.clone(), demo_closed], Enforcement::new()),
            (vec![shop_from_demo.clone(), root_closed], Enforcement::new()),
            (vec![shop_from_demo], Enforcement::new()),
        ];
        let mut scopes = AuthzScopes::default();
        let merged = crate::catalog::Merged::new();
        let mut held: Vec<String> = catalog.iter().map(|(n, _)| n.to_string()).collect();
        let mut before = state(&catalog, &scopes.update("east", &steps[0].0, &steps[0].1, &merged));
        let mut moved_anywhere = vec![];
        for (i, (policies, enforcement)) in steps.iter().enumerate().skip(1) {
            let now = state(&catalog, &scopes.update("east", policies, enforcement, &merged));
            // The same as when every service is looked at again (a scope made alone).
            let (prev_policies, prev_enforcement) = &steps[i - 1];
            let alone = state(
                &catalog,
                &Arc::new(AuthzScope::of(
                    "east",
                    prev_policies,
                    Arc::new(prev_enforcement.clone()),
                )),
            );
            let (changed, mut removed, newly) = scope.changes(&before, &now);
            let (changed_all, mut removed_all, newly_all) = scope.changes(&alone, &now);
            removed.sort();
            removed_all.sort();
            assert_eq!(
                (names(changed), &removed, names(newly.iter().copied())),
                (names(changed_all), &removed_all, names(newly_all)),
                "step {i}"
            );
            held.retain(|n| !removed.contains(n));
            held.extend(newly.iter().map(|r| r.name.to_string()));
            held.sort();
            moved_anywhere.push(
                catalog
                    .iter()
                    .filter(|(n, _)| now.authz.moved_since(&before.authz).covers(n))
                    .count(),
            );
            if i == 2 {
                assert_eq!(
                    held,
                    ["service/web/admin", "service/web/front"],
                    "demo closed, shop only to demo"
                );
            }
            before = now;
        }
        // Each step looked at the services of the namespace it changed; the root namespace's
        // policy (and its removal) at all of them.
        assert_eq!(moved_anywhere, [1, 2, 2, 2, 5, 5]);
        assert_eq!(
            held,
            [
                "service/demo/echo",
                "service/demo/greeter",
                "service/web/admin",
                "service/web/front"
            ]
        );
    }

    #[test]
    fn only_services_of_other_namespaces_are_left_out() {
        let scope = vec!["demo".to_string()];
        assert!(in_scope(&scope, "service/demo/echo"));
        assert!(!in_scope(&scope, "service/sim/svc-0001"));
        assert!(in_scope(
            &scope,
            &format!("service/{}/federation", strait_api::SYSTEM_NAMESPACE)
        ));
        assert!(in_scope(&scope, "route/sim/r"));
        assert!(in_scope(&scope, "gateway/west"));
        assert!(in_scope(&[], "service/sim/svc-0001"));
    }
}

#[cfg(test)]
mod parts_tests {
    use super::{Parts, PART_BYTES};
    use prost::Message;
    use strait_api::pb;

    /// A resource of about `kib` KiB encoded.
    fn resource(name: &str, kib: usize) -> pb::Resource {
        pb::Resource {
            name: name.into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::TrustBundle(pb::TrustBundle {
                pem: "x".repeat(kib * 1024),
                ..Default::default()
            })),
        }
    }

    /// The parts as a proxy reads them: each sent as `ConfigUpdateWire`, decoded as
    /// `ConfigUpdate`.
    fn split(resources: &[pb::Resource], full: bool, accepts_parts: bool) -> Vec<pb::ConfigUpdate> {
        let mut parts = Parts::new(7, full, accepts_parts);
        let mut out: Vec<pb::wire::ConfigUpdateWire> = resources
            .iter()
            .filter_map(|r| parts.push(r.encode_to_vec().into()))
            .collect();
        out.push(parts.last(vec!["gone".into()], vec![]));
        out.iter()
            .map(|w| pb::ConfigUpdate::decode(w.encode_to_vec().as_slice()).unwrap())
            .collect()
    }

    #[test]
    fn what_the_controller_writes_is_what_proxies_read_as_a_config_update() {
        let resources = vec![resource("a", 1), resource("b", 2)];
        let parts = split(&resources, true, true);
        assert_eq!(parts.len(), 1);
        assert_eq!(
            parts[0],
            pb::ConfigUpdate {
                version: 7,
                full: true,
                resources,
                removed: vec!["gone".into()],
                more: false,
                ..Default::default()
            }
        );
        // An update resuming a proxy from its digests: the bucket count on every part, the
        // buckets it replaces in the last.
        let mut parts = Parts::new(7, false, true);
        parts.buckets = 256;
        let mut wire: Vec<pb::wire::ConfigUpdateWire> = (0..3)
            .filter_map(|i| parts.push(resource(&format!("r{i}"), 100).encode_to_vec().into()))
            .collect();
        wire.push(parts.last(vec![], vec![3, 250]));
        let read: Vec<pb::ConfigUpdate> = wire
            .iter()
            .map(|w| pb::ConfigUpdate::decode(w.encode_to_vec().as_slice()).unwrap())
            .collect();
        assert!(read.len() > 1);
        assert!(read.iter().all(|p| p.buckets == 256 && !p.full));
        assert_eq!(read.last().unwrap().replaced_buckets, [3, 250]);
        assert!(read[..read.len() - 1].iter().all(|p| p.replaced_buckets.is_empty()));
    }

    #[test]
    fn a_large_update_is_sent_in_bounded_parts_that_add_up_to_it() {
        // 100 KiB each, one of 600 KiB (a part alone), then small ones.
        let mut resources: Vec<pb::Resource> = (0..5).map(|i| resource(&format!("a{i}"), 100)).collect();
        resources.push(resource("big", 600));
        resources.extend((0..3).map(|i| resource(&format!("c{i}"), 1)));
        let parts = split(&resources, true, true);
        assert!(parts.len() >= 4, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            let last = i == parts.len() - 1;
            assert_eq!(p.version, 7);
            assert_eq!(p.full, i == 0, "full on the first part only (part {i})");
            assert_eq!(p.more, !last, "more on every part but the last (part {i})");
            assert_eq!(p.removed.is_empty(), !last, "removals in the last part (part {i})");
            assert!(
                p.resources.len() == 1 || p.encoded_len() <= PART_BYTES + 64,
                "part {i}: {} resources, {} bytes",
                p.resources.len(),
                p.encoded_len()
            );
        }
        let names: Vec<&str> = parts
            .iter()
            .flat_map(|p| p.resources.iter().map(|r| r.name.as_str()))
            .collect();
        let want: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, want, "every resource once, in order");
        assert!(parts
            .iter()
            .any(|p| p.resources.len() == 1 && p.resources[0].name == "big"));
    }

    #[test]
    fn small_updates_and_proxies_that_do_not_take_parts_get_one_message() {
        let resources: Vec<pb::Resource> = (0..5).map(|i| resource(&format!("a{i}"), 100)).collect();
        let whole = split(&resources, true, false);
        assert_eq!(whole.len(), 1);
        assert!(whole[0].full && !whole[0].more && whole[0].resources.len() == 5 && whole[0].removed == ["gone"]);
        let small = split(&resources[..2], false, true);
        assert_eq!(small.len(), 1);
        assert!(!small[0].full && !small[0].more && small[0].resources.len() == 2);
    }
}
