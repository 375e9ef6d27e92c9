//! Connections from this sidecar to an endpoint's sidecar: mTLS straight over TCP inside the
//! cluster, or through the endpoint's cluster gateway with the same mTLS session carried inside
//! the QUIC stream. An app's HTTP/2 (gRPC) rides one pooled HTTP/2 connection per endpoint;
//! its HTTP/1 requests ride pooled HTTP/1.1 connections, one request at a time on each (as
//! HAProxy and Envoy carry them: no stream table, HPACK or flow control to pay for); TCP gets a
//! connection of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Either, FutureExt, Shared};

use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_api::coalesce::Coalesced;
use strait_api::pb;
use strait_api::snapshot::{EndpointEntry, ServiceEntry, Snapshot};
use strait_gateway::{TunnelClient, TunnelError};
use strait_trust::{CertStore, SpiffeId};
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

/// A stream as dialled: an opaque stream's handshake may still be under way (a resumed
/// session sending early data, see `Outbound::settle`), so what its failure means goes with it.
pub struct Dialled {
    pub tls: UpstreamTls,
    peer: DialledPeer,
}

impl Dialled {
    /// What a handshake that failed with `e` was (see [`DialledPeer::failed`]).
    pub fn failed(&self, e: std::io::Error) -> UpstreamError {
        self.peer.failed(e)
    }
}

/// The endpoint a stream was dialled to, and the gateway it rides with whether that gateway
/// has answered the tunnel header.
struct DialledPeer {
    endpoint: String,
    via: Option<(SocketAddr, strait_gateway::Answered)>,
}

impl DialledPeer {
    /// What a handshake that failed with `e` was: the gateway's refusal of the tunnel, the
    /// handshake's own error, or, timed out, the silence of whoever did not answer: the
    /// gateway's if it never answered the tunnel header.
    fn failed(&self, e: std::io::Error) -> UpstreamError {
        if TunnelError::in_io(&e).is_some() || e.kind() != std::io::ErrorKind::TimedOut {
            return UpstreamError::of_handshake(&self.endpoint, e);
        }
        match &self.via {
            Some((gateway, answered)) if !answered.get() => UpstreamError::Tunnel(TunnelError::Stream {
                gateway: *gateway,
                detail: format!("{e}; the tunnel header was not answered"),
            }),
            _ => UpstreamError::Tls {
                endpoint: self.endpoint.clone(),
                detail: format!("handshake: {e}"),
            },
        }
    }
}

/// Whether a stream whose handshake failed with `e` certainly delivered nothing to the
/// destination's app: the gateway could not be reached or refused the tunnel, or TLS failed (a
/// destination acts on a caller's early data only once the ClientHello has resumed a session,
/// after which the handshake cannot fail but by tampering). A stream broken otherwise may have
/// delivered what it carried.
pub fn delivered_nothing(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        || matches!(
            TunnelError::in_io(e),
            Some(TunnelError::Connect { .. } | TunnelError::Refused { .. })
        )
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
    /// What a failed TLS handshake with `endpoint` was: the gateway's refusal of the tunnel it
    /// rode, or the handshake's own error.
    fn of_handshake(endpoint: &str, e: std::io::Error) -> Self {
        match TunnelError::from_io(e) {
            Ok(tunnel) => UpstreamError::Tunnel(tunnel),
            Err(e) => UpstreamError::Tls {
                endpoint: endpoint.to_string(),
                detail: e.to_string(),
            },
        }
    }

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
    /// Per endpoint and protocol: the connections, and the identity each peer proved when it
    /// was opened. A pooled connection is used only while that identity is still one the
    /// endpoint may have (the catalog can change an endpoint's identity under a live connection).
    pool: Arc<Mutex<Pool>>,
    /// HTTP/2 connections being opened, per endpoint: requests that need the same endpoint
    /// meanwhile wait for that one dial (and share its failure) instead of each opening its own.
    dialing: Mutex<HashMap<PoolKey, Dial>>,
    opened: Option<prometheus::IntCounterVec>,
}

/// The HTTP version a request travels in between the two sidecars.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// An app's HTTP/1.x request: on a pooled HTTP/1.1 connection that carries it alone.
    H1,
    /// An app's HTTP/2 request (gRPC): multiplexed on the endpoint's one HTTP/2 connection.
    H2,
}

impl Proto {
    /// The protocol between the sidecars for a request the app sent in `downstream`.
    pub fn of(downstream: Version) -> Proto {
        if downstream == Version::HTTP_2 {
            Proto::H2
        } else {
            Proto::H1
        }
    }

    /// The protocol for an endpoint in this cluster (`local`) or behind a gateway. Through the
    /// tunnel HTTP/1 requests ride HTTP/2 too: there a QUIC stream's window (8 MiB, sized for
    /// bulk transfers) would be all that holds back a response running ahead of a slow reader,
    /// where HTTP/2's stream window holds it to 1 MiB (a 256 MiB download through HTTP/1.1 grew
    /// the caller's RSS by 22.5 MiB, against 2.5 over HTTP/2). In the cluster the sockets'
    /// kernel buffers bound it.
    pub fn to(self, local: bool) -> Proto {
        if local {
            self
        } else {
            Proto::H2
        }
    }

    /// What the TLS handshake offers. A destination sidecar from before HTTP/1.1 was spoken
    /// between sidecars knows only HTTP/2, and chooses it: the request then travels as before.
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Proto::H1 => &[strait_trust::ALPN_H1, strait_trust::ALPN_H2],
            Proto::H2 => &[strait_trust::ALPN_H2],
        }
    }
}

/// An endpoint and protocol as the pool knows them: its address and cluster (addresses may
/// repeat across clusters). Made on every request, so nothing is formatted.
type PoolKey = (SocketAddr, String, Proto);

fn pool_key(ep: &EndpointEntry, proto: Proto) -> PoolKey {
    (ep.address.socket(), ep.locality().cluster.clone(), proto)
}

/// HTTP/1.1 connections kept per endpoint; past it, a connection closes once its request is done.
const MAX_POOLED_H1: usize = 256;
/// An HTTP/1.1 connection unused this long is closed, unless a TrafficPolicy says otherwise
/// (hyper's and Go's clients keep an idle connection 90 s).
const H1_IDLE: Duration = Duration::from_secs(90);

#[derive(Default)]
struct Pool {
    conns: HashMap<PoolKey, Vec<PooledConn>>,
    /// HTTP/1.1 connections being opened, per service (`<namespace>/<name>`): maxConnections
    /// counts them too.
    opening: HashMap<String, u32>,
}

/// A connection's sender: HTTP/2 is shared by every request of its endpoint, HTTP/1.1 carries
/// one request at a time.
enum Sender {
    H1(http1::SendRequest<ReplayBody>),
    H2(http2::SendRequest<ReplayBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Whether it can take a request now (an HTTP/1.1 connection once its last exchange ended).
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => !s.is_closed(),
        }
    }
}

/// A pooled connection with what the connection pool limits count.
struct PooledConn {
    sender: Sender,
    info: ConnInfo,
}

struct ConnInfo {
    peer: Option<SpiffeId>,
    /// `<namespace>/<name>` of the service it was opened for.
    service: String,
    requests: u32,
    last_used: Instant,
    idle: Option<Duration>,
}

/// A new connection's sender and the identity its peer proved.
type Opened = (Sender, Option<SpiffeId>);
/// A shared HTTP/2 dial.
type Dial = Shared<BoxFuture<'static, Result<(http2::SendRequest<ReplayBody>, Option<SpiffeId>), Arc<UpstreamError>>>>;

/// The connection one request goes out on.
pub struct Lease(Leased);

enum Leased {
    Shared(http2::SendRequest<ReplayBody>),
    /// An HTTP/1.1 connection, out of the pool until the request is on it.
    Own {
        sender: http1::SendRequest<ReplayBody>,
        info: ConnInfo,
        key: PoolKey,
        pool: Arc<Mutex<Pool>>,
    },
}

impl Lease {
    /// Sends `req` (in the connection's HTTP version). An HTTP/1.1 connection goes back to the
    /// pool at once, busy until the exchange ends (hyper's sender is ready only then).
    pub fn send(
        self,
        mut req: Request<ReplayBody>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<hyper::body::Incoming>>> {
        match self.0 {
            Leased::Shared(mut sender) => {
                *req.version_mut() = Version::HTTP_2;
                Either::Left(sender.send_request(req))
            }
            Leased::Own {
                mut sender,
                info,
                key,
                pool,
            } => {
                *req.version_mut() = Version::HTTP_11;
                let sent = sender.send_request(req);
                if let Ok(mut pool) = pool.lock() {
                    let conns = pool.conns.entry(key).or_default();
                    if conns.len() < MAX_POOLED_H1 {
                        conns.push(PooledConn {
                            sender: Sender::H1(sender),
                            info,
                        });
                    }
                }
                Either::Right(sent)
            }
        }
    }
}

/// Counts an HTTP/1.1 connection being opened for a service until it is pooled or failed.
struct Opening {
    pool: Arc<Mutex<Pool>>,
    service: String,
}

impl Opening {
    fn new(pool: &Arc<Mutex<Pool>>, service: String) -> Self {
        if let Ok(mut p) = pool.lock() {
            *p.opening.entry(service.clone()).or_default() += 1;
        }
        Opening {
            pool: pool.clone(),
            service,
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            if let Some(n) = p.opening.get_mut(&self.service) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    p.opening.remove(&self.service);
                }
            }
        }
    }
}

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
    async fn connect(&self, t: &Target, alpn: &[&[u8]]) -> Result<Dialled, UpstreamError> {
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
                let _ = strait_api::transport::detect_dead_peers(&tcp);
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
        // An opaque stream resuming a session that allows early data comes back at once: its
        // ClientHello leaves with the client's first bytes, and the handshake completes at its
        // first flush (`Outbound::settle`).
        let early = alpn == [strait_trust::ALPN_TCP];
        let handshake = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(config)
                .early_data(early)
                .connect(strait_api::transport::mesh_server_name(), raw),
        )
        .await;
        let peer = DialledPeer {
            endpoint: t.key.clone(),
            via: t.via.as_ref().map(|(gateway, ..)| *gateway).zip(answered),
        };
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(peer.failed(e)),
            Err(_) => {
                let waited = format!("no answer within {:?}", self.connect_timeout);
                return Err(peer.failed(std::io::Error::new(std::io::ErrorKind::TimedOut, waited)));
            }
        };
        if !tls.get_ref().1.is_handshaking() {
            self.configs
                .metrics()
                .handshake_completed("client", tls.get_ref().1.handshake_kind());
        }
        Ok(Dialled { tls, peer })
    }

    /// A new HTTP connection for `proto`, in the protocol the destination chose.
    async fn http(self, t: Target, proto: Proto) -> Result<Opened, Arc<UpstreamError>> {
        let tls = self.connect(&t, proto.alpn()).await?.tls;
        let peer = strait_trust::peer_identity(tls.get_ref().1.peer_certificates());
        let h1 = tls.get_ref().1.alpn_protocol() == Some(strait_trust::ALPN_H1);
        let io = TokioIo::new(Coalesced::new(tls));
        let failed = |e: hyper::Error, version: &str| UpstreamError::Connect {
            endpoint: t.key.clone(),
            detail: format!("{version} handshake: {e}"),
        };
        if h1 {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| failed(e, "HTTP/1.1"))?;
            run(t.key, "HTTP/1.1", conn);
            return Ok((Sender::H1(sender), peer));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            // Pings find a silently dead peer (a killed node, a lost tunnel) within ~2s, so
            // requests on it fail and are retried rather than hang.
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|e| failed(e, "HTTP/2"))?;
        run(t.key, "HTTP/2", conn);
        Ok((Sender::H2(sender), peer))
    }

    /// A new HTTP/2 connection (to be shared).
    async fn h2(self, t: Target) -> Result<(http2::SendRequest<ReplayBody>, Option<SpiffeId>), Arc<UpstreamError>> {
        let key = t.key.clone();
        match self.http(t, Proto::H2).await? {
            (Sender::H2(sender), peer) => Ok((sender, peer)),
            (Sender::H1(_), _) => Err(Arc::new(UpstreamError::Connect {
                endpoint: key,
                detail: "the destination chose HTTP/1.1 where only HTTP/2 was offered".into(),
            })),
        }
    }
}

/// Drives a client connection to `endpoint` until it ends.
fn run(
    endpoint: String,
    version: &'static str,
    conn: impl std::future::Future<Output = hyper::Result<()>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%endpoint, version, error = %e, "upstream connection ended");
        }
    });
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
            pool: Arc::default(),
            dialing: Mutex::default(),
            opened: None,
        }
    }

    /// Counts the HTTP connections this proxy opens, by destination service.
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

    /// Connects to `ep` and runs the mTLS handshake offering the given inner ALPNs.
    /// An opaque TCP stream to the endpoint's sidecar, its handshake done. That sidecar then
    /// answers one status byte once it reached (0) or failed to reach (1) its app, so a dead
    /// app is a retryable connect failure rather than a stream that closes after the client
    /// was told "connected": read by the caller while it already sends the client's first
    /// bytes (`Outbound::settle`).
    pub async fn tcp(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
    ) -> Result<Dialled, UpstreamError> {
        let target = self.target(snap, svc, ep, port, "")?;
        self.dialer.connect(&target, &[strait_trust::ALPN_TCP]).await
    }

    /// How long a destination sidecar may take to say whether it reached its app.
    pub fn status_timeout(&self) -> Duration {
        self.dialer.connect_timeout * 2
    }

    /// Counts the handshake of an opaque stream that was still under way when its dial returned
    /// (it resumed a session with early data), once it has completed.
    pub fn handshake_done(&self, tls: &UpstreamTls) {
        let (metrics, conn) = (self.dialer.configs.metrics(), tls.get_ref().1);
        metrics.handshake_completed("client", conn.handshake_kind());
        metrics.early_data("client", conn.is_early_data_accepted());
    }

    /// A connection to the endpoint's sidecar for one request in `proto`, and whether it was
    /// reused from the pool (a reused connection may have died unnoticed; a fresh one is worth
    /// one more try). Concurrent callers for an endpoint without an HTTP/2 connection share one
    /// dial; an HTTP/1.1 request without an idle connection opens its own. `proto` is the
    /// app's; [`Proto::to`] says what travels.
    #[allow(clippy::too_many_arguments)]
    pub async fn http(
        &self,
        snap: &Snapshot,
        svc: &ServiceEntry,
        ep: &EndpointEntry,
        port: u16,
        limits: &ConnLimits,
        traceparent: &str,
        proto: Proto,
    ) -> Result<(Lease, bool), Arc<UpstreamError>> {
        let proto = proto.to(ep.locality().cluster == self.cluster);
        let now = Instant::now();
        let key = pool_key(ep, proto);
        let idle = match proto {
            Proto::H1 => limits.idle.or(Some(H1_IDLE)),
            Proto::H2 => limits.idle,
        };
        if let Ok(mut pool) = self.pool.lock() {
            if let Some(conns) = pool.conns.get_mut(&key) {
                let mut i = 0;
                while i < conns.len() {
                    let conn = &mut conns[i];
                    if conn.sender.is_closed() {
                        conns.swap_remove(i);
                        continue;
                    }
                    if !conn.sender.is_ready() {
                        i += 1;
                        continue;
                    }
                    let c = &mut conn.info;
                    let still_trusted = c.peer.as_ref().is_some_and(|id| Self::may_present(svc, ep, id));
                    let worn = limits.max_requests_per_connection.is_some_and(|max| c.requests >= max);
                    let unused = limits.idle.is_some_and(|idle| now.duration_since(c.last_used) >= idle);
                    if !still_trusted || worn || unused {
                        // Worn out, idle too long, or no longer trusted: a new connection
                        // takes over; requests still on the old one finish there.
                        conns.swap_remove(i);
                        continue;
                    }
                    c.requests += 1;
                    c.last_used = now;
                    c.idle = idle;
                    // An HTTP/1.1 connection leaves the pool until its request is on it; an
                    // HTTP/2 one goes straight back, shared.
                    let lease = match conns.swap_remove(i) {
                        PooledConn {
                            sender: Sender::H2(sender),
                            info,
                        } => {
                            conns.push(PooledConn {
                                sender: Sender::H2(sender.clone()),
                                info,
                            });
                            Leased::Shared(sender)
                        }
                        PooledConn {
                            sender: Sender::H1(sender),
                            info,
                        } => Leased::Own {
                            sender,
                            info,
                            key,
                            pool: self.pool.clone(),
                        },
                    };
                    return Ok((Lease(lease), true));
                }
            }
            if let Some(max) = limits.max_connections {
                let service = svc.key();
                let open = pool
                    .conns
                    .values()
                    .flatten()
                    .filter(|c| c.info.service == service && !c.sender.is_closed())
                    .count()
                    + pool.opening.get(&service).copied().unwrap_or_default() as usize;
                if open >= max as usize {
                    return Err(Arc::new(UpstreamError::Overflow {
                        service: svc.host(),
                        max,
                    }));
                }
            }
        }
        let info = |peer| ConnInfo {
            peer,
            service: svc.key(),
            requests: 1,
            last_used: Instant::now(),
            idle,
        };
        if proto == Proto::H1 {
            let _opening = Opening::new(&self.pool, svc.key());
            self.count_opened(svc);
            let target = self.target(snap, svc, ep, port, traceparent).map_err(Arc::new)?;
            let (sender, peer) = self.dialer.clone().http(target, proto).await?;
            let lease = match sender {
                Sender::H1(sender) => Leased::Own {
                    sender,
                    info: info(peer),
                    key,
                    pool: self.pool.clone(),
                },
                Sender::H2(sender) => {
                    // An older destination chose HTTP/2: shared like any HTTP/2 connection.
                    self.pool_h2(key, sender.clone(), info(peer));
                    Leased::Shared(sender)
                }
            };
            return Ok((Lease(lease), false));
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
                    self.count_opened(svc);
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
        self.pool_h2(key, sender.clone(), info(peer));
        Ok((Lease(Leased::Shared(sender)), false))
    }

    fn count_opened(&self, svc: &ServiceEntry) {
        if let Some(opened) = &self.opened {
            opened.with_label_values(&[&svc.host()]).inc();
        }
    }

    /// Makes `sender` the endpoint's shared HTTP/2 connection.
    fn pool_h2(&self, key: PoolKey, sender: http2::SendRequest<ReplayBody>, info: ConnInfo) {
        if let Ok(mut p) = self.pool.lock() {
            p.conns.insert(
                key,
                vec![PooledConn {
                    sender: Sender::H2(sender),
                    info,
                }],
            );
        }
    }

    /// Closes pooled connections unused for longer than their service's idle timeout (the
    /// pool's clone is dropped; requests still in flight keep theirs).
    pub fn reap_idle(&self) {
        let now = Instant::now();
        if let Ok(mut p) = self.pool.lock() {
            p.conns.retain(|_, conns| {
                conns.retain(|c| {
                    !c.sender.is_closed()
                        && c.info
                            .idle
                            .is_none_or(|idle| now.duration_since(c.info.last_used) < idle)
                });
                !conns.is_empty()
            });
        }
    }

    /// Forgets the endpoint's pooled connections (requests on them finish there).
    pub fn evict(&self, ep: &EndpointEntry) {
        if let Ok(mut p) = self.pool.lock() {
            p.conns.remove(&pool_key(ep, Proto::H1));
            p.conns.remove(&pool_key(ep, Proto::H2));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::SystemTime;

    use crate::outbound::Replay;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use strait_api::snapshot::Resources;
    use strait_api::{pb, testing};
    use strait_trust::{server_config, Authority, PeerPolicy, ServerAuth, TlsMetrics, TrustBundle, TrustDomain};
    use tokio::net::TcpListener;

    fn store(ca: &Authority, trust: &TrustBundle, id: &str) -> CertStore {
        let ttl = Duration::from_secs(3600);
        CertStore::issued_by(ca, id.parse().unwrap(), ttl, trust.clone(), TlsMetrics::unregistered()).unwrap()
    }

    /// A destination sidecar's inbound listener as far as protocols go: mTLS offering `alpn`,
    /// then HTTP/1.1 or HTTP/2 as the caller speaks it; each answer (after 200 ms, so that
    /// requests overlap) is the HTTP version the request arrived in.
    async fn destination(store: &CertStore, alpn: &[&[u8]]) -> SocketAddr {
        let config =
            Arc::new(server_config(store, PeerPolicy::AnyInBundle, ServerAuth::RequireClientCert, alpn).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let answer = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{:?}", req.version())))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), answer)
                        .await;
                });
            }
        });
        addr
    }

    fn snapshot(endpoint: SocketAddr) -> Snapshot {
        let locality = pb::Locality {
            cluster: "east".into(),
            zone: "east-a".into(),
            ..Default::default()
        };
        let ep = testing::endpoint(&endpoint.to_string(), "echo-0", locality);
        let mut resources = Resources::default();
        let update = pb::ConfigUpdate {
            version: 1,
            full: true,
            resources: vec![testing::http_service("demo", "echo", "1", vec![ep])],
            ..Default::default()
        };
        assert!(resources.apply(update).is_empty());
        resources.snapshot(1)
    }

    struct Caller {
        upstreams: Upstreams,
        opened: prometheus::IntCounterVec,
        snap: Snapshot,
    }

    impl Caller {
        /// One request to demo/echo in `proto`: the version it reached the destination in,
        /// and whether its connection came from the pool.
        async fn call(&self, proto: Proto) -> (String, bool) {
            let svc = &self.snap.services["demo/echo"];
            let ep = &svc.endpoints[0];
            let (lease, reused) = self
                .upstreams
                .http(&self.snap, svc, ep, 80, &ConnLimits::default(), "", proto)
                .await
                .unwrap();
            let body = Replay::new(Empty::<Bytes>::new(), 1024).attempt().unwrap();
            let req = Request::builder()
                .uri("http://echo.demo.svc.clusterset.local/")
                .header(hyper::header::HOST, "echo.demo.svc.clusterset.local")
                .body(body)
                .unwrap();
            let resp = lease.send(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8(body.to_vec()).unwrap(), reused)
        }

        fn opened(&self) -> u64 {
            self.opened.with_label_values(&["echo.demo.svc.clusterset.local"]).get()
        }

        /// Waits until `n` pooled HTTP/1.1 connections are ready for a request (their last
        /// exchange over), as the connection tasks get to run.
        async fn until_ready(&self, n: usize) {
            let key = pool_key(&self.snap.services["demo/echo"].endpoints[0], Proto::H1);
            for _ in 0..500 {
                let ready = self
                    .upstreams
                    .pool
                    .lock()
                    .unwrap()
                    .conns
                    .get(&key)
                    .map_or(0, |c| c.iter().filter(|c| c.sender.is_ready()).count());
                if ready == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{n} pooled HTTP/1.1 connections never became ready");
        }
    }

    /// The SPIFFE ID of [`echo_and_caller`]'s caller.
    pub(crate) const CALLER: &str = "spiffe://mesh.local/ns/demo/sa/caller";

    /// Two workloads' stores under one trust domain: `echo` (a destination) and [`CALLER`].
    pub(crate) fn echo_and_caller() -> (CertStore, CertStore) {
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let root = Authority::new_root(&td, SystemTime::now()).unwrap();
        let ca = root.new_intermediate("east", SystemTime::now()).unwrap();
        let mut trust = TrustBundle::new();
        trust.add_root(&td, root.cert().clone()).unwrap();
        (
            store(&ca, &trust, "spiffe://mesh.local/ns/demo/sa/echo"),
            store(&ca, &trust, CALLER),
        )
    }

    async fn caller(destination_alpn: &[&[u8]]) -> Caller {
        let (server, client) = echo_and_caller();
        let addr = destination(&server, destination_alpn).await;
        let opened = prometheus::IntCounterVec::new(prometheus::Opts::new("opened", "opened"), &["service"]).unwrap();
        let tunnel = TunnelClient::new("127.0.0.1:0".parse().unwrap(), client.clone()).unwrap();
        Caller {
            upstreams: Upstreams::new("east".into(), client, tunnel).with_metrics(opened.clone()),
            opened,
            snap: snapshot(addr),
        }
    }

    #[tokio::test]
    async fn http1_requests_ride_pooled_http1_connections_one_at_a_time_and_http2_is_shared() {
        let c = caller(&[strait_trust::ALPN_H1, strait_trust::ALPN_H2, strait_trust::ALPN_TCP]).await;
        // Two at once: a connection each, both spoken in HTTP/1.1.
        let (a, b) = tokio::join!(c.call(Proto::H1), c.call(Proto::H1));
        assert_eq!((a.0.as_str(), b.0.as_str()), ("HTTP/1.1", "HTTP/1.1"));
        assert!(!a.1 && !b.1, "nothing was pooled yet");
        assert_eq!(c.opened(), 2);
        // Both go back to the pool once their exchange is over, and carry the next two.
        c.until_ready(2).await;
        let (a, b) = tokio::join!(c.call(Proto::H1), c.call(Proto::H1));
        assert_eq!((a, b), (("HTTP/1.1".into(), true), ("HTTP/1.1".into(), true)));
        assert_eq!(c.opened(), 2);
        // HTTP/2 (an app's gRPC) to the same endpoint: one connection of its own, shared.
        let (a, b) = tokio::join!(c.call(Proto::H2), c.call(Proto::H2));
        assert_eq!((a.0.as_str(), b.0.as_str()), ("HTTP/2.0", "HTTP/2.0"));
        assert_eq!(c.opened(), 3, "concurrent HTTP/2 requests share one dial");
        // An evicted endpoint (its requests failed) starts afresh.
        c.upstreams.evict(&c.snap.services["demo/echo"].endpoints[0]);
        assert!(!c.call(Proto::H1).await.1);
        assert_eq!(c.opened(), 4);
    }

    #[test]
    fn through_a_gateway_http1_requests_ride_http2() {
        assert_eq!(Proto::H1.to(true), Proto::H1);
        assert_eq!(Proto::H1.to(false), Proto::H2);
        assert_eq!(Proto::H2.to(true), Proto::H2);
        assert_eq!(Proto::H2.to(false), Proto::H2);
    }

    #[tokio::test]
    async fn a_destination_that_speaks_only_http2_gets_http1_requests_over_http2() {
        // A destination sidecar from before HTTP/1.1 between sidecars.
        let c = caller(&[strait_trust::ALPN_H2, strait_trust::ALPN_TCP]).await;
        let first = c.call(Proto::H1).await;
        assert_eq!(first, ("HTTP/2.0".into(), false));
        // The HTTP/2 connection it chose is shared, as any HTTP/2 connection is.
        let (a, b) = tokio::join!(c.call(Proto::H1), c.call(Proto::H1));
        assert_eq!((a, b), (("HTTP/2.0".into(), true), ("HTTP/2.0".into(), true)));
        assert_eq!(c.opened(), 1);
    }
}
