//! The server side of an opaque stream's inner TLS, usable before the handshake ends.
//!
//! A caller that resumes a session sends its client's first bytes as TLS 1.3 early data
//! (0-RTT) right behind its ClientHello. tokio-rustls hands a server its stream only once the
//! handshake is over — after the caller's Finished, a round trip through the gateway later —
//! so a destination could not act on them sooner. This stream is usable as soon as the caller
//! is known: for a resumed session at its ClientHello (the certificates of the full handshake
//! it resumes, kept with the session; the ClientHello's binder proves the caller holds the
//! session's secret), for a full handshake once it completes. What the server writes before
//! the caller's Finished leaves as half-RTT data right behind its own handshake flight, so
//! the one-byte status and the app's first answer travel with it.
//!
//! Replay: a session resumes once (`strait_trust`'s session store takes its ticket), so a
//! replayed ClientHello finds no session, gets a full handshake and its early data is skipped
//! unread. Early data is only offered by callers for opaque streams, whose bytes the
//! destination hands to its app exactly once.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Accepted, AcceptedAlert, Acceptor};
use rustls::{HandshakeKind, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The early data a destination takes behind one ClientHello (what a caller sends beyond it
/// follows the handshake as usual): a first flight of most protocols, in one TLS record.
pub(crate) const EARLY_DATA_LIMIT: u32 = 16 * 1024;

/// `config` for opaque streams: early data taken behind a resumed ClientHello, and what the
/// server writes before the caller's Finished sent at once (rustls sends nothing before the
/// peer is known: a full handshake's client certificate is verified first).
pub(crate) fn opaque(mut config: ServerConfig) -> ServerConfig {
    config.max_early_data_size = EARLY_DATA_LIMIT;
    config.send_half_rtt_data = true;
    config
}

/// Reads a connection's ClientHello (the protocol it offers decides how it is served). A
/// malformed one is answered with rustls' alert and is an `InvalidData` error.
pub(crate) async fn client_hello(tcp: &TcpStream) -> io::Result<Accepted> {
    let mut acceptor = Acceptor::default();
    loop {
        tcp.readable().await?;
        match acceptor.read_tls(&mut TryRead(tcp)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before its ClientHello",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted),
            Ok(None) => {}
            Err((e, alert)) => return Err(refuse(tcp, e, alert)),
        }
    }
}

/// Serves an opaque stream whose ClientHello is `hello` with `config` ([`opaque`]): returns
/// it once the peer is known ([`ServerTls::identified`]).
pub(crate) async fn accept(
    hello: Accepted,
    config: Arc<ServerConfig>,
    tcp: TcpStream,
) -> io::Result<ServerTls<TcpStream>> {
    let conn = hello
        .into_connection(config)
        .map_err(|(e, alert)| refuse(&tcp, e, alert))?;
    let mut tls = ServerTls::new(tcp, conn);
    tls.identified().await?;
    Ok(tls)
}

/// Sends rustls' alert for a refused ClientHello, if the socket takes it at once; the error.
fn refuse(tcp: &TcpStream, e: rustls::Error, mut alert: AcceptedAlert) -> io::Error {
    let mut out = Vec::new();
    if alert.write_all(&mut out).is_ok() {
        let _ = tcp.try_write(&out);
    }
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TCP stream's non-blocking reads as `std::io::Read` (what rustls' `Acceptor` reads from).
struct TryRead<'a>(&'a TcpStream);

impl Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// A server TLS stream over `IO` whose reads and writes work from the moment its peer is
/// known ([`ServerTls::identified`]), handshake over or not.
pub(crate) struct ServerTls<IO> {
    io: IO,
    conn: ServerConnection,
    /// `close_notify` is queued; the transport's write side closes once it is out.
    closing: bool,
    /// An error met after a read had bytes to return: the next read's.
    error: Option<io::Error>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTls<IO> {
    /// `conn` has processed the ClientHello (`Accepted::into_connection`); its flight is sent by
    /// the first call that drives the stream.
    pub(crate) fn new(io: IO, conn: ServerConnection) -> Self {
        ServerTls {
            io,
            conn,
            closing: false,
            error: None,
        }
    }

    pub(crate) fn connection(&self) -> &ServerConnection {
        &self.conn
    }

    /// Whether the peer's early data was taken (it is read before anything sent after its
    /// Finished).
    pub(crate) fn early_data_accepted(&mut self) -> bool {
        self.conn.early_data().is_some()
    }

    /// Sends the server's flight and drives the handshake until the peer is known: at once for
    /// a resumed session, after the peer's Finished for a full handshake.
    pub(crate) async fn identified(&mut self) -> io::Result<()> {
        // Records that came in with the ClientHello (its early data) are buffered unprocessed.
        self.conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        std::future::poll_fn(|cx| self.poll_identified(cx)).await
    }

    fn known(&self) -> bool {
        !self.conn.is_handshaking()
            || (self.conn.handshake_kind() == Some(HandshakeKind::Resumed) && self.conn.peer_certificates().is_some())
    }

    fn poll_identified(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The flight first: nothing more comes from the peer before it has it.
            ready!(self.poll_send(cx))?;
            if self.known() {
                return Poll::Ready(Ok(()));
            }
            if ready!(self.poll_receive(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed during the TLS handshake",
                )));
            }
        }
    }

    /// Writes what rustls has queued (records, alerts, tickets); ready once all of it is out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Writer { io: &mut self.io, cx }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads records from the transport and processes them; ready with 0 at its end. A record
    /// rustls refuses is an `InvalidData` error (its alert is sent if the transport takes it).
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = match self.conn.read_tls(&mut Reader { io: &mut self.io, cx }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.poll_send(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(n))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<IO> {
    /// Fills `buf` with as much as has arrived: rustls takes about one record from the
    /// transport at a time, and a splice should write its app a buffer per pass, not a record.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        // An error after some bytes is kept for the next read.
        let fail = |this: &mut Self, buf: &ReadBuf<'_>, e: io::Error| {
            if buf.filled().len() > start {
                this.error = Some(e);
                Poll::Ready(Ok(()))
            } else {
                Poll::Ready(Err(e))
            }
        };
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Early data precedes everything the peer sends after its Finished.
            if let Some(mut early) = this.conn.early_data() {
                let n = early.read(buf.initialize_unfilled())?;
                buf.advance(n);
            }
            match this.conn.reader().read(buf.initialize_unfilled()) {
                // The peer's close_notify (end of stream), or a full buffer.
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => {
                    buf.advance(n);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return fail(this, buf, e),
            }
            // What is still queued goes out before waiting for more, and what processing
            // queues (the session ticket after the peer's Finished) right after it.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return fail(this, buf, e);
            }
            match this.poll_receive(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return fail(this, buf, e),
                Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return fail(this, buf, e);
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut n = this.conn.writer().write(buf)?;
        if n == 0 && !buf.is_empty() {
            // rustls' buffer is full: wait until the transport takes it.
            ready!(this.poll_send(cx))?;
            n = this.conn.writer().write(buf)?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::other(
                    "the TLS stream takes no data before its peer is known",
                )));
            }
        }
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.conn.send_close_notify();
            this.closing = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// An async transport as `std::io::Read` for rustls, within one poll (`Pending` reads as
/// `WouldBlock`, the waker registered).
struct Reader<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncRead + Unpin> Read for Reader<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// An async transport as `std::io::Write` for rustls, within one poll.
struct Writer<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncWrite + Unpin> Write for Writer<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strait_trust::{ClientConfigs, PeerPolicy, ServerAuth, ALPN_TCP};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::tests::{echo_and_caller, CALLER};

    /// A destination's opaque-stream config and a caller's client config for it.
    fn pair() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let (server, client) = echo_and_caller();
        let config = strait_trust::server_config(
            &server,
            PeerPolicy::AnyInBundle,
            ServerAuth::RequireClientCert,
            &[ALPN_TCP],
        )
        .unwrap();
        let client = ClientConfigs::new(client)
            .get("echo", &[server.id()], &[ALPN_TCP])
            .unwrap();
        (Arc::new(opaque(config)), client)
    }

    /// What the destination saw of one connection.
    #[derive(Debug, Default)]
    struct Seen {
        resumed: bool,
        early: bool,
        peer: Option<String>,
        /// Whether it answered before the caller's Finished.
        answered_handshaking: bool,
    }

    /// Accepts one connection as the inbound listener does, answers its first four bytes
    /// reversed, then echoes the rest until the caller closes.
    async fn serve_one(listener: &TcpListener, config: Arc<ServerConfig>) -> io::Result<Seen> {
        let (tcp, _) = listener.accept().await?;
        let hello = client_hello(&tcp).await?;
        let mut tls = accept(hello, config, tcp).await?;
        let mut seen = Seen {
            resumed: tls.connection().handshake_kind() == Some(HandshakeKind::Resumed),
            early: tls.early_data_accepted(),
            peer: strait_trust::peer_identity(tls.connection().peer_certificates()).map(|id| id.to_string()),
            ..Seen::default()
        };
        let mut first = [0u8; 4];
        tls.read_exact(&mut first).await?;
        first.reverse();
        tls.write_all(&first).await?;
        seen.answered_handshaking = tls.connection().is_handshaking();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await?;
        }
        tls.shutdown().await?;
        Ok(seen)
    }

    /// A caller's connection through tokio-rustls, as the sidecar dials one: `ping` and its
    /// answer, then `bulk` bytes echoed, written and read at once.
    async fn call(addr: std::net::SocketAddr, client: Arc<rustls::ClientConfig>, bulk: usize) -> Vec<u8> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .early_data(true)
            .connect(strait_api::transport::mesh_server_name(), tcp)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        tls.flush().await.unwrap();
        let mut answer = [0u8; 4];
        tls.read_exact(&mut answer).await.unwrap();
        let sent: Vec<u8> = (0..bulk).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(tls);
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.unwrap();
        writer.await.unwrap();
        assert!(
            echoed == expected,
            "{} bytes echoed of {}",
            echoed.len(),
            expected.len()
        );
        answer.to_vec()
    }

    /// A caller that resumes with `ping` as early data and then sends nothing more — not even
    /// its Finished — until it has the destination's answer (rustls, driven by hand). Returns
    /// the answer and whether the early data was accepted; `then` is written raw afterwards.
    fn call_without_finished(
        addr: std::net::SocketAddr,
        client: Arc<rustls::ClientConfig>,
        then: Option<&[u8]>,
    ) -> (Vec<u8>, bool) {
        let mut conn = rustls::ClientConnection::new(client, strait_api::transport::mesh_server_name()).unwrap();
        conn.early_data()
            .expect("a resumable session that allows early data")
            .write_all(b"ping")
            .unwrap();
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while conn.wants_write() {
            conn.write_tls(&mut sock).unwrap();
        }
        let mut answer = Vec::new();
        while answer.len() < 4 {
            assert!(conn.read_tls(&mut sock).unwrap() > 0, "closed before its answer");
            conn.process_new_packets().unwrap();
            let mut buf = [0u8; 64];
            match conn.reader().read(&mut buf) {
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let accepted = conn.is_early_data_accepted();
        match then {
            Some(raw) => sock.write_all(raw).unwrap(),
            None => {
                conn.send_close_notify();
                while conn.wants_write() {
                    conn.write_tls(&mut sock).unwrap();
                }
            }
        }
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
        (answer, accepted)
    }

    #[tokio::test]
    async fn a_resumed_callers_early_data_is_answered_before_its_finished() {
        let (server, client) = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The first connection: a full handshake, answered once it is over; its ticket allows
        // early data.
        let (seen, answer) = tokio::join!(serve_one(&listener, server.clone()), call(addr, client.clone(), 0));
        let seen = seen.unwrap();
        assert_eq!(answer, b"gnip");
        assert!(!seen.resumed && !seen.early && !seen.answered_handshaking, "{seen:?}");
        assert_eq!(seen.peer.as_deref(), Some(CALLER));
        // The next resumes: the destination reads `ping` from the ClientHello's flight and
        // answers while the caller has not sent its Finished (it sends nothing until it has
        // the answer), with the identity of the session it resumed.
        let c = client.clone();
        let caller = tokio::task::spawn_blocking(move || call_without_finished(addr, c, None));
        let seen = serve_one(&listener, server.clone()).await.unwrap();
        let (answer, accepted) = caller.await.unwrap();
        assert_eq!(answer, b"gnip");
        assert!(accepted, "the destination took the early data");
        assert!(seen.resumed && seen.early && seen.answered_handshaking, "{seen:?}");
        assert_eq!(seen.peer.as_deref(), Some(CALLER));
    }

    #[tokio::test]
    async fn a_resumed_stream_carries_bulk_both_ways_and_closes_cleanly() {
        let (server, client) = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for round in 0..3 {
            // 4 MiB each way, written and read at once; the first call does a full handshake,
            // the others resume with their first bytes as early data.
            let (seen, answer) = tokio::join!(
                serve_one(&listener, server.clone()),
                call(addr, client.clone(), 4 << 20)
            );
            let seen = seen.unwrap();
            assert_eq!(answer, b"gnip");
            assert_eq!(seen.resumed, round > 0, "{seen:?}");
            assert_eq!(seen.early, round > 0, "{seen:?}");
        }
    }

    #[tokio::test]
    async fn malformed_input_fails_that_connection_with_an_error() {
        let (server, client) = pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Not TLS at all.
        let raw = tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let e = client_hello(&tcp).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        drop(tcp);
        raw.await.unwrap();
        // A session to resume, then a resumed caller that follows its early data with a record
        // that is not TLS: the destination's read fails, nothing panics.
        let (seen, _) = tokio::join!(serve_one(&listener, server.clone()), call(addr, client.clone(), 0));
        seen.unwrap();
        let c = client.clone();
        let caller =
            tokio::task::spawn_blocking(move || call_without_finished(addr, c, Some(b"\x17\x03\x03\x00\x05junk!")));
        let e = serve_one(&listener, server).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let (answer, _) = caller.await.unwrap();
        assert_eq!(answer, b"gnip");
    }
}
