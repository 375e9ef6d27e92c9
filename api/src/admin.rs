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

pub type JsonView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What an admin server exposes.
#[derive(Clone)]
pub struct Admin {
    pub registry: Registry,
    ready: Arc<AtomicBool>,
    views: HashMap<String, JsonView>,
}

impl Admin {
    pub fn new(registry: Registry) -> Self {
        Admin {
            registry,
            ready: Arc::new(AtomicBool::new(false)),
            views: HashMap::new(),
        }
    }

    /// Adds a JSON view at `path` (for example `/status`).
    pub fn view(mut self, path: &str, view: JsonView) -> Self {
        self.views.insert(path.to_string(), view);
        self
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
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
                    let resp = admin.respond(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// Binds the admin address, with an error that names it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind admin address {addr}: {e}")))
}
