//! Request smuggling defence for HTTP/1.1 clients. hyper already answers 400 to duplicate
//! differing `Content-Length`s, obs-folded header lines, invalid header bytes and non-chunked
//! `Transfer-Encoding`, and 431 to heads over the limit. A request that carries both
//! `Content-Length` and `Transfer-Encoding` it would decode as chunked (RFC 9112 §6.3) and then
//! close the connection; since such a request is how smuggling starts, the proxy refuses it
//! outright: the first request head of each connection is read (peeked, nothing consumed)
//! before hyper sees it, and an ambiguous one gets 400 and is never forwarded.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Why a request head is refused before hyper reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Both `Content-Length` and `Transfer-Encoding`: two framings, two readings.
    LengthAndChunked,
    /// A header line continued on the next line (obs-fold).
    ObsFold,
    /// The head did not arrive whole within the head read timeout (slowloris).
    HeadTimeout,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::LengthAndChunked => "content_length_and_transfer_encoding",
            Refusal::ObsFold => "obs_fold",
            Refusal::HeadTimeout => "head_timeout",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::LengthAndChunked => {
                "the request has both Content-Length and Transfer-Encoding; send exactly one of them"
            }
            Refusal::ObsFold => "a header line is folded onto the next line (obs-fold); send each header on one line",
            Refusal::HeadTimeout => "the request head did not arrive in time",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Refusal::HeadTimeout => "408 Request Timeout",
            _ => "400 Bad Request",
        }
    }
}

/// Checks a complete request head (request line and headers, up to the empty line).
pub fn check_head(head: &[u8]) -> Result<(), Refusal> {
    let mut lines = head.split(|b| *b == b'\n').skip(1);
    let (mut length, mut chunked) = (false, false);
    for line in lines.by_ref() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(Refusal::ObsFold);
        }
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        let name = name.trim_ascii();
        length |= name.eq_ignore_ascii_case(b"content-length");
        chunked |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    if length && chunked {
        return Err(Refusal::LengthAndChunked);
    }
    Ok(())
}

/// Peeks at the first request head of a connection (up to `max` bytes, for at most `wait`) and
/// checks it. A head that does not fit is left to hyper, which answers 431; one that does not
/// arrive whole in time is refused with 408.
pub async fn check_first(stream: &TcpStream, max: usize, wait: Duration) -> Result<(), Refusal> {
    let deadline = tokio::time::Instant::now() + wait;
    let max = max.clamp(1024, 64 * 1024);
    // Small first: most heads fit in 4 KiB, and a slow client should not cost 64 KiB.
    let mut buf = vec![0u8; 4096.min(max)];
    let mut seen = 0;
    let mut nap = Duration::from_millis(5);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Ok(()),
            Err(_) => return Err(Refusal::HeadTimeout),
        };
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return check_head(&buf[..end + 4]);
        }
        if n == 0 {
            return Ok(());
        }
        if n == buf.len() {
            if buf.len() >= max {
                return Ok(()); // too large: hyper answers 431
            }
            buf.resize((buf.len() * 4).min(max), 0);
            continue;
        }
        if n == seen {
            // Nothing new: wait for the rest of the head, backing off while it trickles
            // (peek cannot wait for *new* bytes).
            if tokio::time::Instant::now() >= deadline {
                return Err(Refusal::HeadTimeout);
            }
            tokio::time::sleep(nap).await;
            nap = (nap * 2).min(Duration::from_millis(100));
        } else {
            nap = Duration::from_millis(5);
        }
        seen = n;
    }
}

/// Admits a connection whose first bytes look like HTTP/1.1: its first head is checked, and
/// a refused one is logged, counted in `rejected` and answered here. Returns the stream when
/// it may be served.
pub async fn admit(
    stream: TcpStream,
    max: usize,
    wait: Duration,
    rejected: &prometheus::IntCounterVec,
) -> Option<TcpStream> {
    match check_first(&stream, max, wait).await {
        Ok(()) => Some(stream),
        Err(why) => {
            tracing::info!(reason = why.reason(), peer = ?stream.peer_addr().ok(), "refused an HTTP/1.1 request before forwarding it");
            rejected.with_label_values(&[why.reason()]).inc();
            refuse(stream, why).await;
            None
        }
    }
}

/// Answers 400 and closes, after dropping what the client sent (bounded), so the answer is not
/// destroyed by a reset.
pub async fn refuse(mut stream: TcpStream, why: Refusal) {
    let body = format!("{}\n", why.message());
    let resp = format!(
        "HTTP/1.1 {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        why.status(),
        body.len()
    );
    if stream.write_all(resp.as_bytes()).await.is_ok() && stream.shutdown().await.is_ok() {
        super::linger_close(stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_framings_are_refused_in_any_case_and_order() {
        let h = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check_head(h), Err(Refusal::LengthAndChunked));
        let h = b"POST / HTTP/1.1\r\ntransfer-encoding : chunked\r\nCONTENT-LENGTH: 5\r\n\r\n";
        assert_eq!(check_head(h), Err(Refusal::LengthAndChunked));
    }

    #[test]
    fn obs_fold_is_refused_and_plain_heads_pass() {
        let h = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  continued\r\n\r\n";
        assert_eq!(check_head(h), Err(Refusal::ObsFold));
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(())
        );
        // Only the head counts: a body that looks like headers is not read.
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nContent-Length: 1\r\n"),
            Ok(())
        );
    }
}
