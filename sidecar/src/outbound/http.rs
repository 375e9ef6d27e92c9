//! L7 forwarding: absolute-form requests on the explicit listener, and intercepted HTTP/1.1 and
//! HTTP/2 (prior knowledge, gRPC) connections on the transparent one.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};

use super::replay::{NoReplay, Replay};
use super::route::{AttemptPolicy, Routed};
use super::{text, Body, Outbound, MAX_ATTEMPTS, MAX_ROUTE_ATTEMPTS};
use crate::metrics::response_class;
use crate::{APP_PROTOCOL_HEADER, SOURCE_CLUSTER_HEADER, UPSTREAM_FAILURE_HEADER};
use strait_api::snapshot::{ServiceEntry, Snapshot};

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
    // `te: trailers` is end-to-end in HTTP/2 and gRPC needs it; any other `te` is hop-by-hop.
    if headers.get("te").is_some_and(|v| v != "trailers") {
        headers.remove("te");
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Gives an origin-form request (HTTP/1.1 `GET /path`) the absolute URI the upstream HTTP/2
/// request needs: the Host header's authority, else `fallback`.
pub(crate) fn absolute_uri<B>(req: &mut Request<B>, fallback: &str) {
    if req.uri().authority().is_some() {
        return;
    }
    let authority = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| fallback.to_string());
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
        absolute_uri(&mut req, &svc.host());
        self.forward_to(&snap, &svc, port, req).await
    }

    /// Sends a request to an endpoint of `svc`, retrying where that is safe. Bodies stream both
    /// ways; the first bytes of the request body are kept in a bounded replay buffer so that a
    /// failed attempt can be resent whole, and a request that sent more than that is not
    /// retried. The response goes back in the HTTP version the app spoke; an HTTP/2 request
    /// (gRPC) reaches the destination app as HTTP/2 too. An HTTP/1.1 `Upgrade` (WebSocket)
    /// becomes a byte stream after the 101 (`upgrade.rs`).
    pub(crate) async fn forward_to(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        if super::upgrade::is_upgrade(&req) {
            return self.upgrade(snap, svc, port, req).await;
        }
        let started = Instant::now();
        let downstream = req.version();
        let (mut parts, body) = req.into_parts();
        // HTTPRoutes attached to the service choose the backend (and may answer themselves).
        let (backend, port, response_headers, request_timeout, policy) =
            match super::route::route(snap, svc, port, &mut parts) {
                Routed::Direct => (None, port, None, None, AttemptPolicy::default()),
                Routed::Respond(resp) => return resp,
                Routed::Backend {
                    svc,
                    port,
                    response_headers,
                    request_timeout,
                    attempts,
                } => (Some(svc), port, response_headers, request_timeout, attempts),
            };
        let svc: &ServiceEntry = backend.as_deref().unwrap_or(svc);
        self.upstream_headers(&mut parts, downstream);
        let replay = Replay::new(body, self.limits.replay_buffer);
        let attempts = self.attempts(snap, svc, port, &parts, &replay, &policy);
        let outcome = match request_timeout {
            None => attempts.await,
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(outcome) => outcome,
                Err(_) => Err(text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{} did not answer within the route's request timeout ({limit:?})",
                        svc.host()
                    ),
                )),
            },
        };
        match outcome {
            Ok((resp, ep_cluster)) => {
                let status = resp.status().as_u16();
                let labels = [self.cluster.as_str(), ep_cluster.as_str(), &svc.host()];
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
                Response::from_parts(rparts, rbody.boxed())
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

    /// The request as the destination sidecar gets it: hop-by-hop headers gone, the caller's
    /// cluster and HTTP version noted (inside mTLS).
    fn upstream_headers(&self, parts: &mut Parts, downstream: Version) {
        strip_hop(&mut parts.headers);
        // This proxy already answered `100 Continue` when it started reading the body.
        parts.headers.remove(hyper::header::EXPECT);
        parts.headers.remove(APP_PROTOCOL_HEADER);
        if downstream == Version::HTTP_2 {
            parts
                .headers
                .insert(APP_PROTOCOL_HEADER, HeaderValue::from_static("h2"));
        }
        parts.headers.insert(
            SOURCE_CLUSTER_HEADER,
            HeaderValue::from_str(&self.cluster).unwrap_or(HeaderValue::from_static("unknown")),
        );
        parts.version = Version::HTTP_2;
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
    ) -> Result<(Response<hyper::body::Incoming>, String), Response<Body>> {
        // A `Service` backend of a route: only this cluster's endpoints may take it.
        let elsewhere: Vec<usize> = if policy.local_only {
            (0..svc.endpoints.len())
                .filter(|i| svc.endpoints[*i].locality.cluster != self.cluster)
                .collect()
        } else {
            vec![]
        };
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
        let mut retried_answer: Option<(Response<hyper::body::Incoming>, String)> = None;
        let max_attempts = policy
            .retries
            .map_or(MAX_ATTEMPTS, |r| (r as usize + 1).min(MAX_ROUTE_ATTEMPTS));
        for attempt in 0..max_attempts + 1 {
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
            if attempt > 0 {
                self.metrics.retries.with_label_values(&[&host, "retry"]).inc();
            }
            // A connect failure sent nothing: always retriable.
            let (mut sender, reused) = match self.upstreams.h2(snap, svc, ep, port).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(endpoint = %ep.key, error = %e, "upstream connect failed; trying another endpoint");
                    self.balancer.failure(snap, svc, ep);
                    if e.gateway_down() {
                        self.balancer.gateway_failure(snap, &ep.locality.cluster);
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
            let sent = sender.send_request(Request::from_parts(parts.clone(), body));
            let sent = match policy.per_try {
                None => sent.await,
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(r) => r,
                    Err(_) => {
                        // No response head in time: this attempt is abandoned (its stream
                        // reset); another may be tried if the request is idempotent.
                        timed_out = true;
                        self.balancer.failure(snap, svc, ep);
                        last_error = format!("{} sent no response within the per-try timeout ({limit:?})", ep.key);
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
                    if policy.retry_codes.contains(&resp.status().as_u16())
                        && attempt + 1 < max_attempts
                        && !resp.headers().contains_key(UPSTREAM_FAILURE_HEADER) =>
                {
                    // The route retries this status elsewhere; keep the answer in case no
                    // other attempt does better.
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{} answered {}", ep.key, resp.status());
                    retried_answer = Some((resp, ep.locality.cluster.clone()));
                    status_retries += 1;
                    if let Some(base) = policy.backoff {
                        // GEP-1731: the backoff is a minimum; it doubles, up to 10x.
                        let wait = base.saturating_mul(1u32 << (status_retries - 1).min(4)).min(base * 10);
                        tokio::time::sleep(wait).await;
                    }
                }
                Ok(resp) if resp.headers().contains_key(UPSTREAM_FAILURE_HEADER) => {
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{} could not reach its application", ep.key);
                    let connect = resp
                        .headers()
                        .get(UPSTREAM_FAILURE_HEADER)
                        .is_some_and(|v| v == "connect");
                    if !(connect || idempotent) {
                        // The app may have acted on it: give the caller the answer, do not retry.
                        skipped("not_idempotent");
                        return Ok((resp, ep.locality.cluster.clone()));
                    }
                }
                Ok(resp) => {
                    self.balancer.success(ep);
                    return Ok((resp, ep.locality.cluster.clone()));
                }
                Err(e) if reused && (e.is_canceled() || idempotent) && !tried[..tried.len() - 1].contains(&i) => {
                    // A pooled connection died unnoticed (say a tunnel whose UDP path went away)
                    // before it took the request: the same endpoint on a fresh connection, once.
                    self.upstreams.evict(ep);
                    last_error = format!("{}: {e}", ep.key);
                    stale_retry = Some(i);
                }
                Err(e) => {
                    self.upstreams.evict(ep);
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{}: {e}", ep.key);
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
        Err(text(
            if timed_out {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!(
                "no healthy endpoint of {host} answered after {} attempt(s): {last_error}",
                tried.len()
            ),
        ))
    }
}
