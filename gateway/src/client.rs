//! The tunnel client: one QUIC connection per remote gateway, one stream per proxied
//! connection. Where UDP does not get through (the QUIC handshake times out), the same tunnel
//! header rides a full-duplex HTTP/2 stream over TCP+TLS to the same gateway address (a `POST`,
//! see [`crate::duplex`]; an HTTP/2 CONNECT to a gateway from before them); a prober then
//! retries QUIC in the background and switches back as soon as a handshake succeeds.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use strait_api::pb;
use strait_api::tunnel::{header_len, status, write_header, HeaderError};
use strait_trust::{CertStore, PeerPolicy, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::duplex::{self, ChannelBody, ResponseReader};
use crate::metrics::TunnelClientMetrics;

/// A byte stream through a remote gateway (a QUIC stream or an HTTP/2 stream).
pub trait TunnelIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> TunnelIo for T {}

/// A proxied connection through a remote gateway: read and write like a socket.
pub type TunnelStream = Box<dyn TunnelIo>;

/// How long a QUIC handshake may take before the gateway counts as unreachable over UDP.
const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a gateway in fallback is probed over QUIC again.
const QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe of a lost gateway may take (QUIC and TCP+TLS are tried together).
const RECOVERY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A lost gateway nobody asked for in this long is no longer probed; the next call tries it.
const RECOVERY_GIVE_UP: Duration = Duration::from_secs(300);

/// The gateways that are down: their tunnel connection went silent (or could not be opened
/// over either transport) and no probe has reached them since. Shared with the balancer,
/// which stops choosing endpoints behind a down gateway the moment it goes down.
#[derive(Clone, Debug, Default)]
pub struct GatewayHealth(Arc<Mutex<HashSet<SocketAddr>>>);

impl GatewayHealth {
    pub fn is_down(&self, gateway: SocketAddr) -> bool {
        self.0.lock().map(|d| d.contains(&gateway)).unwrap_or(false)
    }

    /// Whether any gateway is down (false: none, and no address need be looked up).
    pub fn any_down(&self) -> bool {
        self.0.lock().map(|d| !d.is_empty()).unwrap_or(false)
    }

    /// Sets the state; returns whether it changed.
    fn set(&self, gateway: SocketAddr, down: bool) -> bool {
        match self.0.lock() {
            Ok(mut d) if down => d.insert(gateway),
            Ok(mut d) => d.remove(&gateway),
            Err(_) => false,
        }
    }
}

/// Why a tunnel could not be opened. All of these happen before any application byte was sent,
/// so the caller may retry elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach gateway {gateway}: {detail}")]
    Connect { gateway: SocketAddr, detail: String },
    #[error("gateway {gateway} stream failed: {detail}")]
    Stream { gateway: SocketAddr, detail: String },
    #[error("gateway {gateway} answered {status}: {message}")]
    Refused {
        gateway: SocketAddr,
        status: u32,
        message: String,
    },
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

impl TunnelError {
    /// The tunnel error an I/O error of a [`TunnelClient::open`] stream carries, if it is one.
    pub fn in_io(e: &std::io::Error) -> Option<&TunnelError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<TunnelError>())
    }

    /// The tunnel error an I/O error of a [`TunnelClient::open`] stream carries (the gateway's
    /// refusal, read after the caller had started its handshake), or the I/O error itself.
    pub fn from_io(e: std::io::Error) -> Result<TunnelError, std::io::Error> {
        if Self::in_io(&e).is_none() {
            return Err(e);
        }
        let kind = e.kind();
        match e.into_inner() {
            Some(inner) => inner
                .downcast::<TunnelError>()
                .map(|t| *t)
                .map_err(|other| std::io::Error::new(kind, other)),
            None => Err(std::io::Error::from(kind)),
        }
    }
}

/// Whether the gateway has answered a tunnel stream yet (see [`TunnelClient::open`]).
#[derive(Clone, Debug, Default)]
pub struct Answered(Arc<AtomicBool>);

impl Answered {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A tunnel stream whose gateway answer is read before its first byte of data, not before the
/// caller may write: the caller's first bytes (its TLS ClientHello) travel right behind the
/// tunnel header, which saves a round trip through the gateway on every new connection. A
/// refusal comes out of the first read as an I/O error carrying the [`TunnelError`]
/// ([`TunnelError::from_io`]).
struct Pipelined {
    inner: TunnelStream,
    gateway: SocketAddr,
    /// The answer's bytes so far; `None` once it has been read and said OK.
    head: Option<Vec<u8>>,
    answered: Answered,
}

impl Pipelined {
    fn refuse(e: TunnelError) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::Error::other(e)))
    }

    /// Ready(Ok) once the gateway's answer has been read and was OK.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let gateway = self.gateway;
        while let Some(head) = self.head.as_mut() {
            let want = match head.get(..4) {
                Some(&[a, b, c, d]) => match header_len([a, b, c, d]) {
                    Ok(len) => 4 + len,
                    Err(e) => return Self::refuse(TunnelError::Header(e)),
                },
                _ => 4,
            };
            if head.len() >= 4 && head.len() == want {
                let resp = match pb::TunnelResponse::decode(&head[4..]) {
                    Ok(r) => r,
                    Err(e) => return Self::refuse(TunnelError::Header(e.into())),
                };
                self.answered.0.store(true, Ordering::Release);
                if resp.status != status::OK {
                    return Self::refuse(TunnelError::Refused {
                        gateway,
                        status: resp.status,
                        message: resp.message,
                    });
                }
                self.head = None;
                break;
            }
            let mut chunk = [0u8; 256];
            let n = (want - head.len()).min(chunk.len());
            let mut buf = ReadBuf::new(&mut chunk[..n]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Self::refuse(TunnelError::Stream {
                    gateway,
                    detail: "the gateway closed the stream without answering the tunnel header".into(),
                });
            }
            head.extend_from_slice(buf.filled());
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Pipelined {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pipelined {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The transport to one gateway.
#[derive(Default)]
struct GatewayState {
    quic: Option<quinn::Connection>,
    /// UDP did not get through: tunnels use TCP+TLS until a QUIC probe succeeds.
    fallback: bool,
    h2: Option<H2Tunnels>,
    /// When a tunnel to this gateway was last asked for (a lost gateway is probed while used).
    last_used: Option<Instant>,
}

/// A TCP+TLS fallback connection to a gateway.
#[derive(Clone)]
struct H2Tunnels {
    sender: SendRequest<ChannelBody>,
    /// The gateway serves full-duplex streams ([`duplex::ALPN`]); otherwise CONNECT.
    duplex: bool,
}

#[derive(Clone)]
pub struct TunnelClient {
    endpoint: quinn::Endpoint,
    bind: SocketAddr,
    store: CertStore,
    gateways: Arc<Mutex<HashMap<SocketAddr, GatewayState>>>,
    health: GatewayHealth,
    metrics: Option<TunnelClientMetrics>,
    /// How long a QUIC connection may hear nothing before its gateway counts as lost.
    idle_timeout: Duration,
    /// How long a QUIC handshake may take before the TCP+TLS fallback is tried.
    handshake_timeout: Duration,
}

impl TunnelClient {
    /// A client endpoint bound to `bind` (use port 0).
    pub fn new(bind: SocketAddr, store: CertStore) -> std::io::Result<Self> {
        let endpoint = crate::endpoint(bind, None, None)?;
        Ok(TunnelClient {
            endpoint,
            bind,
            store,
            gateways: Arc::default(),
            health: GatewayHealth::default(),
            metrics: None,
            idle_timeout: crate::IDLE_TIMEOUT,
            handshake_timeout: QUIC_HANDSHAKE_TIMEOUT,
        })
    }

    /// Counts a gateway lost only after `idle` of silence (at least [`crate::IDLE_TIMEOUT`])
    /// instead of the data path's one second. For controllers' peering: its lease decides when
    /// a peer's exports expire, and on an overloaded machine a one-second limit closed peering
    /// tunnels whose pings were merely late, each reopened stream resending its full exports.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle.max(crate::IDLE_TIMEOUT);
        self
    }

    /// Lets a QUIC handshake take up to `limit` (at least the data path's two seconds) before
    /// falling back to TCP+TLS. For controllers' peering, where a late handshake costs nothing
    /// but a fallback tunnel stays on TCP until the next probe; at 50 clusters on two cores the
    /// data path's limit sent most peering tunnels to the fallback.
    pub fn with_handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit.max(QUIC_HANDSHAKE_TIMEOUT);
        self
    }

    /// Counts tunnels by transport and fallback switches in `metrics`.
    pub fn with_metrics(mut self, metrics: TunnelClientMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Whether tunnels to `gateway` currently use the TCP+TLS fallback.
    pub fn in_fallback(&self, gateway: SocketAddr) -> bool {
        self.gateways
            .lock()
            .map(|g| g.get(&gateway).is_some_and(|s| s.fallback))
            .unwrap_or(false)
    }

    /// Which gateways are down, for the balancer.
    pub fn health(&self) -> GatewayHealth {
        self.health.clone()
    }

    fn tls(&self, identity: &SpiffeId, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TunnelError> {
        strait_trust::client_config(
            Some(&self.store),
            self.store.bundle(),
            self.store.metrics(),
            PeerPolicy::OneOf(vec![identity.clone()]),
            alpn,
        )
        .map_err(|e| TunnelError::Config(e.to_string()))
    }

    pub(crate) async fn quic_handshake(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        timeout: Duration,
    ) -> Result<quinn::Connection, TunnelError> {
        let connect_err = |detail: String| TunnelError::Connect { gateway, detail };
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.tls(identity, &[strait_trust::ALPN_TUNNEL])?)
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config(
            self.idle_timeout,
            Some(crate::keep_alive(self.idle_timeout)),
        )));
        let connecting = self
            .endpoint
            .connect_with(config, gateway, "strait.mesh")
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| connect_err("QUIC handshake timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        self.watch(gateway, identity, conn.clone());
        Ok(conn)
    }

    /// Watches a tunnel connection. This end pings every [`crate::keep_alive`] and each ping is
    /// answered, so a connection that received nothing for its idle timeout has a dead peer
    /// (looked at twice per ping interval): it is closed here,
    /// which fails every stream on it at once (their requests are retried elsewhere), and the
    /// gateway is down until a probe reaches it again. (quinn's own idle timer would fire later:
    /// it restarts whenever this side sends after a quiet spell.)
    fn watch(&self, gateway: SocketAddr, identity: &SpiffeId, conn: quinn::Connection) {
        let this = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let mut last_rx = conn.stats().udp_rx.datagrams;
            let mut heard = Instant::now();
            let look_every = crate::keep_alive(this.idle_timeout) / 2;
            loop {
                tokio::select! {
                    reason = conn.closed() => {
                        match reason {
                            quinn::ConnectionError::TimedOut if this.is_current(gateway, &conn) => {
                                this.lost(gateway, &identity);
                            }
                            // A stateless reset its predecessor's key signs: the gateway
                            // restarted. Not down: the next tunnel dials the new process.
                            quinn::ConnectionError::Reset if this.is_current(gateway, &conn) => {
                                tracing::info!(%gateway, "the gateway reset the tunnel connection (it restarted); the next tunnel dials it again");
                                this.forget(gateway);
                            }
                            _ => {}
                        }
                        return;
                    }
                    _ = tokio::time::sleep(look_every) => {
                        let rx = conn.stats().udp_rx.datagrams;
                        if rx != last_rx {
                            last_rx = rx;
                            heard = Instant::now();
                        } else if heard.elapsed() >= this.idle_timeout {
                            // Down first, then close: the retries the close sets off must
                            // already find the gateway down.
                            if this.is_current(gateway, &conn) {
                                this.lost(gateway, &identity);
                            }
                            conn.close(quinn::VarInt::from_u32(1), b"peer silent");
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Whether `conn` is the connection in use for `gateway` (a replaced one may die later).
    fn is_current(&self, gateway: SocketAddr, conn: &quinn::Connection) -> bool {
        self.gateways
            .lock()
            .ok()
            .and_then(|g| g.get(&gateway).and_then(|s| s.quic.as_ref().map(|c| c.stable_id())))
            == Some(conn.stable_id())
    }

    /// A tunnel connection to `gateway` timed out: the gateway is down from now on.
    fn lost(&self, gateway: SocketAddr, identity: &SpiffeId) {
        if self.mark_down(gateway, identity) {
            if let Some(m) = &self.metrics {
                m.lost.with_label_values(&[&gateway.to_string()]).inc();
            }
            tracing::warn!(%gateway, "gateway stopped answering keep-alives: its tunnels are closed and its endpoints avoided until it answers again");
        }
        self.forget(gateway);
    }

    fn set_down(&self, gateway: SocketAddr, down: bool) -> bool {
        let changed = self.health.set(gateway, down);
        if let Some(m) = &self.metrics {
            m.down.with_label_values(&[&gateway.to_string()]).set(down as i64);
        }
        if changed && !down {
            tracing::info!(%gateway, "gateway reachable again");
        }
        changed
    }

    /// Marks `gateway` down and, if it was not yet, probes it in the background until it
    /// answers. Returns whether this call marked it down.
    fn mark_down(&self, gateway: SocketAddr, identity: &SpiffeId) -> bool {
        if !self.set_down(gateway, true) {
            return false;
        }
        let this = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move { this.recover(gateway, identity).await });
        true
    }

    /// Probes a down gateway (QUIC and TCP+TLS at once) until either answers.
    async fn recover(&self, gateway: SocketAddr, identity: SpiffeId) {
        let mut wait = Duration::from_millis(100);
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
            let (quic, tcp) = tokio::join!(
                self.quic_handshake(gateway, &identity, RECOVERY_PROBE_TIMEOUT),
                tokio::time::timeout(RECOVERY_PROBE_TIMEOUT, self.h2_sender(gateway, &identity)),
            );
            if let Ok(conn) = quic {
                if let Ok(mut g) = self.gateways.lock() {
                    g.entry(gateway).or_default().quic = Some(conn);
                }
                self.set_transport(gateway, false);
                self.set_down(gateway, false);
                return;
            }
            if let Ok(Ok(_)) = tcp {
                self.set_down(gateway, false);
                self.enter_fallback(gateway, &identity);
                return;
            }
            let unused = self
                .gateways
                .lock()
                .ok()
                .and_then(|g| g.get(&gateway).and_then(|s| s.last_used))
                .is_none_or(|t| t.elapsed() > RECOVERY_GIVE_UP);
            if unused {
                // Nobody calls it: stop probing; the next call tries it afresh.
                self.set_down(gateway, false);
                return;
            }
        }
    }

    fn set_transport(&self, gateway: SocketAddr, fallback: bool) {
        let changed = match self.gateways.lock() {
            Ok(mut g) => {
                let state = g.entry(gateway).or_default();
                let changed = state.fallback != fallback;
                state.fallback = fallback;
                changed
            }
            Err(_) => false,
        };
        if let Some(m) = &self.metrics {
            let gw = gateway.to_string();
            m.fallback.with_label_values(&[&gw]).set(fallback as i64);
            if changed {
                let to = if fallback { "tcp" } else { "quic" };
                m.switches.with_label_values(&[&gw, to]).inc();
            }
        }
        if changed {
            if fallback {
                tracing::warn!(%gateway, "QUIC (UDP) to the gateway fails: tunnels use the TCP+TLS fallback");
            } else {
                tracing::info!(%gateway, "QUIC to the gateway works again: tunnels switch back from TCP+TLS");
            }
        }
    }

    /// Marks `gateway` as UDP-blocked and probes QUIC until it answers again.
    fn enter_fallback(&self, gateway: SocketAddr, identity: &SpiffeId) {
        if self.in_fallback(gateway) {
            return;
        }
        self.set_transport(gateway, true);
        let this = self.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(QUIC_PROBE_INTERVAL).await;
                if !this.in_fallback(gateway) {
                    return;
                }
                if let Ok(conn) = this.quic_handshake(gateway, &identity, this.handshake_timeout).await {
                    if let Ok(mut g) = this.gateways.lock() {
                        g.entry(gateway).or_default().quic = Some(conn);
                    }
                    this.set_transport(gateway, false);
                    return;
                }
            }
        });
    }

    async fn quic_connection(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<quinn::Connection, TunnelError> {
        let cached = self
            .gateways
            .lock()
            .map_err(|_| poisoned())?
            .get(&gateway)
            .and_then(|s| s.quic.clone());
        if let Some(conn) = cached {
            match conn.close_reason() {
                None => return Ok(conn),
                Some(quinn::ConnectionError::TimedOut) => {
                    // Its watcher may not have run yet: the gateway went silent, do not wait
                    // for a handshake with it.
                    self.lost(gateway, identity);
                    return Err(TunnelError::Connect {
                        gateway,
                        detail: "the tunnel connection timed out (keep-alives unanswered)".into(),
                    });
                }
                Some(_) => {}
            }
        }
        let conn = self.quic_handshake(gateway, identity, self.handshake_timeout).await?;
        tracing::debug!(%gateway, "QUIC connection established");
        self.gateways
            .lock()
            .map_err(|_| poisoned())?
            .entry(gateway)
            .or_default()
            .quic = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a stream to `req`'s service through the gateway at `gateway`: over QUIC, or over
    /// TCP+TLS when UDP does not get through. The stream is returned once the tunnel header is
    /// sent, without waiting for the gateway's answer: it is read before the first byte of
    /// data, and a refusal is an error of that read ([`TunnelError::from_io`]); [`Answered`]
    /// tells whether the answer has come.
    pub async fn open(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, Answered), TunnelError> {
        if let Ok(mut g) = self.gateways.lock() {
            g.entry(gateway).or_default().last_used = Some(Instant::now());
        }
        if self.health.is_down(gateway) {
            // Fail at once: the balancer moves on to the next locality while a probe runs.
            return Err(TunnelError::Connect {
                gateway,
                detail: "gateway is down (its keep-alives went unanswered); probing until it answers".into(),
            });
        }
        // A cached QUIC connection may have died silently (UDP dropped): one fresh handshake
        // tells, and its failure switches to TCP+TLS within this same call.
        for _ in 0..2 {
            if self.in_fallback(gateway) {
                break;
            }
            match self.quic_connection(gateway, identity).await {
                Ok(conn) => match self.open_quic(gateway, conn, req).await {
                    Err(TunnelError::Stream { detail, .. }) => {
                        tracing::debug!(%gateway, %detail, "QUIC stream failed; reconnecting");
                        self.forget(gateway);
                    }
                    other => return other,
                },
                Err(e @ TunnelError::Connect { .. }) if self.health.is_down(gateway) => return Err(e),
                Err(TunnelError::Connect { detail, .. }) => {
                    tracing::debug!(%gateway, %detail, "QUIC connect failed; trying TCP+TLS");
                    self.enter_fallback(gateway, identity);
                }
                Err(e) => return Err(e),
            }
        }
        let result = self.open_tcp(gateway, identity, req).await;
        if let Err(TunnelError::Connect { .. }) = &result {
            // Neither transport reaches it: down until a probe does.
            self.mark_down(gateway, identity);
        }
        result
    }

    fn count(&self, transport: &str) {
        if let Some(m) = &self.metrics {
            m.tunnels.with_label_values(&[transport]).inc();
        }
    }

    async fn open_quic(
        &self,
        gateway: SocketAddr,
        conn: quinn::Connection,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, Answered), TunnelError> {
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                // The cached connection died under us: forget it so the next call reconnects.
                self.forget(gateway);
                return Err(TunnelError::Stream {
                    gateway,
                    detail: e.to_string(),
                });
            }
        };
        self.count("quic");
        exchange(gateway, Box::new(tokio::io::join(recv, send)), req).await
    }

    async fn h2_sender(&self, gateway: SocketAddr, identity: &SpiffeId) -> Result<H2Tunnels, TunnelError> {
        let cached = self
            .gateways
            .lock()
            .map_err(|_| poisoned())?
            .get(&gateway)
            .and_then(|s| s.h2.clone());
        if let Some(tunnels) = cached.filter(|t| !t.sender.is_closed()) {
            return Ok(tunnels);
        }
        let connect_err = |detail: String| TunnelError::Connect { gateway, detail };
        let socket = if self.bind.ip().is_unspecified() {
            tokio::net::TcpSocket::new_v4()
        } else {
            let s = tokio::net::TcpSocket::new_v4().map_err(|e| connect_err(e.to_string()))?;
            s.bind(SocketAddr::new(self.bind.ip(), 0))
                .map_err(|e| connect_err(e.to_string()))?;
            Ok(s)
        }
        .map_err(|e| connect_err(e.to_string()))?;
        let tcp: TcpStream = tokio::time::timeout(self.handshake_timeout, socket.connect(gateway))
            .await
            .map_err(|_| connect_err("TCP connect timed out".into()))?
            .map_err(|e| connect_err(format!("TCP: {e}")))?;
        crate::fallback_socket(&tcp);
        let tls = tokio::time::timeout(
            self.handshake_timeout,
            tokio_rustls::TlsConnector::from(Arc::new(self.tls(identity, &[duplex::ALPN, strait_trust::ALPN_H2])?))
                .connect(strait_api::transport::mesh_server_name(), tcp),
        )
        .await
        .map_err(|_| connect_err("TLS handshake timed out".into()))?
        .map_err(|e| connect_err(format!("TLS: {e}")))?;
        let duplex = tls.get_ref().1.alpn_protocol() == Some(duplex::ALPN);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONNECTION_WINDOW)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect_err(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%gateway, error = %e, "TCP+TLS tunnel connection ended");
            }
        });
        let tunnels = H2Tunnels { sender, duplex };
        self.gateways
            .lock()
            .map_err(|_| poisoned())?
            .entry(gateway)
            .or_default()
            .h2 = Some(tunnels.clone());
        Ok(tunnels)
    }

    async fn open_tcp(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, Answered), TunnelError> {
        let stream_err = |detail: String| TunnelError::Stream { gateway, detail };
        let H2Tunnels { mut sender, duplex } = self.h2_sender(gateway, identity).await?;
        let failed = |e: hyper::Error| {
            if let Ok(mut g) = self.gateways.lock() {
                if let Some(s) = g.get_mut(&gateway) {
                    s.h2 = None;
                }
            }
            stream_err(format!("HTTP/2: {e}"))
        };
        let authority = format!("{}.{}:{}", req.service, req.namespace, req.port);
        if duplex {
            // The tunnel header and the caller's first bytes leave with the request, as on a
            // QUIC stream; the gateway's HTTP answer is awaited by the first read.
            sender.ready().await.map_err(failed)?;
            let (writer, body) = duplex::channel();
            let post = hyper::Request::post(format!("https://{authority}{}", duplex::TUNNEL_PATH))
                .body(body)
                .map_err(|e| stream_err(e.to_string()))?;
            let response = Box::pin(sender.send_request(post));
            self.count("tcp");
            let stream = tokio::io::join(ResponseReader::new(gateway, response), writer);
            return exchange(gateway, Box::new(stream), req).await;
        }
        let connect = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(authority)
            .body(ChannelBody::empty())
            .map_err(|e| stream_err(e.to_string()))?;
        let resp = sender.send_request(connect).await.map_err(failed)?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(stream_err(format!("CONNECT answered {}", resp.status())));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| stream_err(format!("CONNECT upgrade: {e}")))?;
        self.count("tcp");
        exchange(gateway, Box::new(TokioIo::new(upgraded)), req).await
    }

    pub fn forget(&self, gateway: SocketAddr) {
        if let Ok(mut g) = self.gateways.lock() {
            if let Some(s) = g.get_mut(&gateway) {
                s.quic = None;
            }
        }
    }
}

/// Sends the tunnel header on a fresh stream; the gateway's answer is read by the stream.
async fn exchange(
    gateway: SocketAddr,
    mut stream: TunnelStream,
    req: &pb::TunnelRequest,
) -> Result<(TunnelStream, Answered), TunnelError> {
    write_header(&mut stream, req).await?;
    let answered = Answered::default();
    let stream = Pipelined {
        inner: stream,
        gateway,
        head: Some(Vec::with_capacity(64)),
        answered: answered.clone(),
    };
    Ok((Box::new(stream), answered))
}

fn poisoned() -> TunnelError {
    TunnelError::Config("connection cache lock poisoned".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn answer(status: u32, message: &str) -> Vec<u8> {
        let resp = pb::TunnelResponse {
            status,
            message: message.into(),
            ..Default::default()
        };
        let mut out = (resp.encoded_len() as u32).to_be_bytes().to_vec();
        resp.encode(&mut out).unwrap();
        out
    }

    /// A pipelined stream over one end of a pipe, and the gateway's end.
    fn pipelined() -> (Pipelined, tokio::io::DuplexStream, Answered) {
        let (ours, gateway) = tokio::io::duplex(4096);
        let answered = Answered::default();
        let stream = Pipelined {
            inner: Box::new(ours),
            gateway: "192.0.2.1:15443".parse().unwrap(),
            head: Some(vec![]),
            answered: answered.clone(),
        };
        (stream, gateway, answered)
    }

    #[tokio::test]
    async fn writes_go_out_before_the_answer_and_reads_start_after_it() {
        let (mut s, mut gw, answered) = pipelined();
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        gw.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(!answered.get());
        // The answer arrives a byte at a time, with data right behind it.
        let mut bytes = answer(status::OK, "");
        bytes.extend_from_slice(b"world");
        let writer = tokio::spawn(async move {
            for b in bytes {
                gw.write_all(&[b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            gw
        });
        let mut data = [0u8; 5];
        s.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"world");
        assert!(answered.get());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_refusal_is_the_first_read_and_keeps_its_status() {
        let (mut s, mut gw, answered) = pipelined();
        gw.write_all(&answer(status::FORBIDDEN, "denied by policy"))
            .await
            .unwrap();
        let err = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(answered.get());
        match TunnelError::from_io(err) {
            Ok(TunnelError::Refused { status, message, .. }) => {
                assert_eq!((status, message.as_str()), (status::FORBIDDEN, "denied by policy"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_gateway_that_closes_or_lies_is_a_tunnel_error() {
        let (mut s, gw, answered) = pipelined();
        drop(gw);
        let err = TunnelError::from_io(s.read(&mut [0u8; 8]).await.unwrap_err());
        assert!(matches!(err, Ok(TunnelError::Stream { .. })), "{err:?}");
        assert!(!answered.get());

        let (mut s, mut gw, _) = pipelined();
        gw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = TunnelError::from_io(s.read(&mut [0u8; 8]).await.unwrap_err());
        assert!(
            matches!(err, Ok(TunnelError::Header(HeaderError::TooLong(_)))),
            "{err:?}"
        );

        // Any other I/O error stays what it was.
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            TunnelError::from_io(plain).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }
}
