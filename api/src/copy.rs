//! Copying an opaque stream both ways (a sidecar's TCP splice, a gateway's tunnel stream to its
//! destination sidecar) with buffers held only while bytes are on their way: a direction takes
//! a buffer from its thread's pool when it reads, and gives it back as soon as what it read is
//! written. An idle connection holds no buffer, and a new one allocates none once a few
//! connections have come and gone.
//!
//! `tokio::io::copy_bidirectional` allocates two zeroed buffers per connection for its whole
//! life (64 KiB each as we sized them): 128 KiB of heap per idle connection in each process on
//! the path, and the allocation and page faults of 192 KiB at every new connection of the
//! caller's sidecar. A read starts in a small buffer; a direction whose read filled one reads
//! into large ones from then on (a bulk transfer moves 64 KiB per write, as before).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a direction reads into first: a TLS record's plaintext.
pub const SMALL: usize = 16 * 1024;
/// What a direction whose read filled a small buffer reads into: fewer, larger TLS records and
/// writes for a bulk transfer.
pub const LARGE: usize = 64 * 1024;
/// Buffers each thread keeps for the next read, small and large (up to 384 KiB in all, held
/// only after that many directions had bytes in flight at once).
const KEPT: [usize; 2] = [8, 4];

thread_local! {
    static POOL: RefCell<[Vec<Vec<u8>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// A buffer of the size asked for, from this thread's pool or new.
fn take(large: bool) -> Vec<u8> {
    let kept = POOL
        .try_with(|pool| pool.borrow_mut()[usize::from(large)].pop())
        .ok()
        .flatten();
    kept.unwrap_or_else(|| vec![0; if large { LARGE } else { SMALL }])
}

/// Keeps `buf` for the next read on this thread, unless the pool holds enough of its size.
fn give(buf: Vec<u8>) {
    let large = buf.len() == LARGE;
    // A thread being torn down has no pool: the buffer is freed.
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let kept = &mut pool[usize::from(large)];
        if kept.len() < KEPT[usize::from(large)] {
            kept.push(buf);
        }
    });
}

/// Buffers this thread keeps, small and large.
#[cfg(test)]
fn pooled() -> [usize; 2] {
    POOL.try_with(|pool| {
        let pool = pool.borrow();
        [pool[0].len(), pool[1].len()]
    })
    .unwrap_or_default()
}

/// One direction of a copy.
#[derive(Default)]
struct Direction {
    /// Held while `pos..end` of it waits to be written.
    buf: Option<Vec<u8>>,
    pos: usize,
    end: usize,
    /// A read filled a small buffer: read into large ones.
    large: bool,
    read_done: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    copied: u64,
}

impl Direction {
    /// Copies until the reader ends (then flushes and shuts the writer down) or either fails;
    /// returns the bytes copied.
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                let mut buf = self.buf.take().unwrap_or_else(|| take(self.large));
                let mut read = ReadBuf::new(&mut buf);
                match r.as_mut().poll_read(cx, &mut read) {
                    Poll::Pending => {
                        give(buf);
                        // Nothing more to send for now: what was written goes out.
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        give(buf);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            give(buf);
                        } else {
                            self.large |= n == buf.len();
                            (self.pos, self.end) = (0, n);
                            self.buf = Some(buf);
                        }
                    }
                }
            }
            while self.pos < self.end {
                let Some(buf) = self.buf.as_mut() else {
                    unreachable!("bytes waiting to be written are in the held buffer")
                };
                match w.as_mut().poll_write(cx, &buf[self.pos..self.end]) {
                    Poll::Pending => {
                        // Read on behind what waits, so that the next write is larger.
                        if !self.read_done && self.end < buf.len() {
                            let mut read = ReadBuf::new(&mut buf[self.end..]);
                            match r.as_mut().poll_read(cx, &mut read) {
                                Poll::Ready(Ok(())) if read.filled().is_empty() => self.read_done = true,
                                Poll::Ready(Ok(())) => {
                                    self.end += read.filled().len();
                                    continue;
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the other side accepts no more bytes",
                        )))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.copied += n as u64;
                        self.need_flush = true;
                    }
                }
            }
            // Everything read is written: the buffer goes back.
            if let Some(buf) = self.buf.take() {
                give(buf);
            }
            (self.pos, self.end) = (0, 0);
            if self.read_done {
                ready!(w.as_mut().poll_flush(cx))?;
                self.need_flush = false;
                ready!(w.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both ended or either failed; an end on one side is
/// passed on as a shutdown of the other's writing half (the other direction goes on). Returns
/// the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut to_b, mut to_a) = (Direction::default(), Direction::default());
    let (mut a_to_b, mut b_to_a) = (None, None);
    std::future::poll_fn(|cx| {
        if a_to_b.is_none() {
            if let Poll::Ready(copied) = to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                a_to_b = Some(copied?);
            }
        }
        if b_to_a.is_none() {
            if let Poll::Ready(copied) = to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                b_to_a = Some(copied?);
            }
        }
        match (a_to_b, b_to_a) {
            (Some(a_to_b), Some(b_to_a)) => Poll::Ready(Ok((a_to_b, b_to_a))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes both ways, larger than any buffer and through pipes smaller than one, arrive
    /// whole and in order; each end is passed on, and the counts are returned.
    #[tokio::test]
    async fn bulk_both_ways_arrives_whole_and_each_end_is_passed_on() {
        let (client, mut proxy_a) = tokio::io::duplex(7_000);
        let (mut proxy_b, server) = tokio::io::duplex(5_000);
        let copy = tokio::spawn(async move { copy_both_ways(&mut proxy_a, &mut proxy_b).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let writers = tokio::spawn(async move {
            client_w.write_all(&sent_up).await.unwrap();
            client_w.shutdown().await.unwrap();
            server_w.write_all(&sent_down).await.unwrap();
            server_w.shutdown().await.unwrap();
        });
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let (r1, r2) = tokio::join!(server_r.read_to_end(&mut got_up), client_r.read_to_end(&mut got_down));
        r1.unwrap();
        r2.unwrap();
        writers.await.unwrap();
        assert!(got_up == up, "the client's bytes arrive whole and in order");
        assert!(got_down == down, "the server's bytes arrive whole and in order");
        assert_eq!(copy.await.unwrap().unwrap(), (300_000, 200_000));
    }

    /// A connection with nothing in flight holds no buffer: each read's buffer is back in the
    /// pool once written, and the next connection takes it instead of allocating.
    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_holds_no_buffer_and_the_next_one_reuses_it() {
        let (mut client, mut proxy_a) = tokio::io::duplex(64 * 1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(64 * 1024);
        let before = pooled();
        let copy = tokio::spawn(async move { copy_both_ways(&mut proxy_a, &mut proxy_b).await });
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        // Idle now: the buffer each direction read into is back.
        tokio::task::yield_now().await;
        assert_eq!(before, [0, 0], "a new thread's pool is empty");
        assert_eq!(pooled(), [1, 0], "an idle connection holds nothing");
        // A bulk write fills a small buffer: that direction goes on in large ones, and gives
        // them back too.
        let bulk = vec![7u8; 3 * LARGE];
        client.write_all(&bulk).await.unwrap();
        let mut got = vec![0u8; bulk.len()];
        server.read_exact(&mut got).await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            pooled()[1] >= 1,
            "the large buffer is back once written: {:?}",
            pooled()
        );
        drop((client, server));
        copy.await.unwrap().unwrap();
    }

    /// A writer that takes nothing ends the copy with an error instead of spinning.
    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error() {
        struct Full;
        impl AsyncWrite for Full {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(0))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        impl AsyncRead for Full {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Poll::Pending
            }
        }
        let (mut client, mut proxy) = tokio::io::duplex(1024);
        client.write_all(b"x").await.unwrap();
        let err = copy_both_ways(&mut proxy, &mut Full).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
