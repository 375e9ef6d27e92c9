//! gRPC over mutual TLS, on TCP or on any byte stream (a QUIC tunnel stream).
//!
//! The server side wraps each accepted TLS connection so handlers can read the peer's verified
//! SPIFFE ID from the request ([`PeerInfo`]). Handshakes run in their own tasks: a slow or
//! malformed client holds up nobody else, and its failure ends only its connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use strait_trust::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint};

/// Who is on the other end of a server connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    pub identity: Option<SpiffeId>,
}

impl PeerInfo {
    /// The peer info of a tonic request.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
        req.extensions().get::<PeerInfo>()
    }
}

/// An accepted, handshaken server connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Accepts TCP connections and yields those whose TLS handshake succeeded.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let identity = strait_trust::peer_identity(tls.get_ref().1.peer_certificates());
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner: tls,
                                info: PeerInfo { remote, identity },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How long a connection between proxies may have what it sent go unacknowledged (or, idle,
/// its keepalive probes unanswered) before the kernel aborts it. A peer whose host died or
/// whose network went silent sends no FIN or reset: without this, a request written to it waits
/// for TCP's retransmissions to give up (about 15 minutes). HTTP/2 connections ping each other
/// every second and learn it within two; a pooled HTTP/1.1 connection, an opaque TCP stream
/// and the gateway's connection to a sidecar cannot ping, so the kernel watches them.
pub const DEAD_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Idle time before an idle connection's first keepalive probe.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Makes the kernel abort a TCP connection whose peer went silent, after
/// [`DEAD_PEER_TIMEOUT`] without an acknowledgement (in flight) or a keepalive answer (idle).
/// Set on a listening socket, the connections it accepts inherit it.
pub fn detect_dead_peers(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(std::time::Duration::from_secs(1))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT))
}

/// The SNI name Strait clients send; identity is checked by SPIFFE ID, never by this name.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("strait.mesh").expect("static name is valid")
}

/// Connects TCP + TLS to `host:port` (a name is resolved at each connect, so a controller
/// that moved is found again).
pub async fn connect_tls(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config).connect(mesh_server_name(), tcp).await
}

/// A lazily connecting gRPC channel whose connections come from `connect` (TCP + TLS, or a tunnel
/// stream + TLS). Reconnects on demand after a failure.
pub fn channel_with<F, Fut, IO>(connect: F) -> Channel
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    Endpoint::from_static("http://strait.mesh")
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_uri: http::Uri| {
            let connect = connect.clone();
            async move { connect().await.map(TokioIo::new) }
        }))
}

/// A gRPC channel over TCP + mTLS to `addr`.
pub fn tls_channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Channel {
    let addr = addr.to_string();
    channel_with(move || {
        let addr = addr.clone();
        let config = config.clone();
        async move { connect_tls(&addr, config).await }
    })
}
