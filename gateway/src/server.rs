//! The gateway's QUIC listener: authenticate the caller (any identity of a trusted domain),
//! read the tunnel header, connect to a local endpoint of the named service, answer, splice.
//! The TCP+TLS fallback listener does the same for full-duplex HTTP/2 streams (and CONNECT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_api::drain::Watch;
use strait_api::pb;
use strait_api::snapshot::{EndpointEntry, Snapshot};
use strait_api::telemetry::{Edge, Reporter, ServiceName, Workload};
use strait_api::tunnel::{read_header, status, write_header};
use strait_trust::{CertStore, PeerPolicy, ServerAuth};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::duplex::{self, ChannelBody};
use crate::GatewayMetrics;

pub struct GatewayOptions {
    pub cluster: String,
    pub listen: SocketAddr,
    pub connect_timeout: Duration,
    /// The secret the QUIC endpoint derives stateless-reset tokens from, shared by the
    /// cluster's gateways and kept across restarts (the CA gives it: `Granted::quic_reset_key`);
    /// `None` takes a random one, whose resets no client of a predecessor can trust.
    pub quic_reset_key: Option<Vec<u8>>,
}

pub struct Gateway {
    opts: GatewayOptions,
    store: CertStore,
    config: watch::Receiver<Arc<Snapshot>>,
    metrics: GatewayMetrics,
    /// This gateway as the source of the hops it makes.
    me: Workload,
    tracer: strait_api::trace::Tracer,
    access: strait_api::accesslog::AccessLog,
}

impl Gateway {
    pub fn new(
        opts: GatewayOptions,
        store: CertStore,
        config: watch::Receiver<Arc<Snapshot>>,
        metrics: GatewayMetrics,
    ) -> Self {
        let me = Workload::from_labels(
            "strait-gateway",
            strait_api::SYSTEM_NAMESPACE,
            &store.id().to_string(),
            &opts.cluster,
            &[("app".to_string(), "strait-gateway".to_string())].into(),
        );
        Gateway {
            opts,
            store,
            config,
            metrics,
            me,
            tracer: strait_api::trace::Tracer::disabled(&prometheus::Registry::new()),
            access: strait_api::accesslog::AccessLog::new(None, &prometheus::Registry::new()),
        }
    }

    /// Exports spans for tunnels of sampled traces, and logs each tunnel.
    pub fn telemetry(mut self, tracer: strait_api::trace::Tracer, access: strait_api::accesslog::AccessLog) -> Self {
        self.tracer = tracer;
        self.access = access;
        self
    }

    /// Names this gateway's workload in what it reports (`strait-gateway` unless set).
    pub fn named(mut self, name: &str) -> Self {
        self.me.workload = name.to_string();
        self
    }

    /// Binds the UDP socket; the returned endpoint is served by [`Gateway::serve`].
    pub fn bind(&self) -> anyhow::Result<quinn::Endpoint> {
        let tls = strait_trust::server_config(
            &self.store,
            PeerPolicy::AnyInBundle,
            ServerAuth::RequireClientCert,
            &[strait_trust::ALPN_TUNNEL],
        )?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config(crate::SERVER_IDLE_TIMEOUT, None)));
        let endpoint =
            crate::endpoint(self.opts.listen, Some(config), self.opts.quic_reset_key.as_deref()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind the gateway's QUIC listener on UDP {}: {e}",
                    self.opts.listen
                )
            })?;
        Ok(endpoint)
    }

    /// Serves until draining starts: then no new connection or stream is taken, and streams in
    /// flight finish (each holds a drain guard).
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, drain: Watch) {
        loop {
            let mut signal = drain.clone();
            let incoming = tokio::select! {
                i = endpoint.accept() => match i { Some(i) => i, None => return },
                _ = signal.signaled() => return,
            };
            let gw = self.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(%remote, error = %e, "tunnel connection refused during handshake");
                        return;
                    }
                };
                let certs = conn
                    .peer_identity()
                    .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
                let peer = certs
                    .as_ref()
                    .and_then(|certs| strait_trust::peer_identity(Some(certs)));
                let caller = Arc::new(Caller {
                    principal: peer.as_ref().map(|p| p.to_string()),
                    cluster: certs.as_ref().and_then(|certs| strait_trust::peer_cluster(Some(certs))),
                });
                tracing::debug!(%remote, peer = ?peer.as_ref().map(|p| p.to_string()), "tunnel connection accepted");
                loop {
                    let mut signal = drain.clone();
                    let accepted = tokio::select! {
                        a = conn.accept_bi() => a,
                        _ = signal.signaled() => return,
                    };
                    match accepted {
                        Ok((send, recv)) => {
                            let gw = gw.clone();
                            let guard = drain.guard();
                            let caller = caller.clone();
                            tokio::spawn(async move {
                                gw.handle_stream(send, recv, &caller).await;
                                drop(guard);
                            });
                        }
                        Err(e) => {
                            tracing::debug!(%remote, error = %e, "tunnel connection closed");
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Binds the TCP listener of the fallback (same address as QUIC, TCP).
    pub async fn bind_tcp(&self) -> anyhow::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(self.opts.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot bind the gateway's TCP+TLS fallback listener on TCP {}: {e}",
                self.opts.listen
            )
        })
    }

    /// The TCP+TLS fallback: mutual TLS, then HTTP/2 whose every full-duplex `POST` (ALPN
    /// [`duplex::ALPN`]) or CONNECT (ALPN `h2`, clients from before the duplex streams) carries
    /// one tunnel exactly as a QUIC stream does (header, answer, bytes).
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener, drain: Watch) -> anyhow::Result<()> {
        let tls = strait_trust::server_config(
            &self.store,
            PeerPolicy::AnyInBundle,
            ServerAuth::RequireClientCert,
            &[duplex::ALPN, strait_trust::ALPN_H2],
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        loop {
            let mut signal = drain.clone();
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "fallback accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = signal.signaled() => return Ok(()),
            };
            crate::fallback_socket(&tcp);
            let gw = self.clone();
            let acceptor = acceptor.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "fallback TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let certs = tls.get_ref().1.peer_certificates();
                let caller = Arc::new(Caller {
                    principal: strait_trust::peer_identity(certs).map(|p| p.to_string()),
                    cluster: strait_trust::peer_cluster(certs),
                });
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let gw = gw.clone();
                    let guard = drain.guard();
                    let caller = caller.clone();
                    async move {
                        let mut resp = hyper::Response::new(ChannelBody::empty());
                        if req.method() == hyper::Method::POST && req.uri().path() == duplex::TUNNEL_PATH {
                            // Answered at once: the caller's bytes are already coming.
                            let (writer, body) = duplex::channel();
                            let reader = duplex::BodyReader::new(req.into_body());
                            tokio::spawn(async move {
                                let _guard = guard;
                                gw.serve_h2_stream(tokio::io::join(reader, writer), &caller).await;
                            });
                            *resp.body_mut() = body;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        if req.method() == hyper::Method::POST {
                            // Not a tunnel: say where tunnels are.
                            *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                            return Ok(resp);
                        }
                        if req.method() != hyper::Method::CONNECT {
                            *resp.status_mut() = hyper::StatusCode::METHOD_NOT_ALLOWED;
                            resp.headers_mut().insert(
                                hyper::header::ALLOW,
                                hyper::header::HeaderValue::from_static("POST, CONNECT"),
                            );
                            return Ok(resp);
                        }
                        tokio::spawn(async move {
                            let _guard = guard;
                            if let Ok(upgraded) = hyper::upgrade::on(&mut req).await {
                                gw.serve_h2_stream(hyper_util::rt::TokioIo::new(upgraded), &caller)
                                    .await;
                            }
                        });
                        Ok(resp)
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(10)))
                    .initial_stream_window_size(crate::STREAM_WINDOW)
                    .initial_connection_window_size(crate::CONNECTION_WINDOW)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%remote, error = %e, "fallback connection ended");
                }
            });
        }
    }

    /// One tunnel on the fallback: its header, then as [`Self::serve_request`].
    async fn serve_h2_stream(&self, mut io: impl AsyncRead + AsyncWrite + Unpin, caller: &Caller) {
        match tokio::time::timeout(Duration::from_secs(5), read_header(&mut io)).await {
            Ok(Ok(tunnel_req)) => self.serve_request(tunnel_req, io, caller).await,
            _ => self.bad_header(),
        }
    }

    fn bad_header(&self) {
        tracing::info!("malformed or missing tunnel header; closing that stream");
        self.metrics
            .streams
            .with_label_values(&["unknown", "unknown", "400"])
            .inc();
    }

    async fn handle_stream(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream, caller: &Caller) {
        let req: pb::TunnelRequest = match tokio::time::timeout(Duration::from_secs(5), read_header(&mut recv)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "malformed tunnel header; closing that stream");
                self.metrics
                    .streams
                    .with_label_values(&["unknown", "unknown", "400"])
                    .inc();
                let _ = send.reset(quinn::VarInt::from_u32(status::BAD_REQUEST));
                return;
            }
            Err(_) => {
                self.metrics
                    .streams
                    .with_label_values(&["unknown", "unknown", "408"])
                    .inc();
                let _ = send.reset(quinn::VarInt::from_u32(status::BAD_REQUEST));
                return;
            }
        };
        self.serve_request(req, tokio::io::join(recv, send), caller).await;
    }

    /// Connects the tunnel to a local endpoint, answers, and splices until either side closes.
    async fn serve_request(
        &self,
        req: pb::TunnelRequest,
        mut tunnel: impl AsyncRead + AsyncWrite + Unpin,
        caller: &Caller,
    ) {
        let service_label = format!("{}.{}", req.service, req.namespace);
        let (code, message, upstream) = if !self.has_config(&req).await {
            let message = format!("the gateway of cluster {} has no config yet", self.opts.cluster);
            (status::NO_ENDPOINT, message, None)
        } else if let Some(refusal) = self.denied(&req, caller) {
            (status::FORBIDDEN, refusal, None)
        } else {
            self.connect_upstream(&req).await
        };
        self.metrics
            .streams
            .with_label_values(&[&req.source_cluster, &service_label, &code.to_string()])
            .inc();
        let resp = pb::TunnelResponse {
            status: code,
            message,
            endpoint: upstream.as_ref().map(|(_, a)| a.to_string()).unwrap_or_default(),
        };
        if write_header(&mut tunnel, &resp).await.is_err() {
            return;
        }
        // Istio's TCP family for the hop this gateway makes (as Istio's gateways report it).
        let snapshot = self.config.borrow().clone();
        let service = snapshot
            .services
            .get(&format!("{}/{}", req.namespace, req.service))
            .map(|s| ServiceName::of(s))
            .unwrap_or_else(|| ServiceName {
                host: format!(
                    "{}.{}.{}",
                    req.service,
                    req.namespace,
                    strait_api::snapshot::CLUSTERSET_SUFFIX
                ),
                name: req.service.clone(),
                namespace: req.namespace.clone(),
            });
        let destination = upstream
            .as_ref()
            .and_then(|(_, addr)| snapshot.endpoint_by_addr(*addr))
            .map(|(svc, i)| Workload::of_endpoint(svc, i))
            .unwrap_or_default();
        let edge = Edge {
            reporter: Reporter::Source,
            source: &self.me,
            destination: &destination,
            service: &service,
            protocol: "tcp",
        };
        let started = std::time::Instant::now();
        let start_time = std::time::SystemTime::now();
        // The gateway's span (the tunnel's setup) in the trace of the request that opened it.
        let incoming = strait_api::trace::Incoming::from_traceparent(req.traceparent.as_bytes());
        if let Some(mut span) = self.tunnel_span(&req, incoming) {
            span.attr("strait.tunnel_status", code.to_string());
            span.attr("strait.source_cluster", caller.cluster.clone().unwrap_or_default());
            span.attr("strait.source_principal", caller.principal.clone().unwrap_or_default());
            span.attr("strait.destination_cluster", self.opts.cluster.clone());
            span.attr("strait.destination_workload", destination.workload.clone());
            span.attr("upstream_cluster", format!("outbound|{}||{}", req.port, service.host));
            span.attr("component", "proxy");
            let error = (code != status::OK).then(|| format!("tunnel refused: {code}"));
            self.tracer.finish(span, error);
        }
        let (flags, received, sent) = match upstream {
            None => {
                // Envoy's flags: refused by policy (no flag; RBAC is a detail), no healthy
                // upstream, or connect failure.
                let flags = match code {
                    status::FORBIDDEN => "-",
                    status::NO_ENDPOINT => "UF",
                    _ => "UH",
                };
                self.metrics.istio.tcp_opened(&edge, flags);
                self.metrics.istio.tcp_closed(&edge, flags, 0, 0);
                let _ = tunnel.shutdown().await;
                (flags, 0, 0)
            }
            Some((mut tcp, _)) => {
                self.metrics.istio.tcp_opened(&edge, "-");
                self.metrics.active_streams.inc();
                let copied = strait_api::copy::copy_both_ways(&mut tunnel, &mut tcp).await;
                self.metrics.active_streams.dec();
                match copied {
                    Ok((from_caller, to_caller)) => {
                        self.metrics.bytes.with_label_values(&["in"]).inc_by(from_caller);
                        self.metrics.bytes.with_label_values(&["out"]).inc_by(to_caller);
                        self.metrics.istio.tcp_closed(&edge, "-", from_caller, to_caller);
                        ("-", from_caller, to_caller)
                    }
                    Err(e) => {
                        self.metrics.istio.tcp_closed(&edge, "UC", 0, 0);
                        tracing::debug!(error = %e, "tunnel stream ended with an error");
                        ("UC", 0, 0)
                    }
                }
            }
        };
        self.access.log(strait_api::accesslog::Entry {
            start_time: Some(start_time),
            response_flags: flags.into(),
            response_code_details: if code == status::OK {
                String::new()
            } else {
                format!("tunnel_status_{code}")
            },
            bytes_received: received,
            bytes_sent: sent,
            duration: started.elapsed(),
            authority: service.host.clone(),
            upstream_host: resp.endpoint.clone(),
            upstream_cluster: format!("outbound|{}||{}", req.port, service.host),
            trace_id: incoming
                .and_then(|i| i.parent)
                .map(|c| c.trace_id_hex())
                .unwrap_or_default(),
            source_cluster: caller.cluster.clone().unwrap_or_default(),
            destination_cluster: self.opts.cluster.clone(),
            peer_principal: caller.principal.clone().unwrap_or_default(),
            ..Default::default()
        });
    }

    /// A span for a tunnel whose request carried a sampled trace context (a gateway never
    /// starts a trace of its own).
    fn tunnel_span(
        &self,
        req: &pb::TunnelRequest,
        incoming: Option<strait_api::trace::Incoming>,
    ) -> Option<strait_api::trace::Span> {
        let incoming = incoming?;
        let (_, span) = self
            .tracer
            .start(&incoming, Some(0.0), strait_api::trace::SpanKind::Server, || {
                format!("tunnel {}.{}:{}", req.service, req.namespace, req.port)
            });
        span
    }

    /// A DENY AuthorizationPolicy of the requested service that refuses this caller by its
    /// source alone (its cluster, trust domain, namespace or principal): refused here, before
    /// any byte crosses into the cluster.
    fn denied(&self, req: &pb::TunnelRequest, caller: &Caller) -> Option<String> {
        // The control plane (peering) is never subject to workload policies.
        if req.namespace == strait_api::SYSTEM_NAMESPACE {
            return None;
        }
        let snapshot = self.config.borrow().clone();
        if snapshot.authz.is_empty() {
            return None;
        }
        let labels = Default::default();
        let policies: Vec<&strait_api::authz::CompiledAuthz> = snapshot
            .authz
            .iter()
            .filter(|p| strait_api::authz::applies(p, &req.service, &req.namespace, &labels))
            .map(|p| p.as_ref())
            .collect();
        let peer = strait_api::authz::Peer {
            principal: caller.principal.as_deref(),
            cluster: caller.cluster.as_deref(),
        };
        let (policy, rule) = strait_api::authz::gateway_denies(&policies, &peer)?;
        tracing::info!(%policy, rule, principal = ?caller.principal, cluster = ?caller.cluster, service = %req.service, "tunnel refused by authorization policy");
        Some(format!(
            "RBAC: access denied by {policy} rule {rule} at the gateway of cluster {}",
            self.opts.cluster
        ))
    }

    /// Whether this gateway has its first config, waited for until the request's deadline (at
    /// most five connect timeouts). A gateway serves as soon as it has its certificate, while its
    /// first config may still be on its way (a restarted gateway: its predecessor's clients dial
    /// again at once): a stream that comes before it waits for it, rather than being told no
    /// service is known, and no stream is judged by authorization before the policies are in.
    async fn has_config(&self, req: &pb::TunnelRequest) -> bool {
        // Every stream once the first config is in: one read, no receiver to clone or wait on.
        if self.config.borrow().version > 0 {
            return true;
        }
        let mut config = self.config.clone();
        let mut wait = self.opts.connect_timeout * 5;
        if req.deadline_unix_ms > 0 {
            let now = strait_api::unix_ms(std::time::SystemTime::now()).max(0) as u64;
            wait = wait.min(Duration::from_millis(req.deadline_unix_ms.saturating_sub(now)));
        }
        let has = tokio::time::timeout(wait, config.wait_for(|s| s.version > 0))
            .await
            .is_ok_and(|r| r.is_ok());
        has
    }

    /// Finds the service and connects to one of its local endpoints: the caller's choice if it
    /// is one, else the others in turn.
    async fn connect_upstream(&self, req: &pb::TunnelRequest) -> (u32, String, Option<(TcpStream, SocketAddr)>) {
        if req.deadline_unix_ms > 0 && (strait_api::unix_ms(std::time::SystemTime::now()) as u64) > req.deadline_unix_ms
        {
            return (
                status::DEADLINE_EXCEEDED,
                "deadline passed before the gateway".into(),
                None,
            );
        }
        let snapshot = self.config.borrow().clone();
        let key = format!("{}/{}", req.namespace, req.service);
        let Some(service) = snapshot.services.get(&key) else {
            return (
                status::UNKNOWN_SERVICE,
                format!("service {key} is not known in cluster {}", self.opts.cluster),
                None,
            );
        };
        let port_ok = u16::try_from(req.port).ok().and_then(|p| service.port(p)).is_some();
        if !port_ok {
            return (
                status::UNKNOWN_SERVICE,
                format!("service {key} has no port {}", req.port),
                None,
            );
        }
        let mut local: Vec<&EndpointEntry> = service
            .endpoints
            .iter()
            .filter(|e| e.locality().cluster == self.opts.cluster && e.ready)
            .collect();
        if local.is_empty() {
            return (
                status::NO_ENDPOINT,
                format!("service {key} has no ready endpoint in cluster {}", self.opts.cluster),
                None,
            );
        }
        // The caller's choice first (only if it is one of ours), then the rest from a random start.
        let start = rand_index(local.len());
        local.rotate_left(start);
        // Parsed once rather than every endpoint printed for the comparison.
        let asked = req.endpoint.parse::<strait_api::snapshot::EndpointAddr>().ok();
        if let Some(pos) = local.iter().position(|e| Some(e.address) == asked) {
            let chosen = local.remove(pos);
            local.insert(0, chosen);
        }
        let started = Instant::now();
        let mut last_error = String::new();
        for ep in local {
            match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(ep.address.socket())).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    let _ = strait_api::transport::detect_dead_peers(&tcp);
                    self.metrics
                        .connect_latency
                        .with_label_values(&[&format!("{}.{}", req.service, req.namespace)])
                        .observe(started.elapsed().as_secs_f64());
                    return (status::OK, String::new(), Some((tcp, ep.address.socket())));
                }
                Ok(Err(e)) => last_error = format!("{}: {e}", ep.address),
                Err(_) => last_error = format!("{}: connect timed out", ep.address),
            }
        }
        (
            status::NO_ENDPOINT,
            format!("no endpoint of {key} accepted a connection (last: {last_error})"),
            None,
        )
    }
}

fn rand_index(n: usize) -> usize {
    rand::random_range(0..n.max(1))
}

/// The verified caller of one tunnel connection.
struct Caller {
    principal: Option<String>,
    cluster: Option<String>,
}
