//! HTTP/1.1 `Upgrade` (WebSocket and the like): the request travels as HTTP/1.1 over an opaque
//! mTLS stream to the destination sidecar (which splices it to its app), and after a `101`
//! both upgraded connections are spliced, so bytes flow both ways for as long as either side
//! keeps the connection open. Anything but a 101 is an ordinary response.

use http_body_util::BodyExt;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use strait_api::snapshot::{ServiceEntry, Snapshot};

use super::tcp::NoEndpoint;
use super::{text, Body, Outbound};

/// Whether a request asks to switch protocols (RFC 9110 §7.8).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

impl Outbound {
    pub(super) async fn upgrade(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        mut req: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let host = svc.host();
        let (upstream, ep) = match self.open_tcp(snap, svc, port, None).await {
            Ok((upstream, i)) => (upstream, &svc.endpoints[i]),
            Err(NoEndpoint { tried, last_error }) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no healthy endpoint of {host} accepted a connection after {tried} attempt(s): {last_error}"
                    ),
                )
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{}: {e}", ep.key())),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade upstream connection ended with an error");
            }
        });
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        // Origin form, with the Host the client named; the upgrade headers stay.
        if !parts.headers.contains_key(HOST) {
            if let Some(a) = parts.uri.authority().and_then(|a| a.as_str().parse().ok()) {
                parts.headers.insert(HOST, a);
            }
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .unwrap_or_else(|_| hyper::Uri::from_static("/"));
        for name in ["proxy-connection", "proxy-authorization", "keep-alive"] {
            parts.headers.remove(name);
        }
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{} did not answer the upgrade: {e}", ep.key()),
                )
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut rparts, rbody) = resp.into_parts();
            super::strip_hop(&mut rparts.headers);
            return Response::from_parts(rparts, rbody.map_err(Into::into).boxed());
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let metrics = self.metrics.clone();
        let labels = [
            "outbound".to_string(),
            self.cluster.clone(),
            ep.locality().cluster.clone(),
            host,
        ];
        let idle = self.limits.tcp_idle_timeout;
        tokio::spawn(async move {
            let result = match tokio::try_join!(client_side, upstream_side) {
                Ok((client, upstream)) => {
                    match crate::splice::splice(TokioIo::new(client), TokioIo::new(upstream), idle).await {
                        Ok(_) => "ok",
                        Err(_) => "reset",
                    }
                }
                Err(_) => "upgrade_failed",
            };
            metrics
                .connections
                .with_label_values(&[&labels[0], &labels[1], &labels[2], &labels[3], result])
                .inc();
        });
        let (rparts, _) = resp.into_parts();
        Response::from_parts(rparts, Body::default())
    }
}
