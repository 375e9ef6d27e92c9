//! The east-west protocol: a QUIC listener (quinn, ALPN `strait/1`, mutual TLS) that remote
//! sidecars and controllers tunnel through, the client they use, and forwarding to local
//! endpoints.
//!
//! A tunnel stream opens with a length-prefixed `TunnelRequest` (service, port, chosen
//! endpoint, trace context, deadline) and is answered with a `TunnelResponse`; after that the
//! stream carries the caller's own TLS session with the destination sidecar, end to end. The
//! gateway routes on the header alone and never holds a key that could read the payload.
//!
//! Where UDP is dropped, the same header opens a full-duplex HTTP/2 stream over TCP+TLS on the
//! same port ([`duplex`]; an HTTP/2 CONNECT with a gateway from before them, ALPN `h2`); the
//! client falls back on its own and returns to QUIC when it can.

mod client;
mod duplex;
mod metrics;
mod run;
mod server;

pub use client::{Answered, GatewayHealth, TunnelClient, TunnelError, TunnelIo, TunnelStream};
pub use metrics::{GatewayMetrics, TunnelClientMetrics};
pub use run::{run, GatewayRunOptions};
pub use server::{Gateway, GatewayOptions};

/// How often an idle tunnel connection of the data path is pinged by its client ([`keep_alive`]).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a tunnel connection may hear nothing from its peer before it counts as dead: the
/// data path's setting, so calls move off a lost gateway within a second. A client may ask
/// for more ([`TunnelClient::with_idle_timeout`]: controllers' peering, where the lease decides).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1_000);
/// The most a gateway lets a client's connection be silent. QUIC takes the smaller of the two
/// ends' limits, so a connection gets its client's.
pub const SERVER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Kernel buffer asked for each tunnel UDP socket, both directions. Linux's default (208 KiB)
/// overflows under a bulk transfer: the dropped datagrams read as loss and the congestion
/// controller backs off. The kernel caps the request at `net.core.{r,w}mem_max`.
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A non-blocking UDP socket bound to `addr` with [`UDP_BUFFER`] asked for each way (a smaller
/// receive buffer granted by the kernel is logged).
fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort both ways; the receive side is where datagrams are dropped.
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER) {
        tracing::debug!(error = %e, "cannot size the tunnel's UDP receive buffer");
    }
    // Linux reports twice what it granted (it counts its bookkeeping).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_BUFFER {
        tracing::debug!(
            granted,
            wanted = UDP_BUFFER,
            "the kernel capped the tunnel's UDP receive buffer (raise net.core.rmem_max)"
        );
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Flow-control windows of a tunnel stream and of a whole tunnel connection, the same over QUIC
/// and the TCP+TLS fallback: room for bulk transfers on fast links, and a connection window
/// well above one stream's, so a stream whose reader stalls (a bulk echo waiting on its way
/// back) cannot take the whole connection's window and stop every other stream on it.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Unsent bytes the kernel may hold on a TCP+TLS fallback connection before it stops taking
/// more. Every tunnel to a gateway shares that one connection: without a low mark the kernel
/// buffers megabytes of a bulk stream (its send buffer grows with the window), and a small
/// request, or the HTTP/2 ping that proves the connection alive, waits behind all of it —
/// seconds on a slow, lossy link. With it HTTP/2 interleaves the streams' frames just before
/// the wire.
pub const FALLBACK_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Socket options of both ends of a TCP+TLS fallback connection.
fn fallback_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(FALLBACK_NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT on the fallback connection");
    }
}

/// A quinn endpoint on [`udp_socket`]: a server when `server` is given, else a client only.
fn endpoint(addr: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, udp_socket(addr)?, runtime)
}

/// How often a client pings a tunnel connection that may be silent for `idle_timeout`: four
/// times within it ([`KEEP_ALIVE`] for the data path's 1 s), so one lost ping does not count as
/// a dead peer. A controller's peering tunnels (half a lease) ping less often than sidecars'.
pub fn keep_alive(idle_timeout: std::time::Duration) -> std::time::Duration {
    (idle_timeout / 4).max(KEEP_ALIVE)
}

/// QUIC transport settings shared by both ends, but for how long a connection may be silent
/// and whether this end pings (`keep_alive`).
///
/// Only clients ping: each ping is acknowledged, so the client hears its peer at least every
/// `keep_alive` (the peer's answer is what it watches, see `client.rs`), and the gateway hears
/// the client as often; a gateway pinging every connection too doubled that traffic and woke
/// every controller and sidecar four more times a second per tunnel.
fn transport_config(
    idle_timeout: std::time::Duration,
    keep_alive: Option<std::time::Duration>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Data path: keep-alives every 250 ms, and a peer silent for 1 s is dead: the client then
    // closes its streams at once (their idempotent requests are retried elsewhere) and stops
    // choosing that gateway until a probe reaches it again (see `client.rs`).
    t.keep_alive_interval(keep_alive);
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        idle_timeout.as_millis().min(u32::MAX as u128) as u32,
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(CONNECTION_WINDOW as u64);
    t
}
