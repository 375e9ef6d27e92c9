//! The admin endpoint every daemon serves: `/metrics` (Prometheus text), `/ready`, `/healthz`
//! and JSON views the CLI reads. Plain HTTP/1.1 bound to the admin address only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Registry, TextEncoder};

/// A metrics registry for a daemon, with the allocator's own figures in it: every process
/// exports `strait_memory_allocated_bytes` and `strait_memory_resident_bytes`.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    let _ = registry.register(Box::new(AllocatorMetrics::new()));
    registry
}

/// The allocator's figures, read at each scrape (as Envoy's `server.memory_allocated` and
/// `server.memory_heap_size`): bytes allocated and not yet freed, and the memory the allocator
/// holds resident for them (its pages, metadata, and freed pages not yet given back). Beside a
/// process's RSS they tell its heap from the executable's text, which RSS counts although
/// every process running the binary shares it. jemalloc's (the `strait` binary's allocator);
/// in a process with another allocator they are jemalloc's own small figures.
struct AllocatorMetrics {
    allocated: prometheus::IntGauge,
    resident: prometheus::IntGauge,
}

impl AllocatorMetrics {
    fn new() -> Self {
        let gauge = |name: &str, help: &str| prometheus::IntGauge::new(name, help).expect("valid metric");
        AllocatorMetrics {
            allocated: gauge(
                "strait_memory_allocated_bytes",
                "Heap bytes this process has allocated and not yet freed (the allocator's count)",
            ),
            resident: gauge(
                "strait_memory_resident_bytes",
                "Memory the allocator holds resident: live allocations, its metadata and freed pages not yet returned",
            ),
        }
    }
}

impl prometheus::core::Collector for AllocatorMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.allocated.desc().into_iter().chain(self.resident.desc()).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The statistics are a snapshot taken when the epoch advances.
        if epoch::advance().is_ok() {
            if let Ok(v) = stats::allocated::read() {
                self.allocated.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            if let Ok(v) = stats::resident::read() {
                self.resident.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        let mut families = self.allocated.collect();
        families.extend(self.resident.collect());
        families
    }
}

/// The query of a sidecar's `/explain` for a request (`headers` as `name: value`).
pub fn explain_query(method: &str, url: &str, headers: &[String]) -> String {
    let mut query = format!("method={}&url={}", percent_encode(method), percent_encode(url));
    for h in headers {
        query.push_str(&format!("&header={}", percent_encode(h)));
    }
    query
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub type JsonView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// A view that writes its JSON itself, a piece at a time, for one too large to hold whole (a
/// sidecar's `/config` is 6.8 MB at 40,000 endpoints; built as a `serde_json::Value` first, a
/// tree several times that). For each request it makes the answer's [`Pieces`].
pub type WrittenView = Arc<dyn Fn() -> Pieces + Send + Sync>;

/// An answer written a piece at a time: each call appends the next piece to the buffer and
/// returns whether more follow. The admin body calls it while the client takes the answer,
/// until a chunk of [`CHUNK_BYTES`] is ready, so no more than a chunk (and a piece) is held at
/// once and no thread or task is spent on it.
pub type Pieces = Box<dyn FnMut(&mut Vec<u8>) -> bool + Send>;

/// How much of a [`WrittenView`]'s answer is sent at a time.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// An admin answer: held whole, or a [`WrittenView`]'s pieces written as the client reads.
pub type AdminBody = Either<Full<Bytes>, Written>;

/// The body of a [`WrittenView`]'s answer.
pub struct Written {
    /// `None` once the last piece is written.
    pieces: Option<Pieces>,
}

impl hyper::body::Body for Written {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(pieces) = self.pieces.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        let mut more = true;
        while more && chunk.len() < CHUNK_BYTES {
            more = pieces(&mut chunk);
        }
        if !more {
            self.pieces = None;
        }
        std::task::Poll::Ready((!chunk.is_empty()).then(|| Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_none()
    }
}

/// A view that reads the request's query string (decoded `key=value` pairs, in order).
pub type QueryView = Arc<dyn Fn(&[(String, String)]) -> serde_json::Value + Send + Sync>;

/// What an admin server exposes.
#[derive(Clone)]
pub struct Admin {
    pub registry: Registry,
    ready: Arc<AtomicBool>,
    views: HashMap<String, JsonView>,
    written_views: HashMap<String, WrittenView>,
    query_views: HashMap<String, QueryView>,
}

impl Admin {
    pub fn new(registry: Registry) -> Self {
        Admin {
            registry,
            ready: Arc::new(AtomicBool::new(false)),
            views: HashMap::new(),
            written_views: HashMap::new(),
            query_views: HashMap::new(),
        }
    }

    /// Adds a JSON view at `path` (for example `/status`).
    pub fn view(mut self, path: &str, view: JsonView) -> Self {
        self.views.insert(path.to_string(), view);
        self
    }

    /// Adds a JSON view at `path` that writes its own bytes.
    pub fn written_view(mut self, path: &str, view: WrittenView) -> Self {
        self.written_views.insert(path.to_string(), view);
        self
    }

    /// Adds a JSON view at `path` that reads the query string.
    pub fn query_view(mut self, path: &str, view: QueryView) -> Self {
        self.query_views.insert(path.to_string(), view);
        self
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The answer for `path` (a JSON view, `/metrics`, `/ready`, `/healthz`, or 404). A written
    /// view's answer is written as it is read (see [`WrittenView`]).
    pub fn respond(&self, path: &str, query: Option<&str>) -> Response<AdminBody> {
        let json = || http::HeaderValue::from_static("application/json");
        if let Some(view) = self.written_views.get(path) {
            let mut resp = Response::new(Either::Right(Written { pieces: Some(view()) }));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, json());
            return resp;
        }
        if let Some(view) = self.query_views.get(path) {
            let pairs = parse_query(query.unwrap_or_default());
            let body = serde_json::to_vec_pretty(&view(&pairs)).unwrap_or_default();
            let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, json());
            return resp;
        }
        let (status, ctype, body) = match path {
            "/metrics" => {
                let mut buf = Vec::new();
                let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
                (StatusCode::OK, "text/plain; version=0.0.4", buf)
            }
            "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/ready" => {
                if self.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "text/plain", b"not ready\n".to_vec())
                }
            }
            other => match self.views.get(other) {
                Some(view) => {
                    let body = serde_json::to_vec_pretty(&view()).unwrap_or_default();
                    (StatusCode::OK, "application/json", body)
                }
                None => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
            },
        };
        let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
        *resp.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        resp
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        let admin = Arc::new(self);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = admin.respond(req.uri().path(), req.uri().query());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// Decodes `a=1&b=x%3Ay` (percent-encoding, `+` for space) into pairs.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Binds the admin address, with an error that names it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind admin address {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_strings_decode() {
        assert_eq!(
            super::parse_query("url=http%3A%2F%2Fa%2Fb%3Fc%3D1&header=x-canary%3A+1&flag&bad=%zz"),
            vec![
                ("url".to_string(), "http://a/b?c=1".to_string()),
                ("header".to_string(), "x-canary: 1".to_string()),
                ("flag".to_string(), String::new()),
                ("bad".to_string(), "%zz".to_string()),
            ]
        );
    }

    /// A written view's answer comes in chunks of about `CHUNK_BYTES` that add up to what it
    /// wrote, each written when the client asks for it.
    #[tokio::test]
    async fn a_written_view_is_sent_in_chunks_as_it_is_read() {
        use http_body_util::BodyExt;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use super::{Admin, CHUNK_BYTES};
        // 200 lines of 1 KiB, a line a piece: about three chunks.
        let line = format!("{}\n", "x".repeat(1023));
        let written = std::sync::Arc::new(AtomicUsize::new(0));
        let (text, count) = (line.clone(), written.clone());
        let admin = Admin::new(prometheus::Registry::new()).written_view(
            "/big",
            std::sync::Arc::new(move || {
                let (text, count) = (text.clone(), count.clone());
                let mut left = 200;
                Box::new(move |out: &mut Vec<u8>| {
                    out.extend_from_slice(text.as_bytes());
                    count.fetch_add(1, Ordering::SeqCst);
                    left -= 1;
                    left > 0
                })
            }),
        );
        let resp = admin.respond("/big", None);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let mut body = resp.into_body();
        assert_eq!(written.load(Ordering::SeqCst), 0, "nothing written before it is read");
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), CHUNK_BYTES);
        assert_eq!(written.load(Ordering::SeqCst), 64, "one chunk written for one read");
        let mut chunks = vec![first];
        while let Some(frame) = body.frame().await {
            chunks.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(chunks.len(), (200usize * 1024).div_ceil(CHUNK_BYTES));
        assert_eq!(chunks.concat(), line.repeat(200).into_bytes());
        assert!(hyper::body::Body::is_end_stream(&body));
    }
}
