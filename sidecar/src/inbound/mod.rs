//! The inbound listener: terminate mTLS from other sidecars (any identity of a trusted domain),
//! then forward plaintext to the app on loopback. HTTP arrives in the version the calling app
//! spoke (HTTP/1.1 on a pooled connection, or HTTP/2 for gRPC; an older caller sends HTTP/2
//! for both) and leaves in the app's: HTTP/1.1, or HTTP/2 when the caller's app spoke it.
//! Opaque TCP is spliced after a one-byte status that tells the caller whether the app
//! answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_api::coalesce::Coalesced;
use strait_api::drain::Watch;
use strait_trust::{CertStore, PeerPolicy, ServerAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod early;

use crate::metrics::{response_class, SidecarMetrics};
use crate::outbound::{drive, Body, Leaving};
use crate::telemetry::{Counted, Tally, Telemetry};
use crate::{APP_PROTOCOL_HEADER, SOURCE_CLUSTER_HEADER, UPSTREAM_FAILURE_HEADER};
use strait_api::telemetry::{Edge, Reporter, ServiceName, Workload, PEER_METADATA_HEADER};
use strait_api::trace::SpanKind;

pub struct Inbound {
    cluster: String,
    service: String,
    app_addr: SocketAddr,
    store: CertStore,
    metrics: SidecarMetrics,
    client: Client<HttpConnector, Counted<hyper::body::Incoming>>,
    /// HTTP/2 with prior knowledge, for callers that spoke HTTP/2 to their sidecar (gRPC).
    h2_client: Client<HttpConnector, Counted<hyper::body::Incoming>>,
    limits: crate::ProxyLimits,
    /// The config (for the TrafficPolicy of this workload's service) and its key.
    config: Option<(
        tokio::sync::watch::Receiver<Arc<strait_api::snapshot::Snapshot>>,
        String,
    )>,
    limiter: crate::policy::RateLimiter,
    /// This workload as the destination of what it reports; its tracer and access log.
    telemetry: Arc<Telemetry>,
    service_name: Arc<ServiceName>,
}

impl Inbound {
    pub fn new(
        cluster: String,
        service: String,
        app_addr: SocketAddr,
        store: CertStore,
        metrics: SidecarMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone());
        let h2_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .build(connector);
        let service_name = Arc::new(ServiceName {
            host: format!("{service}.unknown.{}", strait_api::snapshot::CLUSTERSET_SUFFIX),
            name: service.clone(),
            namespace: strait_api::telemetry::UNKNOWN.into(),
        });
        Inbound {
            cluster,
            service,
            app_addr,
            store,
            metrics,
            client,
            h2_client,
            limits: crate::ProxyLimits::default(),
            config: None,
            limiter: crate::policy::RateLimiter::default(),
            telemetry: Arc::default(),
            service_name,
        }
    }

    /// This workload as metrics, traces and logs name it.
    pub fn telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    fn snapshot(&self) -> Arc<strait_api::snapshot::Snapshot> {
        self.config
            .as_ref()
            .map(|(c, _)| c.borrow().clone())
            .unwrap_or_default()
    }

    /// The service this workload serves, as metrics name it (set with its namespace).
    fn service_name(&self) -> Arc<ServiceName> {
        self.service_name.clone()
    }

    /// Enforces the TrafficPolicies and AuthorizationPolicies of `namespace/service`.
    pub fn policies(
        mut self,
        config: tokio::sync::watch::Receiver<Arc<strait_api::snapshot::Snapshot>>,
        namespace: &str,
    ) -> Self {
        let key = format!("{namespace}/{}", self.service);
        self.config = Some((config, key));
        self.service_name = Arc::new(ServiceName {
            host: format!(
                "{}.{namespace}.{}",
                self.service,
                strait_api::snapshot::CLUSTERSET_SUFFIX
            ),
            name: self.service.clone(),
            namespace: namespace.to_string(),
        });
        self
    }

    /// The AuthorizationPolicies that apply to this workload, if any.
    fn authz_policies(&self) -> Vec<Arc<strait_api::authz::CompiledAuthz>> {
        let Some((config, key)) = self.config.as_ref() else {
            return vec![];
        };
        let snap = config.borrow().clone();
        if snap.authz.is_empty() {
            return vec![];
        }
        let namespace = key.split('/').next().unwrap_or_default();
        let labels = self.telemetry.local.labels(&snap);
        snap.authz
            .iter()
            .filter(|p| strait_api::authz::applies(p, &self.service, namespace, &labels))
            .cloned()
            .collect()
    }

    /// Counts (and logs, for denials and audits) one decision.
    fn record(&self, d: &strait_api::authz::Decision, peer: &PeerAuth) {
        let decision = if d.allowed { "allow" } else { "deny" };
        let (policy, rule) = d
            .policy
            .as_ref()
            .map(|(p, r)| (p.clone(), r.to_string()))
            .unwrap_or_else(|| ("none".into(), "none".into()));
        self.metrics
            .authz
            .with_label_values(&[&policy, &rule, d.action, decision])
            .inc();
        for (p, r) in &d.audited {
            self.metrics
                .authz
                .with_label_values(&[p, &r.to_string(), "AUDIT", "audit"])
                .inc();
            tracing::info!(policy = %p, rule = r, principal = ?peer.principal, cluster = ?peer.cluster, "authorization audit");
        }
        if !d.allowed {
            tracing::info!(policy = %policy, rule = %rule, principal = ?peer.principal, cluster = ?peer.cluster, service = %self.service, "request denied by authorization policy");
        }
    }

    /// Authorization for one HTTP request: the path normalized (the application gets the same
    /// form the decision saw), then the decision. Returns the refusal to send, if any.
    fn authorize_http(&self, parts: &mut hyper::http::request::Parts, peer: &PeerAuth) -> Option<Response<Body>> {
        let policies = self.authz_policies();
        if policies.is_empty() {
            return None;
        }
        let path = match strait_api::authz::normalize_path(parts.uri.path()) {
            Ok(p) => p,
            Err(why) => {
                self.metrics
                    .authz
                    .with_label_values(&["none", "none", "NORMALIZE", "deny"])
                    .inc();
                return Some(crate::outbound::text(
                    StatusCode::BAD_REQUEST,
                    format!("request path refused: {why}"),
                ));
            }
        };
        let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_default();
        if let Ok(uri) = format!("http://{authority}{path}{query}").parse() {
            parts.uri = uri;
        }
        let host = parts
            .uri
            .host()
            .map(str::to_string)
            .or_else(|| {
                parts
                    .headers
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.split(':').next().unwrap_or(h).to_string())
            })
            .unwrap_or_default();
        let attrs = strait_api::authz::HttpAttrs {
            method: parts.method.as_str(),
            path: &path,
            host: &host,
            headers: &parts.headers,
        };
        let refs: Vec<&strait_api::authz::CompiledAuthz> = policies.iter().map(|p| p.as_ref()).collect();
        let d = strait_api::authz::decide(&refs, &peer.view(), self.app_addr.port(), Some(&attrs));
        self.record(&d, peer);
        if d.allowed {
            return None;
        }
        let message = format!(
            "RBAC: access denied{}",
            d.policy
                .as_ref()
                .map(|(p, r)| format!(" by {p} rule {r}"))
                .unwrap_or_default()
        );
        let grpc = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        Some(if grpc {
            crate::outbound::grpc_status(7, &message)
        } else {
            crate::outbound::text(StatusCode::FORBIDDEN, message)
        })
    }

    /// A TrafficPolicy's local rate limit, enforced here at the destination: per proxy, or a
    /// destination total divided among the service's ready endpoints in every cluster in
    /// proportion to the requests each receives (`federation/src/rateshare.rs`).
    /// Returns the refusal to send (429 with retry-after, or RESOURCE_EXHAUSTED for gRPC).
    fn rate_limited(&self, parts: &hyper::http::request::Parts) -> Option<Response<Body>> {
        let (config, key) = self.config.as_ref()?;
        let snap = config.borrow().clone();
        // The service's limit, then the limit of the route rule that routed the request (the
        // calling sidecar names it; see `RATE_LIMIT_TARGET_HEADER`), each its own bucket.
        let rule = parts
            .headers
            .get(crate::RATE_LIMIT_TARGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| t.contains('#'));
        std::iter::once(key.as_str())
            .chain(rule)
            .find_map(|target| self.over_limit(&snap, key, target, parts))
    }

    /// The refusal when the rate limit of the TrafficPolicy for `target` (a service key, or
    /// `<ns>/<svc>#<rule>`) has no token for this request.
    fn over_limit(
        &self,
        snap: &strait_api::snapshot::Snapshot,
        key: &str,
        target: &str,
        parts: &hyper::http::request::Parts,
    ) -> Option<Response<Body>> {
        let tp = snap.traffic.get(target)?;
        let limit = tp.rate_limit.as_ref()?;
        let share = if limit.per_destination {
            // This endpoint's share as the controller divides the total by the demand on this
            // service's endpoints; until it has, an equal share of its ready endpoints.
            snap.rate_shares
                .get(key)
                .and_then(|shares| shares.get(self.telemetry.local.share_key()).copied())
                .unwrap_or_else(|| {
                    let ready = snap
                        .services
                        .get(key)
                        .map(|s| s.endpoints.iter().filter(|e| e.ready).count())
                        .unwrap_or(1)
                        .max(1);
                    1.0 / ready as f64
                })
        } else {
            1.0
        };
        if self.limiter.allow(target, limit, share, std::time::Instant::now()) {
            return None;
        }
        let host = format!(
            "{}.{}.svc.clusterset.local",
            self.service,
            key.split('/').next().unwrap_or_default()
        );
        if limit.shadow {
            self.metrics
                .policy
                .with_label_values(&[&host, "rate_limited_shadow"])
                .inc();
            return None;
        }
        self.metrics.policy.with_label_values(&[&host, "rate_limited"]).inc();
        let message = format!(
            "rate limited by TrafficPolicy {}/{} ({} requests/s{})",
            tp.namespace,
            tp.name,
            limit.per_second,
            match (limit.per_destination, target.split_once('#')) {
                (true, None) => " for the whole service".to_string(),
                (false, None) => " per proxy".to_string(),
                (true, Some((_, rule))) => format!(" for route rule {rule}"),
                (false, Some((_, rule))) => format!(" per proxy for route rule {rule}"),
            }
        );
        let grpc = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let mut resp = if grpc {
            crate::outbound::grpc_status(8, &message)
        } else {
            crate::outbound::text(StatusCode::TOO_MANY_REQUESTS, message)
        };
        resp.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert("x-strait-flags", HeaderValue::from_static("RL"));
        Some(resp)
    }

    pub fn limits(mut self, limits: crate::ProxyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves until draining starts; open connections then finish what they carry (an
    /// HTTP/1.1 one after [`crate::outbound::H1_DRAIN_GRACE`]).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Watch) -> anyhow::Result<()> {
        let config = strait_trust::server_config(
            &self.store,
            PeerPolicy::AnyInBundle,
            ServerAuth::RequireClientCert,
            // HTTP/1.1 first: a caller that offers it with HTTP/2 does so for an app's HTTP/1
            // request, and an older caller offers HTTP/2 alone.
            &[strait_trust::ALPN_H1, strait_trust::ALPN_H2, strait_trust::ALPN_TCP],
        )?;
        // Opaque streams: the caller's early data is taken behind a resumed ClientHello and the
        // answer leaves before the caller's Finished (see `early`).
        let opaque = Arc::new(early::opaque(config.clone()));
        let config = Arc::new(config);
        // Accepted connections inherit it: a caller gone silent frees what it held.
        if let Err(e) = strait_api::transport::detect_dead_peers(&listener) {
            tracing::warn!(error = %e, "inbound listener: could not set dead-peer detection");
        }
        loop {
            let mut signal = drain.clone();
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = signal.signaled() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let (config, opaque) = (config.clone(), opaque.clone());
            let guard = drain.guard();
            tokio::spawn(async move {
                let _guard = guard;
                let handshake = async {
                    let hello = early::client_hello(&stream).await?;
                    if !opaque_only(&hello) {
                        let tls = tokio_rustls::StartHandshake::from_parts(hello, stream)
                            .into_stream(config)
                            .await?;
                        return Ok(Identified::Http(Box::new(tls)));
                    }
                    let tls = early::accept(hello, opaque, stream).await?;
                    Ok::<_, std::io::Error>(Identified::Opaque(Box::new(tls)))
                };
                let identified = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                    Ok(Ok(identified)) => identified,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "inbound TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let metrics = this.store.metrics();
                match identified {
                    Identified::Opaque(mut tls) => {
                        metrics.handshake_completed("server", tls.connection().handshake_kind());
                        if tls.early_data_accepted() {
                            metrics.early_data("server", true);
                        }
                        this.splice(*tls).await
                    }
                    Identified::Http(tls) => {
                        metrics.handshake_completed("server", tls.get_ref().1.handshake_kind());
                        let h1 = tls.get_ref().1.alpn_protocol() == Some(strait_trust::ALPN_H1);
                        this.serve_http(*tls, signal, !h1).await
                    }
                }
            });
        }
    }

    /// Serves another sidecar's requests in the protocol its handshake chose: HTTP/2, or
    /// HTTP/1.1 (one request at a time; the caller pools the connection).
    async fn serve_http(self: Arc<Self>, tls: tokio_rustls::server::TlsStream<TcpStream>, mut drain: Watch, h2: bool) {
        let limits = self.limits.clone();
        let peer = Arc::new(PeerAuth::of(tls.get_ref().1));
        let leaving = Leaving::default();
        let marks = leaving.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (this, peer) = (self.clone(), peer.clone());
            marks.answer(false, async move { this.to_app(req, &peer).await })
        });
        // The protocol ALPN chose, with the outbound side's limits.
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        crate::outbound::auto_limits(&mut builder, &limits);
        if h2 {
            builder = builder.http2_only();
            builder.http2().keep_alive_interval(Some(Duration::from_secs(20)));
        } else {
            builder = builder.http1_only();
            // A pooled connection waits idle between requests for as long as the caller keeps
            // it (an authenticated sidecar, which closes it when unused): no header timeout
            // here, or a request sent as it fires would be lost.
            builder.http1().header_read_timeout(None);
        }
        let result = drive!(
            builder.serve_connection(TokioIo::new(Coalesced::new(tls)), svc),
            drain,
            (!h2).then_some(&leaving)
        );
        if let Err(e) = result {
            tracing::debug!(error = %e, h2, "inbound connection from a sidecar ended with an error");
        }
    }

    /// One request from another sidecar to the app, reported as `reporter="destination"`,
    /// with a server span (child of the caller's client span) and an access log entry.
    async fn to_app(&self, req: Request<hyper::body::Incoming>, peer: &PeerAuth) -> Response<Body> {
        let started = std::time::Instant::now();
        let grpc = crate::telemetry::is_grpc(req.headers());
        let source = peer.source(req.headers().get(PEER_METADATA_HEADER));
        let tally = Arc::new(Tally::default());
        let mut req = req.map(|b| Counted::into_tally(b, grpc, tally.clone()));
        let service = self.service_name();
        // The server span (child of the caller's client span): the app sees it as the parent
        // of whatever it calls next.
        let app = self.app_addr;
        let hop = self.telemetry.start_hop(&mut req, None, SpanKind::Server, || {
            format!("{}:{}/*", service.host, app.port())
        });
        let resp = self.app_request(req, peer).await;
        let upstream_time = started.elapsed();
        let (destination, _) = self.telemetry.local.current(&self.snapshot());
        let metrics = self.metrics.istio.clone();
        crate::telemetry::report(resp, started, grpc, tally, move |outcome| {
            let edge = Edge {
                reporter: Reporter::Destination,
                source: &source,
                destination: &destination,
                service: &service,
                protocol: if grpc { "grpc" } else { "http" },
            };
            metrics.record_http(&edge, outcome);
            hop.finish(outcome, &source, &destination, || crate::telemetry::Upstream {
                cluster: format!("inbound|{}||", app.port()),
                host: Some(app),
                time: Some(upstream_time),
                peer: source.principal.clone(),
                route: None,
            });
        })
    }

    async fn app_request(&self, req: Request<Counted<hyper::body::Incoming>>, peer: &PeerAuth) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        if let Some(refused) = self.authorize_http(&mut parts, peer) {
            return refused;
        }
        if let Some(refused) = self.rate_limited(&parts) {
            return refused;
        }
        parts.headers.remove(PEER_METADATA_HEADER);
        parts.headers.remove(crate::RATE_LIMIT_TARGET_HEADER);
        // Sent by older sidecars; the caller's cluster is the one its certificate names.
        parts.headers.remove(SOURCE_CLUSTER_HEADER);
        let source = peer.cluster.clone().unwrap_or_else(|| "unknown".into());
        let authority = parts.uri.authority().map(|a| a.to_string());
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        parts.uri = match format!("http://{}{}", self.app_addr, path).parse() {
            Ok(u) => u,
            Err(_) => return crate::outbound::text(StatusCode::BAD_REQUEST, "malformed request path"),
        };
        let h2 = parts.headers.remove(APP_PROTOCOL_HEADER).is_some_and(|v| v == "h2");
        let client = if h2 {
            parts.version = hyper::Version::HTTP_2;
            &self.h2_client
        } else {
            parts.version = hyper::Version::HTTP_11;
            if let Some(host) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                parts.headers.insert(hyper::header::HOST, host);
            }
            &self.client
        };
        let resp = match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let (mut rparts, rbody) = resp.into_parts();
                crate::outbound::strip_hop(&mut rparts.headers);
                // Only this sidecar may say the app was unreachable (it makes callers retry).
                rparts.headers.remove(UPSTREAM_FAILURE_HEADER);
                Response::from_parts(rparts, rbody.map_err(Into::into).boxed())
            }
            Err(e) => {
                let mut resp = crate::outbound::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{} in cluster {} could not reach its application at {}: {e}",
                        self.service, self.cluster, self.app_addr
                    ),
                );
                // "connect": the app never saw the request, any retry is safe. "reset": the app
                // went away mid-request; only idempotent requests may be retried.
                let kind = if e.is_connect() { "connect" } else { "reset" };
                resp.headers_mut()
                    .insert(UPSTREAM_FAILURE_HEADER, HeaderValue::from_static(kind));
                resp
            }
        };
        self.metrics
            .inbound_requests
            .with_label_values(&[&source, response_class(resp.status().as_u16())])
            .inc();
        resp
    }

    async fn splice(self: Arc<Self>, mut tls: early::ServerTls<TcpStream>) {
        // The caller as its certificate says (a resumed session's: the full handshake's): for
        // the decision and for what is reported.
        let peer = PeerAuth::of(tls.connection());
        let policies = self.authz_policies();
        if !policies.is_empty() {
            let refs: Vec<&strait_api::authz::CompiledAuthz> = policies.iter().map(|p| p.as_ref()).collect();
            let d = strait_api::authz::decide(&refs, &peer.view(), self.app_addr.port(), None);
            self.record(&d, &peer);
            if !d.allowed {
                // Denied TCP is reset: no byte reaches the application.
                self.metrics
                    .connections
                    .with_label_values(&["inbound", "unknown", &self.cluster, &self.service, "denied"])
                    .inc();
                return;
            }
        }
        let app = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.app_addr)).await;
        let app = match app {
            Ok(Ok(app)) => app,
            _ => {
                let _ = tls.write_all(&[1]).await;
                let _ = tls.shutdown().await;
                // The caller may have sent its client's first bytes behind its handshake; read
                // them off until it closes, so the socket is not closed with unread data (a
                // reset, which could overtake the status byte on its way back).
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut sink = [0u8; 4096];
                    while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                self.metrics
                    .connections
                    .with_label_values(&["inbound", "unknown", &self.cluster, &self.service, "app_unreachable"])
                    .inc();
                return;
            }
        };
        let _ = app.set_nodelay(true);
        if tls.write_all(&[0]).await.is_err() {
            return;
        }
        // Istio's TCP family as `reporter="destination"`.
        let source = Workload::from_metadata(None, peer.principal.as_deref(), peer.cluster.as_deref());
        let (destination, _) = self.telemetry.local.current(&self.snapshot());
        let service = self.service_name();
        let edge = Edge {
            reporter: Reporter::Destination,
            source: &source,
            destination: &destination,
            service: &service,
            protocol: "tcp",
        };
        let upstream = crate::telemetry::Upstream {
            cluster: format!("inbound|{}||", self.app_addr.port()),
            host: Some(self.app_addr),
            time: None,
            peer: source.principal.clone(),
            route: None,
        };
        let result = self
            .telemetry
            .splice_reported(
                &self.metrics.istio,
                &edge,
                tls,
                app,
                self.limits.tcp_idle_timeout,
                upstream,
                0,
            )
            .await;
        self.metrics
            .connections
            .with_label_values(&["inbound", "unknown", &self.cluster, &self.service, result])
            .inc();
    }
}

/// An inbound connection whose caller is known, by the protocol it chose.
enum Identified {
    /// HTTP/1.1 or HTTP/2 (handshake complete).
    Http(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// An opaque stream, usable from a resumed session's ClientHello on.
    Opaque(Box<early::ServerTls<TcpStream>>),
}

/// Whether the connection offers only opaque TCP: what `serve`'s ALPN preference would choose,
/// decided before the handshake (an opaque stream is served by `early::ServerTls`).
fn opaque_only(hello: &rustls::server::Accepted) -> bool {
    let Some(alpn) = hello.client_hello().alpn() else {
        return false;
    };
    let (mut tcp, mut http) = (false, false);
    for p in alpn {
        tcp |= p == strait_trust::ALPN_TCP;
        http |= p == strait_trust::ALPN_H1 || p == strait_trust::ALPN_H2;
    }
    tcp && !http
}

/// The verified caller of one inbound connection.
struct PeerAuth {
    principal: Option<String>,
    cluster: Option<String>,
    /// The calling workload as the last request's metadata header named it, with that header:
    /// the requests of one connection come from one sidecar, so the header is read once, not
    /// on every request.
    source: std::sync::Mutex<Option<(hyper::header::HeaderValue, Arc<Workload>)>>,
}

impl PeerAuth {
    fn of(conn: &rustls::ServerConnection) -> Self {
        let certs = conn.peer_certificates();
        PeerAuth {
            principal: strait_trust::peer_identity(certs).map(|id| id.to_string()),
            cluster: strait_trust::peer_cluster(certs),
            source: Default::default(),
        }
    }

    /// The calling workload: the metadata header's fields, the certificate's identity.
    fn source(&self, header: Option<&hyper::header::HeaderValue>) -> Arc<Workload> {
        let mut last = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some((seen, w)), Some(h)) = (last.as_ref(), header) {
            if seen == h {
                return w.clone();
            }
        }
        let w = Arc::new(Workload::from_metadata(
            header.and_then(|v| v.to_str().ok()),
            self.principal.as_deref(),
            self.cluster.as_deref(),
        ));
        if let Some(h) = header {
            *last = Some((h.clone(), w.clone()));
        }
        w
    }

    fn view(&self) -> strait_api::authz::Peer<'_> {
        strait_api::authz::Peer {
            principal: self.principal.as_deref(),
            cluster: self.cluster.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_connections_caller_is_read_from_its_metadata_once_per_header_value() {
        let peer = PeerAuth {
            principal: Some("spiffe://mesh.local/ns/shop/sa/cart".into()),
            cluster: Some("east".into()),
            source: Default::default(),
        };
        let v1 = HeaderValue::from_static("workload=cart-v1;app=cart;version=v1");
        let first = peer.source(Some(&v1));
        assert_eq!(
            (first.workload.as_str(), first.app.as_str(), first.version.as_str()),
            ("cart-v1", "cart", "v1")
        );
        // The certificate names the namespace and cluster, whatever the header says.
        assert_eq!((first.namespace.as_str(), first.cluster.as_str()), ("shop", "east"));
        assert!(Arc::ptr_eq(&first, &peer.source(Some(&v1.clone()))));
        let v2 = HeaderValue::from_static("workload=cart-v2;app=cart;version=v2");
        let second = peer.source(Some(&v2));
        assert_eq!(second.version, "v2");
        assert!(!Arc::ptr_eq(&first, &second));
        let none = peer.source(None);
        assert_eq!(
            (none.workload.as_str(), none.principal.as_str()),
            ("unknown", "spiffe://mesh.local/ns/shop/sa/cart")
        );
        assert_eq!(peer.source(Some(&v2)).version, "v2");
    }
}
