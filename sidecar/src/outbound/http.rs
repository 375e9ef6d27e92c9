//! L7 forwarding: absolute-form requests on the explicit listener, and intercepted HTTP/1.1 and
//! HTTP/2 (prior knowledge, gRPC) connections on the transparent one.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};

use super::{text, Body, Outbound, MAX_ATTEMPTS};
use crate::metrics::response_class;
use crate::{APP_PROTOCOL_HEADER, SOURCE_CLUSTER_HEADER, UPSTREAM_FAILURE_HEADER};
use strait_api::snapshot::{ServiceEntry, Snapshot};

/// Requests are buffered so a failed attempt can be retried elsewhere; larger bodies are refused.
const MAX_BUFFERED_BODY: usize = 8 * 1024 * 1024;

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

impl Outbound {
    /// An absolute-form request on the explicit listener: the service comes from its host.
    pub(super) async fn forward(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let snap = self.config.borrow().clone();
        let (svc, port) = match self.resolve(&snap, req.uri().authority(), 80) {
            Ok(x) => x,
            Err(no_route) => return no_route.response(),
        };
        self.forward_to(&snap, &svc, port, req).await
    }

    /// Sends a request to an endpoint of `svc`, retrying where that is safe. The response goes
    /// back in the HTTP version the app spoke; an HTTP/2 request (gRPC) reaches the destination
    /// app as HTTP/2 too.
    pub(crate) async fn forward_to(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let downstream = req.version();
        let (mut parts, body) = req.into_parts();
        let body: Bytes = match Limited::new(body, MAX_BUFFERED_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body could not be buffered (limit {MAX_BUFFERED_BODY} bytes): {e}"),
                )
            }
        };
        strip_hop(&mut parts.headers);
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
        let idempotent = matches!(
            parts.method,
            hyper::Method::GET
                | hyper::Method::HEAD
                | hyper::Method::OPTIONS
                | hyper::Method::PUT
                | hyper::Method::DELETE
        );
        let host = svc.host();
        let mut tried = vec![];
        let mut last_error = String::from("no endpoint of the service is known");
        let mut stale_retry: Option<usize> = None;
        for attempt in 0..MAX_ATTEMPTS + 1 {
            let pick = match stale_retry.take() {
                Some(i) => Some(i),
                None if attempt < MAX_ATTEMPTS => self.balancer.pick(snap, svc, &tried),
                None => None,
            };
            let Some(i) = pick else {
                break;
            };
            tried.push(i);
            let ep = &svc.endpoints[i];
            if attempt > 0 {
                self.metrics
                    .retries
                    .with_label_values(&[&host, "connect_failure"])
                    .inc();
            }
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
            let mut upstream_req = Request::from_parts(parts.clone(), Full::new(body.clone()));
            *upstream_req.version_mut() = Version::HTTP_2;
            match sender.send_request(upstream_req).await {
                Ok(resp) if resp.headers().contains_key(UPSTREAM_FAILURE_HEADER) => {
                    self.balancer.failure(snap, svc, ep);
                    last_error = format!("{} could not reach its application", ep.key);
                    let connect = resp
                        .headers()
                        .get(UPSTREAM_FAILURE_HEADER)
                        .is_some_and(|v| v == "connect");
                    if !(connect || idempotent) {
                        // The app may have acted on it: give the caller the answer, do not retry.
                        let (mut rparts, rbody) = resp.into_parts();
                        rparts.version = downstream;
                        rparts.headers.remove(UPSTREAM_FAILURE_HEADER);
                        return Response::from_parts(rparts, rbody.boxed());
                    }
                }
                Ok(resp) => {
                    self.balancer.success(ep);
                    let status = resp.status().as_u16();
                    let labels = [self.cluster.as_str(), ep.locality.cluster.as_str(), host.as_str()];
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
                    return Response::from_parts(rparts, rbody.boxed());
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
                        break;
                    }
                }
            }
        }
        self.metrics
            .requests
            .with_label_values(&[&self.cluster, "none", &host, "5xx"])
            .inc();
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no healthy endpoint of {host} answered after {} attempt(s): {last_error}",
                tried.len()
            ),
        )
    }
}
