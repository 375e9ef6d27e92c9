//! What the sidecar reports about each request it carries: Istio's standard metrics (recorded
//! when the response body ends, so durations, sizes, gRPC statuses and message counts are
//! whole), measured by a body wrapper that counts as bytes pass and never buffers.

use std::collections::BTreeMap;
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
use strait_api::accesslog::Entry;
use strait_api::snapshot::Snapshot;
use strait_api::telemetry::{Edge, GrpcFramer, HttpOutcome, IstioMetrics, Workload};
use strait_api::trace::Span;

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
    /// `<cluster>/<workload>` ([`strait_api::snapshot::share_key`]), made once.
    share_key: String,
    cached: Mutex<Option<Cached>>,
}

/// The workload, its metadata header value and its labels, for one config version.
type Cached = (u64, Arc<Workload>, Arc<str>, Arc<BTreeMap<String, String>>);

impl LocalWorkload {
    pub fn new(name: &str, namespace: &str, principal: &str, cluster: &str, endpoint: Option<SocketAddr>) -> Self {
        LocalWorkload {
            name: name.into(),
            namespace: namespace.into(),
            principal: principal.into(),
            cluster: cluster.into(),
            endpoint,
            share_key: strait_api::snapshot::share_key(cluster, name),
            cached: Mutex::new(None),
        }
    }

    /// This workload's key in the controller's rate-limit shares.
    pub fn share_key(&self) -> &str {
        &self.share_key
    }

    /// The workload and its metadata header value, for the config `snap`.
    pub fn current(&self, snap: &Snapshot) -> (Arc<Workload>, Arc<str>) {
        let (w, m, _) = self.refresh(snap);
        (w, m)
    }

    /// This workload's labels in the catalog (AuthorizationPolicy selectors match them).
    pub fn labels(&self, snap: &Snapshot) -> Arc<BTreeMap<String, String>> {
        self.refresh(snap).2
    }

    fn refresh(&self, snap: &Snapshot) -> (Arc<Workload>, Arc<str>, Arc<BTreeMap<String, String>>) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((version, w, m, l)) = cached.as_ref() {
            if *version == snap.version {
                return (w.clone(), m.clone(), l.clone());
            }
        }
        // Its endpoint: by the address it listens on where that is the catalog's (loopback),
        // else by name in its cluster (a pod's endpoint is its IP and the app's port).
        let labels = self
            .endpoint
            .and_then(|a| snap.endpoint_by_addr(a))
            .map(|(svc, i)| svc.endpoints[i].labels().clone())
            .or_else(|| {
                snap.services
                    .values()
                    .flat_map(|s| s.endpoints.iter().enumerate().map(move |(i, e)| (s.workload(i), e)))
                    .find(|(w, e)| *w == self.name && e.locality().cluster == self.cluster)
                    .map(|(_, e)| e.labels().clone())
            })
            .unwrap_or_default();
        let w = Arc::new(Workload::from_labels(
            &self.name,
            &self.namespace,
            &self.principal,
            &self.cluster,
            &labels,
        ));
        let m: Arc<str> = w.metadata().into();
        *cached = Some((snap.version, w.clone(), m.clone(), labels.clone()));
        (w, m, labels)
    }
}

impl Default for LocalWorkload {
    fn default() -> Self {
        LocalWorkload::new("unknown", "unknown", "unknown", "unknown", None)
    }
}

/// Everything a proxy reports about the traffic it carries, shared by its listeners.
pub struct Telemetry {
    pub local: LocalWorkload,
    pub tracer: strait_api::trace::Tracer,
    pub access: strait_api::accesslog::AccessLog,
}

impl Telemetry {
    /// Spans and logs as `opts` asks (the export and log tasks are spawned here), named after
    /// `local`; their own metrics on `registry`.
    pub fn new(
        local: LocalWorkload,
        opts: &strait_api::telemetry::TelemetryOptions,
        service_name: &str,
        registry: &prometheus::Registry,
    ) -> Result<Self, String> {
        let tracer = match &opts.otlp_endpoint {
            Some(endpoint) => strait_api::trace::Tracer::otlp(endpoint, service_name, opts.trace_sampling, registry)?,
            None => {
                let mut t = strait_api::trace::Tracer::disabled(registry);
                t.percent = opts.trace_sampling;
                t
            }
        };
        Ok(Telemetry {
            local,
            tracer,
            access: strait_api::accesslog::AccessLog::new(opts.access_log, registry),
        })
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let registry = prometheus::Registry::new();
        Telemetry {
            local: LocalWorkload::default(),
            tracer: strait_api::trace::Tracer::disabled(&registry),
            access: strait_api::accesslog::AccessLog::new(None, &registry),
        }
    }
}

/// One HTTP hop's span and access log entry while its request runs.
pub(crate) struct Hop {
    span: Option<Span>,
    entry: Option<Entry>,
    telemetry: Arc<Telemetry>,
}

/// Where a hop's request went, for its span and log entry.
pub(crate) struct Upstream {
    /// `outbound|<port>||<fqdn>` or `inbound|<port>||`.
    pub cluster: String,
    pub host: Option<SocketAddr>,
    /// Until the response head (Envoy's x-envoy-upstream-service-time).
    pub time: Option<std::time::Duration>,
    /// The other side's identity.
    pub peer: String,
    /// The HTTPRoute (and rule) that routed the request, if one did.
    pub route: Option<String>,
}

impl Telemetry {
    /// Starts a hop: joins the request's trace (W3C or B3) or starts one (`percent`, else the
    /// mesh's), gives it an `x-request-id` if it has none, and rewrites its trace headers so
    /// the next hop is this span's child.
    pub(crate) fn start_hop<B>(
        self: &Arc<Self>,
        req: &mut hyper::Request<B>,
        percent: Option<f64>,
        kind: strait_api::trace::SpanKind,
        name: impl FnOnce() -> String,
    ) -> Hop {
        use strait_api::trace;
        let incoming = trace::extract(req.headers());
        let request_id = trace::ensure_request_id(req.headers_mut());
        let (ctx, span) = self.tracer.start(&incoming, percent, kind, name);
        ctx.inject(req.headers_mut(), incoming.parent.map(|p| p.span_id), incoming.b3);
        let entry = self
            .access
            .enabled()
            .then(|| request_entry(req, request_id.clone(), ctx.trace_id_hex()));
        let span = span.map(|mut s| {
            s.attr("http.method", req.method().to_string());
            s.attr("http.url", req.uri().to_string());
            s.attr("guid:x-request-id", request_id);
            s
        });
        Hop {
            span,
            entry,
            telemetry: self.clone(),
        }
    }
}

impl Hop {
    /// Ends the hop's span and logs its entry (both off the request path: queued for their
    /// tasks). `upstream` is asked for only when there is a span or an entry to fill.
    pub(crate) fn finish(
        self,
        o: &HttpOutcome,
        source: &Workload,
        destination: &Workload,
        upstream: impl FnOnce() -> Upstream,
    ) {
        if self.span.is_none() && self.entry.is_none() {
            return;
        }
        let upstream = upstream();
        if let Some(mut span) = self.span {
            span_outcome(&mut span, o, source, destination, &upstream.cluster);
            if let Some(r) = &upstream.route {
                span.attr("route_name", r.clone());
            }
            self.telemetry.tracer.finish(span, span_error(o));
        }
        if let Some(mut e) = self.entry {
            entry_outcome(&mut e, o, source, destination);
            e.upstream_service_time = upstream.time;
            e.upstream_host = upstream.host.map(|a| a.to_string()).unwrap_or_default();
            e.upstream_cluster = upstream.cluster;
            e.peer_principal = upstream.peer;
            e.route_name = upstream.route.unwrap_or_default();
            self.telemetry.access.log(e);
        }
    }
}

impl Telemetry {
    /// Splices one TCP connection and reports it, from either side: Istio's TCP family (opened
    /// now, closed with its bytes), and an access log line (Envoy logs TCP with `-` for the
    /// HTTP fields and code 0). `received_before`: the client's bytes already sent on
    /// (behind the handshake, `Outbound::settle`). Returns `ok` or `reset`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn splice_reported(
        &self,
        istio: &IstioMetrics,
        edge: &Edge<'_>,
        client: impl crate::Io,
        upstream_io: impl crate::Io,
        idle: std::time::Duration,
        upstream: Upstream,
        received_before: u64,
    ) -> &'static str {
        istio.tcp_opened(edge, "-");
        let (started, start_time) = (Instant::now(), std::time::SystemTime::now());
        let (result, flags, (received, sent)) = match crate::splice::splice(client, upstream_io, idle).await {
            Ok((received, sent)) => ("ok", "-", (received_before + received, sent)),
            Err(_) => ("reset", "UC", (received_before, 0)),
        };
        istio.tcp_closed(edge, flags, received, sent);
        self.access.log_with(|| Entry {
            start_time: Some(start_time),
            response_flags: flags.to_string(),
            bytes_received: received,
            bytes_sent: sent,
            duration: started.elapsed(),
            upstream_host: upstream.host.map(|a| a.to_string()).unwrap_or_default(),
            upstream_cluster: upstream.cluster,
            source_cluster: edge.source.cluster.clone(),
            destination_cluster: edge.destination.cluster.clone(),
            peer_principal: upstream.peer,
            ..Default::default()
        });
        result
    }
}

/// The request's side of an access log entry, taken before the request is sent on.
fn request_entry<B>(req: &hyper::Request<B>, request_id: String, trace_id: String) -> Entry {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    Entry {
        start_time: Some(std::time::SystemTime::now()),
        method: req.method().to_string(),
        path: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        protocol: match req.version() {
            hyper::Version::HTTP_10 => "HTTP/1.0",
            hyper::Version::HTTP_2 => "HTTP/2",
            hyper::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }
        .into(),
        x_forwarded_for: header("x-forwarded-for"),
        user_agent: header("user-agent"),
        request_id,
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| header("host")),
        trace_id,
        ..Default::default()
    }
}

/// The answer's side of an access log entry.
fn entry_outcome(e: &mut Entry, o: &HttpOutcome, source: &Workload, destination: &Workload) {
    e.response_code = o.response_code;
    e.response_flags = o.flags.to_string();
    e.response_code_details = match o.flags {
        "-" => "via_upstream".into(),
        _ => "strait".into(),
    };
    e.bytes_received = o.request_bytes;
    e.bytes_sent = o.response_bytes;
    e.duration = o.duration;
    e.source_cluster = source.cluster.clone();
    e.destination_cluster = destination.cluster.clone();
}

/// A span's attributes from how its request ended (Envoy's and Istio's tag names where they
/// have one, `strait.*` for the clusters).
fn span_outcome(span: &mut Span, o: &HttpOutcome, source: &Workload, destination: &Workload, upstream_cluster: &str) {
    span.attr("http.status_code", o.response_code.to_string());
    if let Some(g) = o.grpc_status {
        span.attr("grpc.status_code", g.to_string());
    }
    span.attr("response_flags", o.flags);
    span.attr("upstream_cluster", upstream_cluster.to_string());
    span.attr("istio.canonical_service", source.canonical_service.clone());
    span.attr("istio.namespace", source.namespace.clone());
    span.attr("strait.source_cluster", source.cluster.clone());
    span.attr("strait.source_workload", source.workload.clone());
    span.attr("strait.source_principal", source.principal.clone());
    span.attr("strait.destination_cluster", destination.cluster.clone());
    span.attr("strait.destination_workload", destination.workload.clone());
    span.attr("strait.destination_principal", destination.principal.clone());
    span.attr("component", "proxy");
}

/// An error status for 5xx answers, gRPC failures and proxy-made failures.
fn span_error(o: &HttpOutcome) -> Option<String> {
    let grpc_failed = o.grpc_status.is_some_and(|g| g != 0);
    (o.response_code >= 500 || grpc_failed || !matches!(o.flags, "-"))
        .then(|| format!("{} {}", o.response_code, o.flags))
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
