//! An `HTTPRoute` checked and compiled once, when config arrives: regexes built, durations
//! parsed, weights summed, backends looked up. Every problem is reported at once with its field
//! path and the fix. Errors of the route itself set `Accepted=False` (the route is not used;
//! the last good version keeps serving); a backend that does not resolve sets
//! `ResolvedRefs=False` and only that backend's share of traffic fails (500, as Gateway API
//! asks), while the rest of the route serves.

use std::time::Duration;

use regex::Regex;

use super::spec::{
    BackendObjectRef, FilterType, HeaderModifier, HttpRouteFilter, HttpRouteRule, HttpRouteSpec, PathMatchType,
    PathModifierType, RequestMirror, RequestRedirect, StringMatchType, UrlRewrite, ValueMatch,
};

/// Gateway API's limits on one route.
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 16;
const MAX_BACKENDS: usize = 16;
const MAX_WEIGHT: u32 = 1_000_000;
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";

/// What a route may attach to or send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// This cluster's endpoints of the service.
    Service,
    /// The service's endpoints in every cluster of the clusterset.
    ServiceImport,
}

/// What the catalog says of a backend reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendLookup {
    Found,
    NoSuchService,
    NoSuchPort,
    /// The port exists but is declared `tcp`: HTTP routing cannot apply.
    NotHttp,
}

/// Which Gateway API condition an error sets, with its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteErrorKind {
    /// `Accepted=False`, reason `UnsupportedValue`: the route is not used.
    Invalid,
    /// `Accepted=False`, reason `NotAllowedByListeners`-like: the parent cannot take the route.
    InvalidParent,
    /// `ResolvedRefs=False`, reason `InvalidKind`.
    InvalidKind,
    /// `ResolvedRefs=False`, reason `BackendNotFound`: that backend's share answers 500.
    BackendNotFound,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct RouteError {
    pub field: String,
    pub kind: RouteErrorKind,
    pub message: String,
}

impl RouteError {
    fn new(field: impl Into<String>, kind: RouteErrorKind, message: impl Into<String>) -> Self {
        RouteError {
            field: field.into(),
            kind,
            message: message.into(),
        }
    }

    /// The condition type and reason this error sets on the route's status.
    pub fn condition(&self) -> (&'static str, &'static str) {
        match self.kind {
            RouteErrorKind::Invalid => ("Accepted", "UnsupportedValue"),
            RouteErrorKind::InvalidParent => ("Accepted", "NoMatchingParent"),
            RouteErrorKind::InvalidKind => ("ResolvedRefs", "InvalidKind"),
            RouteErrorKind::BackendNotFound => ("ResolvedRefs", "BackendNotFound"),
        }
    }

    /// Whether the route cannot be used at all (as opposed to one backend failing).
    pub fn rejects_route(&self) -> bool {
        matches!(self.kind, RouteErrorKind::Invalid | RouteErrorKind::InvalidParent)
    }
}

#[derive(Clone, Debug)]
pub enum PathRule {
    Exact(String),
    /// Matches the prefix on path-segment boundaries: `/foo` takes `/foo`, `/foo/`, `/foo/bar`,
    /// not `/foobar`. Stored without its trailing slash (`/` is the empty prefix).
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub enum ValueRule {
    Exact(String),
    Regex(Regex),
}

impl ValueRule {
    pub fn accepts(&self, v: &str) -> bool {
        match self {
            ValueRule::Exact(want) => v == want,
            ValueRule::Regex(re) => re.is_match(v),
        }
    }
}

/// One match of a rule: everything in it must hold.
#[derive(Clone, Debug)]
pub struct CompiledMatch {
    pub path: PathRule,
    /// Header names lowercased.
    pub headers: Vec<(String, ValueRule)>,
    pub query: Vec<(String, ValueRule)>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: TargetKind,
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub target: Target,
    pub weight: u32,
    /// False: the reference does not resolve, and requests sent its way get 500.
    pub resolved: bool,
    pub request_headers: Option<HeaderModifier>,
}

#[derive(Clone, Debug)]
pub struct Mirror {
    pub target: Target,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub name: Option<String>,
    pub matches: Vec<CompiledMatch>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<RequestRedirect>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
    pub backends: Vec<Backend>,
    pub total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry_codes: Vec<u16>,
    pub retry_attempts: Option<u32>,
    pub retry_backoff: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct CompiledRoute {
    pub namespace: String,
    pub name: String,
    pub parents: Vec<Target>,
    pub rules: Vec<CompiledRule>,
}

/// Parses a Gateway API duration (`1h`, `1m30s`, `250ms`: one to four numbers of up to five
/// digits, each with a unit h, m, s or ms).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 500ms, 10s or 1m30s");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

fn target_kind(group: Option<&str>, kind: Option<&str>) -> Option<TargetKind> {
    match (group.unwrap_or(""), kind.unwrap_or("Service")) {
        ("", "Service") => Some(TargetKind::Service),
        (MCS_GROUP, "ServiceImport") => Some(TargetKind::ServiceImport),
        _ => None,
    }
}

/// The services a route (in `namespace`) is for and the services it sends to, as `ns/name`:
/// its Service and ServiceImport parents, and its backends and mirrors. A proxy given a
/// parent must be given the backends too, or the route's requests meet a backend it does not
/// know (a proxy scoped to some namespaces, say).
pub fn route_services(namespace: &str, spec: &HttpRouteSpec) -> (Vec<String>, Vec<String>) {
    let key = |group: Option<&str>, kind: Option<&str>, ns: Option<&str>, name: &str| {
        target_kind(group, kind).map(|_| format!("{}/{name}", ns.unwrap_or(namespace)))
    };
    let parents = spec
        .parent_refs
        .iter()
        .filter_map(|p| key(p.group.as_deref(), p.kind.as_deref(), p.namespace.as_deref(), &p.name))
        .collect();
    let object = |b: &BackendObjectRef| key(b.group.as_deref(), b.kind.as_deref(), b.namespace.as_deref(), &b.name);
    let mirrors = |filters: &[HttpRouteFilter]| -> Vec<String> {
        filters
            .iter()
            .filter_map(|f| f.request_mirror.as_ref())
            .filter_map(|m| object(&m.backend_ref))
            .collect()
    };
    let mut backends = vec![];
    for rule in &spec.rules {
        backends.extend(mirrors(&rule.filters));
        for b in &rule.backend_refs {
            backends.extend(object(&b.object()));
            backends.extend(mirrors(&b.filters));
        }
    }
    (parents, backends)
}

/// Checks and compiles `spec` (the route `namespace/name`). `lookup` answers whether a
/// backend exists in the catalog. Returns the compiled route unless an error rejects it, and
/// every error found.
pub fn compile_route(
    namespace: &str,
    name: &str,
    spec: &HttpRouteSpec,
    lookup: &dyn Fn(&Target) -> BackendLookup,
) -> (Option<CompiledRoute>, Vec<RouteError>) {
    let mut errors = vec![];
    let mut parents = vec![];
    if spec.parent_refs.is_empty() {
        errors.push(RouteError::new(
            "parentRefs",
            RouteErrorKind::InvalidParent,
            "name the Service or ServiceImport this route is for, e.g. [{kind: Service, name: greeter}]",
        ));
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        match target_kind(p.group.as_deref(), p.kind.as_deref()) {
            Some(kind) => parents.push(Target {
                kind,
                namespace: p.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                name: p.name.clone(),
                port: p.port,
            }),
            None => errors.push(RouteError::new(
                format!("parentRefs[{i}].kind"),
                RouteErrorKind::InvalidParent,
                "a mesh route's parent is a Service (group \"\") or a ServiceImport (group multicluster.x-k8s.io)",
            )),
        }
    }
    if spec.rules.len() > MAX_RULES {
        errors.push(RouteError::new(
            "rules",
            RouteErrorKind::Invalid,
            format!("{} rules; a route has at most {MAX_RULES}", spec.rules.len()),
        ));
    }
    let rules: Vec<CompiledRule> = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| compile_rule(namespace, &format!("rules[{i}]"), r, lookup, &mut errors))
        .collect();
    let route = (!errors.iter().any(RouteError::rejects_route)).then(|| CompiledRoute {
        namespace: namespace.to_string(),
        name: name.to_string(),
        parents,
        rules,
    });
    (route, errors)
}

fn invalid(errors: &mut Vec<RouteError>, field: String, message: impl Into<String>) {
    errors.push(RouteError::new(field, RouteErrorKind::Invalid, message));
}

fn regex(errors: &mut Vec<RouteError>, field: String, pattern: &str) -> Regex {
    // Anchored: the whole value must match, as Gateway API's RE2 matches are full matches.
    match Regex::new(&format!("^(?:{pattern})$")) {
        Ok(re) => re,
        Err(e) => {
            invalid(
                errors,
                field,
                format!("{pattern:?} is not a valid regular expression: {e}"),
            );
            Regex::new("$^").expect("the never-matching pattern compiles")
        }
    }
}

fn value_rules(
    errors: &mut Vec<RouteError>,
    field: &str,
    list: &[ValueMatch],
    lowercase: bool,
) -> Vec<(String, ValueRule)> {
    list.iter()
        .enumerate()
        .map(|(k, v)| {
            if v.name.is_empty() || !v.name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                invalid(
                    errors,
                    format!("{field}[{k}].name"),
                    format!("{:?} is not a valid name", v.name),
                );
            }
            let rule = match v.kind {
                StringMatchType::Exact => ValueRule::Exact(v.value.clone()),
                StringMatchType::RegularExpression => {
                    ValueRule::Regex(regex(errors, format!("{field}[{k}].value"), &v.value))
                }
            };
            let name = if lowercase {
                v.name.to_ascii_lowercase()
            } else {
                v.name.clone()
            };
            (name, rule)
        })
        .collect()
}

fn compile_rule(
    namespace: &str,
    at: &str,
    r: &HttpRouteRule,
    lookup: &dyn Fn(&Target) -> BackendLookup,
    errors: &mut Vec<RouteError>,
) -> CompiledRule {
    if r.matches.len() > MAX_MATCHES {
        invalid(
            errors,
            format!("{at}.matches"),
            format!("at most {MAX_MATCHES} matches per rule"),
        );
    }
    let mut matches: Vec<CompiledMatch> = r
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let field = format!("{at}.matches[{j}]");
            let path = match &m.path {
                None => PathRule::Prefix(String::new()),
                Some(p) => {
                    if p.kind != PathMatchType::RegularExpression && !p.value.starts_with('/') {
                        invalid(
                            errors,
                            format!("{field}.path.value"),
                            format!("{:?} must start with /", p.value),
                        );
                    }
                    match p.kind {
                        PathMatchType::Exact => PathRule::Exact(p.value.clone()),
                        PathMatchType::PathPrefix => PathRule::Prefix(p.value.trim_end_matches('/').to_string()),
                        PathMatchType::RegularExpression => {
                            PathRule::Regex(regex(errors, format!("{field}.path.value"), &p.value))
                        }
                    }
                }
            };
            if let Some(method) = &m.method {
                if !METHODS.contains(&method.as_str()) {
                    invalid(
                        errors,
                        format!("{field}.method"),
                        format!("{method:?} is not one of {}", METHODS.join(", ")),
                    );
                }
            }
            CompiledMatch {
                path,
                headers: value_rules(errors, &format!("{field}.headers"), &m.headers, true),
                query: value_rules(errors, &format!("{field}.queryParams"), &m.query_params, false),
                method: m.method.clone(),
            }
        })
        .collect();
    if matches.is_empty() {
        matches.push(CompiledMatch {
            path: PathRule::Prefix(String::new()),
            headers: vec![],
            query: vec![],
            method: None,
        });
    }
    let mut rule = CompiledRule {
        name: r.name.clone(),
        matches,
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        mirrors: vec![],
        backends: vec![],
        total_weight: 0,
        request_timeout: None,
        backend_timeout: None,
        retry_codes: vec![],
        retry_attempts: None,
        retry_backoff: None,
    };
    for (k, f) in r.filters.iter().enumerate() {
        filter(
            namespace,
            &format!("{at}.filters[{k}]"),
            f,
            &mut rule,
            r,
            lookup,
            errors,
        );
    }
    if rule.redirect.is_some() && rule.rewrite.is_some() {
        invalid(
            errors,
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite cannot be in the same rule",
        );
    }
    if r.backend_refs.len() > MAX_BACKENDS {
        invalid(
            errors,
            format!("{at}.backendRefs"),
            format!("at most {MAX_BACKENDS} backends per rule"),
        );
    }
    for (k, b) in r.backend_refs.iter().enumerate() {
        let field = format!("{at}.backendRefs[{k}]");
        let weight = b.weight.unwrap_or(1);
        if weight > MAX_WEIGHT {
            invalid(
                errors,
                format!("{field}.weight"),
                format!("{weight} is over the maximum of {MAX_WEIGHT}"),
            );
        }
        let Some(target) = resolve(namespace, &field, &b.object(), lookup, errors) else {
            continue;
        };
        let request_headers = b
            .filters
            .iter()
            .find(|f| f.kind == FilterType::RequestHeaderModifier)
            .and_then(|f| f.request_header_modifier.clone());
        rule.total_weight += weight as u64;
        rule.backends.push(Backend {
            resolved: lookup(&target) == BackendLookup::Found,
            target,
            weight,
            request_headers,
        });
    }
    if !r.backend_refs.is_empty() && r.backend_refs.iter().all(|b| b.weight == Some(0)) {
        invalid(
            errors,
            format!("{at}.backendRefs"),
            "the weights add up to zero: give at least one backend a weight above 0",
        );
    }
    if let Some(t) = &r.timeouts {
        let mut parse = |name: &str, v: &Option<String>| {
            v.as_ref().and_then(|v| match parse_duration(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    invalid(errors, format!("{at}.timeouts.{name}"), e);
                    None
                }
            })
        };
        let request = parse("request", &t.request);
        let backend = parse("backendRequest", &t.backend_request);
        if let (Some(req), Some(be)) = (request, backend) {
            if !req.is_zero() && be > req {
                invalid(
                    errors,
                    format!("{at}.timeouts.backendRequest"),
                    format!("{be:?} is longer than timeouts.request ({req:?}); make it at most that"),
                );
            }
        }
        rule.request_timeout = request.filter(|d| !d.is_zero());
        rule.backend_timeout = backend.filter(|d| !d.is_zero());
    }
    if let Some(retry) = &r.retry {
        for (k, c) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(c) {
                invalid(
                    errors,
                    format!("{at}.retry.codes[{k}]"),
                    format!("{c} is not a retriable status (400-599)"),
                );
            }
        }
        rule.retry_codes = retry.codes.clone();
        rule.retry_attempts = retry.attempts;
        rule.retry_backoff = retry.backoff.as_ref().and_then(|b| match parse_duration(b) {
            Ok(d) => Some(d),
            Err(e) => {
                invalid(errors, format!("{at}.retry.backoff"), e);
                None
            }
        });
    }
    rule
}

/// Resolves a backend or mirror reference; `None` (with an error) when its kind is not one a
/// mesh route can send to.
fn resolve(
    namespace: &str,
    field: &str,
    r: &BackendObjectRef,
    lookup: &dyn Fn(&Target) -> BackendLookup,
    errors: &mut Vec<RouteError>,
) -> Option<Target> {
    let Some(kind) = target_kind(r.group.as_deref(), r.kind.as_deref()) else {
        errors.push(RouteError::new(
            format!("{field}.kind"),
            RouteErrorKind::InvalidKind,
            "a backend is a Service (group \"\") or a ServiceImport (group multicluster.x-k8s.io)",
        ));
        return None;
    };
    let port = r.port;
    let target = Target {
        kind,
        namespace: r.namespace.as_deref().unwrap_or(namespace).to_string(),
        name: r.name.clone(),
        port,
    };
    match lookup(&target) {
        BackendLookup::Found => {}
        BackendLookup::NoSuchService => errors.push(RouteError::new(
            format!("{field}.name"),
            RouteErrorKind::BackendNotFound,
            format!(
                "{}/{} is not in the catalog (see `strait services`)",
                target.namespace, target.name
            ),
        )),
        BackendLookup::NoSuchPort => errors.push(RouteError::new(
            format!("{field}.port"),
            RouteErrorKind::BackendNotFound,
            format!(
                "{}/{} has no port {}",
                target.namespace,
                target.name,
                port.unwrap_or_default()
            ),
        )),
        BackendLookup::NotHttp => errors.push(RouteError::new(
            format!("{field}.port"),
            RouteErrorKind::Invalid,
            format!(
                "{}/{} serves that port as tcp: an HTTPRoute cannot route it (declare the port http or grpc)",
                target.namespace, target.name
            ),
        )),
    }
    Some(target)
}

fn filter(
    namespace: &str,
    field: &str,
    f: &HttpRouteFilter,
    rule: &mut CompiledRule,
    r: &HttpRouteRule,
    lookup: &dyn Fn(&Target) -> BackendLookup,
    errors: &mut Vec<RouteError>,
) {
    let missing = |errors: &mut Vec<RouteError>, key: &str| {
        invalid(
            errors,
            format!("{field}.{key}"),
            format!("type {:?} needs its settings in `{key}`", f.kind),
        );
    };
    match f.kind {
        FilterType::RequestHeaderModifier => match &f.request_header_modifier {
            Some(m) => rule.request_headers = Some(m.clone()),
            None => missing(errors, "requestHeaderModifier"),
        },
        FilterType::ResponseHeaderModifier => match &f.response_header_modifier {
            Some(m) => rule.response_headers = Some(m.clone()),
            None => missing(errors, "responseHeaderModifier"),
        },
        FilterType::RequestRedirect => match &f.request_redirect {
            Some(redirect) => {
                if let Some(code) = redirect.status_code {
                    if ![301, 302, 303, 307, 308].contains(&code) {
                        invalid(
                            errors,
                            format!("{field}.requestRedirect.statusCode"),
                            format!("{code} is not a redirect (301, 302, 303, 307, 308)"),
                        );
                    }
                }
                check_path_modifier(
                    errors,
                    &format!("{field}.requestRedirect.path"),
                    redirect.path.as_ref(),
                    r,
                );
                rule.redirect = Some(redirect.clone());
            }
            None => missing(errors, "requestRedirect"),
        },
        FilterType::UrlRewrite => match &f.url_rewrite {
            Some(rewrite) => {
                check_path_modifier(errors, &format!("{field}.urlRewrite.path"), rewrite.path.as_ref(), r);
                rule.rewrite = Some(rewrite.clone());
            }
            None => missing(errors, "urlRewrite"),
        },
        FilterType::RequestMirror => match &f.request_mirror {
            Some(m) => mirror(namespace, field, m, rule, lookup, errors),
            None => missing(errors, "requestMirror"),
        },
    }
}

fn check_path_modifier(
    errors: &mut Vec<RouteError>,
    field: &str,
    path: Option<&super::spec::PathModifier>,
    r: &HttpRouteRule,
) {
    let Some(p) = path else { return };
    match p.kind {
        PathModifierType::ReplaceFullPath if p.replace_full_path.is_none() => {
            invalid(errors, format!("{field}.replaceFullPath"), "give the path to use");
        }
        PathModifierType::ReplacePrefixMatch => {
            if p.replace_prefix_match.is_none() {
                invalid(errors, format!("{field}.replacePrefixMatch"), "give the prefix to use");
            }
            let prefix_only = !r.matches.is_empty()
                && r.matches
                    .iter()
                    .all(|m| m.path.as_ref().is_none_or(|p| p.kind == PathMatchType::PathPrefix));
            if !prefix_only {
                invalid(
                    errors,
                    format!("{field}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                );
            }
        }
        _ => {}
    }
}

fn mirror(
    namespace: &str,
    field: &str,
    m: &RequestMirror,
    rule: &mut CompiledRule,
    lookup: &dyn Fn(&Target) -> BackendLookup,
    errors: &mut Vec<RouteError>,
) {
    let per_million = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            invalid(
                errors,
                format!("{field}.requestMirror"),
                "give percent or fraction, not both",
            );
            0
        }
        (Some(p), None) if p <= 100 => p * 10_000,
        (Some(p), None) => {
            invalid(
                errors,
                format!("{field}.requestMirror.percent"),
                format!("{p} is over 100"),
            );
            0
        }
        (None, Some(f)) if f.denominator > 0 && f.numerator <= f.denominator => {
            (f.numerator as u64 * 1_000_000 / f.denominator as u64) as u32
        }
        (None, Some(_)) => {
            invalid(
                errors,
                format!("{field}.requestMirror.fraction"),
                "the numerator must be at most the denominator, and the denominator above 0",
            );
            0
        }
        (None, None) => 1_000_000,
    };
    if let Some(target) = resolve(
        namespace,
        &format!("{field}.requestMirror.backendRef"),
        &m.backend_ref,
        lookup,
        errors,
    ) {
        rule.mirrors.push(Mirror { target, per_million });
    }
}

#[cfg(test)]
mod route_services_tests {
    use super::*;

    #[test]
    fn a_route_names_its_parents_and_every_service_it_sends_to() {
        let spec: HttpRouteSpec = serde_yaml::from_str(
            r#"
parentRefs:
  - {name: front}
  - {group: multicluster.x-k8s.io, kind: ServiceImport, name: front, namespace: web}
  - {group: gateway.networking.k8s.io, kind: Gateway, name: ingress}
rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, namespace: audit}}}]
    backendRefs:
      - {name: front-v1, port: 80}
      - {group: multicluster.x-k8s.io, kind: ServiceImport, name: echo, namespace: demo, port: 80}
      - {kind: Bucket, group: storage.example.com, name: not-a-service}
  - backendRefs: [{name: front-v2, port: 80}]
"#,
        )
        .unwrap();
        let (parents, backends) = route_services("web", &spec);
        assert_eq!(parents, ["web/front", "web/front"]);
        assert_eq!(backends, ["audit/shadow", "web/front-v1", "demo/echo", "web/front-v2"]);
    }
}
