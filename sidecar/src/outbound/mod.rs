//! The outbound listener. Connections iptables redirected here are handled transparently (see
//! `transparent.rs`); connections made to the listener itself are an explicit HTTP proxy for
//! mesh names:
//!
//! `GET http://<svc>.<ns>.svc.clusterset.local/...` (absolute form) is proxied at L7 over a
//! pooled HTTP/2 mTLS connection; `CONNECT <svc>.<ns>.svc.clusterset.local:<port>` opens an
//! opaque TCP tunnel. Either way the endpoint comes from the locality-aware balancer, and a
//! failure to connect (or an inbound sidecar reporting its app unreachable) is retried on
//! another endpoint and counted by outlier detection.

mod http;
pub(crate) use http::strip_hop;
mod tcp;
mod transparent;
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

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How many endpoints one request may try.
const MAX_ATTEMPTS: usize = 3;

pub struct Outbound {
    cluster: String,
    config: watch::Receiver<Arc<Snapshot>>,
    balancer: Balancer,
    upstreams: Upstreams,
    metrics: SidecarMetrics,
    unknown: UnknownDestinations,
    sniff_timeout: std::time::Duration,
}

/// Why a request names nothing the proxy can route: answered with this status and message.
pub(crate) struct NoRoute(StatusCode, String);

impl NoRoute {
    fn response(self) -> Response<Body> {
        text(self.0, self.1)
    }
}

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
            sniff_timeout: std::time::Duration::from_millis(100),
        }
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
            tokio::spawn(async move {
                let tunnels = signal.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    let tunnels = tunnels.clone();
                    async move { Ok::<_, Infallible>(this.handle(req, tunnels).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = signal.signaled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
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
            let msg = if host.trim_end_matches('.').ends_with(CLUSTERSET_SUFFIX) {
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
