//! `AuthorizationPolicy` (`policy.strait.dev/v1alpha1`): Istio's semantics, plus `clusters`
//! and `trustDomains` as sources. Evaluated at the destination's inbound sidecar on the
//! verified peer identity: AUDIT policies are counted, then any matching DENY denies, then if
//! any ALLOW policy applies to the workload one of them must match. Unknown fields are refused
//! (a proxy never enforces a policy more broadly than written), and anything that cannot be
//! evaluated denies. Pure logic: the schema, its checks, path normalization and evaluation.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::traffic::TargetRef;

/// Policies in this namespace apply to every workload of the mesh.
pub const ROOT_NAMESPACE: &str = crate::SYSTEM_NAMESPACE;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// ALLOW (the default), DENY or AUDIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<When>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_clusters: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct When {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Clone, Debug)]
enum Glob {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Glob {
    fn new(s: &str) -> Glob {
        if s == "*" {
            Glob::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Glob::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Glob::Suffix(p.to_string())
        } else {
            Glob::Exact(s.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(e) => v == e,
            Glob::Prefix(p) => v.starts_with(p.as_str()),
            Glob::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// A list of values and a list of excluded values: holds when the value is in the first (or
/// it is empty) and not in the second. An absent value (say no peer identity) matches
/// neither list, so a field that names values never holds for it.
#[derive(Clone, Debug, Default)]
struct Field {
    values: Vec<Glob>,
    not: Vec<Glob>,
}

impl Field {
    fn new(values: &[String], not: &[String]) -> Field {
        Field {
            values: values.iter().map(|v| Glob::new(v)).collect(),
            not: not.iter().map(|v| Glob::new(v)).collect(),
        }
    }

    fn is_set(&self) -> bool {
        !self.values.is_empty() || !self.not.is_empty()
    }

    fn holds(&self, v: Option<&str>) -> bool {
        if !self.is_set() {
            return true;
        }
        let Some(v) = v else { return false };
        (self.values.is_empty() || self.values.iter().any(|g| g.matches(v))) && !self.not.iter().any(|g| g.matches(v))
    }
}

/// A path pattern: a glob, or a template with `{*}` (one segment) and `{**}` (the rest).
#[derive(Clone, Debug)]
enum PathPattern {
    Glob(Glob),
    Template(Regex),
}

impl PathPattern {
    fn new(p: &str) -> Result<PathPattern, String> {
        if !p.contains('{') {
            return Ok(PathPattern::Glob(Glob::new(p)));
        }
        let segments: Vec<&str> = p.split('/').collect();
        let mut re = String::from("^");
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                re.push('/');
            }
            match *seg {
                "{*}" => re.push_str("[^/]+"),
                "{**}" if i == segments.len() - 1 => re.push_str(".*"),
                "{**}" => return Err(format!("{p:?}: {{**}} may only be the last segment")),
                s if s.contains('{') || s.contains('}') => {
                    return Err(format!("{p:?}: use {{*}} or {{**}} as a whole path segment"))
                }
                s => re.push_str(&regex::escape(s)),
            }
        }
        re.push('$');
        Regex::new(&re).map(PathPattern::Template).map_err(|e| e.to_string())
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Glob(g) => g.matches(path),
            PathPattern::Template(re) => re.is_match(path),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct CompiledSource {
    principals: Field,
    namespaces: Field,
    service_accounts: Field,
    clusters: Field,
    trust_domains: Field,
}

impl CompiledSource {
    /// Whether the caller is this source: every field it sets holds.
    fn holds(&self, peer: &Peer<'_>) -> bool {
        let (td, ns, sa) = split_principal(peer.principal);
        self.principals.holds(peer.principal)
            && self.namespaces.holds(ns)
            && self.service_accounts.holds(sa)
            && self.clusters.holds(peer.cluster)
            && self.trust_domains.holds(td)
    }
}

#[derive(Clone, Debug, Default)]
struct CompiledOperation {
    hosts: Field,
    ports: Field,
    methods: Field,
    paths: Vec<PathPattern>,
    not_paths: Vec<PathPattern>,
}

impl CompiledOperation {
    fn is_http(&self) -> bool {
        self.hosts.is_set() || self.methods.is_set() || !self.paths.is_empty() || !self.not_paths.is_empty()
    }
}

#[derive(Clone, Debug)]
enum Key {
    Header(String),
    Principal,
    Namespace,
    Cluster,
    TrustDomain,
    Port,
}

#[derive(Clone, Debug)]
struct CompiledWhen {
    key: Key,
    field: Field,
}

#[derive(Clone, Debug, Default)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledWhen>,
}

impl CompiledRule {
    /// Whether the rule names anything only an HTTP request has.
    fn is_http(&self) -> bool {
        self.to.iter().any(CompiledOperation::is_http) || self.when.iter().any(|w| matches!(w.key, Key::Header(_)))
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    /// Services of the policy's namespace, by name.
    Services(Vec<String>),
    /// Workloads whose labels include these (in the policy's namespace, or anywhere for the
    /// root namespace).
    Selector(BTreeMap<String, String>),
    /// Every workload of the namespace (the whole mesh for the root namespace).
    All,
}

/// A checked policy, ready to evaluate.
#[derive(Clone, Debug)]
pub struct CompiledAuthz {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub scope: Scope,
    rules: Vec<CompiledRule>,
}

/// One problem, with its field path from `spec` and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct AuthzError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> AuthzError {
    AuthzError {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a policy field by field; any error refuses it whole.
pub fn compile_authz(
    namespace: &str,
    name: &str,
    spec: &AuthorizationPolicySpec,
) -> Result<CompiledAuthz, Vec<AuthzError>> {
    let mut errors = vec![];
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        other => {
            errors.push(err(
                "spec.action",
                format!("{other:?} is not an action; use ALLOW, DENY or AUDIT"),
            ));
            Action::Allow
        }
    };
    let scope = match (&spec.selector, spec.target_refs.is_empty()) {
        (Some(_), false) => {
            errors.push(err("spec.selector", "set selector or targetRefs, not both"));
            Scope::All
        }
        (Some(sel), true) => Scope::Selector(sel.match_labels.clone()),
        (None, false) => {
            let mut names = vec![];
            for (i, t) in spec.target_refs.iter().enumerate() {
                let ok_kind = matches!(
                    (t.group.as_str(), t.kind.as_str()),
                    ("" | "core", "Service") | ("multicluster.x-k8s.io", "ServiceImport")
                );
                if !ok_kind {
                    errors.push(err(
                        format!("spec.targetRefs[{i}].kind"),
                        "use kind Service (group \"\") or ServiceImport (group multicluster.x-k8s.io)",
                    ));
                }
                if t.namespace.as_deref().is_some_and(|n| n != namespace) {
                    errors.push(err(
                        format!("spec.targetRefs[{i}].namespace"),
                        "a policy may only target services of its own namespace",
                    ));
                }
                names.push(t.name.clone());
            }
            Scope::Services(names)
        }
        (None, true) => Scope::All,
    };
    let mut rules = vec![];
    for (i, r) in spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        let from = r
            .from
            .iter()
            .map(|s| {
                let s = &s.source;
                CompiledSource {
                    principals: Field::new(&s.principals, &s.not_principals),
                    namespaces: Field::new(&s.namespaces, &s.not_namespaces),
                    service_accounts: Field::new(&s.service_accounts, &s.not_service_accounts),
                    clusters: Field::new(&s.clusters, &s.not_clusters),
                    trust_domains: Field::new(&s.trust_domains, &s.not_trust_domains),
                }
            })
            .collect();
        let mut to = vec![];
        for (j, t) in r.to.iter().enumerate() {
            let o = &t.operation;
            for (k, p) in o.ports.iter().chain(&o.not_ports).enumerate() {
                if p.parse::<u16>().is_err() {
                    errors.push(err(
                        format!("{f}.to[{j}].operation.ports[{k}]"),
                        format!("{p:?} is not a port number"),
                    ));
                }
            }
            let mut paths = vec![];
            let mut not_paths = vec![];
            for (list, out, name) in [
                (&o.paths, &mut paths, "paths"),
                (&o.not_paths, &mut not_paths, "notPaths"),
            ] {
                for (k, p) in list.iter().enumerate() {
                    if !p.starts_with('/') && !p.starts_with('*') {
                        errors.push(err(
                            format!("{f}.to[{j}].operation.{name}[{k}]"),
                            format!("{p:?} must start with / (or be a * glob)"),
                        ));
                        continue;
                    }
                    match PathPattern::new(p) {
                        Ok(pp) => out.push(pp),
                        Err(e) => errors.push(err(format!("{f}.to[{j}].operation.{name}[{k}]"), e)),
                    }
                }
            }
            to.push(CompiledOperation {
                hosts: Field::new(&o.hosts, &o.not_hosts),
                ports: Field::new(&o.ports, &o.not_ports),
                methods: Field::new(&o.methods, &o.not_methods),
                paths,
                not_paths,
            });
        }
        let mut when = vec![];
        for (j, w) in r.when.iter().enumerate() {
            let key = if let Some(h) = w.key.strip_prefix("request.headers[").and_then(|h| h.strip_suffix(']')) {
                Some(Key::Header(h.to_ascii_lowercase()))
            } else {
                match w.key.as_str() {
                    "source.principal" => Some(Key::Principal),
                    "source.namespace" => Some(Key::Namespace),
                    "source.cluster" => Some(Key::Cluster),
                    "source.trustDomain" => Some(Key::TrustDomain),
                    "destination.port" => Some(Key::Port),
                    _ => None,
                }
            };
            match key {
                Some(key) if !w.values.is_empty() || !w.not_values.is_empty() => when.push(CompiledWhen {
                    key,
                    field: Field::new(&w.values, &w.not_values),
                }),
                Some(_) => errors.push(err(format!("{f}.when[{j}]"), "give values or notValues")),
                None => errors.push(err(
                    format!("{f}.when[{j}].key"),
                    format!("{:?} is not a key; use request.headers[<name>], source.principal, source.namespace, source.cluster, source.trustDomain or destination.port", w.key),
                )),
            }
        }
        rules.push(CompiledRule { from, to, when });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledAuthz {
        namespace: namespace.to_string(),
        name: name.to_string(),
        action,
        scope,
        rules,
    })
}

/// A policy as the config stream carries it, checked: its spec's JSON parsed and compiled (the
/// first problem when it is refused). Proxies apply it this way; the controller scopes proxies
/// by the same.
pub fn compile_wire(p: &crate::pb::AuthorizationPolicy) -> Result<CompiledAuthz, AuthzError> {
    let spec: AuthorizationPolicySpec = serde_json::from_str(&p.spec_json).map_err(|e| err("spec", e.to_string()))?;
    compile_authz(&p.namespace, &p.name, &spec)
        .map_err(|errors| errors.into_iter().next().unwrap_or_else(|| err("spec", "refused")))
}

/// What a request (or TCP connection) brings to a decision.
pub struct Peer<'a> {
    /// The verified SPIFFE ID of the caller, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub principal: Option<&'a str>,
    /// The caller's cluster, from the intermediate CA that issued its certificate.
    pub cluster: Option<&'a str>,
}

pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// Normalized ([`normalize_path`]), without the query.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl CompiledAuthz {
    /// Whether any rule names an HTTP attribute (a config error for a TCP service).
    pub fn has_http_rules(&self) -> bool {
        self.rules.iter().any(CompiledRule::is_http)
    }

    /// Which rule (by index) matches, if any. For a TCP connection (`http` None), a rule that
    /// names HTTP attributes matches for DENY (fail closed: its other conditions decide) and
    /// never for ALLOW.
    pub fn matching_rule(&self, peer: &Peer<'_>, port: u16, http: Option<&HttpAttrs<'_>>) -> Option<usize> {
        let (td, ns, _) = split_principal(peer.principal);
        let port_s = port.to_string();
        self.rules.iter().position(|r| {
            if http.is_none() && r.is_http() && self.action != Action::Deny {
                return false;
            }
            let from_ok = r.from.is_empty() || r.from.iter().any(|s| s.holds(peer));
            let to_ok = r.to.is_empty()
                || r.to.iter().any(|o| {
                    let http_ok = match http {
                        None => true,
                        Some(h) => {
                            o.hosts.holds(Some(h.host))
                                && o.methods.holds(Some(h.method))
                                && (o.paths.is_empty() || o.paths.iter().any(|p| p.matches(h.path)))
                                && !o.not_paths.iter().any(|p| p.matches(h.path))
                        }
                    };
                    o.ports.holds(Some(&port_s)) && http_ok
                });
            let when_ok = r.when.iter().all(|w| match &w.key {
                // A repeated header is matched on every value, in the direction that fails
                // closed: an ALLOW holds only if every value is allowed; a DENY holds if any
                // value is one it names.
                Key::Header(name) => match http {
                    None => true,
                    Some(h) => {
                        let values: Vec<&str> = h
                            .headers
                            .get_all(name.as_str())
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        let named = |v: &&str| {
                            (w.field.values.is_empty() || w.field.values.iter().any(|g| g.matches(v)))
                                && !w.field.not.iter().any(|g| g.matches(v))
                        };
                        if values.is_empty() {
                            // An absent header is in no list: it holds only for a notValues-only condition.
                            w.field.values.is_empty()
                        } else if self.action == Action::Deny {
                            values.iter().any(named)
                        } else {
                            values.iter().all(named)
                        }
                    }
                },
                Key::Principal => w.field.holds(peer.principal),
                Key::Namespace => w.field.holds(ns),
                Key::Cluster => w.field.holds(peer.cluster),
                Key::TrustDomain => w.field.holds(td),
                Key::Port => w.field.holds(Some(&port_s)),
            });
            from_ok && to_ok && when_ok
        })
    }
}

/// The DENY rule (policy, rule) that refuses a caller by its source alone: the check an
/// east-west gateway makes for a service of its cluster. Only DENY rules that name nothing but
/// sources (no `to`, no `when`) decide here, so the gateway never refuses more than the
/// destination sidecar would.
pub fn gateway_denies(policies: &[&CompiledAuthz], peer: &Peer<'_>) -> Option<(String, usize)> {
    policies.iter().filter(|p| p.action == Action::Deny).find_map(|p| {
        p.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.to.is_empty() && r.when.is_empty() && !r.from.is_empty())
            .find(|(_, r)| r.sources_hold(peer))
            .map(|(i, _)| (format!("{}/{}", p.namespace, p.name), i))
    })
}

fn split_principal(p: Option<&str>) -> (Option<&str>, Option<&str>, Option<&str>) {
    let Some(rest) = p.and_then(|p| p.strip_prefix("spiffe://")) else {
        return (None, None, None);
    };
    let mut parts = rest.split('/');
    let td = parts.next();
    let (mut ns, mut sa) = (None, None);
    while let Some(k) = parts.next() {
        match k {
            "ns" => ns = parts.next(),
            "sa" => sa = parts.next(),
            _ => {}
        }
    }
    (td, ns, sa)
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `<ns>/<name>` and rule index of the policy that decided (None: no policy applied, or
    /// no ALLOW rule matched).
    pub policy: Option<(String, usize)>,
    pub action: &'static str,
    /// AUDIT policies whose rules matched: (`<ns>/<name>`, rule).
    pub audited: Vec<(String, usize)>,
}

/// Decides: AUDIT matches are noted; a matching DENY denies; with any ALLOW policy applying,
/// a matching ALLOW allows and nothing else does; with none, the request is allowed.
pub fn decide(policies: &[&CompiledAuthz], peer: &Peer<'_>, port: u16, http: Option<&HttpAttrs<'_>>) -> Decision {
    let name = |p: &CompiledAuthz| format!("{}/{}", p.namespace, p.name);
    let audited = policies
        .iter()
        .filter(|p| p.action == Action::Audit)
        .filter_map(|p| p.matching_rule(peer, port, http).map(|r| (name(p), r)))
        .collect();
    for p in policies.iter().filter(|p| p.action == Action::Deny) {
        if let Some(r) = p.matching_rule(peer, port, http) {
            return Decision {
                allowed: false,
                policy: Some((name(p), r)),
                action: "DENY",
                audited,
            };
        }
    }
    let allows: Vec<&&CompiledAuthz> = policies.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return Decision {
            allowed: true,
            policy: None,
            action: "NONE",
            audited,
        };
    }
    for p in allows {
        if let Some(r) = p.matching_rule(peer, port, http) {
            return Decision {
                allowed: true,
                policy: Some((name(p), r)),
                action: "ALLOW",
                audited,
            };
        }
    }
    Decision {
        allowed: false,
        policy: None,
        action: "ALLOW",
        audited,
    }
}

/// Whether `p` applies to a workload of service `service` in `namespace` with `labels`.
pub fn applies(p: &CompiledAuthz, service: &str, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    match (reach(p, service, namespace), &p.scope) {
        (Reach::None, _) => false,
        (Reach::Some, Scope::Selector(want)) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        _ => true,
    }
}

/// How far a policy reaches over the workloads of a service known only by name (its
/// workloads' labels unknown): none of them, maybe some (a selector), or every one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    None,
    Some,
    Every,
}

/// Which of service `service`'s workloads in `namespace` `p` applies to, by name alone (see
/// [`applies`] for one workload).
pub fn reach(p: &CompiledAuthz, service: &str, namespace: &str) -> Reach {
    let root = p.namespace == ROOT_NAMESPACE;
    if !root && p.namespace != namespace {
        return Reach::None;
    }
    match &p.scope {
        Scope::All => Reach::Every,
        Scope::Services(names) if !root && names.iter().any(|n| n == service) => Reach::Every,
        Scope::Services(_) => Reach::None,
        Scope::Selector(want) if want.is_empty() => Reach::Every,
        Scope::Selector(_) => Reach::Some,
    }
}

/// [`reach`] told apart by the label sets of the service's workloads (distinct; empty when
/// not known): a selector reaches every workload when every set matches it, none when none
/// does.
pub fn reach_over(p: &CompiledAuthz, service: &str, namespace: &str, labels: &[BTreeMap<String, String>]) -> Reach {
    match (reach(p, service, namespace), &p.scope) {
        (Reach::Some, Scope::Selector(want)) if !labels.is_empty() => {
            let selected = labels
                .iter()
                .filter(|l| want.iter().all(|(k, v)| l.get(k) == Some(v)))
                .count();
            match selected {
                0 => Reach::None,
                n if n == labels.len() => Reach::Every,
                _ => Reach::Some,
            }
        }
        (r, _) => r,
    }
}

impl CompiledRule {
    /// Whether the rule depends on the caller alone: no operation, and conditions only on
    /// source keys.
    fn names_only_sources(&self) -> bool {
        self.to.is_empty() && self.when.iter().all(|w| !matches!(w.key, Key::Header(_) | Key::Port))
    }

    /// Whether the caller's side of the rule holds: one of its sources (if any) and every
    /// condition on a source key. Request attributes are not looked at.
    fn sources_hold(&self, peer: &Peer<'_>) -> bool {
        let (td, ns, _) = split_principal(peer.principal);
        (self.from.is_empty() || self.from.iter().any(|s| s.holds(peer)))
            && self.when.iter().all(|w| match &w.key {
                Key::Header(_) | Key::Port => true,
                Key::Principal => w.field.holds(peer.principal),
                Key::Namespace => w.field.holds(ns),
                Key::Cluster => w.field.holds(peer.cluster),
                Key::TrustDomain => w.field.holds(td),
            })
    }
}

/// Whether some request of this caller could be allowed by a service whose policies are
/// these, each with how far it reaches over the service's workloads ([`reach`]). False only
/// when every workload refuses every request of the caller: a DENY reaching every workload
/// has a rule that names only sources and holds for it, or ALLOW policies reach every
/// workload and no rule of any ALLOW policy that may apply holds for it. Ports, methods, paths
/// and headers are taken as ones some request has, so this never refuses a caller the
/// destination would let in (a proxy scoped by authorization is sent the services this
/// holds for).
pub fn may_call(policies: &[(&CompiledAuthz, Reach)], peer: &Peer<'_>) -> bool {
    let denied = policies.iter().any(|(p, reach)| {
        *reach == Reach::Every
            && p.action == Action::Deny
            && p.rules.iter().any(|r| r.names_only_sources() && r.sources_hold(peer))
    });
    if denied {
        return false;
    }
    let bound = policies
        .iter()
        .any(|(p, reach)| *reach == Reach::Every && p.action == Action::Allow);
    !bound
        || policies.iter().any(|(p, reach)| {
            *reach != Reach::None && p.action == Action::Allow && p.rules.iter().any(|r| r.sources_hold(peer))
        })
}

/// The one form of a path both the decision and the application see: percent-encoded
/// unreserved characters decoded, `%2F` and `%5C` (and `\`) taken as `/`, repeated slashes
/// merged, `.` and `..` segments resolved; the query and fragment are not part of it. A
/// `%00` (or any control byte) is refused.
pub fn normalize_path(raw: &str) -> Result<String, &'static str> {
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return Err("a malformed percent-encoding");
            };
            match v {
                0 => return Err("%00 in the path"),
                b'/' | b'\\' => decoded.push('/'),
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => decoded.push(c as char),
                c if c < 0x20 || c == 0x7f => return Err("a control character in the path"),
                _ => {
                    decoded.push('%');
                    decoded.push_str(&hex.unwrap_or_default().to_ascii_uppercase());
                }
            }
            i += 3;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            return Err("a control character in the path");
        }
        decoded.push(if b == b'\\' { '/' } else { b as char });
        i += 1;
    }
    let mut out: Vec<&str> = vec![];
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = format!("/{}", out.join("/"));
    if (decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..")) && path != "/" {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> CompiledAuthz {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(yaml).expect("yaml");
        compile_authz("demo", "p", &spec).expect("compiles")
    }

    fn get<'a>(path: &'a str, headers: &'a http::HeaderMap) -> HttpAttrs<'a> {
        HttpAttrs {
            method: "GET",
            path,
            host: "greeter.demo.svc.clusterset.local",
            headers,
        }
    }

    const ALICE: &str = "spiffe://mesh.local/ns/demo/sa/alice";

    #[test]
    fn the_issue_example_allows_only_what_it_names() {
        let p = policy(
            r#"
targetRefs: [{group: "", kind: Service, name: greeter}]
action: ALLOW
rules:
  - from: [{source: {principals: ["spiffe://mesh.local/ns/demo/sa/*"], clusters: [east, west]}}]
    to: [{operation: {methods: [GET], paths: ["/api/{**}"]}}]
    when: [{key: "request.headers[x-tenant]", values: [blue]}]
"#,
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-tenant", "blue".parse().expect("value"));
        let east = Peer {
            principal: Some(ALICE),
            cluster: Some("east"),
        };
        let central = Peer {
            principal: Some(ALICE),
            cluster: Some("central"),
        };
        assert!(decide(&[&p], &east, 80, Some(&get("/api/v1/x", &h))).allowed);
        assert!(
            !decide(&[&p], &central, 80, Some(&get("/api/v1/x", &h))).allowed,
            "cluster not listed"
        );
        assert!(
            !decide(&[&p], &east, 80, Some(&get("/admin", &h))).allowed,
            "path not listed"
        );
        // Every value of a repeated header must be allowed.
        let mut red = http::HeaderMap::new();
        red.append("x-tenant", "blue".parse().expect("value"));
        red.append("x-tenant", "red".parse().expect("value"));
        assert!(!decide(&[&p], &east, 80, Some(&get("/api/v1/x", &red))).allowed);
        let anon = Peer {
            principal: None,
            cluster: None,
        };
        assert!(
            !decide(&[&p], &anon, 80, Some(&get("/api/v1/x", &h))).allowed,
            "no identity, no match"
        );
    }

    #[test]
    fn deny_beats_allow_and_not_values_check_every_header_value() {
        let allow = policy("rules: [{}]");
        let deny = policy(
            r#"
action: DENY
rules: [{when: [{key: "request.headers[x-role]", notValues: [admin]}], to: [{operation: {paths: ["/admin/*"]}}]}]
"#,
        );
        let peer = Peer {
            principal: Some(ALICE),
            cluster: Some("east"),
        };
        let mut h = http::HeaderMap::new();
        h.append("x-role", "admin".parse().expect("value"));
        h.append("x-role", "guest".parse().expect("value"));
        let d = decide(&[&allow, &deny], &peer, 80, Some(&get("/admin/x", &h)));
        assert!(!d.allowed, "a guest value among admin ones is still denied: {d:?}");
        let mut admin = http::HeaderMap::new();
        admin.insert("x-role", "admin".parse().expect("value"));
        assert!(decide(&[&allow, &deny], &peer, 80, Some(&get("/admin/x", &admin))).allowed);
    }

    #[test]
    fn http_rules_fail_closed_for_tcp() {
        let allow = policy("rules: [{to: [{operation: {methods: [GET]}}]}]");
        let peer = Peer {
            principal: Some(ALICE),
            cluster: Some("east"),
        };
        assert!(
            !decide(&[&allow], &peer, 7000, None).allowed,
            "an ALLOW on methods never allows TCP"
        );
        let deny =
            policy("action: DENY\nrules: [{from: [{source: {clusters: [west]}}], to: [{operation: {paths: [/x]}}]}]");
        let west = Peer {
            principal: Some(ALICE),
            cluster: Some("west"),
        };
        assert!(
            !decide(&[&deny], &west, 7000, None).allowed,
            "a DENY on paths denies TCP from west"
        );
        assert!(decide(&[&deny], &peer, 7000, None).allowed);
    }

    #[test]
    fn audit_only_counts_and_an_empty_allow_denies_all() {
        let audit = policy("action: AUDIT\nrules: [{}]");
        let peer = Peer {
            principal: Some(ALICE),
            cluster: Some("east"),
        };
        let h = http::HeaderMap::new();
        let d = decide(&[&audit], &peer, 80, Some(&get("/", &h)));
        assert!(d.allowed && d.audited.len() == 1);
        let deny_all = policy("{}");
        assert!(!decide(&[&deny_all], &peer, 80, Some(&get("/", &h))).allowed);
    }

    #[test]
    fn the_gateway_decides_only_source_rules() {
        let by_cluster = policy("action: DENY\nrules: [{from: [{source: {clusters: [west]}}]}]");
        let by_path = policy(
            "action: DENY\nrules: [{from: [{source: {clusters: [west]}}], to: [{operation: {paths: [/admin]}}]}]",
        );
        let west = Peer {
            principal: Some(ALICE),
            cluster: Some("west"),
        };
        let east = Peer {
            principal: Some(ALICE),
            cluster: Some("east"),
        };
        assert_eq!(gateway_denies(&[&by_cluster], &west), Some(("demo/p".into(), 0)));
        assert_eq!(gateway_denies(&[&by_cluster], &east), None);
        assert_eq!(
            gateway_denies(&[&by_path], &west),
            None,
            "left to the sidecar, which sees the path"
        );
    }

    #[test]
    fn a_caller_may_call_unless_every_workload_refuses_it_every_request() {
        let peer = |sa: &'static str, cluster: &'static str| Peer {
            principal: Some(sa),
            cluster: Some(cluster),
        };
        let alice = peer(ALICE, "east");
        let bob = peer("spiffe://mesh.local/ns/web/sa/bob", "east");
        let from_west = peer(ALICE, "west");
        let may = |ps: &[(&CompiledAuthz, Reach)], who: &Peer<'_>| may_call(ps, who);
        assert!(may(&[], &alice), "no policy: everyone");
        // An ALLOW naming alice (and a path: some request of hers passes).
        let allow_alice = policy(&format!(
            "targetRefs: [{{kind: Service, name: greeter}}]\nrules: [{{from: [{{source: {{principals: [\"{ALICE}\"]}}}}], to: [{{operation: {{paths: [/api]}}}}]}}]"
        ));
        let every = |p| (p, Reach::Every);
        assert!(may(&[every(&allow_alice)], &alice));
        assert!(
            !may(&[every(&allow_alice)], &bob),
            "bound by an ALLOW that never names bob"
        );
        // A selector ALLOW may cover only some workloads: the others have no ALLOW, so bob may.
        assert!(may(&[(&allow_alice, Reach::Some)], &bob));
        // ... but with an ALLOW over every workload, a selector ALLOW naming bob is his way in.
        let allow_web =
            policy("selector: {matchLabels: {app: greeter}}\nrules: [{from: [{source: {namespaces: [web]}}]}]");
        assert!(may(&[every(&allow_alice), (&allow_web, Reach::Some)], &bob));
        // Source conditions count; request ones are taken as some request's.
        let when_cluster = policy(
            "rules: [{when: [{key: source.cluster, values: [east]}, {key: \"request.headers[x-a]\", values: [b]}]}]",
        );
        assert!(may(&[every(&when_cluster)], &alice));
        assert!(!may(&[every(&when_cluster)], &from_west));
        // An ALLOW with no rules allows nothing.
        let nothing = policy("action: ALLOW");
        assert!(!may(&[every(&nothing)], &alice));
        // A DENY of west's callers refuses them everything; one that names a path does not.
        let deny_west = policy("action: DENY\nrules: [{from: [{source: {clusters: [west]}}]}]");
        assert!(!may(&[every(&deny_west)], &from_west));
        assert!(may(&[every(&deny_west)], &alice));
        assert!(
            may(&[(&deny_west, Reach::Some)], &from_west),
            "maybe not every workload"
        );
        let deny_path = policy(
            "action: DENY\nrules: [{from: [{source: {clusters: [west]}}], to: [{operation: {paths: [/admin]}}]}]",
        );
        assert!(may(&[every(&deny_path)], &from_west));
        let deny_port = policy("action: DENY\nrules: [{when: [{key: destination.port, values: [\"8080\"]}]}]");
        assert!(may(&[every(&deny_port)], &alice), "another port may be open");
        let deny_all = policy("action: DENY\nrules: [{}]");
        assert!(!may(&[every(&deny_all)], &alice));
        // AUDIT decides nothing.
        let audit = policy("action: AUDIT\nrules: [{}]");
        assert!(may(&[every(&audit)], &bob));
    }

    #[test]
    fn how_far_a_policy_reaches_by_service_name() {
        let targeted = policy("targetRefs: [{kind: Service, name: greeter}]\nrules: [{}]");
        assert_eq!(reach(&targeted, "greeter", "demo"), Reach::Every);
        assert_eq!(reach(&targeted, "echo", "demo"), Reach::None);
        assert_eq!(reach(&targeted, "greeter", "web"), Reach::None, "another namespace");
        let selected = policy("selector: {matchLabels: {app: greeter}}\nrules: [{}]");
        assert_eq!(reach(&selected, "greeter", "demo"), Reach::Some);
        let whole = policy("rules: [{}]");
        assert_eq!(reach(&whole, "echo", "demo"), Reach::Every);
        let spec: AuthorizationPolicySpec = serde_yaml::from_str("rules: [{}]").expect("yaml");
        let root = compile_authz(ROOT_NAMESPACE, "mesh-wide", &spec).expect("compiles");
        assert_eq!(
            reach(&root, "echo", "web"),
            Reach::Every,
            "the root namespace's reach the mesh"
        );
        let labels = BTreeMap::from([("app".to_string(), "greeter".to_string())]);
        assert!(applies(&selected, "greeter", "demo", &labels));
        assert!(!applies(&selected, "greeter", "demo", &BTreeMap::new()));
        // With the workloads' label sets known, a selector reaches all, some or none of them.
        let v2 = BTreeMap::from([
            ("app".to_string(), "greeter".to_string()),
            ("version".to_string(), "v2".to_string()),
        ]);
        let echo = BTreeMap::from([("app".to_string(), "echo".to_string())]);
        assert_eq!(
            reach_over(&selected, "greeter", "demo", &[labels.clone(), v2.clone()]),
            Reach::Every
        );
        assert_eq!(
            reach_over(&selected, "greeter", "demo", &[labels.clone(), echo.clone()]),
            Reach::Some
        );
        assert_eq!(
            reach_over(&selected, "echo", "demo", std::slice::from_ref(&echo)),
            Reach::None
        );
        assert_eq!(reach_over(&selected, "greeter", "demo", &[]), Reach::Some, "not known");
        assert_eq!(reach_over(&selected, "greeter", "web", &[labels]), Reach::None);
        assert_eq!(
            reach_over(&targeted, "greeter", "demo", &[echo]),
            Reach::Every,
            "not a selector"
        );
    }

    #[test]
    fn paths_normalize_once() {
        for (raw, want) in [
            ("/a//b", "/a/b"),
            ("/admin%2Fsecret", "/admin/secret"),
            ("/admin%5csecret", "/admin/secret"),
            ("/public/../admin/", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/a?x=/admin", "/a"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        assert!(normalize_path("/a%00b").is_err());
        assert!(normalize_path("/a%zz").is_err());
    }

    #[test]
    fn bad_fields_are_named() {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(
            "action: PERMIT\nrules: [{to: [{operation: {paths: ['/a/{**}/b'], ports: [http]}}], when: [{key: request.auth, values: [x]}]}]",
        )
        .expect("yaml");
        let errors = compile_authz("demo", "p", &spec).expect_err("refused");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.action",
            "spec.rules[0].to[0].operation.paths[0]",
            "spec.rules[0].to[0].operation.ports[0]",
            "spec.rules[0].when[0].key",
        ] {
            assert!(fields.contains(&f), "{f} not in {fields:?}");
        }
    }
}
