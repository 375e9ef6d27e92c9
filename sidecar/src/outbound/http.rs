//! L7 forwarding: absolute-form requests on the explicit listener, and intercepted HTTP/1.1 and
//! HTTP/2 (prior knowledge, gRPC) connections on the transparent one.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};

use super::replay::{NoReplay, Replay};
use super::route::{AttemptPolicy, Chosen, Routed};
use super::{text, Body, Outbound, MAX_ATTEMPTS, MAX_ROUTE_ATTEMPTS};
use crate::metrics::response_class;
use crate::policy::Overflow;
use crate::telemetry::{Counted, Tally};
use crate::upstream::Proto;
use crate::{APP_PROTOCOL_HEADER, SOURCE_CLUSTER_HEADER, UPSTREAM_FAILURE_HEADER};
use strait_api::routes::compile::Mirror;
use strait_api::snapshot::{ServiceEntry, Snapshot};
use strait_api::telemetry::{Edge, Reporter, ServiceName, Workload, PEER_METADATA_HEADER};
use strait_api::trace::{self, SpanKind};

/// The service, workload and endpoint address that answered a request.
pub(crate) struct Reached {
    service: ServiceName,
    workload: Workload,
    address: Option<std::net::SocketAddr>,
}
use strait_api::traffic::{Abort, CompiledPolicy};

/// Headers that belong to one hop and must not be forwarded (RFC 9110 §7.6.1, plus proxy ones).
pub(crate) fn strip_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(hyper::header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    use hyper::header::{CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE};
    // `te: trailers` is end-to-end in HTTP/2 and gRPC needs it; any other `te` is hop-by-hop.
    if headers.get(TE).is_some_and(|v| v != "trailers") {
        headers.remove(TE);
    }
    // The standard names as constants (no name to parse on every request). `Trailer` is
    // end-to-end (RFC 9110 §6.6.2) and must stay: an HTTP/1.1 hop sends only the trailer
    // fields it declares, so without it an HTTP/1.1 app's trailers would be dropped.
    for name in [
        CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(name);
    }
    for name in ["proxy-connection", "keep-alive"] {
        headers.remove(name);
    }
}

/// Gives an origin-form request (HTTP/1.1 `GET /path`) the absolute URI the upstream HTTP/2
/// request needs: the Host header's authority, else `fallback`'s (made only then: most requests
/// carry one or the other, and this runs for every request).
pub(crate) fn absolute_uri<B>(req: &mut Request<B>, fallback: impl FnOnce() -> String) {
    if req.uri().authority().is_some() {
        return;
    }
    let authority = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(fallback);
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Ok(uri) = format!("http://{authority}{path}").parse::<hyper::Uri>() {
        *req.uri_mut() = uri;
    }
}

/// Reads and drops a request body the proxy will not forward: at most 64 KiB, for at most a
/// second.
async fn discard_body(mut body: hyper::body::Incoming) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > 64 * 1024 {
                break;
            }
        }
    })
    .await;
}

impl Outbound {
    /// An absolute-form request on the explicit listener: the service comes from its host.
    pub(super) async fn forward(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let snap = self.config.borrow().clone();
        // Absolute form (a client that knows it talks to a proxy), else the Host header (a
        // client that was pointed at the proxy as if it were the server, e.g. a WebSocket one).
        let host_header = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok());
        let authority = req.uri().authority().cloned().or(host_header);
        let (svc, port) = match self.resolve(&snap, authority.as_ref(), 80) {
            Ok(x) => x,
            Err(no_route) => {
                // Read (a bounded part of) what the client sends first, so a malformed body
                // or trailer is answered as the protocol error it is, not with a 404.
                discard_body(req.into_body()).await;
                return no_route.response();
            }
        };
        let mut req = req;
        absolute_uri(&mut req, || svc.host());
        self.forward_to(&snap, &svc, port, req).await
    }

    /// Sends a request to an endpoint of `svc`, retrying where that is safe. Bodies stream both
    /// ways; the first bytes of the request body are kept in a bounded replay buffer so that a
    /// failed attempt can be resent whole, and a request that sent more than that is not
    /// retried. The response goes back in the HTTP version the app spoke; an HTTP/2 request
    /// (gRPC) reaches the destination app as HTTP/2 too. An HTTP/1.1 `Upgrade` (WebSocket)
    /// becomes a byte stream after the 101 (`upgrade.rs`).
    pub(crate) async fn forward_to(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        svc: &ServiceEntry,
        port: u16,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        if super::upgrade::is_upgrade(&req) {
            return self.upgrade(snap, svc, port, req).await;
        }
        let started = Instant::now();
        let grpc = crate::telemetry::is_grpc(req.headers());
        let tally = Arc::new(Tally::default());
        let mut req = req.map(|b| Counted::into_tally(b, grpc, tally.clone()));
        // The client span of this hop: the request leaves with it as its parent.
        let percent = snap.traffic_policy(svc, None).and_then(|p| p.trace_sampling);
        let hop = self.telemetry.start_hop(&mut req, percent, SpanKind::Client, || {
            format!("{}:{port}/*", svc.host())
        });
        let (mut reached, mut route) = (None, None);
        let resp = self.forward_inner(snap, svc, port, req, &mut reached, &mut route).await;
        let upstream_time = started.elapsed();
        let Reached {
            service,
            workload: destination,
            address,
        } = reached.unwrap_or_else(|| Reached {
            service: ServiceName::of(svc),
            workload: Workload::unknown(),
            address: None,
        });
        let (source, _) = self.telemetry.local.current(snap);
        let metrics = self.metrics.istio.clone();
        crate::telemetry::report(resp, started, grpc, tally, move |outcome| {
            let edge = Edge {
                reporter: Reporter::Source,
                source: &source,
                destination: &destination,
                service: &service,
                protocol: if grpc { "grpc" } else { "http" },
            };
            metrics.record_http(&edge, outcome);
            hop.finish(outcome, &source, &destination, || crate::telemetry::Upstream {
                cluster: format!("outbound|{port}||{}", service.host),
                host: address,
                time: address.map(|_| upstream_time),
                peer: destination.principal.clone(),
                route,
            });
        })
    }

    /// The pipeline of one request; `reached` is set to the service and workload that answered.
    async fn forward_inner(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        svc: &ServiceEntry,
        port: u16,
        req: Request<Counted<hyper::body::Incoming>>,
        reached: &mut Option<Reached>,
        route: &mut Option<String>,
    ) -> Response<Body> {
        let started = Instant::now();
        let downstream = req.version();
        let (mut parts, body) = req.into_parts();
        // HTTPRoutes attached to the service choose the backend (and may answer themselves).
        let Chosen {
            svc: backend,
            port,
            response_headers,
            request_timeout,
            attempts: policy,
            rule,
            route_name,
            mirrors,
        } = match super::route::route(snap, svc, port, &mut parts) {
            Routed::Direct => Chosen::direct(port),
            Routed::Respond(resp) => return resp,
            Routed::Backend(chosen) => chosen,
        };
        *route = route_name;
        let named = svc;
        let svc: &ServiceEntry = backend.as_deref().unwrap_or(svc);
        // The TrafficPolicy of the service the caller named (or of the rule that routed it),
        // else of the backend the route chose.
        let traffic = snap
            .traffic_policy(named, rule.as_deref())
            .or_else(|| backend.as_ref().and_then(|b| snap.traffic_policy(b, None)))
            .cloned();
        let mut policy = policy;
        let mut request_timeout = request_timeout;
        let mut _slot = None;
        if let Some(tp) = &traffic {
            if let Some(resp) = self.inject_fault(tp, svc, &parts).await {
                return resp;
            }
            policy = policy.with_traffic(tp);
            request_timeout = request_timeout.or(tp.request_timeout);
            if let Some(pool) = &tp.pool {
                match self.traffic.pools.acquire(&svc.key(), pool).await {
                    Ok(permit) => _slot = permit,
                    Err(Overflow) => {
                        self.metrics
                            .policy
                            .with_label_values(&[&svc.host(), "pool_overflow"])
                            .inc();
                        let mut resp = text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "{} has {} requests in flight from this proxy and {} waiting (TrafficPolicy {}/{} connectionPool)",
                                svc.host(),
                                pool.max_requests.unwrap_or_default(),
                                pool.max_pending.unwrap_or_default(),
                                tp.namespace,
                                tp.name
                            ),
                        );
                        resp.headers_mut()
                            .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("UO"));
                        return resp;
                    }
                }
            }
        }
        self.upstream_headers(&mut parts, downstream, &self.telemetry.local.current(snap).1);
        // A rate limit on the rule that routed this request is the destination's to enforce,
        // and it cannot see the rule: name it.
        let rate_target = rule
            .as_deref()
            .map(|r| strait_api::snapshot::rule_key(&named.namespace, &named.name, r))
            .filter(|target| snap.traffic.get(target).is_some_and(|p| p.rate_limit.is_some()));
        if let Some(v) = rate_target.and_then(|t| HeaderValue::from_str(&t).ok()) {
            parts.headers.insert(crate::RATE_LIMIT_TARGET_HEADER, v);
        }
        let replay = Replay::new(body, self.limits.replay_buffer);
        let stream_idle = traffic.as_ref().and_then(|t| t.stream_idle_timeout);
        let attempts = self.attempts(snap, svc, port, &parts, &replay, &policy);
        let outcome = match request_timeout {
            None => attempts.await,
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    let mut resp = text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "{} did not answer within the route's request timeout ({limit:?})",
                            svc.host()
                        ),
                    );
                    resp.headers_mut()
                        .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("UT"));
                    Err(resp)
                }
            },
        };
        if !mirrors.is_empty() {
            self.mirror(snap, &mirrors, &parts, &replay);
        }
        match outcome {
            Ok((resp, i)) => {
                let ep = &svc.endpoints[i];
                *reached = Some(Reached {
                    service: ServiceName::of(svc),
                    workload: Workload::of_endpoint(svc, i),
                    address: Some(ep.address.socket()),
                });
                let status = resp.status().as_u16();
                let labels = [self.cluster.as_str(), ep.locality().cluster.as_str(), &svc.host()];
                self.metrics
                    .requests
                    .with_label_values(&[labels[0], labels[1], labels[2], response_class(status)])
                    .inc();
                self.metrics
                    .latency
                    .with_label_values(&labels)
                    .observe(started.elapsed().as_secs_f64());
                let (mut rparts, rbody) = resp.into_parts();
                rparts.version = downstream;
                strip_hop(&mut rparts.headers);
                rparts.headers.remove(UPSTREAM_FAILURE_HEADER);
                if let Some(m) = &response_headers {
                    super::route::modify_headers(&mut rparts.headers, m);
                }
                Response::from_parts(rparts, idle_limited(rbody, stream_idle))
            }
            Err(failed) => {
                self.metrics
                    .requests
                    .with_label_values(&[&self.cluster, "none", &svc.host(), "5xx"])
                    .inc();
                failed
            }
        }
    }

    /// A TrafficPolicy's fault: a delay, then maybe an abort (an HTTP status, or for a gRPC
    /// request a gRPC status in a trailers-only answer). Each with its own percentage.
    async fn inject_fault(&self, tp: &CompiledPolicy, svc: &ServiceEntry, parts: &Parts) -> Option<Response<Body>> {
        let fault = tp.fault.as_ref()?;
        if let Some((delay, p)) = fault.delay {
            if crate::policy::chance(p) {
                self.metrics
                    .policy
                    .with_label_values(&[&svc.host(), "fault_delay"])
                    .inc();
                tokio::time::sleep(delay).await;
            }
        }
        let (abort, p) = fault.abort.as_ref()?;
        if !crate::policy::chance(*p) {
            return None;
        }
        self.metrics
            .policy
            .with_label_values(&[&svc.host(), "fault_abort"])
            .inc();
        let mut resp = match abort {
            Abort::Http(code) => text(
                StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                format!("fault injected by TrafficPolicy {}/{}", tp.namespace, tp.name),
            ),
            Abort::Grpc(code) => grpc_status(
                *code,
                &format!("fault injected by TrafficPolicy {}/{}", tp.namespace, tp.name),
            ),
        };
        if let Abort::Http(_) = abort {
            if is_grpc(parts) {
                // An HTTP status to a gRPC client still reads as a gRPC error.
                resp.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
            }
        }
        resp.headers_mut()
            .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("FI"));
        Some(resp)
    }

    /// Sends copies of the request to the rule's mirror backends, each with its share, and
    /// forgets them: a mirror never slows or fails the request itself. The body is copied from
    /// the replay buffer, so a request whose body was not all read or did not fit is not
    /// mirrored (counted as mirror_skipped).
    fn mirror(self: &Arc<Self>, snap: &Arc<Snapshot>, mirrors: &[Mirror], parts: &Parts, replay: &Replay) {
        for m in mirrors {
            if rand::random_range(0..1_000_000u32) >= m.per_million {
                continue;
            }
            let Some(target) = snap
                .services
                .get(&format!("{}/{}", m.target.namespace, m.target.name))
                .cloned()
            else {
                continue;
            };
            let Some((frames, trailers)) = replay.complete_copy() else {
                self.metrics
                    .policy
                    .with_label_values(&[&target.host(), "mirror_skipped"])
                    .inc();
                continue;
            };
            let mut parts = parts.clone();
            // The copy is not the rule's traffic: the mirror's sidecar applies only its own limits.
            parts.headers.remove(crate::RATE_LIMIT_TARGET_HEADER);
            // Envoy's convention: the mirror sees the host with "-shadow" appended.
            if let Some(host) = parts.uri.authority().map(|a| a.host().to_string()) {
                let shadow = format!(
                    "http://{host}-shadow{}",
                    parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
                );
                if let Ok(uri) = shadow.parse() {
                    parts.uri = uri;
                }
            }
            let port = m.target.port.unwrap_or_else(|| parts.uri.port_u16().unwrap_or(80));
            let this = self.clone();
            let snap = snap.clone();
            tokio::spawn(async move {
                let Ok(body) = Replay::new(MirrorBody::new(frames, trailers), usize::MAX).attempt() else {
                    return;
                };
                let host = target.host();
                let result = tokio::time::timeout(MIRROR_TIMEOUT, async {
                    let i = this.balancer.pick(&snap, &target, &[]).ok_or("no endpoint")?;
                    let ep = &target.endpoints[i];
                    let proto = Proto::of(parts.version);
                    let (lease, _) = this
                        .upstreams
                        .http(&snap, &target, ep, port, &Default::default(), "", proto)
                        .await
                        .map_err(|_| "connect")?;
                    let resp = lease.send(Request::from_parts(parts, body)).await.map_err(|_| "send")?;
                    // Read the answer so the stream ends cleanly; it is dropped.
                    let _ = resp.into_body().collect().await;
                    Ok::<_, &str>(())
                })
                .await;
                let action = if matches!(result, Ok(Ok(()))) {
                    "mirrored"
                } else {
                    "mirror_failed"
                };
                this.metrics.policy.with_label_values(&[&host, action]).inc();
            });
        }
    }

    /// The request as the destination sidecar gets it: hop-by-hop headers gone, the caller's
    /// metadata and the app's HTTP version noted (inside mTLS). The version between the sidecars
    /// is the connection's ([`crate::upstream::Lease::send`]); the app's stays in `parts`.
    fn upstream_headers(&self, parts: &mut Parts, downstream: Version, metadata: &str) {
        strip_hop(&mut parts.headers);
        // This proxy already answered `100 Continue` when it started reading the body.
        parts.headers.remove(hyper::header::EXPECT);
        parts.headers.remove(APP_PROTOCOL_HEADER);
        if downstream == Version::HTTP_2 {
            parts
                .headers
                .insert(APP_PROTOCOL_HEADER, HeaderValue::from_static("h2"));
        }
        parts.headers.remove(PEER_METADATA_HEADER);
        if let Ok(v) = HeaderValue::from_str(metadata) {
            parts.headers.insert(PEER_METADATA_HEADER, v);
        }
        // What the destination must not take from an app: the caller's cluster is in its
        // certificate, not in a header.
        parts.headers.remove(SOURCE_CLUSTER_HEADER);
        parts.headers.remove(crate::RATE_LIMIT_TARGET_HEADER);
    }

    /// The attempt loop: pick an endpoint, connect, send, classify, retry while that is safe.
    /// Returns the response and the cluster that answered, or the 503 to give the caller.
    async fn attempts(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        parts: &Parts,
        replay: &Replay,
        policy: &AttemptPolicy,
    ) -> Result<(Response<hyper::body::Incoming>, usize), Response<Body>> {
        // A `Service` backend of a route: only this cluster's endpoints may take it.
        let mut elsewhere: Vec<usize> = if policy.local_only {
            (0..svc.endpoints.len())
                .filter(|i| svc.endpoints[*i].locality().cluster != self.cluster)
                .collect()
        } else {
            vec![]
        };
        let proto = Proto::of(parts.version);
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
        let host = svc.host();
        let skipped = |reason: &str| {
            self.metrics.retries_skipped.with_label_values(&[&host, reason]).inc();
        };
        let mut tried = vec![];
        let mut last_error = String::from("no endpoint of the service is known");
        let mut stale_retry: Option<usize> = None;
        let mut timed_out = false;
        let mut status_retries = 0u32;
        // The last answer with a status the route retries, given back if no retry does better.
        let mut retried_answer: Option<(Response<hyper::body::Incoming>, usize)> = None;
        let max_attempts = policy
            .retries
            .map_or(MAX_ATTEMPTS, |r| (r as usize + 1).min(MAX_ROUTE_ATTEMPTS));
        let budget_key = svc.key();
        if let Some(t) = &policy.traffic {
            self.traffic.budgets.request(&budget_key, &t.budget, Instant::now());
        }
        for attempt in 0..max_attempts + 1 {
            if let (Some(t), true, None) = (&policy.traffic, attempt > 0 && attempt < max_attempts, stale_retry) {
                // A TrafficPolicy's retries spend the destination's retry budget.
                if !self.traffic.budgets.try_retry(&budget_key, &t.budget, Instant::now()) {
                    skipped("retry_budget_exhausted");
                    self.metrics
                        .policy
                        .with_label_values(&[&host, "retry_budget_exhausted"])
                        .inc();
                    last_error = format!("{last_error} (not retried: the retry budget of {host} is spent)");
                    break;
                }
                if attempt > 1 || status_retries > 0 {
                    tokio::time::sleep(crate::policy::retry_backoff(attempt as u32)).await;
                }
            }
            let pick = match stale_retry.take() {
                Some(i) => Some(i),
                None if attempt < max_attempts => {
                    let avoid: Vec<usize> = tried.iter().chain(&elsewhere).copied().collect();
                    self.balancer.pick(snap, svc, &avoid)
                }
                None => None,
            };
            let Some(i) = pick else {
                if attempt == max_attempts {
                    skipped("attempts_exhausted");
                }
                break;
            };
            tried.push(i);
            let ep = &svc.endpoints[i];
            if attempt == 0 && policy.traffic.as_ref().is_some_and(|t| !t.other_clusters) {
                // retryOtherClusters: false — retries stay in the first attempt's cluster.
                elsewhere.extend(
                    (0..svc.endpoints.len()).filter(|j| svc.endpoints[*j].locality().cluster != ep.locality().cluster),
                );
            }
            if attempt > 0 {
                self.metrics.retries.with_label_values(&[&host, "retry"]).inc();
            }
            // A connect failure sent nothing: always retriable.
            let traceparent = parts
                .headers
                .get(trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let dial = self
                .upstreams
                .http(snap, svc, ep, port, &policy.conn, traceparent, proto);
            let dialed = match policy.connect_timeout {
                None => dial.await,
                Some(limit) => match tokio::time::timeout(limit, dial).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.balancer.failure(snap, svc, ep);
                        last_error = format!("{}: no connection within the connect timeout ({limit:?})", ep.key());
                        continue;
                    }
                },
            };
            let (lease, reused) = match dialed {
                Ok(s) => s,
                Err(e)
                    if matches!(
                        &*e,
                        crate::upstream::UpstreamError::Tunnel(strait_gateway::TunnelError::Refused {
                            status: 403,
                            ..
                        })
                    ) =>
                {
                    // The remote gateway refused the caller by an AuthorizationPolicy: that is
                    // the answer (no retry, and the endpoint is healthy).
                    let mut resp = text(StatusCode::FORBIDDEN, e.to_string());
                    if is_grpc(parts) {
                        resp = grpc_status(7, &e.to_string());
                    }
                    return Err(resp);
                }
                Err(e) if matches!(*e, crate::upstream::UpstreamError::Overflow { .. }) => {
                    // Circuit breaking: shed at once, no retry.
                    self.metrics.policy.with_label_values(&[&host, "pool_overflow"]).inc();
                    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                    resp.headers_mut()
                        .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("UO"));
                    return Err(resp);
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep.key(), error = %e, "upstream connect failed; trying another endpoint");
                    self.balancer.failure(snap, svc, ep);
                    if e.gateway_down() {
                        self.balancer.gateway_failure(snap, &ep.locality().cluster);
                    }
                    last_error = e.to_string();
                    continue;
                }
            };
            let body = match replay.attempt() {
                Ok(b) => b,
                Err(why) => {
                    skipped(why.reason());
                    if why == NoReplay::BufferExceeded {
                        last_error = format!(
                            "{last_error} (not retried: more than the replay buffer of {} bytes was sent)",
                            self.limits.replay_buffer
                        );
                    }
                    break;
                }
            };
            let sent = lease.send(Request::from_parts(parts.clone(), body));
            let sent = match policy.per_try {
                None => sent.await,
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(r) => r,
                    Err(_) => {
                        // No response head in time: this attempt is abandoned (its stream
                        // reset); another may be tried if the request is idempotent.
                        timed_out = true;
                        self.balancer.failure(snap, svc, ep);
                        last_error = format!("{} sent no response within the per-try timeout ({limit:?})", ep.key());
                        if !idempotent {
                            skipped("not_idempotent");
                            break;
                        }
                        continue;
                    }
                },
            };
            match sent {
                Ok(resp)
                    if policy.retries_answer(resp.status().as_u16(), grpc_code(&resp))
                        && attempt + 1 < max_attempts
                        && !resp.headers().contains_key(UPSTREAM_FAILURE_HEADER) =>
                {
                    // The route retries this status elsewhere; keep the answer in case no
                    // other attempt does better.
                    self.balancer.retried(snap, svc, ep, resp.status().as_u16());
                    last_error = format!("{} answered {}", ep.key(), resp.status());
                    retried_answer = Some((resp, i));
                    status_retries += 1;
                    // A TrafficPolicy's retry honours the answer's Retry-After (in seconds, at
                    // most MAX_RETRY_AFTER); the request timeout still bounds the whole call.
                    let retry_after = policy
                        .traffic
                        .as_ref()
                        .and(retried_answer.as_ref())
                        .and_then(|(r, _)| r.headers().get(hyper::header::RETRY_AFTER))
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(|secs| std::time::Duration::from_secs(secs).min(MAX_RETRY_AFTER));
                    if let Some(wait) = retry_after {
                        tokio::time::sleep(wait).await;
                    } else if let Some(base) = policy.backoff {
                        // GEP-1731: the backoff is a minimum; it doubles, up to 10x.
                        let wait = base.saturating_mul(1u32 << (status_retries - 1).min(4)).min(base * 10);
                        tokio::time::sleep(wait).await;
                    }
                }
                Ok(resp) if resp.headers().contains_key(UPSTREAM_FAILURE_HEADER) => {
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{} could not reach its application", ep.key());
                    let connect = resp
                        .headers()
                        .get(UPSTREAM_FAILURE_HEADER)
                        .is_some_and(|v| v == "connect");
                    if !(connect || idempotent) {
                        // The app may have acted on it: give the caller the answer, do not retry.
                        skipped("not_idempotent");
                        return Ok((resp, i));
                    }
                }
                Ok(resp) => {
                    self.balancer.answered(snap, svc, ep, resp.status().as_u16());
                    return Ok((resp, i));
                }
                Err(e) if reused && (e.is_canceled() || idempotent) && !tried[..tried.len() - 1].contains(&i) => {
                    // A pooled connection died unnoticed (say a tunnel whose UDP path went away)
                    // before it took the request: the same endpoint on a fresh connection, once.
                    self.upstreams.evict(ep);
                    last_error = format!("{}: {e}", ep.key());
                    stale_retry = Some(i);
                }
                Err(e) => {
                    self.upstreams.evict(ep);
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{}: {e}", ep.key());
                    if !(idempotent || e.is_canceled()) {
                        skipped("not_idempotent");
                        break;
                    }
                }
            }
        }
        if let Some(answer) = retried_answer {
            return Ok(answer);
        }
        let mut failed = text(
            if timed_out {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!(
                "no healthy endpoint of {host} answered after {} attempt(s): {last_error}",
                tried.len()
            ),
        );
        // Envoy's flags: upstream timeout, no healthy upstream, connect failure, retries spent.
        let flags = match (timed_out, tried.len()) {
            (true, _) => "UT",
            (false, 0) => "UH",
            (false, 1) => "UF",
            _ => "URX",
        };
        failed
            .headers_mut()
            .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static(flags));
        Err(failed)
    }
}

/// The longest Retry-After a retry waits for.
const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Envoy-style response flags on answers the proxy made itself (`UO` upstream overflow, `FI`
/// fault injected, `UT`, `UH`, `UF`, `URX`, `NR`).
pub(crate) use crate::telemetry::RESPONSE_FLAGS_HEADER;

fn is_grpc(parts: &Parts) -> bool {
    parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The gRPC status of a trailers-only answer (in the response head), if any.
fn grpc_code(resp: &Response<hyper::body::Incoming>) -> Option<u32> {
    resp.headers().get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A trailers-only gRPC answer with `code`.
pub(crate) fn grpc_status(code: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        http_body_util::Empty::<bytes::Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = HeaderValue::from_str(&code.to_string()) {
        h.insert("grpc-status", v);
    }
    if let Ok(v) = HeaderValue::from_str(&message.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
    resp
}

/// The body of a mirrored request: the frames the replay buffer kept, then the trailers.
struct MirrorBody {
    frames: std::collections::VecDeque<bytes::Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl MirrorBody {
    fn new(frames: Vec<bytes::Bytes>, trailers: Option<hyper::HeaderMap>) -> Self {
        MirrorBody {
            frames: frames.into(),
            trailers,
        }
    }
}

impl hyper::body::Body for MirrorBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(f))));
        }
        std::task::Poll::Ready(self.trailers.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.trailers.is_none()
    }
}

/// A response body relayed as is, or (with a TrafficPolicy's `timeouts.streamIdle`) ended with
/// an error — the stream reset — when no frame arrives for that long.
fn idle_limited(body: hyper::body::Incoming, idle: Option<std::time::Duration>) -> Body {
    match idle {
        None => body.map_err(Into::into).boxed(),
        Some(idle) => IdleBody {
            inner: body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
        .boxed(),
    }
}

struct IdleBody {
    inner: hyper::body::Incoming,
    idle: std::time::Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for IdleBody {
    type Data = bytes::Bytes;
    type Error = super::replay::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match std::future::Future::poll(self.timer.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "no data from upstream for {:?} (the TrafficPolicy's timeouts.streamIdle)",
                    self.idle
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_origin_form_request_takes_its_host_header_else_the_service_and_an_absolute_one_is_kept() {
        let uri_after = |uri: &str, host: Option<&'static str>| {
            let mut req = Request::builder().uri(uri);
            if let Some(h) = host {
                req = req.header(hyper::header::HOST, h);
            }
            let mut req = req.body(()).unwrap();
            let mut asked = false;
            absolute_uri(&mut req, || {
                asked = true;
                "ledger.demo.svc.clusterset.local".to_string()
            });
            (req.uri().to_string(), asked)
        };
        assert_eq!(
            uri_after("/v1/a?b=1", Some("ledger:8080")),
            ("http://ledger:8080/v1/a?b=1".to_string(), false)
        );
        assert_eq!(
            uri_after("/v1/a", None),
            ("http://ledger.demo.svc.clusterset.local/v1/a".to_string(), true)
        );
        assert_eq!(
            uri_after("http://ledger.demo:8080/x", Some("other")),
            ("http://ledger.demo:8080/x".to_string(), false),
            "an absolute URI (a proxy's request) is kept, and the service's name never made"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_end_to_end_ones_kept() {
        let mut h = headers(&[
            ("connection", "x-hop, Keep-Alive"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
            ("content-type", "text/plain"),
        ]);
        strip_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        // `Trailer` names the trailer fields end to end (an HTTP/1.1 hop sends only those).
        assert_eq!(left, ["content-type", "trailer", "x-end-to-end"]);

        // `te: trailers` is end-to-end (gRPC needs it).
        let mut h = headers(&[("te", "trailers"), ("upgrade", "websocket")]);
        strip_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["te"], "trailers");
    }
}
