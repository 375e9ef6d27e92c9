//! What the sidecar reports about each request it carries: Istio's standard metrics (recorded
//! when the response body ends, so durations, sizes, gRPC statuses and message counts are
//! whole), measured by a body wrapper that counts as bytes pass and never buffers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::Response;
use strait_api::snapshot::Snapshot;
use strait_api::telemetry::{GrpcFramer, HttpOutcome, Workload};

/// Envoy-style response flags on answers the proxy made itself, read back by the recorder.
pub(crate) const RESPONSE_FLAGS_HEADER: &str = "x-strait-flags";

/// The flags the proxy sets, as the static strings metrics take.
const FLAGS: [&str; 9] = ["UO", "FI", "RL", "UT", "UH", "UF", "URX", "DC", "NR"];

/// This proxy's own workload, as metrics name it: name, namespace, identity and cluster from its
/// options and certificate, `app`/`version` from its own entry in the catalog (refreshed when
/// the config changes).
pub struct LocalWorkload {
    name: String,
    namespace: String,
    principal: String,
    cluster: String,
    /// This workload's endpoint address in the catalog.
    endpoint: Option<SocketAddr>,
    cached: Mutex<Option<Cached>>,
}

/// The workload and its metadata header value, for one config version.
type Cached = (u64, Arc<Workload>, Arc<str>);

impl LocalWorkload {
    pub fn new(name: &str, namespace: &str, principal: &str, cluster: &str, endpoint: Option<SocketAddr>) -> Self {
        LocalWorkload {
            name: name.into(),
            namespace: namespace.into(),
            principal: principal.into(),
            cluster: cluster.into(),
            endpoint,
            cached: Mutex::new(None),
        }
    }

    /// The workload and its metadata header value, for the config `snap`.
    pub fn current(&self, snap: &Snapshot) -> (Arc<Workload>, Arc<str>) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((version, w, m)) = cached.as_ref() {
            if *version == snap.version {
                return (w.clone(), m.clone());
            }
        }
        let labels = self
            .endpoint
            .and_then(|a| snap.endpoint_by_addr(a))
            .map(|(svc, i)| svc.endpoints[i].labels.clone())
            .unwrap_or_default();
        let w = Arc::new(Workload::from_labels(
            &self.name,
            &self.namespace,
            &self.principal,
            &self.cluster,
            &labels,
        ));
        let m: Arc<str> = w.metadata().into();
        *cached = Some((snap.version, w.clone(), m.clone()));
        (w, m)
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

impl Default for LocalWorkload {
    fn default() -> Self {
        LocalWorkload::new("unknown", "unknown", "unknown", "unknown", None)
    }
}

/// What a body carried when it ended (or was dropped).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ended {
    pub bytes: u64,
    pub messages: u64,
    /// `grpc-status` from the trailers, if the body had any.
    pub grpc_status: Option<u32>,
    /// The body reached its end (not dropped or failed midway).
    pub complete: bool,
}

/// Bytes and gRPC messages a request body carried, read by the response's recorder.
#[derive(Debug, Default)]
pub struct Tally {
    bytes: AtomicU64,
    messages: AtomicU64,
}

impl Tally {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

type OnEnd = Box<dyn FnOnce(Ended) + Send + Sync>;

/// A body that counts what passes through it and calls `on_end` once, when it ends or is
/// dropped.
pub struct Counted<B> {
    inner: B,
    framer: Option<GrpcFramer>,
    tally: Option<Arc<Tally>>,
    seen: Ended,
    on_end: Option<OnEnd>,
    /// The body was empty from the start (hyper never polls those).
    empty: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Counted<B> {
    /// Counts into `tally` (a request body, read by the recorder of its response).
    pub fn into_tally(inner: B, grpc: bool, tally: Arc<Tally>) -> Self {
        Counted {
            empty: inner.is_end_stream(),
            inner,
            framer: grpc.then(GrpcFramer::default),
            tally: Some(tally),
            seen: Ended::default(),
            on_end: None,
        }
    }

    /// Calls `on_end` with the totals (a response body).
    pub fn on_end(inner: B, grpc: bool, on_end: impl FnOnce(Ended) + Send + Sync + 'static) -> Self {
        Counted {
            empty: inner.is_end_stream(),
            inner,
            framer: grpc.then(GrpcFramer::default),
            tally: None,
            seen: Ended::default(),
            on_end: Some(Box::new(on_end)),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.on_end.take() {
            self.seen.complete = complete;
            self.seen.messages = self.framer.as_ref().map_or(0, |f| f.messages);
            f(self.seen);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen.bytes += data.len() as u64;
                    if let Some(f) = this.framer.as_mut() {
                        f.feed(data);
                    }
                    if let Some(t) = &this.tally {
                        t.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        t.messages
                            .store(this.framer.as_ref().map_or(0, |f| f.messages), Ordering::Relaxed);
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    this.seen.grpc_status = grpc_status_of(trailers);
                }
                // hyper stops polling a body that says it ended.
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            // An empty body is never polled; one dropped midway was cut short.
            self.seen.complete = self.empty;
            self.seen.messages = self.framer.as_ref().map_or(0, |f| f.messages);
            f(self.seen);
        }
    }
}

/// `grpc-status` of a header or trailer block.
pub fn grpc_status_of(headers: &hyper::HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// Whether a request is gRPC (by its content type).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Records the request when its response body ends: status, gRPC status (trailers, or the
/// head of a trailers-only answer), flags (the proxy's own, or `DC` when the body was cut
/// short), duration and sizes.
pub(crate) fn report(
    resp: Response<crate::outbound::Body>,
    started: Instant,
    grpc: bool,
    tally: Arc<Tally>,
    record: impl FnOnce(&HttpOutcome) + Send + Sync + 'static,
) -> Response<crate::outbound::Body> {
    let code = resp.status().as_u16();
    let head_grpc = grpc_status_of(resp.headers());
    let flags = resp
        .headers()
        .get(RESPONSE_FLAGS_HEADER)
        .and_then(|v| FLAGS.iter().find(|f| v == **f))
        .copied()
        .unwrap_or("-");
    let (parts, body) = resp.into_parts();
    let body = Counted::on_end(body, grpc, move |e| {
        record(&HttpOutcome {
            response_code: code,
            // A gRPC answer that ended without a status is UNKNOWN to its client.
            grpc_status: grpc.then(|| e.grpc_status.or(head_grpc).unwrap_or(2)),
            flags: match (flags, e.complete) {
                ("-", false) => "DC",
                (f, _) => f,
            },
            duration: started.elapsed(),
            request_bytes: tally.bytes(),
            response_bytes: e.bytes,
            request_messages: tally.messages(),
            response_messages: e.messages,
        })
    });
    Response::from_parts(parts, body.boxed())
}
