//! A request body that streams to the upstream while it keeps its first bytes, so an attempt
//! that failed can be replayed to another endpoint without buffering the whole body.
//!
//! Every attempt gets its own [`ReplayBody`]; they share one state: the client's body (read
//! once, by whichever attempt is current), the frames read so far while they fit in the replay
//! buffer, and the trailers. A new attempt first replays what was kept, then goes on reading
//! the client's body where the last attempt stopped. Once more than the buffer's bound was
//! read, nothing is kept any more and [`Replay::attempt`] says no: a request is never resent
//! partially. An attempt that was superseded by a newer one ends with an error if it is still
//! polled.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::HeaderMap;

/// The default bound of the replay buffer.
pub const DEFAULT_REPLAY_BUFFER: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request could not be attempted again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReplay {
    /// More of the body was sent than the replay buffer holds.
    BufferExceeded,
    /// Reading the client's body failed (the client went away): nothing to resend.
    ClientBodyFailed,
}

impl NoReplay {
    /// The metric label of a retry skipped for this reason.
    pub fn reason(self) -> &'static str {
        match self {
            NoReplay::BufferExceeded => "replay_buffer_exceeded",
            NoReplay::ClientBodyFailed => "client_body_failed",
        }
    }
}

struct State {
    /// The client's body while it has frames left.
    source: Option<UnsyncBoxBody<Bytes, BoxError>>,
    /// Data frames read so far, while they fit in `cap`.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    cap: usize,
    /// More than `cap` was read: the kept frames were dropped and no replay is possible.
    overflowed: bool,
    source_failed: bool,
    trailers: Option<HeaderMap>,
    /// Whether any frame was read from the client's body (something may have been sent).
    read_any: bool,
    /// The attempt allowed to read; older ones are superseded.
    generation: u64,
}

/// The shared state of one request's body across its attempts.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
}

impl Replay {
    pub fn new<B>(body: B, cap: usize) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Replay {
            state: Arc::new(Mutex::new(State {
                source: Some(body.map_err(Into::into).boxed_unsync()),
                kept: Vec::new(),
                kept_bytes: 0,
                cap,
                overflowed: false,
                source_failed: false,
                trailers: None,
                read_any: false,
                generation: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while polling; the state is still consistent enough
        // to end the request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A body for the next attempt, replaying what earlier attempts sent; or why there is none.
    pub fn attempt(&self) -> Result<ReplayBody, NoReplay> {
        let mut st = self.lock();
        if st.source_failed {
            return Err(NoReplay::ClientBodyFailed);
        }
        if st.overflowed {
            return Err(NoReplay::BufferExceeded);
        }
        st.generation += 1;
        Ok(ReplayBody {
            state: self.state.clone(),
            generation: st.generation,
            next: 0,
            trailers_sent: false,
        })
    }

    /// The whole body, when it has been read to its end and fits the buffer (a mirror of the
    /// request sends this copy).
    pub fn complete_copy(&self) -> Option<(Vec<Bytes>, Option<HeaderMap>)> {
        let st = self.lock();
        let ended = st.source.as_ref().is_none_or(|s| s.is_end_stream());
        (ended && !st.overflowed && !st.source_failed).then(|| (st.kept.clone(), st.trailers.clone()))
    }

    /// Whether any of the client's body was read by an attempt.
    pub fn read_any(&self) -> bool {
        self.lock().read_any
    }
}

/// One attempt's view of the request body.
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    generation: u64,
    /// The next kept frame this attempt replays.
    next: usize,
    trailers_sent: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was taken over by a retry")]
struct Superseded;

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut st = this.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if this.next < st.kept.len() {
            let chunk = st.kept[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(source) = st.source.as_mut() else {
            // The client's body ended: replay its trailers, if any, once.
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.source = None;
                st.source_failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                st.read_any = true;
                match frame.into_data() {
                    Ok(data) => {
                        if !st.overflowed && st.kept_bytes + data.len() <= st.cap {
                            st.kept_bytes += data.len();
                            st.kept.push(data.clone());
                            this.next = st.kept.len();
                        } else if !st.overflowed {
                            // Past the bound: keep nothing, replay is no longer possible.
                            st.overflowed = true;
                            st.kept = Vec::new();
                            st.kept_bytes = 0;
                            this.next = 0;
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            st.trailers = Some(t.clone());
                            this.trailers_sent = true;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.generation != self.generation {
            return true;
        }
        if self.next < st.kept.len() || (st.trailers.is_some() && !self.trailers_sent) {
            return false;
        }
        st.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &st.source {
            // Nothing read yet: the client's own hint (a Content-Length) holds.
            Some(s) if !st.read_any => s.size_hint(),
            Some(_) => SizeHint::default(),
            None => {
                let left: usize = st.kept[self.next.min(st.kept.len())..].iter().map(Bytes::len).sum();
                SizeHint::with_exact(left as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = BoxError> + Send + 'static {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        StreamBody::new(stream::iter(frames))
    }

    async fn read_all(body: ReplayBody) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_second_attempt_replays_what_the_first_read_then_continues() {
        let replay = Replay::new(chunks(&[b"ab", b"cd", b"ef"]), 16);
        let mut first = replay.attempt().unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"ab"));
        assert!(replay.read_any());
        // The first attempt failed after one frame: the second sends everything, in order.
        let second = replay.attempt().unwrap();
        assert_eq!(read_all(second).await.unwrap(), b"abcdef");
        // The superseded attempt may not read on.
        assert!(first.frame().await.unwrap().is_err());
        // A third attempt replays the whole body from the buffer.
        assert_eq!(read_all(replay.attempt().unwrap()).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn past_the_bound_nothing_is_kept_and_no_retry_is_offered() {
        let replay = Replay::new(chunks(&[b"0123456789", b"0123456789"]), 16);
        let all = read_all(replay.attempt().unwrap()).await.unwrap();
        assert_eq!(all.len(), 20, "the body streams whole regardless of the bound");
        assert_eq!(replay.attempt().err(), Some(NoReplay::BufferExceeded));
    }

    #[tokio::test]
    async fn an_untouched_body_is_always_retriable_and_keeps_its_size() {
        let replay = Replay::new(http_body_util::Full::new(Bytes::from_static(b"hello")), 4);
        let first = replay.attempt().unwrap();
        assert_eq!(first.size_hint().exact(), Some(5));
        drop(first);
        assert!(!replay.read_any());
        assert_eq!(read_all(replay.attempt().unwrap()).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"x"))), Ok(Frame::trailers(trailers))];
        let replay = Replay::new(StreamBody::new(stream::iter(frames)), 16);
        let got = replay.attempt().unwrap().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        let again = replay.attempt().unwrap().collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(again.to_bytes(), Bytes::from_static(b"x"));
    }

    #[tokio::test]
    async fn a_failed_client_body_is_not_retried() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Err("client went away".into())];
        let replay = Replay::new(StreamBody::new(stream::iter(frames)), 16);
        assert!(read_all(replay.attempt().unwrap()).await.is_err());
        assert_eq!(replay.attempt().err(), Some(NoReplay::ClientBodyFailed));
    }
}
