//! Full-duplex HTTP/2 streams for the TCP+TLS fallback: a tunnel is one `POST` whose request
//! body carries the caller's bytes and whose response body carries the gateway's, both open
//! at once (as a gRPC bidirectional stream is).
//!
//! An HTTP/2 CONNECT would do the same, but a client may send nothing on a CONNECT stream
//! before its 2xx (RFC 9113 §8.5; hyper enforces it), so every tunnel over the fallback waited
//! a round trip through the gateway before its tunnel header and ClientHello could leave. On
//! a `POST` they leave with the request's HEADERS, as they do on a QUIC stream. A gateway that
//! serves these streams says so in ALPN ([`ALPN`], offered before `h2`); a client talking to a
//! gateway that picked plain `h2` (one from before them) uses CONNECT.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::StreamExt;
use hyper::body::{Body, Frame, Incoming};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::TunnelError;

/// ALPN of a TCP+TLS fallback connection whose gateway serves full-duplex tunnel streams
/// (HTTP/2 inside).
pub const ALPN: &[u8] = b"strait-h2-duplex/1";

/// The path of a full-duplex tunnel stream (its `:authority` names the service).
pub const TUNNEL_PATH: &str = "/strait.tunnel/v1";

/// The most one write hands to HTTP/2 at once; a bigger write is taken in parts.
const MAX_CHUNK: usize = 64 * 1024;

/// The body one end sends: what its [`BodyWriter`] was given, one chunk per write. It ends
/// (END_STREAM) when the writer shuts down or is dropped.
pub struct ChannelBody(Option<mpsc::Receiver<Bytes>>);

impl ChannelBody {
    /// A body with nothing in it (a CONNECT's, an error answer's).
    pub fn empty() -> Self {
        ChannelBody(None)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(rx) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(rx.poll_next_unpin(cx)) {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => {
                self.0 = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// The writing half of a stream: each write is handed to HTTP/2 as one chunk of the
/// [`ChannelBody`] it feeds. A write waits while the chunk before it has not been taken by
/// HTTP/2 (which waits for flow-control window), so a slow reader at the far end slows the
/// writer. Vectored writes are taken whole (up to [`MAX_CHUNK`]): a TLS stream writing into
/// this one hands over every record it has queued at once. Taking one record per write, as a
/// writer that is not vectored does, kept rustls' outgoing buffer near its limit under a bulk
/// transfer, where it takes only the few bytes that fit and seals each in a record of its own:
/// the chunks shrank to tens of bytes and the fallback carried 4 MB/s instead of 200.
pub struct BodyWriter(Option<mpsc::Sender<Bytes>>);

/// A writer and the body it feeds.
pub fn channel() -> (BodyWriter, ChannelBody) {
    let (tx, rx) = mpsc::channel(0);
    (BodyWriter(Some(tx)), ChannelBody(Some(rx)))
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the tunnel stream was closed or reset")
}

impl AsyncWrite for BodyWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let Some(tx) = self.0.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_CHUNK);
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(tx.poll_ready(cx)).map_err(|_| closed())?;
        let mut chunk = BytesMut::with_capacity(total);
        for b in bufs {
            let take = (total - chunk.len()).min(b.len());
            chunk.extend_from_slice(&b[..take]);
        }
        tx.start_send(chunk.freeze()).map_err(|_| closed())?;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends the body (END_STREAM): the far end reads end of file, and may still write.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0 = None;
        Poll::Ready(Ok(()))
    }
}

/// The reading half of a stream: a received body's DATA frames as bytes; its end is end of
/// file, a reset an error.
pub struct BodyReader {
    body: Incoming,
    data: Bytes,
}

impl BodyReader {
    pub fn new(body: Incoming) -> Self {
        BodyReader {
            body,
            data: Bytes::new(),
        }
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        while self.data.is_empty() {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                // Trailers carry nothing for a tunnel.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.data = data;
                    }
                }
            }
        }
        let n = self.data.len().min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data.advance(n);
        Poll::Ready(Ok(()))
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = hyper::Result<hyper::Response<Incoming>>> + Send>>;

/// A client's reading half: the gateway's response (HTTP 200 and an open body) is awaited by
/// the first read, not before the client may write.
pub struct ResponseReader {
    gateway: SocketAddr,
    state: Response,
}

enum Response {
    Awaited(ResponseFuture),
    Body(BodyReader),
    /// The response was not a 200: the read that found it returned the error.
    Failed,
}

impl ResponseReader {
    pub fn new(gateway: SocketAddr, response: ResponseFuture) -> Self {
        ResponseReader {
            gateway,
            state: Response::Awaited(response),
        }
    }
}

impl AsyncRead for ResponseReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let gateway = self.gateway;
        let detail = match &mut self.state {
            Response::Body(body) => return Pin::new(body).poll_read(cx, buf),
            Response::Failed => return Poll::Ready(Err(closed())),
            Response::Awaited(response) => match ready!(response.as_mut().poll(cx)) {
                Ok(r) if r.status() == hyper::StatusCode::OK => {
                    self.state = Response::Body(BodyReader::new(r.into_body()));
                    return self.poll_read(cx, buf);
                }
                Ok(r) => format!("the gateway answered the tunnel stream with HTTP {}", r.status()),
                Err(e) => format!("HTTP/2: {e}"),
            },
        };
        self.state = Response::Failed;
        Poll::Ready(Err(std::io::Error::other(TunnelError::Stream { gateway, detail })))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use strait_api::pb;
    use strait_api::tunnel::{read_header, status, write_header};
    use strait_trust::{server_config, CertStore, PeerPolicy, ServerAuth, SpiffeId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::testing::{gateway_and_caller, GATEWAY};
    use crate::TunnelClient;

    /// Answers a tunnel header with OK, then echoes what follows in capitals until the caller
    /// half-closes, and half-closes in turn.
    async fn answer_and_shout(mut reader: impl AsyncRead + Unpin, mut writer: impl AsyncWrite + Unpin, first: &[u8]) {
        write_header(
            &mut writer,
            &pb::TunnelResponse {
                status: status::OK,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        writer.write_all(&first.to_ascii_uppercase()).await.unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
        }
        writer.shutdown().await.unwrap();
    }

    /// A fallback listener that serves full-duplex streams (and refuses CONNECT with 405) or,
    /// as a gateway from before them, CONNECT (and refuses `POST`). A full-duplex stream is
    /// answered only once the tunnel header and the caller's first five bytes are in, so a
    /// client that waited for the answer before writing would never get one; its service
    /// `refused` is answered 503. A CONNECT is answered at once, as HTTP/2 requires.
    async fn fallback_gateway(store: CertStore, duplex: bool) -> SocketAddr {
        let alpn: &[&[u8]] = if duplex {
            &[ALPN, strait_trust::ALPN_H2]
        } else {
            &[strait_trust::ALPN_H2]
        };
        let config =
            Arc::new(server_config(&store, PeerPolicy::AnyInBundle, ServerAuth::RequireClientCert, alpn).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tls = tokio_rustls::TlsAcceptor::from(config.clone())
                    .accept(tcp)
                    .await
                    .unwrap();
                let svc = service_fn(move |mut req: hyper::Request<Incoming>| async move {
                    let refuse = |status| {
                        let mut resp = hyper::Response::new(ChannelBody::empty());
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    };
                    if (req.method() == hyper::Method::POST) != duplex {
                        return refuse(hyper::StatusCode::METHOD_NOT_ALLOWED);
                    }
                    if duplex {
                        assert_eq!(req.uri().path(), TUNNEL_PATH);
                        if req.uri().authority().unwrap().as_str() == "refused.demo:80" {
                            return refuse(hyper::StatusCode::SERVICE_UNAVAILABLE);
                        }
                        assert_eq!(req.uri().authority().unwrap().as_str(), "echo.demo:80");
                        let mut reader = BodyReader::new(req.into_body());
                        let header: pb::TunnelRequest = read_header(&mut reader).await.unwrap();
                        assert_eq!(header.service, "echo");
                        let mut first = [0u8; 5];
                        reader.read_exact(&mut first).await.unwrap();
                        let (writer, body) = channel();
                        tokio::spawn(async move { answer_and_shout(reader, writer, &first).await });
                        return Ok(hyper::Response::new(body));
                    }
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(hyper::upgrade::on(&mut req).await.unwrap());
                        let header: pb::TunnelRequest = read_header(&mut io).await.unwrap();
                        assert_eq!(header.service, "echo");
                        let (reader, writer) = tokio::io::split(io);
                        answer_and_shout(reader, writer, b"").await;
                    });
                    Ok(hyper::Response::new(ChannelBody::empty()))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc),
                );
            }
        });
        addr
    }

    fn client(caller: CertStore) -> TunnelClient {
        TunnelClient::new("127.0.0.1:0".parse().unwrap(), caller)
            .unwrap()
            .with_handshake_timeout(Duration::from_millis(200))
    }

    fn to(service: &str) -> pb::TunnelRequest {
        pb::TunnelRequest {
            service: service.into(),
            namespace: "demo".into(),
            port: 80,
            ..Default::default()
        }
    }

    /// Opens a tunnel to `echo.demo:80` through a gateway at `addr` that does not answer QUIC,
    /// writes `hello`, half-closes and returns all it read.
    async fn shout_through(addr: SocketAddr, caller: CertStore) -> (Vec<u8>, TunnelClient) {
        let client = client(caller);
        let gateway: SpiffeId = GATEWAY.parse().unwrap();
        let (mut stream, answered) = client.open(addr, &gateway, &to("echo")).await.unwrap();
        assert!(!answered.get());
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
            .await
            .expect("the tunnel answered")
            .unwrap();
        assert!(answered.get());
        (got, client)
    }

    /// A gateway serves once it has its certificate, before its first config: a tunnel that
    /// comes then is answered once the config is in (here: the service is not in it), not
    /// before; a tunnel whose deadline passes first is answered 503, naming the cause.
    #[tokio::test]
    async fn a_tunnel_to_a_gateway_without_its_first_config_yet_waits_for_it() {
        let (gateway, caller) = gateway_and_caller();
        let (config, rx) = tokio::sync::watch::channel(Arc::new(strait_api::snapshot::Snapshot::default()));
        let server = crate::testing::gateway_configured_by(gateway, rx, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = strait_api::drain::Drain::new();
        tokio::spawn(server.serve_tcp(listener, drain.watch()));
        let client = client(caller);
        let id: SpiffeId = GATEWAY.parse().unwrap();

        // Its deadline passes before any config.
        let mut soon = to("nowhere");
        soon.deadline_unix_ms = (strait_api::unix_ms(std::time::SystemTime::now()) + 200) as u64;
        let (mut stream, _) = client.open(addr, &id, &soon).await.unwrap();
        let err = stream.read(&mut [0u8; 8]).await.unwrap_err();
        match TunnelError::from_io(err) {
            Ok(TunnelError::Refused { status, message, .. }) => {
                assert_eq!(status, status::NO_ENDPOINT);
                assert!(message.contains("no config yet"), "{message}");
            }
            other => panic!("{other:?}"),
        }

        let (mut stream, _) = client.open(addr, &id, &to("nowhere")).await.unwrap();
        let mut read = Box::pin(async move { stream.read(&mut [0u8; 8]).await });
        let unanswered = tokio::time::timeout(Duration::from_millis(300), &mut read).await;
        assert!(
            unanswered.is_err(),
            "answered before the gateway had a config: {unanswered:?}"
        );
        config.send_replace(crate::testing::first_config());
        match TunnelError::from_io(read.await.unwrap_err()) {
            Ok(TunnelError::Refused { status, .. }) => assert_eq!(status, status::UNKNOWN_SERVICE),
            other => panic!("{other:?}"),
        }
    }

    /// The real gateway's fallback listener, with no QUIC listener beside it: a tunnel (a
    /// full-duplex stream) to a service it does not know is answered in-band, as on QUIC; a
    /// `POST` elsewhere is 404 and any other method 405, naming the two it serves.
    #[tokio::test]
    async fn the_gateways_fallback_listener_answers_tunnels_in_band_and_anything_else_by_status() {
        let (gateway, caller) = gateway_and_caller();
        let server = crate::testing::gateway(gateway);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = strait_api::drain::Drain::new();
        tokio::spawn(server.serve_tcp(listener, drain.watch()));

        let client = client(caller.clone());
        let id: SpiffeId = GATEWAY.parse().unwrap();
        let (mut stream, _) = client.open(addr, &id, &to("nowhere")).await.unwrap();
        assert!(client.in_fallback(addr));
        let err = stream.read(&mut [0u8; 8]).await.unwrap_err();
        match TunnelError::from_io(err) {
            Ok(TunnelError::Refused { status, .. }) => assert_eq!(status, status::UNKNOWN_SERVICE),
            other => panic!("{other:?}"),
        }

        // Plain HTTP/2 requests on the same listener.
        let tls = strait_trust::client_config(
            Some(&caller),
            caller.bundle(),
            caller.metrics(),
            PeerPolicy::OneOf(vec![id]),
            &[ALPN],
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("strait.mesh").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let send = |method: hyper::Method, path: &str| {
            hyper::Request::builder()
                .method(method)
                .uri(format!("https://echo.demo:80{path}"))
                .body(ChannelBody::empty())
                .unwrap()
        };
        let resp = h2.send_request(send(hyper::Method::POST, "/elsewhere")).await.unwrap();
        assert_eq!(resp.status(), hyper::StatusCode::NOT_FOUND);
        let resp = h2.send_request(send(hyper::Method::GET, TUNNEL_PATH)).await.unwrap();
        assert_eq!(resp.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[hyper::header::ALLOW], "POST, CONNECT");
    }

    #[tokio::test]
    async fn a_fallback_tunnels_first_bytes_leave_before_the_gateways_answer() {
        let (gateway, caller) = gateway_and_caller();
        let addr = fallback_gateway(gateway, true).await;
        let (got, client) = shout_through(addr, caller).await;
        assert_eq!(got, b"HELLO");
        assert!(client.in_fallback(addr));
        // An HTTP answer other than 200 is the tunnel's error, at the first read.
        let gateway: SpiffeId = GATEWAY.parse().unwrap();
        let (mut stream, answered) = client.open(addr, &gateway, &to("refused")).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let err = stream.read(&mut [0u8; 8]).await.unwrap_err();
        match TunnelError::in_io(&err) {
            Some(TunnelError::Stream { gateway, detail }) => {
                assert_eq!(*gateway, addr);
                assert!(detail.contains("HTTP 503"), "{detail}");
            }
            other => panic!("not a stream error: {other:?} ({err})"),
        }
        assert!(!answered.get());
    }

    #[tokio::test]
    async fn a_vectored_write_is_one_chunk_and_a_write_waits_for_the_one_before() {
        let (mut writer, mut body) = channel();
        let records = [vec![1u8; 100], vec![2u8; 16 * 1024], vec![3u8; 30]];
        let slices: Vec<_> = records.iter().map(|r| std::io::IoSlice::new(r)).collect();
        assert!(writer.is_write_vectored());
        assert_eq!(writer.write_vectored(&slices).await.unwrap(), 100 + 16 * 1024 + 30);
        // The chunk before has not been taken: the next write waits.
        let mut next = std::pin::pin!(writer.write(b"more"));
        assert!(futures::poll!(next.as_mut()).is_pending());
        let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk.len(), 100 + 16 * 1024 + 30);
        assert_eq!((chunk[0], chunk[100], chunk[chunk.len() - 1]), (1, 2, 3));
        assert_eq!(next.await.unwrap(), 4);
        // More than MAX_CHUNK is taken in parts; shutting down ends the body.
        let big = vec![0u8; MAX_CHUNK + 1];
        let rest = tokio::spawn(async move {
            writer.write_all(&big).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut sizes = vec![];
        while let Some(frame) = body.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        rest.await.unwrap();
        assert_eq!(sizes, [4, MAX_CHUNK, 1]);
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_gateway_from_before_duplex_streams_is_tunnelled_to_with_connect() {
        let (gateway, caller) = gateway_and_caller();
        let addr = fallback_gateway(gateway, false).await;
        let (got, client) = shout_through(addr, caller).await;
        assert_eq!(got, b"HELLO");
        assert!(client.in_fallback(addr));
    }
}
