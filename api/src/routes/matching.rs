//! Which rule a request takes, and which backend serves it.
//!
//! The routes attached to one destination are flattened into one table of (route, rule, match)
//! entries, sorted once by Gateway API's precedence: an Exact path beats a PathPrefix, a longer
//! prefix beats a shorter one (a regular expression comes after both), then a method match,
//! then more header matches, then more query matches. Ties keep the order the routes were
//! given in (oldest first, then namespace/name) and, within a route, rule and match order. A
//! request takes the first entry that matches it.

use std::sync::Arc;

use super::compile::{Backend, CompiledMatch, CompiledRoute, CompiledRule, PathRule};

/// What matching reads of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path without its query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug)]
struct Entry {
    route: Arc<CompiledRoute>,
    rule: usize,
    matched: usize,
}

/// The routes of one destination, ready to match.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
}

/// Precedence of a match: larger sorts first.
fn rank(m: &CompiledMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        PathRule::Exact(p) => (3, p.len()),
        PathRule::Prefix(p) => (2, p.len()),
        // Among regexes (implementation-specific in Gateway API) the longer pattern first: a
        // GRPCRoute's method-only match (`/[^/]+/Check`) beats its catch-all (`/.*`).
        PathRule::Regex(re) => (1, re.as_str().len()),
    };
    (kind, len, m.method.is_some(), m.headers.len(), m.query.len())
}

impl RouteTable {
    /// `routes` in tie-break order: oldest first, then by namespace/name.
    pub fn new(routes: &[Arc<CompiledRoute>]) -> Self {
        let mut entries: Vec<Entry> = routes
            .iter()
            .flat_map(|route| {
                route.rules.iter().enumerate().flat_map(move |(rule, r)| {
                    (0..r.matches.len()).map(move |matched| Entry {
                        route: route.clone(),
                        rule,
                        matched,
                    })
                })
            })
            .collect();
        // Stable: equal ranks keep route, rule and match order.
        entries.sort_by(|a, b| {
            let ra = rank(&a.route.rules[a.rule].matches[a.matched]);
            let rb = rank(&b.route.rules[b.rule].matches[b.matched]);
            rb.cmp(&ra)
        });
        RouteTable { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The route and rule `req` takes, if any.
    pub fn route(&self, req: &RequestView<'_>) -> Option<(&Arc<CompiledRoute>, &CompiledRule)> {
        self.explain(req).map(|(route, rule, _)| (route, rule))
    }

    /// The route, rule and match `req` takes (for `strait route explain`).
    pub fn explain(&self, req: &RequestView<'_>) -> Option<(&Arc<CompiledRoute>, &CompiledRule, &CompiledMatch)> {
        self.entries
            .iter()
            .find(|e| matches(&e.route.rules[e.rule].matches[e.matched], req))
            .map(|e| {
                let rule = &e.route.rules[e.rule];
                (&e.route, rule, &rule.matches[e.matched])
            })
    }
}

fn path_matches(rule: &PathRule, path: &str) -> bool {
    match rule {
        PathRule::Exact(p) => path == p,
        // The stored prefix has no trailing slash ("" for "/").
        PathRule::Prefix(p) => {
            path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathRule::Regex(re) => re.is_match(path),
    }
}

fn matches(m: &CompiledMatch, req: &RequestView<'_>) -> bool {
    if !path_matches(&m.path, req.path) {
        return false;
    }
    if m.method.as_deref().is_some_and(|want| want != req.method) {
        return false;
    }
    // A header match holds if any value of a repeated header matches.
    let headers_ok = m.headers.iter().all(|(name, rule)| {
        req.headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| rule.accepts(v)))
    });
    if !headers_ok {
        return false;
    }
    m.query.iter().all(|(name, rule)| {
        // Gateway API: with a repeated parameter, the first value counts.
        req.query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .find(|(k, _)| k == name)
            .is_some_and(|(_, v)| rule.accepts(v))
    })
}

/// Picks a backend by weight with `r` (uniform over u64); `None` when the rule has no backend
/// with a weight above 0.
pub fn pick_backend(rule: &CompiledRule, r: u64) -> Option<&Backend> {
    if rule.total_weight == 0 {
        return None;
    }
    let mut point = r % rule.total_weight;
    for b in &rule.backends {
        if point < b.weight as u64 {
            return Some(b);
        }
        point -= b.weight as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::compile::{compile_route, BackendLookup, RouteErrorKind, Target, TargetKind};
    use super::super::spec::HttpRouteSpec;
    use super::*;

    fn found(_: &Target) -> BackendLookup {
        BackendLookup::Found
    }

    fn route(yaml: &str) -> Arc<CompiledRoute> {
        let spec: HttpRouteSpec = serde_yaml::from_str(yaml).unwrap();
        let (route, errors) = compile_route("demo", "r", &spec, &found);
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(route.unwrap())
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a http::HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            headers,
        }
    }

    const CANARY: &str = r#"
parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter}]
rules:
  - name: canary-by-header
    matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: greeter-v2, port: 80}]
  - name: api
    matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: greeter-api, port: 80}]
  - name: exact-health
    matches: [{path: {type: Exact, value: /api/health}, method: GET}]
    backendRefs: [{name: health, port: 80}]
  - name: split
    backendRefs:
      - {name: greeter, port: 80, weight: 90}
      - {group: multicluster.x-k8s.io, kind: ServiceImport, name: greeter-v2, port: 80, weight: 10}
"#;

    #[test]
    fn gateway_api_precedence_picks_the_most_specific_match() {
        let table = RouteTable::new(&[route(CANARY)]);
        let h = http::HeaderMap::new();
        let rule_of = |r: &RequestView<'_>| table.route(r).map(|(_, rule)| rule.name.clone().unwrap());
        // Exact beats any prefix, though it is listed later.
        assert_eq!(
            rule_of(&req("GET", "/api/health", None, &h)).as_deref(),
            Some("exact-health")
        );
        // The exact match needs its method.
        assert_eq!(rule_of(&req("POST", "/api/health", None, &h)).as_deref(), Some("api"));
        // The longer prefix (/api) beats the header rule's implicit prefix "/".
        let mut canary = http::HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        assert_eq!(rule_of(&req("GET", "/api/x", None, &canary)).as_deref(), Some("api"));
        // Same prefix length ("/"): more header matches win over the split.
        assert_eq!(
            rule_of(&req("GET", "/", None, &canary)).as_deref(),
            Some("canary-by-header")
        );
        assert_eq!(rule_of(&req("GET", "/", None, &h)).as_deref(), Some("split"));
        // PathPrefix matches on segment boundaries.
        assert_eq!(rule_of(&req("GET", "/apiary", None, &h)).as_deref(), Some("split"));
        assert_eq!(rule_of(&req("GET", "/api/", None, &h)).as_deref(), Some("api"));
    }

    #[test]
    fn weights_split_traffic_as_written() {
        let r = route(CANARY);
        let split = &r.rules[3];
        assert_eq!(split.total_weight, 100);
        let mut counts = [0u32; 2];
        for i in 0..1000u64 {
            let b = pick_backend(split, i).unwrap();
            counts[usize::from(b.target.kind == TargetKind::ServiceImport)] += 1;
        }
        assert_eq!(counts, [900, 100]);
        assert_eq!(split.backends[0].target.kind, TargetKind::Service);
    }

    #[test]
    fn query_regex_and_repeated_headers() {
        let r = route(
            r#"
parentRefs: [{name: greeter}]
rules:
  - matches:
      - path: {type: RegularExpression, value: "/users/[0-9]+"}
        queryParams: [{name: v, value: "2"}]
        headers: [{type: RegularExpression, name: X-Tenant, value: "blue|green"}]
"#,
        );
        let table = RouteTable::new(&[r]);
        let mut h = http::HeaderMap::new();
        h.append("x-tenant", "red".parse().unwrap());
        h.append("x-tenant", "green".parse().unwrap());
        assert!(table.route(&req("GET", "/users/42", Some("a=1&v=2"), &h)).is_some());
        assert!(
            table.route(&req("GET", "/users/42x", Some("v=2"), &h)).is_none(),
            "regexes match whole paths"
        );
        assert!(table.route(&req("GET", "/users/42", Some("v=3"), &h)).is_none());
        assert!(table
            .route(&req("GET", "/users/42", None, &http::HeaderMap::new()))
            .is_none());
    }

    #[test]
    fn every_field_error_is_named_and_classified() {
        let spec: HttpRouteSpec = serde_yaml::from_str(
            r#"
parentRefs: [{group: apps, kind: Deployment, name: x}]
rules:
  - matches: [{path: {type: RegularExpression, value: "("}, method: FETCH}]
    timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: a, weight: 0}, {name: b, weight: 0}]
  - filters:
      - {type: RequestRedirect, requestRedirect: {statusCode: 200}}
      - {type: URLRewrite, urlRewrite: {hostname: x}}
      - {type: RequestMirror, requestMirror: {backendRef: {name: m}, percent: 150}}
    backendRefs: [{name: missing}]
    retry: {codes: [200], backoff: soon}
"#,
        )
        .unwrap();
        let lookup = |t: &Target| {
            if t.name == "missing" {
                BackendLookup::NoSuchService
            } else {
                BackendLookup::Found
            }
        };
        let (route, errors) = compile_route("demo", "bad", &spec, &lookup);
        assert!(route.is_none(), "a route with invalid fields is not used");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "parentRefs[0].kind",
            "rules[0].matches[0].path.value",
            "rules[0].matches[0].method",
            "rules[0].backendRefs",
            "rules[0].timeouts.backendRequest",
            "rules[1].filters[0].requestRedirect.statusCode",
            "rules[1].filters",
            "rules[1].filters[2].requestMirror.percent",
            "rules[1].backendRefs[0].name",
            "rules[1].retry.codes[0]",
            "rules[1].retry.backoff",
        ] {
            assert!(fields.contains(&want), "{want} not in {fields:?}");
        }
        let missing = errors
            .iter()
            .find(|e| e.field == "rules[1].backendRefs[0].name")
            .unwrap();
        assert_eq!(missing.kind, RouteErrorKind::BackendNotFound);
        assert_eq!(missing.condition(), ("ResolvedRefs", "BackendNotFound"));
    }

    #[test]
    fn a_missing_backend_fails_only_its_share() {
        let spec: HttpRouteSpec = serde_yaml::from_str(
            "parentRefs: [{name: greeter}]\nrules: [{backendRefs: [{name: greeter, weight: 1}, {name: gone, weight: 1}]}]",
        )
        .unwrap();
        let lookup = |t: &Target| {
            if t.name == "gone" {
                BackendLookup::NoSuchService
            } else {
                BackendLookup::Found
            }
        };
        let (route, errors) = compile_route("demo", "r", &spec, &lookup);
        let route = route.expect("still accepted");
        assert_eq!(errors.len(), 1);
        assert!(!errors[0].rejects_route());
        assert!(route.rules[0].backends[0].resolved && !route.rules[0].backends[1].resolved);
    }

    #[test]
    fn durations_follow_gateway_api() {
        use super::super::compile::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "1", "1d", "123456s", "1h1m1s1ms1h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_not_ignored() {
        let err = serde_yaml::from_str::<HttpRouteSpec>(
            "parentRefs: [{name: a}]\nrules: [{backendRefs: [{name: b, wieght: 3}]}]",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("wieght"), "{err}");
    }
}
