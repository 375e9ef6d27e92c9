//! The routing stage of the outbound pipeline: the HTTPRoutes attached to the service a request
//! names pick a rule (Gateway API precedence, `api::routes::matching`), and the rule either
//! answers itself (a redirect, no backend) or names the backend service by weight; its filters
//! modify the request (headers, URL rewrite) and later the response (headers).

use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue, HOST, LOCATION};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use strait_api::routes::compile::{Backend, CompiledRule, Mirror, TargetKind};
use strait_api::routes::spec::{HeaderModifier, PathModifier, PathModifierType};
use strait_api::routes::{pick_backend, RequestView};
use strait_api::snapshot::{ServiceEntry, Snapshot};

use super::{text, Body};

/// Where a request goes after routing.
pub(crate) enum Routed {
    /// No route attaches to the service: its own endpoints, as before.
    Direct,
    /// The rule answers (a redirect, no backend to send to).
    Respond(Response<Body>),
    /// A backend service chosen by a rule.
    Backend(Chosen),
}

/// What a rule chose, and what it asks of the rest of the pipeline.
#[derive(Default)]
pub(crate) struct Chosen {
    /// The backend service; `None` for a service without routes (its own endpoints).
    pub svc: Option<Arc<ServiceEntry>>,
    pub port: u16,
    pub response_headers: Option<HeaderModifier>,
    /// The whole call, retries included (timeouts.request): 504 past it.
    pub request_timeout: Option<std::time::Duration>,
    /// `local_only` for a `Service` backend (this cluster's endpoints), not for a
    /// `ServiceImport` (every cluster's).
    pub attempts: AttemptPolicy,
    /// The name of the rule that matched (a TrafficPolicy may target it).
    pub rule: Option<String>,
    /// The HTTPRoute that routed the request, `<namespace>/<name>[/<rule>]` (access logs'
    /// %ROUTE_NAME%).
    pub route_name: Option<String>,
    /// Copies of the request to send elsewhere (RequestMirror), fire and forget.
    pub mirrors: Vec<Mirror>,
}

impl Chosen {
    /// A service without routes: its own endpoints on the port the caller named.
    pub fn direct(port: u16) -> Self {
        Chosen {
            port,
            ..Default::default()
        }
    }
}

/// What the chosen rule asks of the attempt loop.
#[derive(Clone, Debug, Default)]
pub(crate) struct AttemptPolicy {
    /// A `Service` backend: only this cluster's endpoints may take the request.
    pub local_only: bool,
    /// Each attempt's limit for the response head (timeouts.backendRequest).
    pub per_try: Option<std::time::Duration>,
    /// Response codes retried on another endpoint (retry.codes, GEP-1731).
    pub retry_codes: Vec<u16>,
    /// Retries after the first attempt (retry.attempts).
    pub retries: Option<u32>,
    /// The least wait before a status retry (retry.backoff), doubling each time.
    pub backoff: Option<std::time::Duration>,
    /// A TrafficPolicy's retries: more conditions (5xx, gRPC statuses), a budget per
    /// destination, and whether retries may go to other clusters.
    pub traffic: Option<Arc<strait_api::traffic::RetryPolicy>>,
    /// A TrafficPolicy's timeouts.connect for each new connection.
    pub connect_timeout: Option<std::time::Duration>,
    /// A TrafficPolicy's connection limits (maxConnections, maxRequestsPerConnection, idle).
    pub conn: crate::upstream::ConnLimits,
}

impl AttemptPolicy {
    /// Adds what a TrafficPolicy asks where the route did not say.
    pub fn with_traffic(mut self, p: &strait_api::traffic::CompiledPolicy) -> Self {
        self.connect_timeout = p.connect_timeout;
        self.conn = crate::upstream::ConnLimits {
            max_connections: p.pool.as_ref().and_then(|c| c.max_connections),
            max_requests_per_connection: p.pool.as_ref().and_then(|c| c.max_requests_per_connection),
            idle: p.idle_timeout,
        };
        if let Some(r) = &p.retry {
            if self.retries.is_none() {
                self.retries = Some(r.attempts);
            }
            if self.per_try.is_none() {
                self.per_try = r.per_try;
            }
            self.traffic = Some(Arc::new(r.clone()));
        }
        self
    }

    /// Whether an answer with this status (and gRPC status, for gRPC) is retried.
    pub fn retries_answer(&self, status: u16, grpc: Option<u32>) -> bool {
        self.retry_codes.contains(&status) || self.traffic.as_ref().is_some_and(|t| t.retries_status(status, grpc))
    }
}

/// Runs the routing stage on a request's head, applying the rule's request filters to it.
pub(crate) fn route(snap: &Snapshot, svc: &ServiceEntry, port: u16, parts: &mut Parts) -> Routed {
    // Most services have no route: decide that without building the lookup key.
    if snap.routes.is_empty() {
        return Routed::Direct;
    }
    let Some(table) = snap.routes.get(&format!("{}/{}", svc.namespace, svc.name)) else {
        return Routed::Direct;
    };
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let Some((route, rule)) = table.route(&view) else {
        let mut resp = text(
            StatusCode::NOT_FOUND,
            format!("no rule of the HTTPRoutes of {} matches this request", svc.host()),
        );
        resp.headers_mut().insert(
            crate::telemetry::RESPONSE_FLAGS_HEADER,
            hyper::header::HeaderValue::from_static("NR"),
        );
        return Routed::Respond(resp);
    };
    tracing::trace!(route = %route.name, rule = ?rule.name, "request routed");
    if let Some(redirect) = &rule.redirect {
        return Routed::Respond(redirect_response(parts, rule, redirect));
    }
    let Some(backend) = pick_backend(rule, rand::random::<u64>()) else {
        return Routed::Respond(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("route {} has no backend for this request", route.name),
        ));
    };
    if !backend.resolved {
        // Gateway API: the share of an invalid backend answers 500.
        return Routed::Respond(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "route {} sends this request to {}/{}, which is not in the catalog",
                route.name, backend.target.namespace, backend.target.name
            ),
        ));
    }
    let Some(target) = snap
        .services
        .get(&format!("{}/{}", backend.target.namespace, backend.target.name))
    else {
        return Routed::Respond(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the route's backend left the catalog",
        ));
    };
    apply_request_filters(parts, rule, backend);
    Routed::Backend(Chosen {
        svc: Some(target.clone()),
        port: backend.target.port.unwrap_or(port),
        response_headers: rule.response_headers.clone(),
        request_timeout: rule.request_timeout,
        attempts: AttemptPolicy {
            local_only: backend.target.kind == TargetKind::Service,
            per_try: rule.backend_timeout,
            retry_codes: rule.retry_codes.clone(),
            retries: rule.retry_attempts,
            backoff: rule.retry_backoff,
            traffic: None,
            connect_timeout: None,
            conn: Default::default(),
        },
        rule: rule.name.clone(),
        route_name: Some(match &rule.name {
            Some(r) => format!("{}/{}/{r}", svc.namespace, route.name),
            None => format!("{}/{}", svc.namespace, route.name),
        }),
        mirrors: rule.mirrors.clone(),
    })
}

fn apply_request_filters(parts: &mut Parts, rule: &CompiledRule, backend: &Backend) {
    if let Some(m) = &rule.request_headers {
        modify_headers(&mut parts.headers, m);
    }
    if let Some(m) = &backend.request_headers {
        modify_headers(&mut parts.headers, m);
    }
    if let Some(rewrite) = &rule.rewrite {
        let path = rewrite
            .path
            .as_ref()
            .map(|p| new_path(parts.uri.path(), rule, p))
            .unwrap_or_else(|| parts.uri.path().to_string());
        let authority = rewrite
            .hostname
            .clone()
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        if let Some(h) = rewrite.hostname.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
            parts.headers.insert(HOST, h);
        }
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        if let Ok(uri) = format!("http://{authority}{path}{query}").parse() {
            parts.uri = uri;
        }
    }
}

/// Set, add, then remove, as Gateway API's header modifier does.
pub(crate) fn modify_headers(headers: &mut hyper::HeaderMap, m: &HeaderModifier) {
    for h in &m.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.insert(name, value);
        }
    }
    for h in &m.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a ReplaceFullPath or ReplacePrefixMatch modifier.
fn new_path(path: &str, rule: &CompiledRule, m: &PathModifier) -> String {
    match m.kind {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        PathModifierType::ReplacePrefixMatch => {
            let replacement = m.replace_prefix_match.clone().unwrap_or_default();
            // The longest prefix of the rule's matches that this path has.
            let prefix = rule
                .matches
                .iter()
                .filter_map(|mm| match &mm.path {
                    strait_api::routes::compile::PathRule::Prefix(p) if path.starts_with(p.as_str()) => Some(p.len()),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let rest = &path[prefix..];
            let joined = format!("{}{}", replacement.trim_end_matches('/'), rest);
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

fn redirect_response(
    parts: &Parts,
    rule: &CompiledRule,
    r: &strait_api::routes::spec::RequestRedirect,
) -> Response<Body> {
    let host_header = parts.headers.get(HOST).and_then(|h| h.to_str().ok());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or(host_header)
        .unwrap_or_default();
    let host = r
        .hostname
        .clone()
        .unwrap_or_else(|| authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_string());
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let port = r
        .port
        .map(|p| format!(":{p}"))
        .or_else(|| {
            authority
                .rsplit_once(':')
                .map(|(_, p)| format!(":{p}"))
                .filter(|_| r.scheme.is_none())
        })
        .unwrap_or_default();
    let path = r
        .path
        .as_ref()
        .map(|p| new_path(parts.uri.path(), rule, p))
        .unwrap_or_else(|| parts.uri.path().to_string());
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let status = r
        .status_code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FOUND);
    let mut resp = text(status, format!("redirected to {location}"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}
