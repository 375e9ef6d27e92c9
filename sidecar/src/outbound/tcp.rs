//! CONNECT: opaque TCP to a mesh service.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use strait_api::drain::Watch;

use super::{text, Body, Outbound, MAX_ATTEMPTS};

impl Outbound {
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
        let mut tried = vec![];
        let mut last_error = String::from("no endpoint of the service is known");
        for attempt in 0..MAX_ATTEMPTS {
            let Some(i) = self.balancer.pick(&snap, &svc, &tried) else {
                break;
            };
            tried.push(i);
            let ep = svc.endpoints[i].clone();
            if attempt > 0 {
                self.metrics
                    .retries
                    .with_label_values(&[&host, "connect_failure"])
                    .inc();
            }
            match self.upstreams.tcp(&snap, &svc, &ep, port).await {
                Ok(mut upstream) => {
                    self.balancer.success(&ep);
                    let this = self.clone();
                    let host = host.clone();
                    // An open tunnel holds the drain until it closes or the deadline passes.
                    let guard = drain.guard();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let result = match hyper::upgrade::on(&mut req).await {
                            Ok(upgraded) => {
                                let mut client = TokioIo::new(upgraded);
                                match tokio::io::copy_bidirectional_with_sizes(
                                    &mut client,
                                    &mut upstream,
                                    crate::SPLICE_BUF,
                                    crate::SPLICE_BUF,
                                )
                                .await
                                {
                                    Ok(_) => "ok",
                                    Err(_) => "reset",
                                }
                            }
                            Err(_) => "upgrade_failed",
                        };
                        this.metrics
                            .connections
                            .with_label_values(&["outbound", &this.cluster, &ep.locality.cluster, &host, result])
                            .inc();
                    });
                    return Response::new(Body::default());
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep.key, error = %e, "upstream connect failed; trying another endpoint");
                    self.balancer.failure(&snap, &svc, &ep);
                    if e.gateway_down() {
                        self.balancer.gateway_failure(&snap, &ep.locality.cluster);
                    }
                    last_error = e.to_string();
                }
            }
        }
        self.metrics
            .connections
            .with_label_values(&["outbound", &self.cluster, "none", &host, "no_endpoint"])
            .inc();
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no healthy endpoint of {host} accepted a connection after {} attempt(s): {last_error}",
                tried.len()
            ),
        )
    }
}
