//! Write coalescing under an HTTP/2 connection.
//!
//! The `h2` crate flushes its transport once for every DATA frame longer than 256 bytes
//! (hyperium/h2#711, #902): a frame's payload is not copied into its write buffer, and a
//! second such frame waits until the first has been flushed. Over TLS each flush is its own
//! record and its own `writev`, and wakes the peer for its own segment: a sidecar forwarding
//! four 1 kB requests made five writes where one would do (`strace`: 391 bytes of HEADERS,
//! then 4 x 1,055). [`Coalesced`] sits between the HTTP/2 connection and its TLS stream and
//! writes everything the connection produced in one pass of its task at once.
//!
//! How: a write lands in a buffer; a flush that finds bytes buffered does not write them but
//! wakes the task, so the connection goes on encoding (its other streams' frames join the
//! buffer). Every pass of an HTTP/2 connection reads first and flushes last (and so does the
//! pass the wake causes): the first flush after a read writes the buffer out, with what that
//! pass encoded before it (a request's DATA, sent by its body task after the pass that wrote
//! its HEADERS, leaves with them). So do shutdown, the buffer reaching [`LIMIT`], and a flush
//! after [`MAX_DEFERRED`] deferred ones with no read between (a bound, should a connection
//! flush without reading). Nothing waits on a timer: the bytes leave within two turns of the
//! scheduler. A write of at least [`LIMIT`] bytes onto an empty buffer goes straight through,
//! uncopied; h2's DATA frames (16 KiB at most by default) are copied and batched, which measured
//! faster for streamed bodies than letting them through (README, "Scale and performance").

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a connection buffers before it writes (four TLS records).
pub const LIMIT: usize = 64 * 1024;
/// How many flushes in a row may be answered without writing.
pub const MAX_DEFERRED: u8 = 32;
/// The capacity a connection's buffer keeps between passes. A pass that wrote less gives back
/// the rest (a bulk transfer grows it to 128 KiB; without this every pooled connection that
/// ever carried one held that for its life, though its later passes write a few KiB). Bulk
/// passes write at least [`LIMIT`], so a transfer in progress keeps its buffer.
pub const KEEP: usize = 16 * 1024;

/// A transport whose writes are gathered per pass of the task that drives it (see the
/// module's documentation).
pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the transport has taken.
    sent: usize,
    /// Flushes answered without writing since the buffer was last written (the task was woken
    /// for each, so a read follows).
    deferred: u8,
    /// The connection read since the last deferred flush: a new pass, whose flush writes.
    read_since: bool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Coalesced {
            inner,
            buf: Vec::new(),
            sent: 0,
            deferred: 0,
            read_since: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Hands the whole buffer to the transport (and flushes it).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.buf.len() < KEEP && self.buf.capacity() > KEEP {
            self.buf.shrink_to(KEEP);
        }
        self.buf.clear();
        self.sent = 0;
        self.deferred = 0;
        self.read_since = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Makes room for more: writes the buffer out once it holds [`LIMIT`] bytes.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A new pass of the connection: its next flush writes what is buffered.
        this.read_since = this.pending() > 0;
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.pending() == 0 && total >= LIMIT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        ready!(this.poll_room(cx))?;
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() == 0 {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.read_since || this.deferred >= MAX_DEFERRED {
            return this.poll_drain(cx);
        }
        // The connection may still have frames to encode in this pass: let them join, and be
        // polled again (its next pass reads, which writes them all).
        this.deferred += 1;
        cx.waker().wake_by_ref();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// A transport that records each write it is handed.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn frame(io: &mut Coalesced<Recorder>, cx: &mut Context<'_>, data: &[u8]) {
        let pin = Pin::new(&mut *io);
        assert!(matches!(pin.poll_write(cx, data), Poll::Ready(Ok(n)) if n == data.len()));
        assert!(matches!(Pin::new(&mut *io).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    #[test]
    fn frames_flushed_one_by_one_in_a_pass_leave_in_one_write_in_the_next_pass() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());
        // What h2 does with a HEADERS frame and four 1 kB DATA frames: write, flush, each.
        frame(&mut io, &mut cx, b"headers");
        for i in 0..4u8 {
            frame(&mut io, &mut cx, &[i; 1024]);
        }
        assert!(io.get_ref().writes.is_empty(), "nothing written within the pass");
        assert!(wakes.0.load(Ordering::SeqCst) > 0, "the task was woken to write");
        // The connection's next pass reads, then encodes what came since (another DATA
        // frame) and flushes: everything goes out in one write, in order.
        let mut space = [0u8; 16];
        let mut out = ReadBuf::new(&mut space);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut out).is_pending());
        assert!(io.get_ref().writes.is_empty(), "a read does not write");
        frame(&mut io, &mut cx, b"late");
        let writes = &io.get_ref().writes;
        assert_eq!(writes.len(), 1);
        let mut want = b"headers".to_vec();
        for i in 0..4u8 {
            want.extend_from_slice(&[i; 1024]);
        }
        want.extend_from_slice(b"late");
        assert_eq!(writes[0], want);
        assert_eq!(io.get_ref().flushes, 1);
        // Nothing buffered: a flush is the transport's.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.get_ref().flushes, 2);
        // A read with nothing buffered does not make the next pass's first flush write.
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut out).is_pending());
        frame(&mut io, &mut cx, b"next");
        assert_eq!(io.get_ref().writes.len(), 1);
    }

    #[test]
    fn flushes_without_a_read_write_after_a_bound_and_large_writes_pass_through() {
        let waker = Waker::from(Arc::new(Wakes::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());
        for _ in 0..MAX_DEFERRED {
            frame(&mut io, &mut cx, b"x");
        }
        assert!(io.get_ref().writes.is_empty());
        frame(&mut io, &mut cx, b"y");
        assert_eq!(io.get_ref().writes.len(), 1, "the bound was reached: written");
        assert_eq!(io.get_ref().writes[0].len(), MAX_DEFERRED as usize + 1);
        // A bulk frame onto an empty buffer is not copied.
        let big = vec![9u8; LIMIT];
        assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, &big), Poll::Ready(Ok(n)) if n == LIMIT));
        assert_eq!(io.get_ref().writes.len(), 2);
        // Small writes fill the buffer up to the limit, then it is written before more is taken.
        let small = vec![1u8; LIMIT / 4];
        for _ in 0..5 {
            assert!(Pin::new(&mut io).poll_write(&mut cx, &small).is_ready());
        }
        assert_eq!(io.get_ref().writes.len(), 3);
        assert_eq!(io.get_ref().writes[2].len(), LIMIT);
        // Shutdown writes what is left first.
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(io.get_ref().writes.len(), 4);
        assert_eq!(io.get_ref().writes[3].len(), LIMIT / 4);
        assert!(io.get_ref().shut);
    }

    #[test]
    fn a_buffer_grown_by_bulk_is_given_back_by_the_next_small_pass() {
        let waker = Waker::from(Arc::new(Wakes::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());
        let mut space = [0u8; 16];
        let mut out = ReadBuf::new(&mut space);
        // Bulk: 16 KiB frames fill the buffer past the limit, which writes it.
        for _ in 0..5 {
            assert!(Pin::new(&mut io).poll_write(&mut cx, &[7u8; 16 * 1024]).is_ready());
        }
        assert_eq!(io.get_ref().writes.len(), 1);
        assert!(io.buf.capacity() >= LIMIT, "bulk grew the buffer");
        // Writing a bulk pass keeps the buffer: the transfer goes on.
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut out).is_pending());
        frame(&mut io, &mut cx, &[8u8; 16 * 1024]);
        assert_eq!(io.get_ref().writes.len(), 2);
        assert!(io.buf.capacity() >= LIMIT);
        // A small pass (a request, a PING answer) writes and gives the rest back.
        frame(&mut io, &mut cx, b"ping");
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut out).is_pending());
        frame(&mut io, &mut cx, b"pong");
        assert_eq!(io.get_ref().writes.len(), 3);
        assert_eq!(io.get_ref().writes[2], b"pingpong".to_vec());
        assert!(io.buf.capacity() <= KEEP, "capacity {}", io.buf.capacity());
    }

    /// Real HTTP/2 (hyper's client and server) over coalesced transports on both ends: many
    /// concurrent requests with bodies each way, all answered whole.
    #[tokio::test]
    async fn http2_over_coalesced_transports_answers_every_request() {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (client_io, server_io) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(Coalesced::new(server_io)), svc)
                .await;
        });
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<bytes::Bytes>>(TokioIo::new(Coalesced::new(client_io)))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200usize {
            let mut sender = sender.clone();
            calls.spawn(async move {
                // Sizes from empty to past the buffer's limit.
                let body = vec![(i % 251) as u8; (i * 997) % (3 * LIMIT)];
                let req = hyper::Request::post("http://echo/").body(Full::new(bytes::Bytes::from(body.clone())))?;
                let resp = sender.send_request(req).await?;
                let got = resp.into_body().collect().await?.to_bytes();
                assert_eq!(got.as_ref(), body.as_slice(), "request {i}");
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap().unwrap();
        }
    }
}
