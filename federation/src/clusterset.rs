//! The clusterset page: every controller shows the whole clusterset — clusters with their
//! zones, workloads and gateways, live traffic edges, peers and their leases, routes and
//! policies with their per-cluster status — from the mesh's own data, no metrics backend.
//!
//! Traffic: the controller reads the Istio standard metrics of the proxies connected to it
//! (their admin addresses come with their Hello) every [`SCRAPE_EVERY`], keeps a short window
//! of samples per proxy, and turns the counter deltas into edges (requests/s, error rate, p99
//! from the duration histogram, mTLS share, TCP bytes/s). That cluster summary goes to every
//! peer on the peering stream, so each controller merges all clusters' summaries; a lost
//! cluster is shown as lost, its last edges marked stale.
//!
//! Served at `/` (the page) and `/api/clusterset` (its JSON, documented in the README) on the
//! controller's admin address, by axum, with the admin's other views behind it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use strait_api::admin::JsonView;
use strait_api::pb;
use tokio::sync::watch;

use crate::peering::PeerTable;
use crate::xds::XdsServer;

/// How often the controller reads its proxies' metrics.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(2);
/// The window rates are computed over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One edge as a proxy reports it (`reporter` tells which side).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct EdgeKey {
    reporter: String,
    source_cluster: String,
    source_workload: String,
    source_namespace: String,
    destination_cluster: String,
    destination_service: String,
    destination_workload: String,
    protocol: String,
}

/// Counters of one edge at one moment.
#[derive(Clone, Debug, Default)]
struct Counts {
    requests: f64,
    errors: f64,
    mtls: f64,
    tcp_bytes: f64,
    /// Cumulative duration histogram (ms upper bound → count).
    buckets: BTreeMap<u64, f64>,
}

/// One Prometheus text sample: its name, labels and value.
type Sample<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// Each proxy's recent scrapes: when, and its edges' counters then.
type Samples = HashMap<String, VecDeque<(Instant, HashMap<EdgeKey, Counts>)>>;

/// Labels of one Prometheus text sample: `name{k="v",...} value`.
fn parse_line(line: &str) -> Option<Sample<'_>> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, rest) = match head.find('{') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => return Some((head, vec![], value)),
    };
    let rest = rest.strip_suffix('}')?;
    let mut labels = vec![];
    let mut s = rest;
    while !s.is_empty() {
        let eq = s.find('=')?;
        let key = &s[..eq];
        let after = s[eq + 1..].strip_prefix('"')?;
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => val.push(c),
            }
        }
        let end = end?;
        labels.push((key, val));
        s = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

/// The Istio standard series of one proxy's `/metrics`, summed per edge.
fn parse_metrics(text: &str) -> HashMap<EdgeKey, Counts> {
    let mut out: HashMap<EdgeKey, Counts> = HashMap::new();
    for line in text.lines() {
        if !line.starts_with("istio_") {
            continue;
        }
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let get = |k: &str| {
            labels
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        let key = EdgeKey {
            reporter: get("reporter").to_string(),
            source_cluster: get("source_cluster").to_string(),
            source_workload: get("source_workload").to_string(),
            source_namespace: get("source_workload_namespace").to_string(),
            destination_cluster: get("destination_cluster").to_string(),
            destination_service: get("destination_service").to_string(),
            destination_workload: get("destination_workload").to_string(),
            protocol: get("request_protocol").to_string(),
        };
        match name {
            "istio_requests_total" => {
                let c = out.entry(key).or_default();
                c.requests += value;
                let grpc = get("grpc_response_status");
                if get("response_code").starts_with('5') || (!grpc.is_empty() && grpc != "0") {
                    c.errors += value;
                }
                if get("connection_security_policy") == "mutual_tls" {
                    c.mtls += value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let le = get("le");
                let bound = if le == "+Inf" {
                    u64::MAX
                } else {
                    le.parse::<f64>().map(|v| v as u64).unwrap_or(u64::MAX)
                };
                *out.entry(key).or_default().buckets.entry(bound).or_default() += value;
            }
            "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => {
                out.entry(key).or_default().tcp_bytes += value;
            }
            "istio_tcp_connections_opened_total" => {
                let c = out.entry(key).or_default();
                c.requests += value;
                if get("connection_security_policy") == "mutual_tls" {
                    c.mtls += value;
                }
                if get("response_flags") != "-" {
                    c.errors += value;
                }
            }
            _ => {}
        }
    }
    out
}

/// The q-quantile of a cumulative histogram, interpolated within its bucket (as Prometheus's
/// `histogram_quantile`); `None` without observations.
fn quantile(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = buckets
        .get(&u64::MAX)
        .copied()
        .or_else(|| buckets.values().last().copied())?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for (&bound, &count) in buckets {
        if count >= rank {
            if bound == u64::MAX {
                return Some(prev_bound);
            }
            let width = bound as f64 - prev_bound;
            let inside = (count - prev_count).max(f64::MIN_POSITIVE);
            return Some(prev_bound + width * (rank - prev_count) / inside);
        }
        prev_bound = bound as f64;
        prev_count = count;
    }
    Some(prev_bound)
}

/// Reads the connected proxies' metrics and keeps this cluster's traffic summary current.
pub struct TrafficCollector {
    cluster: String,
    samples: Mutex<Samples>,
}

impl TrafficCollector {
    pub fn new(cluster: &str) -> Self {
        TrafficCollector {
            cluster: cluster.to_string(),
            samples: Mutex::default(),
        }
    }

    /// Scrapes every [`SCRAPE_EVERY`] and publishes the summary.
    pub async fn run(self: Arc<Self>, xds: XdsServer, tx: watch::Sender<Arc<pb::TrafficSummary>>) {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let mut tick = tokio::time::interval(SCRAPE_EVERY);
        loop {
            tick.tick().await;
            let proxies = xds.proxies();
            let scrapes = proxies.iter().filter(|p| !p.admin.is_empty()).map(|p| {
                let client = client.clone();
                let node = p.node.clone();
                let uri = format!("http://{}/metrics", p.admin);
                async move {
                    let body = tokio::time::timeout(Duration::from_secs(1), async {
                        use http_body_util::BodyExt;
                        let resp = client.get(uri.parse().ok()?).await.ok()?;
                        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
                        String::from_utf8(bytes.to_vec()).ok()
                    })
                    .await
                    .ok()
                    .flatten();
                    (node, body)
                }
            });
            let results = futures::future::join_all(scrapes).await;
            let now = Instant::now();
            let summary = {
                let Ok(mut samples) = self.samples.lock() else { continue };
                let live: Vec<String> = results.iter().map(|(n, _)| n.clone()).collect();
                samples.retain(|node, _| live.contains(node));
                for (node, body) in results {
                    let Some(body) = body else { continue };
                    let series = samples.entry(node).or_default();
                    series.push_back((now, parse_metrics(&body)));
                    while series.len() > 2 && series.front().is_some_and(|(t, _)| now.duration_since(*t) > WINDOW) {
                        series.pop_front();
                    }
                }
                self.summarize(&samples)
            };
            // Each summary sent goes to every peer through two gateways and wakes every
            // controller's merge loop; one that repeats the last (idle, or steady traffic)
            // tells them nothing. The channel holds the last one published (this task is its
            // only sender).
            if same_traffic(&tx.borrow().edges, &summary.edges) {
                continue;
            }
            tx.send_replace(Arc::new(summary));
        }
    }

    fn summarize(&self, samples: &Samples) -> pb::TrafficSummary {
        // Per edge: the deltas over each proxy's window, summed across proxies.
        let mut edges: BTreeMap<EdgeKey, (Counts, f64)> = BTreeMap::new();
        for series in samples.values() {
            let (Some((t0, first)), Some((t1, last))) = (series.front(), series.back()) else {
                continue;
            };
            let dt = t1.duration_since(*t0).as_secs_f64();
            if dt <= 0.0 {
                continue;
            }
            for (key, now) in last {
                let before = first.get(key).cloned().unwrap_or_default();
                // A counter that went down belongs to a restarted proxy: count from zero.
                let d = |a: f64, b: f64| if a >= b { a - b } else { a };
                let entry = edges.entry(key.clone()).or_insert_with(|| (Counts::default(), dt));
                entry.0.requests += d(now.requests, before.requests);
                entry.0.errors += d(now.errors, before.errors);
                entry.0.mtls += d(now.mtls, before.mtls);
                entry.0.tcp_bytes += d(now.tcp_bytes, before.tcp_bytes);
                for (le, c) in &now.buckets {
                    *entry.0.buckets.entry(*le).or_default() += d(*c, before.buckets.get(le).copied().unwrap_or(0.0));
                }
                entry.1 = entry.1.max(dt);
            }
        }
        pb::TrafficSummary {
            cluster: self.cluster.clone(),
            at_unix_ms: strait_api::unix_ms(std::time::SystemTime::now()),
            window_ms: WINDOW.as_millis() as u32,
            edges: edges
                .into_iter()
                .filter(|(_, (c, _))| c.requests > 0.0 || c.tcp_bytes > 0.0)
                .map(|(k, (c, dt))| pb::TrafficEdge {
                    reporter: k.reporter,
                    source_cluster: k.source_cluster,
                    source_workload: k.source_workload,
                    source_namespace: k.source_namespace,
                    destination_cluster: k.destination_cluster,
                    destination_service: k.destination_service,
                    destination_workload: k.destination_workload,
                    protocol: k.protocol,
                    rps: c.requests / dt,
                    error_rate: if c.requests > 0.0 { c.errors / c.requests } else { 0.0 },
                    p99_ms: quantile(&c.buckets, 0.99).unwrap_or(0.0),
                    mtls: if c.requests > 0.0 { c.mtls / c.requests } else { 0.0 },
                    bytes_per_second: c.tcp_bytes / dt,
                })
                .collect(),
        }
    }
}

/// Whether two summaries' edges say the same: the same edges, each figure within
/// [`SAME_WITHIN`] of the other (a steady rate measured twice differs in its last digits).
fn same_traffic(a: &[pb::TrafficEdge], b: &[pb::TrafficEdge]) -> bool {
    fn labels(e: &pb::TrafficEdge) -> [&String; 8] {
        [
            &e.reporter,
            &e.source_cluster,
            &e.source_workload,
            &e.source_namespace,
            &e.destination_cluster,
            &e.destination_service,
            &e.destination_workload,
            &e.protocol,
        ]
    }
    let figures = |e: &pb::TrafficEdge| [e.rps, e.error_rate, e.p99_ms, e.mtls, e.bytes_per_second];
    let close = |(x, y): (f64, f64)| (x - y).abs() <= SAME_WITHIN * x.abs().max(y.abs()) + 1e-6;
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| labels(x) == labels(y) && figures(x).into_iter().zip(figures(y)).all(close))
}

/// How far apart (relative) two figures of an edge may be and still count as the same: well
/// inside the rate shares' own hysteresis (3 %), so no share a new summary would move is held.
const SAME_WITHIN: f64 = 0.01;

/// What the page shows, gathered from the controller's views.
pub struct Page {
    pub cluster: String,
    pub region: String,
    pub status: JsonView,
    pub services: JsonView,
    /// Every endpoint of the merged catalog: `{"endpoints": [{cluster, zone, workload, service,
    /// namespace, ready}]}`.
    pub endpoints: JsonView,
    pub routes: JsonView,
    pub policies: JsonView,
    pub traffic: watch::Receiver<Arc<pb::TrafficSummary>>,
    pub peers: PeerTable,
    pub registry: prometheus::Registry,
}

/// A gauge of the controller's own tunnel client, by gateway address.
fn gauge_by_gateway(registry: &prometheus::Registry, name: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            if let Some(l) = m.get_label().iter().find(|l| l.name() == "gateway") {
                out.insert(l.value().to_string(), m.get_gauge().get_value());
            }
        }
    }
    out
}

fn edge_json(e: &pb::TrafficEdge, stale: bool) -> serde_json::Value {
    json!({
        "reporter": e.reporter,
        "source_cluster": e.source_cluster,
        "source_workload": e.source_workload,
        "source_namespace": e.source_namespace,
        "destination_cluster": e.destination_cluster,
        "destination_service": e.destination_service,
        "destination_workload": e.destination_workload,
        "protocol": e.protocol,
        "rps": e.rps,
        "error_rate": e.error_rate,
        "p99_ms": e.p99_ms,
        "mtls": e.mtls,
        "bytes_per_second": e.bytes_per_second,
        "stale": stale,
    })
}

/// Joins the caller's and the destination's reports of each edge: rates, errors and latency as
/// the caller saw them (Kiali's choice), the mTLS share as the destination verified it.
fn merge_edges(reports: &[(pb::TrafficEdge, bool)]) -> Vec<serde_json::Value> {
    type Key = (String, String, String, String, String, String);
    let key = |e: &pb::TrafficEdge| -> Key {
        (
            e.source_cluster.clone(),
            e.source_workload.clone(),
            e.destination_cluster.clone(),
            e.destination_service.clone(),
            e.destination_workload.clone(),
            e.protocol.clone(),
        )
    };
    let mut merged: BTreeMap<Key, (pb::TrafficEdge, bool, Option<f64>)> = BTreeMap::new();
    for (e, stale) in reports.iter().filter(|(e, _)| e.reporter == "source") {
        merged.insert(key(e), (e.clone(), *stale, None));
    }
    for (e, stale) in reports.iter().filter(|(e, _)| e.reporter == "destination") {
        match merged.get_mut(&key(e)) {
            Some(m) => m.2 = Some(e.mtls),
            None => {
                merged.insert(key(e), (e.clone(), *stale, Some(e.mtls)));
            }
        }
    }
    merged
        .into_values()
        .map(|(mut e, stale, mtls)| {
            // A source report alone cannot tell (Istio reports `unknown`): no padlock claimed.
            e.mtls = mtls.unwrap_or(0.0);
            edge_json(&e, stale)
        })
        .collect()
}

impl Page {
    /// The whole clusterset as JSON (`GET /api/clusterset`).
    pub fn json(&self) -> serde_json::Value {
        let status = (self.status)();
        let services = (self.services)();
        let peers = self.peers.snapshot();
        let now = Instant::now();
        let fallback = gauge_by_gateway(&self.registry, "strait_tunnel_fallback_active");
        let down = gauge_by_gateway(&self.registry, "strait_tunnel_gateway_down");

        // Clusters: this one, then every configured or known peer with its lease.
        let mut clusters = vec![json!({
            "name": self.cluster,
            "region": self.region,
            "state": "local",
            "lease_expires_in_ms": serde_json::Value::Null,
            "gateway": serde_json::Value::Null,
        })];
        for p in status["peers"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            let lease_valid = p["lease_valid"].as_bool().unwrap_or(false);
            let connected = p["connected"].as_bool().unwrap_or(false);
            let state = match (lease_valid, connected) {
                (true, true) => "connected",
                (true, false) => "unreachable",
                (false, _) => "lost",
            };
            let gw = p["gateway"].as_str().unwrap_or_default();
            clusters.push(json!({
                "name": name,
                "region": p["region"],
                "state": state,
                "lease_expires_in_ms": p["lease_expires_in_ms"],
                "last_renewed_unix_ms": p["last_renewed_unix_ms"],
                "exported_services": p["exported_services"],
                "gateway": if gw.is_empty() { serde_json::Value::Null } else { json!({
                    "address": gw,
                    "transport": if fallback.get(gw).copied().unwrap_or(0.0) > 0.0 { "tcp" } else { "quic" },
                    "reachable": down.get(gw).copied().unwrap_or(0.0) == 0.0 && state != "lost",
                })},
            }));
        }

        // Workloads: every endpoint of the merged catalog, by cluster and zone.
        let mut workloads: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
        let mut zones: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for svc in services["services"].as_array().into_iter().flatten() {
            for c in svc["clusters"].as_array().into_iter().flatten() {
                let cluster = c["cluster"].as_str().unwrap_or_default().to_string();
                for z in c["zones"].as_array().into_iter().flatten() {
                    let z = z.as_str().unwrap_or_default().to_string();
                    let list = zones.entry(cluster.clone()).or_default();
                    if !z.is_empty() && !list.contains(&z) {
                        list.push(z);
                    }
                }
            }
        }
        for (name, list) in &zones {
            for c in clusters.iter_mut().filter(|c| c["name"] == name.as_str()) {
                let mut l = list.clone();
                l.sort();
                c["zones"] = json!(l);
            }
        }
        for e in (self.endpoints)()["endpoints"].as_array().into_iter().flatten() {
            let cluster = e["cluster"].as_str().unwrap_or_default().to_string();
            let workload = e["workload"].as_str().unwrap_or_default().to_string();
            workloads.insert((cluster, workload), e.clone());
        }
        // Gateways are nodes too (the hop into their cluster).
        for c in &clusters {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let workload = format!("gateway-{name}");
            workloads.entry((name.clone(), workload.clone())).or_insert_with(|| {
                json!({"cluster": name, "workload": workload, "service": "gateway", "namespace": strait_api::SYSTEM_NAMESPACE, "ready": c["state"] != "lost", "zone": ""})
            });
        }

        // Traffic: this cluster's summary and every peer's (stale once its lease ran out).
        let mut reports: Vec<(pb::TrafficEdge, bool)> =
            self.traffic.borrow().edges.iter().map(|e| (e.clone(), false)).collect();
        for p in &peers {
            if let Some(t) = &p.traffic {
                let stale = !p.alive(now);
                reports.extend(t.edges.iter().map(|e| (e.clone(), stale)));
            }
        }
        let edges = merge_edges(&reports);
        for e in &edges {
            for side in ["source", "destination"] {
                let cluster = e[format!("{side}_cluster")].as_str().unwrap_or_default().to_string();
                let workload = e[format!("{side}_workload")].as_str().unwrap_or_default().to_string();
                if workload.is_empty() || workload == strait_api::telemetry::UNKNOWN {
                    continue;
                }
                workloads.entry((cluster.clone(), workload.clone())).or_insert_with(
                    || json!({"cluster": cluster, "workload": workload, "service": "", "zone": "", "ready": true}),
                );
            }
        }
        json!({
            "cluster": self.cluster,
            "generated_unix_ms": strait_api::unix_ms(std::time::SystemTime::now()),
            "window_ms": WINDOW.as_millis() as u64,
            "clusters": clusters,
            "workloads": workloads.into_values().collect::<Vec<_>>(),
            "services": services["services"],
            "edges": edges,
            "routes": (self.routes)()["routes"],
            "policies": (self.policies)()["policies"],
            "config_version": status["config_version"],
            "errors": status["errors"],
        })
    }
}

/// The page itself: one HTML document with its script, no build step, no external assets.
pub const PAGE_HTML: &str = include_str!("clusterset.html");

/// The admin address's router: the page, its JSON API and a server-sent event stream of it,
/// then the admin's own views (`/metrics`, `/status`, ...) for every other path.
pub fn router(page: Arc<Page>, admin: strait_api::admin::Admin) -> axum::Router {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::{Html, IntoResponse};
    use axum::routing::get;
    let json_page = page.clone();
    let events_page = page;
    let admin = Arc::new(admin);
    axum::Router::new()
        .route("/", get(|| async { Html(PAGE_HTML) }))
        .route(
            "/api/clusterset",
            get(move || {
                let page = json_page.clone();
                async move { axum::Json(page.json()) }
            }),
        )
        .route(
            "/api/clusterset/events",
            get(move || {
                let page = events_page.clone();
                async move {
                    let stream = futures::stream::unfold(page, |page| async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let event = Event::default().event("clusterset").data(page.json().to_string());
                        Some((Ok::<_, std::convert::Infallible>(event), page))
                    });
                    Sse::new(stream).keep_alive(KeepAlive::default())
                }
            }),
        )
        .fallback(move |req: axum::extract::Request| {
            let admin = admin.clone();
            async move { admin.respond(req.uri().path(), req.uri().query()).into_response() }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP istio_requests_total x
istio_requests_total{connection_security_policy="unknown",destination_cluster="west",destination_service="greeter.demo.svc.clusterset.local",destination_workload="greeter-1",grpc_response_status="",reporter="source",request_protocol="http",response_code="200",source_cluster="east",source_workload="echo-1",source_workload_namespace="demo"} 90
istio_requests_total{connection_security_policy="unknown",destination_cluster="west",destination_service="greeter.demo.svc.clusterset.local",destination_workload="greeter-1",grpc_response_status="",reporter="source",request_protocol="http",response_code="503",source_cluster="east",source_workload="echo-1",source_workload_namespace="demo"} 10
istio_request_duration_milliseconds_bucket{destination_cluster="west",destination_service="greeter.demo.svc.clusterset.local",destination_workload="greeter-1",reporter="source",request_protocol="http",response_code="200",source_cluster="east",source_workload="echo-1",source_workload_namespace="demo",le="5"} 50
istio_request_duration_milliseconds_bucket{destination_cluster="west",destination_service="greeter.demo.svc.clusterset.local",destination_workload="greeter-1",reporter="source",request_protocol="http",response_code="200",source_cluster="east",source_workload="echo-1",source_workload_namespace="demo",le="10"} 100
istio_request_duration_milliseconds_bucket{destination_cluster="west",destination_service="greeter.demo.svc.clusterset.local",destination_workload="greeter-1",reporter="source",request_protocol="http",response_code="200",source_cluster="east",source_workload="echo-1",source_workload_namespace="demo",le="+Inf"} 100
"#;

    #[test]
    fn a_summary_that_repeats_the_last_is_not_sent_again() {
        let edge = |workload: &str, rps: f64| pb::TrafficEdge {
            reporter: "source".into(),
            source_cluster: "east".into(),
            source_workload: workload.into(),
            destination_cluster: "west".into(),
            destination_service: "greeter.demo.svc.clusterset.local".into(),
            rps,
            p99_ms: 4.5,
            mtls: 1.0,
            ..Default::default()
        };
        let last = vec![edge("echo-1", 40.0), edge("echo-2", 0.5)];
        // Idle stays idle; a steady rate measured again differs in its last digits.
        assert!(same_traffic(&[], &[]));
        assert!(same_traffic(&last, &[edge("echo-1", 40.2), edge("echo-2", 0.502)]));
        // A rate that moved, an edge that came or went, another caller: all sent.
        assert!(!same_traffic(&last, &[edge("echo-1", 41.0), edge("echo-2", 0.5)]));
        assert!(!same_traffic(&last, &[edge("echo-1", 40.0), edge("echo-2", 0.0)]));
        assert!(!same_traffic(&last, &last[..1]));
        assert!(!same_traffic(&last, &[edge("echo-1", 40.0), edge("echo-3", 0.5)]));
        assert!(!same_traffic(&[], &last[..1]));
        let mut errors = last.clone();
        errors[0].error_rate = 0.1;
        assert!(!same_traffic(&last, &errors));
    }

    #[test]
    fn counters_become_edges_with_rates_errors_and_p99() {
        let parsed = parse_metrics(SCRAPE);
        assert_eq!(parsed.len(), 1, "one edge: {parsed:?}");
        let c = parsed.values().next().unwrap();
        assert_eq!((c.requests, c.errors), (100.0, 10.0));
        let p99 = quantile(&c.buckets, 0.99).unwrap();
        assert!((9.8..=10.0).contains(&p99), "{p99}");
        assert_eq!(quantile(&c.buckets, 0.5), Some(5.0));

        let collector = TrafficCollector::new("east");
        let t0 = Instant::now();
        let mut later = parsed.clone();
        for v in later.values_mut() {
            v.requests += 20.0;
            v.errors += 2.0;
        }
        let samples: HashMap<_, _> = [(
            "echo-1".to_string(),
            VecDeque::from([(t0, parsed), (t0 + Duration::from_secs(2), later)]),
        )]
        .into();
        let s = collector.summarize(&samples);
        assert_eq!(s.edges.len(), 1);
        let e = &s.edges[0];
        assert!((e.rps - 10.0).abs() < 1e-9, "{e:?}");
        assert!((e.error_rate - 0.1).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for bad in [
            "istio_requests_total{a=\"b\" 1",
            "istio_requests_total{a=b} 1",
            "istio_x{} nan-ish",
            "",
        ] {
            let _ = parse_line(bad);
        }
        assert!(parse_metrics("istio_requests_total{a=\"unterminated} 3\n").is_empty());
    }

    #[test]
    fn the_destination_report_gives_the_edge_its_padlock() {
        let edge = |reporter: &str, mtls: f64| pb::TrafficEdge {
            reporter: reporter.into(),
            source_cluster: "east".into(),
            source_workload: "echo-1".into(),
            destination_cluster: "west".into(),
            destination_service: "greeter".into(),
            destination_workload: "greeter-1".into(),
            protocol: "http".into(),
            rps: 5.0,
            mtls,
            ..Default::default()
        };
        let merged = merge_edges(&[(edge("source", 0.0), false), (edge("destination", 1.0), false)]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0]["mtls"], 1.0);
        let alone = merge_edges(&[(edge("source", 0.0), true)]);
        assert_eq!(
            (alone[0]["mtls"].as_f64(), alone[0]["stale"].as_bool()),
            (Some(0.0), Some(true))
        );
    }
}
