//! The outbound listener. Connections iptables redirected here are handled transparently (see
//! `transparent.rs`); connections made to the listener itself are an explicit HTTP proxy for
//! mesh names:
//!
//! `GET http://<svc>.<ns>.svc.clusterset.local/...` (absolute form, or HTTP/2 with that
//! `:authority`) is proxied at L7 over a pooled HTTP/2 mTLS connection; `CONNECT <svc>.<ns>.svc.clusterset.local:<port>` opens an
//! opaque TCP tunnel. Either way the endpoint comes from the locality-aware balancer, and a
//! failure to connect (or an inbound sidecar reporting its app unreachable) is retried on
//! another endpoint and counted by outlier detection.

/// Drives a hyper server connection until it ends, or until draining starts and it finished
/// gracefully what it had in flight. HTTP/2 sends GOAWAY at once: the peer finishes what is in
/// flight and opens new streams elsewhere. HTTP/1.1 has no GOAWAY, and a connection closed
/// while idle could meet a request the peer is sending, lost to it; so for an HTTP/1.1
/// connection (given its [`Leaving`] flag, which its service marks answers with) what arrives
/// for [`H1_DRAIN_GRACE`] is answered with `Connection: close` (the peer drops the connection
/// after that answer) and only then does what is still idle close.
macro_rules! drive {
    ($conn:expr, $drain:expr) => {
        $crate::outbound::drive!($conn, $drain, None)
    };
    ($conn:expr, $drain:expr, $h1:expr) => {{
        let conn = $conn;
        let h1: Option<&$crate::outbound::Leaving> = $h1;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $drain.signaled() => {
                let ended = match h1 {
                    Some(leaving) => {
                        leaving.start();
                        tokio::time::timeout($crate::outbound::H1_DRAIN_GRACE, conn.as_mut()).await.ok()
                    }
                    None => None,
                };
                match ended {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        }
    }};
}
pub(crate) use drive;

/// How long a draining sidecar keeps an idle HTTP/1.1 connection open, answering what arrives
/// on it with `Connection: close`, before closing it.
pub const H1_DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Set when an HTTP/1.1 connection starts draining ([`drive!`]): its answers from then on carry
/// `Connection: close`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Leaving(Arc<std::sync::atomic::AtomicBool>);

impl Leaving {
    pub(crate) fn start(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A service's answer (`resp`), given `Connection: close` if it comes while leaving, but not
    /// a protocol switch or an established tunnel (`connect`: the answer is to a CONNECT), which
    /// end the HTTP/1.1 exchange themselves.
    pub(crate) fn answer<B>(
        &self,
        connect: bool,
        resp: impl std::future::Future<Output = Response<B>>,
    ) -> impl std::future::Future<Output = Result<Response<B>, Infallible>> {
        let leaving = self.0.clone();
        // The pipeline's future holds every stage's state (33 KB in a debug build): on the heap,
        // what hyper's dispatcher holds and moves for each request is a pointer, not that.
        let resp = Box::pin(resp);
        async move {
            let mut resp = resp.await;
            let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
            if leaving.load(std::sync::atomic::Ordering::Relaxed) && !tunnel {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok(resp)
        }
    }
}

mod head;
pub use head::{check_head, Refusal};
mod explain;
mod http;
pub(crate) use http::{grpc_status, strip_hop};
mod replay;
mod route;
pub use replay::{Replay, ReplayBody, DEFAULT_REPLAY_BUFFER};
mod tcp;
mod transparent;
mod upgrade;
pub use transparent::{sniff, Sniffed, UnknownDestinations};

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use strait_api::drain::Watch;
use strait_api::snapshot::{ServiceEntry, Snapshot, CLUSTERSET_SUFFIX};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lb::Balancer;
use crate::metrics::SidecarMetrics;
use crate::upstream::Upstreams;

/// Bodies the proxy answers with: a relayed body (whose error may be the upstream's or the
/// proxy's own, e.g. a stream idle timeout) or one it made.
pub type Body = BoxBody<Bytes, replay::BoxError>;

/// How many endpoints one request may try.
const MAX_ATTEMPTS: usize = 3;
/// The most attempts a route's retry policy may ask for.
const MAX_ROUTE_ATTEMPTS: usize = 10;

pub struct Outbound {
    cluster: String,
    config: watch::Receiver<Arc<Snapshot>>,
    balancer: Balancer,
    upstreams: Upstreams,
    metrics: SidecarMetrics,
    unknown: UnknownDestinations,
    sniff_timeout: std::time::Duration,
    limits: crate::ProxyLimits,
    /// TrafficPolicy state: retry budgets and request pools per destination.
    traffic: TrafficState,
    /// This workload as the source of what it reports; its tracer and access log.
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// What this sidecar is sent of the catalog when it is scoped (None: every service), for
    /// the answer to a name it does not hold.
    scope: Option<String>,
}

#[derive(Default)]
pub(crate) struct TrafficState {
    pub budgets: crate::policy::RetryBudgets,
    pub pools: crate::policy::Pools,
}

/// Why a request names nothing the proxy can route: answered with this status and message.
pub(crate) struct NoRoute(StatusCode, String);

impl NoRoute {
    fn response(self) -> Response<Body> {
        text(self.0, self.1)
    }
}

/// Flow-control windows: a fast sender is held back once this much is in flight per stream
/// (and per connection), which bounds what a proxy buffers for a stream it relays.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Streams a client may open and reset before this side has accepted them.
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams this side may reset for a client's protocol errors before closing the connection.
const H2_MAX_LOCAL_RESETS: usize = 256;

/// Server limits on hyper's auto builder (HTTP/1.1 and HTTP/2; the inbound listener uses its
/// HTTP/2 side only): head size and read timeout, streams per connection, header list size,
/// flow-control windows, and the bounds on streams a client opens and resets at once
/// (CVE-2023-44487, rapid reset) or makes this side reset.
pub(crate) fn auto_limits(
    b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    l: &crate::ProxyLimits,
) {
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(l.header_read_timeout)
        .max_buf_size(l.max_header_bytes.max(8192))
        .max_headers(H1_MAX_HEADERS);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .max_header_list_size(l.max_header_bytes as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_STREAM_WINDOW as usize);
}

/// Answers bytes that are neither HTTP/1.1 nor an HTTP/2 preface on a port that promised HTTP
/// the way an HTTP/2 server answers a broken preface (RFC 9113 §3.4): GOAWAY(PROTOCOL_ERROR),
/// then an orderly close. What the client already sent is read and dropped first (a lingering
/// close, bounded), since closing a socket with unread input would reset it and could destroy
/// the GOAWAY in flight.
pub(crate) async fn refuse_non_http(mut stream: tokio::net::TcpStream, rejected: &prometheus::IntCounterVec) {
    use tokio::io::AsyncWriteExt;
    rejected.with_label_values(&["not_http"]).inc();
    // Length 8, type GOAWAY (7), no flags, stream 0; last stream 0, error PROTOCOL_ERROR (1).
    const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    if stream.write_all(&GOAWAY).await.is_ok() && stream.shutdown().await.is_ok() {
        linger_close(stream).await;
    }
}

/// After this side shut its write half: reads and drops what the client still sends (at most
/// 64 KiB, for at most a second), then closes. Closing a socket with unread input would reset
/// the connection and could destroy the last answer in flight.
pub(crate) async fn linger_close(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut dropped = 0usize;
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            dropped += n;
            if dropped > 64 * 1024 {
                break;
            }
        }
    })
    .await;
}

/// Header fields one HTTP/1.1 request may carry.
const H1_MAX_HEADERS: usize = 100;

pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

impl Outbound {
    /// Closes pooled upstream connections past their TrafficPolicy's idle timeout.
    pub fn reap_idle(&self) {
        self.upstreams.reap_idle();
    }

    pub fn new(
        cluster: String,
        config: watch::Receiver<Arc<Snapshot>>,
        balancer: Balancer,
        upstreams: Upstreams,
        metrics: SidecarMetrics,
    ) -> Self {
        Outbound {
            cluster,
            config,
            balancer,
            upstreams,
            metrics,
            unknown: UnknownDestinations::default(),
            traffic: TrafficState::default(),
            sniff_timeout: std::time::Duration::from_millis(100),
            limits: crate::ProxyLimits::default(),
            telemetry: Arc::default(),
            scope: None,
        }
    }

    /// Says this sidecar is scoped (`--scope-namespaces`, `--scope-authorized`), and how: a
    /// name it does not hold may be one the clusterset has outside its scope.
    pub fn scope(mut self, namespaces: &[String], authorized: bool) -> Self {
        let mut how = vec![];
        if !namespaces.is_empty() {
            how.push(format!(
                "--scope-namespaces {}: those namespaces' services and what their routes send to",
                namespaces.join(",")
            ));
        }
        if authorized {
            how.push("--scope-authorized: only services whose AuthorizationPolicies could let this workload in".into());
        }
        self.scope = (!how.is_empty()).then(|| how.join("; "));
        self
    }

    /// This workload as metrics, traces and logs name it.
    pub fn telemetry(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Bounds on what one client may make this proxy hold (replay buffer, heads, streams).
    pub fn limits(mut self, limits: crate::ProxyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// What to do with intercepted connections to destinations the mesh does not know.
    pub fn unknown_destinations(mut self, unknown: UnknownDestinations) -> Self {
        self.unknown = unknown;
        self
    }

    /// Serves until draining starts; open connections then finish their requests.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Watch) {
        loop {
            let mut signal = drain.clone();
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = signal.signaled() => return,
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let mut signal = drain.clone();
            let guard = drain.guard();
            if let Some(dst) = transparent::original_destination(&stream) {
                tokio::spawn(async move {
                    let _guard = guard;
                    this.transparent(stream, dst, signal).await;
                });
                continue;
            }
            let limits = self.limits.clone();
            let this_metrics = self.metrics.clone();
            tokio::spawn(async move {
                let tunnels = signal.clone();
                let leaving = Leaving::default();
                let marks = leaving.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let this = this.clone();
                    let tunnels = tunnels.clone();
                    let connect = req.method() == hyper::Method::CONNECT;
                    marks.answer(connect, async move { this.handle(req, tunnels).await })
                });
                // HTTP/1.1 (absolute form, CONNECT, Upgrade) or HTTP/2 with prior knowledge
                // (h2c, gRPC: the :authority names the service); anything else gets an HTTP/2
                // server's answer to a broken preface (GOAWAY), not an HTTP/1.1 error page.
                let started = tokio::time::Instant::now();
                let Some(sniffed) = transparent::detect(&stream, limits.header_read_timeout).await else {
                    return;
                };
                let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                auto_limits(&mut builder, &limits);
                let stream = if sniffed == Sniffed::Http1 {
                    // One deadline for the whole head, however it trickles in (slowloris).
                    let left = limits.header_read_timeout.saturating_sub(started.elapsed());
                    match head::admit(stream, limits.max_header_bytes, left, &this_metrics.rejected).await {
                        Some(s) => s,
                        None => return,
                    }
                } else {
                    stream
                };
                let result = match sniffed {
                    Sniffed::Http1 | Sniffed::H2 => {
                        drive!(
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), svc),
                            signal,
                            (sniffed == Sniffed::Http1).then_some(&leaving)
                        )
                    }
                    Sniffed::Tls | Sniffed::Opaque => {
                        refuse_non_http(stream, &this_metrics.rejected).await;
                        Ok(())
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "outbound client connection ended with an error");
                }
                drop(guard);
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>, drain: Watch) -> Response<Body> {
        if req.method() == hyper::Method::CONNECT {
            self.connect(req, drain).await
        } else {
            self.forward(req).await
        }
    }

    /// Finds the service and port a request names.
    fn resolve(
        &self,
        snap: &Snapshot,
        authority: Option<&hyper::http::uri::Authority>,
        default_port: u16,
    ) -> Result<(Arc<ServiceEntry>, u16), NoRoute> {
        let Some(authority) = authority else {
            return Err(NoRoute(
                StatusCode::BAD_REQUEST,
                "the request has no host: send absolute-form requests (curl -x) or CONNECT host:port".into(),
            ));
        };
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(default_port);
        let Some(svc) = snap.service_by_host(host) else {
            let msg = if let (true, Some(scope)) =
                (host.trim_end_matches('.').ends_with(CLUSTERSET_SUFFIX), &self.scope)
            {
                format!("{host} is not in this sidecar's scope ({scope}), or no cluster of the clusterset exports it (see `strait services`)")
            } else if host.trim_end_matches('.').ends_with(CLUSTERSET_SUFFIX) {
                format!("{host} is not exported by any cluster of the clusterset (see `strait services`)")
            } else {
                format!("{host} is not a mesh service: this proxy carries <service>.<namespace>.{CLUSTERSET_SUFFIX} names only")
            };
            return Err(NoRoute(StatusCode::NOT_FOUND, msg));
        };
        if svc.port(port).is_none() {
            let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
            return Err(NoRoute(
                StatusCode::NOT_FOUND,
                format!("{} has no port {port} (its ports: {})", svc.host(), ports.join(", ")),
            ));
        }
        Ok((svc.clone(), port))
    }
}
