//! Opaque TCP to a mesh service: CONNECT on the explicit listener, and intercepted connections
//! that are not HTTP (TLS, other protocols) on the transparent one.

use std::sync::Arc;

use bytes::BufMut;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use strait_api::drain::Watch;
use strait_api::snapshot::{ServiceEntry, Snapshot};
use strait_api::telemetry::{Edge, Reporter, ServiceName, Workload};

use super::{text, Body, Outbound, MAX_ATTEMPTS};
use crate::upstream::{Dialled, UpstreamError, UpstreamTls};
use crate::Io;

/// Why no endpoint took a connection: how many were tried and the last error.
pub(crate) struct NoEndpoint {
    pub tried: usize,
    pub last_error: String,
}

/// The stream a client's connection continues on: its endpoint, and how many of the client's
/// bytes were already sent on it.
pub(crate) struct Settled {
    upstream: UpstreamTls,
    endpoint: usize,
    sent: u64,
}

/// The endpoints of one service tried for one connection so far, and why the last one failed;
/// `only` when the client dialled one endpoint's address (no other is tried).
#[derive(Default)]
pub(crate) struct Tries {
    only: Option<usize>,
    tried: Vec<usize>,
    last_error: String,
}

impl Tries {
    pub(crate) fn only(only: Option<usize>) -> Tries {
        Tries {
            only,
            ..Default::default()
        }
    }

    fn gave_up(&mut self) -> NoEndpoint {
        NoEndpoint {
            tried: self.tried.len(),
            last_error: if self.last_error.is_empty() {
                String::from("no endpoint of the service is known")
            } else {
                std::mem::take(&mut self.last_error)
            },
        }
    }
}

impl Outbound {
    /// Opens an opaque stream to an endpoint of `svc` whose sidecar has said it reached its app
    /// (or to endpoint `only` when the caller dialled that endpoint's address), retrying
    /// connect failures on other endpoints; returns the stream and the endpoint's index. For a
    /// WebSocket upgrade, which has nothing to send before the app is known to be there.
    pub(crate) async fn open_tcp(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        only: Option<usize>,
    ) -> Result<(UpstreamTls, usize), NoEndpoint> {
        let mut tries = Tries::only(only);
        let dialled = Box::pin(self.dial_tcp(snap, svc, port, &mut tries)).await?;
        // A client that has sent nothing: `settle` only waits for the status.
        let settled = self
            .settle(&mut tokio::io::empty(), snap, svc, port, dialled, &mut tries)
            .await?;
        Ok((settled.upstream, settled.endpoint))
    }

    /// Dials endpoints of `svc` until one's sidecar completes the mTLS handshake (it has not
    /// yet said whether it reached its app: [`Self::settle`] learns that); returns the stream
    /// and the endpoint's index.
    ///
    /// Its future is ~8 KB (a tunnel stream and an inner TLS client being set up): callers whose
    /// own future lives as long as the connection box it (`Box::pin`), since an `async fn`'s
    /// future is as large as its largest step and would hold that size after the dial too
    /// (README, "An opaque connection's task sized for its longest step").
    pub(crate) async fn dial_tcp(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        tries: &mut Tries,
    ) -> Result<(Dialled, usize), NoEndpoint> {
        while tries.tried.len() < MAX_ATTEMPTS {
            let pick = match tries.only {
                Some(i) if tries.tried.is_empty() => Some(i),
                Some(_) => None,
                None => self.balancer.pick(snap, svc, &tries.tried),
            };
            let Some(i) = pick else { break };
            if !tries.tried.is_empty() {
                self.metrics
                    .retries
                    .with_label_values(&[&svc.host(), "connect_failure"])
                    .inc();
            }
            tries.tried.push(i);
            match self.upstreams.tcp(snap, svc, &svc.endpoints[i], port).await {
                Ok(tls) => return Ok((tls, i)),
                Err(e) => self.tcp_failed(snap, svc, i, &e, tries),
            }
        }
        self.metrics
            .connections
            .with_label_values(&["outbound", &self.cluster, "none", &svc.host(), "no_endpoint"])
            .inc();
        Err(tries.gave_up())
    }

    fn tcp_failed(&self, snap: &Snapshot, svc: &ServiceEntry, i: usize, e: &UpstreamError, tries: &mut Tries) {
        let ep = &svc.endpoints[i];
        tracing::debug!(endpoint = %ep.key(), error = %e, "upstream connect failed; trying another endpoint");
        self.balancer.failure(snap, svc, ep);
        if e.gateway_down() {
            self.balancer.gateway_failure(snap, &ep.locality().cluster);
        }
        tries.last_error = e.to_string();
    }

    /// Waits for a dialled endpoint's sidecar to say whether it reached its app, meanwhile
    /// sending what the client writes — as TLS early data behind the ClientHello when the
    /// stream resumes a session (the destination hands it to its app before the handshake
    /// ends), else right behind the handshake — and keeping a copy, up to the replay buffer. A
    /// sidecar that could not reach its app delivered none of it, nor did a stream whose
    /// tunnel or handshake failed, so the copy goes to the next endpoint; a stream that broke
    /// otherwise before its status once client bytes were on it is not retried (they may have
    /// reached the app).
    pub(crate) async fn settle(
        &self,
        client: &mut (impl tokio::io::AsyncRead + Unpin),
        snap: &Snapshot,
        svc: &ServiceEntry,
        port: u16,
        dialled: (Dialled, usize),
        tries: &mut Tries,
    ) -> Result<Settled, NoEndpoint> {
        let (mut dial, mut i) = dialled;
        let (mut sent, mut client_done) = (Vec::new(), false);
        let waited = self.upstreams.status_timeout();
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {waited:?}"));
        loop {
            let deadline = tokio::time::Instant::now() + waited;
            // Dialled with early data: the handshake completes at the first flush.
            let handshaking = dial.tls.get_ref().1.is_handshaking();
            if !sent.is_empty() {
                // What an endpoint before this one did not deliver. A failed write shows as a
                // broken stream at the status read below.
                let _ = tokio::time::timeout_at(deadline, async {
                    dial.tls.write_all(&sent).await?;
                    dial.tls.flush().await
                })
                .await;
            }
            let status = loop {
                // The client's bytes are read straight into the copy kept, up to the limit, with
                // room for a TLS record's worth at each read (a full `Vec` grows by 64 bytes).
                let room = self.limits.replay_buffer.saturating_sub(sent.len());
                if sent.capacity() - sent.len() < 4096 {
                    sent.reserve(strait_api::copy::SMALL.min(room));
                }
                let mut into = (&mut sent).limit(room);
                tokio::select! {
                    r = status_of(&mut dial.tls) => break r,
                    r = client.read_buf(&mut into), if !client_done && room > 0 => match r {
                        Ok(n) if n > 0 => {
                            let read = sent.len() - n..;
                            // In a handshake with early data the flush completes it.
                            let written = tokio::time::timeout_at(deadline, async {
                                dial.tls.write_all(&sent[read]).await?;
                                dial.tls.flush().await
                            });
                            match written.await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => break Err(e),
                                Err(_) => break Err(timed_out()),
                            }
                        }
                        // The client's end or error is met again by the splice.
                        _ => client_done = true,
                    },
                    _ = tokio::time::sleep_until(deadline) => break Err(timed_out()),
                }
            };
            // Whether the handshake failed here rather than in `dial_tcp`.
            let in_handshake = dial.tls.get_ref().1.is_handshaking();
            if handshaking && !in_handshake {
                self.upstreams.handshake_done(&dial.tls);
            }
            let ep = &svc.endpoints[i];
            match status {
                Ok(0) => {
                    self.balancer.success(ep);
                    return Ok(Settled {
                        upstream: dial.tls,
                        endpoint: i,
                        sent: sent.len() as u64,
                    });
                }
                // Its tunnel or handshake failed, with nothing of the client's delivered: as
                // when `dial_tcp` meets that.
                Err(e) if in_handshake && (sent.is_empty() || crate::upstream::delivered_nothing(&e)) => {
                    let e = dial.failed(e);
                    self.tcp_failed(snap, svc, i, &e, tries);
                }
                Err(e) if !sent.is_empty() => {
                    self.balancer.failure(snap, svc, ep);
                    self.metrics
                        .connections
                        .with_label_values(&["outbound", &self.cluster, &ep.locality().cluster, &svc.host(), "broken"])
                        .inc();
                    tries.last_error = format!(
                        "the stream to {} broke before it said whether it reached its app, with {} bytes of the client's on it (not resent): {e}",
                        ep.key(),
                        sent.len()
                    );
                    return Err(tries.gave_up());
                }
                // It said it could not reach its app, or broke with nothing of the client's on
                // it: as a failed connect.
                _ => {
                    let e = UpstreamError::AppUnreachable { endpoint: ep.key() };
                    self.tcp_failed(snap, svc, i, &e, tries);
                }
            }
            (dial, i) = Box::pin(self.dial_tcp(snap, svc, port, tries)).await?;
        }
    }

    /// Copies both ways until either side closes, then counts the connection (Istio's TCP
    /// family as `reporter="source"`, with the bytes `settle` sent) to the endpoint of `svc`
    /// it settled on.
    pub(crate) async fn splice(&self, client: impl Io, settled: Settled, svc: &ServiceEntry, port: u16) {
        let Settled {
            upstream,
            endpoint: i,
            sent,
        } = settled;
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
                sent,
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
        // Connected once a destination sidecar proved its identity, or at once when the stream
        // resumes a session with it (its ClientHello then carries the client's first bytes as
        // early data): they go while that sidecar reaches its app (`settle`), and an app that
        // cannot be reached, or a tunnel or handshake that fails, is still retried on another
        // endpoint. If none takes it, the client sees its tunnel close.
        let mut tries = Tries::default();
        match self.dial_tcp(&snap, &svc, port, &mut tries).await {
            Ok(dialled) => {
                let this = self.clone();
                // An open tunnel holds the drain until it closes or the deadline passes.
                let guard = drain.guard();
                // The task takes only the upgrade: the request (its headers, URI and extensions)
                // is dropped with the response, not held for the tunnel's life.
                let upgrade = hyper::upgrade::on(&mut req);
                drop(req);
                tokio::spawn(async move {
                    let _guard = guard;
                    let i = dialled.1;
                    match upgrade.await {
                        Ok(upgraded) => {
                            let mut client = TokioIo::new(upgraded);
                            match this.settle(&mut client, &snap, &svc, port, dialled, &mut tries).await {
                                Ok(settled) => {
                                    // Settled: the tunnel keeps no config snapshot for its life.
                                    drop(snap);
                                    this.splice(client, settled, &svc, port).await
                                }
                                Err(NoEndpoint { tried, last_error }) => {
                                    tracing::info!(service = %host, tried, error = %last_error, "no endpoint took a CONNECT tunnel");
                                }
                            }
                        }
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

/// The destination's one-byte status (0: it reached its app). A stream dialled with early data
/// completes its handshake first (tokio-rustls sends the ClientHello, with what was written,
/// at the first flush).
async fn status_of(tls: &mut UpstreamTls) -> std::io::Result<u8> {
    tls.flush().await?;
    let mut status = [0u8; 1];
    match tls.read(&mut status).await? {
        1 => Ok(status[0]),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before it said whether it reached its app",
        )),
    }
}
