//! `strait route explain`: what this proxy would do with a request, without sending it. The
//! same stages as a real request (service lookup, routing, TrafficPolicy, locality priorities,
//! the balancer's pick), each reported with why.

use hyper::header::{HeaderName, HeaderValue};
use hyper::HeaderMap;
use serde_json::{json, Value};
use strait_api::routes::compile::{CompiledMatch, PathRule, TargetKind, ValueRule};
use strait_api::routes::spec::HeaderModifier;
use strait_api::routes::{pick_backend, RequestView};
use strait_api::snapshot::ServiceEntry;
use strait_api::traffic::CompiledPolicy;

use super::Outbound;

fn value_rule(r: &ValueRule) -> String {
    match r {
        ValueRule::Exact(v) => format!("= {v:?}"),
        ValueRule::Regex(re) => format!("~ /{}/", re.as_str()),
    }
}

/// Why a match holds, in the words of the route.
fn describe_match(m: &CompiledMatch) -> Vec<String> {
    let mut out = vec![match &m.path {
        PathRule::Exact(p) => format!("path Exact {p:?}"),
        PathRule::Prefix(p) => format!("path PathPrefix {:?}", if p.is_empty() { "/" } else { p }),
        PathRule::Regex(re) => format!("path RegularExpression /{}/", re.as_str()),
    }];
    if let Some(method) = &m.method {
        out.push(format!("method {method}"));
    }
    out.extend(m.headers.iter().map(|(n, r)| format!("header {n} {}", value_rule(r))));
    out.extend(m.query.iter().map(|(n, r)| format!("query {n} {}", value_rule(r))));
    out
}

fn modifier(what: &str, m: &HeaderModifier) -> Vec<String> {
    let mut out = vec![];
    out.extend(m.set.iter().map(|h| format!("{what} set {}: {}", h.name, h.value)));
    out.extend(m.add.iter().map(|h| format!("{what} add {}: {}", h.name, h.value)));
    out.extend(m.remove.iter().map(|h| format!("{what} remove {h}")));
    out
}

fn policy_summary(p: &CompiledPolicy) -> Vec<String> {
    let mut out = vec![];
    if let Some(r) = &p.retry {
        out.push(format!(
            "retry: {} attempts, per try {:?}, on {:?}, budget {}% over {:?} (at least {}/s), other clusters {}",
            r.attempts,
            r.per_try,
            r.retry_on,
            r.budget.percent * 100.0,
            r.budget.interval,
            r.budget.min_per_second,
            if r.other_clusters { "yes" } else { "no" }
        ));
    }
    if let Some(f) = &p.fault {
        if let Some((d, pct)) = f.delay {
            out.push(format!("fault: delay {d:?} for {}% of requests", pct * 100.0));
        }
        if let Some((a, pct)) = &f.abort {
            out.push(format!("fault: abort {a:?} for {}% of requests", pct * 100.0));
        }
    }
    if let Some(r) = &p.rate_limit {
        out.push(format!(
            "rate limit: {}/s burst {} {} ({}), at the destination",
            r.per_second,
            r.burst,
            if r.per_destination {
                "for the whole service"
            } else {
                "per proxy"
            },
            if r.shadow { "shadow" } else { "enforced" }
        ));
    }
    if let Some(pool) = &p.pool {
        out.push(format!(
            "connection pool: max requests {:?}, max pending {:?}",
            pool.max_requests, pool.max_pending
        ));
    }
    if let Some(o) = &p.outlier {
        out.push(format!(
            "outlier detection: {} consecutive 5xx, {} gateway errors, ejection {:?}, at most {}% ejected",
            o.consecutive_5xx, o.consecutive_gateway, o.base_ejection, o.max_ejection_percent
        ));
        if let Some(f) = &o.failure_percentage {
            out.push(format!(
                "outlier detection: eject at {}% failed of at least {} requests every {:?}, when {} endpoints have that many",
                f.threshold, f.request_volume, o.interval, f.minimum_hosts
            ));
        }
    }
    for (what, t) in [
        ("connect", p.connect_timeout),
        ("request", p.request_timeout),
        ("idle", p.idle_timeout),
        ("stream idle", p.stream_idle_timeout),
    ] {
        if let Some(t) = t {
            out.push(format!("timeout {what}: {t:?}"));
        }
    }
    if !p.failover.is_empty() || !p.failover_priority.is_empty() {
        out.push(format!(
            "locality: failover {:?}, failoverPriority {:?}",
            p.failover, p.failover_priority
        ));
    }
    out
}

impl Outbound {
    /// Explains `method url` with `headers` as this proxy would route it now.
    pub fn explain(&self, method: &str, url: &str, headers: &[(String, String)]) -> Value {
        let snap = self.config.borrow().clone();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            ) {
                map.append(k, v);
            }
        }
        let uri: hyper::Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => return json!({"error": format!("url {url:?}: {e}")}),
        };
        let caller = self.balancer.locality();
        let mut out = json!({
            "from": {"cluster": caller.cluster, "region": caller.region, "zone": caller.zone},
            "request": {"method": method, "url": url, "headers": headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>()},
        });
        let authority = uri.authority().cloned();
        let (svc, port) = match self.resolve(&snap, authority.as_ref(), 80) {
            Ok(x) => x,
            Err(no_route) => {
                out["error"] = json!(no_route.1);
                return out;
            }
        };
        out["service"] = json!(svc.host());
        let view = RequestView {
            method,
            path: uri.path(),
            query: uri.query(),
            headers: &map,
        };
        let table = snap.routes.get(&svc.key());
        let mut destination: std::sync::Arc<ServiceEntry> = svc.clone();
        let mut rule_name = None;
        match table.map(|t| (t, t.explain(&view))) {
            None => {
                out["route"] =
                    json!({"why": format!("no HTTPRoute or GRPCRoute attaches to {}: its own endpoints", svc.host())})
            }
            Some((_, None)) => {
                out["route"] =
                    json!({"why": "routes attach to this service but no rule matches: the request is answered 404"});
                return out;
            }
            Some((_, Some((route, rule, matched)))) => {
                let index = route
                    .rules
                    .iter()
                    .position(|r| std::ptr::eq(r, rule))
                    .unwrap_or_default();
                rule_name = rule.name.clone();
                let mut filters = vec![];
                if let Some(m) = &rule.request_headers {
                    filters.extend(modifier("RequestHeaderModifier", m));
                }
                if let Some(m) = &rule.response_headers {
                    filters.extend(modifier("ResponseHeaderModifier", m));
                }
                if rule.rewrite.is_some() {
                    filters.push(format!("URLRewrite {:?}", rule.rewrite));
                }
                if let Some(r) = &rule.redirect {
                    filters.push(format!("RequestRedirect {r:?}"));
                }
                for m in &rule.mirrors {
                    filters.push(format!(
                        "RequestMirror to {}/{} for {}% of requests",
                        m.target.namespace,
                        m.target.name,
                        f64::from(m.per_million) / 10_000.0
                    ));
                }
                let total = rule.total_weight.max(1) as f64;
                let backends: Vec<Value> = rule
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "service": format!("{}.{}.svc.clusterset.local", b.target.name, b.target.namespace),
                            "kind": match b.target.kind { TargetKind::Service => "Service (this cluster's endpoints)", TargetKind::ServiceImport => "ServiceImport (every cluster's endpoints)" },
                            "port": b.target.port,
                            "weight": b.weight,
                            "share_percent": f64::from(b.weight) * 100.0 / total,
                            "resolved": b.resolved,
                        })
                    })
                    .collect();
                let chosen = pick_backend(rule, rand::random::<u64>());
                out["route"] = json!({
                    "name": format!("{}/{}", route.namespace, route.name),
                    "rule": rule.name.clone().unwrap_or_else(|| format!("#{index}")),
                    "why": describe_match(matched),
                    "filters": filters,
                    "backends": backends,
                    "timeouts": {"request": rule.request_timeout.map(|d| format!("{d:?}")), "backendRequest": rule.backend_timeout.map(|d| format!("{d:?}"))},
                    "retry": {"codes": rule.retry_codes, "attempts": rule.retry_attempts},
                });
                match chosen.and_then(|b| snap.services.get(&format!("{}/{}", b.target.namespace, b.target.name))) {
                    Some(d) => destination = d.clone(),
                    None => {
                        out["error"] = json!("the chosen backend is not in the catalog: the request is answered 500");
                        return out;
                    }
                }
                let _ = port;
            }
        }
        out["destination"] = json!(destination.host());
        if let Some(p) = snap
            .traffic_policy(&svc, rule_name.as_deref())
            .or_else(|| snap.traffic_policy(&destination, None))
        {
            out["traffic_policy"] =
                json!({"name": format!("{}/{}", p.namespace, p.name), "settings": policy_summary(p)});
        }
        let levels = self.balancer.levels(&snap, &destination);
        let mut by_level: std::collections::BTreeMap<u32, Vec<Value>> = Default::default();
        for (i, (ep, (level, ready, reachable, ejected))) in destination.endpoints.iter().zip(levels).enumerate() {
            by_level.entry(level).or_default().push(json!({
                "endpoint": destination.workload(i),
                "address": ep.address.to_string(),
                "cluster": ep.locality().cluster,
                "zone": ep.locality().zone,
                "ready": ready,
                "reachable": reachable,
                "ejected": ejected,
                "healthy": ready && reachable && !ejected,
            }));
        }
        out["priorities"] = json!(by_level
            .into_iter()
            .map(|(level, eps)| json!({"level": level, "endpoints": eps}))
            .collect::<Vec<_>>());
        out["pick"] = match self.balancer.pick(&snap, &destination, &[]) {
            Some(i) => {
                let ep = &destination.endpoints[i];
                json!({"endpoint": destination.workload(i), "address": ep.address.to_string(), "cluster": ep.locality().cluster, "zone": ep.locality().zone})
            }
            None => Value::Null,
        };
        out
    }
}
