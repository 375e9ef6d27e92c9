//! The tunnel client: one QUIC connection per remote gateway, one stream per proxied
//! connection. Where UDP does not get through (the QUIC handshake times out), the same tunnel
//! header rides an HTTP/2 CONNECT stream over TCP+TLS to the same gateway address; a prober then
//! retries QUIC in the background and switches back as soon as a handshake succeeds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use strait_api::pb;
use strait_api::tunnel::{read_header, status, write_header, HeaderError};
use strait_trust::{CertStore, PeerPolicy, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::metrics::TunnelClientMetrics;

/// A byte stream through a remote gateway (a QUIC stream or an HTTP/2 CONNECT stream).
pub trait TunnelIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> TunnelIo for T {}

/// A proxied connection through a remote gateway: read and write like a socket.
pub type TunnelStream = Box<dyn TunnelIo>;

/// How long a QUIC handshake may take before the gateway counts as unreachable over UDP.
const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a gateway in fallback is probed over QUIC again.
const QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(2);

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

/// The transport to one gateway.
#[derive(Default)]
struct GatewayState {
    quic: Option<quinn::Connection>,
    /// UDP did not get through: tunnels use TCP+TLS until a QUIC probe succeeds.
    fallback: bool,
    h2: Option<SendRequest<Empty<Bytes>>>,
}

#[derive(Clone)]
pub struct TunnelClient {
    endpoint: quinn::Endpoint,
    bind: SocketAddr,
    store: CertStore,
    gateways: Arc<Mutex<HashMap<SocketAddr, GatewayState>>>,
    metrics: Option<TunnelClientMetrics>,
}

impl TunnelClient {
    /// A client endpoint bound to `bind` (use port 0).
    pub fn new(bind: SocketAddr, store: CertStore) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::client(bind)?;
        Ok(TunnelClient {
            endpoint,
            bind,
            store,
            gateways: Arc::default(),
            metrics: None,
        })
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

    fn tls(&self, identity: &SpiffeId, alpn: &[u8]) -> Result<rustls::ClientConfig, TunnelError> {
        strait_trust::client_config(
            Some(&self.store),
            self.store.bundle(),
            self.store.metrics(),
            PeerPolicy::OneOf(vec![identity.clone()]),
            &[alpn],
        )
        .map_err(|e| TunnelError::Config(e.to_string()))
    }

    async fn quic_handshake(&self, gateway: SocketAddr, identity: &SpiffeId) -> Result<quinn::Connection, TunnelError> {
        let connect_err = |detail: String| TunnelError::Connect { gateway, detail };
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.tls(identity, strait_trust::ALPN_TUNNEL)?)
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config()));
        let connecting = self
            .endpoint
            .connect_with(config, gateway, "strait.mesh")
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::time::timeout(QUIC_HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err("QUIC handshake timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))
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
                if let Ok(conn) = this.quic_handshake(gateway, &identity).await {
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
        if let Some(conn) = cached.filter(|c| c.close_reason().is_none()) {
            return Ok(conn);
        }
        let conn = self.quic_handshake(gateway, identity).await?;
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
    /// TCP+TLS when UDP does not get through.
    pub async fn open(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, pb::TunnelResponse), TunnelError> {
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
                Err(TunnelError::Connect { detail, .. }) => {
                    tracing::debug!(%gateway, %detail, "QUIC connect failed; trying TCP+TLS");
                    self.enter_fallback(gateway, identity);
                }
                Err(e) => return Err(e),
            }
        }
        self.open_tcp(gateway, identity, req).await
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
    ) -> Result<(TunnelStream, pb::TunnelResponse), TunnelError> {
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

    async fn h2_sender(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let cached = self
            .gateways
            .lock()
            .map_err(|_| poisoned())?
            .get(&gateway)
            .and_then(|s| s.h2.clone());
        if let Some(sender) = cached.filter(|s| !s.is_closed()) {
            return Ok(sender);
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
        let tcp: TcpStream = tokio::time::timeout(QUIC_HANDSHAKE_TIMEOUT, socket.connect(gateway))
            .await
            .map_err(|_| connect_err("TCP connect timed out".into()))?
            .map_err(|e| connect_err(format!("TCP: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            QUIC_HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(Arc::new(self.tls(identity, strait_trust::ALPN_H2)?))
                .connect(strait_api::transport::mesh_server_name(), tcp),
        )
        .await
        .map_err(|_| connect_err("TLS handshake timed out".into()))?
        .map_err(|e| connect_err(format!("TLS: {e}")))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect_err(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%gateway, error = %e, "TCP+TLS tunnel connection ended");
            }
        });
        self.gateways
            .lock()
            .map_err(|_| poisoned())?
            .entry(gateway)
            .or_default()
            .h2 = Some(sender.clone());
        Ok(sender)
    }

    async fn open_tcp(
        &self,
        gateway: SocketAddr,
        identity: &SpiffeId,
        req: &pb::TunnelRequest,
    ) -> Result<(TunnelStream, pb::TunnelResponse), TunnelError> {
        let stream_err = |detail: String| TunnelError::Stream { gateway, detail };
        let mut sender = self.h2_sender(gateway, identity).await?;
        let connect = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(format!("{}.{}:{}", req.service, req.namespace, req.port))
            .body(Empty::<Bytes>::new())
            .map_err(|e| stream_err(e.to_string()))?;
        let resp = sender.send_request(connect).await.map_err(|e| {
            if let Ok(mut g) = self.gateways.lock() {
                if let Some(s) = g.get_mut(&gateway) {
                    s.h2 = None;
                }
            }
            stream_err(format!("CONNECT: {e}"))
        })?;
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

/// Sends the tunnel header on a fresh stream and reads the gateway's answer.
async fn exchange(
    gateway: SocketAddr,
    mut stream: TunnelStream,
    req: &pb::TunnelRequest,
) -> Result<(TunnelStream, pb::TunnelResponse), TunnelError> {
    write_header(&mut stream, req).await?;
    let resp: pb::TunnelResponse = tokio::time::timeout(Duration::from_secs(2), read_header(&mut stream))
        .await
        .map_err(|_| TunnelError::Stream {
            gateway,
            detail: "no answer to tunnel header".into(),
        })??;
    if resp.status != status::OK {
        return Err(TunnelError::Refused {
            gateway,
            status: resp.status,
            message: resp.message,
        });
    }
    Ok((stream, resp))
}

fn poisoned() -> TunnelError {
    TunnelError::Config("connection cache lock poisoned".into())
}
