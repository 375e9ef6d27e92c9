//! Distributed tracing: W3C trace context and B3 (single and multi header) propagation,
//! `x-request-id`, parent-based ratio sampling, and spans exported over OTLP/HTTP in batches by
//! a background task behind a bounded queue (a full queue drops spans and counts them; the
//! request path never waits on export).
//!
//! Propagation is parsed strictly here, allocation-free on the hot path: a malformed header is
//! ignored (as if absent), never an error and never a panic.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use hyper::header::{HeaderMap, HeaderValue};
pub use opentelemetry::trace::SpanKind;
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;

pub const TRACEPARENT: &str = "traceparent";
pub const REQUEST_ID: &str = "x-request-id";
const B3: &str = "b3";
const B3_TRACE: &str = "x-b3-traceid";
const B3_SPAN: &str = "x-b3-spanid";
const B3_PARENT: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

/// Spans a proxy may hold for export before it drops new ones.
pub const QUEUE: usize = 2048;
/// Spans per OTLP request.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const FLUSH: Duration = Duration::from_millis(500);

/// A position in a trace: the trace, the span that is the parent of what comes next, and the
/// sampling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// What a request carried: a parent to join, or only a decision (`b3: 0`), or nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    pub parent: Option<TraceContext>,
    /// The caller's decision; `None` leaves it to this proxy.
    pub sampled: Option<bool>,
    /// The caller used B3 (its headers are rewritten too, so B3-only apps keep their trace).
    pub b3: bool,
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lower-case hex of exactly `N` bytes; not all zero.
fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = hex_val(pair[0])? << 4 | hex_val(pair[1])?;
    }
    (out != [0u8; N]).then_some(out)
}

/// A B3 trace id: 32 hex, or 16 hex left-padded to 128 bits.
fn parse_b3_trace(s: &[u8]) -> Option<[u8; 16]> {
    match s.len() {
        32 => parse_hex::<16>(s),
        16 => {
            let low = parse_hex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// `00-<trace-id>-<parent-id>-<flags>` (W3C Trace Context, version 00; a higher version is
/// parsed by its first four fields, as the spec asks).
pub fn parse_traceparent(v: &[u8]) -> Option<TraceContext> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = parse_hex_byte(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    Some(TraceContext {
        trace_id: parse_hex::<16>(&v[3..35])?,
        span_id: parse_hex::<8>(&v[36..52])?,
        sampled: parse_hex_byte(&v[53..55])? & 1 == 1,
    })
}

fn parse_hex_byte(s: &[u8]) -> Option<u8> {
    Some(hex_val(s[0])? << 4 | hex_val(s[1])?)
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]`, or `b3: {sampled}` alone.
pub fn parse_b3(v: &[u8]) -> Incoming {
    let sampling = |s: &[u8]| match s {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    };
    let mut parts = v.split(|c| *c == b'-');
    let first = parts.next().unwrap_or_default();
    let Some(span) = parts.next() else {
        return Incoming {
            parent: None,
            sampled: sampling(first),
            b3: true,
        };
    };
    let sampled = parts.next().and_then(sampling);
    let (Some(trace_id), Some(span_id)) = (parse_b3_trace(first), parse_hex::<8>(span)) else {
        return Incoming::default();
    };
    Incoming {
        parent: Some(TraceContext {
            trace_id,
            span_id,
            sampled: sampled.unwrap_or(false),
        }),
        sampled,
        b3: true,
    }
}

/// The trace a request joins: `traceparent` first, then `b3`, then the `X-B3-*` headers.
pub fn extract(headers: &HeaderMap) -> Incoming {
    if let Some(mut incoming) = headers
        .get(TRACEPARENT)
        .and_then(|v| Incoming::from_traceparent(v.as_bytes()))
    {
        incoming.b3 = headers.contains_key(B3) || headers.contains_key(B3_TRACE);
        return incoming;
    }
    if let Some(v) = headers.get(B3) {
        let b3 = parse_b3(v.as_bytes());
        if b3 != Incoming::default() {
            return b3;
        }
    }
    let debug = headers.get(B3_FLAGS).is_some_and(|v| v == "1");
    let sampled = match headers.get(B3_SAMPLED).map(|v| v.as_bytes()) {
        _ if debug => Some(true),
        Some(b"1") | Some(b"true") => Some(true),
        Some(b"0") | Some(b"false") => Some(false),
        _ => None,
    };
    let trace = headers.get(B3_TRACE).and_then(|v| parse_b3_trace(v.as_bytes()));
    let span = headers.get(B3_SPAN).and_then(|v| parse_hex::<8>(v.as_bytes()));
    match (trace, span) {
        (Some(trace_id), Some(span_id)) => Incoming {
            parent: Some(TraceContext {
                trace_id,
                span_id,
                sampled: sampled.unwrap_or(false),
            }),
            sampled,
            b3: true,
        },
        _ => Incoming {
            parent: None,
            sampled,
            b3: sampled.is_some(),
        },
    }
}

impl Incoming {
    /// A W3C `traceparent` value as the position to join, with its decision.
    pub fn from_traceparent(v: &[u8]) -> Option<Incoming> {
        let ctx = parse_traceparent(v)?;
        Some(Incoming {
            parent: Some(ctx),
            sampled: Some(ctx.sampled),
            b3: false,
        })
    }
}

/// Appends `bytes` as lowercase hex (two digits a byte) to `out`, with no formatting machinery:
/// every request's id and trace headers are written this way.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

impl TraceContext {
    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Writes this position into a request's headers: `traceparent` always (its `tracestate`
    /// passes unchanged), the B3 headers too when the caller used B3; `parent` is the span
    /// before this one (B3's parent id).
    pub fn inject(&self, headers: &mut HeaderMap, parent: Option<[u8; 8]>, b3: bool) {
        if let Ok(v) = HeaderValue::from_str(&self.traceparent()) {
            headers.insert(TRACEPARENT, v);
        }
        if !b3 {
            return;
        }
        let flag = if self.sampled { "1" } else { "0" };
        let single = match parent {
            Some(p) => format!("{}-{}-{flag}-{}", hex(&self.trace_id), hex(&self.span_id), hex(&p)),
            None => format!("{}-{}-{flag}", hex(&self.trace_id), hex(&self.span_id)),
        };
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(k, v);
            }
        };
        set(B3, single);
        set(B3_TRACE, hex(&self.trace_id));
        set(B3_SPAN, hex(&self.span_id));
        set(B3_SAMPLED, flag.into());
        match parent {
            Some(p) => set(B3_PARENT, hex(&p)),
            None => {
                headers.remove(B3_PARENT);
            }
        }
        headers.remove(B3_FLAGS);
    }
}

/// A random span id (never zero).
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// Gives a request an `x-request-id` (a random UUID, version 4) when it has none; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(v) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !v.is_empty() {
            return v.to_string();
        }
    }
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // A version 4 UUID: 8-4-4-4-12 hex digits.
    let mut id = String::with_capacity(36);
    for (i, group) in [&b[0..4], &b[4..6], &b[6..8], &b[8..10], &b[10..16]]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            id.push('-');
        }
        push_hex(&mut id, group);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    id
}

/// One hop's span while its request runs.
#[derive(Clone, Debug)]
pub struct Span {
    pub ctx: TraceContext,
    pub parent: Option<[u8; 8]>,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub attributes: Vec<KeyValue>,
}

impl Span {
    pub fn attr(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.attributes.push(KeyValue::new(key, value));
    }
}

/// Starts spans, decides sampling, and hands finished spans to the export task.
#[derive(Clone, Debug)]
pub struct Tracer {
    queue: Option<mpsc::Sender<SpanData>>,
    /// The mesh-wide percentage of new traces sampled (0.0–100.0).
    pub percent: f64,
    dropped: IntCounter,
    spans: IntCounterVec,
}

impl Tracer {
    /// A tracer that propagates and decides but exports nothing (no OTLP endpoint set).
    pub fn disabled(registry: &Registry) -> Self {
        Self::with_queue(None, 0.0, registry)
    }

    fn with_queue(queue: Option<mpsc::Sender<SpanData>>, percent: f64, registry: &Registry) -> Self {
        let dropped = IntCounter::new(
            "strait_tracing_spans_dropped_total",
            "Finished spans dropped because the export queue was full",
        )
        .expect("valid metric");
        let spans = IntCounterVec::new(
            Opts::new(
                "strait_tracing_spans_total",
                "Spans handed to the OTLP exporter, by result of their batch (exported, failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(dropped.clone()));
        let _ = registry.register(Box::new(spans.clone()));
        Tracer {
            queue,
            percent,
            dropped,
            spans,
        }
    }

    /// Exports to `endpoint` (OTLP/HTTP protobuf, e.g. `http://127.0.0.1:4318/v1/traces`) as
    /// `service_name`, sampling `percent` % of new traces. Spawns the export task.
    pub fn otlp(endpoint: &str, service_name: &str, percent: f64, registry: &Registry) -> Result<Self, String> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
        if !(0.0..=100.0).contains(&percent) {
            return Err(format!(
                "the trace sampling percentage must be within 0–100, not {percent}"
            ));
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .with_headers(Default::default())
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        exporter.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service_name.to_string())
                .build(),
        );
        let (tx, mut rx) = mpsc::channel::<SpanData>(QUEUE);
        let tracer = Self::with_queue(Some(tx), percent, registry);
        let spans = tracer.spans.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                // Wait for a first span, then up to FLUSH for more.
                match rx.recv().await {
                    Some(s) => batch.push(s),
                    None => return,
                }
                let deadline = tokio::time::Instant::now() + FLUSH;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(s)) => batch.push(s),
                        _ => break,
                    }
                }
                let n = batch.len() as u64;
                let result = exporter.export(std::mem::take(&mut batch)).await;
                match result {
                    Ok(()) => spans.with_label_values(&["exported"]).inc_by(n),
                    Err(e) => {
                        spans.with_label_values(&["failed"]).inc_by(n);
                        tracing::debug!(error = %e, spans = n, "OTLP export failed");
                    }
                }
            }
        });
        Ok(tracer)
    }

    /// Parent-based ratio sampling: the caller's decision if it made one, else `percent` (the
    /// service's, else the mesh's) of new traces.
    pub fn decide(&self, incoming: &Incoming, percent: Option<f64>) -> bool {
        match incoming.sampled {
            Some(d) => d,
            None => {
                let p = percent.unwrap_or(self.percent);
                p > 0.0 && rand::random::<f64>() * 100.0 < p
            }
        }
    }

    /// A new span joining `incoming` (or starting a trace), with this proxy's decision. The
    /// span is `None` when not sampled; the context is what to propagate either way.
    pub fn start(
        &self,
        incoming: &Incoming,
        percent: Option<f64>,
        kind: SpanKind,
        name: impl FnOnce() -> String,
    ) -> (TraceContext, Option<Span>) {
        let sampled = self.decide(incoming, percent);
        let ctx = TraceContext {
            trace_id: incoming.parent.map_or_else(new_trace_id, |p| p.trace_id),
            span_id: new_span_id(),
            sampled,
        };
        let span = sampled.then(|| Span {
            ctx,
            parent: incoming.parent.map(|p| p.span_id),
            kind,
            name: name(),
            start: SystemTime::now(),
            attributes: Vec::new(),
        });
        (ctx, span)
    }

    /// Hands a finished span to the export task; never waits (a full queue drops and counts).
    pub fn finish(&self, span: Span, error: Option<String>) {
        let Some(queue) = &self.queue else { return };
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(span.ctx.trace_id),
                SpanId::from_bytes(span.ctx.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: span.kind,
            name: Cow::Owned(span.name),
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match error {
                Some(description) => Status::Error {
                    description: description.into(),
                },
                None => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope::builder("strait")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        };
        if queue.try_send(data).is_err() {
            self.dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_malformed_ones_are_ignored() {
        let ctx = parse_traceparent(TP.as_bytes()).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), TP);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "\u{0}\u{0}-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version: its first four fields, and what follows after a dash.
        assert!(parse_traceparent(format!("01{}-more", &TP[2..]).as_bytes()).is_some());
    }

    #[test]
    fn b3_single_multi_and_deny_are_understood() {
        let one = parse_b3(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90");
        let p = one.parent.unwrap();
        assert!(p.sampled && one.b3);
        assert_eq!(hex(&p.span_id), "e457b5a2e4d86bd1");
        let short = parse_b3(b"a3ce929d0e0e4736-00f067aa0ba902b7");
        assert_eq!(hex(&short.parent.unwrap().trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(short.sampled, None);
        let deny = parse_b3(b"0");
        assert_eq!((deny.parent, deny.sampled), (None, Some(false)));
        assert_eq!(parse_b3(b"zz-yy-1"), Incoming::default());

        let mut h = HeaderMap::new();
        h.insert(B3_TRACE, HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124"));
        h.insert(B3_SPAN, HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert(B3_FLAGS, HeaderValue::from_static("1"));
        let multi = extract(&h);
        assert_eq!(multi.sampled, Some(true));
        assert_eq!(hex(&multi.parent.unwrap().trace_id), "463ac35c9f6413ad48485a3953bb6124");
        // traceparent wins over B3 when both are there.
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        assert_eq!(
            hex(&extract(&h).parent.unwrap().trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn injection_writes_the_new_span_and_keeps_b3_callers_in_b3() {
        let ctx = TraceContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled: true,
        };
        let mut h = HeaderMap::new();
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        ctx.inject(&mut h, Some([3; 8]), true);
        assert_eq!(
            h[TRACEPARENT],
            "00-01010101010101010101010101010101-0202020202020202-01"
        );
        assert_eq!(h["tracestate"], "vendor=x");
        assert_eq!(
            h[B3],
            "01010101010101010101010101010101-0202020202020202-1-0303030303030303"
        );
        assert_eq!(h[B3_PARENT], "0303030303030303");
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(
            id.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => matches!(c, '0'..='9' | 'a'..='f'),
            }),
            "{id} is not a UUID's 8-4-4-4-12 lowercase hex"
        );
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "the variant bits of {id}");
        assert_eq!(hex(&[0x00, 0x09, 0x9a, 0xbc, 0xf0, 0xff]), "00099abcf0ff");
        assert_eq!(ensure_request_id(&mut h), id, "an existing id is kept");
    }

    #[test]
    fn sampling_honours_the_caller_and_the_ratio() {
        let t = Tracer::disabled(&Registry::new());
        let yes = Incoming {
            sampled: Some(true),
            ..Default::default()
        };
        assert!(t.decide(&yes, Some(0.0)));
        let no = Incoming {
            sampled: Some(false),
            ..Default::default()
        };
        assert!(!t.decide(&no, Some(100.0)));
        assert!(t.decide(&Incoming::default(), Some(100.0)));
        assert!(!t.decide(&Incoming::default(), Some(0.0)));
        let hits = (0..10_000)
            .filter(|_| t.decide(&Incoming::default(), Some(10.0)))
            .count();
        assert!((700..1300).contains(&hits), "{hits} of 10000 at 10%");
    }
}
