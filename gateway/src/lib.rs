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
#[cfg(test)]
mod testing;

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

/// The largest UDP payload a tunnel connection sends, and the largest it accepts (its
/// `max_udp_payload_size`). Datagrams start at QUIC's 1,200 bytes and path MTU discovery
/// (probes, no ICMP needed) grows them up to this where the path carries them: loopback,
/// jumbo-frame networks; on a 1,500-byte network the probes above it are lost and datagrams
/// stay at ~1,450. QUIC's cost is per datagram (a packet built, sealed, acknowledged and
/// tracked each), so bigger datagrams are most of what lets the tunnel carry bulk as fast as
/// TCP+TLS, whose kernel moves 64 KiB segments on loopback (`mesh` bench: 164-185 MB/s at
/// quinn's 1,452-byte ceiling against 253-280 MB/s here, the fallback 229-245).
///
/// The bound is what one segmentation-offload send holds: quinn hands the kernel up to
/// [`GSO_SEGMENTS`] datagrams at once, and the whole send (with UDP, IPv6 and link headers)
/// must stay within 64 KiB. Past it, measured on loopback: at 6,550 the kernel segmented every
/// send in software (seven datagrams received for each sent, and receive-buffer drops); at
/// 9,000 quinn detected a black hole and fell back to 1,200-byte datagrams.
pub const MAX_DATAGRAM: u16 = 6_500;

/// Datagrams quinn puts in one segmentation-offload send (its `MAX_TRANSMIT_SEGMENTS`).
const GSO_SEGMENTS: usize = 10;

const _: () = assert!(GSO_SEGMENTS * MAX_DATAGRAM as usize + 8 + 40 + 14 <= 64 * 1024);

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
/// `reset_key` keys its stateless-reset tokens (random when `None`): a gateway restarted with
/// its predecessor's key ends the connections that one held as soon as their clients send.
fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<&[u8]>,
) -> std::io::Result<quinn::Endpoint> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let mut config = match reset_key {
        Some(key) => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
            // The connection IDs it issues carry a check keyed alike: quinn answers a packet
            // for an unknown connection with a reset only when its ID passes that check, so a
            // successor must recognise its predecessor's IDs too.
            let tag = ring::hmac::sign(&key, b"strait gateway QUIC connection IDs");
            let cid_key = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
            let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(key));
            config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
            // quinn sends at most one reset per 20 ms by default, for the whole endpoint: a
            // restarted gateway then ends its predecessor's connections one at a time, and
            // clients whose packets came in the same 20 ms (peers that renew on the same beat)
            // back off and send again later (nine peers' resets were spread over a second and the
            // last peer was back after 3.5 s; thousands of sidecars would take minutes).
            // Every reset here answers a packet larger than itself, of a connection ID that
            // passed the keyed check (issued by this cluster's gateways): none is limited.
            config.min_reset_interval(std::time::Duration::ZERO);
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(MAX_DATAGRAM)
        .map_err(std::io::Error::other)?;
    let socket = TunnelSocket(runtime.wrap_udp_socket(udp_socket(addr)?)?);
    quinn::Endpoint::new_with_abstract_socket(config, server, std::sync::Arc::new(socket), runtime)
}

/// Datagrams one receive may hold coalesced (UDP GRO), as told to quinn: enough for the 64 KiB
/// the kernel coalesces at most, at [`MAX_DATAGRAM`] each.
const RECEIVE_SEGMENTS: usize = (64 * 1024usize).div_ceil(MAX_DATAGRAM as usize);

const _: () = assert!(RECEIVE_SEGMENTS * MAX_DATAGRAM as usize >= 65_535);

/// quinn's own UDP socket, but for how many coalesced datagrams it says one receive holds.
/// quinn sizes its receive buffer as the largest datagram (its `max_udp_payload_size`) times
/// that times 32 receives, and Linux says 64 (GRO's most segments): 13 MiB at [`MAX_DATAGRAM`],
/// counted in every process's heap though a coalesced receive never passes 64 KiB. With
/// [`RECEIVE_SEGMENTS`] it is 2.2 MiB (3 MiB at quinn's 1,452-byte datagrams).
#[derive(Debug)]
struct TunnelSocket(std::sync::Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: std::sync::Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments().min(RECEIVE_SEGMENTS)
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
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
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    t
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testing::{gateway_and_caller, GATEWAY};

    use super::*;

    /// A UDP relay in front of a gateway, which a test points at another gateway: the first
    /// then vanishes for its client as a killed process does (nothing it sends arrives, not
    /// even the CONNECTION_CLOSE a dropped endpoint sends).
    struct Relay {
        addr: std::net::SocketAddr,
        backend: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
        /// How long what the gateway sends is held before it is passed on.
        delay: std::sync::Arc<std::sync::Mutex<Duration>>,
    }

    async fn relay(backend: std::net::SocketAddr) -> Relay {
        use std::sync::{Arc, Mutex};
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let backend = Arc::new(Mutex::new(backend));
        let delay: Arc<Mutex<Duration>> = Arc::default();
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let addr = front.local_addr().unwrap();
        {
            let (front, back, backend, client) = (front.clone(), back.clone(), backend.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    let to = *backend.lock().unwrap();
                    let _ = back.send_to(&buf[..n], to).await;
                }
            });
        }
        {
            let (backend, delay) = (backend.clone(), delay.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = back.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to.filter(|_| from == *backend.lock().unwrap()) {
                        let delay = *delay.lock().unwrap();
                        if delay.is_zero() {
                            let _ = front.send_to(&buf[..n], to).await;
                        } else {
                            let (front, datagram) = (front.clone(), buf[..n].to_vec());
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = front.send_to(&datagram, to).await;
                            });
                        }
                    }
                }
            });
        }
        Relay { addr, backend, delay }
    }

    /// A gateway restarted with its predecessor's stateless-reset key (what the CA gives every
    /// gateway of a cluster) ends the connections that one held at their clients' next packet:
    /// the client sees a reset, not its idle timeout. With a key of its own, its reset cannot
    /// be told from a forgery and the client waits until its connection times out.
    #[tokio::test]
    async fn a_restarted_gateway_with_its_predecessors_reset_key_ends_their_connections() {
        let key = vec![7u8; 32];
        for (successor_key, want_reset) in [(key.clone(), true), (vec![8u8; 32], false)] {
            let (gateway, caller) = gateway_and_caller();
            let first = crate::testing::gateway_with_reset_key(gateway.clone(), Some(key.clone()))
                .bind()
                .unwrap();
            let relay = relay(first.local_addr().unwrap()).await;
            tokio::spawn(async move {
                let conn = first.accept().await.unwrap().await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let mut byte = [0u8; 1];
                recv.read_exact(&mut byte).await.unwrap();
                send.write_all(&byte).await.unwrap();
                // Held open, as a gateway that is killed holds its connections.
                conn.closed().await;
            });
            let client = TunnelClient::new("127.0.0.1:0".parse().unwrap(), caller).unwrap();
            let conn = client
                .quic_handshake(relay.addr, &GATEWAY.parse().unwrap(), Duration::from_secs(5))
                .await
                .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            recv.read_exact(&mut byte).await.unwrap();
            assert_eq!(&byte, b"x", "through the first gateway");

            // The first gateway is gone; its successor listens where it did.
            let second = crate::testing::gateway_with_reset_key(gateway, Some(successor_key))
                .bind()
                .unwrap();
            *relay.backend.lock().unwrap() = second.local_addr().unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let _ = send.write_all(b"y").await;
            let error = conn.closed().await;
            if want_reset {
                assert!(matches!(error, quinn::ConnectionError::Reset), "{error:?}");
            } else {
                assert!(matches!(error, quinn::ConnectionError::TimedOut), "{error:?}");
            }
            drop(second);
        }
    }

    /// A restarted gateway resets every connection of its predecessor at its first packet,
    /// though they all come at once (peers renewing on the same beat, a cluster's sidecars):
    /// quinn's default of one reset per 20 ms per endpoint would answer one of them and leave
    /// the others to back off and send again. Eight clients, each behind a relay of its own,
    /// write at the same moment: each connection ends reset, having sent no more than that
    /// write's flight after the switch (no probe sent again for want of an answer). The relays
    /// hold the first gateway's answers 200 ms, so each client's probe timeout is longer than
    /// that: a busy machine's delays do not make it probe before the successor's reset. Each
    /// client is quiet when the switch comes: its path MTU search (a probe a round trip, so
    /// still going for the last ones connected) has ended, and it pings every 2 s (an 8 s idle
    /// timeout) rather than every 250 ms; a late probe's acknowledgement made a client probe
    /// again after the switch, and a busy machine's delay let a keep-alive ping go out.
    #[tokio::test]
    async fn a_restarted_gateway_resets_every_connection_that_writes_at_once() {
        const CLIENTS: usize = 8;
        let key = vec![7u8; 32];
        let (gateway, caller) = gateway_and_caller();
        let first = crate::testing::gateway_with_reset_key(gateway.clone(), Some(key.clone()))
            .bind()
            .unwrap();
        let first_addr = first.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = vec![];
            while let Some(incoming) = first.accept().await {
                // Held open, as a gateway that is killed holds its connections.
                held.push(incoming.await.unwrap());
            }
        });
        let mut clients = vec![];
        for _ in 0..CLIENTS {
            let relay = relay(first_addr).await;
            *relay.delay.lock().unwrap() = Duration::from_millis(200);
            let client = TunnelClient::new("127.0.0.1:0".parse().unwrap(), caller.clone())
                .unwrap()
                .with_idle_timeout(Duration::from_secs(8));
            let conn = client
                .quic_handshake(relay.addr, &GATEWAY.parse().unwrap(), Duration::from_secs(5))
                .await
                .unwrap();
            clients.push((relay, client, conn));
        }
        // Every connection idle and fully acknowledged before the switch: no MTU probe sent
        // for three round trips.
        let probes = || -> Vec<u64> {
            clients
                .iter()
                .map(|(_, _, c)| c.stats().path.sent_plpmtud_probes)
                .collect()
        };
        let searching = std::time::Instant::now();
        let mut last = probes();
        loop {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let now = probes();
            if now == last {
                break;
            }
            assert!(
                searching.elapsed() < Duration::from_secs(20),
                "the path MTU search never ended: {now:?} probes"
            );
            last = now;
        }
        let second = crate::testing::gateway_with_reset_key(gateway, Some(key))
            .bind()
            .unwrap();
        let second_addr = second.local_addr().unwrap();
        let sent_before: Vec<u64> = clients.iter().map(|(_, _, c)| c.stats().udp_tx.datagrams).collect();
        for (relay, _, _) in &clients {
            *relay.delay.lock().unwrap() = Duration::ZERO;
            *relay.backend.lock().unwrap() = second_addr;
        }
        let mut streams = vec![];
        for (_, _, conn) in &clients {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let _ = send.write_all(b"y").await;
            streams.push((send, recv));
        }
        for (i, (_, _, conn)) in clients.iter().enumerate() {
            let error = conn.closed().await;
            assert!(matches!(error, quinn::ConnectionError::Reset), "client {i}: {error:?}");
            let sent = conn.stats().udp_tx.datagrams - sent_before[i];
            assert!(
                sent <= 2,
                "client {i} sent {sent} datagrams after the switch before it was reset: its first were not answered"
            );
        }
        drop(second);
    }

    /// A QUIC tunnel connection on loopback (MTU 64 KiB) grows its datagrams to
    /// [`MAX_DATAGRAM`] during a bulk transfer and still sends several at a time. With a
    /// ceiling too large for one offloaded send (9,000 bytes) this fails: quinn detects a black
    /// hole and falls back to 1,200 bytes.
    #[tokio::test]
    async fn tunnel_datagrams_grow_to_the_largest_one_offloaded_send_holds() {
        let (gateway, caller) = gateway_and_caller();
        // The gateway's own endpoint; its end counts what it reads and answers with the count.
        let server = crate::testing::gateway(gateway).bind().unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let n = tokio::io::copy(&mut recv, &mut tokio::io::sink()).await.unwrap();
            send.write_all(&n.to_be_bytes()).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
        });

        // A sidecar's tunnel client.
        let client = TunnelClient::new("127.0.0.1:0".parse().unwrap(), caller).unwrap();
        let conn = client
            .quic_handshake(addr, &GATEWAY.parse().unwrap(), Duration::from_secs(5))
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let chunk = vec![0x5a; 64 * 1024];
        let total = 64 * 1024 * 1024u64;
        for _ in 0..total / chunk.len() as u64 {
            send.write_all(&chunk).await.unwrap();
        }
        send.finish().unwrap();
        let mut count = [0u8; 8];
        tokio::io::AsyncReadExt::read_exact(&mut recv, &mut count)
            .await
            .unwrap();
        assert_eq!(u64::from_be_bytes(count), total);

        let stats = conn.stats();
        assert_eq!(
            stats.path.current_mtu, MAX_DATAGRAM,
            "path MTU discovery stopped short of the ceiling on loopback: {:?}",
            stats.path
        );
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let offload = quinn::udp::UdpSocketState::new((&socket).into())
            .unwrap()
            .max_gso_segments();
        if offload > 1 {
            // Full-size datagrams left GSO_SEGMENTS to a send; with offload turned off each
            // would be a send of its own.
            let per_send = stats.udp_tx.datagrams as f64 / stats.udp_tx.ios as f64;
            assert!(
                per_send > 3.0,
                "{per_send:.2} datagrams per send: segmentation offload is off ({:?})",
                stats.udp_tx
            );
        }
    }
}
