//! Connections from this sidecar to an endpoint's sidecar: mTLS straight over TCP inside the
//! cluster, or through the endpoint's cluster gateway with the same mTLS session carried inside
//! the QUIC stream. HTTP rides a pooled HTTP/2 connection per endpoint; TCP gets its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_api::coalesce::Coalesced;
use strait_api::pb;
use strait_api::snapshot::{EndpointEntry, ServiceEntry, Snapshot};
use strait_gateway::{TunnelClient, TunnelError};
use strait_trust::{CertStore, SpiffeId};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::outbound::ReplayBody;
use crate::Io;

pub type UpstreamTls = TlsStream<Box<dyn Io>>;

/// Why an upstream connection failed. Every variant happens before the request reached the
/// destination app, so a retry on another endpoint is safe.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("no reachable gateway for cluster {cluster}")]
    NoGateway { cluster: String },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("TLS with {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("{endpoint} could not reach its application")]
    AppUnreachable { endpoint: String },
    /// A TrafficPolicy's `connectionPool.maxConnections` is reached for the service.
    #[error("{service} has {max} connections from this proxy (its TrafficPolicy's maxConnections)")]
    Overflow { service: String, max: u32 },
}

/// What a TrafficPolicy asks of the connections to one service's endpoints.
#[derive(Clone, Debug, Default)]
pub struct ConnLimits {
    /// Connections from this proxy to the service's endpoints, at most.
    pub max_connections: Option<u32>,
    /// Requests one connection carries before a new one is opened.
    pub max_requests_per_connection: Option<u32>,
    /// A connection unused this long is closed (at its next use, or by `reap_idle`).
    pub idle: Option<Duration>,
}

impl UpstreamError {
    /// Whether the remote cluster's gateway itself failed (rather than one endpoint behind it).
    pub fn gateway_down(&self) -> bool {
        matches!(
            self,
            UpstreamError::Tunnel(TunnelError::Connect { .. } | TunnelError::Stream { .. })
        )
    }
}

pub struct Upstreams {
    cluster: String,
    dialer: Dialer,
    /// Per endpoint: the sender, and the identity the peer proved when it was opened. A pooled
    /// connection is used only while that identity is still one the endpoint may have (the
    /// catalog can change an endpoint's identity under a live connection).
    pool: Mutex<HashMap<PoolKey, PooledConn>>,
    /// HTTP/2 connections being opened, per endpoint: requests that need the same endpoint
    /// meanwhile wait for that one dial (and share its failure) instead of each opening its own.
    dialing: Mutex<HashMap<PoolKey, Dial>>,
    opened: Option<prometheus::IntCounterVec>,
}

/// An endpoint as the pool knows it: its address and cluster (addresses may repeat across
/// clusters). Made on every request, so nothing is formatted.
type PoolKey = (SocketAddr, String);

fn pool_key(ep: &EndpointEntry) -> PoolKey {
    (ep.address.socket(), ep.locality().cluster.clone())
}

/// A pooled HTTP/2 sender and the identity its peer proved.
type Pooled = (SendRequest<ReplayBody>, Option<SpiffeId>);

/// A pooled connection with what the connection pool limits count.
#[derive(Clone)]
struct PooledConn {
    sender: SendRequest<ReplayBody>,
    peer: Option<SpiffeId>,
    /// `<namespace>/<name>` of the service it was opened for.
    service: String,
    requests: u32,
    last_used: Instant,
    idle: Option<Duration>,
}
type Dial = Shared<BoxFuture<'static, Result<Pooled, Arc<UpstreamError>>>>;

/// Where one endpoint is and who it must be, resolved from the snapshot before dialing (so a
/// dial can outlive the request that started it).
struct Target {
    key: String,
    address: SocketAddr,
    /// The remote cluster's gateway and the tunnel header, for an endpoint in another cluster.
    via: Option<(SocketAddr, SpiffeId, pb::TunnelRequest)>,
    expected: Vec<SpiffeId>,
}

/// Opens mTLS connections to endpoints (directly or through a gateway).
#[derive(Clone)]
struct Dialer {
    configs: Arc<strait_trust::ClientConfigs>,
    tunnel: TunnelClient,
    connect_timeout: Duration,
}

impl Dialer {
    async fn connect(&self, t: &Target, alpn: &[u8]) -> Result<UpstreamTls, UpstreamError> {
        let (raw, answered): (Box<dyn Io>, Option<strait_gateway::Answered>) = match &t.via {
            None => {
                let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(t.address))
                    .await
                    .map_err(|_| UpstreamError::Connect {
                        endpoint: t.key.clone(),
                        detail: "timed out".into(),
                    })?
                    .map_err(|e| UpstreamError::Connect {
                        endpoint: t.key.clone(),
                        detail: e.to_string(),
                    })?;
                let _ = tcp.set_nodelay(true);
                (Box::new(tcp), None)
            }
            Some((gateway, identity, req)) => {
                // The ClientHello follows the tunnel header without waiting for the gateway's
                // answer; a refusal comes out of the handshake as the tunnel's error.
                let (stream, answered) = self.tunnel.open(*gateway, identity, req).await?;
                (Box::new(stream), Some(answered))
            }
        };
        // Kept per endpoint: a new connection resumes the TLS session of an earlier one.
        let config = self
            .configs
            .get(&t.key, &t.expected, alpn)
            .map_err(|e| UpstreamError::Tls {
                endpoint: t.key.clone(),
                detail: e.to_string(),
            })?;
        let handshake = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(config).connect(strait_api::transport::mesh_server_name(), raw),
        )
        .await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return Err(match TunnelError::from_io(e) {
                    Ok(tunnel) => UpstreamError::Tunnel(tunnel),
                    Err(e) => UpstreamError::Tls {
                        endpoint: t.key.clone(),
                        detail: e.to_string(),
                    },
                })
            }
            Err(_) => {
                return Err(match (&t.via, answered) {
                    (Some((gateway, ..)), Some(a)) if !a.get() => UpstreamError::Tunnel(TunnelError::Stream {
                        gateway: *gateway,
                        detail: format!("no answer to the tunnel header within {:?}", self.connect_timeout),
                    }),
                    _ => UpstreamError::Tls {
                        endpoint: t.key.clone(),
                        detail: "handshake timed out".into(),
                    },
                })
            }
        };
        self.configs
            .metrics()
            .handshake_completed("client", tls.get_ref().1.handshake_kind());
        Ok(tls)
    }

    async fn h2(self, t: Target) -> Result<Pooled, Arc<UpstreamError>> {
        let tls = self.connect(&t, strait_trust::ALPN_H2).await?;
        let peer = strait_trust::peer_identity(tls.get_ref().1.peer_certificates());
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            // Pings find a silently dead peer (a killed node, a lost tunnel) within ~2s, so
            // requests on it fail and are retried rather than hang.
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(Coalesced::new(tls)))
            .await
            .map_err(|e| UpstreamError::Connect {
                endpoint: t.key.clone(),
                detail: format!("HTTP/2 handshake: {e}"),
            })?;
        let key = t.key;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %key, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok((sender, peer))
    }
}

impl Upstreams {
    pub fn new(cluster: String, store: CertStore, tunnel: TunnelClient) -> Self {
        Upstreams {
            dialer: Dialer {
                configs: Arc::new(strait_trust::ClientConfigs::new(store)),
                tunnel,
                connect_timeout: Duration::from_secs(2),
            },
            cluster,
            pool: Mutex::default(),
            dialing: Mutex::default(),
            opened: None,
        }
    }

    /// Counts the HTTP/2 connections this proxy opens, by destination service.
    pub fn with_metrics(mut self, opened: prometheus::IntCounterVec) -> Self {
        self.opened = Some(opened);
        self
    }

    /// The identities `ep` may present: any that serves `svc` (a snapshot holds them, its
    /// endpoints' included).
    fn expected_identities(svc: &ServiceEntry, ep: &EndpointEntry) -> Vec<SpiffeId> {
        let mut ids = svc.identities.clone();
        if !ids.contains(ep.identity()) {
            ids.push((**ep.identity()).clone());
        }
        ids
    }

    /// Whether `id` is one of [`Self::expected_identities`] (nothing copied).
    fn may_present(svc: &ServiceEntry, ep: &EndpointEntry, id: &SpiffeId) -> bool {
        svc.identities.contains(id) || **ep.identity() == *id
    }

    /// Where to dial `ep`: straight, or through its cluster's gateway with a tunnel request
    /// that carries `traceparent` (the request that caused the dial, for the gateway's span).
    fn target(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
        traceparent: &str,
    ) -> Result<Target, UpstreamError> {
        let via = if ep.locality().cluster == self.cluster {
            None
        } else {
            let gw = snap
                .gateways
                .get(&ep.locality().cluster)
                .filter(|g| g.reachable)
                .ok_or_else(|| UpstreamError::NoGateway {
                    cluster: ep.locality().cluster.clone(),
                })?;
            let req = pb::TunnelRequest {
                service: svc.name.clone(),
                namespace: svc.namespace.clone(),
                port: port as u32,
                endpoint: ep.address.to_string(),
                traceparent: traceparent.to_string(),
                deadline_unix_ms: (strait_api::unix_ms(std::time::SystemTime::now()) + 10_000) as u64,
                source_cluster: self.cluster.clone(),
            };
            Some((gw.address, gw.identity.clone(), req))
        };
        Ok(Target {
            key: ep.key(),
            address: ep.address.socket(),
            via,
            expected: Self::expected_identities(svc, ep),
        })
    }

    /// Connects to `ep` and runs the mTLS handshake with the given inner ALPN.
    pub async fn connect(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
        alpn: &[u8],
    ) -> Result<UpstreamTls, UpstreamError> {
        let target = self.target(snap, svc, ep, port, "")?;
        self.dialer.connect(&target, alpn).await
    }

    /// An opaque TCP stream to the endpoint's app. The inbound sidecar answers one status byte
    /// once it reached (0) or failed to reach (1) its app, so a dead app is a retryable connect
    /// failure here rather than a stream that closes after the client was told "connected".
    pub async fn tcp(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
    ) -> Result<UpstreamTls, UpstreamError> {
        let mut tls = self.connect(snap, svc, ep, port, strait_trust::ALPN_TCP).await?;
        let mut status = [0u8; 1];
        match tokio::time::timeout(self.dialer.connect_timeout * 2, tls.read_exact(&mut status)).await {
            Ok(Ok(_)) if status[0] == 0 => Ok(tls),
            _ => Err(UpstreamError::AppUnreachable { endpoint: ep.key() }),
        }
    }

    /// A pooled HTTP/2 sender to the endpoint's sidecar, and whether it was reused from the pool
    /// (a reused connection may have died unnoticed; a fresh one is worth one more try).
    /// Concurrent callers for an endpoint without a connection share one dial.
    pub async fn h2(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
        limits: &ConnLimits,
        traceparent: &str,
    ) -> Result<(SendRequest<ReplayBody>, bool), Arc<UpstreamError>> {
        let now = Instant::now();
        let key = pool_key(ep);
        if let Ok(mut pool) = self.pool.lock() {
            if let Some(conn) = pool.get_mut(&key) {
                let still_trusted = conn.peer.as_ref().is_some_and(|id| Self::may_present(svc, ep, id));
                let worn = limits
                    .max_requests_per_connection
                    .is_some_and(|max| conn.requests >= max);
                let idle = limits
                    .idle
                    .is_some_and(|idle| now.duration_since(conn.last_used) >= idle);
                if !conn.sender.is_closed() && still_trusted && !worn && !idle {
                    conn.requests += 1;
                    conn.last_used = now;
                    conn.idle = limits.idle;
                    return Ok((conn.sender.clone(), true));
                }
                // Worn out, idle too long, or no longer trusted: a new connection takes over;
                // requests still on the old one finish there.
                pool.remove(&key);
            }
            if let Some(max) = limits.max_connections {
                let service = svc.key();
                let open = pool
                    .values()
                    .filter(|c| c.service == service && !c.sender.is_closed())
                    .count();
                if open >= max as usize {
                    return Err(Arc::new(UpstreamError::Overflow {
                        service: svc.host(),
                        max,
                    }));
                }
            }
        }
        let dial = {
            let mut dialing = self.dialing.lock().map_err(|_| {
                Arc::new(UpstreamError::Connect {
                    endpoint: ep.key(),
                    detail: "connection table lock poisoned".into(),
                })
            })?;
            match dialing.get(&key) {
                Some(d) => d.clone(),
                None => {
                    if let Some(opened) = &self.opened {
                        opened.with_label_values(&[&svc.host()]).inc();
                    }
                    let target = self.target(snap, svc, ep, port, traceparent).map_err(Arc::new)?;
                    let d = self.dialer.clone().h2(target).boxed().shared();
                    dialing.insert(key.clone(), d.clone());
                    d
                }
            }
        };
        let result = dial.clone().await;
        if let Ok(mut dialing) = self.dialing.lock() {
            if dialing.get(&key).is_some_and(|d| d.ptr_eq(&dial)) {
                dialing.remove(&key);
            }
        }
        let (sender, peer) = result?;
        if let Ok(mut p) = self.pool.lock() {
            p.insert(
                key,
                PooledConn {
                    sender: sender.clone(),
                    peer,
                    service: svc.key(),
                    requests: 1,
                    last_used: Instant::now(),
                    idle: limits.idle,
                },
            );
        }
        Ok((sender, false))
    }

    /// Closes pooled connections unused for longer than their service's idle timeout (the
    /// pool's clone is dropped; requests still in flight keep theirs).
    pub fn reap_idle(&self) {
        let now = Instant::now();
        if let Ok(mut p) = self.pool.lock() {
            p.retain(|_, c| c.idle.is_none_or(|idle| now.duration_since(c.last_used) < idle));
        }
    }

    pub fn evict(&self, ep: &EndpointEntry) {
        if let Ok(mut p) = self.pool.lock() {
            p.remove(&pool_key(ep));
        }
    }
}
