//! Opaque TCP to a mesh service: CONNECT on the explicit listener, and intercepted connections
//! that are not HTTP (TLS, other protocols) on the transparent one.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use strait_api::drain::Watch;
use strait_api::snapshot::{ServiceEntry, Snapshot};
use strait_api::telemetry::{Edge, Reporter, ServiceName, Workload};

use super::{text, Body, Outbound, MAX_ATTEMPTS};
use crate::upstream::UpstreamTls;
use crate::Io;

/// Why no endpoint took a connection: how many were tried and the last error.
pub(crate) struct NoEndpoint {
    pub tried: usize,
    pub last_error: String,
}

impl Outbound {
    /// Opens an opaque stream to an endpoint of `svc` (or to endpoint `only` when the caller
    /// dialled that endpoint's address), retrying connect failures on other endpoints; returns
    /// the stream and the endpoint's index.
    pub(crate) async fn open_tcp(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        only: Option<usize>,
    ) -> Result<(UpstreamTls, usize), NoEndpoint> {
        let host = svc.host();
        let mut tried = vec![];
        let mut last_error = String::from("no endpoint of the service is known");
        for attempt in 0..MAX_ATTEMPTS {
            let pick = match only {
                Some(i) if tried.is_empty() => Some(i),
                Some(_) => None,
                None => self.balancer.pick(snap, svc, &tried),
            };
            let Some(i) = pick else { break };
            tried.push(i);
            let ep = &svc.endpoints[i];
            if attempt > 0 {
                self.metrics
                    .retries
                    .with_label_values(&[&host, "connect_failure"])
                    .inc();
            }
            match self.upstreams.tcp(snap, svc, ep, port).await {
                Ok(upstream) => {
                    self.balancer.success(ep);
                    return Ok((upstream, i));
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep.key(), error = %e, "upstream connect failed; trying another endpoint");
                    self.balancer.failure(snap, svc, ep);
                    if e.gateway_down() {
                        self.balancer.gateway_failure(snap, &ep.locality().cluster);
                    }
                    last_error = e.to_string();
                }
            }
        }
        self.metrics
            .connections
            .with_label_values(&["outbound", &self.cluster, "none", &host, "no_endpoint"])
            .inc();
        Err(NoEndpoint {
            tried: tried.len(),
            last_error,
        })
    }

    /// Copies both ways until either side closes, then counts the connection (Istio's TCP
    /// family as `reporter="source"`) to endpoint `i` of `svc`.
    pub(crate) async fn splice(&self, client: impl Io, upstream: UpstreamTls, svc: &ServiceEntry, i: usize, port: u16) {
        let (ep, service) = (&svc.endpoints[i], &ServiceName::of(svc));
        let (source, _) = self.telemetry.local.current(&self.config.borrow().clone());
        let destination = Workload::of_endpoint(svc, i);
        let edge = Edge {
            reporter: Reporter::Source,
            source: &source,
            destination: &destination,
            service,
            protocol: "tcp",
        };
        let upstream_io = upstream;
        let upstream = crate::telemetry::Upstream {
            cluster: format!("outbound|{port}||{}", service.host),
            host: Some(ep.address.socket()),
            time: None,
            peer: destination.principal.clone(),
            route: None,
        };
        let result = self
            .telemetry
            .splice_reported(
                &self.metrics.istio,
                &edge,
                client,
                upstream_io,
                self.limits.tcp_idle_timeout,
                upstream,
            )
            .await;
        self.metrics
            .connections
            .with_label_values(&["outbound", &self.cluster, &ep.locality().cluster, &service.host, result])
            .inc();
    }

    pub(super) async fn connect(
        self: Arc<Self>,
        mut req: Request<hyper::body::Incoming>,
        drain: Watch,
    ) -> Response<Body> {
        let snap = self.config.borrow().clone();
        let (svc, port) = match self.resolve(&snap, req.uri().authority(), 443) {
            Ok(x) => x,
            Err(no_route) => return no_route.response(),
        };
        let host = svc.host();
        match self.open_tcp(&snap, &svc, port, None).await {
            Ok((upstream, i)) => {
                let this = self.clone();
                // An open tunnel holds the drain until it closes or the deadline passes.
                let guard = drain.guard();
                tokio::spawn(async move {
                    let _guard = guard;
                    match hyper::upgrade::on(&mut req).await {
                        Ok(upgraded) => this.splice(TokioIo::new(upgraded), upstream, &svc, i, port).await,
                        Err(_) => {
                            this.metrics
                                .connections
                                .with_label_values(&[
                                    "outbound",
                                    &this.cluster,
                                    &svc.endpoints[i].locality().cluster,
                                    &host,
                                    "upgrade_failed",
                                ])
                                .inc();
                        }
                    }
                });
                Response::new(Body::default())
            }
            Err(NoEndpoint { tried, last_error }) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy endpoint of {host} accepted a connection after {tried} attempt(s): {last_error}"),
            ),
        }
    }
}
