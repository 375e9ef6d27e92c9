//! The admin endpoint every daemon serves: `/metrics` (Prometheus text), `/ready`, `/healthz`
//! and JSON views the CLI reads. Plain HTTP/1.1 bound to the admin address only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
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
/// A view that writes its JSON itself, for one too large to build as a `serde_json::Value`
/// first (a tree of maps and strings several times the size of what it describes).
pub type WrittenView = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;
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

    /// The answer for `path` (a JSON view, `/metrics`, `/ready`, `/healthz`, or 404).
    pub fn respond(&self, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        if let Some(view) = self.query_views.get(path) {
            let pairs = parse_query(query.unwrap_or_default());
            let body = serde_json::to_vec_pretty(&view(&pairs)).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
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
            other => match (self.views.get(other), self.written_views.get(other)) {
                (Some(view), _) => {
                    let body = serde_json::to_vec_pretty(&view()).unwrap_or_default();
                    (StatusCode::OK, "application/json", body)
                }
                (None, Some(view)) => (StatusCode::OK, "application/json", view()),
                (None, None) => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
            },
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
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
}
