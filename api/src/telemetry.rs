//! Istio's standard metrics, emitted verbatim (names, labels, Envoy's default buckets) so that
//! Istio dashboards and Kiali's graph queries work on a Strait mesh unchanged.
//!
//! Every series carries every standard label; a value nobody knows is the literal `unknown`
//! (Kiali finds traffic from outside the mesh by `source_workload="unknown"`). The one
//! exception is Istio's own: `grpc_response_status` is absent (empty) on plain HTTP requests,
//! which is what Kiali's queries expect ("negative tests on a non-existent label match
//! everything"). Cardinality is bounded: workloads, services and codes, never paths or ids.

use std::collections::BTreeMap;
use std::time::Duration;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use crate::snapshot::ServiceEntry;

pub const UNKNOWN: &str = "unknown";

/// What a proxy reports besides metrics: spans (to an OTLP/HTTP endpoint) and access logs.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryOptions {
    /// e.g. `http://127.0.0.1:4318/v1/traces`; no spans are exported without one (trace
    /// context is still propagated).
    pub otlp_endpoint: Option<String>,
    /// Percentage (0–100) of new traces sampled; an incoming decision is honoured.
    pub trace_sampling: f64,
    pub access_log: Option<crate::accesslog::LogFormat>,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        TelemetryOptions {
            otlp_endpoint: None,
            // Istio's default.
            trace_sampling: 1.0,
            access_log: None,
        }
    }
}

/// Request header carrying the calling workload's metadata to the destination sidecar (inside
/// mTLS; Istio's metadata exchange does the same). Its principal and cluster are never taken
/// from it: those come from the verified peer certificate. Removed before the app sees the
/// request.
pub const PEER_METADATA_HEADER: &str = "x-strait-peer-metadata";

/// Envoy's default histogram buckets (`HistogramSettingsImpl::defaultBuckets`), in
/// milliseconds for timers; Istio uses them for its duration and size distributions.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// One side of an edge: Istio's eight per-side labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Default for Workload {
    fn default() -> Self {
        Workload::unknown()
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

impl Workload {
    pub fn unknown() -> Self {
        Workload {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// A workload from its name, namespace, identity, cluster and labels: `app`/`version`
    /// (or the `app.kubernetes.io` ones), and Istio's canonical service and revision (their
    /// labels, else the app name or the workload's, and `latest`).
    pub fn from_labels(
        workload: &str,
        namespace: &str,
        principal: &str,
        cluster: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let or_unknown = |s: &str| {
            if s.is_empty() {
                UNKNOWN.to_string()
            } else {
                s.to_string()
            }
        };
        let app = label(labels, &["app", "app.kubernetes.io/name"]);
        let version = label(labels, &["version", "app.kubernetes.io/version"]);
        Workload {
            workload: or_unknown(workload),
            namespace: or_unknown(namespace),
            principal: or_unknown(principal),
            app: app.map_or_else(|| UNKNOWN.to_string(), str::to_string),
            version: version.map_or_else(|| UNKNOWN.to_string(), str::to_string),
            canonical_service: label(
                labels,
                &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"],
            )
            .map_or_else(|| or_unknown(workload), str::to_string),
            canonical_revision: label(
                labels,
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
            )
            .unwrap_or("latest")
            .to_string(),
            cluster: or_unknown(cluster),
        }
    }

    /// The workload behind endpoint `i` of `svc`.
    pub fn of_endpoint(svc: &ServiceEntry, i: usize) -> Self {
        let Some(ep) = svc.endpoints.get(i) else {
            return Workload::default();
        };
        let ns = ep.identity().namespace().unwrap_or(&svc.namespace);
        Workload::from_labels(
            svc.workload(i),
            ns,
            &ep.identity().to_string(),
            &ep.locality().cluster,
            ep.labels(),
        )
    }

    /// The metadata header's value: the fields a peer cannot learn from the certificate.
    pub fn metadata(&self) -> String {
        [
            ("workload", &self.workload),
            ("namespace", &self.namespace),
            ("app", &self.app),
            ("version", &self.version),
            ("canonical_service", &self.canonical_service),
            ("canonical_revision", &self.canonical_revision),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", sanitize(v)))
        .collect::<Vec<_>>()
        .join(";")
    }

    /// The caller as the destination sidecar sees it: principal and cluster from the verified
    /// certificate (`unknown` without one), the namespace from the principal when it names one,
    /// the rest from the metadata header if the caller sent it. A malformed header yields
    /// `unknown` fields, never an error.
    pub fn from_metadata(header: Option<&str>, principal: Option<&str>, cluster: Option<&str>) -> Self {
        let mut w = Workload::unknown();
        for pair in header.unwrap_or_default().split(';') {
            let Some((k, v)) = pair.split_once('=') else { continue };
            let v = sanitize(v);
            if v.is_empty() {
                continue;
            }
            match k.trim() {
                "workload" => w.workload = v,
                "namespace" => w.namespace = v,
                "app" => w.app = v,
                "version" => w.version = v,
                "canonical_service" => w.canonical_service = v,
                "canonical_revision" => w.canonical_revision = v,
                _ => {}
            }
        }
        if let Some(p) = principal {
            w.principal = p.to_string();
            if let Some(ns) = p
                .parse::<strait_trust::SpiffeId>()
                .ok()
                .as_ref()
                .and_then(|id| id.namespace())
            {
                w.namespace = ns.to_string();
            }
        }
        if let Some(c) = cluster {
            w.cluster = c.to_string();
        }
        w
    }
}

/// Label values stay printable and bounded: at most 253 characters of `[A-Za-z0-9._:/-]`.
fn sanitize(v: &str) -> String {
    v.trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
        .take(253)
        .collect()
}

/// The service a request was addressed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// The fully qualified name (`greeter.demo.svc.clusterset.local`).
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    pub fn of(svc: &crate::snapshot::ServiceEntry) -> Self {
        ServiceName {
            host: svc.host(),
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
        }
    }

    pub fn unknown() -> Self {
        ServiceName {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The calling proxy (a sidecar's outbound side, or a gateway for the hop it makes).
    Source,
    /// The proxy in front of the destination workload.
    Destination,
}

/// Who called whom, as a metric sees it.
pub struct Edge<'a> {
    pub reporter: Reporter,
    pub source: &'a Workload,
    pub destination: &'a Workload,
    pub service: &'a ServiceName,
    /// `http`, `grpc` or `tcp`.
    pub protocol: &'static str,
}

impl Edge<'_> {
    /// The 21 labels shared by the HTTP and TCP families, in Istio's order.
    fn common(&self) -> [&str; 21] {
        let (s, d) = (self.source, self.destination);
        [
            match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            &s.workload,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            &s.canonical_service,
            &s.canonical_revision,
            &s.cluster,
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &self.service.host,
            &self.service.name,
            &self.service.namespace,
            &d.canonical_service,
            &d.canonical_revision,
            &d.cluster,
            self.protocol,
        ]
    }

    /// `mutual_tls` where the destination proxy saw the peer's verified certificate; a source
    /// cannot know the server's policy (`unknown`, as Istio reports).
    fn security(&self) -> &'static str {
        match self.reporter {
            Reporter::Destination => "mutual_tls",
            Reporter::Source => UNKNOWN,
        }
    }
}

const COMMON_LABELS: [&str; 21] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
];

/// Every label of the HTTP/gRPC family, in order.
pub fn http_labels() -> Vec<&'static str> {
    let mut v = COMMON_LABELS.to_vec();
    v.extend([
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ]);
    v
}

/// Every label of the `istio_tcp_*` family, in order.
pub fn tcp_labels() -> Vec<&'static str> {
    let mut v = COMMON_LABELS.to_vec();
    v.extend(["response_flags", "connection_security_policy"]);
    v
}

/// How one HTTP or gRPC request ended.
#[derive(Clone, Debug, Default)]
pub struct HttpOutcome {
    pub response_code: u16,
    /// gRPC requests only.
    pub grpc_status: Option<u32>,
    /// Envoy's `%RESPONSE_FLAGS%` short codes (`UF`, `UH`, `URX`, `UT`, `UO`, `FI`, `RL`, `DC`),
    /// `-` for none.
    pub flags: &'static str,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_messages: u64,
    pub response_messages: u64,
}

/// Istio's standard metrics on one registry.
#[derive(Clone, Debug)]
pub struct IstioMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    request_messages: IntCounterVec,
    response_messages: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    /// The HTTP series already in use, found with one hash of a request's labels instead of one
    /// lookup per metric (prometheus hashes every label value again for each).
    http_series: Arc<SeriesCache>,
}

/// [`IstioMetrics`]' HTTP series by a keyed hash of their label values; an entry holds its
/// values, so a request whose labels hash alike but differ takes the slow path instead.
#[derive(Debug, Default)]
struct SeriesCache {
    hasher: RandomState,
    series: Mutex<HashMap<u64, Arc<HttpSeries>>>,
}

/// The series of one HTTP label set: the message counters for gRPC only.
#[derive(Debug)]
struct HttpSeries {
    labels: Vec<String>,
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    messages: Option<(IntCounter, IntCounter)>,
}

impl IstioMetrics {
    pub fn new(registry: &Registry) -> Self {
        let http = http_labels();
        let tcp = tcp_labels();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(ENVOY_BUCKETS.to_vec()), &http)
                .expect("valid metric");
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        IstioMetrics {
            requests: counter(
                "istio_requests_total",
                "Requests handled by this proxy (Istio standard metric)",
                &http,
            ),
            duration: histogram(
                "istio_request_duration_milliseconds",
                "Request duration from the first byte of the request to the last of the response, in milliseconds",
            ),
            request_bytes: histogram("istio_request_bytes", "Request body sizes, in bytes"),
            response_bytes: histogram("istio_response_bytes", "Response body sizes, in bytes"),
            request_messages: counter("istio_request_messages_total", "gRPC messages sent by clients", &http),
            response_messages: counter("istio_response_messages_total", "gRPC messages sent by servers", &http),
            tcp_sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent towards the client on TCP connections (the response direction)",
                &tcp,
            ),
            tcp_received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client on TCP connections (the request direction)",
                &tcp,
            ),
            tcp_opened: counter("istio_tcp_connections_opened_total", "TCP connections opened", &tcp),
            tcp_closed: counter("istio_tcp_connections_closed_total", "TCP connections closed", &tcp),
            http_series: Arc::default(),
        }
    }

    /// The series of `labels` (an HTTP label set), made on first use.
    fn http_series(&self, labels: &[&str], grpc: bool) -> Arc<HttpSeries> {
        let mut h = self.http_series.hasher.build_hasher();
        for l in labels {
            l.hash(&mut h);
        }
        let hash = h.finish();
        let mut cache = self.http_series.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&hash) {
            if s.labels.iter().map(String::as_str).eq(labels.iter().copied()) {
                return s.clone();
            }
        }
        let series = Arc::new(HttpSeries {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            requests: self.requests.with_label_values(labels),
            duration: self.duration.with_label_values(labels),
            request_bytes: self.request_bytes.with_label_values(labels),
            response_bytes: self.response_bytes.with_label_values(labels),
            messages: grpc.then(|| {
                (
                    self.request_messages.with_label_values(labels),
                    self.response_messages.with_label_values(labels),
                )
            }),
        });
        // A label set that hashes like another one in use is served, not cached.
        cache.entry(hash).or_insert_with(|| series.clone());
        series
    }

    /// Records one finished HTTP or gRPC request.
    pub fn record_http(&self, edge: &Edge, o: &HttpOutcome) {
        let code = o.response_code.to_string();
        let grpc = o.grpc_status.map(|s| s.to_string()).unwrap_or_default();
        let (common, last) = (edge.common(), [code.as_str(), grpc.as_str(), o.flags, edge.security()]);
        let labels: [&str; COMMON_LABELS.len() + 4] =
            std::array::from_fn(|i| common.get(i).copied().unwrap_or_else(|| last[i - common.len()]));
        let series = self.http_series(&labels, edge.protocol == "grpc");
        series.requests.inc();
        series.duration.observe(o.duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(o.request_bytes as f64);
        series.response_bytes.observe(o.response_bytes as f64);
        if let Some((request, response)) = &series.messages {
            request.inc_by(o.request_messages);
            response.inc_by(o.response_messages);
        }
    }

    fn tcp_values<'a>(edge: &'a Edge, flags: &'a str) -> Vec<&'a str> {
        let mut labels: Vec<&str> = edge.common().to_vec();
        labels.extend([flags, edge.security()]);
        labels
    }

    /// A TCP connection was opened (or refused: `flags` says why).
    pub fn tcp_opened(&self, edge: &Edge, flags: &str) {
        self.tcp_opened.with_label_values(&Self::tcp_values(edge, flags)).inc();
    }

    /// A TCP connection closed after `received` bytes from the client and `sent` to it.
    pub fn tcp_closed(&self, edge: &Edge, flags: &str, received: u64, sent: u64) {
        let labels = Self::tcp_values(edge, flags);
        self.tcp_closed.with_label_values(&labels).inc();
        self.tcp_received.with_label_values(&labels).inc_by(received);
        self.tcp_sent.with_label_values(&labels).inc_by(sent);
    }
}

/// Counts gRPC messages in a body's bytes as they pass: each message is a 5-byte prefix (flag,
/// big-endian length) and that many bytes, split across frames in any way.
#[derive(Clone, Debug, Default)]
pub struct GrpcFramer {
    /// Bytes of the current prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to skip.
    remaining: u64,
    pub messages: u64,
}

impl GrpcFramer {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = (self.remaining as usize).min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == 5 {
                self.messages += 1;
                self.remaining =
                    u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as u64;
                self.prefix_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_are_recorded_in_their_own_series() {
        let m = IstioMetrics::new(&Registry::new());
        let a = Workload::unknown();
        let b = Workload {
            workload: "b".into(),
            ..Workload::unknown()
        };
        let svc = ServiceName::unknown();
        let edge = |destination, protocol| Edge {
            reporter: Reporter::Source,
            source: &a,
            destination,
            service: &svc,
            protocol,
        };
        let labels = |e: &Edge, code: &'static str, grpc: &'static str| {
            let mut l: Vec<&str> = e.common().to_vec();
            l.extend([code, grpc, "-", e.security()]);
            l.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let count = |l: &[String]| m.requests.with_label_values(l).get();
        let ok = HttpOutcome {
            response_code: 200,
            flags: "-",
            duration: Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
            ..Default::default()
        };
        m.record_http(&edge(&a, "http"), &ok);
        m.record_http(&edge(&a, "http"), &ok);
        let failed = HttpOutcome {
            response_code: 503,
            ..ok.clone()
        };
        m.record_http(&edge(&b, "http"), &failed);
        let grpc = HttpOutcome {
            grpc_status: Some(0),
            request_messages: 2,
            response_messages: 3,
            ..ok.clone()
        };
        m.record_http(&edge(&b, "grpc"), &grpc);
        m.record_http(&edge(&b, "grpc"), &grpc);

        let a200 = labels(&edge(&a, "http"), "200", "");
        assert_eq!(count(&a200), 2);
        assert_eq!(count(&labels(&edge(&b, "http"), "503", "")), 1);
        let g = labels(&edge(&b, "grpc"), "200", "0");
        assert_eq!(count(&g), 2);
        assert_eq!(m.request_messages.with_label_values(&g).get(), 4);
        assert_eq!(m.response_messages.with_label_values(&g).get(), 6);
        let h = m.duration.with_label_values(&a200);
        assert_eq!((h.get_sample_count(), h.get_sample_sum()), (2, 6.0));
        assert_eq!(m.response_bytes.with_label_values(&a200).get_sample_sum(), 40.0);
        // Plain HTTP has no message series.
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::core::Collector::collect(&m.request_messages))
            .unwrap();
        assert!(!text.contains(r#"request_protocol="http""#), "{text}");

        // Labels that find another set's entry under their hash are recorded in their own series.
        let b200 = labels(&edge(&b, "http"), "200", "");
        let b200_refs: Vec<&str> = b200.iter().map(String::as_str).collect();
        let mut hasher = m.http_series.hasher.build_hasher();
        for l in &b200_refs {
            l.hash(&mut hasher);
        }
        let a_series = m.http_series(&a200.iter().map(String::as_str).collect::<Vec<_>>(), false);
        m.http_series.series.lock().unwrap().insert(hasher.finish(), a_series);
        m.record_http(&edge(&b, "http"), &ok);
        assert_eq!((count(&b200), count(&a200)), (1, 2));
    }

    #[test]
    fn grpc_messages_are_counted_across_any_split() {
        let mut wire = vec![];
        for len in [0u32, 3, 70000] {
            wire.push(0);
            wire.extend(len.to_be_bytes());
            wire.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for chunk in [1, 2, 5, 7, 4096, wire.len()] {
            let mut f = GrpcFramer::default();
            for c in wire.chunks(chunk) {
                f.feed(c);
            }
            assert_eq!(f.messages, 3, "chunks of {chunk}");
        }
    }

    #[test]
    fn metadata_round_trips_but_identity_comes_from_the_certificate() {
        let labels: BTreeMap<String, String> = [("app", "greeter"), ("version", "v2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let me = Workload::from_labels(
            "greeter-v2",
            "demo",
            "spiffe://mesh.local/ns/demo/sa/greeter",
            "west",
            &labels,
        );
        assert_eq!(me.canonical_service, "greeter");
        assert_eq!(me.canonical_revision, "v2");
        // A caller claiming another namespace in its metadata gets the certificate's.
        let forged = me.metadata().replace("namespace=demo", "namespace=prod");
        let seen = Workload::from_metadata(
            Some(&forged),
            Some("spiffe://mesh.local/ns/demo/sa/greeter"),
            Some("west"),
        );
        assert_eq!(seen, me);
        let junk = Workload::from_metadata(Some(";;=;\u{0}app=\"x\"{}"), None, None);
        assert_eq!(junk.principal, UNKNOWN);
        assert_eq!(junk.cluster, UNKNOWN);
        let bare = Workload::from_labels("w", "", "", "", &BTreeMap::new());
        assert_eq!(
            (bare.canonical_service.as_str(), bare.canonical_revision.as_str()),
            ("w", "latest")
        );
    }
}
